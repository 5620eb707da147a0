"""VSPW training data: normalisation, clip sampling, clip transforms, per-class clip targets,
collation, and the training-clip dataset. The files themselves (layout, PNG/JPEG decoding,
label shift, class names, videos) are read by the torch-free ``vss.io``.

Implements (DVIS_Plus ``dvis_Plus/data_video/dataset_mapper_vss.py``, ``VSSMAP``):
- Clip sampling (``VSSMAP.select_frames`` with ``2*RANGE+1 == NUM``): T consecutive
  frames. Two readings of the released code are ours to fix (``sample_clip_indices``):
  the start is uniform over all ``L-T+1`` windows (the released ``randrange(L-T)`` never picks
  the last window), and a video shorter than T gives all its frames once plus ``T-L`` extra
  indices drawn uniformly with replacement, **sorted** so the clip stays in temporal order with
  some frames repeated (``pad_order="sorted"``, the evident intent: the released code calls
  ``sorted()`` and drops the result, so its clips are ``0..L-1`` followed by the unsorted extras,
  available as ``pad_order="append"``). Temporal reversal (stage 3 ``REVERSE_AGU``) comes after.
- One transform per clip, drawn once and applied to every frame (``VSSMAP``: the transform is
  drawn on the first frame and reused): short-side rescale to ``base_size * U(min_scale,
  max_scale)`` (DVIS++ picks the short side from a list, 480..800 step 32, capped at 1333 on
  the long side; a continuous range is the same idea), random crop of ``crop_size`` (padded
  with 0 / ignore where the frame is smaller),
  horizontal flip p=0.5, colour jitter (brightness, contrast, saturation; not in DVIS++'s VSPW
  configs, ``DataConfig.color_jitter = 0`` switches it off).
- VSS targets (``VSSMAP.__call__``): each class present anywhere in the clip is one target with
  a mask on every frame (empty where the class is absent in that frame).
"""

from __future__ import annotations

from dataclasses import dataclass
import os
from pathlib import Path
from typing import Sequence

import cv2
import numpy as np
import torch
import torch.utils.data

from vss.config import DataConfig
from vss.io import (
    check_label_range,
    IGNORE,
    load_class_names,
    paired_frames,
    read_frame,
    read_label_png,
    read_split,
    shift_labels,
)

# --------------------------------------------------------------------------------------------
# Normalisation
# --------------------------------------------------------------------------------------------


def normalize(frames: np.ndarray | torch.Tensor, cfg: DataConfig) -> torch.Tensor:
    """RGB frames in 0..255 (…,H,W,3) -> float32 (…,3,H,W) normalised with ``cfg.pixel_mean/std``.

    Args:
        frames: uint8 (or float in 0..255) numpy array or tensor, channels last.
        cfg: the data config giving pixel_mean / pixel_std (RGB, 0..255 scale).
    Returns:
        float32 tensor, channels moved before H, W.
    """
    x = torch.as_tensor(np.ascontiguousarray(frames) if isinstance(frames, np.ndarray) else frames)
    if x.ndim < 3 or x.shape[-1] != 3:
        raise ValueError(f"normalize expects (..., H, W, 3) RGB frames, got shape {tuple(x.shape)}")
    mean = torch.tensor(cfg.pixel_mean, dtype=torch.float32, device=x.device)
    std = torch.tensor(cfg.pixel_std, dtype=torch.float32, device=x.device)
    x = (x.float() - mean) / std  # (…,H,W,3)
    return x.movedim(-1, -3).contiguous()  # (…,3,H,W)


# --------------------------------------------------------------------------------------------
# Clip sampling and clip transforms
# --------------------------------------------------------------------------------------------


def sample_clip_indices(
    length: int, num_frames: int, rng: np.random.Generator, pad_order: str = "sorted", frame_range: int = 0
) -> list[int]:
    """Frame indices of one training clip (see the module docstring for the rule).

    Args:
        length: number of frames L of the video (>= 1).
        num_frames: clip length T (>= 1).
        rng: the per-item generator.
        pad_order: for L < T, "sorted" (temporal order, repeats adjacent) or "append"
            (0..L-1 then the extra draws, as the released DVIS++ code).
        frame_range: 0 for T consecutive frames; r > 0 for DVIS++'s reference rule (used when
            2 * SAMPLING_FRAME_RANGE + 1 != SAMPLING_FRAME_NUM, e.g. its CTVIS stage 1): a reference
            frame uniform over the video and T-1 frames drawn with replacement from the others
            within +-r of it (the whole window when it has no other frame), sorted.
    Returns:
        T indices in 0..L-1.
    """
    if length < 1 or num_frames < 1:
        raise ValueError(f"need length >= 1 and num_frames >= 1, got {length}, {num_frames}")
    if pad_order not in ("sorted", "append"):
        raise ValueError(f"pad_order must be 'sorted' or 'append', got {pad_order!r}")
    if frame_range > 0:
        ref = int(rng.integers(0, length))
        window = [i for i in range(max(0, ref - frame_range), min(length, ref + frame_range + 1)) if i != ref]
        others = rng.choice(window or [ref], size=num_frames - 1, replace=True).tolist()
        return sorted([ref] + [int(i) for i in others])
    if length >= num_frames:
        start = int(rng.integers(0, length - num_frames + 1))
        return list(range(start, start + num_frames))
    extra = rng.integers(0, length, size=num_frames - length).tolist()
    idx = list(range(length)) + [int(e) for e in extra]
    return sorted(idx) if pad_order == "sorted" else idx


def rescaled_size(height: int, width: int, short: float, max_size: int = 0) -> tuple[int, int]:
    """(h, w) with the short side at ``short`` and the long side at most ``max_size`` (0: no cap),
    aspect kept (detectron2 ``ResizeShortestEdge.get_output_shape``)."""
    scale = short / min(height, width)
    if max_size and max(height, width) * scale > max_size:
        scale = max_size / max(height, width)
    # int(x + 0.5) as detectron2 rounds (Python's round() goes to even at .5)
    return max(1, int(height * scale + 0.5)), max(1, int(width * scale + 0.5))


@dataclass(frozen=True)
class ClipTransform:
    """One draw of the training transform, applied identically to every frame of a clip."""

    size: tuple[int, int]  # (h, w) after the short-side rescale
    crop: tuple[int, int, int, int]  # (y0, x0, ch, cw): window in the rescaled frame; beyond it = padding
    flip: bool = False  # mirrors the cropped window
    brightness: float = 1.0
    contrast: float = 1.0
    saturation: float = 1.0


def sample_clip_transform(
    rng: np.random.Generator,
    image_size: tuple[int, int],
    cfg: DataConfig,
    augment: bool = True,
    crop: str = "fixed",
    crop_range: tuple[int, int] = (600, 720),
) -> ClipTransform:
    """Draw the per-clip transform.

    Args:
        rng: the per-item generator.
        image_size: (H, W) of the clip's frames.
        cfg: base_size, min_scale, max_scale (or short_sides), max_size, crop_size, color_jitter.
        augment: False gives the identity (no rescale, crop, flip or jitter).
        crop: "fixed" (a ``cfg.crop_size`` window, padded where the frame is smaller; none when
            ``crop_size`` is empty), "none" (the whole rescaled frame) or "range" (DVIS++'s
            absolute_range: height and width each uniform in [min(side, lo), min(side, hi)],
            inside the frame).
        crop_range: (lo, hi) of the "range" crop.
    Returns:
        The transform; ``apply_clip_transform`` gives frames of its crop size.
    """
    h, w = image_size
    if not augment:
        return ClipTransform(size=(h, w), crop=(0, 0, h, w))
    if cfg.short_sides:
        short = float(cfg.short_sides[int(rng.integers(len(cfg.short_sides)))])
    else:
        short = cfg.base_size * rng.uniform(cfg.min_scale, cfg.max_scale)
    nh, nw = rescaled_size(h, w, short, cfg.max_size)
    if crop == "fixed" and cfg.crop_size:
        ch, cw = cfg.crop_size
        y0 = int(rng.integers(0, max(nh - ch, 0) + 1))
        x0 = int(rng.integers(0, max(nw - cw, 0) + 1))
    elif crop == "range":
        lo, hi = crop_range
        ch = int(rng.integers(min(nh, lo), min(nh, hi) + 1))
        cw = int(rng.integers(min(nw, lo), min(nw, hi) + 1))
        y0, x0 = int(rng.integers(0, nh - ch + 1)), int(rng.integers(0, nw - cw + 1))
    elif crop in ("fixed", "none"):
        ch, cw, y0, x0 = nh, nw, 0, 0
    else:
        raise ValueError(f"crop must be 'fixed', 'none' or 'range', got {crop!r}")
    flip = bool(rng.random() < 0.5)
    j = cfg.color_jitter
    b, c, s = (float(rng.uniform(max(0.0, 1 - j), 1 + j)) for _ in range(3)) if j > 0 else (1.0, 1.0, 1.0)
    return ClipTransform(size=(nh, nw), crop=(y0, x0, ch, cw), flip=flip, brightness=b, contrast=c, saturation=s)


def _grey(x: np.ndarray) -> np.ndarray:
    return x[..., 0] * 0.299 + x[..., 1] * 0.587 + x[..., 2] * 0.114


def _color_jitter(x: np.ndarray, tf: ClipTransform) -> np.ndarray:
    """Brightness, contrast, saturation in this order (torchvision's formulas, clamped after
    each step); the contrast pivot is the mean grey of the whole clip so that every frame gets
    the same affine colour map."""
    x = np.clip(x * tf.brightness, 0, 255)
    if tf.contrast != 1.0:
        m = _grey(x).mean()
        x = np.clip((x - m) * tf.contrast + m, 0, 255)
    if tf.saturation != 1.0:
        g = _grey(x)[..., None]
        x = np.clip((x - g) * tf.saturation + g, 0, 255)
    return x


def apply_clip_transform(
    frames: np.ndarray, labels: np.ndarray | None, tf: ClipTransform, cfg: DataConfig
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Rescale (bilinear frames, nearest labels), crop, jitter, flip, normalise, pad a clip.

    The crop comes right after the rescale so the float work runs on crop-sized arrays (a
    21-frame clip rescaled x2 would otherwise need several 300 MB temporaries). The flip mirrors
    the cropped window, which gives the same distribution as cropping a flipped frame. Padding
    (when the rescaled frame is smaller than the crop) goes to the bottom/right: 0 for the
    normalised frames (= the mean colour), ignore 255 for labels.

    Args:
        frames: (T,H,W,3) uint8 RGB.
        labels: (T,H,W) uint8 train ids (255 = ignore) or None.
        tf: the clip's transform.
        cfg: normalisation constants.
    Returns:
        frames (T,3,ch,cw) float32 normalised, labels (T,ch,cw) int64 or None.
    """
    t, h, w, _ = frames.shape
    nh, nw = tf.size
    y0, x0, ch, cw = tf.crop
    if (nh, nw) != (h, w):
        frames = np.stack([cv2.resize(f, (nw, nh), interpolation=cv2.INTER_LINEAR) for f in frames])
        if labels is not None:
            # NEAREST_EXACT samples pixel centres like INTER_LINEAR; plain INTER_NEAREST is off by
            # up to half a source pixel, which tests/test_data.py detects as misaligned labels.
            labels = np.stack([cv2.resize(m, (nw, nh), interpolation=cv2.INTER_NEAREST_EXACT) for m in labels])
    x = frames[:, y0 : y0 + ch, x0 : x0 + cw]  # (T,rh,rw,3), smaller than (ch,cw) when padding is needed
    labels = labels[:, y0 : y0 + ch, x0 : x0 + cw] if labels is not None else None
    rh, rw = x.shape[1:3]
    if (tf.brightness, tf.contrast, tf.saturation) != (1.0, 1.0, 1.0):
        x = _color_jitter(x.astype(np.float32), tf)
    if tf.flip:
        x = x[:, :, ::-1]
        labels = labels[:, :, ::-1] if labels is not None else None
    out = torch.zeros(t, 3, ch, cw)  # (T,3,H,W)
    out[:, :, :rh, :rw] = normalize(x, cfg)
    if labels is None:
        return out, None
    lab = torch.full((t, ch, cw), IGNORE, dtype=torch.int64)  # (T,H,W)
    lab[:, :rh, :rw] = torch.from_numpy(np.ascontiguousarray(labels)).long()
    return out, lab


# --------------------------------------------------------------------------------------------
# Targets
# --------------------------------------------------------------------------------------------


def clip_targets(labels: torch.Tensor) -> dict[str, torch.Tensor]:
    """DVIS++ VSS targets: one per class present anywhere in the clip.

    Args:
        labels: (T,H,W) int64 train ids, 255 = ignore.
    Returns:
        {"labels": (M,) int64 class ids in increasing order, "masks": (M,T,H,W) bool}; a class's
        mask is ``labels == class`` on every frame (empty where the class is absent).
    """
    classes = torch.unique(labels)
    classes = classes[classes != IGNORE]  # (M,)
    masks = labels.unsqueeze(0) == classes.view(-1, 1, 1, 1)  # (M,T,H,W)
    return {"labels": classes.long(), "masks": masks}


def per_frame_targets(targets: dict[str, torch.Tensor], t: int) -> dict[str, torch.Tensor]:
    """Targets of frame t for per-image (stage-1) losses: the classes non-empty in frame t.

    Args:
        targets: {"labels": (M,), "masks": (M,T,H,W)} from ``clip_targets``.
        t: frame index.
    Returns:
        {"labels": (M_t,) int64, "masks": (M_t,H,W) bool}.
    """
    masks = targets["masks"][:, t]  # (M,H,W)
    keep = masks.flatten(1).any(1) if masks.shape[0] else torch.zeros(0, dtype=torch.bool)
    return {"labels": targets["labels"][keep], "masks": masks[keep]}


def collate_clips(batch: Sequence[dict], size_divisibility: int = 32) -> dict:
    """Pad clips to a common size and build per-clip targets from the padded labels.

    Args:
        batch: items of ``VSPWDataset``: frames (T,3,H,W) float, labels (T,H,W) int64, video,
            frame_names. All items must have the same T.
        size_divisibility: the padded H and W are the batch maxima rounded up to a multiple.
    Returns:
        {"frames": (B,T,3,H,W) float (pad 0), "labels": (B,T,H,W) int64 (pad 255),
        "targets": list of B {"labels": (M,), "masks": (M,T,H,W)}, "videos": list of B names,
        "frame_names": list of B lists of T names}.
    """
    if not batch:
        raise ValueError("collate_clips got an empty batch")
    ts = {item["frames"].shape[0] for item in batch}
    if len(ts) != 1:
        raise ValueError(f"clips of one batch must have the same number of frames, got {sorted(ts)}")
    d = max(1, size_divisibility)
    h = -(-max(item["frames"].shape[-2] for item in batch) // d) * d
    w = -(-max(item["frames"].shape[-1] for item in batch) // d) * d
    b, t = len(batch), ts.pop()
    frames = torch.zeros(b, t, 3, h, w)  # (B,T,3,H,W)
    labels = torch.full((b, t, h, w), IGNORE, dtype=torch.int64)  # (B,T,H,W)
    for i, item in enumerate(batch):
        fh, fw = item["frames"].shape[-2:]
        frames[i, :, :, :fh, :fw] = item["frames"]
        labels[i, :, :fh, :fw] = item["labels"]
    return {
        "frames": frames,
        "labels": labels,
        "targets": [clip_targets(labels[i]) for i in range(b)],
        "videos": [item["video"] for item in batch],
        "frame_names": [list(item["frame_names"]) for item in batch],
    }


# --------------------------------------------------------------------------------------------
# Dataset
# --------------------------------------------------------------------------------------------


class VSPWDataset(torch.utils.data.Dataset):
    """Training clips of a VSPW-layout dataset.

    ``len`` is the epoch size (``length``, default the number of videos); item i is a clip of
    video ``i % num_videos``. Each item draws its own generator seed from torch's global RNG, so
    sampling is reproducible given ``torch.manual_seed`` (and the DataLoader's per-worker seeds).
    Only frames that have a mask are used. Item: {"frames": (T,3,H,W) float32 normalised,
    "labels": (T,H,W) int64, "video": str, "frame_names": list of T stems, "frame_idx": list of T}.
    """

    def __init__(
        self,
        root: str | os.PathLike,
        split: str,
        *,
        num_frames: int = 1,
        cfg: DataConfig | None = None,
        augment: bool = True,
        reverse_prob: float = 0.0,
        frame_range: int = 0,
        crop: str = "fixed",
        crop_range: tuple[int, int] = (600, 720),
        num_classes: int | None = None,
        length: int | None = None,
        pad_order: str = "sorted",
    ) -> None:
        """
        Args:
            root: dataset root (``ROOT/<split>.txt``, ``ROOT/data/<video>/{origin,mask}``).
            split: split name.
            num_frames: clip length T.
            cfg: transform and normalisation settings (DataConfig() when None).
            augment: rescale/crop/flip/jitter (False: frames at their own size).
            reverse_prob: probability of reversing the clip in time (stage 3: 0.5).
            frame_range: the clip sampling rule, see ``sample_clip_indices``.
            crop, crop_range: the crop kind, see ``sample_clip_transform``.
            num_classes: K; default the length of ``load_class_names(root)``.
            length: epoch size; default the number of videos.
            pad_order: short-video padding order, see ``sample_clip_indices``.
        """
        self.root = Path(root)
        self.split = split
        self.num_frames = int(num_frames)
        if self.num_frames < 1:
            raise ValueError(f"num_frames must be >= 1, got {num_frames}")
        self.cfg = cfg if cfg is not None else DataConfig()
        self.augment = augment
        self.reverse_prob = float(reverse_prob)
        self.frame_range, self.crop, self.crop_range = int(frame_range), crop, tuple(crop_range)
        self.pad_order = pad_order
        self.num_classes = num_classes if num_classes is not None else len(load_class_names(self.root)[0])
        self.videos: list[tuple[str, list[Path], list[Path]]] = []
        for name in read_split(self.root, split):
            frames, masks = paired_frames(self.root / "data" / name)
            self.videos.append((name, frames, masks))
        self.length = int(length) if length is not None else len(self.videos)

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, i: int) -> dict:
        seed = int(torch.randint(0, 2**62, ()).item())
        return self.load_clip(i, np.random.default_rng(seed))

    def load_clip(self, i: int, rng: np.random.Generator) -> dict:
        """The clip of item i drawn with ``rng`` (deterministic given the generator)."""
        name, frame_paths, mask_paths = self.videos[i % len(self.videos)]
        idx = sample_clip_indices(len(frame_paths), self.num_frames, rng, self.pad_order, self.frame_range)
        if self.reverse_prob > 0 and rng.random() < self.reverse_prob:
            idx = idx[::-1]
        frames, labels = [], []
        for k in idx:
            img = read_frame(frame_paths[k])
            lab = shift_labels(read_label_png(mask_paths[k]))
            if lab.shape != img.shape[:2]:
                raise ValueError(f"{mask_paths[k]} is {lab.shape} but its frame {frame_paths[k]} is {img.shape[:2]}")
            check_label_range(lab, self.num_classes, mask_paths[k])
            frames.append(img)
            labels.append(lab)
        shapes = {f.shape for f in frames}
        if len(shapes) != 1:
            raise ValueError(f"frames of video {self.root / 'data' / name} differ in size: {sorted(shapes)}")
        tf = sample_clip_transform(rng, frames[0].shape[:2], self.cfg, self.augment, self.crop, self.crop_range)
        x, y = apply_clip_transform(np.stack(frames), np.stack(labels), tf, self.cfg)
        return {
            "frames": x,  # (T,3,H,W)
            "labels": y,  # (T,H,W)
            "video": name,
            "frame_names": [frame_paths[k].stem for k in idx],
            "frame_idx": list(idx),
        }
