"""vss.ctvis (CTVIS contrastive learning of the segmenter's reid embeddings, DVIS++ stage 1):
the loss against a slow reference written from DVIS_Plus dvis_Plus/ctvis.py (TrainTracklet /
SimpleTrainMemory / loss_reid, one object and one item at a time), the slots from per-frame
matchings, and a tiny training run in which embeddings of one class across frames become closer
than embeddings of different classes."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from vss.config import tiny
from vss.ctvis import ctvis_loss, frame_slots
from vss.data import collate_clips, normalize
from vss.engine import build_optimizer, train_step
from vss.io import shift_labels
from vss.stages import STAGES
from vss.synthetic import render_video


class Tracklet:
    """DVIS_Plus ``TrainTracklet`` with momentum_embed on, noise_embed off."""

    def __init__(self):
        self.reid_embeds, self.negative_embeds, self.fused_list = [], [], []
        self.fused, self.exist_frames = None, 0

    def update(self, positive, negative):
        self.reid_embeds.append(positive)
        self.negative_embeds.append(negative)
        if positive is not None:
            if self.exist_frames == 0:
                self.fused = positive
            else:
                previous = torch.cat([e for e in self.reid_embeds[:-1] if e is not None])
                sim = (
                    torch.sum(
                        torch.einsum("bc,c->b", F.normalize(previous, dim=-1), F.normalize(positive.squeeze(), dim=-1))
                    )
                    / self.exist_frames
                )
                beta = max(0, sim)
                self.fused = (1 - beta) * self.fused + beta * positive
            self.fused_list.append(self.fused)
            self.exist_frames += 1
        else:
            self.fused_list.append(self.fused)

    def samples(self, frame_id, coin):
        anchor, positive = self.reid_embeds[frame_id], None
        if frame_id != sum(e is None for e in self.reid_embeds[:frame_id]):  # exists before
            if coin() > 0.5:
                positive = self.fused_list[frame_id - 1]
            else:
                positive = [e for e in self.reid_embeds[:frame_id] if e is not None][-1]
        elif any(e is not None for e in self.reid_embeds[frame_id + 1 :]):  # exists after (see vss.ctvis)
            positive = [e for e in self.reid_embeds[frame_id + 1 :] if e is not None][0]
        return anchor, positive, self.negative_embeds[frame_id - 1]


def reference_loss(reid, slots, generator):
    """``CTCLPlugin.get_reid_loss`` + ``loss_reid`` on (B,T,Q,C) embeddings and (B,T,M) slots."""
    coin = lambda: float(torch.rand((), generator=generator))  # noqa: E731
    items = []
    b_size, num_frames, num_queries, _ = reid.shape
    for b in range(b_size):
        memory = {}
        for j in range(num_frames):
            for m in range(slots.shape[2]):
                q = int(slots[b, j, m])
                if q >= 0:
                    anchor = reid[b, j, q][None]
                    negative = reid[b, j, sorted(set(range(num_queries)) - {q})]
                else:
                    anchor, negative = None, reid[b, j]
                memory.setdefault(m, Tracklet()).update(anchor, negative)
        for frame_id in range(1, num_frames):
            for m in range(slots.shape[2]):
                if memory[m].reid_embeds[frame_id] is None:
                    continue
                anchor, positive, negative = memory[m].samples(frame_id, coin)
                if positive is None:
                    continue
                pos_neg = torch.cat([positive, negative])
                label = torch.zeros(pos_neg.shape[0], dtype=torch.int64)
                label[:1] = 1
                items.append(
                    (
                        torch.einsum("ac,kc->ak", pos_neg, anchor),
                        torch.einsum("ac,kc->ak", F.normalize(pos_neg, dim=1), F.normalize(anchor, dim=1)),
                        label,
                    )
                )
    contras, aux = 0, 0
    for dot, cos, label in items:
        pred, label = dot.permute(1, 0), label[None]
        pos, neg = label == 1, label == 0
        pred_pos, pred_neg = pred * pos.float(), pred * neg.float()
        pred_pos[neg] = pred_pos[neg] + float("inf")
        pred_neg[pos] = pred_neg[pos] + float("-inf")
        x = F.pad(
            pred_neg.repeat(1, pred.shape[1]) - torch.repeat_interleave(pred_pos, pred.shape[1], dim=1),
            (0, 1),
            "constant",
            0,
        )
        contras = contras + torch.logsumexp(x, dim=1)
        aux = aux + ((cos.permute(1, 0) - label) ** 2).mean()
    return contras.sum() / len(items), aux / len(items), len(items)


@pytest.mark.parametrize("seed", range(4))
def test_ctvis_loss_matches_the_released_algorithm(seed):
    g = torch.Generator().manual_seed(seed)
    b, t, q, c, m = 2, 4, 7, 5, 4
    reid = torch.randn(b, t, q, c, generator=g, dtype=torch.float64).requires_grad_()
    slots = torch.full((b, t, m), -1, dtype=torch.long)
    for i in range(b):
        for j in range(t):
            present = torch.randperm(m, generator=g)[: int(torch.randint(1, m + 1, (), generator=g))]
            slots[i, j, present] = torch.randperm(q, generator=g)[: len(present)]
    slots[0, :, 3] = torch.tensor([-1, 2, -1, -1])  # appears once in the middle: no positive, no item
    slots[1, :, 0] = torch.tensor([-1, 4, 5, 6])  # first at t=1: its positive comes from later
    got = ctvis_loss(reid, slots, torch.Generator().manual_seed(100 + seed))
    expected_reid, expected_aux, count = reference_loss(reid, slots, torch.Generator().manual_seed(100 + seed))
    assert count > 4
    torch.testing.assert_close(got[0], expected_reid.to(got[0].dtype), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(got[1], expected_aux.to(got[1].dtype), rtol=1e-5, atol=1e-6)
    # gradients flow to the anchors, positives (fused ones too) and negatives alike
    grad_fast = torch.autograd.grad(got[0] + got[1], reid)[0]
    ref = reference_loss(reid, slots, torch.Generator().manual_seed(100 + seed))
    grad_ref = torch.autograd.grad(ref[0] + ref[1], reid)[0]
    torch.testing.assert_close(grad_fast, grad_ref.to(grad_fast.dtype), rtol=1e-4, atol=1e-6)


def test_no_items_gives_a_zero_in_the_graph():
    reid = torch.randn(1, 2, 3, 4, requires_grad=True)
    slots = torch.tensor([[[0, -1], [-1, 1]]])  # no class in two frames
    loss, aux = ctvis_loss(reid, slots)
    assert loss.item() == 0 and aux.item() == 0 and loss.requires_grad


def test_frame_slots_maps_frame_targets_to_clip_classes():
    clip_labels = [torch.tensor([0, 3, 5]), torch.tensor([2])]
    frame_labels = [torch.tensor([5, 0]), torch.tensor([3]), torch.tensor([2]), torch.tensor([], dtype=torch.long)]
    assignments = [
        (torch.tensor([4, 1]), torch.tensor([0, 1])),
        (torch.tensor([2]), torch.tensor([0])),
        (torch.tensor([0]), torch.tensor([0])),
        (torch.tensor([], dtype=torch.long),) * 2,
    ]
    slots = frame_slots(assignments, frame_labels, clip_labels, num_frames=2)
    assert slots.tolist() == [[[1, -1, 4], [-1, 2, -1]], [[0, -1, -1], [-1, -1, -1]]]


def _clips(num, frames, seed):
    """Synthetic 32x48 clips of 2 frames, normalised, with train-id labels."""
    cfg = tiny().data
    items = []
    for i in range(num):
        imgs, masks = render_video(seed + i, frames=frames, height=32, width=48, num_classes=4)
        labels = torch.from_numpy(shift_labels(np.stack(masks))).long()
        labels[labels >= 4] = 255
        items.append(
            {
                "frames": normalize(np.stack(imgs), cfg),
                "labels": labels,
                "video": str(i),
                "frame_names": [str(t) for t in range(frames)],
            }
        )
    return items


def _separation(model, matcher, batches):
    """Mean cosine of one class's matched embeddings in two frames minus that of two classes."""
    same, other = [], []
    model.eval()
    with torch.no_grad():
        for batch in batches:
            out = model.segmenter(batch["frames"].flatten(0, 1))
            targets = [{"labels": tg["labels"], "masks": tg["masks"]} for tg in batch["targets"]]
            frame_targets = [
                {
                    "labels": tg["labels"][tg["masks"][:, t].flatten(1).any(1)],
                    "masks": tg["masks"][tg["masks"][:, t].flatten(1).any(1), t],
                }
                for tg in targets
                for t in range(2)
            ]
            slots = frame_slots(
                matcher.match_batch(
                    {"pred_logits": out["pred_logits"], "pred_masks": out["pred_masks"]}, frame_targets
                ),
                [f["labels"] for f in frame_targets],
                [tg["labels"] for tg in targets],
                2,
            )
            width = out["pred_embds"].shape[-1] // 2
            reid = F.normalize(out["pred_embds"][..., width:].unflatten(0, (len(targets), 2)), dim=-1)
            for b in range(len(targets)):
                both = [m for m in range(slots.shape[2]) if (slots[b, :, m] >= 0).all()]
                for m in both:
                    a = reid[b, 0, slots[b, 0, m]]
                    same.append(float(a @ reid[b, 1, slots[b, 1, m]]))
                    other += [float(a @ reid[b, 1, slots[b, 1, n]]) for n in both if n != m]
    return np.mean(same) - np.mean(other)


def test_a_tiny_ctvis_run_separates_classes_across_frames():
    """Stage 1 with CTVIS on synthetic 2-frame clips: afterwards the reid embeddings of one class in
    two frames of held-out clips are closer (cosine) than those of two different classes, by a
    clear margin; without CTVIS the reid head is frozen."""
    torch.manual_seed(0)
    cfg = tiny()
    m = cfg.model
    m.num_classes, m.resnet_width, m.conv_dim, m.mask_dim, m.hidden_dim = 4, 16, 64, 64, 32
    m.enc_layers, m.enc_ffn_dim, m.enc_heads, m.num_queries, m.nheads, m.dim_feedforward, m.dec_layers = (
        1,
        64,
        2,
        10,
        2,
        64,
        3,
    )
    cfg.loss.num_points, cfg.loss.ctvis, cfg.optim.lr = 256, True, 1e-3
    train_items, held_out = _clips(8, 2, 0), _clips(4, 2, 100)
    batches = [collate_clips(train_items[i : i + 2]) for i in range(0, 8, 2)]
    test_batches = [collate_clips(held_out[i : i + 2]) for i in range(0, 4, 2)]
    model, criterion = STAGES["segmenter"].build(cfg, "segmenter")
    reid_head = {k: v.clone() for k, v in model.segmenter.transformer_decoder.reid_embed.state_dict().items()}
    before = _separation(model, criterion.matcher, test_batches)
    optimizer = build_optimizer(model, cfg.optim)
    for step in range(1, 61):
        model.train()
        out = train_step(
            model,
            [batches[step % 4]],
            lambda mdl, b: STAGES["segmenter"].loss(mdl, criterion, b, step, cfg),
            optimizer,
            None,
            None,
            cfg.optim.clip_grad,
        )
        assert "loss_reid" in out and "loss_aux_reid" in out
    after = _separation(model, criterion.matcher, test_batches)
    assert after > 0.3 and after > before + 0.2, (before, after)
    changed = model.segmenter.transformer_decoder.reid_embed.state_dict()
    assert any(not torch.equal(reid_head[k], changed[k]) for k in reid_head)
    cfg.loss.ctvis = False  # MinVIS-style stage 1: the reid head is frozen
    plain, _ = STAGES["segmenter"].build(cfg, "segmenter")
    assert not any(p.requires_grad for p in plain.segmenter.transformer_decoder.reid_embed.parameters())
