"""Tests of vss/criterion.py: hand-computed class/mask losses, num_masks normalisation, guided
matching, autocast, the IDOL reid loss against its written-out formula, and the cross-rank
num_masks reduction (2 gloo processes)."""

import dataclasses
import math

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

from vss.config import LossConfig
import vss.criterion as criterion_mod
from vss.criterion import average_num_masks, reid_contrastive_loss, SetCriterion
from vss.matcher import HungarianMatcher, point_sample

K = 4  # classes


def _grid_coords(num_masks, n):
    """Pixel centres of an n x n grid as (M,n*n,2) (x, y) coordinates."""
    centres = (torch.arange(n) + 0.5) / n
    ys, xs = torch.meshgrid(centres, centres, indexing="ij")
    return torch.stack([xs.flatten(), ys.flatten()], -1).expand(num_masks, -1, -1).clone()


@pytest.fixture
def forced_points(monkeypatch):
    """Replace the random/uncertainty point choice of the loss by a fixed n x n grid."""

    def install(n):
        def fake(logits, num_points, oversample_ratio, importance_sample_ratio):
            return _grid_coords(logits.shape[0], n)

        monkeypatch.setattr(criterion_mod, "uncertain_point_coords", fake)

    return install


class NoMatcher:
    """Fails the test if matching is attempted (guided indices must be used instead)."""

    def match_batch(self, outputs, targets):
        raise AssertionError("matcher called although guidance indices were given")


class CountingMatcher(HungarianMatcher):
    def __init__(self, **kw):
        super().__init__(**kw)
        self.calls = 0

    def match_batch(self, outputs, targets):
        self.calls += 1
        return super().match_batch(outputs, targets)


def _outputs(gen, n, q, hw=(6, 8), num_aux=2, requires_grad=False):
    def one():
        logits = (torch.randn(n, q, K + 1, generator=gen) * 2).requires_grad_(requires_grad)
        masks = (torch.randn(n, q, *hw, generator=gen) * 3).requires_grad_(requires_grad)
        return {"pred_logits": logits, "pred_masks": masks}

    out = one()
    out["aux_outputs"] = [one() for _ in range(num_aux)]
    return out


def _targets(gen, counts, hw=(12, 16)):
    return [
        {"labels": torch.randint(0, K, (m,), generator=gen), "masks": torch.rand(m, *hw, generator=gen) > 0.5}
        for m in counts
    ]


def _hand_ce(logits, targets, indices, no_object_weight):
    """Weighted CE written out: sum_i w_i * (-log softmax_i[y_i]) / sum_i w_i."""
    num, den = 0.0, 0.0
    n, q, _ = logits.shape
    for b in range(n):
        target_of = {int(qi): int(targets[b]["labels"][ti]) for qi, ti in zip(*indices[b])}
        for j in range(q):
            y = target_of.get(j, K)
            w = no_object_weight if y == K else 1.0
            num += w * -torch.log_softmax(logits[b, j].double(), -1)[y].item()
            den += w
    return num / den


def _hand_mask_losses(pred_masks, targets, indices, coords_n):
    """Per-mask loop with the forced grid; returns (sum BCE, sum dice) over matches."""
    bce_sum, dice_sum = 0.0, 0.0
    for b, (qs, ts) in enumerate(indices):
        for qi, ti in zip(qs.tolist(), ts.tolist()):
            coords = _grid_coords(1, coords_n)
            x = point_sample(pred_masks[b, qi][None, None].float(), coords)[0, 0].double()
            t = point_sample(targets[b]["masks"][ti][None, None].float(), coords)[0, 0].double()
            bce_sum += (F.softplus(x) - t * x).mean().item()
            p = x.sigmoid()
            dice_sum += (1 - (2 * (p * t).sum() + 1) / (p.sum() + t.sum() + 1)).item()
    return bce_sum, dice_sum


def _indices(*pairs):
    return [(torch.tensor(q, dtype=torch.int64), torch.tensor(t, dtype=torch.int64)) for q, t in pairs]


def test_gradients_finite_and_keys():
    gen = torch.Generator().manual_seed(0)
    cfg = LossConfig(num_points=64)
    crit = SetCriterion(K, HungarianMatcher(num_points=64), cfg)
    out = _outputs(gen, 2, 5, num_aux=2, requires_grad=True)
    losses = crit(out, _targets(gen, [3, 1]))
    expected = {f"loss_{k}{s}" for k in ("ce", "mask", "dice") for s in ("", "_0", "_1")}
    assert set(losses) == expected
    assert all(v.dtype == torch.float32 and v.dim() == 0 and torch.isfinite(v) for v in losses.values())
    sum(losses.values()).backward()
    for o in [out] + out["aux_outputs"]:
        for key in ("pred_logits", "pred_masks"):
            g = o[key].grad
            assert g is not None and torch.isfinite(g).all() and g.abs().sum() > 0


def test_class_loss_no_object_weight_by_hand():
    gen = torch.Generator().manual_seed(1)
    out = _outputs(gen, 2, 5, num_aux=0)
    targets = _targets(gen, [2, 1])
    indices = _indices(([0, 3], [1, 0]), ([4], [0]))
    for weight in (0.1, 1.0):
        crit = SetCriterion(K, NoMatcher(), LossConfig(num_points=16, no_object_weight=weight))
        losses = crit(out, targets, indices=indices)
        hand = 2.0 * _hand_ce(out["pred_logits"], targets, indices, weight)
        assert losses["loss_ce"].item() == pytest.approx(hand, rel=1e-5)
    # The two weights give different numbers, so the check above can tell them apart.
    assert _hand_ce(out["pred_logits"], targets, indices, 0.1) != pytest.approx(
        _hand_ce(out["pred_logits"], targets, indices, 1.0), rel=1e-3
    )


def test_mask_losses_tiny_masks_hand_values(forced_points):
    forced_points(2)  # points at the centres of a 2x2 grid
    # One image, 3 queries, 2 targets; prediction 2x2, target 4x4 made of constant 2x2 blocks so
    # that the 4 points read exact pixel values on both.
    pred_masks = torch.zeros(1, 3, 2, 2)
    pred_masks[0, 0] = torch.tensor([[0.0, 2.0], [-2.0, 0.0]])
    pred_masks[0, 2] = torch.tensor([[1.0, 1.0], [1.0, -1.0]])
    tgt_small = torch.tensor([[[1.0, 1.0], [0.0, 0.0]], [[1.0, 0.0], [0.0, 0.0]]])  # (M,2,2)
    targets = [
        {"labels": torch.tensor([1, 2]), "masks": tgt_small.repeat_interleave(2, -1).repeat_interleave(2, -2).bool()}
    ]
    out = {"pred_logits": torch.zeros(1, 3, K + 1), "pred_masks": pred_masks}
    indices = _indices(([0, 2], [1, 0]))
    crit = SetCriterion(K, NoMatcher(), LossConfig(num_points=4))
    losses = crit(out, targets, indices=indices)

    def sp(x):
        return math.log1p(math.exp(x))

    def sig(x):
        return 1 / (1 + math.exp(-x))

    # query 0 vs target 1 = [[1,0],[0,0]]: logits 0, 2, -2, 0
    bce0 = (sp(0) - 0 + sp(2) + sp(-2) + sp(0)) / 4
    dice0 = 1 - (2 * sig(0) + 1) / (sig(0) + sig(2) + sig(-2) + sig(0) + 1 + 1)
    # query 2 vs target 0 = [[1,1],[0,0]]: logits 1, 1, 1, -1
    bce2 = ((sp(1) - 1) * 2 + sp(1) + sp(-1)) / 4
    dice2 = 1 - (2 * 2 * sig(1) + 1) / (3 * sig(1) + sig(-1) + 2 + 1)
    num_masks = 2
    assert losses["loss_mask"].item() == pytest.approx(5 * (bce0 + bce2) / num_masks, rel=1e-5)
    assert losses["loss_dice"].item() == pytest.approx(5 * (dice0 + dice2) / num_masks, rel=1e-5)


def test_mask_losses_real_sampler_constant_masks():
    # Logit 0 everywhere and an empty target are constant even in the zero padding, so any
    # point choice gives BCE = log 2 and dice = 1 - 1/(P/2 + 1).
    torch.manual_seed(0)
    num_points = 100
    out = {"pred_logits": torch.zeros(1, 3, K + 1), "pred_masks": torch.zeros(1, 3, 6, 8)}
    targets = [{"labels": torch.tensor([0]), "masks": torch.zeros(1, 24, 32, dtype=torch.bool)}]
    crit = SetCriterion(K, HungarianMatcher(num_points=50), LossConfig(num_points=num_points))
    losses = crit(out, targets)
    assert losses["loss_mask"].item() == pytest.approx(5 * math.log(2), rel=1e-6)
    assert losses["loss_dice"].item() == pytest.approx(5 * (1 - 1 / (num_points / 2 + 1)), rel=1e-6)


def test_mask_losses_match_per_mask_loop_across_images(forced_points):
    # Offsets of targets across images: image 1's matches must read image 1's masks.
    forced_points(8)
    gen = torch.Generator().manual_seed(2)
    out = _outputs(gen, 3, 5, hw=(8, 8), num_aux=0)
    targets = _targets(gen, [1, 3, 2], hw=(16, 16))
    indices = _indices(([2], [0]), ([0, 1, 4], [2, 0, 1]), ([1, 3], [1, 0]))
    losses = SetCriterion(K, NoMatcher(), LossConfig(num_points=64))(out, targets, indices=indices)
    bce, dice = _hand_mask_losses(out["pred_masks"], targets, indices, 8)
    assert losses["loss_mask"].item() == pytest.approx(5 * bce / 6, rel=1e-5)
    assert losses["loss_dice"].item() == pytest.approx(5 * dice / 6, rel=1e-5)


def _hand_mask_losses_valid(pred_masks, targets, indices, coords_n):
    """``_hand_mask_losses`` with each image's ``valid`` map: only grid points on valid pixels
    count (BCE mean and dice over them)."""
    bce_sum, dice_sum = 0.0, 0.0
    for b, (qs, ts) in enumerate(indices):
        coords = _grid_coords(1, coords_n)
        # grid points sit at pixel centres of the 8x8 grid = 2x2 blocks of the 16x16 maps
        keep = targets[b]["valid"][1::2, 1::2].flatten()
        for qi, ti in zip(qs.tolist(), ts.tolist()):
            x = point_sample(pred_masks[b, qi][None, None].float(), coords)[0, 0].double()[keep]
            t = point_sample(targets[b]["masks"][ti][None, None].float(), coords)[0, 0].double()[keep]
            bce_sum += (F.softplus(x) - t * x).sum().item() / max(int(keep.sum()), 1)
            p = x.sigmoid()
            dice_sum += (1 - (2 * (p * t).sum() + 1) / (p.sum() + t.sum() + 1)).item()
    return bce_sum, dice_sum


def test_valid_mask_ignores_pixels_by_hand(forced_points):
    # Per-pixel ignore (semi stage, unreliable pseudo labels): points on invalid pixels drop
    # out of BCE and dice; image 2 has every pixel invalid (its masks cost 0).
    forced_points(8)
    gen = torch.Generator().manual_seed(5)
    out = _outputs(gen, 3, 5, hw=(8, 8), num_aux=0)
    targets = _targets(gen, [2, 3, 1], hw=(16, 16))
    for t in targets:
        t["valid"] = torch.rand(16, 16, generator=gen) > 0.4
    targets[2]["valid"][:] = False
    indices = _indices(([0, 3], [1, 0]), ([1, 2, 4], [2, 0, 1]), ([0], [0]))
    losses = SetCriterion(K, NoMatcher(), LossConfig(num_points=64))(out, targets, indices=indices)
    bce, dice = _hand_mask_losses_valid(out["pred_masks"], targets, indices, 8)
    assert losses["loss_mask"].item() == pytest.approx(5 * bce / 6, rel=1e-5)
    assert losses["loss_dice"].item() == pytest.approx(5 * dice / 6, rel=1e-5)
    # without the valid maps the same inputs give different losses (the test can fail)
    plain = [{k: v for k, v in t.items() if k != "valid"} for t in targets]
    without = SetCriterion(K, NoMatcher(), LossConfig(num_points=64))(out, plain, indices=indices)
    assert abs(without["loss_mask"].item() - losses["loss_mask"].item()) > 1e-3


def test_valid_mask_real_sampler_and_matcher():
    # With the real (random, uncertainty-driven) point choice and self-matching: all-valid maps
    # change nothing, and target pixels under invalid pixels do not matter.
    gen = torch.Generator().manual_seed(6)
    out = _outputs(gen, 2, 6, hw=(8, 8), num_aux=1)
    targets = _targets(gen, [3, 2], hw=(32, 32))
    crit = SetCriterion(K, HungarianMatcher(num_points=200), LossConfig(num_points=200))

    def run(tgts):
        torch.manual_seed(0)
        return crit(out, tgts)

    base = run(targets)
    all_valid = run([{**t, "valid": torch.ones(32, 32, dtype=torch.bool)} for t in targets])
    for k in base:  # same matches and points; the mean is summed in another order
        assert torch.allclose(base[k], all_valid[k], rtol=1e-6, atol=0), k
    valid = torch.ones(32, 32, dtype=torch.bool)
    valid[:, :16] = False  # the left half is ignored
    a = run([{**t, "valid": valid} for t in targets])
    changed = [{**t, "masks": t["masks"].clone(), "valid": valid} for t in targets]
    for t in changed:
        t["masks"][:, :, :15] = ~t["masks"][:, :, :15]  # flip targets well inside the ignored half
    b = run(changed)
    for k in a:
        assert torch.equal(a[k], b[k]), k
    c = run([{k2: v for k2, v in t.items() if k2 != "valid"} for t in changed])
    assert not torch.equal(c["loss_mask"], b["loss_mask"])


def test_num_masks_normalisation_duplicated_batch(forced_points):
    forced_points(8)
    gen = torch.Generator().manual_seed(3)
    out = _outputs(gen, 2, 5, num_aux=1)
    targets = _targets(gen, [2, 3])
    indices = _indices(([1, 4], [1, 0]), ([0, 2, 3], [2, 1, 0]))
    crit = SetCriterion(K, NoMatcher(), LossConfig(num_points=64))
    single = crit(out, targets, indices=indices)

    def dup(o):
        return {"pred_logits": torch.cat([o["pred_logits"]] * 2), "pred_masks": torch.cat([o["pred_masks"]] * 2)}

    out2 = dup(out)
    out2["aux_outputs"] = [dup(a) for a in out["aux_outputs"]]
    double = crit(out2, targets * 2, indices=indices * 2)
    for key in single:
        assert double[key].item() == pytest.approx(single[key].item(), rel=1e-5), key
    # Without normalisation by the number of targets the mask loss would double.
    assert single["loss_mask"].item() > 0


def test_guided_indices_used_for_every_layer(forced_points):
    forced_points(4)
    gen = torch.Generator().manual_seed(4)
    out = _outputs(gen, 2, 5, num_aux=3)
    targets = _targets(gen, [2, 1])
    indices = _indices(([0, 3], [1, 0]), ([2], [0]))
    losses = SetCriterion(K, NoMatcher(), LossConfig(num_points=16))(out, targets, indices=indices)
    layers = [("", out)] + [(f"_{i}", a) for i, a in enumerate(out["aux_outputs"])]
    for suffix, o in layers:
        hand_ce = 2.0 * _hand_ce(o["pred_logits"], targets, indices, 0.1)
        bce, dice = _hand_mask_losses(o["pred_masks"], targets, indices, 4)
        assert losses["loss_ce" + suffix].item() == pytest.approx(hand_ce, rel=1e-5)
        assert losses["loss_mask" + suffix].item() == pytest.approx(5 * bce / 3, rel=1e-5)
        assert losses["loss_dice" + suffix].item() == pytest.approx(5 * dice / 3, rel=1e-5)

    # Without guidance every layer is matched on its own predictions.
    matcher = CountingMatcher(num_points=16)
    SetCriterion(K, matcher, LossConfig(num_points=16))(out, targets)
    assert matcher.calls == 4


def test_self_matching_finds_planted_assignment(forced_points):
    # Each aux layer plants the targets on different queries; re-matching per layer must find
    # them (loss_ce much lower than with any fixed assignment shared across layers).
    forced_points(2)
    targets = [{"labels": torch.tensor([1, 3]), "masks": torch.tensor([[[1, 1], [0, 0]], [[0, 0], [1, 1]]]).bool()}]

    def planted(qa, qb):
        logits = torch.full((1, 4, K + 1), -8.0)
        logits[0, :, K] = 8.0
        logits[0, qa, 1] = logits[0, qb, 3] = 8.0
        logits[0, qa, K] = logits[0, qb, K] = -8.0
        masks = torch.full((1, 4, 2, 2), -8.0)
        masks[0, qa, 0] = masks[0, qb, 1] = 8.0
        return {"pred_logits": logits, "pred_masks": masks}

    out = planted(0, 1)
    out["aux_outputs"] = [planted(2, 3), planted(3, 0)]
    losses = SetCriterion(K, HungarianMatcher(num_points=32), LossConfig(num_points=16))(out, targets)
    for suffix in ("", "_0", "_1"):
        assert losses["loss_ce" + suffix].item() < 1e-3
        assert losses["loss_mask" + suffix].item() < 5e-3


def test_no_targets_and_bad_labels():
    gen = torch.Generator().manual_seed(5)
    out = _outputs(gen, 2, 3, num_aux=1, requires_grad=True)
    targets = [{"labels": torch.zeros(0, dtype=torch.int64), "masks": torch.zeros(0, 12, 16, dtype=torch.bool)}] * 2
    crit = SetCriterion(K, HungarianMatcher(num_points=16), LossConfig(num_points=16))
    losses = crit(out, targets)
    assert losses["loss_mask"].item() == 0 and losses["loss_dice_0"].item() == 0
    # All queries target "no object": plain CE on class K.
    ce = F.cross_entropy(out["pred_logits"].detach().flatten(0, 1), torch.full((6,), K))
    assert losses["loss_ce"].item() == pytest.approx(2 * ce.item(), rel=1e-5)
    sum(losses.values()).backward()  # the mask head stays in the graph (DDP needs a gradient)
    assert out["pred_masks"].grad is not None

    bad = [{"labels": torch.tensor([K]), "masks": torch.zeros(1, 12, 16, dtype=torch.bool)}] * 2
    with pytest.raises(ValueError, match="labels"):
        crit(out, bad)
    with pytest.raises(ValueError, match="classes"):
        SetCriterion(K + 1, HungarianMatcher(num_points=16), LossConfig(num_points=16))(out, targets)


def test_losses_float32_under_autocast(forced_points):
    forced_points(4)
    gen = torch.Generator().manual_seed(6)
    out = _outputs(gen, 2, 5, num_aux=1)
    targets = _targets(gen, [2, 2])
    indices = _indices(([0, 3], [1, 0]), ([1, 2], [0, 1]))
    crit = SetCriterion(K, NoMatcher(), LossConfig(num_points=16))
    half = {
        "pred_logits": out["pred_logits"].bfloat16(),
        "pred_masks": out["pred_masks"].bfloat16(),
        "aux_outputs": [{k: v.bfloat16() for k, v in a.items()} for a in out["aux_outputs"]],
    }
    with torch.autocast("cpu", dtype=torch.bfloat16):
        low = crit(half, targets, indices=indices)
    ref_in = {
        "pred_logits": half["pred_logits"].float(),
        "pred_masks": half["pred_masks"].float(),
        "aux_outputs": [{k: v.float() for k, v in a.items()} for a in half["aux_outputs"]],
    }
    ref = crit(ref_in, targets, indices=indices)
    for key in ref:
        assert low[key].dtype == torch.float32
        assert low[key].item() == pytest.approx(ref[key].item(), rel=1e-5), key


def test_reid_contrastive_loss_formula():
    gen = torch.Generator().manual_seed(7)
    a = torch.randn(3, 6, generator=gen)
    pos = torch.randn(3, 2, 6, generator=gen)
    neg = torch.randn(3, 4, 6, generator=gen)
    pos_valid = torch.tensor([[True, True], [True, False], [False, False]])
    neg_valid = torch.tensor([[True, True, True, False], [True, True, True, True], [True, False, True, True]])
    loss = reid_contrastive_loss(a, pos, neg, pos_valid, neg_valid)
    hand = 0.0
    for i in range(3):
        s = sum(
            math.exp((neg[i, n] @ a[i] - pos[i, p] @ a[i]).item())
            for p in range(2)
            if pos_valid[i, p]
            for n in range(4)
            if neg_valid[i, n]
        )
        hand += math.log(1 + s)
    assert loss.item() == pytest.approx(hand / 3, rel=1e-5)
    # Large dot products stay finite (logsumexp), and gradients flow.
    a2 = (a * 50).requires_grad_(True)
    big = reid_contrastive_loss(a2, pos, neg)
    big.backward()
    assert torch.isfinite(big) and torch.isfinite(a2.grad).all()
    empty = reid_contrastive_loss(torch.zeros(0, 6), torch.zeros(0, 2, 6), torch.zeros(0, 4, 6))
    assert empty.item() == 0


def _num_masks_worker(rank, world, init_file, result_file):
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    counts = [[2, 0], [3, 3]][rank]  # 2 + 6 = 8 targets over 2 ranks -> 4 per rank
    targets = [{"labels": torch.zeros(c, dtype=torch.int64)} for c in counts]
    value = average_num_masks(targets)
    if rank == 0:
        with open(result_file, "w") as f:
            f.write(repr(value))
    dist.destroy_process_group()


def test_average_num_masks_across_ranks(tmp_path):
    assert average_num_masks([{"labels": torch.zeros(0)}]) == 1.0
    assert average_num_masks([{"labels": torch.zeros(3)}, {"labels": torch.zeros(2)}]) == 5.0
    result = tmp_path / "result.txt"
    mp.spawn(_num_masks_worker, args=(2, str(tmp_path / "init"), str(result)), nprocs=2, join=True)
    assert float(result.read_text()) == 4.0


def test_video_level_criterion_with_flattened_clips(forced_points):
    # The refiner's use: clips as tall images and T * num_points points (config via replace).
    from vss.matcher import flatten_clip_masks

    forced_points(4)
    gen = torch.Generator().manual_seed(8)
    num_frames = 3
    masks = torch.randn(1, 4, num_frames, 4, 4, generator=gen)  # (B,Q,T,h,w)
    out = {"pred_logits": torch.randn(1, 4, K + 1, generator=gen), "pred_masks": flatten_clip_masks(masks)}
    clip_targets = [{"labels": torch.tensor([0, 2]), "masks": torch.rand(2, num_frames, 8, 8, generator=gen) > 0.5}]
    targets = [{"labels": t["labels"], "masks": flatten_clip_masks(t["masks"])} for t in clip_targets]
    cfg = dataclasses.replace(LossConfig(num_points=16), num_points=16 * num_frames)
    crit = SetCriterion(K, HungarianMatcher.from_config(cfg), cfg)
    assert crit.num_points == 48 and crit.matcher.num_points == 48
    losses = crit(out, targets)
    assert out["pred_masks"].shape == (1, 4, 12, 4) and torch.isfinite(torch.stack(list(losses.values()))).all()


def test_targets_of_different_sizes_are_zero_padded(forced_points):
    forced_points(8)
    gen = torch.Generator().manual_seed(9)
    out = _outputs(gen, 2, 4, num_aux=0)
    targets = _targets(gen, [2, 1])
    targets[1]["masks"] = targets[1]["masks"][:, :8, :12]  # smaller padded frame in image 1
    padded = [targets[0], {"labels": targets[1]["labels"], "masks": F.pad(targets[1]["masks"].float(), (0, 4, 0, 4))}]
    indices = _indices(([0, 1], [1, 0]), ([3], [0]))
    crit = SetCriterion(K, NoMatcher(), LossConfig(num_points=64))
    got, ref = crit(out, targets, indices=indices), crit(out, padded, indices=indices)
    for key in ref:
        assert got[key].item() == pytest.approx(ref[key].item(), rel=1e-6), key


def test_matcher_gets_each_images_masks_as_float_at_their_own_size():
    # the criterion converts the targets to float once for all layers; the matcher must still
    # see image i's masks unpadded (its points are relative to the mask's own extent)
    gen = torch.Generator().manual_seed(10)
    out = _outputs(gen, 2, 4, num_aux=2)
    targets = _targets(gen, [2, 3])
    targets[1]["masks"] = targets[1]["masks"][:, :8, :12]
    crit = SetCriterion(K, HungarianMatcher.from_config(LossConfig(num_points=16)), LossConfig(num_points=16))
    seen = []
    match_batch = crit.matcher.match_batch
    crit.matcher.match_batch = lambda o, t: seen.append(t) or match_batch(o, t)
    crit(out, targets)
    assert len(seen) == 3  # final + 2 aux layers
    for layer_targets in seen:
        for got, t in zip(layer_targets, targets):
            assert got["masks"].dtype == torch.float32 and torch.equal(got["masks"], t["masks"].float())
            assert torch.equal(got["labels"], t["labels"])
