"""Model aggregation (vss/aggregate.py, MVC eq. 5-7) on a synthetic video with known motion: a
textured square moving right over a static textured background."""

import cv2
import numpy as np
import pytest

from vss.aggregate import (
    aggregate_prediction_dirs,
    backward_flows,
    choose_per_video,
    FARNEBACK_PARAMS,
    temporal_ssim,
    warp_labels,
)
from vss.io import read_label_png, write_label_png

T, H, W, SIDE, STEP, X0, Y0 = 5, 64, 96, 24, 4, 16, 20


def _texture(rng, h, w, blur=3):
    noise = rng.uniform(0, 255, (h, w)).astype(np.float32)
    return cv2.GaussianBlur(noise, (0, 0), blur)


def moving_square_video(seed=0):
    """Frames (T,H,W,3) uint8 and the true labels (T,H,W): 0 background, 1 square."""
    rng = np.random.default_rng(seed)
    background = _texture(rng, H, W)
    square = _texture(rng, SIDE, SIDE, blur=1.5)
    square = (square - square.min()) / (np.ptp(square) + 1e-6) * 255  # strong texture for the flow
    frames, labels = [], []
    for t in range(T):
        img = background.copy()
        lab = np.zeros((H, W), np.int64)
        x = X0 + STEP * t
        img[Y0 : Y0 + SIDE, x : x + SIDE] = square
        lab[Y0 : Y0 + SIDE, x : x + SIDE] = 1
        frames.append(np.repeat(np.clip(img, 0, 255).astype(np.uint8)[..., None], 3, axis=2))
        labels.append(lab)
    return np.stack(frames), np.stack(labels)


def _iou(a, b):
    return (a & b).sum() / max(1, (a | b).sum())


def test_warp_direction_moves_labels_to_the_later_frame():
    frames, labels = moving_square_video()
    flows = backward_flows(frames)
    assert len(flows) == T - 1 and flows[0].shape == (H, W, 2)
    # inside the square, frame t+1 pixels come from STEP pixels to the left in frame t
    inner = flows[0][Y0 + 6 : Y0 + SIDE - 6, X0 + STEP + 6 : X0 + STEP + SIDE - 6, 0]
    assert abs(np.median(inner) + STEP) < 1.0
    greys = [cv2.cvtColor(f, cv2.COLOR_RGB2GRAY) for f in frames]
    for t in range(T - 1):
        later = labels[t + 1] == 1
        right = _iou(warp_labels(labels[t], flows[t]) == 1, later)
        forward = cv2.calcOpticalFlowFarneback(greys[t], greys[t + 1], None, *FARNEBACK_PARAMS)
        wrong = _iou(warp_labels(labels[t], forward) == 1, later)
        unwarped = _iou(labels[t] == 1, later)
        assert right > 0.85, right
        assert right > unwarped > wrong, (right, unwarped, wrong)


def test_warp_labels_exact_on_integer_flow():
    labels = np.arange(20, dtype=np.int64).reshape(4, 5)
    flow = np.zeros((4, 5, 2), np.float32)
    flow[..., 0] = -1  # every pixel comes from one pixel to the left
    warped = warp_labels(labels, flow)
    assert warped.dtype == labels.dtype
    np.testing.assert_array_equal(warped[:, 1:], labels[:, :-1])
    np.testing.assert_array_equal(warped[:, 0], labels[:, 0])  # border replicated


def flickering(labels, seed=1):
    """The true labels plus 8x8 blocks of class 2 that toggle on and off frame to frame."""
    rng = np.random.default_rng(seed)
    out = labels.copy()
    for t in range(T):
        for _ in range(6):
            y, x = rng.integers(0, H - 8), rng.integers(0, W - 8)
            out[t, y : y + 8, x : x + 8] = 2
    return out


def test_consistent_candidate_wins():
    frames, labels = moving_square_video()
    good, per_pair = temporal_ssim(frames, labels, data_range=2)
    bad, _ = temporal_ssim(frames, flickering(labels), data_range=2)
    assert len(per_pair) == T - 1
    assert good > 0.9 and good > bad + 0.1, (good, bad)
    # a candidate that does not move with the square is worse than one that does
    static = np.repeat(labels[:1], T, axis=0)
    assert temporal_ssim(frames, static, data_range=2)[0] < good
    for order in (["flicker", "consistent"], ["consistent", "flicker"]):
        cands = {"flicker": flickering(labels), "consistent": labels}
        choice, scores = choose_per_video({n: cands[n] for n in order}, frames, num_classes=3)
        assert choice == "consistent"
        assert scores["consistent"] == pytest.approx(good)


def test_static_video_scores_one_and_single_frame_is_nan():
    frames, labels = moving_square_video()
    still = np.repeat(frames[:1], 3, axis=0)
    lab = np.repeat(labels[:1], 3, axis=0)
    mean, per_pair = temporal_ssim(still, lab)
    assert mean == pytest.approx(1.0) and per_pair == [pytest.approx(1.0)] * 2
    mean, per_pair = temporal_ssim(frames[:1], labels[:1])
    assert np.isnan(mean) and per_pair == []
    choice, _ = choose_per_video({"a": labels[:1], "b": labels[:1]}, frames[:1])
    assert choice == "a"
    with pytest.raises(ValueError, match="labels"):
        temporal_ssim(frames, labels[:2])


def test_aggregate_prediction_dirs(tmp_path):
    frames, labels = moving_square_video()
    video = "vid_01"
    frame_dir = tmp_path / "frames"
    frame_dir.mkdir()
    frame_paths = []
    for t, f in enumerate(frames):
        p = frame_dir / f"{t:05d}.png"
        cv2.imwrite(str(p), cv2.cvtColor(f, cv2.COLOR_RGB2BGR))
        frame_paths.append(p)
    dirs = {"flicker": flickering(labels), "consistent": labels}
    for name, lab in dirs.items():
        for t in range(T):
            write_label_png(tmp_path / name / video / f"{t:05d}.png", lab[t])
    out = tmp_path / "out"
    cand_dirs = [tmp_path / "flicker", tmp_path / "consistent"]
    report = aggregate_prediction_dirs(cand_dirs, {video: frame_paths}, out, num_classes=3)
    assert report[video]["choice"] == str(tmp_path / "consistent")
    assert set(report[video]["scores"]) == {str(d) for d in cand_dirs}
    written = sorted((out / video).iterdir())
    assert [p.name for p in written] == [f"{t:05d}.png" for t in range(T)]
    for t, p in enumerate(written):
        assert p.read_bytes() == (tmp_path / "consistent" / video / p.name).read_bytes()
        np.testing.assert_array_equal(read_label_png(p), labels[t])
    # the same from frame arrays
    report2 = aggregate_prediction_dirs(cand_dirs, {video: frames}, tmp_path / "out2", num_classes=3)
    assert report2[video]["choice"] == report[video]["choice"]
    # bad inputs name the folder
    with pytest.raises(ValueError, match="do not match"):
        aggregate_prediction_dirs(cand_dirs, {video: frame_paths[:-1]}, tmp_path / "out3")
    with pytest.raises(ValueError, match="predictions are"):
        aggregate_prediction_dirs(cand_dirs, {video: frames[:-1]}, tmp_path / "out3")
    (tmp_path / "flicker" / video / f"{T - 1:05d}.png").rename(tmp_path / "flicker" / video / "x.png")
    with pytest.raises(ValueError, match="PNG names differ"):
        aggregate_prediction_dirs(cand_dirs, {video: frames}, tmp_path / "out3")
    with pytest.raises(FileNotFoundError, match="missing_video"):
        aggregate_prediction_dirs(cand_dirs, {"missing_video": frames}, tmp_path / "out4")
