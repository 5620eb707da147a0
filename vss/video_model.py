"""The three DVIS++ stages together: segmenter -> referring tracker -> temporal refiner, their
freezing, their training losses and whole-video inference for VSS.

Paper: DVIS (Zhang et al., ICCV 2023) section 3 (decoupled segmentation, tracking, refinement;
online and offline inference) and DVIS++ (Zhang et al., 2023) section 3 (denoising training,
contrastive learning). Details from the code
(``DVIS_Plus/dvis_Plus/meta_architecture.py`` ``DVIS_Plus_online`` / ``DVIS_Plus_offline``):

Stages (``VideoModel.stage``): only the stage's own module trains; the others are frozen
(``requires_grad_(False)``, kept in eval by ``train()``, run under ``no_grad``): stage 2 freezes
the segmenter, stage 3 the segmenter and the tracker (eval: no denoising noise).

Losses (``video_loss``):
- tracker: per-frame set losses on the B*T frames, targets = every class of the clip on every
  frame (empty masks where absent); one query -> class assignment per clip found by the
  first-appearance-consistent matcher (VSS: every class counts as present at frame 0) and reused
  on every frame. ``guided=True`` (first half of training): matched once on the segmenter's
  outputs re-ordered into the tracker's slots by the tracker's recorded indices, for every layer;
  otherwise matched on each layer's own outputs. Plus the reid contrastive loss on the
  references: anchor = matched slot at t >= 1, positive = the same slot at t-1 (and, a second
  item, t+1), negatives = the other slots of that frame.
- refiner: the clip as one (T*h) x w image with one video-level class per query, plain Hungarian
  matching with T * num_points points; ``guided=True``: matched once on the frozen tracker's
  outputs (logits averaged over T) for every block; otherwise per block. Plus the reid loss on
  decoder_norm(last block): anchor = matched slot at t, positives = the slot at all T frames,
  negatives = the other slots at t; a second item with negatives = up to 20 embeddings of the
  same class from earlier videos (``ClassMemory``).
- weights: CE/BCE/dice 2/5/5 (the criterion's), reid ``reid_weight`` (2); DVIS++'s
  ``loss_aux_reid`` is not in its weight dict, so it is not computed here.

Inference (``predict_video``), on one video, frames padded to a multiple of 32:
- stage 1: each frame independently, Mask2Former's semantic inference
  sum_q softmax(cls_q)[:K] * sigmoid(mask_q), windows of ``window_size`` frames;
- stage 2: segmenter + tracker online over windows with the tracker state carried; the class of
  a query = softmax of the mean over all frames of its per-frame logits;
- stage 3: the same online pass, then the refiner once over the whole video; class probability
  = max(softmax(offline)[:K], softmax(mean online)[:K]) element-wise;
- per frame: masks upsampled to the padded size, cropped, sigmoid, resized to ``out_size``
  (stage 1: Mask2Former's order, sigmoid after the last resize), scores = sum_q p_q * sigmoid,
  argmax over K.

Readings taken:
- Memory of inference does not grow with the video beyond per-frame query embeddings (T x Q x
  2D). The video-level classes of stages 2/3 are only known after the last frame, so masks are
  made in a second pass: the segmenter's backbone + pixel decoder run again window by window for
  the mask features (the original keeps every frame's masks / mask features on the CPU, which is
  T x 100 x h x w or T x 256 x h x w floats). The result is the same; stages 2/3 cost a second
  backbone + pixel decoder pass.
- Batches of B clips are vectorised (DVIS++ supports 1 clip per forward); the per-clip parts
  (matching, reid items, the class memory) loop over clips, and the reid losses average over all
  items of the batch.
- The per-class memory lives on the ``VideoModel``, one per process (DVIS++ keeps one per GPU).
  It is not part of the state dict, so ``--init`` and inference never see it; ``train.py`` saves
  every rank's memory in its stage-3 training checkpoints so that a resumed run continues
  exactly (DVIS++ starts it empty after a restart). Its random trimming uses torch's RNG.
- Stage-3 training runs the segmenter on the whole clip at once (DVIS++ splits it in chunks of 21
  frames only to save memory; its clips have 21 frames anyway).
"""

from __future__ import annotations

import contextlib
import copy
import math
from typing import Callable, Iterator, TYPE_CHECKING

import torch
from torch import nn, Tensor
import torch.nn.functional as F

from vss.criterion import reid_contrastive_loss
from vss.ctvis import ctvis_loss, frame_slots
from vss.data import per_frame_targets
from vss.matcher import flatten_clip_masks, HungarianMatcher
from vss.mvc import mvc_loss

if TYPE_CHECKING:
    from vss.config import Config

MODULES = ("segmenter", "tracker", "refiner")  # in pipeline order; a stage is named after the one it trains

Assignment = tuple[Tensor, Tensor]  # (q_idx, t_idx) of one clip or image


# --------------------------------------------------------------------------------------------
# Model
# --------------------------------------------------------------------------------------------


class ClassMemory:
    """DVIS++ ``Outputs_Memory_PerClasses(max_len=20)`` for the refiner's reid loss: embeddings of
    matched objects of earlier videos, per class.

    Args:
        max_len: embeddings kept per class; when a push exceeds it, the class's list is shuffled
            and its last ``max_len`` entries are kept.
    """

    def __init__(self, max_len: int = 20):
        self.max_len = max_len
        self.items: dict[int, Tensor] = {}  # class -> (n,C) float32, detached
        # What each clip of the latest clean (unmasked) pass read: the MVC masked pass of the same
        # batch reads exactly that, so it never sees its own clip and never pushes.
        self.last_views: list[dict[int, Tensor]] = []

    def get(self, cls: int) -> Tensor | None:
        return self.items.get(cls)

    def views_then_push(
        self, embeds: Tensor, targets: list[dict], assignments: list["Assignment"]
    ) -> list[dict[int, Tensor]]:
        """For each clip of a batch in order: the memory as that clip may read it (earlier videos
        only), then the clip's matched embeddings pushed. Remembered as ``last_views``.

        Args:
            embeds: (B,T,Q,C) refiner embeddings; targets: per clip {"labels": (M,)};
            assignments: per clip (q_idx, t_idx).
        """
        views = []
        for i in range(embeds.shape[0]):
            views.append(dict(self.items))  # the stored tensors are replaced on push, never edited
            self.push(embeds[i], targets[i]["labels"], assignments[i])
        self.last_views = views
        return views

    def push(self, embeds: Tensor, labels: Tensor, assignment: Assignment) -> None:
        """Store every frame's embedding of each matched slot under its target's class.

        Args:
            embeds: (T,Q,C) one clip's refiner embeddings.
            labels: (M,) the clip's target classes.
            assignment: (q_idx, t_idx) of the clip.
        """
        embeds = embeds.detach().float()
        for q, m in zip(assignment[0].tolist(), assignment[1].tolist()):
            cls = int(labels[m])
            new = embeds[:, q]  # (T,C)
            self.items[cls] = new if cls not in self.items else torch.cat([self.items[cls], new])
        for cls, stored in self.items.items():
            if stored.shape[0] > self.max_len:
                order = torch.randperm(stored.shape[0]).to(stored.device)
                self.items[cls] = stored[order][-self.max_len :]


class VideoModel(nn.Module):
    """Segmenter, tracker and refiner of one DVIS++ training stage.

    Args:
        segmenter: maps (N,3,H,W) to the segmenter output dict (``vss.segmenter``).
        tracker: ``vss.tracker.ReferringTracker`` (stages "tracker" and "refiner").
        refiner: ``vss.refiner.TemporalRefiner`` (stage "refiner").
        stage: "segmenter" | "tracker" | "refiner": the module that trains; all other modules
            are frozen. Modules past the stage may be present (e.g. to evaluate the online part of
            a full model) and are ignored.
        window_size: frames per segmenter/tracker window at inference (WINDOW_SIZE 3).
        size_divisibility: inference pads frames to a multiple of it.
        reid_weight: weight of the tracker/refiner reid losses.
        memory_size: embeddings per class in the refiner's class memory.
        ctvis_weights: (reid, aux reid) weights of the CTVIS loss in stage 1 (None: MinVIS-style
            stage 1 without it; ``vss/ctvis.py``).
    """

    def __init__(
        self,
        segmenter: nn.Module,
        tracker: nn.Module | None = None,
        refiner: nn.Module | None = None,
        stage: str = "segmenter",
        *,
        window_size: int = 3,
        size_divisibility: int = 32,
        reid_weight: float = 2.0,
        memory_size: int = 20,
        ctvis_weights: tuple[float, float] | None = None,
    ):
        super().__init__()
        if stage not in MODULES:
            raise ValueError(f"stage must be one of {MODULES}, got {stage!r}")
        if stage in ("tracker", "refiner") and tracker is None:
            raise ValueError(f"stage {stage!r} needs a tracker")
        if stage == "refiner" and refiner is None:
            raise ValueError("stage 'refiner' needs a refiner")
        if window_size < 1:
            raise ValueError(f"window_size must be >= 1, got {window_size}")
        self.segmenter = segmenter
        self.tracker = tracker
        self.refiner = refiner
        self.stage = stage
        self.window_size = window_size
        self.size_divisibility = size_divisibility
        self.reid_weight = reid_weight
        self.ctvis_weights = ctvis_weights
        self.class_memory = ClassMemory(memory_size)
        for module in self.frozen_modules():
            module.requires_grad_(False)
        self.train(self.training)

    def frozen_modules(self) -> list[nn.Module]:
        """Every present module except the stage's own."""
        names = [n for n in MODULES if n != self.stage]  # a stage is named after its module
        return [getattr(self, n) for n in names if getattr(self, n) is not None]

    def train(self, mode: bool = True) -> "VideoModel":
        """Set the mode of the stage's module; frozen modules always stay in eval."""
        super().train(mode)
        for module in self.frozen_modules():
            module.eval()
        return self

    def segment(self, frames: Tensor) -> dict:
        """Run the segmenter on clips and reshape its outputs per clip.

        Args:
            frames: (B,T,3,H,W) normalised frames.
        Returns:
            ``pred_logits`` (B,T,Q,K+1), ``pred_masks`` (B,T,Q,h,w), ``pred_embds`` and
            ``pred_embds_without_norm`` (B,T,Q,2D), ``mask_features`` (B,T,mask_dim,h,w).
        """
        b, t = frames.shape[:2]
        out = self.segmenter(frames.flatten(0, 1))
        keys = ("pred_logits", "pred_masks", "pred_embds", "pred_embds_without_norm", "mask_features")
        return {k: out[k].unflatten(0, (b, t)) for k in keys}

    def forward(self, frames: Tensor) -> dict:
        """Training forward of the stage.

        Args:
            frames: (B,T,3,H,W) normalised clips ((N,3,H,W) also accepted in stage 1).
        Returns:
            stage "segmenter": the segmenter's dict over N = B*T images.
            stage "tracker": {"tracker": tracker outputs (B,T,...), "segmenter": its
            ``pred_logits`` (B,T,Q,K+1) and ``pred_masks`` (B,T,Q,h,w) re-ordered into the
            tracker's slots (guidance)}.
            stage "refiner": {"refiner": refiner outputs, "tracker": the frozen tracker's
            last-layer outputs}.
        """
        if self.stage == "segmenter":
            return self.segmenter(frames.flatten(0, 1) if frames.dim() == 5 else frames)
        if frames.dim() != 5:
            raise ValueError(f"stage {self.stage!r} expects clips (B,T,3,H,W), got {tuple(frames.shape)}")
        with torch.no_grad():
            seg = self.segment(frames)
        if self.stage == "tracker":
            track, _ = self.tracker(seg["pred_embds"], seg["pred_embds_without_norm"], seg["mask_features"])
            index = track["indices"]  # (B,T,Q)
            logits = seg["pred_logits"].gather(2, index[..., None].expand_as(seg["pred_logits"]))
            masks = seg["pred_masks"].gather(2, index[..., None, None].expand_as(seg["pred_masks"]))
            return {"tracker": track, "segmenter": {"pred_logits": logits, "pred_masks": masks}}
        with torch.no_grad():
            track, _ = self.tracker(
                seg["pred_embds"], seg["pred_embds_without_norm"], seg["mask_features"], all_layers=False
            )
        refined = self.refiner(track["pred_embds"], seg["pred_embds_without_norm"], seg["mask_features"])
        return {"refiner": refined, "tracker": track}


def build_video_model(cfg: "Config", stage: str) -> VideoModel:
    """A freshly initialised ``VideoModel`` of ``cfg`` (a ``vss.config.Config``) for ``stage``,
    with the modules that stage needs (load earlier stages with ``load_previous_stage``)."""
    from vss.refiner import build_refiner
    from vss.segmenter import build_segmenter
    from vss.tracker import build_tracker

    if stage not in MODULES:
        raise ValueError(f"stage must be one of {MODULES}, got {stage!r}")
    tracker = build_tracker(cfg) if stage in ("tracker", "refiner") else None
    refiner = build_refiner(cfg) if stage == "refiner" else None
    return VideoModel(
        build_segmenter(cfg),
        tracker,
        refiner,
        stage,
        window_size=cfg.model.window_size,
        size_divisibility=cfg.data.size_divisibility,
        reid_weight=cfg.loss.reid_weight,
        ctvis_weights=(cfg.loss.ctvis_weight, cfg.loss.ctvis_aux_weight) if cfg.loss.ctvis else None,
    )


def load_previous_stage(model: VideoModel, state_dict: dict, source: str = "checkpoint") -> list[str]:
    """Load the weights of an earlier stage (e.g. the segmenter into a stage-2 model).

    Every key of ``state_dict`` must exist in the model; missing keys are allowed only for whole
    modules absent from ``state_dict`` (those keep their fresh initialisation).

    Args:
        model: the (unwrapped) model to fill.
        state_dict: a ``VideoModel`` state dict (keys ``segmenter.*``, ``tracker.*``, ...).
        source: name used in error messages (e.g. the checkpoint path).
    Returns:
        Names of the modules left at their initialisation.
    """
    missing, unexpected = model.load_state_dict(state_dict, strict=False)
    if unexpected:
        raise ValueError(f"{source}: keys not in the {model.stage} model: {sorted(unexpected)[:8]}")
    loaded = {k.split(".", 1)[0] for k in state_dict}
    partial = sorted({k.split(".", 1)[0] for k in missing} & loaded)
    if partial:
        bad = [k for k in missing if k.split(".", 1)[0] in partial]
        raise ValueError(f"{source}: modules {partial} are only partly present, missing {bad[:8]}")
    return sorted({k.split(".", 1)[0] for k in missing})


def _unwrap(model: nn.Module) -> VideoModel:
    core = model.module if isinstance(getattr(model, "module", None), VideoModel) else model
    if not isinstance(core, VideoModel):
        raise TypeError(f"expected a VideoModel (or a DDP wrapper of one), got {type(model).__name__}")
    return core


# --------------------------------------------------------------------------------------------
# Losses
# --------------------------------------------------------------------------------------------


def _output_layers(outputs: dict) -> list[tuple[str, dict]]:
    """[("", final), ("_0", aux 0), ...]: the loss-key suffix of every supervised output."""
    return [("", outputs)] + [(f"_{i}", aux) for i, aux in enumerate(outputs.get("aux_outputs", []))]


def _losses_with_indices(
    criterion: nn.Module, layers: list[tuple[str, dict]], targets: list[dict], indices: list[list[Assignment]]
) -> dict[str, Tensor]:
    """The criterion on each layer with its own precomputed matching; keys get the layer suffix."""
    losses = {}
    for (suffix, out), layer_indices in zip(layers, indices):
        terms = criterion({"pred_logits": out["pred_logits"], "pred_masks": out["pred_masks"]}, targets, layer_indices)
        losses.update({key + suffix: value for key, value in terms.items()})
    return losses


def _combine_means(parts: list[tuple[Tensor, int]], fallback: Tensor) -> Tensor:
    """Mean over all items from per-group (mean, count) pairs; 0 in the graph if none."""
    total = sum(count for _, count in parts)
    if total == 0:
        return fallback.float().sum() * 0.0
    return sum(loss * count for loss, count in parts) / total


def _other_slots(num_queries: int, device: torch.device) -> Tensor:
    """(Q,Q-1): row k lists every slot but k."""
    full = torch.arange(num_queries, device=device).expand(num_queries, num_queries)
    keep = ~torch.eye(num_queries, dtype=torch.bool, device=device)
    return full[keep].view(num_queries, num_queries - 1)


def tracker_reid_loss(references: Tensor, assignments: list[Assignment]) -> Tensor:
    """DVIS++ ``get_cl_loss_ref``: contrastive loss between consecutive frames' references.

    For each clip, frame t >= 1 and matched slot k: anchor = ref[t, k]; one item with
    positive ref[t-1, k] and negatives ref[t-1, j != k], and (for t < T-1) one with t+1.

    Args:
        references: (B,T,Q,C) tracker ``pred_references``.
        assignments: per clip (q_idx, t_idx) of the final layer's matching.
    Returns:
        Scalar: the IDOL loss averaged over all items of the batch (unweighted).
    """
    b, num_frames, num_queries, _ = references.shape
    others = _other_slots(num_queries, references.device)
    anchors, positives, negatives = [], [], []
    for i in range(b):
        slots = assignments[i][0].to(references.device)  # (n,)
        if slots.numel() == 0:
            continue
        for t in range(1, num_frames):
            neighbours = [t - 1] + ([t + 1] if t < num_frames - 1 else [])
            for s in neighbours:
                anchors.append(references[i, t, slots])  # (n,C)
                positives.append(references[i, s, slots][:, None])  # (n,1,C)
                negatives.append(references[i, s][others[slots]])  # (n,Q-1,C)
    if not anchors:
        return references.float().sum() * 0.0
    return reid_contrastive_loss(torch.cat(anchors), torch.cat(positives), torch.cat(negatives))


def refiner_reid_loss(
    embeds: Tensor, assignments: list[Assignment], targets: list[dict], memory_views: list[dict[int, Tensor]] | None
) -> Tensor:
    """DVIS++ ``get_cl_loss_with_memory``.

    For each clip, frame t and matched slot k (target class c): anchor = e[t, k], positives =
    e[:, k] (all T frames); item 1 negatives = e[t, j != k]; item 2 (if the memory holds class c)
    negatives = the memory's embeddings of class c from earlier videos.

    Args:
        embeds: (B,T,Q,C) refiner ``pred_embds`` (decoder_norm of the last block).
        assignments: per clip (q_idx, t_idx) of the final block's matching.
        targets: per clip {"labels": (M,), ...}.
        memory_views: per clip, the class memory it may read (``ClassMemory.views_then_push``;
            None: no memory items).
    Returns:
        Scalar: the IDOL loss averaged over all items of the batch (unweighted).
    """
    b, num_frames, num_queries, _ = embeds.shape
    others = _other_slots(num_queries, embeds.device)
    parts = []
    for i in range(b):
        slots = assignments[i][0].to(embeds.device)  # (n,)
        n = slots.numel()
        if n == 0:
            continue
        e = embeds[i]  # (T,Q,C)
        tracks = e[:, slots].transpose(0, 1)  # (n,T,C)
        anchors = e[:, slots].reshape(num_frames * n, -1)  # (T*n,C), t-major
        positives = tracks[None].expand(num_frames, -1, -1, -1).reshape(num_frames * n, num_frames, -1)  # (T*n,T,C)
        negatives = e[:, others[slots]].reshape(num_frames * n, num_queries - 1, -1)  # (T*n,Q-1,C)
        parts.append((reid_contrastive_loss(anchors, positives, negatives), num_frames * n))
        if memory_views is None:
            continue
        labels = targets[i]["labels"]
        for k, m in zip(slots.tolist(), assignments[i][1].tolist()):
            stored = memory_views[i].get(int(labels[m]))
            if stored is None:
                continue
            stored = stored.to(e.device)
            track = e[:, k]  # (T,C)
            parts.append(
                (
                    reid_contrastive_loss(
                        track,
                        track[None].expand(num_frames, -1, -1),
                        stored[None].expand(num_frames, -1, -1),
                    ),
                    num_frames,
                )
            )
    return _combine_means(parts, embeds)


def _frame_major(x: Tensor) -> Tensor:
    """(B,T,...) -> (B*T,...), clip-major: image i = (clip i // T, frame i % T)."""
    return x.flatten(0, 1)


def tracker_loss(
    outputs: dict, targets: list[dict], criterion: nn.Module, *, guided: bool, reid_weight: float
) -> dict[str, Tensor]:
    """Stage-2 losses (see the module docstring).

    Args:
        outputs: ``VideoModel.forward`` of stage "tracker".
        targets: per clip {"labels": (M,), "masks": (M,T,H,W)}.
        criterion: ``vss.criterion.SetCriterion`` (per-frame points); its matcher's costs are
            used by the consistent matching.
        guided: match on the re-ordered segmenter outputs (first half of training).
        reid_weight: weight of ``loss_reid``.
    Returns:
        ``loss_ce``, ``loss_mask``, ``loss_dice`` (+ ``_i`` per aux layer), ``loss_reid``.
    """
    track = outputs["tracker"]
    b, num_frames = track["pred_logits"].shape[:2]
    if len(targets) != b:
        raise ValueError(f"tracker_loss: {b} clips but {len(targets)} targets")
    frame_targets = [{"labels": tg["labels"], "masks": tg["masks"][:, t]} for tg in targets for t in range(num_frames)]
    matcher = criterion.matcher

    def clip_assignments(out: dict) -> list[Assignment]:
        return [
            matcher.consistent_match(out["pred_logits"][i], out["pred_masks"][i], tg["labels"], tg["masks"])
            for i, tg in enumerate(targets)
        ]

    layers = _output_layers(track)
    if guided:
        per_layer = [clip_assignments(outputs["segmenter"])] * len(layers)
    else:
        per_layer = [clip_assignments(out) for _, out in layers]
    flat_layers = [
        (s, {"pred_logits": _frame_major(o["pred_logits"]), "pred_masks": _frame_major(o["pred_masks"])})
        for s, o in layers
    ]
    per_image = [[a[i] for i in range(b) for _ in range(num_frames)] for a in per_layer]
    losses = _losses_with_indices(criterion, flat_layers, frame_targets, per_image)
    losses["loss_reid"] = reid_weight * tracker_reid_loss(track["pred_references"], per_layer[0])
    return losses


def video_level_criterion(criterion: nn.Module, num_frames: int) -> nn.Module:
    """A copy of ``criterion`` (and its matcher) with ``num_points`` multiplied by T, for clips
    seen as one (T*h) x w image."""
    video = copy.copy(criterion)
    video.num_points = criterion.num_points * num_frames
    m = criterion.matcher
    video.matcher = HungarianMatcher(
        cost_class=m.cost_class, cost_mask=m.cost_mask, cost_dice=m.cost_dice, num_points=m.num_points * num_frames
    )
    return video


def _as_video_image(out: dict) -> dict:
    """Clip outputs as one image: logits of frame 0 (B,Q,K+1), masks (B,Q,T*h,w)."""
    return {"pred_logits": out["pred_logits"][:, 0], "pred_masks": out["pred_masks"].transpose(1, 2).flatten(2, 3)}


def refiner_loss(
    outputs: dict,
    targets: list[dict],
    criterion: nn.Module,
    *,
    guided: bool,
    reid_weight: float,
    memory: ClassMemory | None,
    masked: bool = False,
) -> dict[str, Tensor]:
    """Stage-3 losses (see the module docstring).

    Args:
        outputs: ``VideoModel.forward`` of stage "refiner".
        targets: per clip {"labels": (M,), "masks": (M,T,H,W)}.
        criterion: ``vss.criterion.SetCriterion`` with per-frame points (scaled by T here).
        guided: match on the frozen tracker's outputs (first half of training).
        reid_weight: weight of ``loss_reid``.
        memory: the class memory of earlier videos; the clean pass reads it and adds the clips.
        masked: the MVC masked pass of the batch whose clean pass came just before: it reads the
            memory exactly as the clean pass read it and adds nothing (DVIS++'s memory holds earlier
            videos only; reading the clean pass's own clip would push the masked view of an object
            away from the clean view of the same object).
    Returns:
        ``loss_ce``, ``loss_mask``, ``loss_dice`` (+ ``_i`` per aux block), ``loss_reid``.
    """
    refined = outputs["refiner"]
    b, num_frames = refined["pred_logits"].shape[:2]
    if len(targets) != b:
        raise ValueError(f"refiner_loss: {b} clips but {len(targets)} targets")
    video_criterion = video_level_criterion(criterion, num_frames)
    video_targets = [{"labels": tg["labels"], "masks": flatten_clip_masks(tg["masks"])} for tg in targets]
    layers = [(s, _as_video_image(o)) for s, o in _output_layers(refined)]
    if guided:
        track = outputs["tracker"]
        guide = {"pred_logits": track["pred_logits"].mean(1), "pred_masks": _as_video_image(track)["pred_masks"]}
        per_layer = [video_criterion.matcher.match_batch(guide, video_targets)] * len(layers)
    else:
        per_layer = [video_criterion.matcher.match_batch(out, video_targets) for _, out in layers]
    losses = _losses_with_indices(video_criterion, layers, video_targets, per_layer)
    if memory is None:
        views = None
    elif masked:
        views = memory.last_views
    else:
        views = memory.views_then_push(refined["pred_embds"], targets, per_layer[0])
    losses["loss_reid"] = reid_weight * refiner_reid_loss(refined["pred_embds"], per_layer[0], targets, views)
    return losses


def segmenter_loss(
    outputs: dict, targets: list[dict], criterion: nn.Module, ctvis_weights: tuple[float, float] | None = None
) -> dict[str, Tensor]:
    """Stage-1 losses: every frame an image, its targets the classes present in it; with
    ``ctvis_weights`` also CTVIS's contrastive loss of the reid embeddings across the clip's frames
    (``loss_reid``, ``loss_aux_reid``; each frame matched on its own, as CTVIS's image matcher).

    Args:
        outputs: the segmenter's dict over N = B*T images (clip-major).
        targets: per clip {"labels": (M,), "masks": (M,T,H,W)}.
        criterion: ``vss.criterion.SetCriterion``.
        ctvis_weights: (reid, aux reid) weights, or None.
    """
    num_frames = targets[0]["masks"].shape[1] if targets else 1
    frame_targets = [per_frame_targets(tg, t) for tg in targets for t in range(num_frames)]
    losses = criterion(outputs, frame_targets)
    if ctvis_weights is not None:
        final = {"pred_logits": outputs["pred_logits"], "pred_masks": outputs["pred_masks"]}
        assignments = criterion.matcher.match_batch(final, frame_targets)
        slots = frame_slots(
            assignments, [tg["labels"] for tg in frame_targets], [tg["labels"] for tg in targets], num_frames
        ).to(outputs["pred_logits"].device)
        width = outputs["pred_embds"].shape[-1] // 2
        reid = outputs["pred_embds"][..., width:].unflatten(0, (len(targets), num_frames))  # (B,T,Q,D)
        loss_reid, loss_aux = ctvis_loss(reid, slots)
        losses["loss_reid"] = ctvis_weights[0] * loss_reid
        losses["loss_aux_reid"] = ctvis_weights[1] * loss_aux
    return losses


# The loss of each stage given ``VideoModel.forward``'s outputs: (core, outputs, targets, criterion,
# guided, masked: the MVC masked pass) -> weighted terms. A stage is named after the module it
# trains (``vss/stages.py``).
STAGE_LOSSES = {
    "segmenter": lambda core, out, tgts, crit, guided, masked: segmenter_loss(out, tgts, crit, core.ctvis_weights),
    "tracker": lambda core, out, tgts, crit, guided, masked: tracker_loss(
        out, tgts, crit, guided=guided, reid_weight=core.reid_weight
    ),
    "refiner": lambda core, out, tgts, crit, guided, masked: refiner_loss(
        out, tgts, crit, guided=guided, reid_weight=core.reid_weight, memory=core.class_memory, masked=masked
    ),
}


def video_loss(
    model: nn.Module, batch: dict, criterion: nn.Module, *, guided: bool = False, mvc: dict | None = None
) -> dict[str, Tensor]:
    """Weighted loss terms of one batch for the model's stage (sum them for the total).

    Args:
        model: a ``VideoModel`` or its DDP wrapper (called, so DDP sees the forward).
        batch: ``vss.data.collate_clips`` output (``frames`` (B,T,3,H,W), ``targets``); the
            frames are used as given (pass MVC-masked frames to train on them).
        criterion: ``vss.criterion.SetCriterion`` built with the per-frame loss config.
        guided: tracker/refiner guided matching (DVIS++: iteration < iters // 2).
        mvc: optional keyword arguments of ``vss.mvc.mvc_loss`` (``patch_size``, ``ratio``,
            ``weight``, ``generator``): adds the masked-frames pass (terms prefixed ``mvc_``),
            in which the frozen parts see the masked frames too.
    Returns:
        dict of scalar loss terms.
    """
    core = _unwrap(model)
    frames = batch["frames"]
    if frames.dim() != 5:
        raise ValueError(f"video_loss expects batch['frames'] (B,T,3,H,W), got {tuple(frames.shape)}")
    device = frames.device
    targets = [{"labels": tg["labels"].to(device), "masks": tg["masks"].to(device)} for tg in batch["targets"]]
    stage_loss = STAGE_LOSSES[core.stage]

    def one_pass(clips: Tensor, tgts: list[dict], masked: bool = False) -> dict[str, Tensor]:
        return stage_loss(core, model(clips), tgts, criterion, guided, masked)

    if mvc is None:
        return one_pass(frames, targets)
    return mvc_loss(one_pass, frames, targets, model=core, **mvc)


# --------------------------------------------------------------------------------------------
# Inference
# --------------------------------------------------------------------------------------------


def _segmenter_mask_features(segmenter: nn.Module, images: Tensor) -> Tensor:
    """Mask features only: backbone + pixel decoder of a ``vss.segmenter.Segmenter`` (the
    transformer decoder is not needed); any other segmenter runs in full."""
    from vss.segmenter import Segmenter

    if isinstance(segmenter, Segmenter):
        return segmenter.pixel_decoder(segmenter.backbone(images))[0]
    return segmenter(images)["mask_features"]


def _frame_scores(
    class_probs: Tensor,
    mask_logits: Tensor,
    padded: tuple[int, int],
    valid: tuple[int, int],
    out_size: tuple[int, int],
    sigmoid_first: bool,
) -> Tensor:
    """VSS merge of one frame: sum_q p_q(k) * sigmoid(mask_q) at the output size.

    Args:
        class_probs: (Q,K) class probabilities per query (no-object column dropped).
        mask_logits: (Q,h,w) at stride 4 of the padded frame.
        padded: (Hp,Wp) padded input size; valid: (H,W) un-padded size.
        out_size: (H0,W0).
        sigmoid_first: DVIS++ (sigmoid, then resize to out_size) or Mask2Former (resize, then
            sigmoid).
    Returns:
        (K,H0,W0) float32 scores.
    """
    m = F.interpolate(mask_logits[None].float(), size=padded, mode="bilinear", align_corners=False)
    m = m[:, :, : valid[0], : valid[1]]  # (1,Q,H,W)
    if sigmoid_first:
        m = F.interpolate(m.sigmoid(), size=out_size, mode="bilinear", align_corners=False)
    else:
        m = F.interpolate(m, size=out_size, mode="bilinear", align_corners=False).sigmoid()
    return torch.einsum("qk,qhw->khw", class_probs.float(), m[0])  # (K,H0,W0)


class _PaddedVideo:
    """One video's frames as the networks see them: windows of frames on the model's device,
    zero-padded (= the mean after normalisation) to a multiple of the size divisibility.

    Args:
        frames: (T,3,H,W) normalised, un-padded.
        window: frames per window.
        size_divisibility: pad H and W up to a multiple of it.
        device: the model's device.
        autocast_dtype: run the networks under autocast with this dtype (None: off).
    """

    def __init__(
        self,
        frames: Tensor,
        window: int,
        size_divisibility: int,
        device: torch.device,
        autocast_dtype: torch.dtype | None,
    ):
        self.frames, self.device, self.autocast_dtype = frames, device, autocast_dtype
        num_frames, _, height, width = frames.shape
        div = max(1, size_divisibility)
        self.valid = (height, width)
        self.padded = (math.ceil(height / div) * div, math.ceil(width / div) * div)
        self.windows = [(s, min(s + window, num_frames)) for s in range(0, num_frames, window)]

    def load(self, start: int, end: int) -> Tensor:
        """Frames [start, end) as (w,3,Hp,Wp) float32 on the model's device."""
        x = self.frames[start:end].to(device=self.device, dtype=torch.float32)
        return F.pad(x, (0, self.padded[1] - self.valid[1], 0, self.padded[0] - self.valid[0]))

    def autocast(self) -> contextlib.AbstractContextManager:
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.autocast_dtype)


def _per_frame_queries(core: VideoModel, video: _PaddedVideo) -> Iterator[tuple[int, Tensor, Tensor]]:
    """Stage 1: every frame on its own. Yields (t, class probabilities (Q,K), mask logits
    (Q,h,w))."""
    for s, e in video.windows:
        with video.autocast():
            out = core.segmenter(video.load(s, e))
        class_probs = out["pred_logits"].float().softmax(-1)[..., :-1]  # (w,Q,K)
        for i in range(e - s):
            yield s + i, class_probs[i], out["pred_masks"][i]


def _video_level_classes(core: VideoModel, video: _PaddedVideo) -> tuple[Tensor, Callable]:
    """Pass 1 of stages 2/3: the online tracker over the windows (state carried), then for stage 3
    the refiner once over the whole video. Only per-frame query embeddings are kept.

    Returns:
        class_probs (Q,K) of the whole video (stage 2: softmax of the mean online logits;
        stage 3: element-wise max of that and the refiner's softmax), and the mask head
        (start, end, mask_features (w,mask_dim,h,w)) -> (w,Q,h,w) of the stage.
    """
    state = None
    online, tracked, raw = [], [], []
    for s, e in video.windows:
        with video.autocast():
            out = core.segmenter(video.load(s, e))
            track, state = core.tracker(
                out["pred_embds"][None], out["pred_embds_without_norm"][None], None, state, all_layers=False
            )
        online.append(track["pred_logits"][0].float())  # (w,Q,K+1)
        tracked.append(track["pred_embds"][0])  # (w,Q,C)
        if core.stage == "refiner":
            raw.append(out["pred_embds_without_norm"])  # (w,Q,C)
        del out, track
    online_probs = torch.cat(online).mean(0).softmax(-1)[:, :-1]  # (Q,K)
    tracked = torch.cat(tracked)[None]  # (1,T,Q,C)

    if core.stage == "tracker":

        def tracker_masks(s: int, e: int, feats: Tensor) -> Tensor:
            return core.tracker.predict_masks(tracked[:, s:e], feats[None])[0]

        return online_probs, tracker_masks

    with video.autocast():
        refined = core.refiner.refine(tracked, torch.cat(raw)[None], all_layers=False)[-1]
        normed = core.refiner.decoder_norm(refined)  # (1,T,Q,C)
        offline = core.refiner.predict_class(normed)[0].float()  # (Q,K+1)

    def refiner_masks(s: int, e: int, feats: Tensor) -> Tensor:
        return core.refiner.predict_masks(normed[:, s:e], feats[None])[0]

    return torch.maximum(offline.softmax(-1)[:, :-1], online_probs), refiner_masks


def _video_queries(core: VideoModel, video: _PaddedVideo) -> Iterator[tuple[int, Tensor, Tensor]]:
    """Stages 2/3: pass 1 for the video-level classes, then pass 2 recomputes the mask features
    window by window for the masks. Yields (t, class probabilities (Q,K), mask logits (Q,h,w))."""
    class_probs, mask_head = _video_level_classes(core, video)
    for s, e in video.windows:
        with video.autocast():
            # (w,Q,h,w); the window's mask features are freed right after
            masks = mask_head(s, e, _segmenter_mask_features(core.segmenter, video.load(s, e)))
        for i in range(e - s):
            yield s + i, class_probs, masks[i]


@torch.no_grad()
def predict_video(
    model: nn.Module,
    frames: Tensor,
    out_size: tuple[int, int],
    return_probs: bool = False,
    *,
    window_size: int | None = None,
    autocast_dtype: torch.dtype | None = None,
) -> dict:
    """Semantic segmentation of one video by the model's stage (see the module docstring).

    Args:
        model: a ``VideoModel`` (or its DDP wrapper); switched to eval for the call and restored.
        frames: (T,3,H,W) normalised frames, un-padded (any device; windows move to the model's).
        out_size: (H0,W0) size of the returned maps (e.g. the original video size).
        return_probs: also return the per-class scores normalised to sum 1 over K.
        window_size: frames per segmenter/tracker window (default ``model.window_size``); the
            result does not depend on it.
        autocast_dtype: run the networks under autocast with this dtype (None: off).
    Returns:
        {"labels": (T,H0,W0) int64 CPU, "probs": (T,K,H0,W0) float32 CPU or None}.
    """
    core = _unwrap(model)
    if frames.dim() != 4 or frames.shape[1] != 3:
        raise ValueError(f"predict_video expects frames (T,3,H,W), got {tuple(frames.shape)}")
    num_frames = frames.shape[0]
    if num_frames == 0:
        raise ValueError("predict_video got a video without frames")
    out_size = (int(out_size[0]), int(out_size[1]))
    video = _PaddedVideo(
        frames, window_size or core.window_size, core.size_divisibility, next(core.parameters()).device, autocast_dtype
    )
    labels = torch.empty((num_frames, *out_size), dtype=torch.int64)
    probs = None
    was_training = core.training
    core.eval()
    try:
        per_frame = core.stage == "segmenter"
        queries = _per_frame_queries(core, video) if per_frame else _video_queries(core, video)
        for t, class_probs, mask_logits in queries:
            scores = _frame_scores(
                class_probs, mask_logits, video.padded, video.valid, out_size, sigmoid_first=not per_frame
            )  # (K,H0,W0)
            labels[t] = scores.argmax(0).cpu()
            if return_probs:
                if probs is None:
                    size = (num_frames, scores.shape[0], *out_size)
                    probs = torch.empty(size, dtype=torch.float32)  # (T,K,H0,W0)
                probs[t] = (scores / scores.sum(0, keepdim=True).clamp_min(1e-12)).cpu()
    finally:
        core.train(was_training)
    return {"labels": labels, "probs": probs}
