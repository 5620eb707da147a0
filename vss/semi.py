"""U2PL: semi-supervised learning with unreliable pseudo labels (1st-place PVUW 2024 VSS method).

The PVUW 2024 winner ("Semi-supervised Video Semantic Segmentation Using Unreliable Pseudo Labels for
PVUW2024", sec. 2.3-2.5)
fine-tunes the student on labelled frames plus pseudo-labelled frames with the losses of U2PL
(Wang et al., CVPR 2022; official code Haochen-Wang409/U2PL, commit ab3d2be):

- Eq. (1) of the PVUW paper: per-pixel entropy ``H(p) = -sum_c p_c log p_c`` of the teacher's
  class distribution -> ``pixel_entropy``.
- Eq. (2): pseudo label = argmax; pixels whose entropy is in the top ``100 - percent`` percent
  of the batch are unreliable (ignored by the unsupervised CE) -> ``pseudo_label_targets``,
  ``ensemble_pseudo_labels`` (offline labels from a teacher+student TTA ensemble).
- Eq. (3): ``L = L_s + lambda_u L_u + lambda_c L_c``.
- Eq. (5), ``L_u``: CE on reliable pseudo-labelled pixels -> ``compute_unsupervised_loss``, a
  reference port: a Mask2Former has no per-pixel logits, so the semi stage
  (``vss/semi_stage.py``) puts the reliable pseudo labels into the set loss instead
  (``pseudo_label_targets``).
- Eq. (6), ``L_c``: InfoNCE between anchor pixels, the class prototype and negatives drawn from
  a per-class memory bank filled with unreliable pixels -> ``compute_contra_memobank_loss``,
  ``MemoryBank``, ``RepresentationHead``.
- U2PL schedules: the reliable percentile ``100 - alpha_0 (1 - t/T)`` (``drop_percent``), the
  anchor/negative entropy fraction ``alpha_t`` (``unreliable_alpha``), the EMA teacher
  (``ema_decay``, ``ema_update``); and, as reference ports that the semi stage does not call,
  U2PL's poly LR (``poly_lr``; training keeps DVIS++'s multi-step schedule) and CutMix
  (``generate_cutmix``).

Official code vs paper (U2PL ``u2pl/utils/loss_helper.py``, ``train_semi.py``). The functions reproduce the official
code bit for bit by default (tested against ``tests/data/u2pl_vectors.npz``); each departure
of the code from the paper is a keyword flag:

1. ``label_onehot(official=True)`` scatters along the batch dimension: for B > 1 image 0 gets
   the union of every image's labels and images 1..B-1 are all zeros (quirk 1).
   ``official=False`` is the per-image one-hot the paper means.
2. ``compute_contra_memobank_loss(official_pairing=True)`` pairs the anchors and prototype of
   class *index i* with the memory bank of the *i-th valid class* (quirk 2); ``False`` pairs
   every valid class with its own bank.
3. ``compute_contra_memobank_loss(paper_negatives=False)`` keeps the official negative rule,
   which needs ``label == c`` and so never takes labelled negatives (quirk 3);
   ``True`` takes pixels *not* of class c whose class-c rank is in ``[0, low_rank)``
   (labelled) or ``[low_rank, high_rank)`` (unlabelled, high entropy).
4. ``compute_unsupervised_loss(paper_normalisation=False)`` weights the mean CE of the kept
   pixels by ``B*H*W / N_kept`` (official); ``True`` divides the summed CE by ``B*H*W`` as the
   paper's ``L_u`` does.

Readings taken where both are silent: the percentile threshold is one value for the whole
(per-GPU) batch, as the code; keys are gathered across ranks before being enqueued, as the
code; the memory banks live on the CPU, as the code.
"""

from __future__ import annotations

from dataclasses import dataclass
import math
from typing import Callable, Iterable, Optional, Sequence

import numpy as np
import torch
from torch import nn, Tensor
import torch.nn.functional as F

from vss.distributed import all_gather_cat, get_world_size

IGNORE = 255
_EPS = 1e-10  # inside the log of the entropy, as the official code

RandInt = Callable[[int, int], Tensor]


# ---------------------------------------------------------------------------------------------
# Entropy, pseudo labels, one-hot
# ---------------------------------------------------------------------------------------------


def pixel_entropy(prob: Tensor, dim: int = 1) -> Tensor:
    """Per-pixel entropy ``-sum_c p_c log(p_c + 1e-10)`` (PVUW Eq. 1).

    Args:
        prob: class probabilities, e.g. (N,K,H,W) with the class axis at ``dim``.
        dim: the class axis.
    Returns:
        The entropy with ``dim`` removed, e.g. (N,H,W).
    """
    return -torch.sum(prob * torch.log(prob + _EPS), dim=dim)


def entropy_percentile(entropy: Tensor, valid: Tensor, q: float) -> float:
    """``np.percentile(entropy[valid], q)`` (linear interpolation), one value for the batch.

    numpy >= 2 returns float32 for a float32 array; the value is returned as a Python float
    that holds it exactly, so ``entropy >= thresh`` is the same float32 comparison as in the
    official code.

    Args:
        entropy: (...) entropies.
        valid: bool mask of the same shape; only these pixels enter the percentile.
        q: percentile in [0, 100].
    Returns:
        The threshold, or NaN when no pixel is valid.
    """
    values = entropy[valid].detach().cpu().numpy().ravel()
    if values.size == 0:
        return float("nan")
    # q as a Python float: a numpy float64 q would promote the result to float64.
    return float(np.percentile(values, float(q)))


def pseudo_label_targets(labels: Tensor, entropy: Tensor, percent: float) -> Tensor:
    """Mark unreliable pseudo labels as ignore (PVUW Eq. 2; the rule inside
    ``compute_unsupervised_loss``), for labels stored offline with their entropy.

    Pixels with ``entropy >= percentile(entropy[valid], percent)`` become 255, so even
    ``percent=100`` drops the maximum-entropy pixel(s), as the official code.

    Args:
        labels: (N,H,W) int64 pseudo labels, 255 = ignore.
        entropy: (N,H,W) per-pixel entropy.
        percent: the kept percentile, e.g. ``drop_percent(progress)``.
    Returns:
        A new (N,H,W) int64 tensor; ``labels`` is not modified.
    """
    valid = labels != IGNORE  # (N,H,W)
    out = labels.clone()
    if not bool(valid.any()):
        return out
    thresh = entropy_percentile(entropy, valid, percent)
    out[entropy.ge(thresh) & valid] = IGNORE
    return out


@torch.no_grad()
def ensemble_pseudo_labels(probs: Iterable[Tensor], weights: Optional[Sequence[float]] = None) -> tuple[Tensor, Tensor]:
    """Offline pseudo labels from an ensemble (PVUW sec. 2.4: teacher + student, each already
    averaged over its TTA views): weighted mean of the class distributions, argmax, entropy.

    The mean is a running sum, so a generator of M maps (``infer.py --ensemble``, one model's
    prediction at a time) never holds M probability maps at once.

    Args:
        probs: (…,K,H,W) class distributions (each sums to 1 over K), e.g. a generator.
        weights: one weight per model (default: equal); normalised to sum to 1.
    Returns:
        labels (…,H,W) int64 and entropy (…,H,W) float32 of the averaged distribution.
    """
    weights = None if weights is None else [float(x) for x in weights]
    total, count = None, 0
    for p in probs:
        if weights is not None and count >= len(weights):
            raise ValueError(f"more probability maps than the {len(weights)} weights")
        part = p.float() * (1.0 if weights is None else weights[count])  # (…,K,H,W), a new tensor
        total = part if total is None else total.add_(part)
        count += 1
    if count == 0:
        raise ValueError("ensemble_pseudo_labels needs at least one probability map")
    weight_sum = count if weights is None else sum(weights)
    if weights is not None and (len(weights) != count or not weight_sum > 0):
        raise ValueError(f"need {count} positive weights, got {weights}")
    mean = total.div_(weight_sum)  # (…,K,H,W)
    return mean.argmax(dim=-3), pixel_entropy(mean, dim=-3)


def label_onehot(labels: Tensor, num_classes: int, *, official: bool = True) -> Tensor:
    """One-hot label maps for the contrastive loss.

    Args:
        labels: (B,H,W) int64 class ids 0..K-1, 255 = ignore.
        num_classes: K.
        official: True reproduces the official ``label_onehot`` (scatter along the batch
            axis, quirk 1): image 0 holds, at each pixel, the union of the labels of all B
            images (an ignore pixel of image b > 0 counts as class 0; pixels where image 0 is
            255 are all zeros) and images 1..B-1 are all zeros. Identical to the correct
            one-hot when B == 1. False: per-image one-hot, 255 -> all zeros.
    Returns:
        (B,K,H,W) float32.
    """
    if labels.dim() != 3:
        raise ValueError(f"labels must be (B,H,W), got {tuple(labels.shape)}")
    ignore = labels == IGNORE  # (B,H,W)
    ids = labels.masked_fill(ignore, 0)
    if bool((ids < 0).any()) or bool((ids >= num_classes).any()):
        bad = torch.unique(ids[(ids < 0) | (ids >= num_classes)]).tolist()
        raise ValueError(f"label ids {bad} are outside 0..{num_classes - 1} and not {IGNORE}")
    onehot = F.one_hot(ids, num_classes).permute(0, 3, 1, 2).float()  # (B,K,H,W)
    if not official:
        return onehot * (~ignore).unsqueeze(1)
    out = torch.zeros_like(onehot)  # (B,K,H,W)
    out[0] = onehot.amax(dim=0)  # (K,H,W) union over images, ignore counted as class 0
    out[0][:, ignore[0]] = 0.0
    return out


# ---------------------------------------------------------------------------------------------
# Unsupervised loss (L_u)
# ---------------------------------------------------------------------------------------------


def compute_unsupervised_loss(
    predict: Tensor,
    target: Tensor,
    percent: float,
    pred_teacher: Tensor,
    *,
    paper_normalisation: bool = False,
) -> tuple[Tensor, float, Tensor]:
    """U2PL unsupervised CE on reliable pseudo-labelled pixels (PVUW Eq. 5).

    Steps as the official ``compute_unsupervised_loss``:
    1. entropy of ``softmax(pred_teacher)``;
    2. one threshold ``np.percentile(entropy[target != 255], percent)`` for the whole batch;
    3. valid pixels with ``entropy >= thresh`` become 255 (the official code does this in
       place on ``target``; here ``target`` is left untouched and the new target returned);
    4. ``loss = B*H*W / N_kept * mean CE over kept pixels`` (official; equals
       ``B*H*W * sum CE / N_kept**2``) or, with ``paper_normalisation``, ``sum CE / (B*H*W)``.

    Args:
        predict: (N,K,H,W) student logits (with grad).
        target: (N,H,W) int64 pseudo labels, 255 = ignore.
        percent: kept percentile, e.g. ``drop_percent(progress)``.
        pred_teacher: (N,K,H,W) teacher logits (no grad needed).
        paper_normalisation: see step 4.
    Returns:
        (loss scalar, threshold, target after dropping). With no kept pixel the loss is
        ``0 * predict.sum()`` (the official code would return NaN).
    """
    n, _, h, w = predict.shape
    with torch.no_grad():
        entropy = pixel_entropy(torch.softmax(pred_teacher, dim=1))  # (N,H,W)
        valid = target != IGNORE  # (N,H,W)
        thresh = entropy_percentile(entropy, valid, percent)
        target = target.clone()
        if not math.isnan(thresh):
            target[entropy.ge(thresh) & valid] = IGNORE
        num_kept = torch.sum(target != IGNORE)
    if int(num_kept) == 0:
        return 0.0 * predict.sum(), thresh, target
    if paper_normalisation:
        ce = F.cross_entropy(predict, target, ignore_index=IGNORE, reduction="sum")
        return ce / (n * h * w), thresh, target
    weight = n * h * w / num_kept
    return weight * F.cross_entropy(predict, target, ignore_index=IGNORE), thresh, target


# ---------------------------------------------------------------------------------------------
# Memory bank and contrastive loss (L_c)
# ---------------------------------------------------------------------------------------------


def gather_rows(rows: Sequence[Tensor]) -> list[Tensor]:
    """All-gather a variable number of rows per group (class) from every rank.

    The official code pickles each class's keys through ``all_gather_object`` (one collective
    per class, plus a barrier). Here the rows of all classes travel together: one padded
    ``all_gather`` of the per-class counts and one of the concatenated rows
    (``vss.distributed.all_gather_cat``, which pads every rank to the largest size and uses a
    CUDA buffer under NCCL). The result keeps the official order: for each class, rank 0's rows,
    then rank 1's, ... Without an initialised process group the rows are returned as they are.

    Args:
        rows: K tensors (n_c, D) with one dtype.
    Returns:
        K tensors (sum over ranks of n_c, D) on the device of ``rows[0]``.
    """
    if get_world_size() == 1:
        return list(rows)
    flat = torch.cat(list(rows), dim=0)  # (n,D)
    counts = torch.tensor([[r.shape[0] for r in rows]], dtype=torch.long)  # (1,K)
    all_counts = all_gather_cat(counts)  # (world,K)
    all_rows = all_gather_cat(flat)  # (sum over ranks of n, D), in rank order
    per_rank = torch.split(all_rows, all_counts.sum(dim=1).tolist())
    per_rank_class = [torch.split(r, c.tolist()) for r, c in zip(per_rank, all_counts)]
    return [torch.cat([parts[k] for parts in per_rank_class]) for k in range(len(rows))]


class MemoryBank:
    """Per-class FIFO queues of negative keys (U2PL sec. 3.3; official ``dequeue_and_enqueue``).

    Enqueue appends the new keys and keeps the newest ``queue_size`` rows of each class. The
    queues start empty and live on the CPU (float32). ``ptrs`` mirrors the official queue
    pointer (``queue_size`` once full, else ``(ptr + n) % queue_size``); nothing reads it.

    Memory: full banks take ``4 * D * sum(sizes)`` bytes of host RAM on *every* rank; with the
    official sizes and VSPW's 124 classes that is ~3.8 GB per rank at D = 256 (U2PL's datasets
    had 19-21 classes), so smaller ``queue_size`` values are the practical choice on VSPW.
    ``state_dict`` lets a resumed run keep the banks (the official code starts them empty); it
    holds only the filled rows, so a checkpoint grows with the bank up to the same size.

    Args:
        num_classes: K.
        dim: key dimension D (256 for the U2PL head).
        queue_size: rows kept per class (official 30000).
        class0_queue_size: rows kept for class 0 (official 50000; ``None`` = ``queue_size``).
    """

    def __init__(
        self,
        num_classes: int,
        dim: int,
        *,
        queue_size: int = 30000,
        class0_queue_size: Optional[int] = 50000,
    ):
        if num_classes < 1 or dim < 1 or queue_size < 1:
            raise ValueError("MemoryBank needs num_classes, dim and queue_size >= 1")
        self.dim = dim
        self.sizes = [queue_size] * num_classes
        if class0_queue_size is not None:
            self.sizes[0] = class0_queue_size
        self.queues = [torch.zeros(0, dim) for _ in range(num_classes)]
        self.ptrs = [0] * num_classes

    @property
    def num_classes(self) -> int:
        return len(self.queues)

    def lengths(self) -> list[int]:
        return [q.shape[0] for q in self.queues]

    @torch.no_grad()
    def enqueue(self, keys: Sequence[Tensor]) -> list[int]:
        """Gather the keys of every rank (``gather_rows``) and append them.

        Args:
            keys: K tensors (n_c, D), one per class (any device, detached or not).
        Returns:
            The number of keys enqueued per class, summed over ranks.
        """
        if len(keys) != self.num_classes:
            raise ValueError(f"expected {self.num_classes} key tensors, got {len(keys)}")
        gathered = gather_rows([k.detach() for k in keys])
        added = []
        for c, new in enumerate(gathered):
            size = self.sizes[c]
            queue = torch.cat((self.queues[c], new.float().cpu()), dim=0)  # (n, D)
            if queue.shape[0] >= size:
                queue = queue[-size:]
                self.ptrs[c] = size
            else:
                self.ptrs[c] = (self.ptrs[c] + new.shape[0]) % size
            self.queues[c] = queue
            added.append(int(new.shape[0]))
        return added

    def state_dict(self) -> dict:
        """Tensors only, so it loads with ``torch.load(weights_only=True)``."""
        return {
            "queues": [q.clone() for q in self.queues],
            "sizes": torch.tensor(self.sizes),
            "ptrs": torch.tensor(self.ptrs),
        }

    def load_state_dict(self, state: dict) -> None:
        queues = list(state["queues"])
        if len(queues) != self.num_classes or any(q.shape[1:] != (self.dim,) for q in queues):
            raise ValueError(
                f"memory bank state has {len(queues)} queues of shapes "
                f"{[tuple(q.shape) for q in queues][:3]}..., "
                f"expected {self.num_classes} x (n, {self.dim})"
            )
        self.queues = [q.float().cpu().clone() for q in queues]
        self.sizes = [int(s) for s in state["sizes"]]
        self.ptrs = [int(p) for p in state["ptrs"]]


@dataclass
class ContrastiveConfig:
    """Hyper-parameters of the U2PL contrastive loss (official names and defaults)."""

    current_class_threshold: float = 0.3  # delta_p: teacher prob of an anchor pixel
    current_class_negative_threshold: float = 1.0  # delta_n: prob < 1 is a no-op (issue #109)
    low_rank: int = 3  # r_l
    high_rank: int = 20  # r_h
    temperature: float = 0.5
    num_queries: int = 256  # anchors sampled per class
    num_negatives: int = 50  # negatives per anchor


def _torch_randint(high: int, n: int) -> Tensor:
    return torch.randint(high, size=(n,))


def compute_contra_memobank_loss(
    rep: Tensor,
    label_l: Tensor,
    label_u: Tensor,
    prob_l: Tensor,
    prob_u: Tensor,
    low_mask: Tensor,
    high_mask: Tensor,
    cfg: ContrastiveConfig,
    memobank: MemoryBank,
    rep_teacher: Tensor,
    *,
    official_pairing: bool = True,
    paper_negatives: bool = False,
    randint: Optional[RandInt] = None,
) -> tuple[Tensor, list[int]]:
    """U2PL contrastive loss with a per-class memory bank of negatives (PVUW Eq. 6).

    The batch is the labelled images followed by the unlabelled ones (B = B_l + B_u); all
    maps are at the feature resolution (h, w).

    1. For every class c (in order): ``low_valid = onehot_c & low_mask``; anchor candidates =
       student ``rep`` where ``prob_c > delta_p`` and ``low_valid``; prototype = mean teacher
       rep over ``low_valid`` (detached); negatives = teacher rep where ``high_mask``,
       ``prob_c < delta_n`` and the rank rule holds (official: ``onehot_c == 1``, rank of c
       in ``[0, r_l)`` with ``label_l != c`` for labelled pixels, which contradict, and in
       ``[r_l, r_h)`` for unlabelled ones; see ``paper_negatives``).
    2. All negatives are gathered over ranks and enqueued (before any sampling).
    3. Valid classes = classes with a ``low_valid`` pixel. With <= 1 of them the loss is
       ``0 * rep.sum()`` (the banks are still updated).
    4. For each valid class entry: ``num_queries`` anchors and ``num_queries * num_negatives``
       bank rows drawn with replacement (``randint``); logits = cosine(anchor, [prototype,
       negatives]) / temperature; CE with target 0. An entry without candidates or with an
       empty bank adds 0 but still counts. Loss = sum / number of valid classes.

    Args:
        rep: (B,C,h,w) student representations (with grad).
        label_l: (B_l,K,h,w) one-hot labels of the labelled images (``label_onehot``).
        label_u: (B_u,K,h,w) one-hot pseudo labels of the unlabelled images.
        prob_l: (B_l,K,h,w) teacher probabilities, labelled images.
        prob_u: (B_u,K,h,w) teacher probabilities, unlabelled images.
        low_mask: (B,1,h,w) 1 where a pixel may be an anchor (labelled: label valid;
            unlabelled: low entropy and valid); see ``contrastive_inputs``.
        high_mask: (B,1,h,w) 1 where a pixel may be a negative (labelled: label valid;
            unlabelled: high entropy and valid).
        cfg: ``ContrastiveConfig``.
        memobank: the ``MemoryBank`` (updated in place).
        rep_teacher: (B,C,h,w) teacher representations.
        official_pairing: True (official, quirk 2): entry i uses the anchors and prototype
            of class i with the bank of the i-th valid class. False: each valid class with
            its own anchors, prototype and bank. Identical when the valid classes are
            0..V-1 (no class below the last valid one is missing).
        paper_negatives: False (official, quirk 3). True: negatives of class c are pixels
            whose label (pseudo label) is not c, in ``high_mask``, with c ranked in
            ``[0, r_l)`` (labelled) or ``[r_l, r_h)`` (unlabelled). Use with a per-image
            one-hot (``label_onehot(official=False)``).
        randint: ``randint(high, n) -> (n,) int64`` sampler (default ``torch.randint`` on
            the global generator, as the official code); tests inject recorded indices.
    Returns:
        (loss scalar, number of keys enqueued per class, summed over ranks).
    """
    randint = randint or _torch_randint
    num_labeled, num_classes = label_l.shape[:2]
    num_feat = rep.shape[1]
    nq, nn_ = cfg.num_queries, cfg.num_negatives

    onehot = torch.cat((label_l, label_u), dim=0).bool()  # (B,K,h,w)
    prob = torch.cat((prob_l, prob_u), dim=0)  # (B,K,h,w)
    low_valid = onehot & low_mask.bool()  # (B,K,h,w)
    high_ok = high_mask.bool()  # (B,1,h,w)
    rep_px = rep.permute(0, 2, 3, 1)  # (B,h,w,C)
    rep_t_px = rep_teacher.detach().permute(0, 2, 3, 1)  # (B,h,w,C)

    # Rank of every class in the teacher's descending order (0 = most likely).
    order = torch.sort(prob, dim=1, descending=True)[1]  # (B,K,h,w)
    rank = torch.empty_like(order).scatter_(
        1, order, torch.arange(num_classes, device=order.device).view(1, -1, 1, 1).expand_as(order)
    )  # (B,K,h,w)
    is_labeled = torch.zeros_like(high_ok)  # (B,1,h,w)
    is_labeled[:num_labeled] = True

    # 1. Anchors, prototypes and negatives per class.
    anchors, protos, keys, valid_classes = [], [], [], []
    for c in range(num_classes):
        low_c = low_valid[:, c]  # (B,h,w)
        prob_c = prob[:, c]  # (B,h,w)
        anchors.append(rep_px[(prob_c > cfg.current_class_threshold) & low_c])  # (n_a,C)
        protos.append(rep_t_px[low_c].mean(dim=0, keepdim=True))  # (1,C), NaN if empty
        rank_c = rank[:, c]  # (B,h,w)
        rank_ok = torch.where(
            is_labeled[:, 0],
            rank_c < cfg.low_rank,
            (rank_c >= cfg.low_rank) & (rank_c < cfg.high_rank),
        )  # (B,h,w)
        is_c = onehot[:, c]  # (B,h,w)
        if paper_negatives:
            class_ok = rank_ok & ~is_c
        else:
            # Official: high_valid needs label == c while the labelled rule needs label != c,
            # so only unlabelled pixels pseudo-labelled c (and c ranked in [r_l, r_h)) remain.
            class_ok = rank_ok & is_c & ~is_labeled[:, 0]
        neg = (prob_c < cfg.current_class_negative_threshold) & high_ok[:, 0] & class_ok
        keys.append(rep_t_px[neg])  # (n_k,C)
        if bool(low_c.any()):
            valid_classes.append(c)

    # 2. Enqueue before sampling.
    new_keys = memobank.enqueue(keys)

    # 3. Degenerate batch.
    if len(valid_classes) <= 1:
        return torch.tensor(0.0, device=rep.device) * rep.sum(), new_keys

    # 4. InfoNCE per valid class entry.
    if official_pairing:
        # (anchor/prototype class, bank class)
        pairs = [(i, valid_classes[i]) for i in range(len(valid_classes))]
    else:
        pairs = [(c, c) for c in valid_classes]
    loss = torch.tensor(0.0, device=rep.device)
    for anchor_c, bank_c in pairs:
        bank = memobank.queues[bank_c]  # (n_b,C) on CPU
        cand = anchors[anchor_c]  # (n_a,C)
        if cand.shape[0] == 0 or bank.shape[0] == 0:
            loss = loss + 0 * rep.sum()
            continue
        anchor = cand[randint(cand.shape[0], nq).to(cand.device)]  # (nq,C)
        with torch.no_grad():
            neg_idx = randint(bank.shape[0], nq * nn_).cpu()
            negatives = bank[neg_idx].to(device=rep.device, dtype=rep_t_px.dtype)
            negatives = negatives.reshape(nq, nn_, num_feat)  # (nq,nn,C)
            positive = protos[anchor_c].unsqueeze(0).expand(nq, 1, num_feat)  # (nq,1,C)
            all_keys = torch.cat((positive, negatives), dim=1)  # (nq,1+nn,C)
        logits = torch.cosine_similarity(anchor.unsqueeze(1), all_keys, dim=2)  # (nq,1+nn)
        target = torch.zeros(nq, dtype=torch.long, device=rep.device)
        loss = loss + F.cross_entropy(logits / cfg.temperature, target)
    return loss / len(valid_classes), new_keys


def entropy_masks(entropy: Tensor, valid: Tensor, alpha: float) -> tuple[Tensor, Tensor]:
    """Low/high-entropy masks of the unlabelled batch (train_semi.py).

    ``low = entropy <= percentile(entropy[valid], alpha)`` (anchor candidates),
    ``high = entropy >= percentile(entropy[valid], 100 - alpha)`` (negative candidates), both
    restricted to ``valid``; one threshold each for the whole batch.

    Args:
        entropy: (N,H,W) teacher entropy.
        valid: (N,H,W) bool, pseudo label != 255.
        alpha: ``unreliable_alpha(progress)`` in percent.
    Returns:
        (low, high) bool (N,H,W).
    """
    low_t = entropy_percentile(entropy, valid, alpha)
    high_t = entropy_percentile(entropy, valid, 100 - alpha)
    return entropy.le(low_t) & valid, entropy.ge(high_t) & valid


def contrastive_inputs(
    label_l: Tensor,
    label_u: Tensor,
    entropy_u: Tensor,
    alpha: float,
    size: tuple[int, int],
    num_classes: int,
    *,
    official_onehot: bool = True,
) -> dict[str, Tensor]:
    """The label/mask arguments of ``compute_contra_memobank_loss``, built as train_semi.py
    does (``negative_high_entropy: True``): masks at full resolution, then nearest-resized.

    Args:
        label_l: (B_l,H,W) int64 labels, 255 = ignore.
        label_u: (B_u,H,W) int64 pseudo labels (after CutMix), 255 = ignore.
        entropy_u: (B_u,H,W) teacher entropy of the unlabelled images.
        alpha: ``unreliable_alpha(progress)``.
        size: feature resolution (h, w).
        num_classes: K.
        official_onehot: passed to ``label_onehot(official=...)``.
    Returns:
        dict with ``label_l`` (B_l,K,h,w) and ``label_u`` (B_u,K,h,w) int64 one-hot,
        ``low_mask`` and ``high_mask`` (B,1,h,w) float32.
    """
    low_u, high_u = entropy_masks(entropy_u, label_u != IGNORE, alpha)  # (B_u,H,W)
    valid_l = (label_l != IGNORE).unsqueeze(1).float()  # (B_l,1,H,W)
    low = torch.cat((valid_l, low_u.unsqueeze(1).float()))  # (B,1,H,W)
    high = torch.cat((valid_l, high_u.unsqueeze(1).float()))  # (B,1,H,W)

    def small(x: Tensor) -> Tensor:
        return F.interpolate(x, size=size, mode="nearest")

    return {
        "label_l": small(label_onehot(label_l, num_classes, official=official_onehot)).long(),
        "label_u": small(label_onehot(label_u, num_classes, official=official_onehot)).long(),
        "low_mask": small(low),
        "high_mask": small(high),
    }


class RepresentationHead(nn.Module):
    """U2PL representation head (decoder.py ``representation``): two Conv3x3 + BN + ReLU +
    Dropout2d(0.1) blocks and a Conv1x1, no normalisation (the loss uses cosine similarity).

    In vss its input is the pixel decoder's stride-4 ``mask_features`` (U2PL: the 512-channel
    DeepLabv3+ decoder features at stride 4), so it runs parallel to the mask head.

    Args:
        in_channels: C of the input features (``ModelConfig.mask_dim``).
        dim: output dimension D (256 in U2PL).
        hidden: width of the two conv blocks (256 in U2PL).
    """

    def __init__(self, in_channels: int, dim: int = 256, hidden: int = 256):
        super().__init__()
        self.layers = nn.Sequential(
            nn.Conv2d(in_channels, hidden, kernel_size=3, padding=1, bias=True),
            nn.BatchNorm2d(hidden),
            nn.ReLU(inplace=True),
            nn.Dropout2d(0.1),
            nn.Conv2d(hidden, hidden, kernel_size=3, padding=1, bias=True),
            nn.BatchNorm2d(hidden),
            nn.ReLU(inplace=True),
            nn.Dropout2d(0.1),
            nn.Conv2d(hidden, dim, kernel_size=1, bias=True),
        )

    def forward(self, features: Tensor) -> Tensor:
        """(N,C,h,w) -> (N,D,h,w)."""
        return self.layers(features)


# ---------------------------------------------------------------------------------------------
# Schedules, EMA teacher, CutMix
# ---------------------------------------------------------------------------------------------


def _check_progress(progress: float) -> None:
    if not 0.0 <= progress <= 1.0:
        raise ValueError(f"progress must be in [0, 1] (epoch/epochs or iter/iters), got {progress}")


def drop_percent(progress: float, base: float = 80.0) -> float:
    """Kept percentile for ``compute_unsupervised_loss``: ``100 - (100 - base)(1 - t/T)``.

    Official: ``t/T = epoch / epochs`` (epoch-granular); ``iter / iters`` is the smooth form.

    Args:
        progress: t/T in [0, 1].
        base: the configured ``drop_percent`` (80 in every released config).
    Returns:
        The percentile in [base, 100].
    """
    _check_progress(progress)
    return 100 - (100 - base) * (1 - progress)


def unreliable_alpha(progress: float, base: float = 20.0) -> float:
    """``alpha_t = alpha_0 (1 - t/T)``: percent of lowest-entropy (anchor) and highest-entropy
    (negative) unlabelled pixels for the contrastive loss (``low_entropy_threshold`` = 20)."""
    _check_progress(progress)
    return base * (1 - progress)


def ema_decay(k: int, max_decay: float = 0.99) -> float:
    """``min(1 - 1/(k+1), max_decay)`` for the k-th (0-based) semi-supervised iteration; k = 0
    gives 0, i.e. the teacher becomes a copy of the student."""
    if k < 0:
        raise ValueError(f"EMA step must be >= 0, got {k}")
    return min(1 - 1 / (k + 1), max_decay)


@torch.no_grad()
def ema_update(teacher: nn.Module, student: nn.Module, decay: float) -> None:
    """``theta_t = decay * theta_t + (1 - decay) * theta_s`` over ``parameters()`` only.

    Buffers (BN statistics) are left alone, as in the official code: the teacher's come from
    its own train-mode forwards. Pass the unwrapped student (not the DDP wrapper).
    """
    t_params, s_params = list(teacher.parameters()), list(student.parameters())
    if len(t_params) != len(s_params):
        raise ValueError(f"teacher has {len(t_params)} parameters, student {len(s_params)}")
    for t, s in zip(t_params, s_params):
        if t.shape != s.shape:
            raise ValueError(f"parameter shape mismatch: teacher {tuple(t.shape)} vs student {tuple(s.shape)}")
        t.copy_(decay * t + (1 - decay) * s)


def poly_lr(base: float, i: int, max_iter: int, power: float = 0.9) -> float:
    """Poly learning rate ``base * (1 - i/max_iter) ** power`` for iteration i (0-based), the
    rate in force for the optimizer step of iteration i (official ``LRScheduler('poly')``)."""
    if not 0 <= i <= max_iter:
        raise ValueError(f"iteration {i} outside [0, {max_iter}]")
    return base * ((1 - float(i) / max_iter) ** power)


def generate_cutmix(
    images: Tensor,
    labels: Tensor,
    conf: Tensor,
    rng: Optional[np.random.RandomState] = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """CutMix of the unlabelled batch (official ``generate_unsup_data(mode='cutmix')``).

    For image i a rectangle of about H*W/2 pixels (width ~ U{floor(W/2)+1 .. W-1}, height
    ``round(H*W/2 / width)``, uniform position) is pasted from image (i+1) % B into image,
    labels and confidence alike.

    Args:
        images: (B,3,H,W) float.
        labels: (B,H,W) int64 pseudo labels.
        conf: (B,H,W) float confidences (or (B,…,H,W) logits).
        rng: numpy RandomState (default: numpy's global one, as the official code; seeding
            ``np.random.seed(s)`` or passing ``RandomState(s)`` draws the same rectangles).
    Returns:
        Mixed (images, labels int64, conf).
    """
    randint = rng.randint if rng is not None else np.random.randint
    b, _, h, w = images.shape
    keep = []
    for _ in range(b):
        # Three draws per image in the official order; numpy truncates the official float
        # bounds (W/2 + 1, H - h + 1), hence the int().
        cut_w = randint(int(w / 2 + 1), w)
        cut_h = np.round(h * w / 2 / cut_w)
        x0 = randint(0, w - cut_w + 1)
        y0 = randint(0, int(h - cut_h + 1))
        m = torch.ones(h, w, dtype=torch.long, device=images.device)
        m[y0 : int(y0 + cut_h), x0 : int(x0 + cut_w)] = 0
        keep.append(m)
    mask = torch.stack(keep)  # (B,H,W) 1 = keep image i, 0 = take image i+1
    nxt = torch.roll(torch.arange(b, device=images.device), -1)  # (B,) i -> (i+1) % B

    def mix(x: Tensor) -> Tensor:
        m = mask.view(b, *([1] * (x.dim() - 3)), h, w)
        return x * m + x[nxt] * (1 - m)

    return mix(images), mix(labels).long(), mix(conf)
