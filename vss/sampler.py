"""The training stream: every item is a pure function of (seed, global position), the heart of
exact resume and of rank-count-independent training.

- The clip at global position g (g = step * global_batch + slot) is a pure function of (seed, g):
  video = permutation(seed, epoch)[g mod #videos], augmentation rng = (seed, g); the unlabelled
  clip of slot g likewise, from its own streams. Micro-batch k of a step (rank r, accumulation
  a: k = r * accum + a) takes the slots [k * batch, (k+1) * batch), and ``step_seed(seed, step,
  k)`` seeds torch's RNG for its point sampling, MVC masks and contrastive sampling. So the data
  and randomness do not depend on the number of ranks, data-loader workers or restarts: W ranks
  x A accumulation steps give the same update for any W * A (except the semi stage's
  percentiles and memory bank, which are per-rank batch statistics as in U2PL), and a resumed
  run continues exactly. (This replaces torch's DistributedSampler, which can neither restart
  mid-epoch nor keep the global batch independent of the world size.)
- Extra image datasets (``TrainConfig.extra``, ROOT:MAPFILE each; segmenter and semi stages,
  whose losses are per frame): ``vss.label_remap.ImageFolderDataset``s mixed into the labelled
  stream by slot. By default proportionally to size (one epoch = a permutation of every video and
  every image, as a concatenated dataset); with ``extra_ratio`` R each slot is an image with
  probability R (sampled with replacement). An image slot is a T-frame "clip" of T independently
  drawn and augmented images, so batches keep one shape; per-frame losses make the frames'
  independence harmless.
"""

from __future__ import annotations

from functools import partial
from itertools import count
from pathlib import Path
import signal

import numpy as np
import torch

from vss.config import Config
from vss.data import collate_clips, VSPWDataset
from vss.io import IGNORE
from vss.label_remap import ImageFolderDataset
from vss.semi_stage import collate_pseudo, PseudoLabelClips


def step_seed(seed: int, step: int, micro: int) -> int:
    """The torch seed of micro-batch ``micro`` of step ``step``."""
    return int(np.random.SeedSequence([seed, step, micro]).generate_state(1)[0])


# (image folder, label folder) of the layouts ``open_extra`` recognises, the plain one first
EXTRA_LAYOUTS = (
    ("images", "labels"),
    ("images/training", "annotations/training"),  # ADE20K's ADEChallengeData2016
    ("train2017", "panoptic_semseg_train2017"),  # COCO panoptic as Mask2Former's semantic PNGs
)


def open_extra(spec: str, cfg: Config) -> ImageFolderDataset:
    """An extra image dataset "ROOT:MAPFILE" in one of the ``EXTRA_LAYOUTS`` (the first whose label
    folder exists; none: the plain one, whose absence ``ImageFolderDataset`` reports)."""
    root, _, map_file = spec.rpartition(":")
    root = Path(root)
    image_dir, label_dir = next((d for d in EXTRA_LAYOUTS if (root / d[1]).is_dir()), EXTRA_LAYOUTS[0])
    return ImageFolderDataset(
        root, map_file, num_classes=cfg.model.num_classes, cfg=cfg.data, image_dir=image_dir, label_dir=label_dir
    )


def extra_clip(dataset: ImageFolderDataset, first: int, num_frames: int, rng: np.random.Generator) -> dict:
    """A T-frame "clip" of images: ``first`` and T-1 more drawn uniformly, each with its own
    augmentation; padded to a common size."""
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
    return {
        "frames": frames,
        "labels": labels,
        "video": f"{dataset.root.name}/{items[0]['video']}",
        "frame_names": [it["video"] for it in items],
        "frame_idx": idx,
    }


class PositionedClips(torch.utils.data.Dataset):
    """Item g: the labelled clip at global position g (a video clip or, with extra datasets, an
    image "clip"), and in the semi stage {"labelled": ..., "unlabelled": the pseudo-labelled
    clip at g}; a pure function of (seed, g) (see the module docstring)."""

    def __init__(
        self,
        dataset: VSPWDataset,
        seed: int,
        *,
        extras: list = (),
        extra_ratio: float | None = None,
        unlabelled: PseudoLabelClips | None = None,
    ):
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
    return {
        "labelled": collate_clips([it["labelled"] for it in items], size_divisibility),
        "unlabelled": collate_pseudo([it["unlabelled"] for it in items], size_divisibility),
    }


class RankPositions(torch.utils.data.Sampler):
    """Global positions of one rank, step after step from ``start_step`` (infinite)."""

    def __init__(self, start_step: int, global_batch: int, first: int, count_per_step: int):
        self.start_step, self.global_batch = start_step, global_batch
        self.first, self.count_per_step = first, count_per_step

    def __iter__(self):
        for step in count(self.start_step):
            base = step * self.global_batch + self.first
            yield from range(base, base + self.count_per_step)


def build_dataset(root: Path, cfg: Config) -> PositionedClips:
    """The positioned training items of the run's stage (videos, extra images, pseudo-labelled
    clips), from ``cfg.train``, ``cfg.stage`` and ``cfg.semi``."""
    stage = cfg.stage
    clips = {"frame_range": stage.frame_range, "crop": stage.crop, "crop_range": stage.crop_range}
    dataset = VSPWDataset(
        root,
        cfg.train.split,
        num_frames=stage.frames,
        cfg=cfg.data,
        num_classes=cfg.model.num_classes,
        reverse_prob=stage.reverse_prob,
        **clips,
    )
    extras = [open_extra(spec, cfg) for spec in cfg.train.extra]
    unlabelled = None
    if cfg.train.stage == "semi":
        if cfg.semi.pseudo is None:
            raise ValueError("the semi stage needs the pseudo-label folder (--pseudo DIR)")
        unlabelled = PseudoLabelClips(
            cfg.semi.unlabeled_data or root,
            cfg.semi.unlabeled_split,
            cfg.semi.pseudo,
            num_frames=stage.frames,
            cfg=cfg.data,
            num_classes=cfg.model.num_classes,
            **clips,
        )
    return PositionedClips(
        dataset, cfg.train.seed, extras=extras, extra_ratio=cfg.train.extra_ratio, unlabelled=unlabelled
    )


def _ignore_stop_signals(worker_id: int) -> None:
    # A SIGTERM/SIGINT sent to the whole process group (SLURM, Ctrl-C) must not kill the data
    # workers while the main process finishes its step and saves; they exit with it.
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def build_loader(
    root: Path,
    cfg: Config,
    *,
    rank: int,
    world_size: int,
    accum: int,
    start_step: int,
    workers: int,
    pin_memory: bool = False,
) -> torch.utils.data.DataLoader:
    """This rank's micro-batches from ``start_step`` on (see ``RankPositions``)."""
    per_rank = accum * cfg.optim.batch
    sampler = RankPositions(start_step, per_rank * world_size, rank * per_rank, per_rank)
    return torch.utils.data.DataLoader(
        build_dataset(root, cfg),
        batch_size=cfg.optim.batch,
        sampler=sampler,
        num_workers=workers,
        pin_memory=pin_memory,
        worker_init_fn=_ignore_stop_signals,
        collate_fn=partial(collate_positioned, size_divisibility=cfg.data.size_divisibility),
    )
