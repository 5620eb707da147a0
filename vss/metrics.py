"""VSPW evaluation exactly as the official code computes it: mIoU, fwIoU, pixel / class accuracy
and video consistency VC_n.

Both papers report the PVUW VSS numbers of the official VSPW evaluation (VSPW-dataset/VSPW_code:
``Evaluator`` in ``utils.py``, driven by ``evaluator_test.py``, for mIoU/fwIoU;
``VC_perclip.py`` with ``get_common`` for VC_n). What this module computes:

- One global confusion matrix ``CM[gt, pred]`` (K x K pixel counts) summed over every mask frame
  of every video. GT pixels with a value outside 0..K-1 (ignore 255, i.e. raw "others" and
  "void" after the label shift) are left out; predictions are never masked.
- ``IoU_c = CM[c,c] / (rowsum_c + colsum_c - CM[c,c])``; mIoU is the mean over the classes
  present in GT (rowsum > 0): a class only predicted is left out, not counted as 0 (unlike
  mmseg). fwIoU = sum_c freq_c IoU_c with freq_c = rowsum_c / sum(CM). Pixel accuracy
  trace/sum, class accuracy nanmean(diag/rowsum). Per-class IoU is NaN for classes absent in GT.
- VC_n: for a window of n frames [i, i+n-1], G = pixels whose GT is constant over the window,
  P = pixels whose prediction is constant over it, r = |G & P| / |G| (NaN when |G| = 0).
  Every pixel takes part, GT 255 included (no ignore label, as in the official code), and the
  prediction need not be right, only stable. VC_n is the nanmean over all windows of all videos
  pooled (windows weigh equally, so long videos weigh more).
- Official window rule, off-by-one kept: windows start at i = 0..T-n-1, i.e. T-n windows; the
  last full window [T-n, T-1] is left out and a video with T <= n gives none.
  ``include_last_window=True`` adds that last window (then a video with T = n gives one).

Reading taken on the official code's silent failure: a prediction id >= K on a valid-GT pixel
lands in a wrong confusion cell there; here it is an error naming the frame.

Streaming, one pass per video for every n at once, memory independent of the video length: per
pixel we keep the run length of unchanged GT and of the unchanged (GT, prediction) pair ending at
the current frame (uint8 counters saturating at 255, uint16 when some n > 255). The window
[i, i+n-1] is constant at a pixel iff the run length at frame i+n-1 is >= n, so |G| counts the
pixels whose GT run is >= n and |G & P| those whose pair run is >= n (GT and prediction both
constant = the pair constant). A window is counted when the frame after it arrives, which is
exactly the official rule i <= T-n-1; ``finish()`` counts the window ending at the last frame
only when ``include_last_window`` is set. The official script instead holds every frame of a
video and loops over (T-n) x (n-1) full-frame comparisons per n.

Confusion counts of uint8 maps are taken per run of equal (gt, pred) pairs in raster order
(weighted by the run length) rather than per pixel; same numbers, several times fewer bincount
entries for piecewise-constant label maps. The per-frame work is a few whole-frame numpy passes
into buffers allocated once per video.
"""

from __future__ import annotations

from dataclasses import dataclass, field
import functools
from typing import Iterable, Sequence

import cv2  # saturating in-place add for the run lengths, fast counts
import numpy as np

__all__ = ["confusion_matrix", "VideoStats", "DatasetStats", "merge", "summarize", "iou_from_confusion"]


def _check_prediction(gt: np.ndarray, pred: np.ndarray, num_classes: int, name: str) -> None:
    """Raise a ValueError naming ``name`` when pred is not an (H,W) id map matching gt."""
    if pred.ndim != 2:
        raise ValueError(f"{name}: prediction must be a single-channel (H, W) map of class ids, got shape {pred.shape}")
    if pred.shape != gt.shape:
        raise ValueError(
            f"{name}: prediction is {pred.shape[0]}x{pred.shape[1]} (HxW) but the ground truth is "
            f"{gt.shape[0]}x{gt.shape[1]}"
        )
    if pred.dtype.kind not in "ui" or gt.dtype.kind not in "ui":
        raise ValueError(f"{name}: labels must be integer arrays, got gt {gt.dtype}, prediction {pred.dtype}")
    if pred.size == 0:
        return
    # cheap reductions; the masked check below runs only on failure
    if (pred.dtype.kind == "u" or pred.min() >= 0) and pred.max() < num_classes:
        return
    bad = ((pred < 0) | (pred >= num_classes)) & (gt >= 0) & (gt < num_classes)
    if bad.any():
        values = pred[bad]
        value = int(values.max() if values.max() >= num_classes else values.min())
        raise ValueError(
            f"{name}: prediction holds class id {value} (outside 0..{num_classes - 1}) at "
            f"{int(bad.sum())} pixels with valid ground truth; write ids 0..{num_classes - 1}"
        )


def confusion_matrix(gt: np.ndarray, pred: np.ndarray, num_classes: int, name: str = "prediction") -> np.ndarray:
    """Pixel confusion matrix of one frame, rows = GT, columns = prediction.

    Args:
        gt: (H,W) integer GT ids, already shifted; values outside 0..K-1 (ignore 255) are skipped.
        pred: (H,W) integer predicted ids 0..K-1 (any value is allowed where GT is ignored).
        num_classes: K.
        name: file or frame named in error messages.
    Returns:
        (K,K) int64 counts ``CM[gt, pred]``.
    Raises:
        ValueError: shape mismatch, non-integer labels, or a prediction id outside 0..K-1 on a
            valid GT pixel.
    """
    gt, pred = np.asarray(gt), np.asarray(pred)
    _check_prediction(gt, pred, num_classes, name)
    return _confusion_checked(gt, pred, num_classes).astype(np.int64)


def _confusion_checked(
    gt: np.ndarray, pred: np.ndarray, num_classes: int, work: np.ndarray | None = None
) -> np.ndarray:
    """(K,K) counts (float64 or int64, exact integers) of checked labels; ``work`` as in
    ``_confusion_runs``."""
    if gt.dtype == np.uint8 and pred.dtype == np.uint8 and num_classes <= 255:
        return _confusion_runs(gt, pred, num_classes, work)
    return _confusion_bincount(gt, pred, num_classes)


def _confusion_runs(gt: np.ndarray, pred: np.ndarray, num_classes: int, work: np.ndarray | None = None) -> np.ndarray:
    """uint8 fast path. Label maps are piecewise constant, so each run of equal (gt, pred) pairs
    in raster order is counted once, weighted by its length: a few thousand bincount entries
    per frame instead of one per pixel. Noisy maps (many runs) go per pixel.

    Args:
        gt, pred: (H,W) uint8 labels (checked).
        num_classes: K <= 255.
        work: optional (2, H*W) bool scratch buffer, reused across the frames of a video.
    Returns:
        (K,K) float64 counts (exact: whole numbers far below 2**53).
    """
    k = num_classes
    g, p = gt.reshape(-1), pred.reshape(-1)  # (HW,) raster order
    if work is None or work.shape != (2, g.size):
        work = np.empty((2, g.size), bool)
    start, p_changes = work  # (HW,) each; start: True where a run of equal (gt, pred) pairs begins
    start[0] = True
    np.not_equal(g[1:], g[:-1], out=start[1:])
    np.not_equal(p[1:], p[:-1], out=p_changes[1:])
    start[1:] |= p_changes[1:]
    if cv2.countNonZero(start.view(np.uint8)) > g.size // 8:  # before flatnonzero, slow on dense masks
        return _confusion_pixels(g, p, k).astype(np.float64)
    first = np.flatnonzero(start)  # (R,) first pixel of each run
    lengths = np.empty_like(first)  # (R,)
    np.subtract(first[1:], first[:-1], out=lengths[:-1])
    lengths[-1] = g.size - first[-1]
    # cell of each run: GT row offset from a 256-entry table (ignored GT, values >= K, lands past
    # the K*K cells and is cut off) plus the predicted column: no masking pass
    cell = _row_offsets(k).take(g.take(first)) + p.take(first)  # (R,)
    counts = np.bincount(cell, weights=lengths, minlength=k * k + 256)  # float64, exact below 2**53
    return counts[: k * k].reshape(k, k)


@functools.lru_cache(maxsize=8)
def _row_offsets(num_classes: int) -> np.ndarray:
    """(256,) intp: ``v * K`` for GT values v < K, ``K * K`` for ignored values."""
    v = np.arange(256)
    return np.where(v < num_classes, v * num_classes, num_classes * num_classes)


def _confusion_pixels(g: np.ndarray, p: np.ndarray, num_classes: int) -> np.ndarray:
    """uint8 per-pixel path: code = gt*K + pred in uint16 (<= 255*255+255). Ignored GT (>= K)
    lands at >= K*K and is cut off, so no masking pass is needed."""
    k = num_classes
    code = g.astype(np.uint16)  # (HW,)
    code *= k
    code += p
    return np.bincount(code, minlength=k * k)[: k * k].reshape(k, k)


def _confusion_bincount(gt: np.ndarray, pred: np.ndarray, num_classes: int) -> np.ndarray:
    """Generic path (any integer dtype), the official ``bincount(K*gt + pred)`` on valid GT."""
    k = num_classes
    valid = (gt >= 0) & (gt < k)  # (H,W)
    code = gt[valid].astype(np.int64) * k + pred[valid]  # (P,) P valid pixels
    return np.bincount(code, minlength=k * k)[: k * k].reshape(k, k)


class VideoStats:
    """Streaming accumulator of one video: confusion matrix and VC windows.

    Feed the frames in temporal order with ``update``, then call ``finish``. Only the previous
    labels, the run-length arrays and scratch buffers of frame size are kept (allocated on the
    first frame, reused), so memory does not grow with the video length.

    Attributes:
        name: video name.
        confusion: (K,K) int64 pixel counts of the video (of the frames seen so far).
        num_frames: frames seen.
        window_inter: {n: list of |G & P| per counted window} in temporal order.
        window_const: {n: list of |G| per counted window}.
    """

    def __init__(
        self, num_classes: int, vc_sizes: Sequence[int] = (8, 16), *, name: str = "", include_last_window: bool = False
    ) -> None:
        if num_classes < 1:
            raise ValueError(f"num_classes must be >= 1, got {num_classes}")
        if any(not 1 <= int(n) <= 65535 for n in vc_sizes):
            raise ValueError(f"VC window sizes must be in 1..65535, got {list(vc_sizes)}")
        self.name = name
        self.num_classes = num_classes
        self.vc_sizes = tuple(sorted({int(n) for n in vc_sizes}))
        self.include_last_window = include_last_window
        self._counts = np.zeros((num_classes, num_classes))  # float64: exact whole numbers below 2**53
        self.num_frames = 0
        self.window_inter: dict[int, list[int]] = {n: [] for n in self.vc_sizes}
        self.window_const: dict[int, list[int]] = {n: [] for n in self.vc_sizes}
        self.finished = False
        # run-length counters saturate at the dtype maximum (255 / 65535), which only has to be >= n
        self._run_dtype = np.uint8 if max(self.vc_sizes, default=1) <= 255 else np.uint16
        self._free_frame_state()

    @property
    def confusion(self) -> np.ndarray:
        """(K,K) int64 pixel counts ``CM[gt, pred]`` of the frames seen."""
        return self._counts.astype(np.int64)

    def _free_frame_state(self) -> None:
        # previous labels (our copies, or the arrays handed over with copy=False); run lengths of
        # unchanged GT and of unchanged (GT, prediction) pairs ending at the last frame; scratch
        # masks. (H,W) each, made on the first frame.
        self._prev_gt = self._prev_pred = self._run_gt = self._run_both = None
        self._copies = (None, None)
        self._scratch = None

    def _alloc_frame_state(self, shape: tuple[int, ...]) -> None:
        self._run_gt = np.ones(shape, self._run_dtype)  # (H,W)
        self._run_both = np.ones(shape, self._run_dtype)  # (H,W)
        # two frame-size bool masks shared by the steps of an update, one after the other (counting,
        # change masks, confusion runs): fewer buffers, less cache traffic for the decoder
        self._scratch = np.empty((2, int(np.prod(shape))), bool)  # (2, HW)

    def update(self, gt: np.ndarray, pred: np.ndarray, name: str | None = None, *, copy: bool = True) -> None:
        """Add the next frame.

        Args:
            gt: (H,W) integer GT ids (shifted: 0..K-1, 255 ignore). VC uses these values as
                they are, so passing raw GT gives the official "raw GT" VC variant.
            pred: (H,W) integer predicted ids 0..K-1.
            name: file named in error messages (default: video and frame index).
            copy: keep copies of the frame for the next update, so the caller may reuse its
                arrays; False hands them over (the caller must not modify them afterwards) and
                saves two frame copies.
        Raises:
            ValueError: see ``confusion_matrix``; a frame size that changes within the video.
        """
        if self.finished:
            raise RuntimeError(f"video {self.name!r}: update() after finish()")
        name = name or f"video {self.name!r} frame {self.num_frames}"
        gt, pred = np.asarray(gt), np.asarray(pred)
        _check_prediction(gt, pred, self.num_classes, name)
        if self._prev_gt is None:
            self._alloc_frame_state(gt.shape)
        elif gt.shape != self._prev_gt.shape:
            raise ValueError(f"{name}: frame size {gt.shape} differs from the previous frame's {self._prev_gt.shape}")
        elif self.vc_sizes:
            # A frame after the window ending at the previous frame exists, so that window obeys
            # the official i <= T-n-1: count it before the run lengths move on.
            self._count_windows()
            same_gt, same_both = self._scratch.reshape(2, *gt.shape)  # (H,W) each
            np.equal(self._prev_gt, gt, out=same_gt)
            np.equal(self._prev_pred, pred, out=same_both)
            same_both &= same_gt
            _advance_run(self._run_gt, same_gt)
            _advance_run(self._run_both, same_both)
        self._counts += _confusion_checked(gt, pred, self.num_classes, self._scratch)
        if copy:  # into buffers of our own, reused from frame to frame
            self._copies = (_keep(self._copies[0], gt), _keep(self._copies[1], pred))
            self._prev_gt, self._prev_pred = self._copies
        else:
            self._prev_gt, self._prev_pred = gt, pred
        self.num_frames += 1

    def _count_windows(self) -> None:
        """Count the windows ending at the last frame seen (frame index num_frames-1).

        The (gt, pred) pair is constant over the window iff both are, so |G & P| counts the
        pixels whose pair run length is >= n."""
        mask = self._scratch[0].reshape(self._run_gt.shape)  # (H,W)
        for n in self.vc_sizes:
            if self.num_frames < n:
                break
            self.window_const[n].append(_count_at_least(self._run_gt, n, mask))
            self.window_inter[n].append(_count_at_least(self._run_both, n, mask))

    def finish(self) -> "VideoStats":
        """End the video: count the last window if ``include_last_window``, free the frame state.

        Returns:
            self, so ``stats = video.finish()`` reads naturally in a map over videos.
        """
        if not self.finished:
            if self.include_last_window and self._prev_gt is not None:
                self._count_windows()
            self._free_frame_state()
            self.finished = True
        return self

    def window_ratios(self, n: int) -> np.ndarray:
        """(W,) float64 ratios |G & P| / |G| of the counted windows of size n (NaN where |G| = 0)."""
        inter = np.asarray(self.window_inter[n], np.float64)
        const = np.asarray(self.window_const[n], np.float64)
        with np.errstate(invalid="ignore", divide="ignore"):
            return np.where(const > 0, inter / np.where(const > 0, const, 1.0), np.nan)

    def vc(self, n: int) -> float:
        """VC_n of this video: nanmean of its window ratios, NaN without a finite one (the official
        script prints the plain mean, which is NaN as soon as one window is)."""
        return _nanmean(self.window_ratios(n))


def _count_at_least(run: np.ndarray, n: int, scratch: np.ndarray) -> int:
    """Number of entries >= n of ``run``; ``scratch`` is a bool array of its shape.
    (cv2.countNonZero counts a third faster than np.count_nonzero, on one thread too.)"""
    np.greater_equal(run, n, out=scratch)
    return cv2.countNonZero(scratch.view(np.uint8))


def _advance_run(run: np.ndarray, same: np.ndarray) -> None:
    """In place: run = run + 1 where the label is unchanged, else 1 (saturating, no overflow)."""
    np.multiply(run, same.view(np.uint8), out=run)  # 0 where the label changed
    cv2.add(run, 1, dst=run)  # saturating: a run >= the largest n stays >= it


def _keep(buffer: np.ndarray | None, x: np.ndarray) -> np.ndarray:
    """Copy x into the reusable buffer (a copy, so the caller may reuse its array)."""
    if buffer is not None and buffer.dtype == x.dtype:
        np.copyto(buffer, x)
        return buffer
    return x.copy()


def _official_nanmean(x: np.ndarray) -> float:
    """``np.nanmean`` as VC_perclip.py takes it (the same summation, so equal to the last bit),
    NaN without the warning when nothing is finite."""
    if not np.isfinite(x).any():
        return float("nan")
    return float(np.nanmean(x))


def _nanmean(x: np.ndarray) -> float:
    """np.nanmean without the empty-slice warning: NaN when nothing is finite."""
    x = x[~np.isnan(x)]
    return float(x.mean()) if x.size else float("nan")


@dataclass
class DatasetStats:
    """Merged statistics of many videos: the global confusion matrix, every window ratio pooled
    in video order, and the per-video VC and window counts."""

    num_classes: int
    vc_sizes: tuple[int, ...]
    confusion: np.ndarray = None  # (K,K) int64
    num_frames: int = 0
    ratios: dict[int, list[np.ndarray]] = field(default_factory=dict)  # n -> per-video (W,) ratios
    videos: dict[str, dict] = field(default_factory=dict)  # name -> {"frames", "VC{n}", "VC{n}_windows"}

    def __post_init__(self) -> None:
        if self.confusion is None:
            self.confusion = np.zeros((self.num_classes, self.num_classes), np.int64)
        for n in self.vc_sizes:
            self.ratios.setdefault(n, [])

    def add(self, video: VideoStats) -> None:
        """Merge one finished video (videos may arrive one at a time from worker processes)."""
        if video.num_classes != self.num_classes or video.vc_sizes != self.vc_sizes:
            raise ValueError(
                f"video {video.name!r}: K={video.num_classes}, VC sizes {video.vc_sizes} "
                f"do not match K={self.num_classes}, VC sizes {self.vc_sizes}"
            )
        video.finish()
        self.add_windows(video.name, video.num_frames, {n: video.window_ratios(n) for n in self.vc_sizes})
        self.confusion += video.confusion

    def add_windows(self, name: str, num_frames: int, ratios: dict[int, np.ndarray]) -> None:
        """Record a video's frame count and window ratios (``VideoStats.window_ratios``) without
        its confusion matrix: for callers that reduce the confusion matrices themselves (e.g.
        an all-reduce across ranks) and gather only the ratios."""
        if name in self.videos:
            raise ValueError(f"video {name!r} is merged twice")
        self.num_frames += num_frames
        entry: dict = {"frames": num_frames}
        for n in self.vc_sizes:
            r = np.asarray(ratios[n], np.float64)
            self.ratios[n].append(r)
            entry[f"VC{n}"] = _nanmean(r)
            entry[f"VC{n}_windows"] = int(r.size)
        self.videos[name] = entry


def merge(videos: Iterable[VideoStats]) -> DatasetStats:
    """Merge finished per-video statistics (all with the same K and VC sizes) into one.

    Args:
        videos: the videos, in split order (the pooled VC sum follows this order).
    Returns:
        DatasetStats; empty (K from nothing) inputs raise ValueError.
    """
    total = None
    for v in videos:
        if total is None:
            total = DatasetStats(v.num_classes, v.vc_sizes)
        total.add(v)
    if total is None:
        raise ValueError("merge() got no video")
    return total


def iou_from_confusion(confusion: np.ndarray) -> np.ndarray:
    """(K,) IoU per class from a (K,K) confusion matrix; NaN for classes absent from GT."""
    cm = np.asarray(confusion, np.float64)
    diag, rows, cols = np.diag(cm), cm.sum(1), cm.sum(0)
    with np.errstate(invalid="ignore", divide="ignore"):
        iou = diag / (rows + cols - diag)
    iou[rows == 0] = np.nan
    return iou


def summarize(stats: DatasetStats, class_names: Sequence[str] | None = None) -> dict:
    """Every figure of the evaluation.

    Args:
        stats: merged statistics.
        class_names: K names for the per-class entries (default "0".."K-1").
    Returns:
        dict with ``mIoU``, ``fwIoU``, ``pixel_acc``, ``class_acc``, ``per_class_IoU`` ({name: IoU,
        NaN if absent from GT}), ``num_classes``, ``num_videos``, ``num_frames``, ``num_pixels``
        (valid GT pixels), for each n ``VC{n}``, ``VC{n}_windows`` (counted windows, NaN ones
        included, as the official loop counts them) and ``VC{n}_valid_windows`` (windows with
        |G| > 0), and ``per_video`` ({name: {"frames", "VC{n}", "VC{n}_windows"}}). Undefined
        values are NaN.
    """
    cm = stats.confusion.astype(np.float64)
    k = stats.num_classes
    names = list(class_names) if class_names is not None else [str(c) for c in range(k)]
    if len(names) != k:
        raise ValueError(f"{len(names)} class names for {k} classes")
    rows, total = cm.sum(1), cm.sum()
    present = rows > 0
    iou = iou_from_confusion(cm)
    # The official utils.Evaluator's expressions, term for term, so the figures are equal to the
    # last bit (a mean over the present classes alone can differ from its nansum in the last bit).
    diag = np.diag(cm)
    with np.errstate(invalid="ignore", divide="ignore"):
        iou_all = diag / (rows + cm.sum(0) - diag)  # (K,) 0 or NaN for absent classes
        freq = rows / total
        miou = np.nansum(iou_all * present) / present.sum()
        class_acc = np.nanmean(diag / rows)
    out = {
        "mIoU": float(miou) if present.any() else float("nan"),
        "fwIoU": float((freq[freq > 0] * iou_all[freq > 0]).sum()) if present.any() else float("nan"),
        "pixel_acc": float(diag.sum() / total) if total > 0 else float("nan"),
        "class_acc": float(class_acc) if present.any() else float("nan"),
        "num_classes": k,
        "num_videos": len(stats.videos),
        "num_frames": stats.num_frames,
        "num_pixels": int(stats.confusion.sum()),
    }
    for n in stats.vc_sizes:
        pooled = np.concatenate(stats.ratios[n]) if stats.ratios[n] else np.zeros(0)
        out[f"VC{n}"] = _official_nanmean(pooled)
        out[f"VC{n}_windows"] = int(pooled.size)
        out[f"VC{n}_valid_windows"] = int(np.count_nonzero(~np.isnan(pooled)))
    out["per_class_IoU"] = {name: float(v) for name, v in zip(names, iou)}
    out["per_video"] = {name: dict(v) for name, v in stats.videos.items()}
    return out
