"""CamVid results of both papers' parts on a converged base, one command per table.

    python benchmarks/camvid.py base      --data ../shared/data/camvid_vspw --out runs/camvid
    python benchmarks/camvid.py mvc       ...   # MVC paper Table 1 shape: segmenter/online/offline x MVC, 3 seeds
    python benchmarks/camvid.py tta       ...   # Table 3 shape: vote / mean x view sets, on the final models
    python benchmarks/camvid.py aggregate ...   # Table 4 shape: per-video choice by flow-SSIM vs each model
    python benchmarks/camvid.py semi      ...   # PVUW 1st place: teacher + student pseudo labels, U2PL vs supervised
    python benchmarks/camvid.py headline  ...   # the whole pipeline from scratch in 40 minutes of the machine

Protocol (issue "CamVid results that can show the papers' gains"): every part starts from the same
converged stage-1 segmenter (``base``: the ``tiny`` preset trained to a plateau of val mIoU), as the
MVC paper fine-tunes converged DVIS++ models; runs that are compared take the same number of steps
and the same schedule, whatever their cost per step (MVC runs the model twice per step); every run
is seeded and listed with its steps and CPU-minutes. Each step is skipped when its output exists
(``OUT/<run>/done``, ``OUT/pred/<name>.json``), so a command resumes after an interruption, and
each table is written to ``OUT/<table>.json`` and printed as markdown. Training runs use one thread
each (two side by side on the 2-core machine); the headline uses both cores for one pipeline.
"""

from __future__ import annotations

import argparse
from concurrent.futures import ThreadPoolExecutor
import json
import os
from pathlib import Path
import resource
import statistics
import subprocess
import sys
import time

REPO = Path(__file__).resolve().parents[1]
ONE_THREAD = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
TWO_THREADS = {**os.environ, "OMP_NUM_THREADS": "2", "MKL_NUM_THREADS": "2"}

# Schedules (steps; LR drops at 0.7 and 0.9 of each). The base runs to a plateau; the rest are
# fine-tunes of converged models.
BASE_SCHEDULE = ["--iters", "6000", "--eval-every", "500"]
BASE = ["--preset", "tiny", *BASE_SCHEDULE]
FINETUNE = ["--iters", "150", "--lr", "5e-5"]  # stage 1 with / without MVC, from the base
# The video stages train new modules from random init (as DVIS++), so they take the preset's base LR
# (tiny: 2e-4; train.py gives a new video stage the preset's schedule, written out here to be read).
# The refiner's 300 steps: at 100 it was still rising (0.528 mean mIoU vs 0.554 at 300).
TRACKER = ["--stage", "tracker", "--iters", "300", "--frames", "5", "--lr", "2e-4", "--eval-every", "100"]
REFINER = ["--stage", "refiner", "--iters", "300", "--frames", "9", "--lr", "2e-4", "--eval-every", "100"]
TTA_VIEWS = {  # name: infer.py arguments (MVC paper Table 3 rows; the U2PL set as an option)
    "single": [],
    "vote {1.0} flip": ["--tta", "--tta-merge", "vote", "--tta-scales", "1.0"],
    "vote {1.0,1.1,1.2}": ["--tta", "--tta-merge", "vote", "--tta-scales", "1.0,1.1,1.2", "--no-tta-flip"],
    "vote {1.0,1.1,1.2} flip": ["--tta", "--tta-merge", "vote", "--tta-scales", "1.0,1.1,1.2"],
    "vote {0.9..1.2}": ["--tta", "--tta-merge", "vote", "--tta-scales", "mvc", "--no-tta-flip"],
    "vote {0.9..1.2} flip": ["--tta", "--tta-merge", "vote", "--tta-scales", "mvc"],
    "mean {1.0} flip": ["--tta", "--tta-merge", "mean", "--tta-scales", "1.0"],
    "mean {1.0,1.1,1.2} flip": ["--tta", "--tta-merge", "mean", "--tta-scales", "1.0,1.1,1.2"],
    "mean {0.9..1.2} flip": ["--tta", "--tta-merge", "mean", "--tta-scales", "mvc"],
}
U2PL_VIEWS = {"mean u2pl flip": ["--tta", "--tta-merge", "mean", "--tta-scales", "u2pl"]}


class Bench:
    """Runs train.py / infer.py / evaluate.py for one table, skipping what exists."""

    def __init__(self, args: argparse.Namespace):
        self.args, self.out = args, args.out
        self.seeds = tuple(range(args.seeds))
        self.video_seeds = tuple(range(args.video_seeds or args.seeds))
        self.out.mkdir(parents=True, exist_ok=True)

    def train(self, name: str, *argv: str, env: dict = ONE_THREAD) -> Path:
        """OUT/name/last.pt of ``train.py ARGV`` (run unless OUT/name/done exists)."""
        out = self.out / name
        if not (out / "done").exists():
            out.mkdir(parents=True, exist_ok=True)
            cmd = [
                sys.executable,
                str(REPO / "train.py"),
                "--data",
                str(self.args.data),
                "--out",
                str(out),
                "--workers",
                "0",
                "--resume",
                "auto",
                *argv,
            ]
            if "--eval-every" not in argv:
                cmd += ["--eval-every", "0"]
            print("$", " ".join(cmd), flush=True)
            with open(out / "stdout.txt", "a") as log:
                if subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT, env=env).returncode != 0:
                    raise SystemExit(f"training failed, see {out / 'stdout.txt'}")
            (out / "done").touch()
        return out / "last.pt"

    def parallel(self, jobs: list[tuple]) -> list[Path]:
        """``train`` jobs (name, *argv), ``--jobs`` at a time."""
        with ThreadPoolExecutor(self.args.jobs) as pool:
            return list(pool.map(lambda job: self.train(*job), jobs))

    def score(self, name: str, *infer_args: str, split: str = "val", env: dict = ONE_THREAD) -> dict:
        """infer.py then evaluate.py on ``split``; mIoU, VC8, VC16, per class, frames/s (cached)."""
        result_file = self.out / "pred" / f"{name}.json"
        if result_file.exists():
            return json.loads(result_file.read_text())
        pred = self.out / "pred" / name
        t0 = time.time()
        subprocess.run(
            [
                sys.executable,
                str(REPO / "infer.py"),
                "--data",
                str(self.args.data),
                "--split",
                split,
                "--out",
                str(pred),
                "--overwrite",
                "--no-progress",
                *infer_args,
            ],
            check=True,
            env=env,
        )
        seconds = time.time() - t0
        metrics = self.out / "pred" / f"{name}.metrics.json"
        subprocess.run(
            [
                sys.executable,
                str(REPO / "evaluate.py"),
                "--pred",
                str(pred),
                "--gt",
                str(self.args.data),
                "--split",
                split,
                "--json",
                str(metrics),
                "--no-progress",
            ],
            check=True,
            stdout=subprocess.DEVNULL,
            env=env,
        )
        m = json.loads(metrics.read_text())
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


def run_info(run: Path) -> dict:
    """Steps and CPU-minutes of a finished run (from its log)."""
    lines = [json.loads(x) for x in (run / "log.jsonl").read_text().splitlines() if x.strip()]
    steps = max(x["step"] for x in lines if "loss" in x)
    cpu = max((x.get("cpu_min", 0.0) for x in lines), default=0.0)
    return {"steps": steps, "cpu_min": round(cpu, 1)}


def spread(values: list[float]) -> str:
    if len(values) == 1:
        return f"{values[0]:.3f}"
    return f"{statistics.mean(values):.3f} ({min(values):.3f}-{max(values):.3f})"


def write_table(path: Path, header: list[str], rows: list[list[str]], data: dict) -> None:
    path.write_text(json.dumps(data, indent=1))
    print("| " + " | ".join(header) + " |\n|" + "---|" * len(header))
    for row in rows:
        print("| " + " | ".join(row) + " |")


# --------------------------------------------------------------------------------------------
# Tables
# --------------------------------------------------------------------------------------------


def base(b: Bench) -> Path:
    """The converged stage-1 segmenter every table starts from (val curve printed); ``--base CKPT``
    takes an existing one (its run folder's log gives the curve)."""
    # Alone on the machine, so on both cores (CamVid, tiny, 2-core Xeon: 0.89 s per step on 2 threads,
    # 1.6 s on one thread beside another one-thread run).
    ckpt = b.args.base or b.train("base", *BASE, "--save-every", "100", env=TWO_THREADS)
    run = ckpt.parent
    curve = [
        (x["step"], x["val"]["mIoU"], x["val"]["VC8"])
        for x in map(json.loads, (run / "log.jsonl").read_text().splitlines())
        if "val" in x
    ]
    write_table(
        b.out / "base.json",
        ["step", "val mIoU", "VC8"],
        [[str(s), f"{m:.3f}", f"{v:.3f}"] for s, m, v in curve],
        {"curve": curve, **run_info(run)},
    )
    return ckpt


def chains(b: Bench, base_ckpt: Path, upto: str = "ref", seeds: tuple[int, ...] | None = None) -> dict:
    """Stage-1 fine-tune, tracker and refiner (up to stage ``upto``) with and without MVC, for
    ``seeds`` (default: every seed, the video stages for the first ``--video-seeds``)."""
    runs = {}
    recipes = (("ft", FINETUNE), ("trk", TRACKER), ("ref", REFINER))
    for stage, recipe in recipes[: [name for name, _ in recipes].index(upto) + 1]:
        jobs = []
        for mvc in (False, True):
            for seed in seeds or (b.seeds if stage == "ft" else b.video_seeds):
                name = f"mvc/{stage}_{'mvc' if mvc else 'plain'}_s{seed}"
                init = base_ckpt if stage == "ft" else runs[("ft" if stage == "trk" else "trk", mvc, seed)]
                flags = [*recipe, "--init", str(init), "--seed", str(seed)] + (["--mvc"] if mvc else [])
                flags += ["--ctvis"] if stage == "ft" and b.args.ctvis else []
                jobs.append((name, *flags))
                runs[(stage, mvc, seed)] = b.out / name / "last.pt"
        b.parallel(jobs)
    return runs


def mvc_table(b: Bench) -> dict:
    runs = chains(b, base(b))
    rows, data = [], {}
    base_score = b.score("base", "--checkpoint", str(base(b)))
    rows.append(
        [
            "base (stage 1, converged)",
            "-",
            f"{base_score['mIoU']:.3f}",
            f"{base_score['VC8']:.3f}",
            f"{base_score['VC16']:.3f}",
            "",
        ]
    )
    for stage, label in (("ft", "segmenter"), ("trk", "+ tracker (online)"), ("ref", "+ refiner (offline)")):
        seeds = b.seeds if stage == "ft" else b.video_seeds
        for mvc in (False, True):
            scores = [
                b.score(f"{stage}_{'mvc' if mvc else 'plain'}_s{s}", "--checkpoint", str(runs[(stage, mvc, s)]))
                for s in seeds
            ]
            info = [run_info(runs[(stage, mvc, s)].parent) for s in seeds]
            data[f"{stage}_{'mvc' if mvc else 'plain'}"] = {"scores": scores, "runs": info}
            rows.append(
                [
                    label,
                    "yes" if mvc else "-",
                    *(spread([x[k] for x in scores]) for k in ("mIoU", "VC8", "VC16")),
                    f"{info[0]['steps']} steps, {statistics.mean(i['cpu_min'] for i in info):.0f} CPU-min",
                ]
            )
    write_table(b.out / "mvc.json", ["model", "MVC", "mIoU", "VC8", "VC16", "training"], rows, data)
    return runs


def tta_table(b: Bench) -> None:
    """TTA rows on the final (stage-3) models, MVC first (``--tta-both``: the plain one too), on the
    stage-1 fine-tunes (``--on ft``) or on the base (``--on base``); seed 0."""
    views = {**TTA_VIEWS, **(U2PL_VIEWS if b.args.u2pl_scales else {})}
    if b.args.tta_views:
        views = {name: views[name] for name in b.args.tta_views.split(",")}
    if b.args.on == "base":
        models = {"base": base(b)}
    else:
        stage, prefix = ("ft", "ft_") if b.args.on == "ft" else ("ref", "")
        runs = chains(b, base(b), upto=stage, seeds=(0,))
        models = {f"{prefix}mvc": runs[(stage, True, 0)], f"{prefix}plain": runs[(stage, False, 0)]}
        models = dict(list(models.items())[: 2 if b.args.tta_both else 1])
    rows, data = [], {}
    for model, ckpt in models.items():
        for view, flags in views.items():
            r = b.score(f"tta_{model}_{view.replace(' ', '_')}", "--checkpoint", str(ckpt), *flags)
            data[f"{model} {view}"] = r
            rows.append(
                [
                    model,
                    view,
                    f"{r['mIoU']:.3f}",
                    f"{r['VC8']:.3f}",
                    f"{r['VC16']:.3f}",
                    f"{r['fps']:.2f}",
                ]
            )
    write_table(
        b.out / f"tta_{b.args.on}.json", ["model", "views / merge", "mIoU", "VC8", "VC16", "frames/s"], rows, data
    )


def aggregate_table(b: Bench) -> None:
    """Per-video choice between the MVC and plain models of each seed: the refiners, or the stage-1
    fine-tunes with ``--on ft``."""
    if b.args.on == "base":
        raise SystemExit("aggregate needs two models per seed: --on ft or --on final")
    stage = "ft" if b.args.on == "ft" else "ref"
    runs = chains(b, base(b), upto=stage)
    seeds = b.seeds if stage == "ft" else b.video_seeds
    rows, data = [], {}
    for seed in seeds:
        pair = [str(runs[(stage, True, seed)]), str(runs[(stage, False, seed)])]
        name = f"aggregate_{stage}_s{seed}"
        r = b.score(name, "--aggregate", *pair)
        choice = json.loads((b.out / "pred" / name / "report.json").read_text())["videos"]
        picked_mvc = sum(pair[0] in v["aggregation"]["choice"] for v in choice.values())
        data[f"s{seed}"] = {**r, "videos_mvc": picked_mvc, "videos": len(choice)}
    for mvc in (True, False):
        key = f"{stage}_{'mvc' if mvc else 'plain'}"
        scores = [b.score(f"{key}_s{s}", "--checkpoint", str(runs[(stage, mvc, s)])) for s in seeds]
        rows.append([f"{key} alone", *(spread([x[k] for x in scores]) for k in ("mIoU", "VC8", "VC16")), ""])
    agg = [data[f"s{s}"] for s in seeds]
    rows.append(
        [
            "per-video choice by flow-SSIM",
            *(spread([x[k] for x in agg]) for k in ("mIoU", "VC8", "VC16")),
            f"MVC model chosen for {sum(x['videos_mvc'] for x in agg)} of {sum(x['videos'] for x in agg)} videos",
        ]
    )
    write_table(b.out / f"aggregate_{b.args.on}.json", ["models", "mIoU", "VC8", "VC16", "note"], rows, data)


def teacher_config(b: Bench) -> Path:
    """The tiny preset with a ResNet-34 backbone (the paper's teacher is the bigger model)."""
    sys.path.insert(0, str(REPO))
    from vss.config import tiny
    from vss.io import load_class_names

    cfg = tiny()
    cfg.name, cfg.model.backbone = "tiny_r34", "resnet34"
    cfg.model.num_classes = len(load_class_names(b.args.data)[0])
    path = b.out / "teacher_config.json"
    if not path.exists():
        path.write_text(cfg.to_json())
    return path


SEMI_FT = ["--iters", "150", "--lr", "5e-5"]  # the anneals, semi and the supervised ablation: one schedule
PSEUDO_TTA = ["--tta", "--tta-merge", "mean", "--tta-scales", "mvc"]


def semi_table(b: Bench) -> None:
    """PVUW 2024 1st place on CamVid: pseudo labels of the val videos (used without their labels, as
    the paper uses the test videos) from the TTA'd teacher + student ensemble with per-pixel entropy;
    U2PL fine-tuning of the student vs the same steps of supervised fine-tuning.

    The paper's teacher and student are trained to the end of their schedules. The base and the
    teacher here stop at a constant LR (machine time), so both are first annealed by the same
    fine-tune (``SEMI_FT``: 150 steps at 5e-5, drops at 0.7 / 0.9); the pseudo labels come from the
    annealed pair, and the semi and supervised arms both continue from the annealed student, one run
    each per seed (``--seeds``; CutMix and the TTA'd row on seed 0)."""
    student = base(b)
    # The teacher gets the base's schedule: it is the bigger model, not the longer-trained one.
    teacher = b.args.teacher or b.train(
        "teacher", "--config", str(teacher_config(b)), *BASE_SCHEDULE, "--save-every", "100", env=TWO_THREADS
    )
    student_ft, teacher_ft = b.parallel(
        [("semi/student_ft", "--init", str(student), *SEMI_FT), ("semi/teacher_ft", "--init", str(teacher), *SEMI_FT)]
    )
    rows, data = [], {}

    def row(label: str, name: str, *flags: str) -> None:  # nothing runs beside it: both cores
        r = data[name] = b.score(name, *flags, env=TWO_THREADS)
        rows.append([label, f"{r['mIoU']:.3f}", f"{r['VC8']:.3f}", f"{r['VC16']:.3f}", f"{r['fps']:.2f}"])

    steps = SEMI_FT[1]
    row("student (stage 1, ResNet-18)", "base", "--checkpoint", str(student))
    row(f"student annealed ({steps} supervised steps)", "semi_student_ft", "--checkpoint", str(student_ft))
    row("student annealed, TTA mean", "semi_student_ft_tta", "--checkpoint", str(student_ft), *PSEUDO_TTA)
    row("teacher (ResNet-34)", "semi_teacher", "--checkpoint", str(teacher))
    row(f"teacher annealed ({steps} supervised steps)", "semi_teacher_ft", "--checkpoint", str(teacher_ft))
    row(
        "teacher + student annealed, TTA mean (= the pseudo labels)",
        "semi_pseudo",
        "--ensemble",
        str(teacher_ft),
        str(student_ft),
        *PSEUDO_TTA,
        "--save-probs",
    )
    pseudo = b.out / "pred" / "semi_pseudo"
    u2pl = ["--stage", "semi", "--init", str(student_ft), "--pseudo", str(pseudo), "--unlabeled-split", "val", *SEMI_FT]
    arms = {"u2pl": u2pl, "supervised": ["--init", str(student_ft), *SEMI_FT]}
    jobs = [(f"semi/{arm}_s{s}", *flags, "--seed", str(s)) for s in b.seeds for arm, flags in arms.items()]
    jobs.append(("semi/u2pl_cutmix", *u2pl, "--cutmix"))  # U2PL's CutMix of the unlabelled clips, seed 0
    ckpts = dict(zip((name for name, *_ in jobs), b.parallel(jobs)))

    def seeds_row(label: str, arm: str) -> None:
        scores = [
            b.score(f"semi_{arm}_s{s}", "--checkpoint", str(ckpts[f"semi/{arm}_s{s}"]), env=TWO_THREADS)
            for s in b.seeds
        ]
        data[f"semi_{arm}"] = scores
        rows.append([label, *(spread([x[k] for x in scores]) for k in ("mIoU", "VC8", "VC16")), ""])

    semi = ckpts["semi/u2pl_s0"]
    seeds_row(f"annealed student + {steps} supervised steps (ablation)", "supervised")
    seeds_row(f"annealed student + {steps} semi steps (U2PL)", "u2pl")
    row("annealed student + semi (seed 0), TTA mean", "semi_u2pl_tta", "--checkpoint", str(semi), *PSEUDO_TTA)
    cutmix = ckpts["semi/u2pl_cutmix"]
    row(
        f"annealed student + {steps} semi steps (U2PL) with CutMix, seed 0",
        "semi_u2pl_cutmix",
        "--checkpoint",
        str(cutmix),
    )
    if b.args.semi_ensemble:  # 16 model passes per frame
        row(
            "teacher annealed + (student + semi), TTA mean",
            "semi_ensemble_tta",
            "--ensemble",
            str(teacher_ft),
            str(semi),
            *PSEUDO_TTA,
        )
    runs = ["semi/student_ft", "semi/teacher_ft", *ckpts]
    data["runs"] = {
        "base": run_info(student.parent),
        "teacher": run_info(teacher.parent),
        **{name: run_info(b.out / name) for name in runs},
    }
    write_table(b.out / "semi.json", ["model", "mIoU", "VC8", "VC16", "frames/s"], rows, data)


def children_cpu_min() -> float:
    """CPU-minutes of the finished child processes (train.py, infer.py, evaluate.py) so far."""
    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return (r.ru_utime + r.ru_stime) / 60


def headline(b: Bench) -> None:
    """The whole pipeline from scratch in --minutes of the 2-core machine: stage 1 (the tiny preset,
    its schedule fitted to its share of the time), pseudo labels of the evaluation videos by TTA
    (the 1st place's transductive use of the unlabelled test videos), U2PL semi-supervised fine-
    tuning in the time left, final prediction with TTA; then evaluate.py.

    Stage 1 and the semi fine-tune are one LR schedule: stage 1 keeps its LR (``--lr-steps 1``) and
    the fine-tune that continues it ends with the drops at 0.7 and 0.9. Dropping the LR at 0.7 of
    a ~1100-step stage 1 froze it early: on seed 0 (identical up to the first drop at step 767)
    the fitted 0.7/0.9 schedule ended at 1096 steps with val 0.410 / VC8 0.853 (single view),
    the undecayed run read 0.455 / 0.914 at step 1000.

    ``--threads 2`` (default; the U-Net reference's protocol: a quiet machine, both cores, wall clock)
    counts the budget in wall minutes. train.py fits schedules to CPU time, so stage 1 gets its
    share of minutes x 2 cores x 0.98 (the cores a quiet 2-thread run keeps busy: 73.4 CPU-minutes
    in 37.1 wall minutes, measured) and the semi fine-tune the wall minutes left, less the final
    prediction's, times the cores the pipeline kept busy so far. ``--threads 1`` counts
    CPU time of every process instead, minutes x 2 x 0.92 (a 2-thread step loses ~8% to its
    single-threaded parts), so the result does not depend on other jobs sharing the machine: there
    2-thread processes spin in OpenMP barriers and burn CPU time (11.7 CPU-s per step at load 4 vs
    2.2 on one thread).

    ``--amp bf16`` (default) trains and predicts under bfloat16 autocast: on this machine's CPUs
    (AVX512-BF16) a 2-thread stage-1 step takes 2.05 CPU-s instead of 2.63 and a semi step 7.5
    instead of 10.9 (the quiet headline runs, bf16 and fp32); on a CPU without native bf16 use
    ``--amp off``."""
    args, out = b.args, b.out / "headline"
    wall_clock = args.threads == 2
    budget = args.minutes * 2 * (0.98 if wall_clock else 0.92)  # CPU-minutes
    env = ONE_THREAD if args.threads == 1 else TWO_THREADS
    amp = ["--amp", args.amp]
    start_wall, start_cpu = time.time(), children_cpu_min()
    used = lambda: children_cpu_min() - start_cpu  # noqa: E731
    wall = lambda: (time.time() - start_wall) / 60  # noqa: E731
    stage1 = b.train(
        "headline/stage1",
        "--preset",
        "tiny",
        "--lr-steps",
        "1",
        "--time-budget",
        f"{budget * args.stage1_share:.2f}",
        "--seed",
        str(args.seed),
        *amp,
        env=env,
    )
    cpu0, wall0 = used(), wall()
    pseudo = b.score(
        "headline_pseudo",
        "--checkpoint",
        str(stage1),
        *PSEUDO_TTA,
        *amp,
        "--save-probs",
        split=args.eval_split,
        env=env,
    )
    infer_cpu, infer_wall = used() - cpu0, wall() - wall0
    if wall_clock:  # the wall minutes left after the final prediction, at the cores kept busy so far
        semi_budget = max(1.0, (args.minutes - wall() - infer_wall) * used() / wall())
    else:
        semi_budget = max(1.0, budget - used() - infer_cpu)  # keep the final prediction's share
    semi = b.train(
        "headline/semi",
        "--stage",
        "semi",
        "--init",
        str(stage1),
        "--pseudo",
        str(b.out / "pred" / "headline_pseudo"),
        "--unlabeled-split",
        args.eval_split,
        "--lr",
        "1e-4",
        "--time-budget",
        f"{semi_budget:.2f}",
        "--seed",
        str(args.seed),
        *amp,
        env=env,
    )
    final = b.score("headline_final", "--checkpoint", str(semi), *PSEUDO_TTA, *amp, split=args.eval_split, env=env)
    wall_min, cpu = wall(), used()
    data = {
        "stage1": {**run_info(out / "stage1"), "score": pseudo},
        "semi": {**run_info(out / "semi")},
        "final": final,
        "wall_min": wall_min,
        "cpu_min": cpu,
        "budget_cpu_min": budget,
        "threads": args.threads,
        "amp": args.amp,
        "seed": args.seed,
    }
    write_table(
        b.out / "headline.json",
        ["pipeline", "mIoU", "VC8", "VC16", "CPU-minutes (wall)"],
        [
            [
                "stage 1 + TTA (pseudo labels)",
                f"{pseudo['mIoU']:.3f}",
                f"{pseudo['VC8']:.3f}",
                f"{pseudo['VC16']:.3f}",
                "",
            ],
            [
                "+ semi (U2PL) + TTA",
                f"{final['mIoU']:.3f}",
                f"{final['VC8']:.3f}",
                f"{final['VC16']:.3f}",
                f"{cpu:.1f} ({wall_min:.1f})",
            ],
        ],
        data,
    )


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("table", choices=["base", "mvc", "tta", "aggregate", "semi", "headline"])
    p.add_argument("--data", type=Path, default=REPO.parent / "shared" / "data" / "camvid_vspw")
    p.add_argument("--out", type=Path, default=REPO / "runs" / "camvid")
    p.add_argument("--base", type=Path, help="an existing stage-1 checkpoint as the base (default: train one)")
    p.add_argument("--seeds", type=int, default=3, help="seeds per ablation row (default 3)")
    p.add_argument("--video-seeds", type=int, help="seeds of the tracker/refiner rows (default: --seeds)")
    p.add_argument("--tta-views", help="tta: comma-separated row names of TTA_VIEWS to run (default all)")
    p.add_argument("--teacher", type=Path, help="semi: an existing teacher checkpoint (default: train one)")
    p.add_argument(
        "--on",
        choices=("final", "base", "ft"),
        default="final",
        help="tta: the final models or the base; aggregate: the refiners (final) or the stage-1 fine-tunes (ft)",
    )
    p.add_argument("--tta-both", action="store_true", help="tta: the non-MVC final model too")
    p.add_argument("--semi-ensemble", action="store_true", help="semi: also the teacher + semi student ensemble")
    p.add_argument("--jobs", type=int, default=2, help="training runs side by side, one thread each (default 2)")
    p.add_argument(
        "--ctvis",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="CTVIS in the stage-1 fine-tunes, so the tracker starts from a trained reid head (default on)",
    )
    p.add_argument("--u2pl-scales", action="store_true", help="tta: add the PVUW 1st place's 8-scale view set")
    p.add_argument(
        "--minutes",
        type=float,
        default=40,
        help="headline: minutes of the whole 2-core machine (--threads 2: wall minutes; 1: minutes x 2 x 0.92 "
        "CPU-minutes)",
    )
    p.add_argument(
        "--threads",
        type=int,
        choices=(1, 2),
        default=2,
        help="headline: threads per process (default 2: wall clock on a quiet machine; 1: CPU time, shared machines)",
    )
    p.add_argument(
        "--amp", choices=("bf16", "off"), default="bf16", help="headline: autocast dtype of training and inference"
    )
    p.add_argument("--seed", type=int, default=0, help="headline: seed of its training runs (default 0)")
    p.add_argument("--stage1-share", type=float, default=0.6, help="headline: share of the time for stage 1")
    p.add_argument("--eval-split", default="val", help="headline: the split pseudo-labelled and evaluated")
    args = p.parse_args()
    b = Bench(args)
    tables = {
        "base": base,
        "mvc": mvc_table,
        "tta": tta_table,
        "aggregate": aggregate_table,
        "semi": semi_table,
        "headline": headline,
    }
    tables[args.table](b)


if __name__ == "__main__":
    main()
