"""Train the vss models, on one CPU or under torchrun (DDP), optionally with Masked Video
Consistency.

    python train.py                                       # tiny preset, embedded synthetic data
    torchrun --nproc_per_node 8 train.py --preset r50 --data VSPW_480p \
        --backbone-weights resnet50.pth --init m2f_coco.pt --mvc

Stages (DVIS++ training chain, `reference/dvis_plus.md` section 5), each a `vss.video_model.
VideoModel` whose checkpoint feeds the next stage through --init: `segmenter` (stage 1:
Mask2Former on the B*T frames of the clips, per-frame targets, MinVIS-style: no reid loss).
The tracker / refiner / semi-supervised stages plug into `STAGES` (build, loss).

Reproducibility and resume:
- The clip at global position g (g = step * global_batch + slot) is a pure function of
  (seed, g): video = permutation(seed, epoch)[g mod #videos], augmentation rng = (seed, g).
  Micro-batch k of a step (rank r, accumulation a: k = r * accum + a) takes the slots
  [k * batch, (k+1) * batch) and seeds torch's RNG (point sampling, MVC masks) from
  (seed, step, k). So the data and randomness do not depend on the number of ranks, data-loader
  workers or restarts: W ranks x A accumulation steps give the same update for any W * A, and a
  resumed run continues exactly. (This replaces torch's DistributedSampler, which can neither
  restart mid-epoch nor keep the global batch independent of the world size.)
- last.pt (every --save-every steps, after each evaluation, at the end, and on SIGTERM/SIGINT)
  holds the unwrapped model, optimizer, scheduler, scaler, step, config, stage, the RNG states
  of every rank, best_miou and the data position; best.pt is the state of the best val mIoU.
  `--resume auto` continues from OUT/last.pt (or starts fresh when there is none).
- A NaN/inf loss stops the run with exit code 1; last.pt is then the last good state.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import resource
import signal
import sys
import time
import traceback
from functools import partial
from itertools import count
from pathlib import Path
from typing import Callable, NamedTuple

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from vss.backbone import load_backbone_weights
from vss.checkpoint import load_checkpoint, rng_state, save_checkpoint, set_rng_state
from vss.config import PRESETS, Config, get_preset
from vss.criterion import SetCriterion
from vss.data import VSPWDataset, collate_clips, iter_eval_videos, load_class_names
from vss.distributed import (DistInfo, all_gather_object, all_reduce_sum, barrier,
                             broadcast_buffers, cleanup, init_distributed, is_main, print0)
from vss.engine import (NonFiniteLossError, build_optimizer, build_scheduler, evaluate_model,
                        make_autocast, train_step)
from vss.matcher import HungarianMatcher
from vss.mvc import scaled_patch_size
from vss.synthetic import ensure_default_dataset
from vss.video_model import STAGES as VIDEO_STAGES
from vss.video_model import (VideoModel, build_video_model, load_previous_stage, predict_video,
                             video_loss)

MVC_BASE_PATCH, MVC_BASE_SIZE = 64, 480  # b = 64 at the VSPW 480p scale (MIC's value)


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    g = p.add_argument_group("model and data")
    g.add_argument("--preset", default="tiny", choices=sorted(PRESETS),
                   help="config preset (default tiny)")
    g.add_argument("--config", type=Path,
                   help="a config JSON (e.g. a run's config.json); replaces --preset")
    g.add_argument("--data", type=Path,
                   help="VSPW-layout root (default: the embedded synthetic data)")
    g.add_argument("--split", default="train", help="training split (default train)")
    g.add_argument("--val-split", default="val", help="validation split (default val)")
    g.add_argument("--num-classes", type=int,
                   help="K (default: the dataset's classes.json, else VSPW's 124)")
    g.add_argument("--stage", default="segmenter", choices=sorted(STAGES),
                   help="training stage (default segmenter)")
    g.add_argument("--backbone-weights", type=Path, help="torchvision ResNet / DINOv2 state dict")
    g.add_argument("--init", type=Path,
                   help="weights to start from: a vss checkpoint (this or an earlier stage) or a "
                        "segmenter state dict")
    g = p.add_argument_group("schedule (overrides the config)")
    g.add_argument("--frames", type=int, help="frames per clip T")
    g.add_argument("--batch", type=int, help="clips per rank and micro-batch")
    g.add_argument("--accum", type=int, default=1,
                   help="micro-batches per step (default 1); global batch = ranks x accum x batch")
    g.add_argument("--iters", type=int, help="training steps")
    g.add_argument("--lr", type=float, help="base learning rate")
    g.add_argument("--crop", type=int, nargs=2, metavar=("H", "W"), help="training crop")
    g.add_argument("--points", type=int, help="points per mask (matching and mask losses)")
    g.add_argument("--amp", choices=["fp16", "bf16", "off"],
                   help="mixed precision (default fp16 on CUDA, off on CPU)")
    g.add_argument("--seed", type=int, default=0,
                   help="seed of the initialisation, data order and sampling (default 0)")
    g = p.add_argument_group("masked video consistency (MVC paper section 2.2)")
    g.add_argument("--mvc", action="store_true", help="add the loss on patch-masked frames")
    g.add_argument("--mvc-patch", type=int,
                   help=f"patch size b (default {MVC_BASE_PATCH} x base_size / {MVC_BASE_SIZE})")
    g.add_argument("--mvc-ratio", type=float, default=0.7,
                   help="mask ratio r, the fraction of hidden patches (default 0.7)")
    g.add_argument("--mvc-weight", type=float, default=1.0,
                   help="weight lambda of the masked-frames loss (default 1)")
    g = p.add_argument_group("run")
    g.add_argument("--out", type=Path, default=Path("runs/default"),
                   help="output folder (default runs/default)")
    g.add_argument("--resume", help="'auto' (OUT/last.pt if it exists) or a checkpoint path")
    g.add_argument("--eval-every", type=int, default=200,
                   help="validate every N steps and at the end (default 200, 0: off)")
    g.add_argument("--save-every", type=int, default=200,
                   help="save last.pt every N steps (default 200; 0: at evaluations and the end)")
    g.add_argument("--stop-at", type=int,
                   help="save and exit after this step (the LR schedule still spans --iters)")
    g.add_argument("--log-every", type=int, default=10, help="log every N steps (default 10)")
    g.add_argument("--workers", type=int, default=2,
                   help="data-loader processes per rank (default 2)")
    g.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"],
                   help="device (default auto: CUDA when available)")
    return p


# --------------------------------------------------------------------------------------------
# Stages: the model of a stage (vss.video_model.VideoModel) and its loss on a micro-batch
# --------------------------------------------------------------------------------------------


def build_segmenter_stage(cfg: Config) -> tuple[nn.Module, nn.Module]:
    """Stage-1 VideoModel and its set criterion."""
    model = build_video_model(cfg, "segmenter")
    # Stage 1 is MinVIS-style (no contrastive reid loss): the reid head gets no gradient. Freeze
    # it so DDP needs no unused-parameter search and weight decay does not shrink it.
    model.segmenter.transformer_decoder.reid_embed.requires_grad_(False)
    matcher = HungarianMatcher.from_config(cfg.loss)
    criterion = SetCriterion(cfg.model.num_classes, matcher, cfg.loss)
    return model, criterion


def segmenter_stage_loss(model: nn.Module, criterion: nn.Module, batch: dict, step: int,
                         cfg: Config, mvc: dict | None) -> dict[str, torch.Tensor]:
    """Segmenter on the B*T frames with per-frame targets (+ the MVC term on masked frames)."""
    return video_loss(model, batch, criterion, mvc=mvc)


class Stage(NamedTuple):
    build: Callable  # (cfg) -> (VideoModel, criterion)
    loss: Callable  # (model, criterion, batch on the device, step, cfg, mvc kwargs) -> loss terms


STAGES = {"segmenter": Stage(build_segmenter_stage, segmenter_stage_loss)}


# --------------------------------------------------------------------------------------------
# Config, data, weights
# --------------------------------------------------------------------------------------------


def build_config(args: argparse.Namespace, num_classes: int) -> Config:
    """Preset (or --config JSON) with the command-line overrides applied."""
    if args.config is not None:
        try:
            cfg = Config.from_dict(json.loads(args.config.read_text(encoding="utf-8")))
        except (OSError, ValueError, TypeError) as e:
            raise ValueError(f"cannot read config {args.config}: {e}") from None
    else:
        cfg = get_preset(args.preset)
    cfg.model.num_classes = num_classes
    overrides = {"frames": args.frames, "batch": args.batch, "iters": args.iters, "lr": args.lr}
    overrides = {k: v for k, v in overrides.items() if v is not None}
    cfg.optim = dataclasses.replace(cfg.optim, **overrides)
    if args.crop:
        cfg.data = dataclasses.replace(cfg.data, crop_size=tuple(args.crop))
    if args.points:
        cfg.loss = dataclasses.replace(cfg.loss, num_points=args.points)
    return cfg


def resolve_data(args: argparse.Namespace) -> Path:
    if args.data is not None:
        split_file = args.data / f"{args.split}.txt"
        if not split_file.is_file():
            raise FileNotFoundError(f"{split_file} not found: --data must be a VSPW-layout root")
        return args.data
    if is_main():  # render the embedded dataset once, then let the other ranks see it
        ensure_default_dataset()
    barrier()
    return ensure_default_dataset()


class PositionedClips(torch.utils.data.Dataset):
    """Clip at global position g, a pure function of (seed, g) (see the module docstring)."""

    def __init__(self, dataset: VSPWDataset, seed: int):
        self.dataset, self.seed = dataset, seed

    def __getitem__(self, g: int) -> dict:
        n = len(self.dataset.videos)
        epoch, offset = divmod(g, n)
        video = int(np.random.default_rng([self.seed, epoch]).permutation(n)[offset])
        return self.dataset.load_clip(video, np.random.default_rng([self.seed, g, 1]))


class RankPositions(torch.utils.data.Sampler):
    """Global positions of one rank, step after step from `start_step` (infinite)."""

    def __init__(self, start_step: int, global_batch: int, first: int, count_per_step: int):
        self.start_step, self.global_batch = start_step, global_batch
        self.first, self.count_per_step = first, count_per_step

    def __iter__(self):
        for step in count(self.start_step):
            base = step * self.global_batch + self.first
            yield from range(base, base + self.count_per_step)


def _ignore_stop_signals(worker_id: int) -> None:
    # A SIGTERM/SIGINT sent to the whole process group (SLURM, Ctrl-C) must not kill the data
    # workers while the main process finishes its step and saves; they exit with it.
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def build_loader(root: Path, args: argparse.Namespace, cfg: Config, dist: DistInfo,
                 start_step: int) -> torch.utils.data.DataLoader:
    """This rank's micro-batches from `start_step` on (see RankPositions)."""
    dataset = VSPWDataset(root, args.split, num_frames=cfg.optim.frames, cfg=cfg.data,
                          num_classes=cfg.model.num_classes)
    per_rank = args.accum * cfg.optim.batch
    sampler = RankPositions(start_step, per_rank * dist.world_size, dist.rank * per_rank, per_rank)
    return torch.utils.data.DataLoader(
        PositionedClips(dataset, args.seed), batch_size=cfg.optim.batch, sampler=sampler,
        num_workers=args.workers, pin_memory=dist.device.type == "cuda",
        worker_init_fn=_ignore_stop_signals,
        collate_fn=partial(collate_clips, size_divisibility=cfg.data.size_divisibility))


def step_seed(seed: int, step: int, micro: int) -> int:
    return int(np.random.SeedSequence([seed, step, micro]).generate_state(1)[0])


def load_init_weights(model: VideoModel, args: argparse.Namespace) -> None:
    """--backbone-weights into the segmenter's backbone; --init (a vss checkpoint of this or an
    earlier stage, or a bare segmenter state dict) into the matching modules."""
    if args.backbone_weights is not None:
        load_backbone_weights(model.segmenter.backbone, args.backbone_weights)
    if args.init is not None:
        state = load_checkpoint(args.init)
        state = state.get("model", state)
        if all(k.split(".", 1)[0] in VIDEO_STAGES for k in state):
            kept = load_previous_stage(model, state, source=str(args.init))
            print0(f"--init {args.init}: loaded; {kept or 'no module'} left at initialisation")
            return
        missing, unexpected = model.segmenter.load_state_dict(state, strict=False)
        if missing or unexpected:
            raise ValueError(f"--init {args.init} matches neither the {args.stage} model nor a "
                             "segmenter: "
                             f"missing {missing[:5]}, unexpected {unexpected[:5]}")


# --------------------------------------------------------------------------------------------
# Checkpoints, logging, signals
# --------------------------------------------------------------------------------------------


def plain_args(args: argparse.Namespace) -> dict:
    return {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}


def checkpoint_state(model, optimizer, scheduler, scaler, cfg, args, step, best_miou,
                     global_batch) -> dict:
    """The full training state (collective: gathers every rank's RNG states)."""
    return {
        "model": model.state_dict(), "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(), "scaler": scaler.state_dict() if scaler else None,
        "step": step, "config": cfg.to_dict(), "stage": args.stage,
        "rng": all_gather_object(rng_state()),
        "best_miou": best_miou, "args": plain_args(args),
        "data": {"seed": args.seed, "global_batch": global_batch, "samples": step * global_batch},
    }


def check_resume(ckpt: dict, path: Path, args: argparse.Namespace, global_batch: int) -> None:
    """A resumed run must define the same data and loss, else it would not continue exactly."""
    if ckpt.get("stage") != args.stage:
        raise ValueError(f"{path} is a {ckpt.get('stage')!r} checkpoint, not {args.stage!r}; "
                         "start the next stage with --init")
    old = ckpt.get("args", {})
    keys = ("seed", "mvc", "mvc_patch", "mvc_ratio", "mvc_weight")
    differ = [k for k in keys if old.get(k) != getattr(args, k)]
    if ckpt["data"]["global_batch"] != global_batch:
        differ.append(f"global batch {ckpt['data']['global_batch']} -> {global_batch}")
    if differ:
        raise ValueError(f"resuming {path} with different settings "
                         f"({', '.join(map(str, differ))}); "
                         "pass the flags of the original run, or start a new run with --init")


def restore_state(ckpt: dict | None, model, optimizer, scheduler, scaler, dist: DistInfo
                  ) -> tuple[int, float | None]:
    """Load a resumed run's states; returns (step, best_miou), (0, None) for a new run."""
    if ckpt is None:
        return 0, None
    model.load_state_dict(ckpt["model"])
    optimizer.load_state_dict(ckpt["optimizer"])
    scheduler.load_state_dict(ckpt["scheduler"])
    if scaler is not None and ckpt["scaler"]:
        scaler.load_state_dict(ckpt["scaler"])
    if len(ckpt["rng"]) == dist.world_size:
        set_rng_state(ckpt["rng"][dist.rank])
    print0(f"resumed at step {ckpt['step']}")
    return ckpt["step"], ckpt["best_miou"]


def mvc_settings(args: argparse.Namespace, cfg: Config) -> dict | None:
    """Keyword arguments of vss.mvc.mvc_loss, or None without --mvc."""
    if not args.mvc:
        return None
    patch = args.mvc_patch or scaled_patch_size(MVC_BASE_PATCH, MVC_BASE_SIZE, cfg.data.base_size)
    return {"patch_size": patch, "ratio": args.mvc_ratio, "weight": args.mvc_weight}


def log_train_step(out_dir: Path, step: int, out: dict, clips_per_s: float, world_size: int,
                   device: torch.device) -> float:
    """Log the losses averaged over ranks (collective), LR, grad norm, speed, memory; returns
    the mean loss."""
    keys = [k for k in out if k not in ("skipped", "grad_norm", "lr")]
    mean = (all_reduce_sum(torch.tensor([out[k] for k in keys])) / world_size).tolist()
    log_json(out_dir, {"step": step, **dict(zip(keys, mean)), "lr": out["lr"],
                       "grad_norm": out["grad_norm"], "skipped": out["skipped"],
                       "clips_per_s": clips_per_s, "mem_mb": memory_mb(device)})
    return mean[keys.index("loss")]


def _json_safe(x):
    if isinstance(x, float) and not math.isfinite(x):
        return None  # strict JSON has no NaN/inf (e.g. VC16 of videos shorter than 17 frames)
    return {k: _json_safe(v) for k, v in x.items()} if isinstance(x, dict) else x


def log_json(out: Path, record: dict) -> None:
    """Append one JSON line to OUT/log.jsonl (rank 0)."""
    if is_main():
        with open(out / "log.jsonl", "a", encoding="utf-8") as f:
            f.write(json.dumps(_json_safe(record)) + "\n")


def memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


class StopRequest:
    """While active, SIGTERM/SIGINT set a flag; the loop saves and exits at the end of the step.
    A second signal exits at once (the previous checkpoint is intact: writes are atomic)."""

    def __enter__(self) -> "StopRequest":
        self.signum: int | None = None
        self._previous = {sig: signal.signal(sig, self._handle)
                          for sig in (signal.SIGTERM, signal.SIGINT)}
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)

    def _handle(self, signum, frame) -> None:
        if self.signum is not None:
            raise SystemExit(128 + signum)
        self.signum = signum

    def agreed(self) -> bool:
        """True on every rank as soon as any rank got a signal (so all stop at the same step)."""
        return float(all_reduce_sum(torch.tensor([float(self.signum is not None)]))) > 0


def run_eval(model: VideoModel, videos: list, cfg: Config, class_names: list[str], amp: str,
             device: torch.device) -> dict:
    """Official metrics on the val videos; every rank predicts its share with the unwrapped
    model (never through the DDP wrapper)."""
    dtype = {"fp16": torch.float16, "bf16": torch.bfloat16, "off": None}[amp]

    def predict(frames: torch.Tensor, out_size: tuple[int, int]) -> torch.Tensor:
        return predict_video(model, frames, out_size, autocast_dtype=dtype)["labels"]

    return evaluate_model(predict, videos, cfg.data, cfg.model.num_classes, device=device,
                          class_names=class_names, progress=is_main())


# --------------------------------------------------------------------------------------------
# Main
# --------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    parser = get_args_parser()
    args = parser.parse_args(argv)
    for name in ("accum", "log_every", "frames", "batch", "iters"):
        value = getattr(args, name)
        if value is not None and value < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1, got {value}")
    dist = init_distributed(args.device)
    try:
        with StopRequest() as stop:
            return train(args, dist, stop)
    except NonFiniteLossError as e:
        print(f"[rank {dist.rank}] stopping: {e}. {args.out / 'last.pt'} holds the last good "
              "state; lower --lr or use --amp off/bf16, then --resume auto", file=sys.stderr)
        return 1
    except (FileNotFoundError, ValueError) as e:  # bad input: a message, not a traceback
        where = traceback.extract_tb(e.__traceback__)[-1]
        print(f"[rank {dist.rank}] error: {e}\n  (raised at {where.filename}:{where.lineno})",
              file=sys.stderr)
        return 2
    finally:
        cleanup()


def train(args: argparse.Namespace, dist: DistInfo, stop: StopRequest) -> int:
    # 1. data, config (a resumed run keeps its checkpoint's), output folder
    root = resolve_data(args)
    class_names = load_class_names(root)[0]
    resume = args.out / "last.pt" if args.resume == "auto" else args.resume and Path(args.resume)
    ckpt = None
    if resume and (args.resume != "auto" or resume.exists()):
        ckpt = load_checkpoint(resume)
    cfg = Config.from_dict(ckpt["config"]) if ckpt else build_config(
        args, args.num_classes or len(class_names))
    global_batch = dist.world_size * args.accum * cfg.optim.batch
    if ckpt:
        check_resume(ckpt, resume, args, global_batch)
    args.out.mkdir(parents=True, exist_ok=True)
    if is_main():
        (args.out / "config.json").write_text(cfg.to_json(), encoding="utf-8")

    # 2. model, optimiser, schedule, mixed precision (restored when resuming)
    stage, device = STAGES[args.stage], dist.device
    torch.manual_seed(args.seed)  # the same initial weights on every rank
    model, criterion = stage.build(cfg)
    if ckpt is None:
        load_init_weights(model, args)
    model.to(device)
    criterion.to(device)
    optimizer = build_optimizer(model, cfg.optim)
    scheduler = build_scheduler(optimizer, cfg.optim)
    amp = args.amp or ("fp16" if device.type == "cuda" else "off")
    autocast_ctx, scaler = make_autocast(device, amp)
    start, best_miou = restore_state(ckpt, model, optimizer, scheduler, scaler, dist)
    ddp = model
    if dist.enabled:
        ddp = nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None)
    batches = iter(build_loader(root, args, cfg, dist, start))
    videos = list(iter_eval_videos(root, args.val_split)) if args.eval_every > 0 else []
    mvc = mvc_settings(args, cfg)
    params = sum(p.numel() for p in model.parameters()) / 1e6
    print0(f"stage {args.stage}, {cfg.name}: {params:.2f}M params; "
           f"{dist.world_size} rank(s) x {args.accum} x {cfg.optim.batch} clips x "
           f"{cfg.optim.frames} frames; amp {amp}; mvc {mvc}; {device}")

    def loss_fn(model: nn.Module, micro: tuple[int, dict]) -> dict[str, torch.Tensor]:
        seed, batch = micro
        torch.manual_seed(seed)  # point sampling and MVC masks of this micro-batch
        batch = {**batch, "frames": batch["frames"].to(device, non_blocking=True)}
        return stage.loss(model, criterion, batch, step, cfg, mvc)

    def save(name: str, step: int) -> None:
        broadcast_buffers(model)
        state = checkpoint_state(model, optimizer, scheduler, scaler, cfg, args, step, best_miou,
                                 global_batch)
        if is_main():  # every rank took part in gathering the RNG states
            save_checkpoint(args.out / name, state)

    # 3. the loop: step, log, evaluate, stop on a signal, save
    model.train()
    end = min(cfg.optim.iters, args.stop_at or cfg.optim.iters)
    bar = tqdm(total=cfg.optim.iters, initial=start, disable=not is_main(), desc=args.stage)
    tick, last_log, step = time.time(), start, start
    for step in range(start + 1, end + 1):
        micro = [(step_seed(args.seed, step, dist.rank * args.accum + a), next(batches))
                 for a in range(args.accum)]
        out = train_step(ddp, micro, loss_fn, optimizer, scaler, scheduler, cfg.optim.clip_grad,
                         autocast_ctx)
        bar.update(1)
        if step % args.log_every == 0 or step == end:
            rate = global_batch * (step - last_log) / (time.time() - tick)
            loss = log_train_step(args.out, step, out, rate, dist.world_size, device)
            bar.set_postfix(loss=f"{loss:.3f}")
            tick, last_log = time.time(), step
        evaluate = args.eval_every > 0 and (step % args.eval_every == 0 or step == cfg.optim.iters)
        if evaluate:
            broadcast_buffers(model)  # every rank evaluates with rank 0's BatchNorm statistics
            metrics = run_eval(model, videos, cfg, class_names, amp, device)
            log_json(args.out, {"step": step, "val": {k: v for k, v in metrics.items()
                                                      if isinstance(v, (int, float))}})
            print0(f"step {step}: val mIoU {metrics['mIoU']:.4f} VC8 {metrics['VC8']:.4f} "
                   f"VC16 {metrics['VC16']:.4f}")
            if best_miou is None or metrics["mIoU"] > best_miou:
                best_miou = metrics["mIoU"]
                save("best.pt", step)
        if stop.agreed():
            save("last.pt", step)
            print0(f"stopped by a signal at step {step}; saved {args.out / 'last.pt'}; "
                   "continue with --resume auto")
            return 128 + (stop.signum or signal.SIGTERM)
        if evaluate or step == end or (args.save_every > 0 and step % args.save_every == 0):
            save("last.pt", step)
    bar.close()
    print0(f"done at step {step}; checkpoint {args.out / 'last.pt'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
