"""Evaluate VSPW-layout predictions with the official PVUW VSS metrics: mIoU, fwIoU, pixel and
class accuracy, VC_n (``vss/metrics.py`` has the definitions and the official quirks kept).

    python evaluate.py --pred runs/x/pred --gt /data/VSPW_480p --split val --vc 8,16 --workers 4 --json out.json
    python evaluate.py            # the embedded default: synthetic dataset vs runs/default/pred

Ground truth: ``GT/data/<video>/mask/*.png`` in raw VSPW encoding (0 others, k+1 class k, 255
void), shifted to train ids before scoring. Predictions: ``PRED/<video>/<mask file name>``, class
ids 0..K-1 as grey or palette PNGs (the palette index is the id). Every PNG is read once; videos
are spread over ``--workers`` processes. Bad input (missing or corrupt file, wrong size, id >= K,
empty split, video without frames) prints one line naming the file and exits with code 2.
"""

from __future__ import annotations

import argparse
from contextlib import contextmanager
import ctypes
from functools import partial
import math
import multiprocessing
from pathlib import Path
import sys
from typing import Iterator, Sequence

import cv2
from tqdm import tqdm

from vss.io import (
    check_label_range,
    list_frames,
    load_class_names,
    read_prediction_png,
    read_shifted_label,
    read_split,
    write_json_atomic,
)
from vss.metrics import DatasetStats, summarize, VideoStats

REPO = Path(__file__).resolve().parent
DEFAULT_PRED = REPO / "runs" / "default" / "pred"


def default_paths() -> tuple[Path, Path, str]:
    """(GT root, prediction folder, split) of the embedded default run: the synthetic dataset
    (rendered on first use) and what ``python infer.py`` writes with no arguments."""
    if not DEFAULT_PRED.is_dir():
        raise FileNotFoundError(
            f"default predictions not found at {DEFAULT_PRED}: run `python infer.py` first "
            "(or pass --pred DIR --gt ROOT)"
        )
    from vss.synthetic import ensure_default_dataset  # imported here: only the default run needs it

    return Path(ensure_default_dataset()), DEFAULT_PRED, "val"


def evaluate_video(
    video: str,
    gt_root: Path,
    pred_dir: Path,
    num_classes: int,
    vc_sizes: tuple[int, ...],
    include_last_window: bool = False,
) -> VideoStats:
    """Score one video: every mask frame of ``gt_root/data/video`` against ``pred_dir/video``.

    Returns:
        The finished VideoStats.
    Raises:
        FileNotFoundError / ValueError naming the file or video (see ``vss.io.read_prediction_png``,
        ``VideoStats.update``, ``vss.io.list_frames``).
    """
    masks = list_frames(gt_root / "data" / video, kind="mask")
    if not (pred_dir / video).is_dir():
        raise FileNotFoundError(f"{pred_dir / video}: prediction folder of video {video!r} not found")
    stats = VideoStats(num_classes, vc_sizes, name=video, include_last_window=include_last_window)
    for mask in masks:
        pred_path = pred_dir / video / mask.name
        gt = read_shifted_label(mask)  # (H,W) uint8 train ids, 255 ignore
        if cv2.countNonZero(cv2.inRange(gt, num_classes, 254)):  # ids >= K other than ignore: one fast pass
            check_label_range(gt, num_classes, mask)
        pred = read_prediction_png(pred_path)  # (H,W)
        stats.update(gt, pred, name=str(pred_path), copy=False)  # fresh arrays, never modified
    return stats.finish()


def reuse_freed_memory() -> None:
    """Ask glibc to keep freed memory for reuse rather than hand it back to the OS at once.

    Every frame is decoded into new arrays (0.4 MB each at 480p); with glibc's default
    thresholds each one is served by fresh pages that the kernel must fault in and zero, which
    made decoding a third to a half slower here. (Importing torch happens to raise these thresholds;
    evaluate.py does not import torch.) Process-wide, set once by ``main`` and in each worker;
    does nothing on other C libraries.
    """
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, TypeError, AttributeError):  # no C library handle (Windows) or no mallopt (macOS)
        return
    mallopt(-1, 64 << 20)  # M_TRIM_THRESHOLD: keep up to 64 MB of free heap
    mallopt(-3, 32 << 20)  # M_MMAP_THRESHOLD: blocks below 32 MB come from the (reused) heap


def _init_spawned_worker() -> None:
    reuse_freed_memory()
    cv2.setNumThreads(1)  # the processes are the parallelism: avoid oversubscribing the cores


@contextmanager
def _video_results(job, videos: Sequence[str], workers: int) -> Iterator[Iterator[VideoStats]]:
    """An iterator over the VideoStats of each video in split order, computed in-process or by a
    worker pool that lives as long as the ``with`` block.

    On Linux the workers are forked: they start in milliseconds with everything imported and
    the parent's malloc settings, where spawn / forkserver (the default from Python 3.14) would
    re-import this module in each worker (~0.4 s). A forked worker must not touch OpenCV's
    thread pool (``cv2.setNumThreads`` can hang in a child forked while the parent's pool
    threads wait); the per-frame work uses no multi-threaded OpenCV function. One video per
    task keeps the load balanced; a task (tens of ms per video) dwarfs its dispatch cost.
    """
    if workers <= 1 or len(videos) <= 1:
        yield map(job, videos)
        return
    n = min(workers, len(videos))
    if sys.platform.startswith("linux"):
        pool = multiprocessing.get_context("fork").Pool(n)
    else:
        pool = multiprocessing.Pool(n, initializer=_init_spawned_worker)
    with pool:
        yield pool.imap(job, videos)


def evaluate(
    gt_root: Path,
    pred_dir: Path,
    split: str,
    *,
    num_classes: int | None = None,
    vc_sizes: Sequence[int] = (8, 16),
    workers: int = 1,
    include_last_window: bool = False,
    progress: bool = True,
) -> dict:
    """Evaluate a prediction folder against a VSPW-layout dataset.

    Args:
        gt_root: dataset root holding ``<split>.txt`` and ``data/<video>/mask``.
        pred_dir: folder of ``<video>/<mask file name>`` prediction PNGs.
        split: split name.
        num_classes: K; default the number of classes of ``load_class_names(gt_root)``.
        vc_sizes: window lengths n of VC_n.
        workers: processes (1 = in-process).
        include_last_window: add the window the official code leaves out (not official).
        progress: show a tqdm bar over videos.
    Returns:
        ``vss.metrics.summarize`` output (per-class IoU keyed by class name).
    """
    gt_root, pred_dir = Path(gt_root), Path(pred_dir)
    if not pred_dir.is_dir():
        raise FileNotFoundError(f"{pred_dir}: prediction folder not found")
    names, _ = load_class_names(gt_root)
    k = num_classes or len(names)
    videos = read_split(gt_root, split)
    sizes = tuple(sorted(set(vc_sizes)))
    job = partial(
        evaluate_video,
        gt_root=gt_root,
        pred_dir=pred_dir,
        num_classes=k,
        vc_sizes=sizes,
        include_last_window=include_last_window,
    )
    total = DatasetStats(k, sizes)
    # the pool is made before the progress bar, whose monitor thread should not be alive at fork
    with _video_results(job, videos, workers) as results:
        for stats in tqdm(
            results, total=len(videos), desc="evaluate", unit="video", disable=not progress, file=sys.stderr
        ):
            total.add(stats)
    return summarize(total, names if len(names) == k else None)


def format_report(summary: dict) -> str:
    """Per-class IoU table (all K classes, '-' for a class absent from GT) and the summary lines,
    figures in percent."""
    lines = [f"{'class':<40} {'IoU %':>7}"]
    for name, iou in summary["per_class_IoU"].items():
        lines.append(f"{name:<40} {'-' if math.isnan(iou) else f'{100 * iou:7.2f}':>7}")
    present = sum(not math.isnan(v) for v in summary["per_class_IoU"].values())
    lines += [
        "",
        f"videos {summary['num_videos']}, frames {summary['num_frames']}, "
        f"valid GT pixels {summary['num_pixels']}, classes {summary['num_classes']} ({present} in GT)",
    ]
    for key in ("mIoU", "fwIoU", "pixel_acc", "class_acc"):
        lines.append(f"{key:<10} {100 * summary[key]:7.2f}")
    for key in sorted((k for k in summary if k.startswith("VC") and k[2:].isdigit()), key=lambda s: int(s[2:])):
        lines.append(
            f"{key:<10} {100 * summary[key]:7.2f}   ({summary[key + '_windows']} windows, "
            f"{summary[key + '_valid_windows']} with constant GT pixels)"
        )
    return "\n".join(lines)


def _vc_sizes(text: str) -> tuple[int, ...]:
    try:
        sizes = tuple(int(t) for t in text.split(",") if t.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"--vc wants comma-separated integers, got {text!r}") from None
    if any(n < 1 for n in sizes):
        raise argparse.ArgumentTypeError(f"--vc window sizes must be >= 1, got {text!r}")
    return sizes


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--pred", type=Path, help="prediction folder PRED/<video>/<frame>.png (class ids)")
    p.add_argument("--gt", type=Path, help="dataset root with <split>.txt and data/<video>/mask/*.png (raw VSPW ids)")
    p.add_argument("--split", default="val", help="split file name without .txt (default: val)")
    p.add_argument("--num-classes", type=int, default=None, help="K (default: number of classes of the dataset)")
    p.add_argument("--vc", type=_vc_sizes, default=(8, 16), help="VC window sizes, e.g. 8,16; '' for none")
    p.add_argument(
        "--include-last-window",
        action="store_true",
        help="also count the window ending at the last frame (NOT the official number)",
    )
    p.add_argument("--workers", type=int, default=1, help="worker processes over videos (default 1: in-process)")
    p.add_argument("--json", type=Path, default=None, help="write every figure (incl. per-video VC) to this file")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = get_args_parser()
    args = parser.parse_args(argv)
    if (args.pred is None) != (args.gt is None):
        parser.error("give both --pred and --gt (or no argument at all for the embedded default)")
    if args.num_classes is not None and not 1 <= args.num_classes <= 255:
        parser.error(f"--num-classes must be in 1..255, got {args.num_classes}")
    if args.workers < 1:
        parser.error(f"--workers must be >= 1 (1 = in-process), got {args.workers}")
    # corrupt PNGs are reported by our own error line; keep OpenCV's C++ log off stderr
    cv2.utils.logging.setLogLevel(cv2.utils.logging.LOG_LEVEL_SILENT)
    reuse_freed_memory()
    try:
        gt, pred, split = (args.gt, args.pred, args.split) if args.gt is not None else default_paths()
        summary = evaluate(
            gt,
            pred,
            split,
            num_classes=args.num_classes,
            vc_sizes=args.vc,
            workers=args.workers,
            include_last_window=args.include_last_window,
            progress=not args.no_progress,
        )
    except (ValueError, OSError) as e:
        print(f"evaluate.py: error: {e}", file=sys.stderr)
        return 2
    print(format_report(summary))
    if args.json is not None:
        summary["config"] = {
            "gt": str(gt),
            "pred": str(pred),
            "split": split,
            "vc_sizes": list(args.vc),
            "include_last_window": args.include_last_window,
        }
        write_json_atomic(args.json, summary)
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
