"""CTVIS: contrastive learning of the segmenter's reid embeddings across the frames of a clip, the
stage-1 training of DVIS++'s VSPW segmenters.

CTVIS (Ying et al., ICCV 2023, "CTVIS: Consistent Training for Online Video Instance
Segmentation", sec. 3.2-3.3) as DVIS++ plugs it into its segmenter: DVIS_Plus
``dvis_Plus/ctvis.py`` (``CTMinVIS``, ``CTCLPlugin``, ``SimpleTrainMemory``, ``TrainTracklet``,
``loss_reid``) with ``configs/dvis_Plus/VSPW/CTVIS_R50.yaml`` (4-frame clips, NUM_NEGATIVES 99 of
100 queries; ``dvis_Plus/config.py``: REID_WEIGHT 2, AUX_REID_WEIGHT 3, MOMENTUM_EMBED on).

For every clip, every frame t is matched to its targets on its own (Hungarian, the final
decoder layer); the query matched to class c in frame t gives the anchor e_t(c) = reid(norm(q)).
A memory per class, rebuilt for every clip, keeps per frame the anchor (or nothing where c is
absent), the negatives (the other queries of that frame; every query where c is absent) and a
similarity-guided fusion of the anchors so far (Huang et al., "Online Video Instance
Segmentation via Robust Context Fusion", as in ``TrainTracklet.update``):

    beta = max(0, mean_k cos(e_k, e_t)) over the earlier anchors k,   f_t = (1 - beta) f + beta e_t

Then for t >= 1 and each class present in t, one contrastive item:
- positive: if c was present before t, with probability 1/2 the fused embedding as of t-1, else
  the latest earlier anchor; else the next later anchor; else no item;
- negatives: the negatives kept for c at frame t-1;
- loss (IDOL, as ``loss_reid``): log(1 + sum_n exp(n.a - p.a)) on raw dot products, and the
  auxiliary (cos(x, a) - label)^2 averaged over {p} U {n} (label 1 for p, 0 for n); both summed
  over items and divided by the number of items of the batch (of this rank).

Readings (the released code's VSS path, ``dataset_mapper_vss.py``, gives every class of the clip
an id in every frame, so it also matches and contrasts classes absent from a frame with empty
masks): here a class absent from a frame has no anchor in it, as CTVIS treats a disappeared
instance (id -1), and the per-frame targets are the classes present, as in the set loss
(``vss.data.per_frame_targets``). NUM_NEGATIVES = Q - 1 makes the released random sample of
negatives "every other query"; that is what is implemented. The released ``exist_after`` compares
the frame index with the number of *absent* later frames, so a class first seen at frame t >= 1
gets its later positive only when that count differs from t (e.g. seen at t = 1 and t = 2 of 4
frames: 1 absent later frame = t, no item); here the next later anchor is the positive whenever
there is one, as the check intends. The coin of the positive comes from
torch's RNG (seeded per micro-batch by train.py, so runs are reproducible and resume exactly).
"""

from __future__ import annotations

import torch
from torch import Tensor
import torch.nn.functional as F

from vss.criterion import reid_contrastive_loss


def _fuse(fused: Tensor | None, earlier: list[Tensor], new: Tensor) -> Tensor:
    """Similarity-guided fusion (``TrainTracklet.update``): beta = max(0, mean cos(earlier, new))."""
    if fused is None:
        return new
    sim = F.cosine_similarity(torch.stack(earlier), new[None], dim=-1).mean()  # mean over earlier anchors
    beta = sim.clamp_min(0)
    return (1 - beta) * fused + beta * new


def contrastive_items(
    reid: Tensor, slots: Tensor, generator: torch.Generator | None = None
) -> list[tuple[Tensor, Tensor, Tensor]]:
    """The (anchor (C,), positive (C,), negatives (n,C)) items of one clip, in the released order
    (frames, then classes), so the coins are drawn in that order too.

    Args:
        reid: (T,Q,C) reid embeddings of the clip's frames.
        slots: (T,M) long: the query matched to class m in frame t, -1 where m is absent.
        generator: for the coin choosing the fused or the latest positive (None: torch's RNG).
    """
    num_frames, num_queries, _ = reid.shape
    # 1. the memory of every class: per frame its anchor (None if absent), negatives, fused embedding
    anchors, negatives, fused_upto = [], [], []
    for m in range(slots.shape[1]):
        anchors.append([]), negatives.append([]), fused_upto.append([])
        fused = None
        for t in range(num_frames):
            q = int(slots[t, m])
            if q < 0:
                anchors[m].append(None)
                negatives[m].append(reid[t])  # (Q,C): every query
            else:
                keep = torch.arange(num_queries, device=reid.device) != q
                negatives[m].append(reid[t, keep])  # (Q-1,C)
                fused = _fuse(fused, [a for a in anchors[m] if a is not None], reid[t, q])
                anchors[m].append(reid[t, q])
            fused_upto[m].append(fused)
    # 2. one item per frame t >= 1 and class present in it
    items = []
    for t in range(1, num_frames):
        for m in range(slots.shape[1]):
            if anchors[m][t] is None:
                continue
            earlier = [a for a in anchors[m][:t] if a is not None]
            later = [a for a in anchors[m][t + 1 :] if a is not None]
            if earlier:
                use_fused = bool(torch.rand((), generator=generator) > 0.5)
                positive = fused_upto[m][t - 1] if use_fused else earlier[-1]
            elif later:
                positive = later[0]
            else:
                continue
            items.append((anchors[m][t], positive, negatives[m][t - 1]))
    return items


def ctvis_loss(reid: Tensor, slots: Tensor, generator: torch.Generator | None = None) -> tuple[Tensor, Tensor]:
    """CTVIS's ``loss_reid`` and ``loss_aux_reid`` of a batch of clips (unweighted).

    Args:
        reid: (B,T,Q,C) reid embeddings (the segmenter's ``pred_embds[..., D:]``, final layer).
        slots: (B,T,M) long, the query matched to each clip target (class) per frame, -1 where absent.
        generator: for the positives' coins (None: torch's RNG).
    Returns:
        (loss_reid, loss_aux_reid): sums over the items / number of items (0 in the graph if none).
    """
    items = [it for b in range(reid.shape[0]) for it in contrastive_items(reid[b], slots[b], generator)]
    if not items:
        zero = reid.float().sum() * 0.0
        return zero, zero
    with torch.autocast(device_type=reid.device.type, enabled=False):
        widest = max(it[2].shape[0] for it in items)
        anchors = torch.stack([it[0] for it in items]).float()  # (A,C)
        positives = torch.stack([it[1] for it in items]).float()[:, None]  # (A,1,C)
        negatives = torch.stack([F.pad(it[2], (0, 0, 0, widest - it[2].shape[0])) for it in items]).float()  # (A,N,C)
        neg_valid = torch.stack([torch.arange(widest, device=reid.device) < it[2].shape[0] for it in items])  # (A,N)
        loss = reid_contrastive_loss(anchors, positives, negatives, neg_valid=neg_valid)
        # auxiliary: (cos - label)^2 averaged over each item's positive and negatives
        a = F.normalize(anchors, dim=-1)
        cos_pos = (F.normalize(positives[:, 0], dim=-1) * a).sum(-1)  # (A,)
        cos_neg = torch.einsum("anc,ac->an", F.normalize(negatives, dim=-1), a)  # (A,N)
        sq = (1 - cos_pos) ** 2 + (cos_neg**2 * neg_valid).sum(-1)  # (A,)
        aux = (sq / (1 + neg_valid.sum(-1))).mean()
    return loss, aux


def frame_slots(
    assignments: list[tuple[Tensor, Tensor]], frame_labels: list[Tensor], clip_labels: list[Tensor], num_frames: int
) -> Tensor:
    """(B,T,M) query slots from per-frame matchings.

    Args:
        assignments: B*T (q_idx, m_idx) pairs (clip-major), m indexing that frame's targets.
        frame_labels: B*T label vectors of the frames' targets.
        clip_labels: B label vectors of the clips' targets (each class once).
        num_frames: T.
    Returns:
        (B,T,M) long, M the most targets of a clip; -1 where a class is absent from a frame.
    """
    widest = max((len(c) for c in clip_labels), default=0)
    slots = torch.full((len(clip_labels), num_frames, widest), -1, dtype=torch.long)
    for i, (q_idx, m_idx) in enumerate(assignments):
        b, t = divmod(i, num_frames)
        column = {int(c): j for j, c in enumerate(clip_labels[b].tolist())}
        for q, m in zip(q_idx.tolist(), m_idx.tolist()):
            slots[b, t, column[int(frame_labels[i][m])]] = q
    return slots
