"""The semi-supervised fine-tuning stage of the PVUW 2024 1st-place solution: the student
segmenter trained on labelled clips plus clips pseudo-labelled offline by a teacher + student
TTA ensemble, with U2PL's losses ("Semi-supervised Video
Semantic Segmentation Using Unreliable Pseudo Labels for PVUW2024" sec. 2.3-2.5, Eq. (3)-(6); U2PL,
Wang et al. CVPR 2022, ``tools/train_semi.py`` and ``u2pl/utils/loss_helper.py``).
The U2PL functions themselves are the faithful port in ``vss/semi.py``; this module composes them
with the Mask2Former segmenter of a ``vss.video_model.VideoModel``.

Per micro-batch (B labelled clips and B pseudo-labelled clips of T frames, as U2PL pairs one
labelled with one unlabelled batch of the same size):

    L = L_s + lambda_u * L_u + lambda_c * L_c                         (PVUW Eq. 3)

- One student forward over the N = 2*B*T frames (U2PL: ``cat(image_l, image_u)``), split after.
- ``L_s``: the Mask2Former set loss on the labelled frames (per-frame targets, as stage 1).
- ``L_u``: the set loss on the pseudo-labelled frames. Reliable pixels = entropy below the
  batch-wide percentile ``drop_percent(t/T)`` (``vss.semi.pseudo_label_targets``: one threshold
  for all unlabelled frames of the per-rank micro-batch, 80 % kept at the start, 100 % at the
  end). The filtered label maps become set-loss targets through ``vss.data.clip_targets`` /
  ``per_frame_targets``, exactly like ground truth. That is the Mask2Former way of using pseudo
  labels: U2PL's per-pixel CE needs per-pixel logits, a mask classifier has none, so the pseudo
  label map itself is the supervision. Unreliable pixels (255) get no class, belong to no
  target mask and are *ignored* by the mask losses and the matcher (``valid`` of
  ``vss.criterion``: points landing on them get weight 0), as U2PL's CE ignores them
  (``ignore_index=255``). ``ignore_unreliable=False`` gives Mask2Former's treatment of ignore
  pixels instead: background for every mask (supervision "not this class" for all classes).
  Ground-truth ignore pixels of the labelled frames keep Mask2Former's treatment.
- ``L_c``: U2PL's contrastive loss (``compute_contra_memobank_loss``) with the paper's
  behaviour (per-image one-hot ``official=False``, ``official_pairing=False``,
  ``paper_negatives=True``). Student representations = ``RepresentationHead`` (256-d) on the
  segmenter's stride-4 ``mask_features``; teacher representations and probabilities from the EMA
  teacher (segmenter + head); the probabilities are the semantic scores normalised over K,
  ``semantic_inference / sum_K`` at stride 4 (the soft labels U2PL's contrastive loss ranks). Anchor and
  negative candidates of the unlabelled frames come from ``contrastive_inputs`` with
  ``unreliable_alpha(t/T)`` on the *stored ensemble entropy*, the same entropy that splits
  reliable from unreliable for ``L_u``: since ``100 - alpha_t == drop_percent(t/T)``, the
  negative candidates are exactly the pixels dropped from ``L_u`` (PVUW sec. 3.4: "unreliable
  predictions ... judged as negative samples"). The per-class memory bank is gathered across
  ranks (``MemoryBank.enqueue``), so every rank holds the same banks.
- EMA teacher: a copy of the student at the start (we fine-tune a trained student, so there is
  no supervised-only warm-up epoch), then ``theta_t = d * theta_t + (1 - d) * theta_s`` after
  every optimiser step k (0-based) with ``d = ema_decay(k)``; run in train mode under no_grad on
  the student's batch (U2PL L361-375: its BatchNorm uses batch statistics, its dropout is on).

- CutMix (``cutmix=True``; U2PL's ``generate_unsup_data(mode="cutmix")``, ``vss.semi.generate_cutmix``):
  before the forward, each unlabelled clip gets a box of about half its area pasted from the next
  clip of the micro-batch, in its frames, pseudo labels and entropies alike; one box per clip, the
  same in all its frames, so a clip stays a video. The EMA teacher sees the mixed frames too (U2PL's
  teacher runs on the mixed batch for the contrastive loss). The PVUW paper lists only resize /
  crop / flip / colour jitter (which the clip pipeline applies to both streams), so it is an option,
  off by default: on CamVid (``benchmarks/camvid.py semi``, 150 steps from the annealed student,
  seed 0) it gave 0.555 mIoU / 0.963 VC8 against 0.574 / 0.965 without. With one unlabelled clip
  per micro-batch it does nothing.
"""

from __future__ import annotations

import copy
import os
from pathlib import Path

import cv2
import numpy as np
import torch
from torch import nn, Tensor
import torch.nn.functional as F

from vss.config import DataConfig
from vss.data import (
    apply_clip_transform,
    clip_targets,
    ClipTransform,
    collate_clips,
    per_frame_targets,
    sample_clip_indices,
    sample_clip_transform,
)
from vss.io import check_label_range, IGNORE, list_frames, read_frame, read_label_png, read_split
from vss.segmenter import semantic_inference
from vss.semi import (
    compute_contra_memobank_loss,
    contrastive_inputs,
    ContrastiveConfig,
    drop_percent,
    ema_decay,
    ema_update,
    generate_cutmix,
    MemoryBank,
    pseudo_label_targets,
    RepresentationHead,
    unreliable_alpha,
)

REP_DIM = 256  # U2PL representation size (decoder.py `representation`: 256 channels)

# --------------------------------------------------------------------------------------------
# Pseudo-labelled clips (offline labels + entropy written by infer.py --save-probs)
# --------------------------------------------------------------------------------------------


def transform_map(maps: np.ndarray, tf: ClipTransform, fill: float = 0.0) -> Tensor:
    """The geometry of ``vss.data.apply_clip_transform`` applied to float maps (per-pixel
    entropy), with the labels' nearest interpolation so every pixel keeps its label's value.

    Args:
        maps: (T,H,W) float32.
        tf: the clip's transform (rescale, crop, flip; colour jitter does not apply).
        fill: value of the padding where the rescaled frame is smaller than the crop.
    Returns:
        (T,ch,cw) float32 tensor aligned with the transformed labels.
    """
    t, h, w = maps.shape
    nh, nw = tf.size
    y0, x0, ch, cw = tf.crop
    if (nh, nw) != (h, w):
        maps = np.stack([cv2.resize(m, (nw, nh), interpolation=cv2.INTER_NEAREST_EXACT) for m in maps])
    x = maps[:, y0 : y0 + ch, x0 : x0 + cw]  # (T,rh,rw)
    if tf.flip:
        x = x[:, :, ::-1]
    out = torch.full((t, ch, cw), float(fill))  # (T,H,W)
    out[:, : x.shape[1], : x.shape[2]] = torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32))
    return out


def read_entropy(path: Path, shape: tuple[int, int]) -> np.ndarray:
    """A stored (H,W) entropy map as float32; errors name the file."""
    try:
        arr = np.load(path, allow_pickle=False)
    except FileNotFoundError:
        raise FileNotFoundError(f"entropy file not found: {path}") from None
    except (ValueError, OSError) as e:
        raise ValueError(f"cannot read entropy file {path}: {e}") from None
    if arr.shape != tuple(shape) or arr.dtype.kind != "f":
        raise ValueError(f"entropy file {path} holds {arr.dtype} {arr.shape}; expected float (H,W) = {shape}")
    arr = arr.astype(np.float32)
    if not np.isfinite(arr).all():
        raise ValueError(f"entropy file {path} holds NaN or inf")
    return arr


class PseudoLabelClips(torch.utils.data.Dataset):
    """Unlabelled clips with their offline pseudo labels and entropies.

    Frames: ``ROOT/data/<video>/origin/*`` of the videos of ``ROOT/<split>.txt``. Pseudo labels:
    ``PSEUDO/<video>/<frame>.png`` (class ids 0..K-1, the pixel index of the palette PNG, not
    VSPW-shifted) and ``PSEUDO/<video>/<frame>.entropy.npy`` ((H,W) float16 entropy in nats), as
    written by ``infer.py --ensemble A B --tta --tta-merge mean --save-probs``. Every frame must
    have both files (an incomplete infer.py run is an error, not a silently smaller set).
    Clips are sampled and transformed as ``vss.data.VSPWDataset`` clips (the same helpers).

    Item: {"frames": (T,3,H,W) float32, "labels": (T,H,W) int64 (255 = padding), "entropy":
    (T,H,W) float32 (0 on padding), "video", "frame_names", "frame_idx"}.
    """

    def __init__(
        self,
        root: str | os.PathLike,
        split: str,
        pseudo_dir: str | os.PathLike,
        *,
        num_frames: int,
        cfg: DataConfig,
        num_classes: int,
        frame_range: int = 0,
        crop: str = "fixed",
        crop_range: tuple[int, int] = (600, 720),
    ):
        """
        Args:
            root: VSPW-layout root holding the unlabelled videos.
            split: the split listing them (``ROOT/<split>.txt``).
            pseudo_dir: the infer.py output folder.
            num_frames: clip length T.
            cfg: transform and normalisation settings.
            num_classes: K (pseudo label ids must be < K or 255).
            frame_range, crop, crop_range: clip sampling and crop as ``vss.data.VSPWDataset``.
        """
        self.frame_range, self.crop, self.crop_range = int(frame_range), crop, tuple(crop_range)
        self.root, self.pseudo_dir = Path(root), Path(pseudo_dir)
        self.num_frames, self.cfg, self.num_classes = int(num_frames), cfg, int(num_classes)
        if not self.pseudo_dir.is_dir():
            raise FileNotFoundError(
                f"pseudo-label folder not found: {self.pseudo_dir} (write it with "
                "infer.py --ensemble A B --tta --tta-merge mean --save-probs)"
            )
        self.videos: list[tuple[str, list[Path], list[Path], list[Path]]] = []
        for name in read_split(self.root, split):
            frames = list_frames(self.root / "data" / name, "origin")
            vdir = self.pseudo_dir / name
            labels = [vdir / f"{f.stem}.png" for f in frames]
            entropy = [vdir / f"{f.stem}.entropy.npy" for f in frames]
            missing = [p for p in labels + entropy if not p.is_file()]
            if missing:
                raise FileNotFoundError(
                    f"{len(missing)} pseudo-label files of video {name} are missing, e.g. {missing[0]} "
                    f"(run infer.py --save-probs on split {split!r} of {self.root} into {self.pseudo_dir})"
                )
            self.videos.append((name, frames, labels, entropy))

    def __len__(self) -> int:
        return len(self.videos)

    def __getitem__(self, i: int) -> dict:
        seed = int(torch.randint(0, 2**62, ()).item())
        return self.load_clip(i, np.random.default_rng(seed))

    def load_clip(self, i: int, rng: np.random.Generator) -> dict:
        """The clip of video ``i % len`` drawn with ``rng`` (deterministic given the generator)."""
        name, frame_paths, label_paths, entropy_paths = self.videos[i % len(self.videos)]
        idx = sample_clip_indices(len(frame_paths), self.num_frames, rng, frame_range=self.frame_range)
        frames, labels, entropy = [], [], []
        for k in idx:
            img = read_frame(frame_paths[k])
            lab = read_label_png(label_paths[k])
            if lab.shape != img.shape[:2]:
                raise ValueError(f"{label_paths[k]} is {lab.shape} but its frame {frame_paths[k]} is {img.shape[:2]}")
            check_label_range(lab, self.num_classes, label_paths[k])
            frames.append(img)
            labels.append(lab)
            entropy.append(read_entropy(entropy_paths[k], img.shape[:2]))
        if len({f.shape for f in frames}) != 1:
            raise ValueError(f"frames of video {self.root / 'data' / name} differ in size")
        tf = sample_clip_transform(rng, frames[0].shape[:2], self.cfg, crop=self.crop, crop_range=self.crop_range)
        x, y = apply_clip_transform(np.stack(frames), np.stack(labels), tf, self.cfg)
        return {
            "frames": x,  # (T,3,H,W)
            "labels": y,  # (T,H,W)
            "entropy": transform_map(np.stack(entropy), tf),  # (T,H,W)
            "video": name,
            "frame_names": [frame_paths[k].stem for k in idx],
            "frame_idx": list(idx),
        }


def collate_pseudo(items: list[dict], size_divisibility: int = 32) -> dict:
    """``vss.data.collate_clips`` of pseudo-labelled clips plus ``entropy`` (B,T,H,W) float32,
    padded with 0 (padding pixels have label 255 and never enter the percentiles)."""
    batch = collate_clips([{k: v for k, v in item.items() if k != "entropy"} for item in items], size_divisibility)
    entropy = torch.zeros(batch["labels"].shape)  # (B,T,H,W)
    for i, item in enumerate(items):
        h, w = item["entropy"].shape[-2:]
        entropy[i, :, :h, :w] = item["entropy"]
    batch["entropy"] = entropy
    return batch


# --------------------------------------------------------------------------------------------
# Student, teacher
# --------------------------------------------------------------------------------------------


class SemiStudent(nn.Module):
    """What trains in the semi stage: the segmenter of a ``VideoModel`` of any stage (its tracker
    / refiner stay frozen and in eval, so the inference pipeline of the checkpoint's stage is kept)
    plus the U2PL representation head on the segmenter's ``mask_features``.

    The segmenter's reid head gets no gradient from these losses (no reid loss, as stage 1) and is
    frozen, so DDP needs no unused-parameter search.

    Args:
        model: the student ``VideoModel`` (weights loaded from the student checkpoint).
        mask_dim: channels of ``mask_features`` (``ModelConfig.mask_dim``).
    """

    def __init__(self, model: nn.Module, mask_dim: int):
        super().__init__()
        self.model = model
        self.rep_head = RepresentationHead(mask_dim, REP_DIM, hidden=REP_DIM)
        model.segmenter.requires_grad_(True)
        model.segmenter.transformer_decoder.reid_embed.requires_grad_(False)

    def train(self, mode: bool = True) -> "SemiStudent":
        super().train(mode)  # VideoModel.train keeps its frozen modules (maybe the segmenter) in eval
        self.model.segmenter.train(mode)
        return self

    def forward(self, images: Tensor) -> dict:
        """(N,3,H,W) -> the segmenter's output dict plus ``rep`` (N,256,h,w)."""
        out = self.model.segmenter(images)
        out["rep"] = self.rep_head(out["mask_features"])
        return out


class EMATeacher(nn.Module):
    """U2PL's mean teacher: copies of the student's segmenter and representation head, updated
    by EMA of the parameters (buffers come from its own train-mode forwards, as U2PL)."""

    def __init__(self, student: SemiStudent):
        super().__init__()
        self.segmenter = copy.deepcopy(student.model.segmenter)
        self.rep_head = copy.deepcopy(student.rep_head)
        self.requires_grad_(False)
        self.train()

    def train(self, mode: bool = True) -> "EMATeacher":
        # Always train mode: U2PL's teacher predicts with teacher.train() under no_grad.
        return super().train(True)

    @torch.no_grad()
    def copy_from(self, student: SemiStudent) -> None:
        """Teacher := student (parameters and buffers)."""
        self.segmenter.load_state_dict(student.model.segmenter.state_dict())
        self.rep_head.load_state_dict(student.rep_head.state_dict())

    @torch.no_grad()
    def update(self, student: SemiStudent, k: int, max_decay: float = 0.99) -> float:
        """EMA after the optimiser step of semi iteration k (0-based); returns the decay."""
        decay = ema_decay(k, max_decay)
        ema_update(self.segmenter, student.model.segmenter, decay)
        ema_update(self.rep_head, student.rep_head, decay)
        return decay

    @torch.no_grad()
    def forward(self, images: Tensor) -> tuple[Tensor, Tensor]:
        """(N,3,H,W) -> probabilities (N,K,h,w) = semantic scores / their sum over K, and
        representations (N,256,h,w)."""
        out = self.segmenter(images)
        scores = semantic_inference(out["pred_logits"].float(), out["pred_masks"].float())  # (N,K,h,w)
        probs = scores / scores.sum(1, keepdim=True).clamp_min(1e-12)  # (N,K,h,w)
        return probs, self.rep_head(out["mask_features"]).float()


# --------------------------------------------------------------------------------------------
# Loss
# --------------------------------------------------------------------------------------------


def _pad_to(x: Tensor, height: int, width: int, value: float) -> Tensor:
    """Bottom/right padding of the last two dims."""
    return F.pad(x, (0, width - x.shape[-1], 0, height - x.shape[-2]), value=value)


def _take(outputs: dict, sl: slice) -> dict:
    """The images ``sl`` of a segmenter output (final and auxiliary predictions)."""

    def part(out: dict) -> dict:
        return {"pred_logits": out["pred_logits"][sl], "pred_masks": out["pred_masks"][sl]}

    return {**part(outputs), "aux_outputs": [part(a) for a in outputs.get("aux_outputs", [])]}


def _frame_targets(labels: Tensor, ignore: bool = False) -> list[dict]:
    """(B,T,H,W) label maps -> B*T per-frame targets, clip-major (clip_targets, per_frame_targets);
    ``ignore``: each target also gets ``valid`` = (label != 255), the criterion's per-pixel ignore."""
    targets = [per_frame_targets(clip_targets(clip), t) for clip in labels for t in range(labels.shape[1])]
    if ignore:
        for target, frame in zip(targets, labels.flatten(0, 1)):
            target["valid"] = frame != IGNORE  # (H,W)
    return targets


class SemiLoss(nn.Module):
    """PVUW Eq. (3) on one micro-batch (module docstring), with the EMA teacher and the memory
    bank as state (both saved in checkpoints).

    Args:
        criterion: ``vss.criterion.SetCriterion`` (per-frame points), for L_s and L_u.
        student: the ``SemiStudent`` (unwrapped); the teacher starts as its copy.
        num_classes: K.
        unsup_weight: lambda_u (U2PL default 1).
        contrastive_weight: lambda_c (0.1: the U2PL author's value for the paper, issues #52/#57).
        drop_base: U2PL ``drop_percent`` (80): kept percentile at t = 0.
        alpha_base: U2PL ``low_entropy_threshold`` (20): alpha_0 of ``unreliable_alpha``.
        ema_max_decay: U2PL ``ema_decay`` (0.99).
        queue_size: memory-bank rows per class (U2PL 30000; ``train.py --bank-size`` defaults
            to 4096 for the tiny preset). The bank takes up to ``K * queue_size`` KiB of RAM and
            of every checkpoint, ~3.8 GB for 124 classes at 30000 (``MemoryBank``). Every class,
            class 0 included, gets this size: U2PL's 50000 for class 0 is for Pascal /
            Cityscapes' dominant background class.
        contrastive: ``ContrastiveConfig`` (U2PL's defaults).
        ignore_unreliable: unreliable (and padding) pixels of the pseudo labels are excluded
            from L_u's mask losses and matching (U2PL); False: background for every mask.
    """

    def __init__(
        self,
        criterion: nn.Module,
        student: SemiStudent,
        num_classes: int,
        *,
        unsup_weight: float = 1.0,
        contrastive_weight: float = 0.1,
        drop_base: float = 80.0,
        alpha_base: float = 20.0,
        ema_max_decay: float = 0.99,
        queue_size: int = 30000,
        contrastive: ContrastiveConfig | None = None,
        ignore_unreliable: bool = True,
        cutmix: bool = False,
    ):
        super().__init__()
        self.ignore_unreliable, self.cutmix = ignore_unreliable, cutmix
        self.criterion = criterion
        self.teacher = EMATeacher(student)
        self.num_classes = num_classes
        self.unsup_weight, self.contrastive_weight = unsup_weight, contrastive_weight
        self.drop_base, self.alpha_base, self.ema_max_decay = drop_base, alpha_base, ema_max_decay
        self.contrastive = contrastive or ContrastiveConfig()
        self.memory_bank = MemoryBank(num_classes, REP_DIM, queue_size=queue_size, class0_queue_size=None)

    def semi_state(self) -> dict:
        """Teacher and memory banks, for checkpoints (tensors only)."""
        return {"teacher": self.teacher.state_dict(), "memory_bank": self.memory_bank.state_dict()}

    def load_semi_state(self, state: dict) -> None:
        self.teacher.load_state_dict(state["teacher"])
        self.memory_bank.load_state_dict(state["memory_bank"])

    def forward(self, student: nn.Module, labelled: dict, unlabelled: dict, progress: float) -> dict[str, Tensor]:
        """Weighted loss terms of one micro-batch.

        Args:
            student: the ``SemiStudent`` or its DDP wrapper (called once, so DDP sees the forward).
            labelled: ``collate_clips`` batch (``frames`` on the device, ``labels``).
            unlabelled: ``collate_pseudo`` batch (``frames`` on the device, ``labels``, ``entropy``).
            progress: t/T in [0, 1] (0-based iteration / iterations) for the U2PL schedules.
        Returns:
            ``loss_ce``, ``loss_mask``, ``loss_dice`` (+ ``_i``) of L_s; the same prefixed
            ``unsup_`` (times lambda_u) of L_u; ``loss_contra`` (times lambda_c).
        """
        frames_l, frames_u = labelled["frames"], unlabelled["frames"]  # (B,T,3,H,W), (Bu,T,3,H,W)
        device = frames_l.device
        if frames_l.shape[1] != frames_u.shape[1]:
            raise ValueError(f"labelled clips have {frames_l.shape[1]} frames, unlabelled {frames_u.shape[1]}")
        height = max(frames_l.shape[-2], frames_u.shape[-2])
        width = max(frames_l.shape[-1], frames_u.shape[-1])
        labels_l = _pad_to(labelled["labels"].to(device), height, width, IGNORE)  # (B,T,H,W)
        labels_u = _pad_to(unlabelled["labels"].to(device), height, width, IGNORE)  # (Bu,T,H,W)
        entropy_u = _pad_to(unlabelled["entropy"].to(device), height, width, 0.0)  # (Bu,T,H,W)
        frames_u = _pad_to(frames_u, height, width, 0.0)  # (Bu,T,3,H,W)
        if self.cutmix:  # one box per clip, pasted from the next clip into all its frames, labels, entropies
            rng = np.random.RandomState(int(torch.randint(2**31, ())))  # seeded per micro-batch by train.py
            mixed, labels_u, entropy_u = generate_cutmix(frames_u.flatten(1, 2), labels_u, entropy_u, rng)
            frames_u = mixed.view_as(frames_u)
        images = torch.cat([_pad_to(frames_l, height, width, 0.0).flatten(0, 1), frames_u.flatten(0, 1)])  # (N,3,H,W)
        n_l = labels_l.shape[0] * labels_l.shape[1]

        out = student(images)
        # L_s: ground truth
        losses = self.criterion(_take(out, slice(0, n_l)), _frame_targets(labels_l))
        # L_u: reliable pseudo labels as set-loss targets
        flat_u, flat_e = labels_u.flatten(0, 1), entropy_u.flatten(0, 1)  # (Nu,H,W)
        reliable = pseudo_label_targets(flat_u, flat_e, drop_percent(progress, self.drop_base))  # (Nu,H,W)
        unsup = self.criterion(
            _take(out, slice(n_l, None)), _frame_targets(reliable.view_as(labels_u), self.ignore_unreliable)
        )
        losses.update({f"unsup_{k}": self.unsup_weight * v for k, v in unsup.items()})
        # L_c: anchors / prototypes from reliable pixels, negatives from unreliable ones
        prob_t, rep_t = self.teacher(images)  # (N,K,h,w), (N,256,h,w)
        rep = out["rep"].float()  # (N,256,h,w)
        masks = contrastive_inputs(
            labels_l.flatten(0, 1),
            flat_u,
            flat_e,
            unreliable_alpha(progress, self.alpha_base),
            tuple(rep.shape[-2:]),
            self.num_classes,
            official_onehot=False,
        )
        contra, _ = compute_contra_memobank_loss(
            rep,
            masks["label_l"],
            masks["label_u"],
            prob_t[:n_l],
            prob_t[n_l:],
            masks["low_mask"],
            masks["high_mask"],
            self.contrastive,
            self.memory_bank,
            rep_t,
            official_pairing=False,
            paper_negatives=True,
        )
        losses["loss_contra"] = self.contrastive_weight * contra
        return losses


def progress(step: int, iters: int) -> float:
    """t/T of the U2PL schedules for the 1-based training step ``step`` of ``iters``."""
    return min(max((step - 1) / max(iters, 1), 0.0), 1.0)


def bank_fill(loss: SemiLoss) -> int:
    """Rows held by all class queues of the memory bank."""
    return int(sum(loss.memory_bank.lengths()))
