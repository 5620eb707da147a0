"""Extra image datasets remapped to the target classes (PVUW 2024 1st place, sec. 3.1: "The COCO
and ADE20k dataset labels are mapped to the VSPW dataset through label remapping, and categories
that do not exist in the VSPW dataset are marked as 255").

Mapping file (JSON; one per source dataset / target class set)::

    {
      "description": "free text (optional)",
      "num_target_classes": 11,                 # K, required, 1..255
      "target_names": ["sky", "building", ...], # optional; if given, exactly K names
      "ignore": 255,                            # optional; must be 255 (vss's ignore label)
      "map": {"3": 0, "2": 1, "0": 255, ...},   # required: source value -> target train id
      "source_names": {"3": "sky", ...}         # optional, documentation only
    }

- Keys of ``map`` are the raw values stored in the source label PNGs (decimal strings "0".."255";
  e.g. ADE20K-150 annotations: 0 = other, k = class k). Values are target *train ids* 0..K-1
  (what the models predict; for a VSPW-layout target that is the raw mask value minus one), or
  255 to ignore that source class explicitly.
- Every source value not in ``map`` becomes 255 (ignored), so only the listed classes supervise.
- The file is checked strictly: unknown keys, duplicate keys, non-integer ids, a target id out of
  range (>= K and != 255), a ``num_target_classes`` different from the model's class count, or
  ``target_names`` of the wrong length raise ``ValueError`` naming the file and the entry.

Shipped in ``vss/remap_examples/`` (each file's description says what is mapped and why the rest
is ignored; the papers' own tables are not published): ``ade20k150_to_vspw124.json`` (114 of
ADE20K's 150 classes), ``coco133_to_vspw124.json`` (102 of COCO panoptic's 133, numbered as in
Mask2Former's semantic PNGs) and ``ade20k150_to_camvid11.json`` (ADE20K -> the 11 CamVid classes).

Dataset layout read by ``ImageFolderDataset`` (file stems pair an image with its label)::

    ROOT/images/<name>.jpg   (.jpeg / .png also accepted)
    ROOT/labels/<name>.png   raw source label values (palette index, grey value, or red channel)

ADE20K's ``ADEChallengeData2016`` is ``images/training`` + ``annotations/training``, COCO's
``train2017`` + ``panoptic_semseg_train2017``: pass them as ``image_dir`` and ``label_dir``
(``train.py --extra ROOT:MAPFILE`` recognises both layouts, ``vss.sampler.open_extra``). Items are
1-frame clips in the format of ``vss.data.VSPWDataset`` (same transforms and normalisation), so they
go through ``vss.data.collate_clips`` with T = 1 (stage-1 / per-image training).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import torch

from vss.config import DataConfig
from vss.data import apply_clip_transform, sample_clip_transform
from vss.io import IGNORE, IMAGE_EXTS, read_frame, read_label_png

_REQUIRED = ("num_target_classes", "map")
_OPTIONAL = ("description", "target_names", "ignore", "source_names")


def _no_duplicates(path: Path):
    def hook(pairs: list[tuple[str, object]]) -> dict:
        seen: dict = {}
        for k, v in pairs:
            if k in seen:
                raise ValueError(f"{path}: duplicate key {k!r}")
            seen[k] = v
        return seen

    return hook


def _is_int(x: object) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _source_id(path: Path, where: str, key: str) -> int:
    try:
        value = int(key)
    except ValueError:
        raise ValueError(f"{path}: {where} key {key!r} is not an integer source id") from None
    if not 0 <= value <= 255:
        raise ValueError(f"{path}: {where} key {key!r} is outside the 8-bit label range 0..255")
    return value


def load_label_map(path: str | os.PathLike, num_classes: int | None = None) -> np.ndarray:
    """Read and check a mapping file (format in the module docstring).

    Args:
        path: the JSON mapping file.
        num_classes: the model's K; must equal the file's ``num_target_classes`` (None: no check).
    Returns:
        (256,) uint8 look-up table: ``lut[source value] = target id`` (255 when unmapped).
    Raises:
        FileNotFoundError: missing file. ValueError: malformed file, naming the entry.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"label map file not found: {path}")
    try:
        spec = json.loads(path.read_text(encoding="utf-8"), object_pairs_hook=_no_duplicates(path))
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not valid JSON: {e}") from None
    if not isinstance(spec, dict):
        raise ValueError(f"{path}: the top level must be a JSON object")
    missing = [k for k in _REQUIRED if k not in spec]
    unknown = sorted(set(spec) - set(_REQUIRED) - set(_OPTIONAL))
    if missing or unknown:
        raise ValueError(f"{path}: missing keys {missing}, unknown keys {unknown}; allowed: {_REQUIRED + _OPTIONAL}")

    k = spec["num_target_classes"]
    if not _is_int(k) or not 1 <= k <= 255:
        raise ValueError(f"{path}: num_target_classes must be an integer in 1..255, got {k!r}")
    if num_classes is not None and k != num_classes:
        raise ValueError(f"{path}: num_target_classes is {k} but the model has {num_classes} classes")
    if spec.get("ignore", IGNORE) != IGNORE:
        raise ValueError(f"{path}: ignore must be {IGNORE} (the ignore label of vss), got {spec['ignore']!r}")
    names = spec.get("target_names")
    if names is not None and (
        not isinstance(names, list) or len(names) != k or not all(isinstance(n, str) for n in names)
    ):
        raise ValueError(f"{path}: target_names must be a list of {k} strings")
    source_names = spec.get("source_names", {})
    if not isinstance(source_names, dict):
        raise ValueError(f"{path}: source_names must be an object {{source id: name}}")
    for key, name in source_names.items():
        _source_id(path, "source_names", key)
        if not isinstance(name, str):
            raise ValueError(f"{path}: source_names[{key!r}] must be a string, got {name!r}")

    mapping = spec["map"]
    if not isinstance(mapping, dict) or not mapping:
        raise ValueError(f"{path}: map must be a non-empty object {{source id: target id}}")
    lut = np.full(256, IGNORE, dtype=np.uint8)
    seen: dict[int, str] = {}
    for key, target in mapping.items():
        src = _source_id(path, "map", key)
        if src in seen:
            raise ValueError(f"{path}: map keys {seen[src]!r} and {key!r} name the same source id {src}")
        seen[src] = key
        if not _is_int(target) or not (0 <= target < k or target == IGNORE):
            raise ValueError(f"{path}: map entry {key!r}: {target!r} is not a target id in 0..{k - 1} or {IGNORE}")
        lut[src] = target
    return lut


def remap(label: np.ndarray, lut: np.ndarray) -> np.ndarray:
    """Apply a look-up table from ``load_label_map``.

    Args:
        label: (H,W) uint8 raw source values.
        lut: (256,) uint8.
    Returns:
        (H,W) uint8 target train ids, 255 = ignore.
    """
    label = np.asarray(label)
    if label.dtype != np.uint8:
        raise ValueError(f"remap expects uint8 source labels, got {label.dtype}")
    if lut.shape != (256,) or lut.dtype != np.uint8:
        raise ValueError(f"lut must be (256,) uint8, got {lut.shape} {lut.dtype}")
    return lut[label]


class ImageFolderDataset(torch.utils.data.Dataset):
    """Images with remapped labels, as 1-frame clips in the ``VSPWDataset`` item format.

    Item: {"frames": (1,3,H,W) float32 normalised, "labels": (1,H,W) int64 (255 = ignore),
    "video": image stem, "frame_names": [stem], "frame_idx": [0]}. Each item draws its own
    generator seed from torch's global RNG, as ``VSPWDataset``.
    """

    def __init__(
        self,
        root: str | os.PathLike,
        map_file: str | os.PathLike,
        *,
        num_classes: int | None = None,
        cfg: DataConfig | None = None,
        augment: bool = True,
        image_dir: str = "images",
        label_dir: str = "labels",
        length: int | None = None,
    ) -> None:
        """
        Args:
            root: dataset root (layout in the module docstring).
            map_file: the JSON mapping file.
            num_classes: the model's K (checked against the map file; None: take the file's).
            cfg: transform and normalisation settings (DataConfig() when None).
            augment: rescale/crop/flip/jitter as VSPW training clips (False: original size).
            image_dir, label_dir: folders under ``root``.
            length: epoch size; default the number of labelled images.
        """
        self.root = Path(root)
        self.lut = load_label_map(map_file, num_classes)
        self.cfg = cfg if cfg is not None else DataConfig()
        self.augment = augment
        images_path, labels_path = self.root / image_dir, self.root / label_dir
        for folder in (images_path, labels_path):
            if not folder.is_dir():
                raise FileNotFoundError(f"folder not found: {folder}")
        images = {p.stem: p for p in images_path.iterdir() if p.suffix.lower() in IMAGE_EXTS and p.is_file()}
        labels = sorted(p for p in labels_path.iterdir() if p.suffix.lower() == ".png" and p.is_file())
        if not labels:
            raise ValueError(f"no png label in {labels_path}")
        orphans = [p.name for p in labels if p.stem not in images]
        if orphans:
            raise ValueError(f"{labels_path}: labels without an image in {images_path}: {orphans[:5]}")
        self.items = [(images[p.stem], p) for p in labels]
        self.length = int(length) if length is not None else len(self.items)

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, i: int) -> dict:
        seed = int(torch.randint(0, 2**62, ()).item())
        return self.load_item(i, np.random.default_rng(seed))

    def load_item(self, i: int, rng: np.random.Generator) -> dict:
        """Item i drawn with ``rng`` (deterministic given the generator)."""
        image_path, label_path = self.items[i % len(self.items)]
        img = read_frame(image_path)  # (H,W,3)
        lab = remap(read_label_png(label_path), self.lut)  # (H,W)
        if lab.shape != img.shape[:2]:
            raise ValueError(f"{label_path} is {lab.shape} but its image {image_path} is {img.shape[:2]}")
        tf = sample_clip_transform(rng, img.shape[:2], self.cfg, self.augment)
        x, y = apply_clip_transform(img[None], lab[None], tf, self.cfg)  # (1,3,H,W), (1,H,W)
        return {
            "frames": x,
            "labels": y,
            "video": image_path.stem,
            "frame_names": [image_path.stem],
            "frame_idx": [0],
        }
