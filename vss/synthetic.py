"""Procedurally rendered videos in VSPW layout: the embedded default dataset and test data.

Not part of the papers; a stand-in for VSPW so every CLI and test runs without a download. What
a scene holds, and why:
- "stuff" classes as large regions in world coordinates (sky above a wavy horizon, grass, a
  road band with lane dashes, a water pool with moving ripples, buildings on the horizon), each
  with its own colour and texture (gradient + clouds, streaky blades, fine grain, ripples,
  window grids);
- "thing" classes as moving objects (car: box + wheels; person: body + head; ball; bird;
  boat) with their own velocities, slow growth (approach), a bob, textures that move with them;
  they occlude each other (the lower one is nearer and drawn last) and enter/leave the view;
- a camera pan (global shift of the whole scene over a larger world canvas);
- per-frame sensor noise, a slight brightness flicker and JPEG compression, and per-video colour
  variation, so a per-frame model flickers and a temporal model has something to gain;
- raw VSPW mask encoding: class k is written as k+1; an "others" blob in about half of the
  videos is written as 0, and in about half of the videos the 1-pixel boundary of thing objects
  is void (255). Both are ignored after ``vss.data.shift_labels``.

Frames are written as ``origin/%05d.jpg`` (JPEG quality 90, as VSPW) and masks as single-channel
``mask/%05d.png``; file numbers start at a random offset (VSPW numbers need not start at 1).
Everything is a function of the seed: the same seed gives byte-identical files.

The embedded default dataset lives at ``default_root()``: ``$VSS_DATA/synthetic`` when the
environment variable ``VSS_DATA`` is set, else ``<repo>/data/synthetic`` (``/data/`` is
git-ignored). ``ensure_default_dataset`` renders it once (into a temp folder, then renamed).
CLI: ``python -m vss.synthetic --out DIR [--videos N --frames MIN MAX --height H --width W
--classes K --seed S --val-fraction F]``.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass
import json
import os
from pathlib import Path
import secrets
import shutil
import sys
import time
from typing import Mapping, Sequence

import cv2
import numpy as np

# name, kind, base colour (RGB). The first K entries are the classes of a K-class dataset.
CLASS_TEMPLATES: tuple[tuple[str, str, tuple[int, int, int]], ...] = (
    ("sky", "stuff", (125, 170, 230)),
    ("grass", "stuff", (70, 135, 50)),
    ("road", "stuff", (105, 105, 110)),
    ("car", "thing", (200, 40, 35)),
    ("person", "thing", (235, 180, 60)),
    ("ball", "thing", (70, 90, 215)),
    ("water", "stuff", (40, 95, 160)),
    ("building", "stuff", (150, 115, 95)),
    ("bird", "thing", (35, 30, 30)),
    ("boat", "thing", (235, 235, 225)),
)
MAX_CLASSES = len(CLASS_TEMPLATES)
OTHERS_COLOUR = (150, 90, 160)
DEFAULTS = dict(num_videos=12, frames=(12, 16), height=120, width=160, num_classes=6, seed=0)
DEFAULT_SPLITS = {"train": 2 / 3, "val": 1 / 3}
JPEG_QUALITY = 90
# Training on the embedded data (train.py without --data): the 120x160 frames at their own scale, and
# a schedule short enough for a laptop.
TRAIN_SIZES = {"base_size": 120, "crop_size": (128, 160), "test_size": 120}
TRAIN_ITERS = 300


def default_root() -> Path:
    """Where the embedded default dataset lives: ``$VSS_DATA/synthetic`` if VSS_DATA is set,
    else ``<repo>/data/synthetic``."""
    env = os.environ.get("VSS_DATA")
    if env:
        return Path(env).expanduser() / "synthetic"
    return Path(__file__).resolve().parents[1] / "data" / "synthetic"


def _smooth_noise(rng: np.random.Generator, shape: tuple[int, int], cell: tuple[float, float]) -> np.ndarray:
    """Value noise in [-1, 1]: a coarse random grid (one value per ``cell`` pixels) upsampled
    bicubically."""
    h, w = shape
    gh, gw = max(2, int(h / cell[0]) + 2), max(2, int(w / cell[1]) + 2)
    grid = rng.uniform(-1, 1, (gh, gw)).astype(np.float32)
    return np.clip(cv2.resize(grid, (w, h), interpolation=cv2.INTER_CUBIC), -1, 1)


@dataclass
class _Object:
    kind: str  # template name, or "others"
    cls: int  # train id; -1 for "others" (raw 0)
    colour: np.ndarray  # (3,) float RGB
    x: float  # centre at frame 0, world coordinates
    y: float
    vx: float
    vy: float
    size: float  # characteristic half-size in pixels
    growth: float  # relative size change per frame
    bob: float  # vertical bob amplitude
    phase: float


class _Scene:
    """One video's world: the background canvas (image + label), objects, camera path."""

    def __init__(self, rng: np.random.Generator, num_frames: int, height: int, width: int, num_classes: int):
        self.rng, self.t_len, self.h, self.w, self.k = rng, num_frames, height, width, num_classes
        names = [c[0] for c in CLASS_TEMPLATES[:num_classes]]
        self.cls = {n: i for i, n in enumerate(names)}
        # per-video colour variation: everything a little warmer/cooler, brighter/darker
        tint = rng.uniform(-18, 18, 3)
        self.colour = {
            name: np.clip(np.array(c, np.float32) + tint + rng.uniform(-15, 15, 3), 0, 255)
            for name, _, c in CLASS_TEMPLATES
        }
        # camera path (top-left corner of the view in world coordinates)
        s = max(height, width) / 160
        vx, vy = rng.uniform(-3, 3) * s, rng.uniform(-0.6, 0.6) * s
        t = np.arange(num_frames)
        cam_x = vx * t + rng.normal(0, 0.4 * s, num_frames).cumsum() * 0.5
        cam_y = vy * t + rng.normal(0, 0.3 * s, num_frames).cumsum() * 0.5
        self.margin = int(8 * s)
        cam_x -= cam_x.min() - self.margin
        cam_y -= cam_y.min() - self.margin
        self.cam = np.stack([np.round(cam_y), np.round(cam_x)], 1).astype(int)  # (T,2)
        self.wh = int(np.ceil(cam_y.max())) + height + self.margin + 1
        self.ww = int(np.ceil(cam_x.max())) + width + self.margin + 1
        self._background()
        self._objects(s)

    # ---- background (stuff) ------------------------------------------------------------
    def _background(self) -> None:
        rng, H, W = self.rng, self.wh, self.ww
        yy, xx = np.mgrid[0:H, 0:W].astype(np.float32)
        label = np.full((H, W), -2, np.int32)  # -2: unset
        img = np.zeros((H, W, 3), np.float32)
        ground = self.cls.get("grass", 1 if self.k > 1 else 0)
        horizon = (
            self.margin
            + self.h * rng.uniform(0.3, 0.5)
            + self.h * 0.06 * np.sin(xx[0] / (W * rng.uniform(0.2, 0.5)) * 2 * np.pi + rng.uniform(0, 6.3))
        )
        above = yy < horizon[None, :]
        sky = self.cls.get("sky", 0)
        label[above] = sky
        label[~above] = ground
        if "building" in self.cls:
            for _ in range(rng.integers(1, 4)):
                x0 = rng.uniform(0, W * 0.8)
                bw, bh = rng.uniform(0.1, 0.25) * W, rng.uniform(0.1, 0.3) * self.h
                m = above & (xx >= x0) & (xx < x0 + bw) & (yy > horizon[None, :] - bh)
                label[m] = self.cls["building"]
        self.road_band = None
        if "road" in self.cls:
            y0 = horizon.mean() + rng.uniform(0.25, 0.45) * self.h
            slope = rng.uniform(-0.15, 0.15)
            centre = y0 + slope * (xx[0] - W / 2)
            half = rng.uniform(0.08, 0.14) * self.h
            m = ~above & (np.abs(yy - centre[None, :]) < half)
            label[m] = self.cls["road"]
            self.road_band = (centre, half)
        if "water" in self.cls:
            cy = horizon.mean() + rng.uniform(0.1, 0.2) * self.h
            cx, a, b = rng.uniform(0.2, 0.8) * W, rng.uniform(0.15, 0.3) * W, rng.uniform(0.06, 0.1) * self.h
            m = ~above & (((xx - cx) / a) ** 2 + ((yy - cy) / b) ** 2 < 1) & (label != self.cls.get("road", -9))
            label[m] = self.cls["water"]
        # textures
        grain = rng.normal(0, 1, (H, W)).astype(np.float32)
        for name, k in self.cls.items():
            m = label == k
            if not m.any() or CLASS_TEMPLATES[k][1] != "stuff":
                continue
            base = self.colour[name]
            if name == "sky":
                grad = (yy - yy.min()) / max(1.0, self.h) * 50  # lighter towards the horizon
                cloud = np.clip(_smooth_noise(rng, (H, W), (30, 60)), 0, 1) * 90
                tex = base + (grad + cloud)[..., None] + grain[..., None] * 2
            elif name == "grass":
                blades = _smooth_noise(rng, (H, W), (6, 1.5))
                tex = base + (blades * 25 + grain * 8)[..., None] * np.array([0.6, 1.0, 0.5])
            elif name == "road":
                tex = base + (grain * 10)[..., None]
                centre, _ = self.road_band
                dash = (np.abs(yy - centre[None, :]) < 1.2) & ((xx // 12) % 2 == 0)
                tex[dash] = 230
            elif name == "water":
                tex = base + (grain * 4)[..., None]  # ripples are animated per frame
            elif name == "building":
                win = ((xx % 9) < 4) & ((yy % 10) < 5)
                tex = base + (grain * 6)[..., None] - win[..., None] * 60
            else:
                tex = base + (grain * 10)[..., None]
            img[m] = tex[m]
        self.bg_img, self.bg_label = img, label

    # ---- objects (things, others) -------------------------------------------------------
    def _objects(self, s: float) -> None:
        rng = self.rng
        things = [n for n in self.cls if CLASS_TEMPLATES[self.cls[n]][1] == "thing"]
        self.objects: list[_Object] = []
        n_obj = int(rng.integers(2, 6)) if things else 0
        kinds = [things[int(rng.integers(len(things)))] for _ in range(n_obj)]
        if rng.random() < 0.5:
            kinds.append("others")
        for kind in kinds:
            size = {"car": 14, "person": 11, "ball": 7, "bird": 5, "boat": 13, "others": 9}[kind] * s
            size *= rng.uniform(0.8, 1.3)
            speed = {"bird": 5.0, "ball": 3.5}.get(kind, 2.5) * s
            # half of the objects start outside the view and cross into it; the rest start inside
            cy0, cx0 = self.cam[0]
            if rng.random() < 0.5:
                side = rng.choice([-1, 1])
                x = cx0 + (self.w / 2) + side * (self.w / 2 + size * rng.uniform(0.5, 1.5))
                vx = -side * rng.uniform(0.5, 1.0) * speed * 2
            else:
                x = cx0 + rng.uniform(0.1, 0.9) * self.w
                vx = rng.uniform(-1, 1) * speed
            low, high = (0.05, 0.35) if kind == "bird" else (0.35, 0.9)  # birds fly, the rest stand
            y = cy0 + rng.uniform(low, high) * self.h
            colour = self.colour.get(kind, np.array(OTHERS_COLOUR, np.float32)) + rng.uniform(-20, 20, 3)
            self.objects.append(
                _Object(
                    kind=kind,
                    cls=self.cls.get(kind, -1),
                    colour=np.clip(colour, 0, 255),
                    x=x,
                    y=y,
                    vx=vx,
                    vy=rng.uniform(-0.4, 0.4) * speed,
                    size=size,
                    growth=rng.uniform(-0.02, 0.03),
                    bob=rng.uniform(0, 2) * s if kind in ("person", "ball", "bird") else 0.0,
                    phase=rng.uniform(0, 6.3),
                )
            )
        self.void_edges = bool(rng.random() < 0.5)

    def _object_shape(self, o: _Object, t: int, yy: np.ndarray, xx: np.ndarray) -> tuple[np.ndarray, np.ndarray, float]:
        """(mask, texture (H,W,3) as offsets to the colour, bottom y) of object o at frame t, in
        view coordinates."""
        cy0, cx0 = self.cam[t]
        r = o.size * (1 + o.growth) ** t
        cx = o.x + o.vx * t - cx0
        cy = o.y + o.vy * t + o.bob * np.sin(0.9 * t + o.phase) - cy0
        dx, dy = xx - cx, yy - cy
        if o.kind == "car":
            body = (np.abs(dx) < 1.6 * r) & (np.abs(dy) < 0.55 * r)
            cabin = (np.abs(dx) < 0.9 * r) & (dy < -0.5 * r) & (dy > -1.1 * r)
            wheels = ((np.abs(dx) - 1.0 * r) ** 2 + (dy - 0.55 * r) ** 2) < (0.38 * r) ** 2
            mask = body | cabin | wheels
            tex = np.where(cabin[..., None], -90.0, 0.0) + np.where(wheels[..., None], -170.0, 0.0)
            tex = tex + (np.sin(dy * 1.3) * 12)[..., None]
            bottom = cy + 0.93 * r
        elif o.kind == "person":
            body = (dx / (0.45 * r)) ** 2 + ((dy - 0.3 * r) / (1.1 * r)) ** 2 < 1
            head = dx**2 + (dy + 1.15 * r) ** 2 < (0.38 * r) ** 2
            mask = body | head
            checker = ((np.floor(dx / 3) + np.floor(dy / 3)) % 2) * 40 - 20
            tex = np.where(head[..., None], np.array([10.0, -20, -40]), checker[..., None])
            bottom = cy + 1.4 * r
        elif o.kind == "ball":
            mask = dx**2 + dy**2 < r**2
            ang = np.arctan2(dy, dx) + 0.6 * t  # the ball rolls
            tex = (np.sign(np.sin(4 * ang)) * 35)[..., None]
            bottom = cy + r
        elif o.kind == "bird":
            wing = 0.5 + 0.5 * np.sin(2.0 * t + o.phase)
            mask = ((dx / (1.4 * r)) ** 2 + (dy / (0.35 * r + 0.4 * r * wing)) ** 2) < 1
            tex = (np.abs(dx) / max(r, 1) * 30)[..., None]
            bottom = cy + r
        elif o.kind == "boat":
            hull = (dy > 0) & (dy < 0.6 * r) & (np.abs(dx) < 1.6 * r - dy)
            sail = (dy <= 0) & (dy > -1.4 * r) & (dx > -0.1 * r) & (dx < 0.1 * r + (dy + 1.4 * r) * 0.5)
            mask = hull | sail
            tex = np.where(hull[..., None], np.array([-120.0, -80, -40]), 0.0)
            bottom = cy + 0.6 * r
        else:  # others: an irregular blob
            ang = np.arctan2(dy, dx)
            rad = r * (1 + 0.3 * np.sin(3 * ang + o.phase + 0.3 * t))
            mask = dx**2 + dy**2 < rad**2
            tex = (np.sin(dx * 0.8) * np.sin(dy * 0.8) * 30)[..., None]
            bottom = cy + r
        return mask, np.broadcast_to(tex, mask.shape + (3,)), bottom

    # ---- one frame ----------------------------------------------------------------------
    def render(self, t: int) -> tuple[np.ndarray, np.ndarray]:
        """(image (H,W,3) uint8 RGB, raw mask (H,W) uint8) of frame t."""
        y0, x0 = self.cam[t]
        img = self.bg_img[y0 : y0 + self.h, x0 : x0 + self.w].copy()
        lab = self.bg_label[y0 : y0 + self.h, x0 : x0 + self.w].copy()
        yy, xx = np.mgrid[0 : self.h, 0 : self.w].astype(np.float32)
        if "water" in self.cls:
            m = lab == self.cls["water"]
            ripple = np.sin((yy + y0) * 0.9 + np.sin((xx + x0) * 0.15) * 2 + 0.8 * t) * 22
            img[m] += ripple[m][:, None] * np.array([0.5, 0.8, 1.0])
        shapes = [self._object_shape(o, t, yy, xx) + (o,) for o in self.objects]
        shapes.sort(key=lambda s: s[2])  # farther (higher bottom edge) first; nearer ones occlude
        thing_mask = np.zeros((self.h, self.w), bool)
        for mask, tex, _, o in shapes:
            if not mask.any():
                continue
            img[mask] = np.clip(o.colour + tex[mask], 0, 255)
            lab[mask] = o.cls
            thing_mask |= mask
        raw = np.where(lab < 0, 0, lab + 1).astype(np.uint8)  # "others" (-1) -> raw 0
        if self.void_edges and thing_mask.any():
            edge = np.zeros_like(thing_mask)
            edge[:, 1:] |= lab[:, 1:] != lab[:, :-1]
            edge[1:, :] |= lab[1:, :] != lab[:-1, :]
            near_thing = cv2.dilate(thing_mask.astype(np.uint8), np.ones((3, 3), np.uint8)) > 0
            raw[edge & near_thing] = 255
        img = img * (1 + self.rng.uniform(-0.04, 0.04)) + self.rng.normal(0, 4, img.shape)
        return np.clip(np.round(img), 0, 255).astype(np.uint8), raw


def render_video(
    seed: int | Sequence, *, frames: int, height: int, width: int, num_classes: int
) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """Render one video in memory.

    Args:
        seed: an int or a sequence of ints (``np.random.default_rng`` seed).
        frames: number of frames T.
        height, width: frame size.
        num_classes: K in 2..MAX_CLASSES; the first K of ``CLASS_TEMPLATES``.
    Returns:
        (images: T x (H,W,3) uint8 RGB, raw masks: T x (H,W) uint8 in raw VSPW encoding).
    """
    if not 2 <= num_classes <= MAX_CLASSES:
        raise ValueError(f"num_classes must be in 2..{MAX_CLASSES}, got {num_classes}")
    if frames < 1 or height < 16 or width < 16:
        raise ValueError(f"need frames >= 1 and a frame of at least 16x16, got {frames}, {height}x{width}")
    scene = _Scene(np.random.default_rng(seed), frames, height, width, num_classes)
    out = [scene.render(t) for t in range(frames)]
    return [o[0] for o in out], [o[1] for o in out]


def class_palette(num_classes: int) -> np.ndarray:
    """(K,3) uint8 display colours: the base colours of the templates."""
    return np.array([c[2] for c in CLASS_TEMPLATES[:num_classes]], np.uint8)


def _split_counts(num_videos: int, splits: Mapping[str, float]) -> dict[str, int]:
    splits = {n: f for n, f in splits.items() if f != 0}  # an empty split file would be unreadable
    names = list(splits)
    total = sum(splits.values())
    if not names or total <= 0 or any(v < 0 for v in splits.values()):
        raise ValueError(f"splits must map names to non-negative fractions, got {dict(splits)}")
    counts = {n: int(round(num_videos * splits[n] / total)) for n in names[:-1]}
    counts[names[-1]] = num_videos - sum(counts.values())
    if any(c < 1 for n, c in counts.items() if splits[n] > 0) or counts[names[-1]] < 0:
        raise ValueError(f"{num_videos} videos cannot fill the splits {dict(splits)}")
    return counts


def render_dataset(
    root: str | os.PathLike,
    *,
    num_videos: int = DEFAULTS["num_videos"],
    frames: int | tuple[int, int] = DEFAULTS["frames"],
    height: int = DEFAULTS["height"],
    width: int = DEFAULTS["width"],
    num_classes: int = DEFAULTS["num_classes"],
    seed: int = DEFAULTS["seed"],
    splits: Mapping[str, float] = DEFAULT_SPLITS,
) -> Path:
    """Render a dataset in VSPW layout at ``root``, atomically (into a temp folder beside it,
    then renamed), so an interrupted run leaves nothing half-written at ``root``.

    Args:
        root: output folder; must not exist or be empty.
        num_videos: total number of videos, divided among ``splits``.
        frames: frames per video, or (min, max) for a length drawn per video.
        height, width: frame size.
        num_classes: K (2..MAX_CLASSES).
        seed: everything is a function of it (video i uses the seed ``[seed, i]``).
        splits: split name -> fraction of the videos (default 2/3 train, 1/3 val).
    Returns:
        The root path.
    Raises:
        FileExistsError: ``root`` exists and is not empty.
    """
    root = Path(root)
    if root.exists() and (not root.is_dir() or any(root.iterdir())):
        raise FileExistsError(f"{root} exists and is not empty; choose another folder or remove it")
    fmin, fmax = (frames, frames) if isinstance(frames, int) else (int(frames[0]), int(frames[1]))
    if not 1 <= fmin <= fmax:
        raise ValueError(f"frames must be >= 1 (min <= max), got {frames}")
    counts = _split_counts(num_videos, splits)
    root.parent.mkdir(parents=True, exist_ok=True)
    # a plain mkdir (0o777 minus the umask): tempfile.mkdtemp would leave the dataset folder 0700
    tmp = root.parent / f".{root.name}.tmp{secrets.token_hex(4)}"
    tmp.mkdir()
    try:
        i = 0
        for split, n in counts.items():
            names = []
            for _ in range(n):
                rng = np.random.default_rng([seed, i, 1])
                length = int(rng.integers(fmin, fmax + 1))
                first = int(rng.integers(0, 100))
                name = f"{i:03d}_synth_{split}"
                images, masks = render_video(
                    [seed, i], frames=length, height=height, width=width, num_classes=num_classes
                )
                vdir = tmp / "data" / name
                (vdir / "origin").mkdir(parents=True)
                (vdir / "mask").mkdir()
                for j, (im, m) in enumerate(zip(images, masks)):
                    stem = f"{first + j:05d}"
                    cv2.imwrite(
                        str(vdir / "origin" / f"{stem}.jpg"),
                        cv2.cvtColor(im, cv2.COLOR_RGB2BGR),
                        [cv2.IMWRITE_JPEG_QUALITY, JPEG_QUALITY],
                    )
                    cv2.imwrite(str(vdir / "mask" / f"{stem}.png"), m)
                names.append(name)
                i += 1
            (tmp / f"{split}.txt").write_text("".join(f"{n}\n" for n in names), encoding="utf-8")
        meta = {
            "name": f"vss synthetic ({num_classes} classes)",
            "classes": [c[0] for c in CLASS_TEMPLATES[:num_classes]],
            "palette": class_palette(num_classes).tolist(),
            "encoding": "mask value 0 = others (ignored), k+1 = classes[k], 255 = void (ignored)",
            "generator": {
                "module": "vss.synthetic",
                "seed": seed,
                "num_videos": num_videos,
                "frames": [fmin, fmax],
                "height": height,
                "width": width,
                "splits": counts,
            },
        }
        (tmp / "classes.json").write_text(json.dumps(meta, indent=1), encoding="utf-8")
        if root.exists():
            root.rmdir()  # empty (checked above); os.rename cannot replace a folder
        try:
            os.rename(tmp, root)
        except OSError:
            raise FileExistsError(f"{root} appeared while rendering (another process?)") from None
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return root


def is_dataset(root: str | os.PathLike) -> bool:
    """True when ``root`` holds a rendered dataset (classes.json, train.txt and data/)."""
    root = Path(root)
    return (root / "classes.json").is_file() and (root / "train.txt").is_file() and (root / "data").is_dir()


def ensure_default_dataset(root: str | os.PathLike | None = None) -> Path:
    """The embedded default dataset (``DEFAULTS``), rendered once if missing.

    Args:
        root: where it lives; ``default_root()`` when None.
    Returns:
        The dataset root.
    Raises:
        FileExistsError: ``root`` exists, is not empty and is not a dataset.
    """
    root = Path(root) if root is not None else default_root()
    if is_dataset(root):
        return root
    try:
        render_dataset(root, **DEFAULTS)
    except FileExistsError:
        if not is_dataset(root):  # someone else may have finished it concurrently
            raise
    return root


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m vss.synthetic", description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, default=None, help=f"output folder (default: {default_root()})")
    p.add_argument("--videos", type=int, default=DEFAULTS["num_videos"], help="total number of videos")
    p.add_argument(
        "--frames", type=int, nargs="+", default=list(DEFAULTS["frames"]), help="frames per video: N, or MIN MAX"
    )
    p.add_argument("--height", type=int, default=DEFAULTS["height"])
    p.add_argument("--width", type=int, default=DEFAULTS["width"])
    p.add_argument("--classes", type=int, default=DEFAULTS["num_classes"], help=f"2..{MAX_CLASSES}")
    p.add_argument("--seed", type=int, default=DEFAULTS["seed"])
    p.add_argument("--val-fraction", type=float, default=1 / 3, help="fraction of the videos in val.txt")
    a = p.parse_args(argv)
    if len(a.frames) not in (1, 2):
        p.error("--frames takes N or MIN MAX")
    if not 0 <= a.val_fraction < 1:
        p.error("--val-fraction must be in [0, 1)")
    out = a.out if a.out is not None else default_root()
    frames = a.frames[0] if len(a.frames) == 1 else (a.frames[0], a.frames[1])
    t0 = time.time()
    try:
        render_dataset(
            out,
            num_videos=a.videos,
            frames=frames,
            height=a.height,
            width=a.width,
            num_classes=a.classes,
            seed=a.seed,
            splits={"train": 1 - a.val_fraction, "val": a.val_fraction},
        )
    except (ValueError, FileExistsError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {a.videos} videos to {out} in {time.time() - t0:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
