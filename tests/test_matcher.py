"""Tests of vss/matcher.py against slow references written here: brute-force assignment over all
permutations, per-pair loss loops, and hand-built consistent-matching scenarios."""

import itertools

import pytest
import torch
import torch.nn.functional as F

from vss.matcher import (
    BLOCKED_COST,
    flatten_clip_masks,
    HungarianMatcher,
    pairwise_dice,
    pairwise_sigmoid_ce,
    point_sample,
    uncertain_point_coords,
)


def _random_image(gen, num_queries, num_targets, num_classes=5, pred_hw=(6, 8), tgt_hw=(12, 16)):
    logits = torch.randn(num_queries, num_classes + 1, generator=gen) * 2  # (Q,K+1)
    masks = torch.randn(num_queries, *pred_hw, generator=gen) * 3  # (Q,h,w)
    labels = torch.randint(0, num_classes, (num_targets,), generator=gen)  # (M,)
    tgt = torch.rand(num_targets, *tgt_hw, generator=gen) > 0.5  # (M,H,W)
    return logits, masks, labels, tgt


def _reference_cost(matcher, logits, masks, labels, tgt, coords):
    """Per-pair loop: each mask sampled on its own, losses written out from their definitions."""
    probs = logits.softmax(-1)
    cost = torch.zeros(len(logits), len(labels))
    for q in range(len(logits)):
        x = point_sample(masks[q][None, None], coords[None])[0, 0]  # (P,)
        for m in range(len(labels)):
            t = point_sample(tgt[m][None, None].float(), coords[None])[0, 0]  # (P,)
            bce = F.binary_cross_entropy_with_logits(x, t)
            p = x.sigmoid()
            dice = 1 - (2 * (p * t).sum() + 1) / (p.sum() + t.sum() + 1)
            cost[q, m] = -matcher.cost_class * probs[q, labels[m]] + matcher.cost_mask * bce + matcher.cost_dice * dice
    return cost


def test_point_sample_pixel_centres_and_resolution_independence():
    x = torch.arange(12.0).reshape(1, 1, 3, 4)
    ys, xs = torch.meshgrid(torch.arange(3), torch.arange(4), indexing="ij")
    coords = torch.stack([(xs.flatten() + 0.5) / 4, (ys.flatten() + 0.5) / 3], -1)[None]  # (1,12,2)
    assert torch.allclose(point_sample(x, coords)[0, 0], x.flatten(), atol=1e-5)
    # The same physical point on a 2x upsampled (nearest) copy gives the same value.
    big = x.repeat_interleave(2, -1).repeat_interleave(2, -2)
    assert torch.allclose(point_sample(big, coords)[0, 0], x.flatten(), atol=1e-5)
    # Half a pixel right of the first centre: the mean of the first two pixels.
    assert torch.allclose(point_sample(x, torch.tensor([[[0.25, 0.5 / 3]]]))[0, 0], torch.tensor([0.5]))


def test_pairwise_costs_equal_per_pair_loop():
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(5, 40, generator=gen) * 4
    targets = torch.rand(3, 40, generator=gen)
    bce, dice = pairwise_sigmoid_ce(logits, targets), pairwise_dice(logits, targets)
    for q in range(5):
        for m in range(3):
            ref_bce = F.binary_cross_entropy_with_logits(logits[q], targets[m])
            p = logits[q].sigmoid()
            ref_dice = 1 - (2 * (p * targets[m]).sum() + 1) / (p.sum() + targets[m].sum() + 1)
            assert torch.allclose(bce[q, m], ref_bce, atol=1e-5)
            assert torch.allclose(dice[q, m], ref_dice, atol=1e-6)


def test_cost_matrix_equals_reference_with_different_resolutions():
    gen = torch.Generator().manual_seed(1)
    matcher = HungarianMatcher(num_points=64)
    logits, masks, labels, tgt = _random_image(gen, 4, 3)
    coords = torch.rand(64, 2, generator=gen)
    cost = matcher.cost_matrix(logits, masks, labels, tgt, coords=coords)
    assert cost.dtype == torch.float32 and cost.shape == (4, 3)
    assert torch.allclose(cost, _reference_cost(matcher, logits, masks, labels, tgt, coords), atol=1e-5)


def test_cost_matrix_valid_drops_ignored_points():
    # Per-pixel ignore: the cost equals the reference on the points that land on valid pixels
    # (the points are pixel centres, so the pixel holding each is known without point_valid).
    gen = torch.Generator().manual_seed(3)
    matcher = HungarianMatcher(num_points=300)
    logits, masks, labels, tgt = _random_image(gen, 5, 3)
    valid = torch.rand(12, 16, generator=gen) > 0.5  # (H,W)
    coords = (torch.randint(0, 16, (300,), generator=gen) + 0.5) / 16
    coords = torch.stack([coords, (torch.randint(0, 12, (300,), generator=gen) + 0.5) / 12], -1)
    cols, rows = (coords[:, 0] * 16 - 0.5).round().long(), (coords[:, 1] * 12 - 0.5).round().long()
    keep = valid[rows, cols]
    cost = matcher.cost_matrix(logits, masks, labels, tgt, coords=coords, valid=valid)
    assert torch.allclose(cost, _reference_cost(matcher, logits, masks, labels, tgt, coords[keep]), atol=1e-5)
    assert not torch.allclose(cost, matcher.cost_matrix(logits, masks, labels, tgt, coords=coords), atol=1e-3)
    # nothing valid: only the class cost is left
    none = matcher.cost_matrix(logits, masks, labels, tgt, coords=coords, valid=torch.zeros_like(valid))
    assert torch.allclose(none, -matcher.cost_class * logits.softmax(-1)[:, labels], atol=1e-6)


@pytest.mark.parametrize("seed", range(12))
def test_match_equals_brute_force(seed):
    gen = torch.Generator().manual_seed(100 + seed)
    num_queries = int(torch.randint(1, 7, (1,), generator=gen))
    num_targets = int(torch.randint(1, 5, (1,), generator=gen))
    matcher = HungarianMatcher(num_points=50)
    logits, masks, labels, tgt = _random_image(gen, num_queries, num_targets)
    coords = torch.rand(50, 2, generator=gen)
    q_idx, t_idx = matcher.match(logits, masks, labels, tgt, coords=coords)
    cost = _reference_cost(matcher, logits, masks, labels, tgt, coords)

    # Brute force: every injective map from the smaller side to the larger one.
    best, best_pairs = float("inf"), None
    if num_queries >= num_targets:
        for qs in itertools.permutations(range(num_queries), num_targets):
            total = sum(cost[q, m].item() for m, q in enumerate(qs))
            if total < best:
                best, best_pairs = total, sorted(zip(qs, range(num_targets)))
    else:
        for ms in itertools.permutations(range(num_targets), num_queries):
            total = sum(cost[q, m].item() for q, m in enumerate(ms))
            if total < best:
                best, best_pairs = total, sorted(zip(range(num_queries), ms))
    assert len(q_idx) == min(num_queries, num_targets)
    assert torch.equal(q_idx, q_idx.sort().values) and q_idx.dtype == torch.int64
    assert list(zip(q_idx.tolist(), t_idx.tolist())) == best_pairs


def test_match_no_targets_and_batch():
    gen = torch.Generator().manual_seed(2)
    matcher = HungarianMatcher(num_points=32)
    logits, masks, labels, tgt = _random_image(gen, 5, 0)
    q_idx, t_idx = matcher.match(logits, masks, labels, tgt)
    assert q_idx.shape == (0,) and t_idx.shape == (0,) and q_idx.dtype == torch.int64

    # Targets that are exact copies of queries 3 and 1 (huge logits): matching must find them.
    logits, masks, _, _ = _random_image(gen, 5, 0)
    logits[:] = -5.0
    logits[3, 2] = logits[1, 0] = 5.0
    masks = torch.where(torch.rand(5, 6, 8, generator=gen) > 0.5, 20.0, -20.0)
    outputs = {"pred_logits": torch.stack([logits, logits]), "pred_masks": torch.stack([masks, masks])}
    targets = [
        {"labels": torch.tensor([2, 0]), "masks": masks[[3, 1]] > 0},
        {"labels": torch.zeros(0, dtype=torch.int64), "masks": torch.zeros(0, 6, 8, dtype=torch.bool)},
    ]
    (q0, t0), (q1, t1) = matcher.match_batch(outputs, targets)
    assert q0.tolist() == [1, 3] and t0.tolist() == [1, 0]
    assert q1.numel() == 0 and t1.numel() == 0


def test_cost_is_float32_under_autocast():
    gen = torch.Generator().manual_seed(3)
    matcher = HungarianMatcher(num_points=64)
    logits, masks, labels, tgt = _random_image(gen, 4, 3)
    logits, masks = logits.bfloat16(), masks.bfloat16()
    coords = torch.rand(64, 2, generator=gen)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        cost = matcher.cost_matrix(logits, masks, labels, tgt, coords=coords)
    ref = _reference_cost(matcher, logits.float(), masks.float(), labels, tgt, coords)
    assert cost.dtype == torch.float32
    assert torch.allclose(cost, ref, atol=1e-5)


def test_uncertain_point_coords_count_and_concentration():
    torch.manual_seed(0)
    # |logit| grows with the distance to the vertical line x = 0.55, so uncertainty ranks the
    # candidates by that distance; the sign flips between masks and must not matter.
    xs = (torch.arange(80) + 0.5) / 80
    logits = (40 * (xs - 0.55)).expand(3, 1, 30, 80).clone()  # (M,1,h,w)
    logits[1] *= -1
    coords = uncertain_point_coords(logits, num_points=400, oversample_ratio=3, importance_sample_ratio=0.75)
    assert coords.shape == (3, 400, 2)
    assert coords.min() >= 0 and coords.max() <= 1
    important, uniform = coords[:, :300], coords[:, 300:]
    # The 300 most uncertain of 1200 uniform candidates are the 25% closest to the line,
    # |x - 0.55| < ~0.125 (with sampling noise), except a few points in the outer half pixel at
    # the top/bottom edge, where zero padding halves the sampled logit.
    dist_imp = (important[..., 0] - 0.55).abs()
    inner = (important[..., 1] > 1 / 60) & (important[..., 1] < 1 - 1 / 60)
    assert (dist_imp[inner] < 0.16).all()
    assert dist_imp.mean() < 0.08
    # The uniform part covers the whole width (mean distance of U(0,1) to 0.55 is ~0.25).
    dist_uni = (uniform[..., 0] - 0.55).abs()
    assert dist_uni.mean() > 0.18 and (dist_uni > 0.3).any()
    # importance_sample_ratio = 0: all points uniform, none selected.
    plain = uncertain_point_coords(logits, num_points=50, oversample_ratio=1, importance_sample_ratio=0.0)
    assert plain.shape == (3, 50, 2)


def test_uncertain_point_coords_are_exactly_the_most_uncertain_candidates():
    # The fast selection (integer top-k on |logit|) against its definition: the P_imp candidates
    # with the largest -|logit|, from the same random candidates (same seed), as sets.
    gen = torch.Generator().manual_seed(3)
    logits = torch.randn(4, 1, 12, 16, generator=gen) * 3  # (M,1,h,w); sign and scale vary
    logits[2] *= -1
    torch.manual_seed(7)
    coords = uncertain_point_coords(logits, num_points=64, oversample_ratio=3, importance_sample_ratio=0.75)
    torch.manual_seed(7)
    candidates = torch.rand(4, 192, 2)  # the first draw of uncertain_point_coords
    uncertainty = -point_sample(logits, candidates)[:, 0].abs()  # (M,192)
    for m in range(4):
        chosen = candidates[m, uncertainty[m].argsort(descending=True)[:48]]  # (48,2)
        got = coords[m, :48]
        assert torch.equal(got[got[:, 0].argsort()], chosen[chosen[:, 0].argsort()]), m
    # the last 16 points are fresh uniform draws, not candidates
    assert not torch.isin(coords[:, 48:, 0], candidates[..., 0]).any()


def test_flatten_clip_masks():
    x = torch.arange(2 * 3 * 4 * 5).reshape(2, 3, 4, 5)
    flat = flatten_clip_masks(x)
    assert flat.shape == (2, 12, 5)
    assert torch.equal(flat[1, 4:8], x[1, 1])
    with pytest.raises(ValueError):
        flatten_clip_masks(torch.zeros(4, 5))


def _class_only_clip(num_frames, num_queries, num_classes, favourite):
    """Clip whose mask logits are all 0, so every mask cost is the same for every query and only
    the class cost decides; ``favourite[t][c]`` = query preferring class c at frame t."""
    logits = torch.zeros(num_frames, num_queries, num_classes + 1)
    for t, prefs in favourite.items():
        for c, (q, strength) in prefs.items():
            logits[t, q, c] = strength
    masks = torch.zeros(num_frames, num_queries, 4, 4)
    return logits, masks


def test_consistent_match_first_appearance_and_blocking():
    matcher = HungarianMatcher(num_points=16)
    num_frames, num_queries, num_classes = 3, 4, 3
    # Target 0 (class 0) appears at frame 0; target 1 (class 1) only from frame 2 on.
    labels = torch.tensor([0, 1])
    appear = torch.tensor([[True, True, True], [False, False, True]])
    tgt_masks = torch.zeros(2, num_frames, 8, 8, dtype=torch.bool)
    logits, masks = _class_only_clip(
        num_frames,
        num_queries,
        num_classes,
        {
            0: {0: (1, 6.0), 1: (3, 6.0)},  # frame 0: query 3 likes class 1 (must be ignored)
            2: {0: (0, 1.0)},
        },
    )
    # Frame 2: query 1 (already taken by target 0) likes class 1 the most, query 2 second.
    logits[2, 1, 1] = 8.0
    logits[2, 2, 1] = 5.0
    q_idx, t_idx = matcher.consistent_match(logits, masks, labels, tgt_masks, appear)
    assert list(zip(q_idx.tolist(), t_idx.tolist())) == [(1, 0), (2, 1)]

    # Without blocking, query 1 would win target 1 at frame 2: the test can tell the difference.
    alone = matcher.match(logits[2], masks[2], labels[[1]], tgt_masks[[1], 2])
    assert alone[0].tolist() == [1]


def test_consistent_match_defaults_to_frame_zero_and_skips_absent():
    matcher = HungarianMatcher(num_points=16)
    labels = torch.tensor([0, 1, 2])
    tgt_masks = torch.zeros(3, 2, 8, 8, dtype=torch.bool)
    logits, masks = _class_only_clip(
        2,
        5,
        3,
        {
            0: {0: (4, 6.0), 1: (0, 6.0), 2: (2, 6.0)},
            1: {0: (1, 9.0), 1: (3, 9.0), 2: (4, 9.0)},  # frame 1 disagrees; must not be used
        },
    )
    q_idx, t_idx = matcher.consistent_match(logits, masks, labels, tgt_masks)
    assert list(zip(q_idx.tolist(), t_idx.tolist())) == [(0, 1), (2, 2), (4, 0)]

    # A target that never appears stays unmatched; one appearing at frame 1 is matched there.
    appear = torch.tensor([[False, False], [True, True], [False, True]])
    q_idx, t_idx = matcher.consistent_match(logits, masks, labels, tgt_masks, appear)
    assert list(zip(q_idx.tolist(), t_idx.tolist())) == [(0, 1), (4, 2)]


def test_consistent_match_more_targets_than_free_queries_uses_blocked_cost():
    # 2 queries, target 0 at frame 0 takes one; two targets at frame 1 must share the rest, one of
    # them landing on a blocked query (the original behaviour: blocked = expensive, not forbidden).
    matcher = HungarianMatcher(num_points=16)
    labels = torch.tensor([0, 1, 2])
    appear = torch.tensor([[True, True], [False, True], [False, True]])
    tgt_masks = torch.zeros(3, 2, 4, 4, dtype=torch.bool)
    logits, masks = _class_only_clip(2, 2, 3, {0: {0: (0, 5.0)}, 1: {1: (1, 5.0)}})
    q_idx, t_idx = matcher.consistent_match(logits, masks, labels, tgt_masks, appear)
    assert list(zip(q_idx.tolist(), t_idx.tolist())) == [(0, 0), (0, 2), (1, 1)]
    assert BLOCKED_COST == 1e6
