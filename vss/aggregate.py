"""Model aggregation by temporal consistency (MVC paper section 2.3, eq. 5-7).

For every consecutive pair of frames (t, t+1) of a video: Farneback optical flow between the
grey frames (eq. 5), the label map of frame t warped onto frame t+1 (eq. 6, nearest neighbour so
labels stay labels), and SSIM between the warped map and the predicted map of frame t+1 (eq. 7).
A candidate's score for a video is the mean SSIM over its pairs; per video the candidate with
the highest score wins (the paper picks between a model trained with and without MVC).

Readings of what the paper leaves open:
- Flow direction. The paper writes the flow "from t to t+1" and then warps S_t. Warping with
  ``cv2.remap`` is *backward* warping: every output pixel p of frame t+1 reads the source image
  at map(p). To move S_t onto frame t+1 the map must say, for each pixel of t+1, where it came
  from in frame t, i.e. the flow from t+1 to t: ``calcOpticalFlowFarneback(grey[t+1],
  grey[t])`` gives ``grey[t+1](p) ~ grey[t](p + flow(p))``, and ``S_t(p + flow(p))`` is the
  warped map. Using the t -> t+1 flow in remap would shift the map the wrong way (tested).
  Pixels whose source lies outside frame t take the nearest border label (BORDER_REPLICATE).
- SSIM on label maps: the maps are compared as float images with ``data_range`` = K - 1 when the
  number of classes K is known, else the largest label over all candidates of the video, so that
  every candidate of a video is scored on the same scale (skimage's default 7x7 window).
- Ties (and videos with one frame, where no pair exists and the score is NaN): the candidate
  listed first wins.
"""

from __future__ import annotations

import os
from pathlib import Path
import shutil
from typing import Mapping, Sequence

import cv2
import numpy as np
from skimage.metrics import structural_similarity
from tqdm import tqdm

from vss.io import atomic_path, read_frame, read_label_png

# Farneback parameters (pyr_scale, levels, winsize, iterations, poly_n, poly_sigma, flags):
# OpenCV's tutorial values, the usual choice when none is given (the paper gives none).
FARNEBACK_PARAMS = (0.5, 3, 15, 3, 5, 1.2, 0)


def _grey(frame: np.ndarray) -> np.ndarray:
    if frame.ndim == 2:
        return frame
    return cv2.cvtColor(np.ascontiguousarray(frame), cv2.COLOR_RGB2GRAY)


def backward_flows(frames_rgb: Sequence[np.ndarray] | np.ndarray) -> list[np.ndarray]:
    """Flow from each frame t+1 back to frame t (eq. 5, backward-warping reading).

    Args:
        frames_rgb: (T,H,W,3) uint8 RGB frames (or a list of them).

    Returns:
        T-1 arrays (H,W,2) float32; entry t maps pixels of frame t+1 to their source in frame t:
        ``grey[t+1](y, x) ~ grey[t](y + f[..., 1], x + f[..., 0])``.
    """
    greys = [_grey(np.asarray(f)) for f in frames_rgb]
    return [
        cv2.calcOpticalFlowFarneback(greys[t + 1], greys[t], None, *FARNEBACK_PARAMS) for t in range(len(greys) - 1)
    ]


def warp_labels(labels: np.ndarray, flow: np.ndarray) -> np.ndarray:
    """Backward-warp a label map with a flow (eq. 6): out(p) = labels(p + flow(p)), nearest.

    Args:
        labels: (H,W) integer labels of the earlier frame.
        flow: (H,W,2) flow from the later frame to the earlier one (``backward_flows``).

    Returns:
        (H,W) labels on the later frame's grid, same dtype as ``labels``.
    """
    h, w = labels.shape
    grid_x, grid_y = np.meshgrid(np.arange(w, dtype=np.float32), np.arange(h, dtype=np.float32))
    map_x = grid_x + flow[..., 0]  # (H,W)
    map_y = grid_y + flow[..., 1]  # (H,W)
    # remap has no int64 path; float32 holds label ids exactly (< 2**24).
    warped = cv2.remap(labels.astype(np.float32), map_x, map_y, cv2.INTER_NEAREST, borderMode=cv2.BORDER_REPLICATE)
    return warped.astype(labels.dtype)


def temporal_ssim(
    frames_rgb: Sequence[np.ndarray] | np.ndarray,
    labels: np.ndarray,
    *,
    data_range: float | None = None,
    flows: list[np.ndarray] | None = None,
) -> tuple[float, list[float]]:
    """Temporal consistency of one candidate's labels on one video (eq. 5-7).

    Args:
        frames_rgb: (T,H,W,3) uint8 RGB frames.
        labels: (T,H,W) integer predicted labels.
        data_range: SSIM data range; None = max(1, labels.max()). Pass the same value for all
            candidates you compare (``choose_per_video`` does).
        flows: precomputed ``backward_flows(frames_rgb)`` (shared by all candidates).

    Returns:
        (mean SSIM over the T-1 pairs (NaN if T < 2), list of the per-pair SSIMs).
    """
    labels = np.asarray(labels)
    num_frames = len(frames_rgb)
    if labels.ndim != 3 or labels.shape[0] != num_frames:
        raise ValueError(f"temporal_ssim: labels must be (T={num_frames},H,W), got {labels.shape}")
    frame_hw = np.asarray(frames_rgb[0]).shape[:2] if num_frames else None
    if frame_hw != labels.shape[1:]:
        raise ValueError(f"temporal_ssim: frames are {frame_hw} but labels are {labels.shape[1:]}")
    if min(labels.shape[1:]) < 7:
        raise ValueError(f"temporal_ssim: frames of {labels.shape[1:]} are smaller than the 7x7 SSIM window")
    if data_range is None:
        data_range = float(max(1, int(labels.max())))
    if flows is None:
        flows = backward_flows(frames_rgb)
    per_pair = []
    for t in range(num_frames - 1):
        warped = warp_labels(labels[t], flows[t]).astype(np.float64)  # (H,W)
        later = labels[t + 1].astype(np.float64)  # (H,W)
        per_pair.append(float(structural_similarity(warped, later, data_range=data_range)))
    mean = float(np.mean(per_pair)) if per_pair else float("nan")
    return mean, per_pair


def choose_per_video(
    candidates: Mapping[str, np.ndarray],
    frames_rgb: Sequence[np.ndarray] | np.ndarray,
    *,
    num_classes: int | None = None,
) -> tuple[str, dict[str, float]]:
    """Pick the most temporally consistent candidate for one video.

    Args:
        candidates: name -> (T,H,W) labels of one video (at least one).
        frames_rgb: (T,H,W,3) uint8 RGB frames of the video.
        num_classes: K; SSIM data_range = K - 1. None = the largest label over all candidates.

    Returns:
        (name of the winner, {name: mean SSIM}). Ties and NaN scores: the first listed wins.
    """
    if not candidates:
        raise ValueError("choose_per_video: no candidates")
    if num_classes is not None:
        data_range = float(max(1, num_classes - 1))
    else:
        data_range = float(max(1, max(int(np.asarray(v).max()) for v in candidates.values())))
    flows = backward_flows(frames_rgb)
    scores = {
        name: temporal_ssim(frames_rgb, lab, data_range=data_range, flows=flows)[0] for name, lab in candidates.items()
    }
    # max() keeps the first of equal maxima; NaN (one-frame video) ranks lowest
    best = max(scores, key=lambda name: -np.inf if np.isnan(scores[name]) else scores[name])
    return best, scores


# --- prediction folders (infer.py --aggregate-preds DIR1 DIR2 ...) ---------------------------


def _copy_atomic(src: Path, dst: Path) -> None:
    with atomic_path(dst) as tmp:
        shutil.copyfile(src, tmp)


def _candidate_pngs(dirs: Sequence[str | os.PathLike], video: str) -> dict[str, list[Path]]:
    """{dir: sorted PNGs of the video}; every folder must hold the same file names."""
    pngs_by_dir = {}
    for d in dirs:
        vdir = Path(d) / video
        pngs = sorted(vdir.glob("*.png"))
        if not pngs:
            raise FileNotFoundError(f"{vdir}: no prediction PNGs for video {video}")
        if pngs_by_dir and [p.name for p in pngs] != [p.name for p in pngs_by_dir[str(dirs[0])]]:
            raise ValueError(f"{vdir}: PNG names differ from {Path(dirs[0]) / video}")
        pngs_by_dir[str(d)] = pngs
    return pngs_by_dir


def aggregate_prediction_dirs(
    dirs: Sequence[str | os.PathLike],
    frames_by_video: Mapping[str, Sequence[str | os.PathLike] | np.ndarray],
    out_dir: str | os.PathLike,
    *,
    num_classes: int | None = None,
    progress: bool = True,
) -> dict[str, dict]:
    """Per video, copy the PNGs of the most temporally consistent prediction folder.

    Every prediction folder holds ``DIR/<video>/<frame>.png`` (label ids). Frames are matched to
    PNGs in sorted order; when frame paths are given, their stems must equal the PNG stems.

    Args:
        dirs: candidate prediction folders (their paths are the candidate names).
        frames_by_video: video -> frame image paths (sorted as the video) or (T,H,W,3) uint8 RGB.
        out_dir: output folder; ``out_dir/<video>/*.png`` are written (each file atomically).
        num_classes: K for the SSIM data range (see ``choose_per_video``).
        progress: show a tqdm bar over videos.

    Returns:
        {video: {"scores": {dir: mean SSIM}, "choice": dir}}.
    """
    if len(dirs) < 1:
        raise ValueError("aggregate_prediction_dirs: no prediction folders")
    report = {}
    for video, frames in tqdm(frames_by_video.items(), desc="aggregate", disable=not progress):
        pngs_by_dir = _candidate_pngs(dirs, video)
        first = pngs_by_dir[str(dirs[0])]
        where = Path(dirs[0]) / video
        if not isinstance(frames, np.ndarray):
            if [Path(f).stem for f in frames] != [p.stem for p in first]:
                raise ValueError(
                    f"{where}: the {len(first)} PNGs do not match the {len(frames)} frames of "
                    f"video {video} (file names differ)"
                )
            frames = [read_frame(f) for f in frames]
        candidates = {d: np.stack([read_label_png(p) for p in pngs]) for d, pngs in pngs_by_dir.items()}
        frame_shape = (len(frames), *np.asarray(frames[0]).shape[:2])
        for d, lab in candidates.items():
            if lab.shape != frame_shape:
                raise ValueError(f"{Path(d) / video}: predictions are {lab.shape}, frames (T,H,W) {frame_shape}")
        choice, scores = choose_per_video(candidates, frames, num_classes=num_classes)
        dst = Path(out_dir) / video
        dst.mkdir(parents=True, exist_ok=True)
        for p in pngs_by_dir[choice]:
            _copy_atomic(p, dst / p.name)
        report[video] = {"scores": scores, "choice": choice}
    return report
