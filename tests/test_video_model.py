"""The three stages together (vss/video_model.py): freezing, the stage losses (consistent and
guided matching, reid items, class memory), whole-video inference (windowing, memory, the VSS
merge against a direct computation) and small overfitting runs."""

import gc
import runpy
import warnings

from helpers import REPO
import numpy as np
import pytest
import torch
from torch import nn
import torch.nn.functional as F

from vss.config import tiny
from vss.criterion import SetCriterion
from vss.data import collate_clips, normalize
from vss.io import shift_labels
from vss.matcher import HungarianMatcher
from vss.refiner import TemporalRefiner
from vss.segmenter import semantic_inference
from vss.synthetic import render_video
import vss.tracker as tracker_mod
from vss.tracker import ReferringTracker
from vss.video_model import (
    _segmenter_mask_features,
    build_video_model,
    ClassMemory,
    load_previous_stage,
    predict_video,
    refiner_loss,
    refiner_reid_loss,
    tracker_loss,
    tracker_reid_loss,
    video_loss,
    VideoModel,
)

K_CLASSES, Q, D, MASK_DIM = 3, 5, 8, 6


class StandInSegmenter(nn.Module):
    """A per-frame segmenter with the contract's outputs: a stride-4 conv stem (with BatchNorm, to
    see eval/train mode) for the mask features and Q queries reading them by attention."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Sequential(
            nn.Conv2d(3, MASK_DIM, 4, stride=4), nn.BatchNorm2d(MASK_DIM), nn.ReLU(), nn.Conv2d(MASK_DIM, MASK_DIM, 1)
        )
        self.query = nn.Parameter(torch.randn(Q, D))
        self.key = nn.Linear(D, MASK_DIM)
        self.read = nn.Linear(MASK_DIM, D)
        self.norm = nn.LayerNorm(D)
        self.reid = nn.Linear(D, D)
        self.cls = nn.Linear(D, K_CLASSES + 1)
        self.mask_embed = nn.Linear(D, MASK_DIM)

    def forward(self, images):
        feats = self.stem(images)  # (N,Cm,h,w)
        att = torch.einsum("qc,nchw->nqhw", self.key(self.query), feats).flatten(2).softmax(-1)
        q = self.query + self.read(torch.einsum("nql,ncl->nqc", att, feats.flatten(2)))  # (N,Q,D)
        normed = self.norm(q)
        reid = self.reid(normed)
        logits = self.cls(normed)
        masks = torch.einsum("nqc,nchw->nqhw", self.mask_embed(normed), feats)
        return {
            "pred_logits": logits,
            "pred_masks": masks,
            "aux_outputs": [{"pred_logits": logits, "pred_masks": masks}],
            "pred_embds": torch.cat([normed, reid], -1),
            "pred_embds_without_norm": torch.cat([q, reid], -1),
            "mask_features": feats,
        }


def make_model(stage, noise_ratio=0.5, seed=0, window_size=3):
    torch.manual_seed(seed)
    seg = StandInSegmenter()
    trk = (
        ReferringTracker(
            hidden_dim=2 * D,
            nheads=2,
            dim_feedforward=32,
            num_layers=2,
            mask_dim=MASK_DIM,
            num_classes=K_CLASSES,
            noise_ratio=noise_ratio,
        )
        if stage != "segmenter"
        else None
    )
    ref = (
        TemporalRefiner(
            hidden_dim=2 * D, nheads=2, dim_feedforward=32, num_layers=2, mask_dim=MASK_DIM, num_classes=K_CLASSES
        )
        if stage == "refiner"
        else None
    )
    return VideoModel(seg, trk, ref, stage, window_size=window_size)


def make_criterion(num_points=64):
    matcher = HungarianMatcher(num_points=num_points)
    cfg = tiny().loss
    cfg.num_points = num_points
    return SetCriterion(K_CLASSES, matcher, cfg)


def make_batch(b=2, t=3, h=32, w=32, seed=0):
    g = torch.Generator().manual_seed(seed)
    items = []
    for i in range(b):
        labels = torch.randint(0, K_CLASSES, (t, h // 8, w // 8), generator=g)
        labels = labels.repeat_interleave(8, 1).repeat_interleave(8, 2)
        items.append(
            {
                "frames": torch.randn(t, 3, h, w, generator=g),
                "labels": labels,
                "video": f"v{i}",
                "frame_names": [str(j) for j in range(t)],
            }
        )
    return collate_clips(items)


# --------------------------------------------------------------------------------------------
# Stages, freezing
# --------------------------------------------------------------------------------------------


def test_stage_forward_contracts():
    batch = make_batch()
    model = make_model("tracker").train()
    out = model(batch["frames"])
    assert out["tracker"]["pred_logits"].shape == (2, 3, Q, K_CLASSES + 1)
    assert out["tracker"]["pred_masks"].shape == (2, 3, Q, 8, 8)
    assert out["tracker"]["pred_references"].shape == (2, 3, Q, 2 * D)
    assert out["segmenter"]["pred_masks"].shape == (2, 3, Q, 8, 8)
    # the guidance is the segmenter output re-ordered by the tracker's recorded indices
    with torch.no_grad():
        seg = model.segment(batch["frames"])
    idx = out["tracker"]["indices"]
    expected = torch.stack([torch.stack([seg["pred_logits"][b, t][idx[b, t]] for t in range(3)]) for b in range(2)])
    assert torch.equal(out["segmenter"]["pred_logits"], expected)

    model3 = make_model("refiner").train()
    out3 = model3(batch["frames"])
    assert out3["refiner"]["pred_masks"].shape == (2, 3, Q, 8, 8)
    assert len(out3["refiner"]["aux_outputs"]) == 1
    assert "aux_outputs" not in out3["tracker"]  # frozen tracker: last layer only

    model1 = make_model("segmenter")
    assert model1(batch["frames"])["pred_logits"].shape == (6, Q, K_CLASSES + 1)
    with pytest.raises(ValueError, match="needs a tracker"):
        VideoModel(StandInSegmenter(), stage="tracker")


@pytest.mark.parametrize("stage", ["tracker", "refiner"])
def test_frozen_parts_get_no_gradient_and_stay_bitwise_unchanged(stage):
    model = make_model(stage).train()
    frozen = {"tracker": ["segmenter"], "refiner": ["segmenter", "tracker"]}[stage]
    for name in frozen:
        module = getattr(model, name)
        assert not module.training and not any(p.requires_grad for p in module.parameters())
    assert getattr(model, stage).training
    before = {k: v.clone() for k, v in model.state_dict().items()}
    # an optimizer over every parameter, weight decay on: frozen ones must still not move
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.05)
    losses = video_loss(model, make_batch(), make_criterion(), guided=False)
    assert "loss_reid" in losses and "loss_ce_0" in losses
    sum(losses.values()).backward()
    for name in frozen:
        assert all(p.grad is None for p in getattr(model, name).parameters())
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in getattr(model, stage).parameters())
    opt.step()
    after = model.state_dict()
    for key, value in before.items():
        if key.split(".")[0] in frozen:
            assert torch.equal(value, after[key]), key  # includes BatchNorm running stats
    assert any(not torch.equal(before[k], after[k]) for k in before if k.startswith(stage + "."))


def test_denoiser_runs_in_tracker_training_only(monkeypatch):
    calls = []

    def counting_noise(raw, generator=None):
        calls.append(1)
        return tracker_mod.__dict__["_real_wa_noise"](raw, generator)

    monkeypatch.setitem(tracker_mod.__dict__, "_real_wa_noise", tracker_mod.wa_noise)
    monkeypatch.setattr(tracker_mod, "wa_noise", counting_noise)
    frames = make_batch(t=4)["frames"]
    model3 = make_model("refiner", noise_ratio=1.0).train()
    model3(frames)
    assert calls == []  # stage 3: the frozen tracker is in eval mode
    model2 = make_model("tracker", noise_ratio=1.0).train()
    model2(frames)
    assert len(calls) == 3  # frames 1..3 (one draw per frame for the batch)
    model2.eval()
    predict_video(model2, frames[0], (32, 32))
    assert len(calls) == 3


@pytest.mark.parametrize("stage", ["tracker", "refiner"])
def test_video_loss_under_bf16_autocast(stage):
    model = make_model(stage).train()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        losses = video_loss(model, make_batch(b=1), make_criterion(), guided=False)
    total = sum(v.float() for v in losses.values())
    assert torch.isfinite(total)
    total.backward()


def test_train_and_predict_restore_modes():
    model = make_model("refiner").train()
    predict_video(model, make_batch(b=1)["frames"][0], (16, 16))
    assert model.training and model.refiner.training
    assert not model.tracker.training and not model.segmenter.training


def test_load_previous_stage():
    stage1 = make_model("segmenter", seed=1)
    stage2 = make_model("tracker", seed=2)
    assert load_previous_stage(stage2, stage1.state_dict()) == ["tracker"]
    for k, v in stage1.state_dict().items():
        assert torch.equal(stage2.state_dict()[k], v)
    bad = dict(stage1.state_dict(), **{"segmenter.extra": torch.zeros(1)})
    with pytest.raises(ValueError, match="ckpt.pt: keys not in"):
        load_previous_stage(stage2, bad, "ckpt.pt")
    partial = {k: v for k, v in stage1.state_dict().items() if "stem.0" not in k}
    with pytest.raises(ValueError, match="only partly present"):
        load_previous_stage(stage2, partial)


# --------------------------------------------------------------------------------------------
# Losses
# --------------------------------------------------------------------------------------------


def spy_criterion(monkeypatch):
    """Record every SetCriterion call (also on copies made by the loss code)."""
    calls = []
    real = SetCriterion.forward

    def forward(self, outputs, targets, indices=None):
        calls.append(
            {
                "indices": indices,
                "targets": targets,
                "outputs": outputs,
                "num_points": (self.num_points, self.matcher.num_points),
            }
        )
        return real(self, outputs, targets, indices)

    monkeypatch.setattr(SetCriterion, "forward", forward)
    return calls


def square_masks(t, size=8):
    """Logits: +10 on the left half (mask "L"), right half ("R") or nowhere ("0")."""
    left = torch.full((size, size), -10.0)
    left[:, : size // 2] = 10.0
    return {"L": left, "R": left.flip(1), "0": torch.full((size, size), -10.0)}


def test_tracker_loss_consistent_matching_is_found_at_frame_zero_and_reused(monkeypatch):
    m = square_masks(2)
    logits = torch.full((1, 2, 4, K_CLASSES + 1), -10.0)
    logits[..., K_CLASSES] = 10.0  # everything "no object" by default
    masks = m["0"].expand(1, 2, 4, 8, 8).clone()
    # frame 0: query 1 = class 0 left, query 2 = class 1 right
    logits[0, 0, 1, 0], logits[0, 0, 1, K_CLASSES] = 10.0, -10.0
    logits[0, 0, 2, 1], logits[0, 0, 2, K_CLASSES] = 10.0, -10.0
    masks[0, 0, 1], masks[0, 0, 2] = m["L"], m["R"]
    # frame 1: query 3 would fit class 0 best, query 0 class 1
    logits[0, 1, 3, 0], logits[0, 1, 3, K_CLASSES] = 10.0, -10.0
    logits[0, 1, 0, 1], logits[0, 1, 0, K_CLASSES] = 10.0, -10.0
    masks[0, 1, 3], masks[0, 1, 0] = m["L"], m["R"]
    targets = [
        {
            "labels": torch.tensor([0, 1]),
            "masks": torch.stack([m["L"] > 0, m["R"] > 0])[:, None].expand(2, 2, 8, 8).clone(),
        }
    ]
    refs = torch.randn(1, 2, 4, 2 * D)
    track = {
        "pred_logits": logits,
        "pred_masks": masks,
        "pred_references": refs,
        "aux_outputs": [{"pred_logits": logits.flip(2), "pred_masks": masks.flip(2)}],
    }
    criterion = make_criterion()
    calls = spy_criterion(monkeypatch)
    tracker_loss({"tracker": track}, targets, criterion, guided=False, reid_weight=2.0)
    final, aux = calls
    assert len(final["indices"]) == 2  # one entry per frame image
    for q_idx, t_idx in final["indices"]:  # both frames use the frame-0 assignment
        assert q_idx.tolist() == [1, 2] and t_idx.tolist() == [0, 1]
    for q_idx, t_idx in aux["indices"]:  # the aux layer is re-matched on its own outputs
        assert q_idx.tolist() == [1, 2] and t_idx.tolist() == [1, 0]
    # targets of a frame: every clip class, even with an empty mask there
    assert [len(t["labels"]) for t in final["targets"]] == [2, 2]

    # two clips: images are clip-major, each clip keeps its own assignment on all its frames
    perm = [2, 3, 0, 1]  # clip 1 = clip 0 with new slot i holding old query perm[i]
    batched = {
        "pred_logits": torch.cat([logits, logits[:, :, perm]]),
        "pred_masks": torch.cat([masks, masks[:, :, perm]]),
        "pred_references": torch.randn(2, 2, 4, 2 * D),
    }
    calls.clear()
    tracker_loss({"tracker": batched}, targets * 2, criterion, guided=False, reid_weight=2.0)
    got = [(q.tolist(), t.tolist()) for q, t in calls[0]["indices"]]
    assert got == [([1, 2], [0, 1])] * 2 + [([0, 3], [1, 0])] * 2

    # guided: matched once on the (re-ordered) segmenter outputs, for every layer
    seg = {"pred_logits": logits[:, :, [3, 0, 2, 1]], "pred_masks": masks[:, :, [3, 0, 2, 1]]}
    calls.clear()
    tracker_loss({"tracker": track, "segmenter": seg}, targets, criterion, guided=True, reid_weight=2.0)
    assert len(calls) == 2
    for call in calls:  # segmenter slot 3 (its query 1) = class 0, slot 2 = class 1
        for q_idx, t_idx in call["indices"]:
            assert q_idx.tolist() == [2, 3] and t_idx.tolist() == [1, 0]


def test_refiner_loss_video_level_guided_by_tracker(monkeypatch):
    m = square_masks(3)
    t_frames = 3
    ref_logits = torch.full((1, t_frames, 4, K_CLASSES + 1), -10.0)
    ref_logits[..., K_CLASSES] = 10.0
    ref_logits[0, :, 1, 0], ref_logits[0, :, 1, K_CLASSES] = 10.0, -10.0
    ref_masks = m["0"].expand(1, t_frames, 4, 8, 8).clone()
    ref_masks[0, :, 1] = m["L"]
    trk_logits, trk_masks = ref_logits[:, :, [2, 3, 1, 0]], ref_masks[:, :, [2, 3, 1, 0]]  # tracker: query 2
    targets = [{"labels": torch.tensor([0]), "masks": (m["L"] > 0).expand(1, t_frames, 8, 8).clone()}]
    embeds = torch.randn(1, t_frames, 4, 2 * D)
    outputs = {
        "refiner": {"pred_logits": ref_logits, "pred_masks": ref_masks, "pred_embds": embeds},
        "tracker": {"pred_logits": trk_logits, "pred_masks": trk_masks},
    }
    criterion = make_criterion(num_points=50)
    calls = spy_criterion(monkeypatch)
    refiner_loss(outputs, targets, criterion, guided=False, reid_weight=2.0, memory=None)
    assert calls[0]["num_points"] == (150, 150)  # T * num_points, criterion and matcher
    assert calls[0]["targets"][0]["masks"].shape == (1, 24, 8)  # (M, T*H, W)
    assert calls[0]["outputs"]["pred_masks"].shape == (1, 4, 24, 8)
    assert calls[0]["indices"][0][0].tolist() == [1]
    calls.clear()
    refiner_loss(outputs, targets, criterion, guided=True, reid_weight=2.0, memory=None)
    assert calls[0]["indices"][0][0].tolist() == [2]
    assert criterion.num_points == criterion.matcher.num_points == 50  # the caller's is untouched


def idol(anchor, positives, negatives):
    """log(1 + sum_p sum_n exp(n.a - p.a)) written out."""
    total = 0.0
    for p in positives:
        for n in negatives:
            total = total + torch.exp(n @ anchor - p @ anchor)
    return torch.log1p(total)


def test_tracker_reid_loss_matches_item_by_item_reference():
    refs = torch.randn(2, 3, 4, 6) * 0.3
    assignments = [(torch.tensor([0, 2]), torch.tensor([1, 0])), (torch.tensor([3]), torch.tensor([0]))]
    items = []
    for b, (slots, _) in enumerate(assignments):
        for t in range(1, 3):
            for k in slots.tolist():
                others = [j for j in range(4) if j != k]
                for s in [t - 1] + ([t + 1] if t < 2 else []):
                    items.append(idol(refs[b, t, k], refs[b, s, k][None], refs[b, s, others]))
    expected = torch.stack(items).mean()
    torch.testing.assert_close(tracker_reid_loss(refs, assignments), expected, atol=1e-5, rtol=1e-5)


def test_refiner_reid_loss_with_class_memory():
    torch.manual_seed(0)
    embeds = torch.randn(1, 3, 4, 6) * 0.3
    labels = torch.tensor([2, 0])
    assignment = (torch.tensor([1, 3]), torch.tensor([1, 0]))  # slot 1 -> class 0, slot 3 -> class 2
    memory = ClassMemory(max_len=5)
    stored = torch.randn(2, 6) * 0.3
    memory.items[0] = stored.clone()
    items = []
    for t in range(3):
        for k, cls in [(1, 0), (3, 2)]:
            others = [j for j in range(4) if j != k]
            items.append(idol(embeds[0, t, k], embeds[0, :, k], embeds[0, t, others]))
            if cls == 0:
                items.append(idol(embeds[0, t, k], embeds[0, :, k], stored))
    expected = torch.stack(items).mean()
    views = memory.views_then_push(embeds, [{"labels": labels}], [assignment])
    got = refiner_reid_loss(embeds, [assignment], [{"labels": labels}], views)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
    # the clip read the memory before its own push: class 0 had 2 + 3 = 5 (kept), class 2 got
    # the 3 frames of slot 3
    assert set(views[0]) == {0} and memory.items[0].shape == (5, 6) and memory.items[2].shape == (3, 6)
    torch.testing.assert_close(memory.items[2], embeds[0, :, 3])
    memory.views_then_push(embeds, [{"labels": labels}], [assignment])
    assert memory.items[0].shape == (5, 6) and memory.items[2].shape == (5, 6)  # trimmed to max_len


def test_refiner_mvc_masked_pass_reads_the_clean_pass_view_and_never_pushes(monkeypatch):
    """Stage 3 with MVC: the masked pass reads the class memory exactly as the clean pass read it
    (earlier videos only, never its own clip) and adds nothing, so after an MVC step the memory
    equals the memory after a plain step."""
    import vss.video_model as vm

    batch = make_batch(b=2, t=3)
    earlier = {c: torch.randn(4, 2 * D) for c in range(K_CLASSES)}  # embeddings of earlier videos
    calls = []
    real = vm.refiner_reid_loss
    monkeypatch.setattr(vm, "refiner_reid_loss", lambda e, a, t, views: calls.append(views) or real(e, a, t, views))
    memories = {}
    for name, settings in (("plain", None), ("mvc", {"patch_size": 8, "ratio": 0.5, "weight": 1.0})):
        model = make_model("refiner").train()
        model.class_memory.items = dict(earlier)
        calls.clear()
        torch.manual_seed(0)
        video_loss(model, batch, make_criterion(), guided=True, mvc=settings)
        memories[name] = model.class_memory.items
        views = list(calls)
    clean, masked = views
    assert masked is clean  # the same per-clip views
    assert all(clean[0][c] is earlier[c] for c in earlier)  # clip 0 reads only the earlier videos
    # clip 1 reads clip 0's pushes but never its own embeddings
    assert any(clean[1][c].shape[0] > 4 for c in clean[1])
    assert memories["plain"].keys() == memories["mvc"].keys()
    for c in memories["plain"]:  # same pushes: the masked pass added nothing
        assert torch.equal(memories["plain"][c], memories["mvc"][c]), c


def test_mvc_masked_pass_leaves_batchnorm_statistics_as_the_clean_pass_left_them():
    """A segmenter with trainable BatchNorm (as tiny's, frozen_bn=False): an MVC step and a plain
    step from the same state and batch leave identical BN buffers (running mean/var, counts)."""
    batch = make_batch(b=1, t=2)
    states = {}
    for name, settings in (("plain", None), ("mvc", {"patch_size": 8, "ratio": 0.7, "weight": 1.0})):
        torch.manual_seed(0)
        model = make_model("segmenter").train()
        bn = [m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)]
        assert bn and all(m.training and m.track_running_stats for m in bn)
        torch.manual_seed(1)
        video_loss(model, batch, make_criterion(), mvc=settings)
        assert all(m.track_running_stats for m in bn)  # restored after the masked pass
        states[name] = {k: v.clone() for k, v in model.state_dict().items() if "running_" in k or "num_batches" in k}
    assert states["plain"].keys() == states["mvc"].keys() and states["plain"]
    for key in states["plain"]:
        assert torch.equal(states["plain"][key], states["mvc"][key]), key


def test_benchmark_undo_fix_restores_the_two_mvc_bugs(monkeypatch):
    """benchmarks/undo_fix.py, which measures what the fixes changed, brings back exactly the old
    behaviour: the masked pass moves the BN running statistics (counts 2 per layer instead of 1),
    and the stage-3 masked pass pushes its embeddings into the class memory a second time."""
    import vss.mvc
    import vss.video_model as vm

    undo = runpy.run_path(str(REPO / "benchmarks" / "undo_fix.py"))
    monkeypatch.setattr(vss.mvc, "batch_norm_statistics_kept", vss.mvc.batch_norm_statistics_kept)
    monkeypatch.setattr(vm, "refiner_loss", vm.refiner_loss)
    settings = {"patch_size": 8, "ratio": 0.5, "weight": 1.0}
    pushed = {}
    for undone in (False, True):
        if undone:
            undo["undo_bn_stats"]()
            undo["undo_memory"]()
        torch.manual_seed(0)
        model = make_model("segmenter").train()
        video_loss(model, make_batch(b=1, t=2), make_criterion(), mvc=settings)
        counts = {int(m.num_batches_tracked) for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)}
        assert counts == ({2} if undone else {1})
        model = make_model("refiner").train()
        torch.manual_seed(0)
        video_loss(model, make_batch(b=2, t=3), make_criterion(), guided=True, mvc=settings)
        pushed[undone] = sum(e.shape[0] for e in model.class_memory.items.values())
    assert pushed[True] == 2 * pushed[False] > 0


def test_video_loss_mvc_feeds_masked_frames_to_frozen_segmenter():
    model = make_model("tracker").train()
    seen = []
    model.segmenter.register_forward_hook(lambda mod, args, out: seen.append(args[0].clone()))
    batch = make_batch(b=1, t=2)
    mvc = {"patch_size": 8, "ratio": 0.5, "weight": 0.5, "generator": torch.Generator().manual_seed(0)}
    losses = video_loss(model, batch, make_criterion(), guided=True, mvc=mvc)
    assert "loss_reid" in losses and "mvc_loss_reid" in losses and "mvc_loss_dice_0" in losses
    assert len(seen) == 2
    assert torch.equal(seen[0], batch["frames"].flatten(0, 1))
    hidden = seen[1] == 0
    assert 0.2 < hidden.float().mean() < 0.8


# --------------------------------------------------------------------------------------------
# Inference
# --------------------------------------------------------------------------------------------


def manual_scores(class_probs, mask_logits, padded, valid, out_size, sigmoid_first=True):
    m = F.interpolate(mask_logits[None], size=padded, mode="bilinear", align_corners=False)[
        :, :, : valid[0], : valid[1]
    ]
    if sigmoid_first:
        m = F.interpolate(m.sigmoid(), size=out_size, mode="bilinear", align_corners=False)[0]
    else:
        m = F.interpolate(m, size=out_size, mode="bilinear", align_corners=False)[0].sigmoid()
    return torch.einsum("qk,qhw->khw", class_probs, m)


@pytest.mark.parametrize("stage", ["segmenter", "tracker", "refiner"])
def test_predict_video_equals_direct_whole_video_computation(stage):
    model = make_model(stage).eval()
    frames = torch.randn(7, 3, 30, 40)
    result = predict_video(model, frames, (20, 24), return_probs=True, window_size=3)
    padded = torch.zeros(7, 3, 32, 64)
    padded[:, :, :30, :40] = frames
    with torch.no_grad():
        seg = model.segmenter(padded)
        if stage == "segmenter":
            m = F.interpolate(seg["pred_masks"], size=(32, 64), mode="bilinear")[:, :, :30, :40]
            m = F.interpolate(m, size=(20, 24), mode="bilinear")
            scores = semantic_inference(seg["pred_logits"], m)  # (T,K,H0,W0)
        else:
            track, _ = model.tracker(
                seg["pred_embds"][None], seg["pred_embds_without_norm"][None], seg["mask_features"][None]
            )
            online = track["pred_logits"][0].mean(0).softmax(-1)[:, :-1]
            if stage == "tracker":
                probs, masks = online, track["pred_masks"][0]
            else:
                refined = model.refiner(
                    track["pred_embds"], seg["pred_embds_without_norm"][None], seg["mask_features"][None]
                )
                offline = refined["pred_logits"][0].mean(0).softmax(-1)[:, :-1]
                probs, masks = torch.maximum(offline, online), refined["pred_masks"][0]
            scores = torch.stack([manual_scores(probs, masks[t], (32, 64), (30, 40), (20, 24)) for t in range(7)])
    assert result["labels"].dtype == torch.int64 and result["labels"].shape == (7, 20, 24)
    assert torch.equal(result["labels"], scores.argmax(1))
    torch.testing.assert_close(result["probs"], scores / scores.sum(1, keepdim=True), atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(result["probs"].sum(1), torch.ones(7, 20, 24))


@pytest.mark.parametrize("stage", ["segmenter", "tracker", "refiner"])
def test_windowed_inference_equals_one_window_on_60_frames(stage):
    model = make_model(stage, seed=3)
    g = torch.Generator().manual_seed(5)
    frames = torch.randn(60, 3, 24, 28, generator=g)
    small = predict_video(model, frames, (24, 28), return_probs=True, window_size=3)
    whole = predict_video(model, frames, (24, 28), return_probs=True, window_size=60)
    assert torch.equal(small["labels"], whole["labels"])
    torch.testing.assert_close(small["probs"], whole["probs"], atol=1e-5, rtol=1e-5)
    assert predict_video(model, frames[:4], (24, 28))["probs"] is None


def live_bytes_at(hw):
    """Bytes of all live tensor storages holding stride-4 maps (shape (..., h, w)), each storage
    counted once; views keep their whole base storage alive, so slices of a whole-video tensor
    count in full, and so do lists of per-window tensors."""
    storages = {}
    with warnings.catch_warnings():  # inspecting deprecated torch objects warns
        warnings.simplefilter("ignore")
        for obj in gc.get_objects():
            try:
                if isinstance(obj, torch.Tensor) and tuple(obj.shape[-2:]) == hw:
                    storage = obj.untyped_storage()
                    storages[storage.data_ptr()] = storage.nbytes()
            except Exception:  # objects that break on inspection
                continue
    return sum(storages.values())


@pytest.mark.parametrize("stage", ["tracker", "refiner"])
def test_inference_never_holds_whole_video_mask_features(stage):
    model = make_model(stage)
    num_frames, window, hw = 24, 3, (8, 8)
    # a few windows of mask features / masks may be alive at once; the video is 10 windows
    limit = 4 * window * max(MASK_DIM, Q) * hw[0] * hw[1] * 4
    seen = []
    model.segmenter.register_forward_hook(lambda mod, args, out: seen.append(live_bytes_at(hw)))
    predict_video(model, torch.randn(num_frames, 3, 32, 32), (16, 16), window_size=window)
    assert len(seen) == 2 * num_frames // window  # the online pass, then the mask pass
    assert max(seen) <= limit, (seen, limit)
    baseline = live_bytes_at(hw)
    hoard = [torch.zeros(window, MASK_DIM, *hw) for _ in range(num_frames // window)]  # the check sees this
    assert live_bytes_at(hw) - baseline > limit
    del hoard


def test_predict_video_under_bf16_autocast():
    model = make_model("refiner")
    frames = torch.randn(5, 3, 32, 32)
    out = predict_video(model, frames, (16, 16), return_probs=True, autocast_dtype=torch.bfloat16)
    assert out["labels"].shape == (5, 16, 16) and out["probs"].dtype == torch.float32
    torch.testing.assert_close(out["probs"].sum(1), torch.ones(5, 16, 16))


def test_predict_video_rejects_bad_frames():
    with pytest.raises(ValueError, match="frames"):
        predict_video(make_model("segmenter"), torch.zeros(2, 32, 32), (32, 32))


# --------------------------------------------------------------------------------------------
# Overfitting a synthetic clip with a small real segmenter, stage after stage
# --------------------------------------------------------------------------------------------


def small_config():
    cfg = tiny()
    m = cfg.model
    m.resnet_width, m.conv_dim, m.mask_dim, m.hidden_dim = 16, 32, 32, 32
    m.num_queries, m.nheads, m.dim_feedforward, m.dec_layers = 8, 2, 64, 3
    m.enc_layers, m.enc_ffn_dim, m.enc_heads, m.num_classes = 1, 64, 2, 4
    m.tracker_layers, m.refiner_layers, m.video_ffn_dim = 2, 2, 64
    cfg.loss.num_points = 256
    return cfg


def synthetic_clip(cfg, frames=3, size=64):
    images, raw = render_video(4, frames=frames, height=size, width=size, num_classes=cfg.model.num_classes)
    item = {
        "frames": normalize(torch.from_numpy(np.stack(images)), cfg.data),
        "labels": torch.from_numpy(np.stack([shift_labels(r) for r in raw])).long(),
        "video": "synthetic",
        "frame_names": [str(i) for i in range(frames)],
    }
    return collate_clips([item])


def overfit(model, batch, criterion, steps, lr, guided):
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    history = []
    for step in range(steps):
        losses = video_loss(model, batch, criterion, guided=guided(step))
        loss = sum(losses.values())
        opt.zero_grad()
        loss.backward()
        opt.step()
        history.append(loss.item())
    return history


def test_mask_pass_of_real_segmenter_equals_full_forward():
    torch.manual_seed(0)
    seg = build_video_model(small_config(), "segmenter").segmenter.eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(_segmenter_mask_features(seg, x), seg(x)["mask_features"])


def test_each_stage_overfits_a_synthetic_clip(seed=0):
    cfg = small_config()
    torch.manual_seed(seed)
    batch = synthetic_clip(cfg)
    criterion = SetCriterion(cfg.model.num_classes, HungarianMatcher.from_config(cfg.loss), cfg.loss)
    labels = batch["labels"][0]
    valid = labels != 255

    def accuracy(model):
        pred = predict_video(model, batch["frames"][0], tuple(labels.shape[-2:]))["labels"]
        return (pred[valid] == labels[valid]).float().mean().item()

    def check(history, acc, before):
        # the denoising noise and the reid term make single steps noisy: compare averages
        late = sum(history[-5:]) / 5
        assert late < 0.6 * history[0] and acc > 0.85 and acc > before + 0.3, (history[0], late, before, acc)

    stage1 = build_video_model(cfg, "segmenter").train()
    before = accuracy(stage1)
    check(overfit(stage1, batch, criterion, 40, 1e-3, lambda s: False), accuracy(stage1), before)

    # stage 2 on the trained segmenter: the fresh tracker first destroys the prediction
    stage2 = build_video_model(cfg, "tracker")
    assert load_previous_stage(stage2, stage1.state_dict()) == ["tracker"]
    before = accuracy(stage2)
    check(overfit(stage2.train(), batch, criterion, 40, 1e-3, lambda s: s < 20), accuracy(stage2), before)

    stage3 = build_video_model(cfg, "refiner")
    assert load_previous_stage(stage3, stage2.state_dict()) == ["refiner"]
    before = accuracy(stage3)
    check(overfit(stage3.train(), batch, criterion, 30, 1e-3, lambda s: s < 15), accuracy(stage3), before)
