"""Training and evaluation helpers that `train.py` composes: optimiser, LR schedule, mixed
precision, one training step, and distributed evaluation.

Recipe: DVIS++ (DVIS_Plus `configs/dvis_Plus/VSPW/*.yaml` and `train_net_video.py::
build_optimizer`, which is Mask2Former's):
- AdamW, base LR 1e-4, weight decay 0.05; backbone parameters at LR x 0.1 (BACKBONE_MULTIPLIER).
- Weight decay 0 for the parameters of normalisation layers (detectron2 WEIGHT_DECAY_NORM 0) and
  of nn.Embedding (Mask2Former WEIGHT_DECAY_EMBED 0: the learnable query features/positions and
  level embeddings). Biases keep the weight decay, as in Mask2Former/DVIS++ (its builder has no
  bias rule; detectron2's WEIGHT_DECAY_BIAS defaults to WEIGHT_DECAY).
- Full-model gradient clipping by L2 norm (0.01 in DVIS++), applied after unscaling fp16 grads.
- Multi-step LR, gamma 0.1 at fractions `lr_steps` of the iterations (WarmupMultiStepLR with
  10 warm-up iterations at factor 1.0, i.e. no warm-up).
- AMP: fp16 autocast + GradScaler on V100s (no bf16 there); bf16 or fp32 elsewhere.

Evaluation: every rank predicts its share of the videos (video i on rank
i % world, no padding duplicates), accumulates the confusion matrix and the VC windows with
`vss.metrics`, the matrix is all-reduced once, the per-video VC ratios are gathered, and every
rank returns the same official figures.
"""

from __future__ import annotations

import bisect
import contextlib
import json
import math
from pathlib import Path
import resource
import time
from typing import Callable, ContextManager, Sequence
import warnings

import cv2
import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from vss.config import DataConfig, OptimConfig
from vss.data import normalize, rescaled_size
from vss.distributed import all_gather_object, all_reduce_sum, get_rank, get_world_size
from vss.io import atomic_path, EvalVideo, json_safe, read_frame, read_label_png, shift_labels
from vss.metrics import DatasetStats, summarize, VideoStats

# Parameters of these modules get no weight decay. Modules whose class name contains "Norm"
# (e.g. a channels-first LayerNorm2d in a neck) count as normalisation layers as well.
_NORM_TYPES = (
    nn.modules.batchnorm._NormBase,  # BatchNorm*, SyncBatchNorm, InstanceNorm*
    nn.LayerNorm,
    nn.GroupNorm,
    nn.LocalResponseNorm,
    nn.RMSNorm,
)


def _is_norm(module: nn.Module) -> bool:
    return isinstance(module, _NORM_TYPES) or "Norm" in type(module).__name__


def param_groups(model: nn.Module, optim_cfg: OptimConfig) -> list[dict]:
    """AdamW parameter groups following DVIS++/Mask2Former's rules (see the module docstring).

    A parameter is a backbone parameter when one component of its dotted name is `backbone`
    (`backbone.res2...`, `segmenter.backbone...`, `module.backbone...`). Frozen parameters
    (requires_grad False) are left out; shared parameters appear once.

    Returns:
        Up to 4 groups, each {"params", "lr", "weight_decay", "name"}, name in
        {"backbone", "backbone_no_wd", "head", "head_no_wd"}.
    """
    groups: dict[str, dict] = {}
    seen: set[int] = set()
    for module_name, module in model.named_modules():
        no_wd = _is_norm(module) or isinstance(module, nn.Embedding)
        for param_name, param in module.named_parameters(recurse=False):
            if not param.requires_grad or id(param) in seen:
                continue
            seen.add(id(param))
            full_name = f"{module_name}.{param_name}" if module_name else param_name
            in_backbone = "backbone" in full_name.split(".")
            name = ("backbone" if in_backbone else "head") + ("_no_wd" if no_wd else "")
            if name not in groups:
                lr = optim_cfg.lr * (optim_cfg.backbone_lr_mult if in_backbone else 1.0)
                wd = 0.0 if no_wd else optim_cfg.weight_decay
                groups[name] = {"params": [], "lr": lr, "weight_decay": wd, "name": name}
            groups[name]["params"].append(param)
    order = ["head", "head_no_wd", "backbone", "backbone_no_wd"]
    return [groups[n] for n in order if n in groups]


def build_optimizer(model: nn.Module, optim_cfg: OptimConfig) -> torch.optim.AdamW:
    """AdamW over `param_groups(model, optim_cfg)` (pass the unwrapped model)."""
    groups = param_groups(model, optim_cfg)
    if not groups:
        raise ValueError("the model has no trainable parameters")
    # foreach: the multi-tensor update, bit-identical to the per-parameter loop torch picks on CPU
    # by default and ~1.7x faster there (already the default on CUDA)
    return torch.optim.AdamW(groups, lr=optim_cfg.lr, weight_decay=optim_cfg.weight_decay, foreach=True)


def lr_milestones(optim_cfg: OptimConfig, steps: tuple[float, ...] = ()) -> list[int]:
    """Iterations where the LR drops by 10x: round(f * iters) for f in ``steps`` (a stage's own,
    ``StageConfig.lr_steps``) or else ``optim_cfg.lr_steps``; none while ``iters`` is 0, a schedule
    still to be fitted to a time budget."""
    steps = steps or optim_cfg.lr_steps
    if any(not 0.0 < f <= 1.0 for f in steps):
        raise ValueError(f"lr_steps must be fractions in (0, 1], got {steps}")
    return sorted(round(f * optim_cfg.iters) for f in steps) if optim_cfg.iters > 0 else []


def fit_iters(step: int, cpu_s: float, cpu_per_step_s: float, budget_s: float) -> int:
    """The schedule length that fits a CPU-time budget: the steps done plus as many more as the
    rest of the budget holds at the measured step time (at least the steps done).

    Args:
        step: steps done so far; cpu_s: CPU seconds used so far (setup included);
        cpu_per_step_s: measured CPU seconds per step; budget_s: the budget in CPU seconds.
    """
    if not cpu_per_step_s > 0:
        raise ValueError(f"the step time must be positive, got {cpu_per_step_s}")
    return step + max(0, math.floor((budget_s - cpu_s) / cpu_per_step_s))


def build_scheduler(
    optimizer: torch.optim.Optimizer, optim_cfg: OptimConfig, gamma: float = 0.1, steps: tuple[float, ...] = ()
) -> torch.optim.lr_scheduler.LambdaLR:
    """Multi-step schedule: LR of iteration i = base LR * gamma ** #(milestones <= i), the milestones
    of ``lr_milestones(optim_cfg, steps)``.

    A LambdaLR over a closure: its state_dict is just the step counter and base LRs (plain
    numbers, loadable with weights_only); the milestones come from the config on resume, and
    are read at every step, so a schedule fitted to a time budget after the first steps
    (``optim_cfg.iters`` set then) takes effect at once.
    Call `scheduler.step()` once per iteration, after the optimiser step.
    """

    def factor(step: int) -> float:
        return gamma ** bisect.bisect_right(lr_milestones(optim_cfg, steps), step)

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


AMP_DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "off": None}  # --amp -> autocast dtype


def make_autocast(
    device: torch.device | str, mode: str
) -> tuple[Callable[[], ContextManager], torch.amp.GradScaler | None]:
    """The mixed-precision context for the forward pass and, for fp16 only, a GradScaler.

    Args:
        device: where the model runs ("cuda", "cpu", torch.device).
        mode: "fp16" (autocast float16 + GradScaler: V100s have no bf16), "bf16" (autocast
            bfloat16, no scaler: same exponent range as fp32) or "off" (fp32).
    Returns:
        (autocast_ctx, scaler): `with autocast_ctx(): ...` around the forward and the loss;
        scaler is None unless mode is "fp16". Save and restore the scaler with checkpoints.
    """
    device_type = torch.device(device).type
    if mode == "off":
        return contextlib.nullcontext, None
    if mode not in AMP_DTYPES:
        raise ValueError(f"amp mode must be 'fp16', 'bf16' or 'off', got {mode!r}")
    if mode == "bf16":
        if device_type == "cuda" and not torch.cuda.is_bf16_supported():
            raise ValueError("--amp bf16 needs a GPU with bfloat16 support (V100 has none); use --amp fp16")
        return (lambda: torch.autocast(device_type, dtype=torch.bfloat16)), None
    if mode == "fp16":
        scaler = torch.amp.GradScaler(device_type)
        return (lambda: torch.autocast(device_type, dtype=torch.float16)), scaler
    raise ValueError(f"amp mode must be 'fp16', 'bf16' or 'off', got {mode!r}")


class NonFiniteLossError(RuntimeError):
    """The loss became NaN or inf on some rank; the run must stop (the last checkpoint written
    before this step is the last good one)."""


def _non_finite_error(terms: dict[str, torch.Tensor], loss: torch.Tensor) -> NonFiniteLossError | None:
    """The error to raise when the loss is NaN/inf on any rank, else None (collective)."""
    # Decide on every rank together: if only the rank with the NaN raised, the others would
    # wait for it forever in the gradient all-reduce.
    bad_here = torch.tensor([0.0 if bool(torch.isfinite(loss)) else 1.0])
    if float(all_reduce_sum(bad_here)) == 0.0:
        return None
    if bad_here.item():
        bad = [k for k, v in terms.items() if not bool(torch.isfinite(v).all())]
        return NonFiniteLossError(f"non-finite loss {loss.item()} (terms: {', '.join(bad)})")
    return NonFiniteLossError("non-finite loss on another rank")


def train_step(
    model: nn.Module,
    micro_batches: Sequence[object],
    loss_fn: Callable[[nn.Module, object], dict[str, torch.Tensor]],
    optimizer: torch.optim.Optimizer,
    scaler: torch.amp.GradScaler | None,
    scheduler: torch.optim.lr_scheduler.LRScheduler | None,
    clip: float,
    autocast_ctx: Callable[[], ContextManager] = contextlib.nullcontext,
) -> dict:
    """One optimisation step: for each micro-batch forward + loss under autocast and a (scaled)
    backward of loss / #micro-batches; then unscale, clip, step, LR schedule.

    Several micro-batches accumulate gradients (DDP syncs only on the last one), so one process
    with A micro-batches computes the same update as A ranks with one each. The caller sets
    train/eval modes (frozen parts of a stage stay in eval).

    Args:
        model: the (possibly DDP-wrapped) model, passed to `loss_fn`.
        micro_batches: one or more batches, each whatever `loss_fn` expects.
        loss_fn: (model, micro_batch) -> dict of weighted loss terms; the loss is their sum.
        optimizer: its param_groups define the "full model" for clipping.
        scaler: a GradScaler for fp16 (None or disabled: no scaling).
        scheduler: stepped once per call, also when the scaler skips the step (the schedule
            counts iterations, as detectron2's AMPTrainer).
        clip: max L2 norm of all gradients together; <= 0 disables clipping (the norm is still
            measured).
        autocast_ctx: factory of the autocast context (from `make_autocast`).
    Returns:
        {"loss": float, <term>: float, ... (means over the micro-batches), "grad_norm": float
         (before clipping, unscaled), "skipped": bool (fp16 overflow, or non-finite gradients
         without a scaler), "lr": float (LR of the first group used for this step)}.
    Raises:
        NonFiniteLossError: the loss is NaN/inf on any rank (nothing was updated).
    """
    if not micro_batches:
        raise ValueError("train_step needs at least one micro-batch")
    optimizer.zero_grad(set_to_none=True)
    use_scaler = scaler is not None and scaler.is_enabled()
    num = len(micro_batches)
    means: dict[str, float] = {}
    for i, micro in enumerate(micro_batches):
        # Gradients are all-reduced by DDP on the last micro-batch only.
        last = i == num - 1
        no_sync = model.no_sync if isinstance(model, nn.parallel.DistributedDataParallel) else None
        with contextlib.nullcontext() if last or no_sync is None else no_sync():
            with autocast_ctx():
                terms = loss_fn(model, micro)
            if not terms:
                raise ValueError("loss_fn returned no loss terms")
            loss = torch.stack([v.float() for v in terms.values()]).sum()
            error = _non_finite_error(terms, loss)
            if error is not None:
                raise error
            (scaler.scale(loss / num) if use_scaler else loss / num).backward()
        for key, value in [("loss", loss), *terms.items()]:
            means[key] = means.get(key, 0.0) + value.detach().float().item() / num
    lr = optimizer.param_groups[0]["lr"]

    params = [p for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
    if use_scaler:
        scaler.unscale_(optimizer)  # clip the true gradients, not the scaled ones
    max_norm = clip if clip > 0 else math.inf
    grad_norm = float(torch.nn.utils.clip_grad_norm_(params, max_norm)) if params else 0.0
    if use_scaler:
        scale_before = scaler.get_scale()
        scaler.step(optimizer)  # skipped internally when the unscaled grads hold inf/NaN
        scaler.update()
        skipped = scaler.get_scale() < scale_before
    else:
        # Without a scaler an inf gradient would poison the weights; skip the update instead.
        skipped = not math.isfinite(grad_norm)
        if not skipped:
            optimizer.step()
    if scheduler is not None:
        with warnings.catch_warnings():
            # After a skipped first step torch warns that the schedule "skips its first value";
            # not so here: the schedule is indexed by iteration on purpose.
            warnings.filterwarnings("ignore", message="Detected call of `lr_scheduler.step")
            scheduler.step()
    return {**means, "grad_norm": grad_norm, "skipped": skipped, "lr": lr}


def resize_short_side(frames: np.ndarray, size: int, max_size: float = 0) -> np.ndarray:
    """(T,H,W,3) uint8 frames with the short side resized to `size` and the long side capped at
    `max_size` (bilinear; ``vss.data.rescaled_size``); size 0 keeps them."""
    height, width = frames.shape[1:3]
    if size <= 0:
        return frames
    new_h, new_w = rescaled_size(height, width, size, max_size)
    if (new_h, new_w) == (height, width):
        return frames
    return np.stack([cv2.resize(f, (new_w, new_h), interpolation=cv2.INTER_LINEAR) for f in frames])


def _video_stats(
    predict_fn: Callable[[torch.Tensor, tuple[int, int]], torch.Tensor],
    video: EvalVideo,
    data_cfg: DataConfig,
    num_classes: int,
    vc_sizes: Sequence[int],
    device: torch.device,
) -> VideoStats:
    if video.masks is None or not any(m is not None for m in video.masks):
        raise ValueError(f"video {video.name} has no ground-truth masks (mask/ folder); cannot evaluate")
    images = np.stack([read_frame(p) for p in video.frames])  # (T,H0,W0,3)
    out_size = images.shape[1:3]
    frames = normalize(resize_short_side(images, data_cfg.test_size, data_cfg.max_size), data_cfg)  # (T,3,h,w)
    labels = predict_fn(frames.to(device), out_size)  # (T,H0,W0)
    if tuple(labels.shape) != (len(images), *out_size):
        raise ValueError(
            f"video {video.name}: predict_fn returned {tuple(labels.shape)}, expected {(len(images), *out_size)}"
        )
    # uint8 takes the metrics' fast path; ids 0..K-1 fit whenever K <= 255 (VSPW: 124).
    labels = labels.cpu().numpy().astype(np.uint8 if num_classes <= 255 else np.int64)
    stats = VideoStats(num_classes, vc_sizes, name=video.name)
    # Temporal models see every frame; only frames with a mask are scored, in order.
    for t, mask_path in enumerate(video.masks):
        if mask_path is not None:
            stats.update(shift_labels(read_label_png(mask_path)), labels[t], name=str(mask_path))
    return stats.finish()


def evaluate_model(
    predict_fn: Callable[[torch.Tensor, tuple[int, int]], torch.Tensor],
    videos: Sequence[EvalVideo],
    data_cfg: DataConfig,
    num_classes: int,
    *,
    device: torch.device | str = "cpu",
    vc_sizes: Sequence[int] = (8, 16),
    class_names: Sequence[str] | None = None,
    progress: bool = False,
) -> dict:
    """Official VSPW metrics of a model over `videos`, computed on all ranks together.

    Every rank must call this with the same `videos`; rank r predicts videos r, r+W, r+2W, ...

    Args:
        predict_fn: (frames (T,3,h,w) normalised on `device`, (H0, W0)) -> (T,H0,W0) int class
            ids at the original resolution. Wrap the UNWRAPPED model (not DDP) in eval mode.
        videos: from `vss.data.iter_eval_videos` (with masks).
        data_cfg: `test_size` (short side given to the model; 0 = original) and normalisation.
        num_classes: K.
        device: where frames are sent.
        vc_sizes: VC window sizes (8, 16).
        class_names: K names for the per-class IoU entries.
        progress: show a tqdm bar (pass True on rank 0 only).
    Returns:
        `vss.metrics.summarize` of all videos (mIoU, fwIoU, VC8, VC16, per class, per video),
        identical on every rank.
    """
    rank, world = get_rank(), get_world_size()
    vc_sizes = tuple(sorted({int(n) for n in vc_sizes}))
    confusion = np.zeros((num_classes, num_classes), np.int64)
    records = []  # (video index, name, frames, {n: window ratios}) of this rank's videos
    mine = range(rank, len(videos), world)
    for i in tqdm(mine, desc="eval", disable=not progress, leave=False):
        stats = _video_stats(predict_fn, videos[i], data_cfg, num_classes, vc_sizes, torch.device(device))
        confusion += stats.confusion
        ratios = {n: stats.window_ratios(n) for n in vc_sizes}
        records.append((i, stats.name, stats.num_frames, ratios))
    confusion = all_reduce_sum(torch.from_numpy(confusion)).numpy()
    gathered = sorted(r for part in all_gather_object(records) for r in part)
    total = DatasetStats(num_classes, vc_sizes, confusion=confusion)
    for _, name, num_frames, ratios in gathered:
        total.num_frames += num_frames
        entry: dict = {"frames": num_frames}
        for n in vc_sizes:
            total.ratios[n].append(ratios[n])
            valid = ratios[n][~np.isnan(ratios[n])]
            entry[f"VC{n}"] = float(valid.mean()) if valid.size else float("nan")
            entry[f"VC{n}_windows"] = int(ratios[n].size)
        total.videos[name] = entry
    return summarize(total, class_names)


def evaluate_video_model(
    model: nn.Module,
    videos: Sequence[EvalVideo],
    data_cfg: DataConfig,
    num_classes: int,
    *,
    amp: str = "off",
    device: torch.device | str = "cpu",
    class_names: Sequence[str] | None = None,
    progress: bool = False,
) -> dict:
    """``evaluate_model`` of a ``VideoModel`` by its stage's inference (``predict_video``); every
    rank predicts its share with the unwrapped model (never through the DDP wrapper)."""
    from vss.video_model import predict_video

    def predict(frames: torch.Tensor, out_size: tuple[int, int]) -> torch.Tensor:
        return predict_video(model, frames, out_size, autocast_dtype=AMP_DTYPES[amp])["labels"]

    return evaluate_model(
        predict, videos, data_cfg, num_classes, device=device, class_names=class_names, progress=progress
    )


def log_json(path: Path, record: dict) -> None:
    """Append one strict-JSON line (NaN -> null) to ``path`` (call on rank 0)."""
    with open(path, "a", encoding="utf-8") as f:
        f.write(json.dumps(json_safe(record), allow_nan=False) + "\n")


def memory_mb(device: torch.device) -> float:
    """Peak memory of this process: CUDA allocations on a GPU, else the peak resident set."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def continue_log(path: Path, step: int) -> None:
    """Keep the log lines up to ``step``: a run resumed from step S logs S+1, ... again."""
    if not path.is_file():
        return
    lines = path.read_text(encoding="utf-8").splitlines()
    kept = [line for line in lines if line.strip() and json.loads(line).get("step", 0) <= step]
    if len(kept) != len(lines):
        with atomic_path(path) as tmp:
            tmp.write_text("".join(line + "\n" for line in kept), encoding="utf-8")


class BudgetClock:
    """CPU seconds of the run's setup and training steps: every thread of this process
    (time.process_time; data workers excluded), plus what earlier processes of a resumed run used,
    minus the time spent in validation, so that --eval-every does not change the schedule.

    ``cpu_time`` is the clock read (seconds; only differences and the first reading matter):
    ``time.process_time`` except in tests, which pass a fake that advances by fixed amounts."""

    def __init__(self, prior_s: float = 0.0, cpu_time: Callable[[], float] = time.process_time):
        self.prior_s, self.excluded_s, self.cpu_time = prior_s, 0.0, cpu_time

    def seconds(self) -> float:
        return self.prior_s + self.cpu_time() - self.excluded_s

    @contextlib.contextmanager
    def excluded(self):
        start = self.cpu_time()
        try:
            yield
        finally:
            self.excluded_s += self.cpu_time() - start
