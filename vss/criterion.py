"""Set-prediction loss of Mask2Former / DVIS++, and the IDOL-style re-identification loss.

Paper: Mask2Former (Cheng et al., CVPR 2022) section 3.3 and 4 (training efficiency); the loss is
DETR's set loss (Carion et al., ECCV 2020, section 3.1, Eq. (1)-(2)) with mask BCE + dice instead
of box losses; PointRend (section 3.2) importance sampling of the mask-loss points. Numbers and
details from DVIS_Plus ``mask2former_video/modeling/criterion.py`` (``VideoSetCriterion``) and
``matcher.py``:

- class loss: cross-entropy over K+1 classes, unmatched queries target "no object" (index K)
  whose class weight is 0.1; averaged as ``F.cross_entropy(weight=...)`` does (sum of weighted
  terms / sum of weights);
- mask losses on the matched pairs only, at P points picked by uncertainty of the *prediction*
  (3P candidates, 0.75P most uncertain + 0.25P uniform); mean BCE over points and dice
  ``1 - (2*sum(p*t) + 1) / (sum(p) + sum(t) + 1)``, summed over masks and divided by
  ``num_masks``;
- ``num_masks`` = the number of targets in the batch, summed over ranks and divided by the world
  size (the per-rank average, as the original code does: DDP then averages the gradients), at
  least 1;
- optional per-pixel ignore (not in Mask2Former, whose ignore pixels of ground truth are
  background for every mask): a target dict may carry ``valid`` (H,W) bool; mask-loss points
  landing on invalid pixels get weight 0 (BCE averaged over the valid points, dice on them) and
  the matcher drops them. The semi stage uses it for unreliable pseudo-label pixels (U2PL
  ignores them in L_u); ground truth never sets it;
- deep supervision: the same losses on every ``aux_outputs`` entry (keys ``loss_ce_i`` ...),
  weights 2/5/5 already applied; each layer is matched on its own predictions unless guidance
  ``indices`` are given (DVIS++ tracker/refiner "first half of training", sections 3 and 4), in
  which case every layer uses them.

Video-level (refiner) losses use the same criterion on clips seen as one tall image: masks
through ``vss.matcher.flatten_clip_masks`` and, for both matcher and criterion,
``num_points = T * loss_cfg.num_points`` (``vss.video_model.video_level_criterion``).

All loss arithmetic runs in float32 with autocast disabled, so it is the same under fp16/bf16
training.
"""

from __future__ import annotations

import torch
from torch import nn
import torch.nn.functional as F

from vss.distributed import all_reduce_sum, get_world_size
from vss.matcher import HungarianMatcher, point_sample, point_valid, uncertain_point_coords

Indices = list[tuple[torch.Tensor, torch.Tensor]]


def average_num_masks(targets: list[dict]) -> float:
    """Number of targets per rank for loss normalisation (Mask2Former's ``num_masks``).

    Sums ``len(t["labels"])`` over the local batch and over all ranks (when ``torch.distributed``
    is initialised), divides by the world size and clamps at 1.

    Args:
        targets: N dicts with ``labels`` (M,).

    Returns:
        The normaliser as a Python float >= 1.
    """
    local = torch.tensor([float(sum(len(t["labels"]) for t in targets))])
    return max(all_reduce_sum(local).item() / get_world_size(), 1.0)


def _pad_to(masks: torch.Tensor, height: int, width: int) -> torch.Tensor:
    # Bottom/right zero padding, like detectron2's nested tensors: only needed if the targets of
    # a batch were not already padded to one size. Works for bool masks (F.pad does not).
    if masks.shape[-2:] == (height, width):
        return masks
    out = masks.new_zeros(masks.shape[0], height, width)
    out[:, : masks.shape[-2], : masks.shape[-1]] = masks
    return out


class SetCriterion(nn.Module):
    """Mask2Former set criterion (CE + point BCE + dice, deep supervision)."""

    def __init__(self, num_classes: int, matcher: HungarianMatcher, loss_cfg):
        """
        Args:
            num_classes: K (the logits have K+1 entries, the last is "no object").
            matcher: assigns queries to targets for every supervised output.
            loss_cfg: ``vss.config.LossConfig`` (weights, no-object weight, point sampling).
        """
        super().__init__()
        self.num_classes = num_classes
        self.matcher = matcher
        self.class_weight = loss_cfg.class_weight
        self.mask_weight = loss_cfg.mask_weight
        self.dice_weight = loss_cfg.dice_weight
        self.num_points = loss_cfg.num_points
        self.oversample_ratio = loss_cfg.oversample_ratio
        self.importance_sample_ratio = loss_cfg.importance_sample_ratio
        empty_weight = torch.ones(num_classes + 1)
        empty_weight[-1] = loss_cfg.no_object_weight
        # Not persistent: derived from the config, must not end up in model checkpoints.
        self.register_buffer("empty_weight", empty_weight, persistent=False)

    def forward(self, outputs: dict, targets: list[dict], indices: Indices | None = None) -> dict[str, torch.Tensor]:
        """Weighted losses of the final prediction and every auxiliary one.

        Args:
            outputs: ``pred_logits`` (N,Q,K+1), ``pred_masks`` (N,Q,h,w) and optionally
                ``aux_outputs``, a list of dicts with the same two keys.
            targets: N dicts with ``labels`` (M,) int64 in [0, K), ``masks`` (M,H,W) bool/float
                and optionally ``valid`` (H,W) bool (False = ignored pixel, see the module doc).
            indices: optional N pairs (q_idx, t_idx) used for every layer instead of matching
                (guided matching).

        Returns:
            ``loss_ce``, ``loss_mask``, ``loss_dice`` and ``loss_ce_i``, ``loss_mask_i``,
            ``loss_dice_i`` for aux output i; each already multiplied by its weight, float32
            scalars; the training loss is their sum.
        """
        logits = outputs["pred_logits"]
        device = logits.device
        self._check_inputs(logits, targets, indices)
        num_masks = average_num_masks(targets)

        # Targets as one float tensor shared by every layer, image i owning rows
        # offsets[i]:offsets[i+1]: converted once here rather than by the matcher and the mask
        # loss of every layer (14 conversions of the whole set per tiny@12544 step, ~20 ms), at
        # the price of holding 4x the bytes of bool masks while the losses are computed.
        all_labels = torch.cat([t["labels"] for t in targets]).to(device)  # (M_all,)
        height = max(t["masks"].shape[-2] for t in targets)
        width = max(t["masks"].shape[-1] for t in targets)
        tgt_masks = torch.cat([_pad_to(t["masks"].to(device), height, width) for t in targets])  # (M_all,H,W)
        tgt_masks = tgt_masks.float()
        offsets = torch.tensor([0] + [len(t["labels"]) for t in targets]).cumsum(0)  # (N+1,)
        if indices is None:
            # the matcher sees each image's float masks at their own size (views, no copy)
            targets = [
                {**t, "masks": tgt_masks[offsets[i] : offsets[i + 1], : t["masks"].shape[-2], : t["masks"].shape[-1]]}
                for i, t in enumerate(targets)
            ]
        valid = None
        if any("valid" in t for t in targets):
            # images without ``valid`` keep every pixel, padding included (as without ignore)
            valid = torch.stack(
                [
                    _pad_to(t["valid"].to(device)[None], height, width)[0]
                    if "valid" in t
                    else torch.ones(height, width, dtype=torch.bool, device=device)
                    for t in targets
                ]
            )  # (N,H,W)

        aux = outputs.get("aux_outputs", [])
        layers = [("", outputs)] + [(f"_{i}", out) for i, out in enumerate(aux)]
        losses = {}
        for suffix, out in layers:
            layer_indices = indices if indices is not None else self.matcher.match_batch(out, targets)
            # One flat list of matches over the batch: image, query, batch-wide target row.
            pairs = list(enumerate(layer_indices))
            batch_idx = torch.cat([torch.full_like(q, i) for i, (q, _) in pairs])  # (M_match,)
            q_idx = torch.cat([q for q, _ in layer_indices])  # (M_match,)
            t_idx = torch.cat([t + offsets[i] for i, (_, t) in pairs])  # (M_match,)
            loss_ce = self.loss_labels(out["pred_logits"], all_labels, batch_idx, q_idx, t_idx)
            loss_mask, loss_dice = self.loss_masks(
                out["pred_masks"], tgt_masks, batch_idx, q_idx, t_idx, num_masks, valid
            )
            losses["loss_ce" + suffix] = self.class_weight * loss_ce
            losses["loss_mask" + suffix] = self.mask_weight * loss_mask
            losses["loss_dice" + suffix] = self.dice_weight * loss_dice
        return losses

    def _check_inputs(self, logits: torch.Tensor, targets: list[dict], indices: Indices | None) -> None:
        if logits.shape[-1] != self.num_classes + 1:
            raise ValueError(
                f"SetCriterion: pred_logits has {logits.shape[-1]} classes, expected K+1 = {self.num_classes + 1}"
            )
        if len(targets) != logits.shape[0]:
            raise ValueError(f"SetCriterion: {logits.shape[0]} predictions but {len(targets)} targets")
        if indices is not None and len(indices) != len(targets):
            raise ValueError(f"SetCriterion: {len(indices)} guidance indices for {len(targets)} images")
        for i, t in enumerate(targets):
            lab = t["labels"]
            if lab.numel() and (int(lab.min()) < 0 or int(lab.max()) >= self.num_classes):
                raise ValueError(
                    f"SetCriterion: target labels of image {i} must lie in "
                    f"[0, {self.num_classes}), got [{int(lab.min())}, {int(lab.max())}]"
                )
            if t["masks"].shape[0] != lab.shape[0]:
                raise ValueError(f"SetCriterion: image {i} has {lab.shape[0]} labels but {t['masks'].shape[0]} masks")

    def loss_labels(
        self,
        pred_logits: torch.Tensor,
        all_labels: torch.Tensor,
        batch_idx: torch.Tensor,
        q_idx: torch.Tensor,
        t_idx: torch.Tensor,
    ) -> torch.Tensor:
        """Weighted CE over K+1 classes; unmatched queries target "no object" (index K).

        Args:
            pred_logits: (N,Q,K+1).
            all_labels: (M_all,) labels of all targets of the batch, concatenated.
            batch_idx, q_idx, t_idx: (M_match,) image, query and (batch-wide) target of each match.

        Returns:
            Scalar float32 ``sum_i w_{y_i} * CE_i / sum_i w_{y_i}`` over all N*Q queries.
        """
        device = pred_logits.device
        target_classes = torch.full(pred_logits.shape[:2], self.num_classes, dtype=torch.int64, device=device)  # (N,Q)
        target_classes[batch_idx.to(device), q_idx.to(device)] = all_labels[t_idx.to(device)]
        with torch.autocast(device_type=device.type, enabled=False):
            return F.cross_entropy(
                pred_logits.float().transpose(1, 2), target_classes, weight=self.empty_weight.to(device)
            )

    def loss_masks(
        self,
        pred_masks: torch.Tensor,
        tgt_masks: torch.Tensor,
        batch_idx: torch.Tensor,
        q_idx: torch.Tensor,
        t_idx: torch.Tensor,
        num_masks: float,
        valid: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Point-sampled BCE and dice of all matched masks of the batch at once.

        Args:
            pred_masks: (N,Q,h,w) mask logits.
            tgt_masks: (M_all,H,W) float targets of the whole batch.
            batch_idx, q_idx, t_idx: (M_match,) image, query and (batch-wide) target of each match.
            num_masks: normaliser (see ``average_num_masks``).
            valid: optional (N,H,W) bool, False on ignored pixels: their points get weight 0.
                The points are still chosen by uncertainty over the whole mask, so a mask with
                many ignored pixels is supervised at fewer points.

        Returns:
            (loss_mask, loss_dice) float32 scalars, each ``sum over matches / num_masks``.
        """
        device = pred_masks.device
        if q_idx.numel() == 0:
            # Keep the mask head in the graph so DDP sees a gradient for every parameter.
            zero = pred_masks.float().sum() * 0.0
            return zero, zero.clone()
        with torch.autocast(device_type=device.type, enabled=False):
            src = pred_masks[batch_idx.to(device), q_idx.to(device)].float()[:, None]  # (M_match,1,h,w)
            tgt = tgt_masks[t_idx.to(device)][:, None]  # (M_match,1,H,W)

            # 1. points chosen where the prediction is uncertain (no gradient through the choice)
            with torch.no_grad():
                coords = uncertain_point_coords(
                    src, self.num_points, self.oversample_ratio, self.importance_sample_ratio
                )  # (M_match,P,2)
                labels = point_sample(tgt, coords)[:, 0]  # (M_match,P)
                if valid is not None:
                    weight = point_valid(valid[batch_idx.to(device)], coords).float()  # (M_match,P)
            logits = point_sample(src, coords)[:, 0]  # (M_match,P)

            # 2. BCE averaged over points, dice per mask; both summed over masks / num_masks
            bce = F.binary_cross_entropy_with_logits(logits, labels, reduction="none")  # (M_match,P)
            probs = logits.sigmoid()  # (M_match,P)
            if valid is None:
                loss_mask = bce.mean(1)  # (M_match,)
            else:
                loss_mask = (bce * weight).sum(1) / weight.sum(1).clamp_min(1)  # (M_match,)
                probs, labels = probs * weight, labels * weight
            numerator = 2 * (probs * labels).sum(-1) + 1  # (M_match,)
            loss_dice = 1 - numerator / (probs.sum(-1) + labels.sum(-1) + 1)  # (M_match,)
            return loss_mask.sum() / num_masks, loss_dice.sum() / num_masks


def reid_contrastive_loss(
    anchors: torch.Tensor,
    positives: torch.Tensor,
    negatives: torch.Tensor,
    pos_valid: torch.Tensor | None = None,
    neg_valid: torch.Tensor | None = None,
) -> torch.Tensor:
    """IDOL-style contrastive re-identification loss on raw dot products.

    For anchor a with positives {p} and negatives {n} (IDOL's loss as DVIS_Plus
    ``dvis_Plus/meta_architecture.py`` uses it, "Segmenter training for VSS", used by the tracker
    (section 3) and refiner (section 4); IDOL, Wu et al., ECCV 2022, Eq. (2)):

        loss(a) = log(1 + sum_p sum_n exp(n.a - p.a))

    computed as a logsumexp over {0} and all (p, n) pairs for stability, then averaged over the
    anchors (an anchor without positives or negatives contributes log 1 = 0 but still counts, as
    in the original ``loss_reid``).

    Args:
        anchors: (A,D) anchor embeddings.
        positives: (A,Npos,D) positive embeddings per anchor.
        negatives: (A,Nneg,D) negative embeddings per anchor.
        pos_valid: optional (A,Npos) bool, False for padding entries.
        neg_valid: optional (A,Nneg) bool, False for padding entries.

    Returns:
        Scalar float32 loss (0 connected to the graph when A = 0).
    """
    if anchors.shape[0] == 0:
        return anchors.float().sum() * 0.0
    with torch.autocast(device_type=anchors.device.type, enabled=False):
        anchors, positives, negatives = anchors.float(), positives.float(), negatives.float()
        pos = torch.einsum("ad,apd->ap", anchors, positives)  # (A,Npos)
        neg = torch.einsum("ad,and->an", anchors, negatives)  # (A,Nneg)
        diff = neg[:, None, :] - pos[:, :, None]  # (A,Npos,Nneg)
        valid = torch.ones_like(diff, dtype=torch.bool)
        if pos_valid is not None:
            valid = valid & pos_valid[:, :, None].to(diff.device)
        if neg_valid is not None:
            valid = valid & neg_valid[:, None, :].to(diff.device)
        diff = diff.masked_fill(~valid, float("-inf")).flatten(1)  # (A,Npos*Nneg)
        diff = F.pad(diff, (0, 1), value=0.0)  # (A,Npos*Nneg+1): the "1 +" term
        return torch.logsumexp(diff, dim=1).mean()
