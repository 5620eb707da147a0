"""Files of a VSPW-layout dataset, without torch: the layout, PNG / JPEG decoding with checks,
the label shift, class names, palette PNGs, video files and frame folders, atomic writes.

evaluate.py needs only this module, so scoring predictions costs no torch import (~1.5 s, ~250 MB).

- Layout ``ROOT/{train,val,test}.txt`` (one video per line) and
  ``ROOT/data/<video>/{origin/*.jpg, mask/*.png}``, frames sorted by file name (file numbers need
  not start at 1).
- Label shift (VSPW README recipe; DVIS_Plus ``dvis_Plus/data_video/dataset_mapper_vss.py``
  ``_vspw_preprocess``): raw 0 ("others") and raw 255 ("void") -> ignore 255, raw k+1 -> train
  id k.
- Mask decoding. A palette PNG ("P") gives its indices (the id is the index: how VSPW/CamVid masks
  and our predictions are stored); a grey PNG its values; a 3/4-channel PNG its red channel, which
  is what DVIS++ does (reads RGB, takes channel 0).
- Files are written atomically (``atomic_path``) with the usual permissions.
"""

from __future__ import annotations

from contextlib import contextmanager
import io
import json
import os
from pathlib import Path
import re
import secrets
import struct
from typing import Iterator, NamedTuple, Sequence
import zlib

import cv2
import numpy as np
from PIL import Image

IGNORE = 255  # ignore / void train id, and label padding
IMAGE_EXTS = (".jpg", ".jpeg", ".png")
VIDEO_EXTS = (".mp4", ".avi", ".mov", ".mkv", ".webm", ".m4v")
_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
_JPEG_START, _JPEG_END = b"\xff\xd8", b"\xff\xd9"  # SOI / EOI markers
_JPEG_TAIL = 1024  # EOI must be among the last bytes (some writers pad or append a short trailer)

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
    if not data:
        raise ValueError(f"{what} {path} is an empty file")
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


def _plain_png_pixels(data: bytes) -> np.ndarray | None:
    """The pixels of an 8-bit grey or palette PNG whose rows are all stored unfiltered (the way
    PIL writes palette label maps) as an (H,W) uint8 view of the stored values (palette indices
    for a palette PNG), strided (each row follows its filter-type byte) and read-only; None for
    any other or any broken file (see ``decode_plain_png``)."""
    if not data.startswith(_PNG_SIGNATURE):
        return None
    view, pos, header, idat = memoryview(data), len(_PNG_SIGNATURE), None, []
    while True:
        if pos + 12 > len(data):
            return None  # no IEND: truncated
        length, kind = struct.unpack_from(">I4s", data, pos)
        end = pos + 12 + length
        if end > len(data) or zlib.crc32(view[pos + 4 : end - 4]) != struct.unpack_from(">I", data, end - 4)[0]:
            return None
        body = view[pos + 8 : end - 4]
        if kind == b"IHDR" and length == 13:
            header = struct.unpack(">IIBBBBB", body)  # width, height, depth, colour, compression, filter, interlace
        elif kind == b"IDAT":
            idat.append(body)
        elif kind == b"tRNS" and header is not None and header[3] == 0:
            return None  # grey with a transparent value: decoders may add an alpha channel
        elif kind == b"IEND":
            break
        pos = end
    if header is None or header[3] not in (0, 3) or header[2] != 8 or any(header[4:]):
        return None
    width, height = header[:2]
    stream = b"".join(idat)  # a zlib stream: 2 header bytes, raw deflate, Adler-32 of the output
    if len(stream) < 6 or stream[0] & 0x0F != 8 or stream[1] & 0x20 or (stream[0] << 8 | stream[1]) % 31:
        return None
    size = height * (width + 1)
    try:
        raw = zlib.decompress(stream[2:-4], -15, size)  # raw deflate: the Adler-32 is not recomputed
    except zlib.error:
        return None
    if len(raw) != size:
        return None
    rows = np.frombuffer(raw, np.uint8).reshape(height, width + 1)  # a filter-type byte, then the row
    if rows[:, 0].any():
        return None
    return rows[:, 1:]


def decode_plain_png(data: bytes) -> np.ndarray | None:
    """Decode an 8-bit grey or palette PNG whose rows are all stored unfiltered, the way PIL
    writes palette label maps, into (H,W) uint8 stored values (palette indices for a palette PNG).

    Such a file needs only inflate: no per-row filter to undo. The chunk CRCs are checked, which
    covers the compressed bytes, but not the zlib stream's Adler-32 of the output, which costs
    more than the inflate itself with the zlib Python ships (libpng has the same option,
    PNG_IGNORE_ADLER32): 2-3x faster than PIL or libpng. Returns None for anything else (another
    bit depth or colour type, interlacing, a grey PNG with transparency, a filtered row) and for
    anything broken (truncation, bad CRC, corrupt data): decode those with
    ``decode_png``, which also words the errors.
    """
    pixels = _plain_png_pixels(data)
    return None if pixels is None else np.ascontiguousarray(pixels)


def _file_bytes(path: Path, what: str) -> bytes:
    """The bytes of a file; a missing one named as ``what``."""
    try:
        return path.read_bytes()
    except FileNotFoundError:
        raise FileNotFoundError(f"{what} not found: {path}") from None


def read_shifted_label(path: str | os.PathLike) -> np.ndarray:
    """``shift_labels(read_label_png(path))``: (H,W) uint8 train ids (raw 0 and 255 -> 255, k+1 ->
    k), with ``decode_plain_png`` as the fast path (evaluate.py reads every GT frame this way)."""
    path = Path(path)
    raw = _plain_png_pixels(_file_bytes(path, "label PNG"))
    if raw is None:
        return shift_labels(read_label_png(path))
    # two passes that also make the strided pixels contiguous: 255 -> 0, then - 1 with wrap-around
    ids = cv2.threshold(raw, 254, 0, cv2.THRESH_TOZERO_INV)[1]  # (H,W)
    np.subtract(ids, np.uint8(1), out=ids)
    return ids


def read_png(path: str | os.PathLike, what: str = "PNG") -> np.ndarray:
    """A PNG file decoded by ``decode_plain_png`` when it is a plain one, else by ``decode_png``
    (read once, decoded from its bytes).

    Raises:
        FileNotFoundError: missing file. ValueError: corrupt, truncated or not an image.
    """
    path = Path(path)
    data = _file_bytes(path, what)
    plain = decode_plain_png(data)
    return plain if plain is not None else decode_png(data, path, what)


def read_label_png(path: str | os.PathLike) -> np.ndarray:
    """Read a label PNG as (H,W) uint8 values (raw, not shifted).

    Palette PNGs give their indices, grey PNGs their values, a colour PNG its red channel (DVIS++
    reads RGB and takes channel 0); see ``decode_png``.

    Raises:
        FileNotFoundError: missing file. ValueError: unreadable, corrupt or not 8-bit.
    """
    arr = read_png(path, "label PNG")
    if arr.ndim == 3:
        arr = arr[:, :, 0] if arr.shape[2] == 1 else arr[:, :, 2]  # cv2 gives BGR(A): index 2 is red
    if arr.dtype != np.uint8:
        raise ValueError(f"label PNG {path} has dtype {arr.dtype}; expected 8-bit values")
    if arr.ndim != 2:
        raise ValueError(f"label PNG {path} has shape {arr.shape}; expected (H, W)")
    return arr if arr.flags.writeable and arr.flags.c_contiguous else np.array(arr)


def read_prediction_png(path: str | os.PathLike) -> np.ndarray:
    """Read a prediction PNG as (H,W) integer class ids.

    Palette PNGs give their indices through PIL (cv2 would expand them to colours); grey 8/16-bit
    PNGs are decoded by cv2. Colour images are refused: their values are not class ids. The
    array may be read-only (a palette PNG's, to save a copy).

    Raises:
        FileNotFoundError: missing file. ValueError: corrupt file or not a single-channel image.
    """
    arr = read_png(path, "prediction PNG")
    if arr.ndim == 3 and arr.shape[2] == 1:
        arr = arr[:, :, 0]
    if arr.ndim != 2:
        raise ValueError(
            f"{path}: prediction has shape {arr.shape}; write class ids as a single-channel (grey or palette) PNG"
        )
    return arr


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


def remove_stale_temporaries(folder: str | os.PathLike, names: Sequence[str], suffix: str = ".tmp") -> list[Path]:
    """Delete the temporary files ``atomic_path`` left beside ``folder/name`` when its process was
    killed mid-write (SIGKILL, power loss; as large as the file they were to replace). Call it
    only where no other process writes these files.

    Returns:
        The removed paths.
    """
    folder = Path(folder)
    removed = []
    for name in names:
        pattern = re.compile(rf"\.{re.escape(name)}\.[0-9a-f]{{8}}{re.escape(suffix)}")
        for path in folder.glob(f".{name}.*{suffix}") if folder.is_dir() else []:
            if pattern.fullmatch(path.name) and path.is_file():
                path.unlink()
                removed.append(path)
    return removed


def json_safe(x):
    """Plain JSON values, recursively: numpy scalars as numbers, tuples as lists, keys as strings,
    NaN/inf (e.g. VC16 of videos shorter than 17 frames) as null, since strict JSON has none."""
    if isinstance(x, dict):
        return {str(k): json_safe(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [json_safe(v) for v in x]
    if isinstance(x, (np.floating, np.integer, np.bool_)):
        x = x.item()
    if isinstance(x, float) and not np.isfinite(x):
        return None
    return x


def write_json_atomic(path: str | os.PathLike, obj, indent: int | None = 1) -> None:
    """Write ``json_safe(obj)`` as strict JSON through a temp file + os.replace, so readers never
    see half a file."""
    with atomic_path(path) as tmp, open(tmp, "w", encoding="utf-8") as f:
        json.dump(json_safe(obj), f, indent=indent, allow_nan=False)


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
    """Read an image as (H,W,3) uint8 RGB, refusing broken files.

    A JPEG cut short (an interrupted copy or extraction) is refused: ``cv2.imread`` would return it
    with the missing part grey and only print a libjpeg warning. It is recognised by its missing
    end-of-image marker (FF D9 among its last bytes; inside the entropy-coded data an FF byte is
    always followed by 00 or a restart marker, so the marker cannot appear there by chance), and
    such a file does not decode from its bytes either.

    Raises:
        FileNotFoundError: missing file. ValueError: empty, truncated, corrupt or unsupported.
    """
    path = Path(path)
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise FileNotFoundError(f"frame not found: {path}") from None
    except IsADirectoryError:
        raise ValueError(f"frame {path} is a folder, not an image") from None
    if not data:
        raise ValueError(f"frame {path} is an empty file")
    if data[:2] == _JPEG_START and _JPEG_END not in data[-_JPEG_TAIL:]:
        raise ValueError(f"frame {path} is a truncated JPEG (no end-of-image marker): re-extract or remove it")
    img = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR)
    if img is None:
        raise ValueError(f"cannot read image {path} (corrupt, truncated or unsupported format)")
    return cv2.cvtColor(img, cv2.COLOR_BGR2RGB)


def paired_frames(video_dir: Path) -> tuple[list[Path], list[Path]]:
    """(frames, masks) of a video, paired by file stem; frames without a mask are dropped."""
    frames = list_frames(video_dir, "origin")
    masks = list_frames(video_dir, "mask")
    by_stem = {p.stem: p for p in frames}
    orphans = [m.name for m in masks if m.stem not in by_stem]
    if orphans:
        raise ValueError(f"{video_dir / 'mask'}: masks without a frame in origin/: {orphans[:5]}")
    return [by_stem[m.stem] for m in masks], masks


def check_label_range(label: np.ndarray, num_classes: int, path: str | os.PathLike) -> None:
    """Raise ValueError naming ``path``, the ids and their pixel count when a shifted label holds
    ids >= num_classes (other than 255): the data has more classes than the model or the metric
    is set up for, and those pixels must not be dropped silently."""
    bad = (label >= num_classes) & (label != IGNORE)
    if bad.any():
        values, counts = np.unique(label[bad], return_counts=True)
        raise ValueError(
            f"{path}: train ids {values[:10].tolist()} (raw values {[int(v) + 1 for v in values[:10]]}) are out of "
            f"range for {num_classes} classes ({int(counts.sum())} pixels); check --num-classes / classes.json"
        )


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
