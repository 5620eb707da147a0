"""CamVid results table: the DVIS++ chain with and without MVC, TTA and aggregation, on CPU budgets.

    python benchmarks/run_camvid.py --data ../shared/data/camvid_vspw --out runs/camvid [--budget-seg 30]

Steps (each skipped when its output exists, so the script resumes after an interruption):
  1. stage 1 (segmenter) without and with --mvc, in parallel, one thread each, --time-budget
     CPU-minutes each;
  2. stage 2 (tracker) and stage 3 (refiner) on top of each, with the same MVC setting;
  3. infer.py + evaluate.py on val for every model; TTA variants (MVC paper Table 3) and the
     aggregation of the MVC and non-MVC models (Table 4) on the final stage.
Prints the tables as markdown and writes OUT/results.json. Budgets are CPU time of the training
process (time.process_time), so a shared machine does not change the result, only the wall time.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path
import subprocess
import sys
import time

REPO = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}


# LR-schedule length (steps) per stage, without / with MVC: MVC steps cost twice as much, so
# within the same CPU budget an MVC run makes about half the steps. --time-budget caps each run.
ITERS = {"segmenter": (1200, 600), "tracker": (100, 50), "refiner": (60, 30)}


def train_cmd(args, stage: str, out: Path, budget: float, mvc: bool, init: Path | None) -> list[str]:
    cmd = [
        sys.executable,
        str(REPO / "train.py"),
        "--preset",
        args.preset,
        "--data",
        str(args.data),
        "--stage",
        stage,
        "--out",
        str(out),
        "--time-budget",
        str(budget),
        "--iters",
        str(ITERS[stage][mvc]),
        "--eval-every",
        "0",
        "--workers",
        "0",
        "--resume",
        "auto",
    ]
    if stage != "segmenter":
        cmd += ["--frames", str(args.frames_tracker if stage == "tracker" else args.frames_refiner)]
    if mvc:
        cmd.append("--mvc")
    if init is not None:
        cmd += ["--init", str(init)]
    return cmd


def run_parallel(jobs: list[tuple[list[str], Path]]) -> None:
    """Run training commands side by side (one thread each); skip those whose last.pt exists."""
    procs = []
    for cmd, out in jobs:
        if (out / "done").exists():
            continue
        out.mkdir(parents=True, exist_ok=True)
        log = open(out / "stdout.txt", "a")
        print("$", " ".join(cmd), flush=True)
        procs.append((subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=ENV), out, log))
    for proc, out, log in procs:
        if proc.wait() != 0:
            raise SystemExit(f"training failed, see {out / 'stdout.txt'}")
        log.close()
        (out / "done").touch()


def predict_and_score(args, name: str, infer_args: list[str]) -> dict:
    """infer.py on val then evaluate.py; returns the summary plus frames/s."""
    pred = args.out / "pred" / name
    result_file = args.out / "pred" / f"{name}.json"
    if result_file.exists():
        return json.loads(result_file.read_text())
    t0 = time.time()
    subprocess.run(
        [
            sys.executable,
            str(REPO / "infer.py"),
            "--data",
            str(args.data),
            "--split",
            "val",
            "--out",
            str(pred),
            "--overwrite",
            "--no-progress",
            *infer_args,
        ],
        check=True,
        env=ENV,
    )
    seconds = time.time() - t0
    metrics_file = args.out / "pred" / f"{name}.metrics.json"
    subprocess.run(
        [
            sys.executable,
            str(REPO / "evaluate.py"),
            "--pred",
            str(pred),
            "--gt",
            str(args.data),
            "--split",
            "val",
            "--json",
            str(metrics_file),
            "--no-progress",
        ],
        check=True,
        stdout=subprocess.DEVNULL,
    )
    m = json.loads(metrics_file.read_text())
    frames = sum(v["frames"] for v in json.loads((pred / "report.json").read_text())["videos"].values())
    result = {
        "mIoU": m["mIoU"],
        "VC8": m["VC8"],
        "VC16": m["VC16"],
        "fps": frames / seconds,
        "per_class_IoU": m["per_class_IoU"],
    }
    result_file.write_text(json.dumps(result, indent=1))
    return result


def write_table(table: dict, path: Path) -> None:
    """Save the results as JSON and print them as a markdown table."""
    path.write_text(json.dumps(table, indent=1))
    print("| run | mIoU | VC8 | VC16 | frames/s |\n|---|---|---|---|---|")
    for name, r in table.items():
        print(f"| {name} | {r['mIoU']:.3f} | {r['VC8']:.3f} | {r['VC16']:.3f} | {r['fps']:.2f} |")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", type=Path, default=REPO.parent / "shared" / "data" / "camvid_vspw")
    p.add_argument("--out", type=Path, default=REPO / "runs" / "camvid")
    p.add_argument("--preset", default="tiny")
    p.add_argument("--budget-seg", type=float, default=30, help="CPU-minutes of stage 1")
    p.add_argument("--budget-tracker", type=float, default=5, help="CPU-minutes of stage 2")
    p.add_argument("--budget-refiner", type=float, default=5, help="CPU-minutes of stage 3")
    p.add_argument("--frames-tracker", type=int, default=3)
    p.add_argument("--frames-refiner", type=int, default=5)
    p.add_argument("--skip-tta", action="store_true")
    args = p.parse_args()
    runs = {
        m: {s: args.out / f"{s}{'_mvc' if m else ''}" for s in ("segmenter", "tracker", "refiner")}
        for m in (False, True)
    }

    # 1-2. the training chain, the MVC and plain chains side by side
    budgets = {"segmenter": args.budget_seg, "tracker": args.budget_tracker, "refiner": args.budget_refiner}
    previous = {False: None, True: None}
    for stage in ("segmenter", "tracker", "refiner"):
        run_parallel(
            [
                (train_cmd(args, stage, runs[m][stage], budgets[stage], m, previous[m]), runs[m][stage])
                for m in (False, True)
            ]
        )
        previous = {m: runs[m][stage] / "last.pt" for m in (False, True)}

    # 3. evaluation
    table = {}
    for m in (False, True):
        for stage in ("segmenter", "tracker", "refiner"):
            name = f"{stage}{'_mvc' if m else ''}"
            table[name] = predict_and_score(args, name, ["--checkpoint", str(runs[m][stage] / "last.pt")])
    final = str(runs[True]["refiner"] / "last.pt")
    if not args.skip_tta:
        # the MVC paper's Table 3 rows (vote), and the U2PL-style mean on the full view set
        views = {
            "vote_s1.0_flip": ["--tta-scales", "1.0"],
            "vote_s1.0-1.2": ["--tta-scales", "1.0,1.1,1.2", "--no-tta-flip"],
            "vote_s1.0-1.2_flip": ["--tta-scales", "1.0,1.1,1.2"],
            "vote_s0.9-1.2": ["--tta-scales", "0.9,1.0,1.1,1.2", "--no-tta-flip"],
            "vote_s0.9-1.2_flip": ["--tta-scales", "0.9,1.0,1.1,1.2"],
            "mean_s0.9-1.2_flip": ["--tta-scales", "0.9,1.0,1.1,1.2", "--tta-merge", "mean"],
        }
        for key, extra in views.items():
            merge = [] if "--tta-merge" in extra else ["--tta-merge", "vote"]
            table[f"tta_{key}"] = predict_and_score(
                args, f"tta_{key}", ["--checkpoint", final, "--tta", *merge, *extra]
            )
    refiners = [str(runs[mvc]["refiner"] / "last.pt") for mvc in (True, False)]
    table["aggregate"] = predict_and_score(args, "aggregate", ["--aggregate", *refiners])
    write_table(table, args.out / "results.json")


if __name__ == "__main__":
    main()
