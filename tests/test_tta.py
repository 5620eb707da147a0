"""TTA (vss/tta.py): vote with tie-breaking by resolution (MVC eq. 8), probability mean, flip and
resize handling, checked against slow per-pixel / by-hand references."""

from collections import Counter

import pytest
import torch
import torch.nn.functional as F

from vss.tta import run_tta, tta_views, View, view_priority, view_size, vote


def slow_vote(labels, views):
    """Per-pixel reference: the modes; among them the label of the highest-resolution view
    (largest scale, then unflipped, then listed first) that votes for one of them."""
    v_count = labels.shape[0]
    flat = labels.reshape(v_count, -1)
    pref = sorted(range(v_count), key=lambda i: (-views[i].scale, views[i].flip, i))
    out = []
    for p in range(flat.shape[1]):
        votes = [int(flat[v, p]) for v in range(v_count)]
        counts = Counter(votes)
        top = max(counts.values())
        modes = {lab for lab, c in counts.items() if c == top}
        out.append(next(votes[i] for i in pref if votes[i] in modes))
    return torch.tensor(out).reshape(labels.shape[1:])


def test_views_and_priority():
    views = tta_views()
    assert views == [View(s, f) for s in (0.9, 1.0, 1.1, 1.2) for f in (False, True)]
    assert tta_views((1.0,), flip=False) == [View(1.0, False)]
    # 1.2 unflipped is the top priority, 0.9 flipped the last
    assert view_priority(views) == [6, 7, 4, 5, 2, 3, 0, 1]
    with pytest.raises(ValueError):
        tta_views((0.0,))


def test_vote_ties_go_to_highest_resolution():
    views = tta_views()  # order: 0.9, 0.9f, 1.0, 1.0f, 1.1, 1.1f, 1.2, 1.2f
    prio = view_priority(views)
    cases = [
        # clear majority beats the high-resolution view
        ([1, 1, 1, 1, 1, 2, 3, 3], 1),
        # 4-4 tie: the side holding scale 1.2 wins
        ([5, 5, 5, 5, 7, 7, 7, 7], 7),
        ([7, 7, 7, 7, 5, 5, 5, 5], 5),
        # 4-4 tie split inside scale 1.2: the unflipped 1.2 view decides
        ([2, 4, 2, 4, 2, 4, 4, 2], 4),
        ([2, 4, 2, 4, 2, 4, 2, 4], 2),
        # 3-3-2 tie where the 1.2 views vote for the minority: 1.1 unflipped decides among modes
        ([0, 0, 1, 0, 1, 1, 9, 9], 1),
        # 3-way tie 2-2-2-(1-1): among the three modes, the highest-resolution voter is 1.1f
        ([3, 4, 3, 4, 5, 5, 6, 7], 5),
        # all different: the 1.2 unflipped view
        ([0, 1, 2, 3, 4, 5, 6, 7], 6),
    ]
    labels = torch.tensor([c[0] for c in cases]).T.reshape(8, 1, len(cases))  # (V,1,P)
    got = vote(labels, prio).flatten().tolist()
    assert got == [c[1] for c in cases]


def test_vote_three_way_tie_six_views():
    views = tta_views((1.0, 1.1, 1.2))  # 1.0, 1.0f, 1.1, 1.1f, 1.2, 1.2f
    labels = torch.tensor([[0], [0], [1], [1], [2], [2]]).reshape(6, 1, 1)
    assert vote(labels, view_priority(views)).item() == 2
    labels = torch.tensor([[2], [0], [1], [0], [1], [2]]).reshape(6, 1, 1)  # 1.2 unflipped says 1
    assert vote(labels, view_priority(views)).item() == 1


def test_vote_matches_slow_reference_random():
    g = torch.Generator().manual_seed(0)
    views = tta_views()
    labels = torch.randint(0, 3, (8, 2, 9, 11), generator=g)  # few classes -> many ties
    assert torch.equal(vote(labels, view_priority(views)), slow_vote(labels, views))
    with pytest.raises(ValueError):
        vote(labels, [0] * 8)


def _one_hot_probs(lab, k):
    return F.one_hot(lab, k).permute(0, 3, 1, 2).float()  # (T,K,H,W)


def test_run_tta_vote_end_to_end():
    """Each call returns random one-hot labels at the view's size; the merged labels are the slow
    vote of those labels, un-flipped and resized back."""
    t, h, w, k = 2, 10, 12, 4
    g = torch.Generator().manual_seed(1)
    views = tta_views()
    answers = [torch.randint(0, k, (t, *view_size(h, w, v.scale)), generator=g) for v in views]
    calls = []

    def predict(x):
        calls.append(tuple(x.shape))
        return _one_hot_probs(answers[len(calls) - 1], k)

    out = run_tta(predict, torch.randn(t, 3, h, w), num_classes=k, merge="vote", chunk_frames=1)
    assert out["probs"] is None and out["labels"].dtype == torch.int64
    assert calls == [(t, 3, *view_size(h, w, v.scale)) for v in views]
    back = []
    for view, lab in zip(views, answers):
        lab = lab.flip(-1) if view.flip else lab  # what the view says in the original frame
        probs = F.interpolate(_one_hot_probs(lab, k), size=(h, w), mode="bilinear", align_corners=False)
        back.append(probs.argmax(1))
    assert torch.equal(out["labels"], slow_vote(torch.stack(back), views))


def _pixelwise_predict(k):
    """A deterministic, per-pixel (hence flip-equivariant) classifier: softmax of channel mixes."""
    weight = torch.linspace(-2, 2, 3 * k).reshape(k, 3)

    def predict(x):
        return torch.softmax(torch.einsum("kc,tchw->tkhw", weight, x) * 3, dim=1)

    return predict


def test_run_tta_mean_equals_hand_average():
    t, h, w, k = 2, 14, 18, 5
    g = torch.Generator().manual_seed(2)
    frames = torch.randn(t, 3, h, w, generator=g)
    predict = _pixelwise_predict(k)
    scales = (0.9, 1.0, 1.1, 1.2)
    out = run_tta(predict, frames, num_classes=k, scales=scales, merge="mean", chunk_frames=1)
    total = torch.zeros(t, k, h, w)
    for s in scales:
        size = (round(h * s), round(w * s))
        for flip in (False, True):
            x = F.interpolate(frames, size=size, mode="bilinear", align_corners=False)
            x = x.flip(-1) if flip else x
            p = predict(x)
            p = p.flip(-1) if flip else p
            total += F.interpolate(p, size=(h, w), mode="bilinear", align_corners=False)
    total /= 8
    assert torch.allclose(out["probs"], total, atol=1e-5)
    assert torch.equal(out["labels"], total.argmax(1))
    assert torch.allclose(out["probs"].sum(1), torch.ones(t, h, w), atol=1e-5)


def test_run_tta_with_a_view_function():
    """frames as a function scale -> frames (infer.py: the original frames resized per scale):
    called once per scale (the flipped view reuses it), views merged at out_size."""
    t, k, out_size = 2, 4, (15, 20)
    g = torch.Generator().manual_seed(3)
    source = torch.randn(t, 3, 30, 40, generator=g)
    calls = []

    def view_frames(scale):
        calls.append(scale)
        size = (round(15 * scale), round(20 * scale))
        return F.interpolate(source, size=size, mode="bilinear", align_corners=False, antialias=True)

    predict = _pixelwise_predict(k)
    out = run_tta(predict, view_frames, num_classes=k, scales=(1.0, 1.2), merge="mean", out_size=out_size)
    assert calls == [1.0, 1.2]
    total = torch.zeros(t, k, *out_size)
    for s in (1.0, 1.2):
        x = view_frames(s)
        for flip in (False, True):
            p = predict(x.flip(-1) if flip else x)
            p = p.flip(-1) if flip else p
            total += F.interpolate(p, size=out_size, mode="bilinear", align_corners=False)
    assert torch.allclose(out["probs"], total / 4, atol=1e-5)
    with pytest.raises(ValueError, match="out_size"):
        run_tta(predict, view_frames, num_classes=k)


def test_flip_is_undone():
    """Frames whose content depends on x (a ramp): a flipped view, un-flipped, must equal the
    unflipped view; forgetting to un-flip would mirror the prediction."""
    t, h, w, k = 1, 8, 24, 3
    ramp = torch.linspace(-2, 2, w).expand(t, 3, h, w).clone()
    ramp[:, 1] *= -0.5
    predict = _pixelwise_predict(k)
    plain = run_tta(predict, ramp, num_classes=k, scales=(1.0,), flip=False, merge="mean")
    with_flip = run_tta(predict, ramp, num_classes=k, scales=(1.0,), flip=True, merge="mean")
    assert torch.equal(with_flip["probs"], plain["probs"])  # mean of identical views
    assert not torch.equal(plain["labels"], plain["labels"].flip(-1))  # the test is asymmetric
    # at another scale, flip and bilinear resize commute up to float rounding
    a = run_tta(predict, ramp, num_classes=k, scales=(0.9,), flip=False, merge="mean")["probs"]
    b = run_tta(predict, ramp, num_classes=k, scales=(0.9,), flip=True, merge="mean")["probs"]
    assert torch.allclose(a, b, atol=1e-5)
    vote_plain = run_tta(predict, ramp, num_classes=k, scales=(1.0,), flip=False)["labels"]
    vote_flip = run_tta(predict, ramp, num_classes=k, scales=(1.0, 1.0), flip=True)["labels"]
    assert torch.equal(vote_plain, vote_flip)


def test_resize_back_from_low_resolution_output():
    """predict_fn may answer at stride 4; results come back at (H,W) with the right values."""
    t, h, w, k = 3, 16, 24, 2
    seen = []

    def predict(x):
        seen.append(tuple(x.shape[-2:]))
        n, _, vh, vw = x.shape
        p = torch.empty(n, k, vh // 4, vw // 4)
        p[:, 0] = 0.25
        p[:, 1] = 0.75
        return p

    out = run_tta(
        predict,
        torch.zeros(t, 3, h, w),
        num_classes=k,
        scales=(1.0, 1.5),
        merge="mean",
        size_divisibility=8,
    )
    assert seen == [(16, 24), (16, 24), (24, 40), (24, 40)]  # 1.5 * 24 = 36 -> 40
    assert out["probs"].shape == (t, k, h, w)
    assert torch.allclose(out["probs"][:, 1], torch.full((t, h, w), 0.75))
    assert torch.equal(out["labels"], torch.ones(t, h, w, dtype=torch.long))


def test_out_size_merges_at_the_original_resolution():
    t, h, w, k = 2, 12, 16, 3
    frames = torch.randn(t, 3, h, w, generator=torch.Generator().manual_seed(3))
    predict = _pixelwise_predict(k)
    out = run_tta(predict, frames, num_classes=k, scales=(1.0,), flip=False, merge="mean", out_size=(30, 40))
    expected = F.interpolate(predict(frames), size=(30, 40), mode="bilinear", align_corners=False)
    assert torch.allclose(out["probs"], expected, atol=1e-6)
    voted = run_tta(predict, frames, num_classes=k, out_size=(30, 40))["labels"]
    assert voted.shape == (t, 30, 40)


def test_view_size_and_errors():
    assert view_size(480, 854, 1.1) == (528, 939)
    assert view_size(480, 854, 1.1, 32) == (544, 960)
    assert view_size(10, 10, 0.01, 32) == (32, 32)
    frames = torch.zeros(1, 3, 8, 8)
    good = lambda x: torch.full((x.shape[0], 2, *x.shape[-2:]), 0.5)  # noqa: E731
    with pytest.raises(ValueError, match="merge"):
        run_tta(good, frames, num_classes=2, merge="median")
    with pytest.raises(ValueError, match="predict_fn returned"):
        run_tta(lambda x: torch.zeros(1, 3, 8, 8), frames, num_classes=2)
    with pytest.raises(ValueError, match="frames"):
        run_tta(good, torch.zeros(3, 8, 8), num_classes=2)
