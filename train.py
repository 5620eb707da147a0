"""Train the vss models, on one CPU or under torchrun (DDP), optionally with Masked Video
Consistency, extra image datasets and the semi-supervised U2PL stage.

    python train.py                                       # tiny preset, embedded synthetic data
    python train.py --stage tracker --init runs/default/last.pt --out runs/tracker
    python train.py --stage refiner --init runs/tracker/last.pt --out runs/refiner
    torchrun --nproc_per_node 8 train.py --preset r50 --data VSPW_480p \
        --backbone-weights resnet50.pth --init m2f_coco.pt --mvc
    python train.py --stage semi --init student.pt --data VSPW_480p --unlabeled-split test \
        --pseudo pseudo/ --extra ADEChallengeData2016:ade150_to_vspw.json

Stages (DVIS++ training chain, `reference/dvis_plus.md` sections 3-5), each a `vss.video_model.
VideoModel` whose checkpoint feeds the next stage through --init:
- `segmenter` (stage 1): Mask2Former on the B*T frames of the clips, per-frame targets,
  MinVIS-style (no reid loss).
- `tracker` (stage 2, from a segmenter checkpoint): the segmenter frozen; 5-frame clips (DVIS++
  NUM 5); guided matching on the segmenter's outputs while the 0-based iteration is
  < iters // 2 (DVIS++ `iter < MAX_ITER // 2`), the tracker's own outputs after.
- `refiner` (stage 3, from a tracker checkpoint): segmenter and tracker frozen; 21-frame clips
  reversed in time with p = 0.5 (DVIS++ NUM 21, REVERSE_AGU), random crops as every stage here
  (`DataConfig.crop_size`); guided matching on the tracker's outputs in the first half.
  Default clip lengths are the paper's for the r50/vitl presets and scaled down for the CPU
  preset tiny (`CLIP_FRAMES`); --frames overrides them. With --mvc the frozen parts see the
  masked frames too (`vss.video_model.video_loss`).
- `semi` (PVUW 2024 1st place + U2PL, `vss/semi_stage.py`): fine-tunes the segmenter of a
  student checkpoint of any stage (its tracker/refiner stay frozen, so the checkpoint keeps its
  stage for inference: it stores `stage` = that stage and `semi: true`). Each micro-batch holds
  --batch labelled clips and --batch clips of --unlabeled-split (of --data, or
  --unlabeled-data) with the pseudo labels + entropies infer.py wrote to --pseudo; loss =
  set loss on ground truth + --unsup-weight x set loss on reliable pseudo labels +
  --contrastive-weight x U2PL contrastive loss (EMA teacher, memory bank gathered across ranks).
  The teacher, representation head and memory bank are saved with every checkpoint; the bank
  holds up to --bank-size keys of 1 KiB per class (default 4096 for tiny, U2PL's 30000 for
  r50/vitl, i.e. up to ~3.8 GB with VSPW's 124 classes: lower it there when RAM or disk is short).
--init loads a checkpoint's modules into the new stage's model, strictly per module, and the
frozen modules must all be present (a tracker needs a segmenter, a refiner a tracker checkpoint);
it prints what was loaded, what is frozen and what stays at initialisation. The base config is
--config, else --preset, else the --init checkpoint's config, else tiny.

Extra image datasets (--extra ROOT:MAPFILE, repeatable; segmenter and semi stages, whose losses
are per frame): `vss.label_remap.ImageFolderDataset`s (ROOT/images + ROOT/labels, or ADE20K's
images/training + annotations/training) mixed into the labelled stream. Mixing is by slot: by
default proportional to size (one epoch = a permutation of every video and every image, as a
concatenated dataset); with --extra-ratio R each slot is an image with probability R (sampled
with replacement). An image slot is a T-frame "clip" of T independently drawn and augmented
images (a 1-frame clip when T = 1), so batches keep one shape; per-frame losses make the frames'
independence harmless.

Embedded data (no --data): the synthetic 120x160 videos train at their own scale, base_size 120,
crop 128x160, test_size 120, and --iters 300 (unless --config, --crop, --base-size,
--test-size or --iters say otherwise), so `python train.py` takes a few minutes on 2 CPU cores.

Reproducibility and resume:
- The clip at global position g (g = step * global_batch + slot) is a pure function of
  (seed, g): video = permutation(seed, epoch)[g mod #videos], augmentation rng = (seed, g); the
  unlabelled clip of slot g likewise, from its own streams. Micro-batch k of a step (rank r,
  accumulation a: k = r * accum + a) takes the slots [k * batch, (k+1) * batch) and seeds
  torch's RNG (point sampling, MVC masks, contrastive sampling) from (seed, step, k). So the data
  and randomness do not depend on the number of ranks, data-loader workers or restarts: W ranks
  x A accumulation steps give the same update for any W * A (except the semi stage's
  percentiles and memory bank, which are per-rank batch statistics as in U2PL), and a resumed
  run continues exactly. (This replaces torch's DistributedSampler, which can neither restart
  mid-epoch nor keep the global batch independent of the world size.)
- last.pt (every --save-every steps, after each evaluation, at the end, at the --time-budget and
  on SIGTERM/SIGINT) holds the unwrapped model, optimizer, scheduler, scaler, step, config,
  stage, the RNG states of every rank, best_miou, the data position, the dataset's class_names
  and palette, the refiner's class memory of every rank and the semi stage's teacher,
  representation head and memory bank; best.pt is the state of the best val mIoU.
  `--resume auto` continues from OUT/last.pt (or starts fresh when there is none).
- --time-budget MIN stops (evaluates when --eval-every > 0, saves) once the process has used MIN
  minutes of CPU time (time.process_time(): all threads of this process, setup included, data
  workers excluded; every rank stops at the same step), so benchmarks on a shared machine
  compare equal work; the LR schedule still spans --iters.
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
from vss.data import collate_clips, VSPWDataset
from vss.io import default_palette, IGNORE, iter_eval_videos, load_class_names
from vss.distributed import (DistInfo, all_gather_object, all_reduce_sum, barrier,
                             broadcast_buffers, cleanup, get_rank, init_distributed, is_main,
                             print0)
from vss.engine import (NonFiniteLossError, build_optimizer, build_scheduler, evaluate_model,
                        make_autocast, train_step)
from vss.label_remap import ImageFolderDataset
from vss.matcher import HungarianMatcher
from vss.mvc import scaled_patch_size
from vss.semi_stage import (PseudoLabelClips, SemiLoss, SemiStudent, bank_fill, collate_pseudo,
                            progress)
from vss.synthetic import ensure_default_dataset
from vss.video_model import STAGES as VIDEO_STAGES
from vss.video_model import (VideoModel, build_video_model, load_previous_stage, predict_video,
                             video_loss)

MVC_BASE_PATCH, MVC_BASE_SIZE = 64, 480  # b = 64 at the VSPW 480p scale (MIC's value)
# Clip length T of the video stages: DVIS++ NUM 5 (online) and 21 (offline) for the paper
# presets; the CPU preset scales them down (21-frame clips cost ~4x a 5-frame one per step).
CLIP_FRAMES = {"tracker": {"paper": 5, "tiny": 5}, "refiner": {"paper": 21, "tiny": 9}}
REVERSE_PROB = {"refiner": 0.5}  # DVIS++ REVERSE_AGU: stage 3 reverses clips in time with p=0.5
# Embedded synthetic data (120x160 frames): train at their own scale, short enough for a laptop.
SYNTHETIC_SIZES = {"base_size": 120, "crop_size": (128, 160), "test_size": 120}
SYNTHETIC_ITERS = 300
# Memory-bank keys per class of the semi stage (256 float32 = 1 KiB each, held in host RAM on
# every rank and saved in every checkpoint once filled). The paper presets keep U2PL's 30000:
# ~3.8 GB with VSPW's 124 classes (see --bank-size). The CPU preset uses 4096: ~24 MB with the
# synthetic data's 6 classes (30000 made 118 of a 342 MB checkpoint there), about two steps of
# negatives at the ~2000 new keys per class and step of the default synthetic run.
BANK_SIZE = {"paper": 30000, "tiny": 4096}


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    g = p.add_argument_group("model and data")
    g.add_argument("--preset", choices=sorted(PRESETS),
                   help="config preset (default: the --init checkpoint's config, else tiny)")
    g.add_argument("--config", type=Path,
                   help="a config JSON (e.g. a run's config.json); replaces --preset")
    g.add_argument("--data", type=Path,
                   help="VSPW-layout root (default: the embedded synthetic data)")
    g.add_argument("--split", default="train", help="training split (default train)")
    g.add_argument("--val-split", default="val", help="validation split (default val)")
    g.add_argument("--num-classes", type=int,
                   help="K (default: the dataset's classes.json, else VSPW's 124)")
    g.add_argument("--stage", default="segmenter", choices=sorted(STAGES_ORDER),
                   help="training stage (default segmenter)")
    g.add_argument("--backbone-weights", type=Path, help="torchvision ResNet / DINOv2 state dict")
    g.add_argument("--init", type=Path,
                   help="weights to start from: a vss checkpoint (an earlier stage, this stage, "
                        "or any stage for --stage semi) or a segmenter state dict")
    g.add_argument("--extra", action="append", default=[], metavar="ROOT:MAPFILE",
                   help="an extra image dataset (label_remap layout) and its label map file, "
                        "mixed into the labelled stream (segmenter/semi stages; repeatable)")
    g.add_argument("--extra-ratio", type=float, metavar="R",
                   help="fraction of labelled slots taken from --extra images (default: "
                        "proportional to the numbers of videos and images)")
    g = p.add_argument_group("schedule and sizes (override the config)")
    g.add_argument("--frames", type=int,
                   help="frames per clip T (default: the preset's; tracker 5, refiner 21 "
                        "(tiny: 5, 9))")
    g.add_argument("--batch", type=int, help="clips per rank and micro-batch")
    g.add_argument("--accum", type=int, default=1,
                   help="micro-batches per step (default 1); global batch = ranks x accum x batch")
    g.add_argument("--iters", type=int, help="training steps (the LR schedule's length)")
    g.add_argument("--lr", type=float, help="base learning rate")
    g.add_argument("--crop", type=int, nargs=2, metavar=("H", "W"), help="training crop")
    g.add_argument("--base-size", type=int, help="training short side before the random scale")
    g.add_argument("--test-size", type=int, help="evaluation short side (0 = original size)")
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
    g = p.add_argument_group("semi-supervised stage (--stage semi; U2PL)")
    g.add_argument("--pseudo", type=Path, metavar="DIR",
                   help="pseudo labels + entropies of the unlabelled split (infer.py --ensemble "
                        "A B --tta --tta-merge mean --save-probs --out DIR)")
    g.add_argument("--unlabeled-split", default="test",
                   help="split of the unlabelled videos (default test)")
    g.add_argument("--unlabeled-data", type=Path, metavar="ROOT",
                   help="VSPW-layout root of the unlabelled videos (default: --data)")
    g.add_argument("--unsup-weight", type=float, default=1.0,
                   help="lambda_u of the pseudo-label set loss (default 1)")
    g.add_argument("--contrastive-weight", type=float, default=0.1,
                   help="lambda_c of the U2PL contrastive loss (default 0.1, the paper's)")
    g.add_argument("--drop-percent", type=float, default=80.0,
                   help="U2PL drop_percent: reliable percentile at the start, -> 100 (default 80)")
    g.add_argument("--entropy-alpha", type=float, default=20.0,
                   help="U2PL alpha_0: %% of lowest/highest-entropy pixels for anchors/negatives, "
                        "-> 0 (default 20)")
    g.add_argument("--ema-decay", type=float, default=0.99, help="teacher EMA decay (default 0.99)")
    g.add_argument("--bank-size", type=int,
                   help=f"memory-bank keys per class, 1 KiB each, in RAM on every rank and in "
                        f"every checkpoint (default {BANK_SIZE['paper']}, U2PL's, for the r50/vitl "
                        f"presets: ~3.8 GB with VSPW's 124 classes; {BANK_SIZE['tiny']} for tiny)")
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
    g.add_argument("--time-budget", type=float, metavar="MIN",
                   help="stop (evaluate, save) after MIN minutes of CPU time of this process "
                        "(time.process_time); the LR schedule still spans --iters")
    g.add_argument("--log-every", type=int, default=10, help="log every N steps (default 10)")
    g.add_argument("--workers", type=int, default=2,
                   help="data-loader processes per rank (default 2)")
    g.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"],
                   help="device (default auto: CUDA when available)")
    return p


def check_args(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Reject values and combinations without a meaning (argparse error, exit 2)."""
    for name in ("accum", "log_every", "frames", "batch", "iters", "base_size", "bank_size"):
        value = getattr(args, name)
        if value is not None and value < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1, got {value}")
    if args.test_size is not None and args.test_size < 0:
        parser.error(f"--test-size must be >= 0, got {args.test_size}")
    if args.time_budget is not None and not args.time_budget > 0:
        parser.error(f"--time-budget must be > 0 minutes, got {args.time_budget}")
    if args.extra_ratio is not None and not 0.0 <= args.extra_ratio <= 1.0:
        parser.error(f"--extra-ratio must be in [0, 1], got {args.extra_ratio}")
    if args.extra_ratio is not None and not args.extra:
        parser.error("--extra-ratio needs --extra")
    if args.extra and args.stage not in ("segmenter", "semi"):
        parser.error(f"--extra images need a per-frame stage (segmenter or semi), not {args.stage}")
    for spec in args.extra:
        if ":" not in spec or not all(spec.rpartition(":")[::2]):
            parser.error(f"--extra takes ROOT:MAPFILE, got {spec!r}")
    if args.stage == "semi":
        if args.pseudo is None:
            parser.error("--stage semi needs --pseudo DIR (infer.py --save-probs output)")
        if args.mvc:
            parser.error("--mvc is not available with --stage semi")
    if not 0.0 <= args.ema_decay < 1.0:
        parser.error(f"--ema-decay must be in [0, 1), got {args.ema_decay}")
    if not 0.0 <= args.drop_percent <= 100.0 or not 0.0 <= args.entropy_alpha <= 50.0:
        parser.error("--drop-percent must be in [0, 100] and --entropy-alpha in [0, 50]")


# --------------------------------------------------------------------------------------------
# Stages: the trainable module of a stage, its loss module, and its loss on a micro-batch
# --------------------------------------------------------------------------------------------


def set_criterion(cfg: Config) -> SetCriterion:
    return SetCriterion(cfg.model.num_classes, HungarianMatcher.from_config(cfg.loss), cfg.loss)


def build_segmenter_stage(cfg: Config, args: argparse.Namespace, model_stage: str
                          ) -> tuple[nn.Module, nn.Module]:
    """Stage-1 VideoModel and its set criterion."""
    model = build_video_model(cfg, "segmenter")
    # Stage 1 is MinVIS-style (no contrastive reid loss): the reid head gets no gradient. Freeze
    # it so DDP needs no unused-parameter search and weight decay does not shrink it.
    model.segmenter.transformer_decoder.reid_embed.requires_grad_(False)
    return model, set_criterion(cfg)


def segmenter_stage_loss(model: nn.Module, criterion: nn.Module, batch: dict, step: int,
                         cfg: Config, mvc: dict | None) -> dict[str, torch.Tensor]:
    """Segmenter on the B*T frames with per-frame targets (+ the MVC term on masked frames)."""
    return video_loss(model, batch, criterion, mvc=mvc)


def build_video_stage(cfg: Config, args: argparse.Namespace, model_stage: str
                      ) -> tuple[nn.Module, nn.Module]:
    """Stage-2/3 VideoModel (earlier stages frozen by VideoModel) and its set criterion."""
    return build_video_model(cfg, model_stage), set_criterion(cfg)


def video_stage_loss(model: nn.Module, criterion: nn.Module, batch: dict, step: int,
                     cfg: Config, mvc: dict | None) -> dict[str, torch.Tensor]:
    """Tracker/refiner losses; guided matching while the 0-based iteration < iters // 2."""
    return video_loss(model, batch, criterion, guided=step - 1 < cfg.optim.iters // 2, mvc=mvc)


def build_semi_stage(cfg: Config, args: argparse.Namespace, model_stage: str
                     ) -> tuple[nn.Module, nn.Module]:
    """SemiStudent (the student VideoModel of `model_stage` + representation head) and the U2PL
    loss (set criterion, EMA teacher, memory bank). Call `teacher.copy_from` after loading the
    student's weights."""
    student = SemiStudent(build_video_model(cfg, model_stage), cfg.model.mask_dim)
    loss = SemiLoss(set_criterion(cfg), student, cfg.model.num_classes,
                    unsup_weight=args.unsup_weight, contrastive_weight=args.contrastive_weight,
                    drop_base=args.drop_percent, alpha_base=args.entropy_alpha,
                    ema_max_decay=args.ema_decay, queue_size=bank_size(args.bank_size, cfg.name))
    return student, loss


def bank_size(flag: int | None, preset: str) -> int:
    """--bank-size, else the default of the config's preset (`BANK_SIZE`)."""
    return flag or BANK_SIZE["tiny" if preset == "tiny" else "paper"]


def semi_stage_loss(model: nn.Module, criterion: nn.Module, batch: dict, step: int,
                    cfg: Config, mvc: dict | None) -> dict[str, torch.Tensor]:
    """PVUW Eq. (3) on one labelled + one pseudo-labelled micro-batch."""
    return criterion(model, batch["labelled"], batch["unlabelled"], progress(step, cfg.optim.iters))


class Stage(NamedTuple):
    build: Callable  # (cfg, args, model stage) -> (trainable module, loss module)
    loss: Callable  # (model, criterion, batch on the device, step, cfg, mvc kwargs) -> loss terms


STAGES = {
    "segmenter": Stage(build_segmenter_stage, segmenter_stage_loss),
    "tracker": Stage(build_video_stage, video_stage_loss),
    "refiner": Stage(build_video_stage, video_stage_loss),
    "semi": Stage(build_semi_stage, semi_stage_loss),
}
STAGES_ORDER = ("segmenter", "tracker", "refiner", "semi")
TRAINS = {"segmenter": "segmenter", "tracker": "tracker", "refiner": "refiner", "semi": "segmenter"}
NEEDS = {"tracker": "a segmenter", "refiner": "a tracker", "semi": "a student (any stage)"}


def video_core(model: nn.Module) -> VideoModel:
    """The VideoModel inside a stage's trainable module (evaluated, saved as `model`)."""
    return model.model if isinstance(model, SemiStudent) else model


# --------------------------------------------------------------------------------------------
# Config, data, weights
# --------------------------------------------------------------------------------------------


def read_init(path: Path) -> dict:
    """--init file as {"state": VideoModel-style state dict, "stage", "config", "modules",
    "bare"}; a bare segmenter state dict gets the `segmenter.` prefix."""
    ckpt = load_checkpoint(path)
    state, config, stage = ckpt, None, None
    if isinstance(ckpt.get("model"), dict):
        state, config, stage = ckpt["model"], ckpt.get("config"), ckpt.get("stage")
    if not state or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError(f"--init {path} is neither a vss checkpoint nor a state dict")
    modules = {k.split(".", 1)[0] for k in state}
    bare = not modules <= set(VIDEO_STAGES)
    if bare:  # e.g. converted Mask2Former weights
        state, modules = {f"segmenter.{k}": v for k, v in state.items()}, {"segmenter"}
    if stage not in VIDEO_STAGES:
        stage = [s for s in VIDEO_STAGES if s in modules][-1]
    return {"path": path, "state": state, "stage": stage, "config": config, "modules": modules,
            "bare": bare}


def build_config(args: argparse.Namespace, num_classes: int, init: dict | None) -> Config:
    """--config, else --preset, else the --init checkpoint's config, else tiny; with the
    command-line overrides and the stage's clip defaults applied."""
    if args.config is not None:
        try:
            cfg = Config.from_dict(json.loads(args.config.read_text(encoding="utf-8")))
        except (OSError, ValueError, TypeError) as e:
            raise ValueError(f"cannot read config {args.config}: {e}") from None
    elif args.preset is not None:
        cfg = get_preset(args.preset)
    elif init is not None and init["config"] is not None:
        try:
            cfg = Config.from_dict(init["config"])
        except (ValueError, TypeError) as e:
            raise ValueError(f"--init {init['path']}: unreadable config ({e})") from None
        if cfg.model.num_classes != num_classes:
            raise ValueError(f"--init {init['path']} predicts {cfg.model.num_classes} classes but "
                             f"the data has {num_classes}")
    else:
        cfg = get_preset("tiny")
    cfg.model.num_classes = num_classes
    embedded = args.data is None and args.config is None
    if embedded and not args.crop:
        cfg.data = dataclasses.replace(cfg.data, **SYNTHETIC_SIZES)
    frames = args.frames
    if frames is None and args.stage in CLIP_FRAMES:
        frames = CLIP_FRAMES[args.stage]["tiny" if cfg.name == "tiny" else "paper"]
    elif frames is None and args.config is None and cfg.name in PRESETS:
        frames = get_preset(cfg.name).optim.frames  # e.g. a segmenter run after a tracker --init
    iters = args.iters or (SYNTHETIC_ITERS if embedded else None)
    overrides = {"frames": frames, "batch": args.batch, "iters": iters, "lr": args.lr}
    cfg.optim = dataclasses.replace(cfg.optim, **{k: v for k, v in overrides.items() if v is not None})
    data = {"crop_size": tuple(args.crop) if args.crop else None, "base_size": args.base_size,
            "test_size": args.test_size}
    cfg.data = dataclasses.replace(cfg.data, **{k: v for k, v in data.items() if v is not None})
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


def open_extra(spec: str, cfg: Config) -> ImageFolderDataset:
    """--extra ROOT:MAPFILE; ROOT/{images,labels} or ADE20K's images/training +
    annotations/training."""
    root, _, map_file = spec.rpartition(":")
    root = Path(root)
    dirs = {"image_dir": "images", "label_dir": "labels"}
    if not (root / "labels").is_dir() and (root / "annotations" / "training").is_dir():
        dirs = {"image_dir": "images/training", "label_dir": "annotations/training"}
    return ImageFolderDataset(root, map_file, num_classes=cfg.model.num_classes, cfg=cfg.data, **dirs)


def extra_clip(dataset: ImageFolderDataset, first: int, num_frames: int,
               rng: np.random.Generator) -> dict:
    """A T-frame "clip" of images: `first` and T-1 more drawn uniformly, each with its own
    augmentation (see the module docstring); padded to a common size."""
    idx = [first] + [int(i) for i in rng.integers(0, len(dataset.items), size=num_frames - 1)]
    items = [dataset.load_item(i, rng) for i in idx]
    height = max(it["frames"].shape[-2] for it in items)
    width = max(it["frames"].shape[-1] for it in items)
    frames = torch.zeros(num_frames, 3, height, width)  # (T,3,H,W)
    labels = torch.full((num_frames, height, width), IGNORE, dtype=torch.int64)  # (T,H,W)
    for t, it in enumerate(items):
        h, w = it["frames"].shape[-2:]
        frames[t, :, :h, :w] = it["frames"][0]
        labels[t, :h, :w] = it["labels"][0]
    return {"frames": frames, "labels": labels, "video": f"{dataset.root.name}/{items[0]['video']}",
            "frame_names": [it["video"] for it in items], "frame_idx": idx}


class PositionedClips(torch.utils.data.Dataset):
    """Item g: the labelled clip at global position g (a video clip or, with extra datasets, an
    image "clip"), and in the semi stage {"labelled": ..., "unlabelled": the pseudo-labelled
    clip at g}; a pure function of (seed, g) (see the module docstring)."""

    def __init__(self, dataset: VSPWDataset, seed: int, *, extras: list = (),
                 extra_ratio: float | None = None, unlabelled: PseudoLabelClips | None = None):
        self.dataset, self.seed = dataset, seed
        self.extras, self.extra_ratio, self.unlabelled = list(extras), extra_ratio, unlabelled

    def locate(self, g: int) -> tuple[int, int]:
        """(source, index) of slot g: source -1 = the video dataset, j = extras[j]."""
        n = len(self.dataset.videos)
        if not self.extras:
            epoch, offset = divmod(g, n)
            return -1, int(np.random.default_rng([self.seed, epoch]).permutation(n)[offset])
        sizes = [n] + [len(e.items) for e in self.extras]
        if self.extra_ratio is None:  # one epoch = every video and every image once
            total = sum(sizes)
            epoch, offset = divmod(g, total)
            k = int(np.random.default_rng([self.seed, epoch]).permutation(total)[offset])
            bounds = np.cumsum(sizes)
            j = int(np.searchsorted(bounds, k, side="right"))
            return j - 1, k - (int(bounds[j - 1]) if j else 0)
        pick = np.random.default_rng([self.seed, g, 2])
        if pick.random() >= self.extra_ratio:
            return -1, int(pick.integers(n))
        weights = np.asarray(sizes[1:], dtype=np.float64)
        j = int(pick.choice(len(self.extras), p=weights / weights.sum()))
        return j, int(pick.integers(sizes[j + 1]))

    def labelled(self, g: int) -> dict:
        rng = np.random.default_rng([self.seed, g, 1])
        source, index = self.locate(g)
        if source < 0:
            return self.dataset.load_clip(index, rng)
        return extra_clip(self.extras[source], index, self.dataset.num_frames, rng)

    def __getitem__(self, g: int) -> dict:
        clip = self.labelled(g)
        if self.unlabelled is None:
            return clip
        n = len(self.unlabelled)
        epoch, offset = divmod(g, n)
        video = int(np.random.default_rng([self.seed, 1, epoch]).permutation(n)[offset])
        pseudo = self.unlabelled.load_clip(video, np.random.default_rng([self.seed, g, 3]))
        return {"labelled": clip, "unlabelled": pseudo}


def collate_positioned(items: list[dict], size_divisibility: int) -> dict:
    if "labelled" not in items[0]:
        return collate_clips(items, size_divisibility)
    return {"labelled": collate_clips([it["labelled"] for it in items], size_divisibility),
            "unlabelled": collate_pseudo([it["unlabelled"] for it in items], size_divisibility)}


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


def build_dataset(root: Path, args: argparse.Namespace, cfg: Config) -> PositionedClips:
    """The positioned training items of the stage (videos, extra images, pseudo-labelled clips)."""
    dataset = VSPWDataset(root, args.split, num_frames=cfg.optim.frames, cfg=cfg.data,
                          num_classes=cfg.model.num_classes,
                          reverse_prob=REVERSE_PROB.get(args.stage, 0.0))
    extras = [open_extra(spec, cfg) for spec in args.extra]
    unlabelled = None
    if args.stage == "semi":
        unlabelled = PseudoLabelClips(args.unlabeled_data or root, args.unlabeled_split, args.pseudo,
                                      num_frames=cfg.optim.frames, cfg=cfg.data,
                                      num_classes=cfg.model.num_classes)
    return PositionedClips(dataset, args.seed, extras=extras, extra_ratio=args.extra_ratio,
                           unlabelled=unlabelled)


def build_loader(root: Path, args: argparse.Namespace, cfg: Config, dist: DistInfo,
                 start_step: int) -> torch.utils.data.DataLoader:
    """This rank's micro-batches from `start_step` on (see RankPositions)."""
    per_rank = args.accum * cfg.optim.batch
    sampler = RankPositions(start_step, per_rank * dist.world_size, dist.rank * per_rank, per_rank)
    return torch.utils.data.DataLoader(
        build_dataset(root, args, cfg), batch_size=cfg.optim.batch, sampler=sampler,
        num_workers=args.workers, pin_memory=dist.device.type == "cuda",
        worker_init_fn=_ignore_stop_signals,
        collate_fn=partial(collate_positioned, size_divisibility=cfg.data.size_divisibility))


def step_seed(seed: int, step: int, micro: int) -> int:
    return int(np.random.SeedSequence([seed, step, micro]).generate_state(1)[0])


def load_init_weights(core: VideoModel, args: argparse.Namespace, init: dict | None) -> None:
    """--backbone-weights into the segmenter's backbone; --init into the modules the model has
    (strict per module); the modules the stage keeps frozen must all come from --init."""
    if args.backbone_weights is not None:
        load_backbone_weights(core.segmenter.backbone, args.backbone_weights)
    if init is None:
        if args.stage != "segmenter":
            raise ValueError(f"--stage {args.stage} starts from a trained model: pass --init with "
                             f"{NEEDS[args.stage]} checkpoint")
        return
    path = init["path"]
    present = [n for n in VIDEO_STAGES if getattr(core, n) is not None]
    state = {k: v for k, v in init["state"].items() if k.split(".", 1)[0] in present}
    loaded = [n for n in present if n in init["modules"]]
    try:
        if not loaded:
            raise ValueError(f"it holds only {sorted(init['modules'])}")
        left = load_previous_stage(core, state, source=str(path))
    except (ValueError, RuntimeError) as e:
        detail = str(e).split("\n")[0][:400]
        if init["bare"]:
            raise ValueError(f"--init {path} matches neither the {core.stage} model nor a "
                             f"segmenter: {detail}") from None
        raise ValueError(f"--init {path} does not fit the {core.stage} model: {detail}") from None
    trains = TRAINS[args.stage]
    frozen = [n for n in present if n != trains]
    required = present if args.stage == "semi" else frozen
    missing = [n for n in required if n in left]
    if missing:
        raise ValueError(f"--init {path} is a {init['stage']} checkpoint without {missing} weights, "
                         f"which --stage {args.stage} needs; pass {NEEDS[args.stage]} checkpoint")
    tensors = sum(1 for k in state)
    ignored = sorted(init["modules"] - set(present))
    print0(f"--init {path} ({init['stage']} checkpoint): loaded {', '.join(loaded)} "
           f"({tensors} tensors, strict per module); trains: {trains}; "
           f"frozen: {', '.join(frozen) or 'none'}"
           + (f"; left at initialisation: {', '.join(left)}" if left else "")
           + (f"; ignored from the checkpoint: {', '.join(ignored)}" if ignored else ""))


# --------------------------------------------------------------------------------------------
# Checkpoints, logging, signals
# --------------------------------------------------------------------------------------------


def plain_args(args: argparse.Namespace) -> dict:
    return {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}


class RunInfo(NamedTuple):
    """What checkpoints carry besides the states: the data's classes and the batch layout."""

    class_names: list[str]
    palette: list[list[int]]
    global_batch: int


def checkpoint_state(model, criterion, optimizer, scheduler, scaler, cfg, args, step, best_miou,
                     info: RunInfo) -> dict:
    """The full training state (collective: gathers every rank's RNG states and class memory)."""
    core = video_core(model)
    state = {
        "model": core.state_dict(), "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(), "scaler": scaler.state_dict() if scaler else None,
        "step": step, "config": cfg.to_dict(), "stage": core.stage, "semi": args.stage == "semi",
        "rng": all_gather_object(rng_state()),
        "best_miou": best_miou, "args": plain_args(args),
        "data": {"seed": args.seed, "global_batch": info.global_batch,
                 "samples": step * info.global_batch},
        "class_names": list(info.class_names), "palette": info.palette,
        "cpu_minutes": time.process_time() / 60,
    }
    if core.stage == "refiner" and args.stage == "refiner":
        # per rank (DVIS++ keeps one memory per GPU), for an exact resume of the reid loss
        state["class_memory"] = all_gather_object(dict(core.class_memory.items))
    if isinstance(criterion, SemiLoss):
        state["semi_state"] = {"rep_head": model.rep_head.state_dict(), **criterion.semi_state()}
    return state


def check_resume(ckpt: dict, path: Path, args: argparse.Namespace, global_batch: int) -> None:
    """A resumed run must define the same data and loss, else it would not continue exactly."""
    trained = "semi" if ckpt.get("semi") else ckpt.get("stage")
    if trained != args.stage:
        raise ValueError(f"{path} is a {trained!r} checkpoint, not {args.stage!r}; "
                         "start the next stage with --init")
    old, new = dict(ckpt.get("args", {})), plain_args(args)
    keys = ["seed", "mvc", "mvc_patch", "mvc_ratio", "mvc_weight", "extra", "extra_ratio"]
    if args.stage == "semi":
        keys += ["pseudo", "unlabeled_split", "unlabeled_data", "unsup_weight", "contrastive_weight",
                 "drop_percent", "entropy_alpha", "ema_decay", "bank_size"]
        # the effective sizes: a flag left at its default means the preset's size
        preset = ckpt["config"]["name"]
        old["bank_size"] = bank_size(old.get("bank_size"), preset)
        new["bank_size"] = bank_size(args.bank_size, preset)
    differ = [k for k in keys if old.get(k, new[k]) != new[k]]  # keys unknown to old runs pass
    if ckpt["data"]["global_batch"] != global_batch:
        differ.append(f"global batch {ckpt['data']['global_batch']} -> {global_batch}")
    if differ:
        raise ValueError(f"resuming {path} with different settings "
                         f"({', '.join(map(str, differ))}); "
                         "pass the flags of the original run, or start a new run with --init")


def restore_state(ckpt: dict | None, model, criterion, optimizer, scheduler, scaler,
                  dist: DistInfo) -> tuple[int, float | None]:
    """Load a resumed run's states; returns (step, best_miou), (0, None) for a new run."""
    if ckpt is None:
        return 0, None
    core = video_core(model)
    core.load_state_dict(ckpt["model"])
    optimizer.load_state_dict(ckpt["optimizer"])
    scheduler.load_state_dict(ckpt["scheduler"])
    if scaler is not None and ckpt["scaler"]:
        scaler.load_state_dict(ckpt["scaler"])
    if len(ckpt["rng"]) == dist.world_size:
        set_rng_state(ckpt["rng"][dist.rank])
    if len(ckpt.get("class_memory", [])) == dist.world_size:
        core.class_memory.items = {int(c): t for c, t in ckpt["class_memory"][dist.rank].items()}
    if isinstance(criterion, SemiLoss):
        model.rep_head.load_state_dict(ckpt["semi_state"]["rep_head"])
        criterion.load_semi_state(ckpt["semi_state"])
    print0(f"resumed at step {ckpt['step']}")
    return ckpt["step"], ckpt["best_miou"]


def mvc_settings(args: argparse.Namespace, cfg: Config) -> dict | None:
    """Keyword arguments of vss.mvc.mvc_loss, or None without --mvc."""
    if not args.mvc:
        return None
    patch = args.mvc_patch or scaled_patch_size(MVC_BASE_PATCH, MVC_BASE_SIZE, cfg.data.base_size)
    return {"patch_size": patch, "ratio": args.mvc_ratio, "weight": args.mvc_weight}


def log_train_step(out_dir: Path, step: int, out: dict, clips_per_s: float, world_size: int,
                   device: torch.device, extra: dict | None = None) -> float:
    """Log the losses averaged over ranks (collective), LR, grad norm, speed, memory, CPU time;
    returns the mean loss."""
    keys = [k for k in out if k not in ("skipped", "grad_norm", "lr")]
    mean = (all_reduce_sum(torch.tensor([out[k] for k in keys])) / world_size).tolist()
    log_json(out_dir, {"step": step, **dict(zip(keys, mean)), "lr": out["lr"],
                       "grad_norm": out["grad_norm"], "skipped": out["skipped"],
                       "clips_per_s": clips_per_s, "mem_mb": memory_mb(device),
                       "cpu_min": time.process_time() / 60, **(extra or {})})
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


def any_rank(flag: bool) -> bool:
    """True on every rank when `flag` is True on some rank (collective)."""
    return float(all_reduce_sum(torch.tensor([float(flag)]))) > 0


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
        return any_rank(self.signum is not None)


def run_eval(model: VideoModel, videos: list, cfg: Config, class_names: list[str], amp: str,
             device: torch.device) -> dict:
    """Official metrics on the val videos; every rank predicts its share with the unwrapped
    model (never through the DDP wrapper)."""
    dtype = {"fp16": torch.float16, "bf16": torch.bfloat16, "off": None}[amp]

    def predict(frames: torch.Tensor, out_size: tuple[int, int]) -> torch.Tensor:
        return predict_video(model, frames, out_size, autocast_dtype=dtype)["labels"]

    return evaluate_model(predict, videos, cfg.data, cfg.model.num_classes, device=device,
                          class_names=class_names, progress=is_main())


def _to_device(batch: dict, device: torch.device) -> dict:
    """Frames of a batch (or of each sub-batch) on the device; the rest moves where used."""
    if "frames" in batch:
        return {**batch, "frames": batch["frames"].to(device, non_blocking=True)}
    return {k: _to_device(v, device) for k, v in batch.items()}


# --------------------------------------------------------------------------------------------
# Main
# --------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    parser = get_args_parser()
    args = parser.parse_args(argv)
    check_args(parser, args)
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


class RunSetup(NamedTuple):
    """What a run starts from (`prepare_run`)."""

    root: Path  # the VSPW-layout data root
    cfg: Config
    ckpt: dict | None  # the checkpoint being resumed
    init: dict | None  # the --init weights (`read_init`) of a new run
    model_stage: str  # the VideoModel's stage (--stage, or the student's stage for semi)
    info: RunInfo


class Training(NamedTuple):
    """The live objects of a run (`build_training`)."""

    stage: Stage
    model: nn.Module  # the unwrapped trainable module (VideoModel or SemiStudent)
    ddp: nn.Module  # what the steps call: the model or its DDP wrapper
    criterion: nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    scaler: torch.amp.GradScaler | None
    autocast_ctx: Callable
    amp: str  # "fp16" | "bf16" | "off"


def prepare_run(args: argparse.Namespace, dist: DistInfo) -> RunSetup:
    """Data, the checkpoint to resume (or the --init weights), the config (a resumed run keeps
    its checkpoint's), the student's stage for --stage semi, and the output folder."""
    root = resolve_data(args)
    class_names, palette = load_class_names(root)
    palette = palette if palette is not None else default_palette(len(class_names))
    resume = args.out / "last.pt" if args.resume == "auto" else args.resume and Path(args.resume)
    ckpt = init = None
    if resume and (args.resume != "auto" or resume.exists()):
        ckpt = load_checkpoint(resume)
    elif args.init is not None:
        init = read_init(args.init)
    cfg = Config.from_dict(ckpt["config"]) if ckpt else build_config(
        args, args.num_classes or len(class_names), init)
    global_batch = dist.world_size * args.accum * cfg.optim.batch
    if ckpt:
        check_resume(ckpt, resume, args, global_batch)
    model_stage = args.stage
    if args.stage == "semi":  # the student keeps its stage
        source = ckpt or init
        if source is None:
            raise ValueError("--stage semi starts from a student: pass --init CHECKPOINT")
        model_stage = source["stage"]
    args.out.mkdir(parents=True, exist_ok=True)
    if is_main():
        (args.out / "config.json").write_text(cfg.to_json(), encoding="utf-8")
    info = RunInfo(class_names, palette.tolist(), global_batch)
    return RunSetup(root, cfg, ckpt, init, model_stage, info)


def build_training(args: argparse.Namespace, run: RunSetup, dist: DistInfo
                   ) -> tuple[Training, int, float | None]:
    """Model, loss, optimiser, schedule and mixed precision, restored when resuming.

    Returns:
        (training, start step, best val mIoU so far or None).
    """
    stage, device = STAGES[args.stage], dist.device
    torch.manual_seed(args.seed)  # the same initial weights on every rank
    model, criterion = stage.build(run.cfg, args, run.model_stage)
    if run.ckpt is None:
        load_init_weights(video_core(model), args, run.init)
        if isinstance(criterion, SemiLoss):
            criterion.teacher.copy_from(model)  # U2PL: the teacher starts as the student
    model.to(device)
    criterion.to(device)
    optimizer = build_optimizer(model, run.cfg.optim)
    scheduler = build_scheduler(optimizer, run.cfg.optim)
    amp = args.amp or ("fp16" if device.type == "cuda" else "off")
    autocast_ctx, scaler = make_autocast(device, amp)
    start, best_miou = restore_state(run.ckpt, model, criterion, optimizer, scheduler, scaler, dist)
    ddp = model
    if dist.enabled:
        ddp = nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None)
    training = Training(stage, model, ddp, criterion, optimizer, scheduler, scaler, autocast_ctx,
                        amp)
    return training, start, best_miou


def micro_batch_loss(model: nn.Module, micro: tuple[int, dict], *, tr: Training, step: int,
                     cfg: Config, mvc: dict | None, device: torch.device
                     ) -> dict[str, torch.Tensor]:
    """`train_step`'s loss_fn: the stage's loss terms of one (seed, batch) micro-batch."""
    seed, batch = micro
    torch.manual_seed(seed)  # point sampling, MVC masks, contrastive sampling of this micro-batch
    return tr.stage.loss(model, tr.criterion, _to_device(batch, device), step, cfg, mvc)


def save_training(name: str, step: int, tr: Training, run: RunSetup, args: argparse.Namespace,
                  best_miou: float | None) -> None:
    """OUT/name from rank 0 (collective: every rank broadcasts buffers and gathers RNG states)."""
    broadcast_buffers(tr.model)
    if isinstance(tr.criterion, SemiLoss):
        broadcast_buffers(tr.criterion.teacher)
    state = checkpoint_state(tr.model, tr.criterion, tr.optimizer, tr.scheduler, tr.scaler, run.cfg,
                             args, step, best_miou, run.info)
    if is_main():
        save_checkpoint(args.out / name, state)


def validate(step: int, tr: Training, run: RunSetup, videos: list, args: argparse.Namespace,
             device: torch.device) -> float:
    """Val metrics of the model on every rank, logged; returns the mIoU."""
    broadcast_buffers(tr.model)  # every rank evaluates with rank 0's BatchNorm statistics
    metrics = run_eval(video_core(tr.model), videos, run.cfg, run.info.class_names, tr.amp, device)
    tr.model.train()  # predict_video restores the core's mode, not the stage's
    log_json(args.out, {"step": step, "val": {k: v for k, v in metrics.items()
                                              if isinstance(v, (int, float))}})
    print0(f"step {step}: val mIoU {metrics['mIoU']:.4f} VC8 {metrics['VC8']:.4f} "
           f"VC16 {metrics['VC16']:.4f}")
    return metrics["mIoU"]


def train(args: argparse.Namespace, dist: DistInfo, stop: StopRequest) -> int:
    # 1. data, config, output folder; 2. model, optimiser, schedule, mixed precision
    run = prepare_run(args, dist)
    cfg, device = run.cfg, dist.device
    tr, start, best_miou = build_training(args, run, dist)
    batches = iter(build_loader(run.root, args, cfg, dist, start))
    videos = list(iter_eval_videos(run.root, args.val_split)) if args.eval_every > 0 else []
    mvc = mvc_settings(args, cfg)
    semi = isinstance(tr.criterion, SemiLoss)
    trainable = sum(p.numel() for p in tr.model.parameters() if p.requires_grad) / 1e6
    print0(f"stage {args.stage} ({run.model_stage} model), {cfg.name}: {trainable:.2f}M trainable "
           f"params; {dist.world_size} rank(s) x {args.accum} x {cfg.optim.batch} clips"
           f"{' (+ as many pseudo-labelled)' if semi else ''} x {cfg.optim.frames} frames; "
           f"train {cfg.data.crop_size} from short side {cfg.data.base_size}, eval at "
           f"{cfg.data.test_size}; amp {tr.amp}; mvc {mvc}; {device}")

    # 3. the loop: step, log, evaluate, stop on a signal or the time budget, save
    tr.model.train()
    end = min(cfg.optim.iters, args.stop_at or cfg.optim.iters)
    budget = args.time_budget * 60 if args.time_budget else None
    bar = tqdm(total=cfg.optim.iters, initial=start, disable=not is_main(), desc=args.stage)
    tick, last_log, step = time.time(), start, start
    for step in range(start + 1, end + 1):
        micro = [(step_seed(args.seed, step, dist.rank * args.accum + a), next(batches))
                 for a in range(args.accum)]
        loss_fn = partial(micro_batch_loss, tr=tr, step=step, cfg=cfg, mvc=mvc, device=device)
        out = train_step(tr.ddp, micro, loss_fn, tr.optimizer, tr.scaler, tr.scheduler,
                         cfg.optim.clip_grad, tr.autocast_ctx)
        if semi:  # U2PL: EMA after the optimiser step, k = 0-based semi iteration
            tr.criterion.teacher.update(tr.model, step - 1, args.ema_decay)
        bar.update(1)
        if step % args.log_every == 0 or step == end:
            rate = run.info.global_batch * (step - last_log) / (time.time() - tick)
            extra = {"bank_keys": bank_fill(tr.criterion)} if semi else None
            loss = log_train_step(args.out, step, out, rate, dist.world_size, device, extra)
            bar.set_postfix(loss=f"{loss:.3f}")
            tick, last_log = time.time(), step
        over_budget = budget is not None and any_rank(time.process_time() >= budget)
        evaluate = args.eval_every > 0 and (step % args.eval_every == 0 or step == cfg.optim.iters
                                            or over_budget)
        if evaluate:
            miou = validate(step, tr, run, videos, args, device)
            if best_miou is None or miou > best_miou:
                best_miou = miou
                save_training("best.pt", step, tr, run, args, best_miou)
        if stop.agreed():
            save_training("last.pt", step, tr, run, args, best_miou)
            print0(f"stopped by a signal at step {step}; saved {args.out / 'last.pt'}; "
                   "continue with --resume auto")
            return 128 + (stop.signum or signal.SIGTERM)
        if over_budget:
            save_training("last.pt", step, tr, run, args, best_miou)
            log_json(args.out, {"step": step, "stopped": "time budget",
                                "cpu_min": time.process_time() / 60})
            print0(f"time budget of {args.time_budget} CPU-minutes reached at step {step} "
                   f"(rank {get_rank()}: {time.process_time() / 60:.2f}); saved "
                   f"{args.out / 'last.pt'}")
            bar.close()
            return 0
        if evaluate or step == end or (args.save_every > 0 and step % args.save_every == 0):
            save_training("last.pt", step, tr, run, args, best_miou)
    bar.close()
    print0(f"done at step {step}; checkpoint {args.out / 'last.pt'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
