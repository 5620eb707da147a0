"""Benchmark of evaluate.py (mIoU + VC8 + VC16) against the official VSPW scripts, side by side.

    python benchmarks/bench_evaluate.py [--videos 24] [--frames 60] [--repeat 3] [--cache runs/bench_evaluate]
    python benchmarks/bench_evaluate.py --official-code DIR     # also run the real official scripts
    python benchmarks/bench_evaluate.py --quick     # 8 videos x 30 frames, 1 round, no memory table

Renders once (cached) a synthetic VSPW-layout set of 480x854 label videos of drifting regions
(labels persist over time and change along moving boundaries): raw-encoded GT palette PNGs
(0 others, k+1 class k, 255 void) and palette-PNG predictions (class ids), as VSPW masks and
our infer.py outputs are stored. The default set is 24 videos x 60 frames. Then times, in
interleaved rounds (a burst of load from other jobs hits every row alike), wall and CPU seconds:
- evaluate.py's ``evaluate`` with 1 and 2 workers (one streaming pass, every PNG read once);
- the official scripts transcribed here (VSPW-dataset/VSPW_code): ``evaluator_test.py`` with
  ``utils.Evaluator`` (PIL.Image.open + np.array per GT/prediction pair, one masked bincount per
  frame, the Evaluator's mIoU expression) and then, for EACH n, ``VC_perclip.py`` (every frame of
  a video read into memory, ``get_common``'s nested window loops with float64 np.ones
  AND-accumulators, ``np.nanmean`` of the pooled windows). The official scripts read a GT copy
  shifted to train ids beforehand; the transcription shifts each GT frame as it reads it;
- the decode floor: decoding every GT and prediction PNG once with evaluate.py's decoders;
- peak RSS (ru_maxrss of a fresh child process) of evaluate.py and of the official VC loop for
  the same videos cut to half and full length: evaluate's is flat in video length, the official
  one is not.
The results of evaluate.py and of the transcription must be equal to the last bit (checked).

``--official-code DIR`` (a checkout of VSPW-dataset/VSPW_code, e.g. ``git clone`` or ``git
archive`` of it; never shipped here) adds an end-to-end comparison of fresh processes: ``python
evaluate.py --workers 1`` against ``python evaluator_test.py`` + ``python VC_perclip.py`` for
n = 16 and for n = 8 (a temp copy with ``clip_num = 8``, the only edit) on a shifted copy of the
GT, as ``evaluation.sh`` runs them. Interpreter start and imports count on both sides (the
official ``utils.py`` imports torch). Their printed numbers are checked against evaluate.py's.

Everything in-process runs with ``evaluate.reuse_freed_memory()`` applied, as ``python
evaluate.py`` does: without it every decoded frame lands in fresh pages from the kernel, which
slows the floor, evaluate.py and the official loops alike (importing torch, as the official
``utils.py`` does, happens to have the same effect).
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
from pathlib import Path
import platform
import re
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

import cv2
import numpy as np
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import evaluate as ev  # noqa: E402
from vss.io import list_frames, read_label_png, read_split, shift_labels, write_label_png  # noqa: E402

K = 124
H, W = 480, 854


# ------------------------------------------------------------------------------------------
# data
# ------------------------------------------------------------------------------------------


def _nearest_seed(pos: np.ndarray, yy: np.ndarray, xx: np.ndarray) -> np.ndarray:
    d = (yy[None] - pos[:, 0, None, None]) ** 2 + (xx[None] - pos[:, 1, None, None]) ** 2  # (S,h,w)
    return d.argmin(0)  # (h,w) seed index


def _render_video(rng: np.random.Generator, frames: int) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """Moving regions: a Voronoi map of 40 drifting seeds at 1/4 resolution, upscaled (nearest),
    so labels persist over time and change along moving boundaries, as in real video masks. Raw
    GT ids 1..K with some 'others' (0) and void (255) regions. The prediction is the map of
    jittered seeds (boundary flicker, like a per-frame model) with some regions mislabelled and
    something predicted on void."""
    h, w, s = H // 4, W // 4, 40
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    pos = rng.random((s, 2)).astype(np.float32) * [h, w]
    vel = rng.normal(0, 0.5, (s, 2)).astype(np.float32)
    raw = rng.integers(1, K + 1, s).astype(np.uint8)
    raw[:3] = (0, 0, 255)
    ids = shift_labels(raw)
    ids[ids == 255] = rng.integers(0, K, int((ids == 255).sum()))
    wrong, alt = rng.random(s) < 0.15, rng.integers(0, K, s).astype(np.uint8)
    gts, preds = [], []
    for _ in range(frames):
        pos += vel
        out = (pos < 0) | (pos > [h, w])
        vel[out] *= -1  # bounce off the borders
        wrong ^= rng.random(s) < 0.03
        pred_ids = np.where(wrong, alt, ids)
        g = raw[_nearest_seed(pos, yy, xx)]
        p = pred_ids[_nearest_seed(pos + rng.normal(0, 0.7, pos.shape).astype(np.float32), yy, xx)]
        gts.append(cv2.resize(g, (W, H), interpolation=cv2.INTER_NEAREST))
        preds.append(cv2.resize(p, (W, H), interpolation=cv2.INTER_NEAREST))
    return gts, preds


def render(root: Path, videos: int, frames: int, seed: int = 0) -> None:
    """Write ROOT/gt/{val.txt, data/<v>/mask/*.png} and ROOT/pred/<v>/*.png unless complete."""
    done = root / "done.txt"
    if done.is_file() and done.read_text() == f"{videos} {frames} {seed}":
        return
    rng = np.random.default_rng(seed)
    names = [f"vid{v:03d}" for v in range(videos)]
    for v in names:
        gts, preds = _render_video(rng, frames)
        for t, (g, p) in enumerate(zip(gts, preds)):
            write_label_png(root / "gt" / "data" / v / "mask" / f"{t + 1:08d}.png", g)
            write_label_png(root / "pred" / v / f"{t + 1:08d}.png", p)
        print(f"rendered {v}", file=sys.stderr)
    (root / "gt" / "val.txt").write_text("".join(n + "\n" for n in names))
    done.write_text(f"{videos} {frames} {seed}")


def truncated_view(root: Path, frames: int) -> Path:
    """A copy of the set with the first `frames` frames of each video (symlinks)."""
    out = root / f"first{frames}"
    for v in read_split(root / "gt", "val"):
        for kind, src in (("gt", root / "gt" / "data" / v / "mask"), ("pred", root / "pred" / v)):
            dst = out / "gt" / "data" / v / "mask" if kind == "gt" else out / "pred" / v
            dst.mkdir(parents=True, exist_ok=True)
            for f in sorted(src.iterdir())[:frames]:
                if not (dst / f.name).exists():
                    (dst / f.name).symlink_to(f.resolve())
    (out / "gt" / "val.txt").write_text((root / "gt" / "val.txt").read_text())
    return out


# ------------------------------------------------------------------------------------------
# the official way (transcribed from evaluator_test.py + utils.Evaluator, and VC_perclip.py)
# ------------------------------------------------------------------------------------------


def _open(path: Path) -> np.ndarray:
    return np.array(Image.open(path))


def official_miou(gt_root: Path, pred_dir: Path) -> float:
    """evaluator_test.py + utils.Evaluator (add_batch / _generate_matrix / Mean_Intersection_over_Union)."""
    cm = np.zeros((K,) * 2)
    for v in read_split(gt_root, "val"):
        for name in os.listdir(gt_root / "data" / v / "mask"):
            gt = shift_labels(_open(gt_root / "data" / v / "mask" / name))[np.newaxis, :]
            pred = _open(pred_dir / v / name)[np.newaxis, :]
            mask = (gt >= 0) & (gt < K)
            label = K * gt[mask].astype("int") + pred[mask]
            cm += np.bincount(label, minlength=K**2).reshape(K, K)
    with np.errstate(invalid="ignore", divide="ignore"):
        miou = np.diag(cm) / (np.sum(cm, axis=1) + np.sum(cm, axis=0) - np.diag(cm))
    isval = np.sum(cm, axis=1) > 0
    return float(np.nansum(miou * isval) / isval.sum())


def _official_get_common(gts: list, preds: list, n: int, h: int, w: int) -> list:
    accs = []
    for i in range(len(gts) - n):
        g_common, p_common = np.ones((h, w)), np.ones((h, w))
        for j in range(1, n):
            g_common = np.logical_and(g_common, gts[i] == gts[i + j])
            p_common = np.logical_and(p_common, preds[i] == preds[i + j])
        accs.append((p_common * g_common).sum() / g_common.sum())
    return accs


def official_vc(gt_root: Path, pred_dir: Path, n: int) -> float:
    total = []
    for v in read_split(gt_root, "val"):
        names = sorted(os.listdir(gt_root / "data" / v / "mask"))
        if len(names) <= n:
            continue
        gts = [shift_labels(_open(gt_root / "data" / v / "mask" / f)) for f in names]
        preds = [_open(pred_dir / v / f) for f in names]
        total.extend(_official_get_common(gts, preds, n, *gts[0].shape))
    return float(np.nanmean(np.array(total)))


# ------------------------------------------------------------------------------------------
# measurements
# ------------------------------------------------------------------------------------------


def decode_floor(gt_root: Path, pred_dir: Path) -> None:
    for v in read_split(gt_root, "val"):
        for mask in list_frames(gt_root / "data" / v, kind="mask"):
            ev.read_shifted_label(mask)
            ev.read_prediction_png(pred_dir / v / mask.name)


def timed(fn, *args, **kwargs):
    """(wall seconds, CPU seconds of this process, fn's result)."""
    w0, c0 = time.perf_counter(), time.process_time()
    out = fn(*args, **kwargs)
    return time.perf_counter() - w0, time.process_time() - c0, out


def child_maxrss(mode: str, root: Path) -> tuple[float, float]:
    """(peak RSS, peak RSS above the after-warm-up baseline) in MiB of a fresh process running
    `mode` ('evaluate' or 'official') on root.

    The process comes from a forkserver: ru_maxrss of a process exec'd or forked from this big
    parent would start at the parent's RSS."""
    pool = multiprocessing.get_context("forkserver").Pool(1)
    try:
        return pool.apply(run_child, (mode, root))
    finally:
        pool.close()
        pool.join()


def _rss_mib() -> float:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS")) / 1024


def run_child(mode: str, root: Path) -> tuple[float, float]:
    ev.reuse_freed_memory()
    gt, pred = root / "gt", root / "pred"
    # warm up the decoders and numpy once so their one-off buffers land in the baseline
    video = read_split(gt, "val")[0]
    ev.evaluate_video(video, gt, pred, K, (8, 16))
    _open(next(iter(list_frames(gt / "data" / video, kind="mask"))))
    try:  # Linux: reset the high-water mark so the import-time peak (torch) does not hide ours
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass
    base = _rss_mib()
    if mode == "evaluate":
        ev.evaluate(gt, pred, "val", num_classes=K, vc_sizes=(8, 16), workers=1, progress=False)
    else:
        official_vc(gt, pred, 16)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return peak, peak - base


def time_all(gt: Path, pred: Path, repeat: int) -> tuple[dict[str, float], dict[str, float], dict[str, float]]:
    """Median over `repeat` rounds of the wall and CPU seconds of every measurement (rounds
    interleaved, so a burst of load from other processes on a shared machine hits all of them
    alike), and the metric values."""
    jobs = {
        "decode floor (every GT + pred PNG once)": lambda: decode_floor(gt, pred),
        "evaluate.py mIoU+VC8+VC16, 1 worker": lambda: ev.evaluate(
            gt, pred, "val", num_classes=K, workers=1, vc_sizes=(8, 16), progress=False
        ),
        "evaluate.py mIoU+VC8+VC16, 2 workers": lambda: ev.evaluate(
            gt, pred, "val", num_classes=K, workers=2, vc_sizes=(8, 16), progress=False
        ),
        "official evaluator_test (mIoU)": lambda: official_miou(gt, pred),
        "official VC_perclip n=8": lambda: official_vc(gt, pred, 8),
        "official VC_perclip n=16": lambda: official_vc(gt, pred, 16),
    }
    wall, cpu, out = {name: [] for name in jobs}, {name: [] for name in jobs}, {}
    for r in range(repeat):
        for name in list(jobs) if r % 2 == 0 else list(jobs)[::-1]:
            t, c, out[name] = timed(jobs[name])
            wall[name].append(t)
            cpu[name].append(c)
    ours = out["evaluate.py mIoU+VC8+VC16, 1 worker"]
    values = {
        "mIoU": out["official evaluator_test (mIoU)"],
        "VC8": out["official VC_perclip n=8"],
        "VC16": out["official VC_perclip n=16"],
    }
    for key, official in values.items():  # the benchmark also checks that the numbers agree, to the last bit
        assert ours[key] == official, (key, ours[key], official)
    return (
        {name: statistics.median(t) for name, t in wall.items()},
        {name: statistics.median(t) for name, t in cpu.items()},
        values,
    )


def print_times(wall: dict[str, float], cpu: dict[str, float], n_frames: int) -> None:
    """Wall and CPU seconds. The CPU seconds (of this process; the 2-worker row has none, its work
    runs in the workers) leave out the time spent waiting for a core, which dominates the wall
    time on a machine shared with other jobs."""
    rows = list(wall) + ["official total (3 runs)"]
    wall["official total (3 runs)"] = sum(t for name, t in wall.items() if name.startswith("official"))
    cpu["official total (3 runs)"] = sum(t for name, t in cpu.items() if name.startswith("official"))
    print(f"{'what':<46} {'wall s':>7} {'ms/frame':>9} {'CPU s':>7}")
    for name in rows:
        c = "-" if "2 workers" in name else f"{cpu[name]:7.2f}"
        print(f"{name:<46} {wall[name]:7.2f} {1000 * wall[name] / n_frames:9.2f} {c:>7}")
    for label, t in (("wall", wall), ("CPU", cpu)):
        ours, floor = t["evaluate.py mIoU+VC8+VC16, 1 worker"], t["decode floor (every GT + pred PNG once)"]
        print(
            f"{label:>4}: official / evaluate.py (1 worker) = {t['official total (3 runs)'] / ours:.1f}x; "
            f"evaluate / decode floor {ours / floor:.2f}x"
        )


def print_memory(cache: Path, frames: int) -> None:
    half = truncated_view(cache, frames // 2)
    print("\npeak RSS of a fresh process, MiB (in brackets: above the baseline after imports and warm-up)")
    print(f"{'':<30} {frames // 2:>3} frames/video  {frames:>3} frames/video")
    for mode, label in (("evaluate", "evaluate.py"), ("official", "official VC_perclip n=16")):
        cells = ["{:6.0f} ({:5.1f})".format(*child_maxrss(mode, root)) for root in (half, cache)]
        print(f"{label:<30} {cells[0]:>17} {cells[1]:>17}")


# ------------------------------------------------------------------------------------------
# end to end: fresh processes, the real official scripts
# ------------------------------------------------------------------------------------------


def shifted_gt_copy(root: Path) -> Path:
    """ROOT/gt_shifted: the GT converted to train ids (0..123, 255), the dataset the official
    scripts expect (VSPW README recipe)."""
    out = root / "gt_shifted"
    done = out / "done.txt"
    stamp = (root / "done.txt").read_text()
    if done.is_file() and done.read_text() == stamp:
        return out
    gt = root / "gt"
    for v in read_split(gt, "val"):
        for mask in list_frames(gt / "data" / v, kind="mask"):
            write_label_png(out / "data" / v / "mask" / mask.name, shift_labels(read_label_png(mask)))
    (out / "val.txt").write_text((gt / "val.txt").read_text())
    done.write_text(stamp)
    return out


def _run(cmd: list, cwd: Path | None = None) -> tuple[float, float, str]:
    """(wall s, CPU s of the child, stdout) of one process run to the end."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    proc = subprocess.run([str(c) for c in cmd], cwd=cwd, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if proc.returncode:
        raise RuntimeError(f"{cmd} failed:\n{proc.stderr[-2000:]}")
    return wall, (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime), proc.stdout


def end_to_end(root: Path, official: Path, repeat: int, n_frames: int) -> None:
    """evaluate.py against evaluation.sh's three official scripts, each a fresh process."""
    for name in ("evaluator_test.py", "VC_perclip.py", "utils.py"):
        if not (official / name).is_file():
            sys.exit(f"--official-code {official}: {name} not found (give a checkout of VSPW-dataset/VSPW_code)")
    gt_shifted, pred = shifted_gt_copy(root), root / "pred"
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        for name in ("evaluator_test.py", "utils.py", "VC_perclip.py"):
            shutil.copy(official / name, tmp / name)
        vc8 = (official / "VC_perclip.py").read_text()
        if vc8.count("clip_num=16") != 1:
            sys.exit(f"{official / 'VC_perclip.py'}: expected one 'clip_num=16' line to turn into 8")
        (tmp / "VC_perclip8.py").write_text(vc8.replace("clip_num=16", "clip_num=8"))
        json_out = tmp / "ours.json"
        jobs = {
            "python evaluate.py --workers 1": (
                [
                    sys.executable,
                    REPO / "evaluate.py",
                    "--gt",
                    root / "gt",
                    "--pred",
                    pred,
                    "--num-classes",
                    K,
                    "--workers",
                    1,
                    "--no-progress",
                    "--json",
                    json_out,
                ],
                None,
            ),
            "python evaluator_test.py": ([sys.executable, "evaluator_test.py", gt_shifted, pred], tmp),
            "python VC_perclip.py (clip_num=8)": ([sys.executable, "VC_perclip8.py", gt_shifted, pred], tmp),
            "python VC_perclip.py (clip_num=16)": ([sys.executable, "VC_perclip.py", gt_shifted, pred], tmp),
        }
        wall, cpu, out = {n: [] for n in jobs}, {n: [] for n in jobs}, {}
        for r in range(repeat):
            for name in list(jobs) if r % 2 == 0 else list(jobs)[::-1]:
                t, c, out[name] = _run(*jobs[name])
                wall[name].append(t)
                cpu[name].append(c)
        ours = json.loads(json_out.read_text())
    printed = {
        "mIoU": re.search(r"mIoU:([^,]+),", out["python evaluator_test.py"]).group(1),
        "VC8": re.search(r"VC8 score: (\S+)", out["python VC_perclip.py (clip_num=8)"]).group(1),
        "VC16": re.search(r"VC16 score: (\S+)", out["python VC_perclip.py (clip_num=16)"]).group(1),
    }
    for key, text in printed.items():  # the official scripts print str(np.float64): the full repr
        assert float(text) == ours[key], (key, text, ours[key])
    print(
        f"\nend to end, fresh processes (interpreter start and imports included), median of {repeat} rounds; "
        f"the official numbers printed equal evaluate.py's: " + ", ".join(f"{k} {v}" for k, v in printed.items())
    )
    print(f"{'what':<46} {'wall s':>7} {'ms/frame':>9} {'CPU s':>7}")
    med = {n: (statistics.median(wall[n]), statistics.median(cpu[n])) for n in jobs}
    med["official total (evaluation.sh + VC8)"] = tuple(
        sum(med[n][i] for n in jobs if "evaluate.py" not in n) for i in (0, 1)
    )
    for name, (w, c) in med.items():
        print(f"{name:<46} {w:7.2f} {1000 * w / n_frames:9.2f} {c:7.2f}")
    ours_w, ours_c = med["python evaluate.py --workers 1"]
    tot_w, tot_c = med["official total (evaluation.sh + VC8)"]
    print(f"wall: official / evaluate.py = {tot_w / ours_w:.1f}x; CPU: {tot_c / ours_c:.1f}x")


def _versions() -> str:
    import PIL

    cpu = ""
    if Path("/proc/cpuinfo").exists():
        cpu = next(
            (
                line.split(":", 1)[1].strip()
                for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")
            ),
            "",
        )
    return (
        f"python {platform.python_version()}, numpy {np.__version__}, opencv {cv2.__version__}, "
        f"pillow {PIL.__version__}; {cpu}, {os.cpu_count()} logical CPUs"
    )


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--videos", type=int, default=24, help="videos of the synthetic set (default 24)")
    p.add_argument("--frames", type=int, default=60, help="frames per video (default 60)")
    p.add_argument("--repeat", type=int, default=3, help="interleaved rounds of every timing; medians are reported")
    p.add_argument(
        "--cache",
        type=Path,
        default=REPO / "runs" / "bench_evaluate",
        help="where the rendered set is kept (re-rendered when its size changes)",
    )
    p.add_argument(
        "--official-code",
        type=Path,
        default=None,
        help="a checkout of VSPW-dataset/VSPW_code: also time its scripts end to end",
    )
    p.add_argument(
        "--quick",
        action="store_true",
        help="a smoke run: 8 videos x 30 frames (own cache folder), 1 round, no memory table",
    )
    args = p.parse_args()
    if args.quick:
        args.videos, args.frames, args.repeat = 8, 30, 1
        args.cache = args.cache.with_name(args.cache.name + "_quick")
    ev.reuse_freed_memory()
    render(args.cache, args.videos, args.frames)
    print(_versions())
    load = " ".join(f"{x:.2f}" for x in os.getloadavg())
    wall, cpu, values = time_all(args.cache / "gt", args.cache / "pred", args.repeat)
    print(
        f"\n{args.videos} videos x {args.frames} frames at {H}x{W}; median of {args.repeat} interleaved rounds; "
        f"load average {load} before, {os.getloadavg()[0]:.2f} after; "
        + ", ".join(f"{k} {v!r}" for k, v in values.items())
        + " (evaluate.py == official, to the last bit)"
    )
    print_times(wall, cpu, args.videos * args.frames)
    if args.official_code is not None:
        end_to_end(args.cache, args.official_code, args.repeat, args.videos * args.frames)
    if not args.quick:
        print_memory(args.cache, args.frames)


if __name__ == "__main__":
    main()
