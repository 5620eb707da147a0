"""vss.metrics against the official VSPW numbers (tests/data/vspw_synth, produced by the official
code) and against a slow transcription of the official algorithm written here: a bincount
confusion matrix per frame (utils.Evaluator) and VC_perclip.py's per-window loops over i and j
with np.ones AND-accumulators."""

import json

import cv2
import numpy as np
import pytest

from vss.io import list_frames, read_label_png, read_split, shift_labels
from vss.metrics import (
    _confusion_bincount,
    _confusion_pixels,
    _confusion_runs,
    confusion_matrix,
    DatasetStats,
    iou_from_confusion,
    merge,
    summarize,
    VideoStats,
)

K_SYNTH = 124


# ------------------------------------------------------------------------------------------
# slow official transcription
# ------------------------------------------------------------------------------------------


def slow_confusion(gts, preds, k):
    cm = np.zeros((k, k))
    for gt, pred in zip(gts, preds):
        mask = (gt >= 0) & (gt < k)
        label = k * gt[mask].astype("int") + pred[mask]
        cm += np.bincount(label, minlength=k**2).reshape(k, k)
    return cm


def slow_scores(cm):
    """utils.Evaluator's four figures, term for term."""
    diag, rows, cols = np.diag(cm), cm.sum(1), cm.sum(0)
    with np.errstate(invalid="ignore", divide="ignore"):
        iou = diag / (rows + cols - diag)
        freq = rows / cm.sum()
        acc_class = np.nanmean(diag / rows)
    isval = rows > 0
    return {
        "mIoU": np.nansum(iou * isval) / isval.sum(),
        "fwIoU": (freq[freq > 0] * iou[freq > 0]).sum(),
        "pixel_acc": diag.sum() / cm.sum(),
        "class_acc": acc_class,
    }


def same(a, b) -> bool:
    """Equal to the last bit, NaN equal to NaN."""
    return a == b or (np.isnan(a) and np.isnan(b))


def slow_get_common(gts, preds, n, include_last=False):
    h, w = gts[0].shape
    accs = []
    for i in range(len(gts) - n + (1 if include_last else 0)):
        g_common, p_common = np.ones((h, w)), np.ones((h, w))
        for j in range(1, n):
            g_common = np.logical_and(g_common, gts[i] == gts[i + j])
            p_common = np.logical_and(p_common, preds[i] == preds[i + j])
        with np.errstate(invalid="ignore", divide="ignore"):
            accs.append((p_common * g_common).sum() / g_common.sum())
    return accs


def slow_vc(videos, n, include_last=False):
    total = []
    for gts, preds in videos:
        if len(gts) <= n and not (include_last and len(gts) == n):
            continue
        total.extend(slow_get_common(gts, preds, n, include_last))
    with np.errstate(invalid="ignore"):
        return float(np.nanmean(np.array(total))) if total else float("nan"), len(total)


def fast_eval(videos, k, sizes=(8, 16), include_last=False, dtype=None):
    out = []
    for v, (gts, preds) in enumerate(videos):
        s = VideoStats(k, sizes, name=f"v{v}", include_last_window=include_last)
        for g, p in zip(gts, preds):
            s.update(g if dtype is None else g.astype(dtype), p if dtype is None else p.astype(dtype))
        out.append(s.finish())
    return merge(out)


# ------------------------------------------------------------------------------------------
# random videos
# ------------------------------------------------------------------------------------------


def random_video(rng, t, h=9, w=13, k=5, p_change=0.08, flicker=False, block=1):
    """Labels with temporal persistence: each frame a few pixels change. GT holds 255; the
    prediction holds ids >= K only where GT is 255 (allowed: mIoU never looks there, VC does).
    block > 1 repeats each label into a block x block square (piecewise-constant maps)."""
    g = rng.integers(0, k, (h, w)).astype(np.uint8)
    p = g.copy()
    gts, preds = [], []
    for i in range(t):
        ch = rng.random((h, w)) < p_change
        g[ch] = rng.choice(np.r_[np.arange(k), 255], int(ch.sum())).astype(np.uint8)
        ch = rng.random((h, w)) < p_change
        p[ch] = rng.integers(0, k, int(ch.sum()))
        gi, pi = g.copy(), p.copy()
        if flicker:  # whole-frame GT flicker: no pixel constant over any window -> NaN windows
            gi[:] = i % 2
        pi[(gi == 255) & (rng.random((h, w)) < 0.3)] = 200
        gts.append(np.repeat(np.repeat(gi, block, 0), block, 1))
        preds.append(np.repeat(np.repeat(pi, block, 0), block, 1))
    return gts, preds


@pytest.mark.parametrize("seed,dtype,block", [(0, None, 1), (1, None, 8), (2, None, 8), (3, np.int64, 1)])
def test_random_videos_match_slow_official(seed, dtype, block):
    """uint8 labels: noisy maps (block 1) take the per-pixel histogram, blocky ones (block 8) the
    run-length one; int64 labels the generic masked bincount."""
    rng = np.random.default_rng(seed)
    lengths = [3, 8, 9, 15, 16, 17, 26]  # T < n, T = n, T = n + 1 for n = 8 and 16
    videos = [random_video(rng, t, block=block) for t in lengths] + [random_video(rng, 12, flicker=True)]
    k = 5
    stats = fast_eval(videos, k, dtype=dtype)
    res = summarize(stats)
    cm = slow_confusion([g for gs, _ in videos for g in gs], [p for _, ps in videos for p in ps], k)
    np.testing.assert_array_equal(stats.confusion, cm)
    for key, val in slow_scores(cm).items():
        assert same(res[key], val), key  # exactly: the same expressions on the same counts
    for n in (8, 16):
        vc, windows = slow_vc(videos, n)
        assert same(res[f"VC{n}"], vc)
        assert res[f"VC{n}_windows"] == windows
        # per video: windows T-n (0 when T <= n), value = nanmean of the video's windows
        for v, (gts, preds) in enumerate(videos):
            entry = res["per_video"][f"v{v}"]
            accs = slow_get_common(gts, preds, n) if len(gts) > n else []
            assert entry[f"VC{n}_windows"] == len(accs) == max(len(gts) - n, 0)
            if accs and not np.isnan(accs).all():
                assert entry[f"VC{n}"] == pytest.approx(np.nanmean(accs), abs=1e-12)
            else:
                assert np.isnan(entry[f"VC{n}"])
    assert res["VC8_valid_windows"] < res["VC8_windows"]  # the flicker video's NaN windows are left out


def test_include_last_window_adds_the_last_full_window():
    rng = np.random.default_rng(5)
    videos = [random_video(rng, t) for t in (7, 8, 9, 20)]
    res = summarize(fast_eval(videos, 5, sizes=(8,), include_last=True))
    vc, windows = slow_vc(videos, 8, include_last=True)
    assert windows == 1 + 2 + 13  # T - n + 1 for T >= n
    assert res["VC8_windows"] == windows
    assert same(res["VC8"], vc)
    assert summarize(fast_eval(videos, 5, sizes=(8,)))["VC8_windows"] == 1 + 12


def test_vc_sizes_beyond_uint8_counters():
    """n > 255 switches to uint16 run lengths; small n in the same set still work."""
    rng = np.random.default_rng(3)
    videos = [random_video(rng, 262, h=3, w=4, k=2, p_change=0.002)]
    res = summarize(fast_eval(videos, 2, sizes=(2, 258)))
    for n in (2, 258):
        vc, windows = slow_vc(videos, n)
        assert res[f"VC{n}_windows"] == windows
        assert same(res[f"VC{n}"], vc)


# ------------------------------------------------------------------------------------------
# official numbers on tests/data/vspw_synth
# ------------------------------------------------------------------------------------------


def _fixture_stats(root, raw_gt: bool):
    videos = []
    for v in read_split(root / "VSPW", "val"):
        s = VideoStats(K_SYNTH, (8, 16), name=v)
        for mask in list_frames(root / "VSPW" / "data" / v, kind="mask"):
            raw = read_label_png(mask)
            pred = cv2.imread(str(root / "pred" / v / mask.name), cv2.IMREAD_UNCHANGED)
            s.update(raw if raw_gt else shift_labels(raw), pred)
        videos.append(s.finish())
    return summarize(merge(videos))


def test_official_numbers_on_fixture(test_data):
    root = test_data / "vspw_synth"
    expected = json.loads((root / "expected.json").read_text())
    res = _fixture_stats(root, raw_gt=False)
    for key in ("mIoU", "fwIoU", "pixel_acc", "VC8", "VC16"):
        assert res[key] == pytest.approx(expected[key], abs=1e-12), key
    assert res["VC8_windows"] == expected["VC8_windows"] == 57
    assert res["VC16_windows"] == expected["VC16_windows"] == 19
    # VC with the raw GT (DVIS++ eval_vc_vspw.py): 0 and 255 stay different values
    raw = _fixture_stats(root, raw_gt=True)
    for n in (8, 16):
        assert raw[f"VC{n}"] == pytest.approx(expected[f"VC{n}_rawgt"], abs=1e-12)
        assert raw[f"VC{n}_windows"] == expected[f"VC{n}_rawgt_windows"]
    assert raw["VC8"] != pytest.approx(res["VC8"], abs=1e-6)  # the fixture's 0<->255 flicker region


# ------------------------------------------------------------------------------------------
# confusion matrix and scores
# ------------------------------------------------------------------------------------------


def test_fast_confusion_paths_equal_bincount():
    rng = np.random.default_rng(0)
    gt = rng.choice(np.r_[np.arange(6), 6, 200, 255], (31, 17)).astype(np.uint8)  # 6, 200: GT >= K is ignored too
    pred = rng.integers(0, 6, gt.shape).astype(np.uint8)
    pred[gt == 255] = 255
    ref = slow_confusion([gt], [pred], 6)
    np.testing.assert_array_equal(_confusion_runs(gt, pred, 6), ref)  # noisy: goes per pixel
    np.testing.assert_array_equal(_confusion_pixels(gt.ravel(), pred.ravel(), 6), ref)
    # piecewise-constant maps take the run-length path
    blocky_gt, blocky_pred = np.repeat(np.repeat(gt, 9, 0), 9, 1), np.repeat(np.repeat(pred, 9, 0), 9, 1)
    blocky_ref = slow_confusion([blocky_gt], [blocky_pred], 6)
    np.testing.assert_array_equal(_confusion_runs(blocky_gt, blocky_pred, 6), blocky_ref)
    np.testing.assert_array_equal(confusion_matrix(blocky_gt, blocky_pred, 6), blocky_ref)
    assert blocky_ref.sum() == 81 * np.count_nonzero(gt < 6)
    np.testing.assert_array_equal(_confusion_bincount(gt, pred, 6), ref)
    np.testing.assert_array_equal(confusion_matrix(gt, pred.astype(np.uint16), 6), ref)
    np.testing.assert_array_equal(confusion_matrix(gt.astype(np.int64), pred.astype(np.int32), 6), ref)
    assert confusion_matrix(gt, pred, 6).dtype == np.int64


def test_scores_on_hand_built_confusion():
    # rows = GT, cols = pred; class 2 is predicted but absent from GT: left out of mIoU, not 0
    cm = np.array([[8, 2, 0], [1, 3, 2], [0, 0, 0]])
    stats = DatasetStats(3, (), confusion=cm.copy())
    res = summarize(stats, ["a", "b", "c"])
    iou_a, iou_b = 8 / (10 + 9 - 8), 3 / (6 + 5 - 3)
    assert res["mIoU"] == pytest.approx((iou_a + iou_b) / 2, abs=1e-15)
    assert res["fwIoU"] == pytest.approx(10 / 16 * iou_a + 6 / 16 * iou_b, abs=1e-15)
    assert res["pixel_acc"] == pytest.approx(11 / 16)
    assert res["class_acc"] == pytest.approx((8 / 10 + 3 / 6) / 2)
    assert np.isnan(res["per_class_IoU"]["c"]) and res["per_class_IoU"]["a"] == pytest.approx(iou_a)
    np.testing.assert_allclose(iou_from_confusion(cm)[:2], [iou_a, iou_b])


# ------------------------------------------------------------------------------------------
# streaming behaviour, merge, bad input
# ------------------------------------------------------------------------------------------


def test_streaming_copies_frames_and_frees_state():
    rng = np.random.default_rng(1)
    gts, preds = random_video(rng, 12)
    ref = summarize(fast_eval([(gts, preds)], 5))
    s = VideoStats(5, (8, 16), name="v0")
    buf_g, buf_p = np.empty_like(gts[0]), np.empty_like(preds[0])
    for g, p in zip(gts, preds):  # the caller reuses its buffers, as a decoder loop would
        buf_g[:], buf_p[:] = g, p
        s.update(buf_g, buf_p)
    s.finish()
    assert s._run_gt is None and s._prev_gt is None
    res = summarize(merge([s]))
    assert res["VC8"] == ref["VC8"] and res["VC8_windows"] == 4
    with pytest.raises(RuntimeError, match="after finish"):
        s.update(gts[0], preds[0])
    # copy=False keeps the arrays handed over (read-only here, like decoded PNGs): same numbers,
    # and a copying update after it must not write into them
    h = VideoStats(5, (8, 16), name="v0")
    for i, (g, p) in enumerate(zip(gts, preds)):
        g, p = g.copy(), p.copy()
        g.flags.writeable = p.flags.writeable = False
        h.update(g, p, copy=i % 3 == 2)
    handed = summarize(merge([h.finish()]))
    assert handed["mIoU"] == ref["mIoU"]
    np.testing.assert_equal(handed["per_video"], ref["per_video"])


def test_merge_is_order_free_and_refuses_duplicates():
    rng = np.random.default_rng(2)
    videos = [random_video(rng, t) for t in (10, 20, 30)]
    a = summarize(fast_eval(videos, 5))
    b = summarize(fast_eval(videos[::-1], 5))
    assert a["mIoU"] == pytest.approx(b["mIoU"], abs=1e-15)
    assert a["VC8"] == pytest.approx(b["VC8"], abs=1e-15) and a["VC8_windows"] == b["VC8_windows"] == 2 + 12 + 22
    # the all-reduce route (vss/engine.py): confusion summed by the caller, ratios added per video
    parts = []
    for v, (gts, preds) in enumerate(videos):
        st = VideoStats(5, (8, 16), name=f"v{v}")
        for g, p in zip(gts, preds):
            st.update(g, p)
        parts.append(st.finish())
    split = DatasetStats(5, (8, 16), confusion=sum(p.confusion for p in parts))
    for p in parts:
        split.add_windows(p.name, p.num_frames, {n: p.window_ratios(n) for n in (8, 16)})
    c = summarize(split)
    assert c["mIoU"] == a["mIoU"] and c["VC16"] == a["VC16"]
    np.testing.assert_equal(c["per_video"], a["per_video"])  # NaN-aware: v0 (10 frames) has no VC16
    s = VideoStats(5, (8, 16), name="x").finish()
    total = DatasetStats(5, (8, 16))
    total.add(s)
    with pytest.raises(ValueError, match="twice"):
        total.add(s)
    with pytest.raises(ValueError, match="do not match"):
        total.add(VideoStats(6, (8, 16), name="y"))


def test_bad_predictions_raise_naming_the_frame():
    gt = np.zeros((4, 5), np.uint8)
    gt[0] = 255
    s = VideoStats(3, (8,), name="vid")
    pred = np.zeros((4, 5), np.uint8)
    pred[0] = 250  # on void GT: allowed
    s.update(gt, pred, name="PRED/vid/001.png")
    pred[1, 2] = 3  # id K on a valid GT pixel: the official code would silently miscount
    with pytest.raises(ValueError, match=r"PRED/vid/002.png.*class id 3.*1 pixels"):
        s.update(gt, pred, name="PRED/vid/002.png")
    with pytest.raises(ValueError, match=r"PRED/vid/003.png.*4x6 .*4x5"):
        s.update(gt, np.zeros((4, 6), np.uint8), name="PRED/vid/003.png")
    with pytest.raises(ValueError, match=r"PRED/vid/004.png.*single-channel"):
        s.update(gt, np.zeros((4, 5, 3), np.uint8), name="PRED/vid/004.png")
    with pytest.raises(ValueError, match=r"PRED/vid/005.png.*frame size"):
        s.update(np.zeros((5, 5), np.uint8), np.zeros((5, 5), np.uint8), name="PRED/vid/005.png")
    with pytest.raises(ValueError, match="class id -1"):
        confusion_matrix(gt, np.full((4, 5), -1, np.int64), 3)
