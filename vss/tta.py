"""Test-time augmentation: multi-scale + horizontal flip views of a whole video, merged by
per-pixel voting (MVC paper section 2.4, eq. 8) or by averaging class probabilities (the
ViT-Adapter multi-scale/flip test used for the U2PL paper's pseudo labels; U2PL's
section 4).

A view is (scale, flip). For each view the frames at scale s are made -- by the caller's
``frames(s)`` function, which should resize the *original* frames to s times the inference size,
as mmseg's / detectron2's multi-scale tests resize the original image for every scale (infer.py
does); or, given a tensor (T,3,H,W) of normalised frames, by resizing it bilinearly
(align_corners=False) to round(H*s) x round(W*s), optionally rounded *up* to a multiple of
``size_divisibility`` as mmseg's ResizeToMultiple does (upsampling already-resized frames
blurs the larger views: on CamVid a stage-1 model scored 0.377 instead of 0.417 mIoU in the
scale-1.2 view) -- flipped if asked, passed to ``predict_fn`` (the whole video at once,
because the tracker/refiner need every frame), and the returned probabilities (T,K,h,w) are
un-flipped and resized back to (H,W) bilinearly (or to an ``out_size``, e.g. the original
video size, so that views are merged at full resolution).

Readings of what the papers leave open:
- Vote (eq. 8): per pixel the most frequent label over the V views. The paper says a tie goes
  to "the result corresponding to the higher resolution input". We read it as: among the labels
  that share the highest count, take the one predicted by the highest-priority view, where
  priority orders views by scale (largest first) and, at equal scale, the unflipped view before
  the flipped one. The result is always one of the modes; when the top-priority view votes for
  a tied label this equals "take that view's label".
- Mean: the arithmetic mean of the per-view class probabilities (already normalised to sum to
  1 over K by the caller, e.g. ``predict_video``), then argmax; the mean is returned too (the
  semi-supervised pipeline needs it for entropy).
"""

from __future__ import annotations

from dataclasses import dataclass
import math
from typing import Callable, Sequence

import torch
import torch.nn.functional as F

PredictFn = Callable[[torch.Tensor], torch.Tensor]


@dataclass(frozen=True)
class View:
    """One test-time view: resize by ``scale``, then mirror left-right if ``flip``."""

    scale: float
    flip: bool


def tta_views(scales: Sequence[float] = (0.9, 1.0, 1.1, 1.2), flip: bool = True) -> list[View]:
    """The views of the MVC paper's TTA: every scale, each without and (optionally) with flip.

    Args:
        scales: resize factors (> 0) relative to the inference size.
        flip: also add the horizontally flipped view of every scale.

    Returns:
        Views in the order given: (s0, no flip), (s0, flip), (s1, no flip), ...
    """
    if len(scales) == 0:
        raise ValueError("tta_views: scales is empty")
    views = []
    for scale in scales:
        if not scale > 0:
            raise ValueError(f"tta_views: scale must be > 0, got {scale}")
        views.append(View(float(scale), False))
        if flip:
            views.append(View(float(scale), True))
    return views


def view_priority(views: Sequence[View]) -> list[int]:
    """Rank of each view for breaking vote ties: 0 = highest priority.

    Highest resolution (largest scale) first; among equal scales the unflipped view first, then
    the order given.
    """
    order = sorted(range(len(views)), key=lambda i: (-views[i].scale, views[i].flip, i))
    rank = [0] * len(views)
    for r, i in enumerate(order):
        rank[i] = r
    return rank


def view_size(height: int, width: int, scale: float, size_divisibility: int = 0) -> tuple[int, int]:
    """(h, w) of a view: round(H*s), round(W*s), rounded up to a multiple of size_divisibility
    when it is > 1 (never below one multiple)."""
    h, w = max(1, round(height * scale)), max(1, round(width * scale))
    if size_divisibility > 1:
        d = size_divisibility
        h, w = max(d, math.ceil(h / d) * d), max(d, math.ceil(w / d) * d)
    return h, w


def vote(labels: torch.Tensor, priority: Sequence[int]) -> torch.Tensor:
    """Per-pixel mode over views with ties broken by view priority (eq. 8; see module docstring).

    Exact integer logic, independent of the number of classes: for every view v, count how many
    views agree with it; the winning view maximises (count, -priority), and its label is the
    result. All views voting for the same label share its count, so the winner's label is a
    mode, and among tied modes it is the one held by the highest-priority view.

    Args:
        labels: (V, ...) integer labels of V views (any trailing shape, e.g. (V,T,H,W)).
        priority: (V,) distinct ranks, 0 = highest priority (``view_priority``).

    Returns:
        (...) int64 labels.
    """
    num_views = labels.shape[0]
    if len(priority) != num_views or sorted(priority) != list(range(num_views)):
        raise ValueError(f"vote: priority must be a permutation of 0..{num_views - 1}, got {list(priority)}")
    agree = torch.zeros(labels.shape, dtype=torch.int32, device=labels.device)  # (V,...)
    for u in range(num_views):
        agree += labels == labels[u]
    # counts are <= V, so count * V + (V - 1 - rank) orders by count first, priority second.
    bonus = torch.tensor([num_views - 1 - p for p in priority], dtype=torch.int32, device=labels.device)
    score = agree * num_views + bonus.view(-1, *([1] * (labels.dim() - 1)))  # (V,...)
    winner = score.argmax(dim=0, keepdim=True)  # (1,...)
    return labels.gather(0, winner).squeeze(0).long()  # (...)


def _scaled(frames: torch.Tensor, scale: float, size_divisibility: int) -> torch.Tensor:
    """The tensor frames (T,3,H,W) resized by ``scale`` (see the module docstring)."""
    height, width = frames.shape[-2:]
    h, w = view_size(height, width, scale, size_divisibility)
    if (h, w) == (height, width):
        return frames
    return F.interpolate(frames, size=(h, w), mode="bilinear", align_corners=False)  # (T,3,h,w)


def _predict_view(predict_fn: PredictFn, x: torch.Tensor, view: View, num_classes: int) -> torch.Tensor:
    """Probabilities of one view from its frames x (T,3,h,w) at the view's scale, un-flipped:
    (T,K,h',w')."""
    t = x.shape[0]
    if view.flip:
        x = x.flip(-1)
    with torch.no_grad():
        probs = predict_fn(x)  # (T,K,h',w')
    if not isinstance(probs, torch.Tensor) or probs.dim() != 4 or probs.shape[:2] != (t, num_classes):
        shape = tuple(probs.shape) if isinstance(probs, torch.Tensor) else type(probs).__name__
        raise ValueError(
            f"run_tta: predict_fn returned {shape} for view {view} (input {tuple(x.shape)}); "
            f"expected (T={t}, K={num_classes}, h, w)"
        )
    if view.flip:
        # flip and bilinear resizing (align_corners=False) commute, so un-flip at view size.
        probs = probs.flip(-1)
    return probs


def run_tta(
    predict_fn: PredictFn,
    frames: torch.Tensor | Callable[[float], torch.Tensor],
    *,
    num_classes: int,
    scales: Sequence[float] = (0.9, 1.0, 1.1, 1.2),
    flip: bool = True,
    merge: str = "vote",
    size_divisibility: int = 0,
    out_size: tuple[int, int] | None = None,
    chunk_frames: int = 1,
) -> dict:
    """Multi-scale + flip TTA of a whole video, merged by vote or probability mean.

    The cost is one ``predict_fn`` call per view plus resizing back. Per-view outputs are resized
    back and reduced ``chunk_frames`` frames at a time, so the full-resolution probabilities of
    a whole view never exist at once (one 480x854 frame with K=124 is ~200 MB); vote keeps
    (V,T,H0,W0) uint8 labels, mean one running (T,K,H0,W0) sum.

    Args:
        predict_fn: frames (T,3,h,w) normalised -> probabilities (T,K,h',w') summing to 1 over K.
            The output may be at any resolution (e.g. stride 4); it is resized to (H0,W0).
        frames: (T,3,H,W) float normalised frames of one video, resized here for every scale; or
            a function scale -> (T,3,h,w) normalised frames at that scale (preferred: from the
            original frames, see the module docstring), called once per scale.
        num_classes: K.
        scales: view scales; flip: add flipped views (``tta_views``).
        merge: "vote" (MVC paper, eq. 8) or "mean" (probability average, U2PL / ViT-Adapter).
        size_divisibility: if > 1, view sizes are rounded up to a multiple of it (tensor frames).
        out_size: (H0,W0) the per-view probabilities are resized to and merged at, e.g. the
            original video size when ``frames`` were resized for inference; None = (H,W) of
            tensor frames (required with a function).
        chunk_frames: frames resized back / merged at a time.

    Returns:
        dict with ``labels`` (T,H0,W0) int64 and ``probs`` (T,K,H0,W0) float32 mean probabilities
        for merge="mean", None for merge="vote"; both on the CPU.
    """
    if merge not in ("vote", "mean"):
        raise ValueError(f"run_tta: merge must be 'vote' or 'mean', got {merge!r}")
    if callable(frames):
        make_view = frames
        if out_size is None:
            raise ValueError("run_tta: out_size is required when frames is a function")
    else:
        if frames.dim() != 4 or frames.shape[1] != 3:
            raise ValueError(f"run_tta: frames must be (T,3,H,W), got {tuple(frames.shape)}")
        tensor = frames

        def make_view(scale: float) -> torch.Tensor:
            return _scaled(tensor, scale, size_divisibility)

    if num_classes < 1 or chunk_frames < 1:
        raise ValueError(f"run_tta: num_classes ({num_classes}) and chunk_frames ({chunk_frames}) must be >= 1")
    views = tta_views(scales, flip)
    height, width = out_size if out_size is not None else frames.shape[-2:]
    label_dtype = torch.uint8 if num_classes <= 256 else torch.int16
    view_labels = None  # vote: (V,T,H0,W0) labels
    prob_sum = None  # mean: (T,K,H0,W0) running sum

    x, x_scale = None, None
    for v, view in enumerate(views):
        if view.scale != x_scale:  # the flipped view of a scale reuses its frames
            x = None  # free the previous scale's frames before making the next
            x, x_scale = make_view(view.scale), view.scale  # (T,3,h,w)
        probs = _predict_view(predict_fn, x, view, num_classes)  # (T,K,h',w')
        t = probs.shape[0]
        if v == 0 and merge == "vote":
            view_labels = torch.empty((len(views), t, height, width), dtype=label_dtype)
        elif v == 0:
            prob_sum = torch.zeros((t, num_classes, height, width), dtype=torch.float32)
        for start in range(0, t, chunk_frames):
            part = slice(start, start + chunk_frames)
            chunk = probs[part].float()  # (t',K,h',w')
            if chunk.shape[-2:] != (height, width):
                size = (height, width)
                chunk = F.interpolate(chunk, size=size, mode="bilinear", align_corners=False)
            if merge == "vote":
                # max().indices = argmax (first maximum), about twice as fast on CPU
                view_labels[v, part] = chunk.max(1).indices.to(label_dtype)  # (t',H0,W0)
            else:
                prob_sum[part] += chunk.cpu()  # (t',K,H0,W0)
        del probs
    del x

    if merge == "mean":
        prob_sum /= len(views)
        return {"labels": prob_sum.argmax(1), "probs": prob_sum}  # (T,H0,W0), (T,K,H0,W0)
    priority = view_priority(views)
    labels = torch.empty((t, height, width), dtype=torch.int64)  # (T,H0,W0)
    for start in range(0, t, chunk_frames):
        part = slice(start, start + chunk_frames)
        labels[part] = vote(view_labels[:, part], priority)
    return {"labels": labels, "probs": None}
