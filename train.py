"""Train the vss models, on one CPU or under torchrun (DDP), optionally with Masked Video
Consistency, extra image datasets and the semi-supervised U2PL stage.

    python train.py                                       # tiny preset, embedded synthetic data
    python train.py --stage tracker --init runs/default/last.pt --out runs/tracker
    python train.py --stage refiner --init runs/tracker/last.pt --out runs/refiner
    torchrun --nproc_per_node 8 train.py --preset r50 --data VSPW_480p \\
        --backbone-weights resnet50.pth --init m2f_coco.pt --mvc
    python train.py --stage semi --init student.pt --data VSPW_480p --unlabeled-split test \\
        --pseudo pseudo/ --extra ADEChallengeData2016:vss/remap_examples/ade20k150_to_vspw124.json

The stages (``vss/stages.py``) are DVIS++'s chain, segmenter -> tracker -> refiner, each started
from the previous stage's checkpoint with --init, and the semi-supervised fine-tuning of a
student of any stage. --init loads a checkpoint's modules into the new stage's model, strictly
per module; the frozen modules must all be present (a tracker needs a segmenter, a refiner a
tracker checkpoint).

The run is described by one ``vss.config.Config``, written to OUT/config.json: --config, else
--preset, else the --init checkpoint's config (its model and recipe; a new tracker or refiner
stage takes the LR schedule of the preset, as DVIS++ trains every stage at its base LR),
else tiny; then the settings given on the command line. Without --data the embedded synthetic
videos (120x160) train at their own scale for 300 steps, so `python train.py` takes a few minutes
on 2 CPU cores.

Reproducibility and resume (``vss/sampler.py``): the data and randomness of a step are a pure
function of (seed, step), independent of the number of ranks, accumulation steps, data workers or
restarts. OUT/last.pt (every --save-every steps, after each evaluation, at the end, at the
and on SIGTERM/SIGINT) holds everything a run needs to continue exactly; best.pt is the state of
the best val mIoU. `--resume auto` continues from OUT/last.pt: the settings given on the command
line must equal the checkpoint's. --time-budget MIN fits the whole schedule (number of steps, LR
drops at the config's fractions of it) to MIN CPU-minutes: the first steps are timed, then the
schedule is fixed (logged in log.jsonl, saved in config.json) and run to its end, so the LR
decays within the budget. A NaN/inf loss stops the run with exit code 1; last.pt is then the last
good state.
"""

from __future__ import annotations

import argparse
import dataclasses
from functools import partial
import json
import math
from pathlib import Path
import signal
import sys
import time
import traceback

import torch
from torch import nn
from tqdm import tqdm

from vss.checkpoint import (
    check_resume,
    checkpoint_config,
    InitWeights,
    load_init_weights,
    load_resume_checkpoint,
    read_init,
    restore_training,
    RunInfo,
    save_training,
    StopRequest,
)
from vss.config import Config, get_preset, migrate_config, PRESETS
from vss.distributed import (
    all_reduce_sum,
    barrier,
    broadcast_buffers,
    broadcast_object,
    cleanup,
    DistInfo,
    init_distributed,
    is_main,
    print0,
)
from vss.engine import (
    BudgetClock,
    build_optimizer,
    build_scheduler,
    continue_log,
    evaluate_video_model,
    fit_iters,
    log_json,
    lr_milestones,
    make_autocast,
    memory_mb,
    NonFiniteLossError,
    train_step,
)
from vss.io import default_palette, iter_eval_videos, load_class_names, remove_stale_temporaries
from vss.mvc import mvc_settings
from vss.sampler import build_loader, step_seed
from vss.semi_stage import bank_fill
from vss.stages import STAGES, video_core
from vss.synthetic import ensure_default_dataset, TRAIN_ITERS, TRAIN_SIZES

FIT_STEPS = 10  # steps timed (after this process's first) before a schedule is fitted to --time-budget


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    g = p.add_argument_group("model and data")
    g.add_argument(
        "--preset", choices=sorted(PRESETS), help="config preset (default: the --init checkpoint's config, else tiny)"
    )
    g.add_argument("--config", type=Path, help="a config JSON (e.g. a run's config.json); replaces --preset")
    g.add_argument("--data", type=Path, help="VSPW-layout root (default: the embedded synthetic data)")
    g.add_argument("--split", help="training split (default train)")
    g.add_argument("--val-split", default="val", help="validation split (default val)")
    g.add_argument("--num-classes", type=int, help="K (default: the dataset's classes.json, else VSPW's 124)")
    g.add_argument("--stage", default="segmenter", choices=sorted(STAGES), help="training stage (default segmenter)")
    g.add_argument("--backbone-weights", type=Path, help="torchvision ResNet / DINOv2 state dict")
    g.add_argument(
        "--init",
        type=Path,
        help="weights to start from: a vss checkpoint (an earlier stage, this stage, or any stage "
        "for --stage semi) or a segmenter state dict",
    )
    g.add_argument(
        "--extra",
        action="append",
        metavar="ROOT:MAPFILE",
        help="an extra image dataset and its label map file, mixed into the labelled stream "
        "(segmenter/semi stages; repeatable). ROOT holds images/ + labels/, ADE20K's images/training + "
        "annotations/training or COCO's train2017 + panoptic_semseg_train2017; tables for ADE20K and "
        "COCO -> VSPW are in vss/remap_examples/",
    )
    g.add_argument(
        "--extra-ratio",
        type=float,
        metavar="R",
        help="fraction of labelled slots taken from --extra images (default: proportional to the "
        "numbers of videos and images)",
    )
    g = p.add_argument_group("schedule and sizes (override the config)")
    g.add_argument("--frames", type=int, help="frames per clip T of this stage (default: the config's)")
    g.add_argument("--batch", type=int, help="clips per rank and micro-batch")
    g.add_argument(
        "--accum", type=int, default=1, help="micro-batches per step (default 1); global batch = ranks x accum x batch"
    )
    g.add_argument("--iters", type=int, help="training steps (the LR schedule's length)")
    g.add_argument("--lr", type=float, help="base learning rate")
    g.add_argument(
        "--lr-steps",
        type=lambda v: tuple(float(f) for f in v.split(",")),  # checked in check_args
        help="fractions of the schedule where the LR drops 10x, e.g. 0.7,0.9 (default: the stage's preset); "
        "1 keeps it constant",
    )
    g.add_argument("--crop", type=int, nargs=2, metavar=("H", "W"), help="training crop")
    g.add_argument("--base-size", type=int, help="training short side before the random scale")
    g.add_argument("--test-size", type=int, help="evaluation short side (0 = original size)")
    g.add_argument("--points", type=int, help="points per mask (matching and mask losses)")
    g.add_argument("--amp", choices=["fp16", "bf16", "off"], help="mixed precision (default fp16 on CUDA, off on CPU)")
    g.add_argument(
        "--ctvis",
        action=argparse.BooleanOptionalAction,
        help="stage 1: CTVIS contrastive loss on the reid embeddings across the clip's frames (default: "
        "the config's; on for r50/vitl)",
    )
    g.add_argument("--seed", type=int, help="seed of the initialisation, data order and sampling (default 0)")
    g = p.add_argument_group("masked video consistency (MVC paper section 2.2)")
    g.add_argument(
        "--mvc", action=argparse.BooleanOptionalAction, help="add the loss on patch-masked frames (default off)"
    )
    g.add_argument("--mvc-patch", type=int, help="patch size b (default 64 x base_size / 480)")
    g.add_argument("--mvc-ratio", type=float, help="mask ratio r, the fraction of hidden patches (default 0.7)")
    g.add_argument("--mvc-weight", type=float, help="weight lambda of the masked-frames loss (default 1)")
    g = p.add_argument_group("semi-supervised stage (--stage semi; U2PL)")
    g.add_argument(
        "--pseudo",
        type=Path,
        metavar="DIR",
        help="pseudo labels + entropies of the unlabelled split (infer.py --ensemble A B --tta "
        "--tta-merge mean --save-probs --out DIR)",
    )
    g.add_argument("--unlabeled-split", help="split of the unlabelled videos (default test)")
    g.add_argument(
        "--unlabeled-data",
        type=Path,
        metavar="ROOT",
        help="VSPW-layout root of the unlabelled videos (default: --data)",
    )
    g.add_argument("--unsup-weight", type=float, help="lambda_u of the pseudo-label set loss (default 1)")
    g.add_argument(
        "--contrastive-weight", type=float, help="lambda_c of the U2PL contrastive loss (default 0.1, the paper's)"
    )
    g.add_argument(
        "--drop-percent", type=float, help="U2PL drop_percent: reliable percentile at the start, -> 100 (default 80)"
    )
    g.add_argument(
        "--entropy-alpha",
        type=float,
        help="U2PL alpha_0: %% of lowest/highest-entropy pixels for anchors/negatives, -> 0 (default 20)",
    )
    g.add_argument("--ema-decay", type=float, help="teacher EMA decay (default 0.99)")
    g.add_argument(
        "--cutmix",
        action=argparse.BooleanOptionalAction,
        help="U2PL's CutMix of the unlabelled clips, one box per clip in all its frames (default off)",
    )
    g.add_argument(
        "--bank-size",
        type=int,
        help="memory-bank keys per class, 1 KiB each, in RAM on every rank and in every checkpoint "
        "(default 30000, U2PL's, for the r50/vitl presets: ~3.8 GB with VSPW's 124 classes; "
        "4096 for tiny)",
    )
    g = p.add_argument_group("run")
    g.add_argument("--out", type=Path, default=Path("runs/default"), help="output folder (default runs/default)")
    g.add_argument("--resume", help="'auto' (OUT/last.pt if it exists) or a checkpoint path")
    g.add_argument(
        "--eval-every", type=int, default=200, help="validate every N steps and at the end (default 200, 0: off)"
    )
    g.add_argument(
        "--save-every",
        type=int,
        default=200,
        help="save last.pt every N steps (default 200; 0: at evaluations and the end)",
    )
    g.add_argument("--stop-at", type=int, help="save and exit after this step (the LR schedule still spans --iters)")
    g.add_argument(
        "--time-budget",
        type=float,
        metavar="MIN",
        help="fit the schedule (steps and LR drops) to MIN CPU-minutes of setup and training (all threads "
        "of the process; validation not counted), from the step time of the first steps; "
        "replaces --iters",
    )
    g.add_argument("--log-every", type=int, default=10, help="log every N steps (default 10)")
    g.add_argument("--workers", type=int, default=2, help="data-loader processes per rank (default 2)")
    g.add_argument(
        "--print-config",
        action="store_true",
        help="print the run's resolved config as JSON and exit (nothing is trained or written)",
    )
    g.add_argument(
        "--device", default="auto", choices=["auto", "cpu", "cuda"], help="device (default auto: CUDA when available)"
    )
    return p


def check_args(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Reject values and combinations without a meaning (argparse error, exit 2)."""
    for name in ("accum", "log_every", "frames", "batch", "iters", "base_size", "bank_size"):
        value = getattr(args, name)
        if value is not None and value < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1, got {value}")
    if args.test_size is not None and args.test_size < 0:
        parser.error(f"--test-size must be >= 0, got {args.test_size}")
    if args.workers < 0:
        parser.error(f"--workers must be >= 0 (0 = in the main process), got {args.workers}")
    if args.time_budget is not None and not args.time_budget > 0:
        parser.error(f"--time-budget must be > 0 minutes, got {args.time_budget}")
    if args.time_budget is not None and args.iters is not None:
        parser.error("--time-budget fits the number of steps to the budget: leave out --iters")
    if args.lr_steps is not None and not all(0.0 < f <= 1.0 for f in args.lr_steps):
        parser.error(f"--lr-steps must be fractions of the schedule in (0, 1], got {args.lr_steps}")
    if args.extra_ratio is not None and not 0.0 <= args.extra_ratio <= 1.0:
        parser.error(f"--extra-ratio must be in [0, 1], got {args.extra_ratio}")
    if args.extra_ratio is not None and not args.extra:
        parser.error("--extra-ratio needs --extra")
    if args.extra and args.stage not in ("segmenter", "semi"):
        parser.error(f"--extra images need a per-frame stage (segmenter or semi), not {args.stage}")
    for spec in args.extra or []:
        if ":" not in spec or not all(spec.rpartition(":")[::2]):
            parser.error(f"--extra takes ROOT:MAPFILE, got {spec!r}")
    if args.stage == "semi" and args.mvc:
        parser.error("--mvc is not available with --stage semi")
    if args.stage == "semi" and args.pseudo is None and args.resume is None:
        parser.error("--stage semi needs --pseudo DIR (infer.py --save-probs output)")
    if args.ema_decay is not None and not 0.0 <= args.ema_decay < 1.0:
        parser.error(f"--ema-decay must be in [0, 1), got {args.ema_decay}")
    if args.drop_percent is not None and not 0.0 <= args.drop_percent <= 100.0:
        parser.error(f"--drop-percent must be in [0, 100], got {args.drop_percent}")
    if args.entropy_alpha is not None and not 0.0 <= args.entropy_alpha <= 50.0:
        parser.error(f"--entropy-alpha must be in [0, 50], got {args.entropy_alpha}")


def _set(section, **values) -> None:
    """Set the fields of a config section that were given (not None)."""
    for name, value in values.items():
        if value is not None:
            setattr(section, name, value)


def apply_args(cfg: Config, args: argparse.Namespace, num_classes: int) -> Config:
    """A copy of ``cfg`` with the settings given on the command line (flags left out keep the
    config's value): the stage, and every flag of the "model and data", "schedule and sizes",
    MVC and semi groups."""
    cfg = Config.from_dict(cfg.to_dict())
    cfg.model.num_classes = num_classes
    path = lambda p: None if p is None else str(p)  # noqa: E731
    _set(
        cfg.train,
        stage=args.stage,
        seed=args.seed,
        split=args.split,
        extra_ratio=args.extra_ratio,
        extra=tuple(args.extra) if args.extra else None,
    )
    _set(cfg.stage, frames=args.frames, lr_steps=args.lr_steps)
    _set(cfg.optim, batch=args.batch, iters=args.iters, lr=args.lr)
    if args.time_budget is not None and args.time_budget != cfg.optim.time_budget:
        cfg.optim.time_budget, cfg.optim.iters = args.time_budget, 0  # fitted after the first steps
    _set(
        cfg.data, crop_size=tuple(args.crop) if args.crop else None, base_size=args.base_size, test_size=args.test_size
    )
    _set(cfg.loss, num_points=args.points, ctvis=args.ctvis)
    _set(cfg.mvc, enabled=args.mvc, patch_size=args.mvc_patch, ratio=args.mvc_ratio, weight=args.mvc_weight)
    _set(
        cfg.semi,
        pseudo=path(args.pseudo),
        unlabeled_split=args.unlabeled_split,
        unlabeled_data=path(args.unlabeled_data),
        unsup_weight=args.unsup_weight,
        contrastive_weight=args.contrastive_weight,
        drop_percent=args.drop_percent,
        entropy_alpha=args.entropy_alpha,
        ema_decay=args.ema_decay,
        bank_size=args.bank_size,
        cutmix=args.cutmix,
    )
    return cfg


def base_config(args: argparse.Namespace, num_classes: int, init: InitWeights | None) -> Config:
    """The config a new run starts from: --config, else --preset, else the --init checkpoint's
    config, else tiny; the embedded synthetic data brings its own sizes and schedule."""
    if args.config is not None:
        try:
            cfg = Config.from_dict(migrate_config(json.loads(args.config.read_text(encoding="utf-8"))))
        except (OSError, ValueError, TypeError) as e:
            raise ValueError(f"cannot read config {args.config}: {e}") from None
    elif args.preset is not None:
        cfg = get_preset(args.preset)
    elif init is not None and init.config is not None:
        try:
            cfg = Config.from_dict(init.config)
        except (ValueError, TypeError) as e:
            raise ValueError(f"--init {init.path}: unreadable config ({e})") from None
        if cfg.model.num_classes != num_classes:
            raise ValueError(
                f"--init {init.path} predicts {cfg.model.num_classes} classes but the data has {num_classes}"
            )
        # The model and recipe come from the checkpoint; what its run did (stage, seed, data, MVC, semi,
        # a time budget) does not carry over to the next stage.
        fresh = get_preset(cfg.name) if cfg.name in PRESETS else Config()
        cfg.train, cfg.mvc, cfg.semi, cfg.optim.time_budget = fresh.train, fresh.mvc, fresh.semi, None
        if STAGES[args.stage].trains not in init.modules:
            # The stage trains a module the checkpoint lacks, from its initialisation (a new
            # tracker or refiner): DVIS++ gives every stage its own schedule at the base LR
            # (configs/dvis_Plus/VSPW/*.yaml), so the schedule of the checkpoint's run (e.g. a
            # 5e-5 stage-1 fine-tune) must not carry over; fine-tunes (semi too) keep it.
            o = fresh.optim
            cfg.optim = dataclasses.replace(cfg.optim, lr=o.lr, iters=o.iters, lr_steps=o.lr_steps)
    else:
        cfg = get_preset("tiny")
    if args.data is None and args.config is None:  # the embedded data
        if not args.crop:
            cfg.data = dataclasses.replace(cfg.data, **TRAIN_SIZES)
        cfg.optim.iters = TRAIN_ITERS
    return cfg


def resolve_data(args: argparse.Namespace) -> Path:
    if args.data is not None:
        split_file = args.data / f"{args.split or 'train'}.txt"
        if not split_file.is_file():
            raise FileNotFoundError(f"{split_file} not found: --data must be a VSPW-layout root")
        return args.data
    if is_main():  # render the embedded dataset once, then let the other ranks see it
        ensure_default_dataset()
    barrier()
    return ensure_default_dataset()


def prepare_run(
    args: argparse.Namespace, dist: DistInfo
) -> tuple[Path, Config, dict | None, InitWeights | None, RunInfo]:
    """Data, the checkpoint to resume (or the --init weights), the run's config, the output folder.

    Returns:
        (data root, config, checkpoint being resumed or None, --init weights of a new run or None,
         run info).
    """
    root = resolve_data(args)
    class_names, palette = load_class_names(root)
    palette = palette if palette is not None else default_palette(len(class_names))
    num_classes = args.num_classes or len(class_names)
    resume = args.out / "last.pt" if args.resume == "auto" else args.resume and Path(args.resume)
    ckpt = init = None
    if is_main():
        for path in remove_stale_temporaries(args.out, ["last.pt", "best.pt"]):
            print0(f"removed {path}, left by a process killed while saving")
    if resume and (args.resume != "auto" or resume.exists()):
        ckpt = load_resume_checkpoint(resume, args.out / "best.pt")
        cfg = apply_args(checkpoint_config(ckpt), args, num_classes)
    else:
        init = read_init(args.init) if args.init is not None else None
        cfg = apply_args(base_config(args, num_classes, init), args, num_classes)
    if cfg.train.stage == "semi" and cfg.semi.pseudo is None:
        raise ValueError("--stage semi needs --pseudo DIR (infer.py --save-probs output)")
    global_batch = dist.world_size * args.accum * cfg.optim.batch
    if ckpt:
        check_resume(ckpt, resume, cfg, global_batch)
    return root, cfg, ckpt, init, RunInfo(class_names, palette.tolist(), global_batch)


class Training:
    """The live objects of a run: model, loss, optimiser, schedule, mixed precision."""

    def __init__(
        self,
        args: argparse.Namespace,
        cfg: Config,
        ckpt: dict | None,
        init: InitWeights | None,
        info: RunInfo,
        dist: DistInfo,
    ):
        self.stage, self.cfg, self.info, self.out, self.device = (
            STAGES[cfg.train.stage],
            cfg,
            info,
            args.out,
            dist.device,
        )
        torch.manual_seed(cfg.train.seed)  # the same initial weights on every rank
        model_stage = self.stage.model_stage(ckpt["stage"] if ckpt else init and init.stage)
        self.model, self.criterion = self.stage.build(cfg, model_stage)
        if ckpt is None:
            print0(load_init_weights(video_core(self.model), self.stage, init, args.backbone_weights))
            if hasattr(self.criterion, "teacher"):
                self.criterion.teacher.copy_from(self.model)  # U2PL: the teacher starts as the student
        self.model.to(dist.device)
        self.criterion.to(dist.device)
        self.optimizer = build_optimizer(self.model, cfg.optim)
        self.scheduler = build_scheduler(self.optimizer, cfg.optim, steps=cfg.stage.lr_steps)
        self.amp = args.amp or ("fp16" if dist.device.type == "cuda" else "off")
        self.autocast_ctx, self.scaler = make_autocast(dist.device, self.amp)
        self.start, self.best_miou = 0, None
        self.clock = BudgetClock(60 * ckpt.get("cpu_minutes", 0.0) if ckpt else 0.0)
        if ckpt is not None:
            self.start, self.best_miou = restore_training(
                ckpt, rank=dist.rank, world_size=dist.world_size, **self.states()
            )
            print0(f"resumed at step {self.start}")
        self.ddp = self.model
        if dist.enabled:
            self.ddp = nn.parallel.DistributedDataParallel(
                self.model, device_ids=[dist.device.index] if dist.device.type == "cuda" else None
            )

    def states(self) -> dict:
        return {
            "model": self.model,
            "criterion": self.criterion,
            "optimizer": self.optimizer,
            "scheduler": self.scheduler,
            "scaler": self.scaler,
        }

    def save(self, name: str, step: int) -> None:
        """OUT/name (collective; rank 0 writes)."""
        save_training(
            self.out / name,
            cfg=self.cfg,
            step=step,
            best_miou=self.best_miou,
            info=self.info,
            cpu_minutes=self.clock.seconds() / 60,
            **self.states(),
        )

    def micro_batch_loss(self, model: nn.Module, micro: tuple[int, dict], step: int) -> dict[str, torch.Tensor]:
        """``train_step``'s loss_fn: the stage's loss terms of one (seed, batch) micro-batch."""
        seed, batch = micro
        torch.manual_seed(seed)  # point sampling, MVC masks, contrastive sampling of this micro-batch
        return self.stage.loss(model, self.criterion, _to_device(batch, self.device), step, self.cfg)

    def validate(self, step: int, videos: list, device: torch.device) -> float:
        """Val metrics on every rank (with rank 0's BatchNorm statistics), logged; returns the mIoU."""
        broadcast_buffers(self.model)
        metrics = evaluate_video_model(
            video_core(self.model),
            videos,
            self.cfg.data,
            self.cfg.model.num_classes,
            amp=self.amp,
            device=device,
            class_names=self.info.class_names,
            progress=is_main(),
        )
        self.model.train()  # predict_video restores the core's mode, not the stage's
        log(self.out, {"step": step, "val": {k: v for k, v in metrics.items() if isinstance(v, (int, float))}})
        print0(f"step {step}: val mIoU {metrics['mIoU']:.4f} VC8 {metrics['VC8']:.4f} VC16 {metrics['VC16']:.4f}")
        return metrics["mIoU"]


def _to_device(batch: dict, device: torch.device) -> dict:
    """Frames of a batch (or of each sub-batch) on the device; the rest moves where used."""
    if "frames" in batch:
        return {**batch, "frames": batch["frames"].to(device, non_blocking=True)}
    return {k: _to_device(v, device) for k, v in batch.items()}


def log(out: Path, record: dict) -> None:
    if is_main():
        log_json(out / "log.jsonl", record)


def log_train_step(
    tr: Training, step: int, out: dict, clips_per_s: float, world_size: int, device: torch.device
) -> float:
    """Log the losses averaged over ranks (collective), LR, grad norm, speed, memory, CPU time;
    returns the mean loss."""
    keys = [k for k in out if k not in ("skipped", "grad_norm", "lr")]
    mean = (all_reduce_sum(torch.tensor([out[k] for k in keys])) / world_size).tolist()
    extra = {"bank_keys": bank_fill(tr.criterion)} if tr.stage.name == "semi" else {}
    log(
        tr.out,
        {
            "step": step,
            **dict(zip(keys, mean)),
            "lr": out["lr"],
            "grad_norm": out["grad_norm"],
            "skipped": out["skipped"],
            "clips_per_s": clips_per_s,
            "mem_mb": memory_mb(device),
            "cpu_min": time.process_time() / 60,
            **extra,
        },
    )
    return mean[keys.index("loss")]


def fit_schedule(tr: Training, step: int, probe: tuple[int, float], clock: BudgetClock, bar: tqdm) -> None:
    """Fit the schedule to --time-budget from the step time measured since ``probe`` (step, CPU s),
    on rank 0 for every rank; the LR milestones follow (``build_scheduler`` reads them each step)."""
    cfg = tr.cfg
    per_step = (clock.seconds() - probe[1]) / (step - probe[0])
    cfg.optim.iters = broadcast_object(fit_iters(step, clock.seconds(), per_step, cfg.optim.time_budget * 60))
    schedule = {
        "iters": cfg.optim.iters,
        "milestones": lr_milestones(cfg.optim, cfg.stage.lr_steps),
        "budget_cpu_min": cfg.optim.time_budget,
        "cpu_s_per_step": per_step,
    }
    log(tr.out, {"step": step, "schedule": schedule})
    if is_main():
        (tr.out / "config.json").write_text(cfg.to_json(), encoding="utf-8")
    bar.total = cfg.optim.iters
    print0(
        f"schedule fitted to {cfg.optim.time_budget} CPU-minutes: {cfg.optim.iters} steps "
        f"({per_step:.2f} CPU-s each), LR drops at {schedule['milestones']}"
    )


def train(args: argparse.Namespace, dist: DistInfo, stop: StopRequest) -> int:
    # 1. data, config, output folder; 2. model, optimiser, schedule, mixed precision
    root, cfg, ckpt, init, info = prepare_run(args, dist)
    if args.print_config:
        print0(cfg.to_json())
        return 0
    args.out.mkdir(parents=True, exist_ok=True)
    if is_main():
        (args.out / "config.json").write_text(cfg.to_json(), encoding="utf-8")
    tr = Training(args, cfg, ckpt, init, info, dist)
    if is_main() and ckpt is not None:
        continue_log(args.out / "log.jsonl", tr.start)
    device = dist.device
    batches = iter(
        build_loader(
            root,
            cfg,
            rank=dist.rank,
            world_size=dist.world_size,
            accum=args.accum,
            start_step=tr.start,
            workers=args.workers,
            pin_memory=device.type == "cuda",
        )
    )
    videos = list(iter_eval_videos(root, args.val_split)) if args.eval_every > 0 else []
    trainable = sum(p.numel() for p in tr.model.parameters() if p.requires_grad) / 1e6
    print0(
        f"stage {cfg.train.stage} ({video_core(tr.model).stage} model), {cfg.name}: {trainable:.2f}M trainable "
        f"params; {dist.world_size} rank(s) x {args.accum} x {cfg.optim.batch} clips"
        f"{' (+ as many pseudo-labelled)' if cfg.train.stage == 'semi' else ''} x {cfg.stage.frames} frames; "
        f"train {cfg.data.crop_size} from short side {cfg.data.base_size}, eval at {cfg.data.test_size}; "
        f"amp {tr.amp}; mvc {mvc_settings(cfg)}; {device}"
    )

    # 3. the loop: step, log, (fit the schedule to the time budget), evaluate, stop on a signal, save
    tr.model.train()
    clock = tr.clock
    bar = tqdm(total=cfg.optim.iters or None, initial=tr.start, disable=not is_main(), desc=cfg.train.stage)
    tick, last_log, step, probe = time.time(), tr.start, tr.start, None
    while step < min(cfg.optim.iters or math.inf, args.stop_at or math.inf):
        step += 1
        micro = [
            (step_seed(cfg.train.seed, step, dist.rank * args.accum + a), next(batches)) for a in range(args.accum)
        ]
        out = train_step(
            tr.ddp,
            micro,
            partial(tr.micro_batch_loss, step=step),
            tr.optimizer,
            tr.scaler,
            tr.scheduler,
            cfg.optim.clip_grad,
            tr.autocast_ctx,
        )
        if cfg.train.stage == "semi":  # U2PL: EMA after the optimiser step, k = 0-based semi iteration
            tr.criterion.teacher.update(tr.model, step - 1, cfg.semi.ema_decay)
        bar.update(1)
        if cfg.optim.iters == 0:  # --time-budget: time FIT_STEPS steps after this process's first, then fit
            if probe is None:
                probe = (step, clock.seconds())
            elif step - probe[0] >= FIT_STEPS:
                fit_schedule(tr, step, probe, clock, bar)
        end = step == cfg.optim.iters or step == args.stop_at
        if step % args.log_every == 0 or end:
            rate = info.global_batch * (step - last_log) / (time.time() - tick)
            bar.set_postfix(loss=f"{log_train_step(tr, step, out, rate, dist.world_size, device):.3f}")
            tick, last_log = time.time(), step
        evaluate = args.eval_every > 0 and (step % args.eval_every == 0 or step == cfg.optim.iters)
        if evaluate:
            with clock.excluded():
                miou = tr.validate(step, videos, device)
            if tr.best_miou is None or miou > tr.best_miou:
                tr.best_miou = miou
                tr.save("best.pt", step)
        if stop.agreed():
            tr.save("last.pt", step)
            print0(f"stopped by a signal at step {step}; saved {args.out / 'last.pt'}; continue with --resume auto")
            return 128 + (stop.signum or signal.SIGTERM)
        if evaluate or end or (args.save_every > 0 and step % args.save_every == 0):
            tr.save("last.pt", step)
    bar.close()
    log(args.out, {"step": step, "done": True, "cpu_min": clock.seconds() / 60})
    print0(
        f"done at step {step} ({clock.seconds() / 60:.1f} CPU-minutes of setup and training"
        + (f", budget {cfg.optim.time_budget}" if cfg.optim.time_budget else "")
        + f"); checkpoint {args.out / 'last.pt'}"
    )
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = get_args_parser()
    args = parser.parse_args(argv)
    check_args(parser, args)
    dist = init_distributed(args.device)
    try:
        with StopRequest() as stop:
            return train(args, dist, stop)
    except NonFiniteLossError as e:
        print(
            f"[rank {dist.rank}] stopping: {e}. {args.out / 'last.pt'} holds the last good state; lower --lr "
            "or use --amp off/bf16, then --resume auto",
            file=sys.stderr,
        )
        return 1
    except (FileNotFoundError, ValueError) as e:  # bad input: a message, not a traceback
        where = traceback.extract_tb(e.__traceback__)[-1]
        print(f"[rank {dist.rank}] error: {e}\n  (raised at {where.filename}:{where.lineno})", file=sys.stderr)
        return 2
    finally:
        cleanup()


if __name__ == "__main__":
    sys.exit(main())
