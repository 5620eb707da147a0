"""VSPW data: layout, label shift, clip sampling, clip transforms, per-class clip targets,
video files / frame folders, palette PNGs.

Implements (``reference/dvis_plus.md`` sections 1 and 5, ``reference/vspw_metrics.md`` section 1):
- Layout ``ROOT/{train,val,test}.txt`` (one video per line) and
  ``ROOT/data/<video>/{origin/*.jpg, mask/*.png}``, frames sorted by file name (file numbers need
  not start at 1).
- Label shift (VSPW README recipe, DVIS++ ``_vspw_preprocess``): raw 0 ("others") and raw 255
  ("void") -> ignore 255, raw k+1 -> train id k.
- Mask decoding. A palette PNG ("P") gives its indices (the id is the index: how VSPW/CamVid masks
  and our predictions are stored); a grey PNG its values; a 3/4-channel PNG its red channel, which
  is what DVIS++ does (reads RGB, takes channel 0).
- Clip sampling (DVIS++ ``VSSMAP.select_frames`` with ``2*RANGE+1 == NUM``): T consecutive
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

torch is imported only by the functions that make tensors and by ``VSPWDataset`` (made on first
access, see ``__getattr__``), so the layout / PNG functions cost no torch import (evaluate.py).
Files are written atomically (``atomic_path``) with the usual permissions.
"""

from __future__ import annotations

import io
import json
import os
import secrets
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Iterator, NamedTuple, Sequence

import cv2
import numpy as np
from PIL import Image

from vss.config import DataConfig

if TYPE_CHECKING:  # torch is imported inside the functions that need it (see ``__getattr__`` below)
    import torch

IGNORE = 255  # ignore / void train id, and label padding
IMAGE_EXTS = (".jpg", ".jpeg", ".png")
VIDEO_EXTS = (".mp4", ".avi", ".mov", ".mkv", ".webm", ".m4v")
_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"

# --------------------------------------------------------------------------------------------
# VSPW layout
# --------------------------------------------------------------------------------------------


def read_split(root: str | os.PathLike, split: str) -> list[str]:
    """Video names of ``ROOT/<split>.txt``, one per line.

    Unlike the official ``line[:-1]`` this keeps the last name whole when the file has no final
    newline; blank lines and surrounding spaces are dropped.

    Args:
        root: dataset root.
        split: split name, e.g. "train", "val", "test".
    Returns:
        The video names in file order.
    Raises:
        FileNotFoundError: the split file is missing. ValueError: it lists no video.
    """
    path = Path(root) / f"{split}.txt"
    if not path.is_file():
        raise FileNotFoundError(f"split file not found: {path}")
    names = [line.strip() for line in path.read_text(encoding="utf-8").splitlines()]
    names = [n for n in names if n]
    if not names:
        raise ValueError(f"split file {path} lists no video")
    return names


def list_frames(video_dir: str | os.PathLike, kind: str = "origin") -> list[Path]:
    """Files of ``video_dir/kind`` sorted by name: images (jpg/jpeg/png) for "origin", png for
    "mask".

    Raises:
        FileNotFoundError: the folder is missing. ValueError: it holds no such file.
    """
    if kind not in ("origin", "mask"):
        raise ValueError(f"kind must be 'origin' or 'mask', got {kind!r}")
    folder = Path(video_dir) / kind
    if not folder.is_dir():
        raise FileNotFoundError(f"frame folder not found: {folder}")
    exts = IMAGE_EXTS if kind == "origin" else (".png",)
    files = sorted(p for p in folder.iterdir() if p.suffix.lower() in exts and p.is_file())
    if not files:
        raise ValueError(f"no {'/'.join(e[1:] for e in exts)} file in {folder}")
    return files


def _png_color_type(data: bytes) -> int | None:
    """PNG colour type from the IHDR chunk (3 = palette), None when not a PNG."""
    if len(data) < 26 or not data.startswith(_PNG_SIGNATURE):
        return None
    return data[25]


def decode_png(data: bytes, path: str | os.PathLike, what: str = "PNG") -> np.ndarray:
    """Decode the bytes of a label / prediction PNG into its stored values.

    A palette PNG gives its indices through PIL (cv2 would expand them to colours); any other
    image what ``cv2.imdecode(IMREAD_UNCHANGED)`` gives: (H,W) grey values (8 or 16 bit) or
    (H,W,3|4) BGR(A). The bytes are decoded where they are, the file is not read again.

    Args:
        data: the file's bytes.
        path: the file, named in error messages.
        what: what the file is, for error messages (e.g. "label PNG").
    Returns:
        The decoded array; read-only for a palette PNG (PIL's pixel bytes wrapped without
        another copy).
    Raises:
        ValueError: corrupt, truncated or not an image.
    """
    if _png_color_type(data) == 3:
        try:
            with Image.open(io.BytesIO(data), formats=("PNG",)) as im:
                return np.asarray(im)  # (H,W) palette indices
        except Exception as e:  # PIL raises many types for broken files
            raise ValueError(f"cannot read {what} {path}: {e}") from None
    arr = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_UNCHANGED)
    if arr is None:
        raise ValueError(f"cannot read {what} {path}: not a readable image (corrupt or empty?)")
    return arr


def read_label_png(path: str | os.PathLike) -> np.ndarray:
    """Read a label PNG as (H,W) uint8 values (raw, not shifted).

    Palette PNGs give their indices, grey PNGs their values, a colour PNG its red channel (DVIS++
    reads RGB and takes channel 0); see ``decode_png``.

    Raises:
        FileNotFoundError: missing file. ValueError: unreadable, corrupt or not 8-bit.
    """
    path = Path(path)
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise FileNotFoundError(f"label file not found: {path}") from None
    arr = decode_png(data, path, "label PNG")
    if arr.ndim == 3:
        arr = arr[:, :, 0] if arr.shape[2] == 1 else arr[:, :, 2]  # cv2 gives BGR(A): index 2 is red
    if arr.dtype != np.uint8:
        raise ValueError(f"label PNG {path} has dtype {arr.dtype}; expected 8-bit values")
    if arr.ndim != 2:
        raise ValueError(f"label PNG {path} has shape {arr.shape}; expected (H, W)")
    return arr if arr.flags.writeable and arr.flags.c_contiguous else np.array(arr)


def shift_labels(raw: np.ndarray) -> np.ndarray:
    """Raw VSPW values -> train ids: 0 and 255 -> 255 (ignore), k+1 -> k.

    Args:
        raw: uint8 array of any shape (raw mask values 0..255).
    Returns:
        uint8 array of the same shape.
    """
    raw = np.asarray(raw)
    if raw.dtype != np.uint8:
        raise ValueError(f"shift_labels expects uint8 raw values, got {raw.dtype}")
    # uint8 wrap-around does the recipe in one step (0 - 1 = 255) except for raw 255, which
    # becomes 254 and gets its last bit set back: three cheap passes, no masked assignment.
    out = raw - np.uint8(1)
    out |= (raw == 255).view(np.uint8)
    return out


def default_palette(num_classes: int) -> np.ndarray:
    """(K,3) uint8 colours, the PASCAL VOC bit-interleaving scheme shifted by one so class 0 is
    not black; deterministic and distinct for K <= 255."""
    pal = np.zeros((num_classes, 3), np.uint8)
    for k in range(num_classes):
        c, r, g, b = k + 1, 0, 0, 0
        for j in range(8):
            r |= ((c >> 0) & 1) << (7 - j)
            g |= ((c >> 1) & 1) << (7 - j)
            b |= ((c >> 2) & 1) << (7 - j)
            c >>= 3
        pal[k] = (r, g, b)
    return pal


def load_class_names(root: str | os.PathLike | None = None) -> tuple[list[str], np.ndarray | None]:
    """Class names and palette of a dataset.

    ``ROOT/classes.json`` (keys ``classes``, optional ``palette``) when present, else the 124
    VSPW classes packaged as ``vss/vspw_classes.json`` with ``default_palette``.

    Returns:
        (names, palette (K,3) uint8 or None when the dataset file gives no palette).
    Raises:
        ValueError: a malformed classes.json.
    """
    path = Path(root) / "classes.json" if root is not None else None
    if path is None or not path.is_file():
        pkg = Path(__file__).resolve().parent / "vspw_classes.json"
        names = json.loads(pkg.read_text(encoding="utf-8"))["classes"]
        return list(names), default_palette(len(names))
    try:
        d = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise ValueError(f"{path} is not valid JSON: {e}") from None
    names = d.get("classes") if isinstance(d, dict) else None
    if not isinstance(names, list) or not names or not all(isinstance(n, str) for n in names):
        raise ValueError(f"{path}: 'classes' must be a non-empty list of names")
    if len(names) > 255:
        raise ValueError(f"{path}: {len(names)} classes; at most 255 fit uint8 labels with ignore 255")
    palette = d.get("palette")
    if palette is None:
        return names, None
    pal = np.asarray(palette)
    if pal.shape != (len(names), 3) or pal.min() < 0 or pal.max() > 255:
        raise ValueError(f"{path}: 'palette' must be {len(names)} RGB triples in 0..255, got shape {pal.shape}")
    return names, pal.astype(np.uint8)


@contextmanager
def atomic_path(path: str | os.PathLike, suffix: str = ".tmp") -> Iterator[Path]:
    """Write a file atomically: yield a temporary path beside ``path`` to write to, and put it
    under the real name with ``os.replace`` when the block ends without error (else remove it).
    Readers never see half a file, and an interrupted write leaves the previous file intact.

    The temporary file is created like any new file (mode 0o666 minus the umask), so the result
    gets the usual permissions (``tempfile.mkstemp`` would make it 0600).

    Args:
        path: the final file; its folder is created if needed.
        suffix: end of the temporary name, for writers that pick the format from it (a video
            writer needs ".mp4"); the name is hidden (leading dot) and unique.
    Yields:
        The temporary path (an empty file).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    while True:
        tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}{suffix}")
        try:
            os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
            break
        except FileExistsError:  # another writer's temporary file: draw another name
            continue
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        if tmp.exists():  # the block failed (BaseException too: Ctrl-C mid-write)
            tmp.unlink()


def write_label_png(path: str | os.PathLike, label: np.ndarray, palette: np.ndarray | None = None) -> None:
    """Write class ids as a palette PNG (the pixel index is the id), atomically.

    Args:
        path: output file; parent folders are created.
        label: (H,W) integer ids 0..255 (255 = ignore/void is allowed).
        palette: (K,3) uint8 colours for ids 0..K-1; ``default_palette(256)`` when None.
    """
    path = Path(path)
    label = np.asarray(label)
    if label.ndim != 2:
        raise ValueError(f"label for {path} must be (H, W), got shape {label.shape}")
    if label.size and (label.min() < 0 or label.max() > 255):
        raise ValueError(f"label for {path} has values outside 0..255")
    im = Image.fromarray(label.astype(np.uint8), mode="P")
    pal = np.zeros((256, 3), np.uint8)
    pal[:] = default_palette(256)
    if palette is not None:
        palette = np.asarray(palette, np.uint8).reshape(-1, 3)[:256]
        pal[: len(palette)] = palette
    pal[IGNORE] = 255  # void shows white
    im.putpalette(pal.reshape(-1).tolist())
    with atomic_path(path) as tmp:
        im.save(tmp, format="PNG")


def read_frame(path: str | os.PathLike) -> np.ndarray:
    """Read an image as (H,W,3) uint8 RGB.

    Raises:
        FileNotFoundError: missing file. ValueError: unreadable/corrupt image.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"frame not found: {path}")
    img = cv2.imread(str(path), cv2.IMREAD_COLOR)
    if img is None:
        raise ValueError(f"cannot read image {path} (corrupt, empty or unsupported format)")
    return cv2.cvtColor(img, cv2.COLOR_BGR2RGB)


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
    import torch

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
    length: int, num_frames: int, rng: np.random.Generator, pad_order: str = "sorted"
) -> list[int]:
    """Frame indices of one training clip (see the module docstring for the rule).

    Args:
        length: number of frames L of the video (>= 1).
        num_frames: clip length T (>= 1).
        rng: the per-item generator.
        pad_order: for L < T, "sorted" (temporal order, repeats adjacent) or "append"
            (0..L-1 then the extra draws, as the released DVIS++ code).
    Returns:
        T indices in 0..L-1.
    """
    if length < 1 or num_frames < 1:
        raise ValueError(f"need length >= 1 and num_frames >= 1, got {length}, {num_frames}")
    if pad_order not in ("sorted", "append"):
        raise ValueError(f"pad_order must be 'sorted' or 'append', got {pad_order!r}")
    if length >= num_frames:
        start = int(rng.integers(0, length - num_frames + 1))
        return list(range(start, start + num_frames))
    extra = rng.integers(0, length, size=num_frames - length).tolist()
    idx = list(range(length)) + [int(e) for e in extra]
    return sorted(idx) if pad_order == "sorted" else idx


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
    rng: np.random.Generator, image_size: tuple[int, int], cfg: DataConfig, augment: bool = True
) -> ClipTransform:
    """Draw the per-clip transform.

    Args:
        rng: the per-item generator.
        image_size: (H, W) of the clip's frames.
        cfg: base_size, min_scale, max_scale, crop_size, color_jitter.
        augment: False gives the identity (no rescale, crop, flip or jitter).
    Returns:
        The transform; the output of ``apply_clip_transform`` is ``crop_size`` (or the rescaled
        size when ``cfg.crop_size`` is empty/None).
    """
    h, w = image_size
    if not augment:
        return ClipTransform(size=(h, w), crop=(0, 0, h, w))
    scale = cfg.base_size * rng.uniform(cfg.min_scale, cfg.max_scale) / min(h, w)
    nh, nw = max(1, round(h * scale)), max(1, round(w * scale))
    if cfg.crop_size:
        ch, cw = cfg.crop_size
        y0 = int(rng.integers(0, max(nh - ch, 0) + 1))
        x0 = int(rng.integers(0, max(nw - cw, 0) + 1))
    else:
        ch, cw, y0, x0 = nh, nw, 0, 0
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
    import torch

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
    import torch

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
    import torch

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
    import torch

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


def _paired_frames(video_dir: Path) -> tuple[list[Path], list[Path]]:
    """(frames, masks) of a video, paired by file stem; frames without a mask are dropped."""
    frames = list_frames(video_dir, "origin")
    masks = list_frames(video_dir, "mask")
    by_stem = {p.stem: p for p in frames}
    orphans = [m.name for m in masks if m.stem not in by_stem]
    if orphans:
        raise ValueError(f"{video_dir / 'mask'}: masks without a frame in origin/: {orphans[:5]}")
    return [by_stem[m.stem] for m in masks], masks


def check_label_range(label: np.ndarray, num_classes: int, path: str | os.PathLike) -> None:
    """Raise ValueError naming ``path`` when a shifted label holds ids >= num_classes (other than 255)."""
    bad = (label >= num_classes) & (label != IGNORE)
    if bad.any():
        values = np.unique(label[bad]).tolist()
        raise ValueError(
            f"{path}: train ids {values[:10]} (raw values {[v + 1 for v in values[:10]]}) are out of range "
            f"for {num_classes} classes"
        )


# The body of ``VSPWDataset``, which ``__getattr__`` below makes with torch's Dataset as second base.
class _VSPWClips:
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
        self.pad_order = pad_order
        self.num_classes = num_classes if num_classes is not None else len(load_class_names(self.root)[0])
        self.videos: list[tuple[str, list[Path], list[Path]]] = []
        for name in read_split(self.root, split):
            frames, masks = _paired_frames(self.root / "data" / name)
            self.videos.append((name, frames, masks))
        self.length = int(length) if length is not None else len(self.videos)

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, i: int) -> dict:
        import torch

        seed = int(torch.randint(0, 2**62, ()).item())
        return self.load_clip(i, np.random.default_rng(seed))

    def load_clip(self, i: int, rng: np.random.Generator) -> dict:
        """The clip of item i drawn with ``rng`` (deterministic given the generator)."""
        name, frame_paths, mask_paths = self.videos[i % len(self.videos)]
        idx = sample_clip_indices(len(frame_paths), self.num_frames, rng, self.pad_order)
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
        tf = sample_clip_transform(rng, frames[0].shape[:2], self.cfg, self.augment)
        x, y = apply_clip_transform(np.stack(frames), np.stack(labels), tf, self.cfg)
        return {
            "frames": x,  # (T,3,H,W)
            "labels": y,  # (T,H,W)
            "video": name,
            "frame_names": [frame_paths[k].stem for k in idx],
            "frame_idx": list(idx),
        }


def __getattr__(name: str):
    """``vss.data.VSPWDataset``: ``_VSPWClips`` with ``torch.utils.data.Dataset`` as second base.

    PEP 562 module attribute, made on first access, because its base class needs torch: the
    layout and PNG functions of this module (all evaluate.py uses) must not cost a torch import
    (~1.5 s, ~250 MB). Made once; ``from vss.data import VSPWDataset`` and pickling (DataLoader
    workers) work as for a plain class.
    """
    if name == "VSPWDataset":
        import torch.utils.data

        cls = type("VSPWDataset", (_VSPWClips, torch.utils.data.Dataset),
                   {"__module__": __name__, "__doc__": _VSPWClips.__doc__})
        globals()[name] = cls
        return cls
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


class EvalVideo(NamedTuple):
    """A video for inference / evaluation: all its frames in order, and, when the video has a
    mask folder, the mask path with the same stem for each frame (None where a frame has none)."""

    name: str
    frames: list[Path]
    masks: list[Path | None] | None


def iter_eval_videos(root: str | os.PathLike, split: str) -> Iterator[EvalVideo]:
    """Videos of ``ROOT/<split>.txt`` for inference/evaluation (test splits have no masks).

    Yields:
        EvalVideo(name, frame paths sorted, aligned mask paths or None).
    """
    root = Path(root)
    for name in read_split(root, split):
        video_dir = root / "data" / name
        frames = list_frames(video_dir, "origin")
        masks = None
        if (video_dir / "mask").is_dir():
            by_stem = {p.stem: p for p in list_frames(video_dir, "mask")}
            masks = [by_stem.get(f.stem) for f in frames]
        yield EvalVideo(name, frames, masks)


# --------------------------------------------------------------------------------------------
# Video files and frame folders
# --------------------------------------------------------------------------------------------

DEFAULT_FPS = 15.0  # VSPW frames were extracted at 15 fps


def read_video(path: str | os.PathLike) -> tuple[list[np.ndarray], list[str], float]:
    """Frames of a video file (cv2.VideoCapture) or of a folder of images (sorted by name; a
    VSPW video folder's ``origin/`` is used when present).

    Returns:
        (frames: list of (H,W,3) uint8 RGB, names: frame stems (``%05d`` indices for a file),
        fps: from the file, else 15.0).
    Raises:
        FileNotFoundError: missing path. ValueError: a file that cannot be opened or gives no
        frame, an empty folder, or frames of different sizes.
    """
    path = Path(path)
    if path.is_dir():
        folder = path / "origin" if (path / "origin").is_dir() else path
        files = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_EXTS and p.is_file())
        if not files:
            raise ValueError(f"no jpg/jpeg/png frame in {folder}")
        frames = [read_frame(p) for p in files]
        if len({f.shape for f in frames}) != 1:
            raise ValueError(f"frames in {folder} differ in size")
        return frames, [p.stem for p in files], DEFAULT_FPS
    if not path.is_file():
        raise FileNotFoundError(f"video not found: {path}")
    cap = cv2.VideoCapture(str(path))
    try:
        if not cap.isOpened():
            raise ValueError(f"cannot open video {path} (corrupt or unsupported codec?)")
        fps = float(cap.get(cv2.CAP_PROP_FPS)) or DEFAULT_FPS
        frames = []
        while True:
            ok, img = cap.read()
            if not ok:
                break
            frames.append(cv2.cvtColor(img, cv2.COLOR_BGR2RGB))
    finally:
        cap.release()
    if not frames:
        raise ValueError(f"video {path} yields no frame (corrupt or unsupported codec?)")
    if not (0 < fps < 1000):
        fps = DEFAULT_FPS
    return frames, [f"{i:05d}" for i in range(len(frames))], fps


def write_video(path: str | os.PathLike, frames: Sequence[np.ndarray], fps: float = DEFAULT_FPS) -> None:
    """Write RGB frames as an mp4v video, atomically (temp file in the same folder + os.replace).

    Args:
        path: output file (parent folders are created).
        frames: (H,W,3) uint8 RGB frames of one size.
        fps: frames per second.
    """
    path = Path(path)
    if not frames:
        raise ValueError(f"no frame to write to {path}")
    h, w = frames[0].shape[:2]
    with atomic_path(path, suffix=path.suffix or ".mp4") as tmp:  # the writer picks the container from the name
        writer = cv2.VideoWriter(str(tmp), cv2.VideoWriter_fourcc(*"mp4v"), float(fps), (w, h))
        try:
            if not writer.isOpened():
                raise ValueError(f"cannot open a video writer for {path} (mp4v codec unavailable?)")
            for i, f in enumerate(frames):
                if f.shape != (h, w, 3) or f.dtype != np.uint8:
                    raise ValueError(f"frame {i} for {path} is {f.shape} {f.dtype}; expected ({h}, {w}, 3) uint8")
                writer.write(cv2.cvtColor(f, cv2.COLOR_RGB2BGR))
        finally:
            writer.release()
