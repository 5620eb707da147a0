"""CamVid semi-supervised table (PVUW 2024 1st-place paper, Table 3 shape), on CPU budgets.

    python benchmarks/run_camvid_semi.py --data ../shared/data/camvid_vspw --out runs/camvid_semi \
        [--student runs/camvid/segmenter/last.pt]

Steps (each skipped when its output exists, so the script resumes after an interruption):
  1. teacher: the tiny preset (the student's) with a bigger backbone (ResNet-34 instead of
     ResNet-18), trained on train from scratch for --budget-teacher CPU-minutes;
     student: --student (stage 1 of ``run_camvid.py``), or trained here like it when absent;
  2. pseudo labels of the val videos (used without their labels, as the paper uses the test
     videos): ``infer.py --ensemble TEACHER STUDENT --tta --tta-merge mean --save-probs``; the same
     predictions are the "teacher + student ensemble" row;
  3. semi: ``train.py --stage semi --init STUDENT --pseudo ... --unlabeled-split val`` (U2PL
     losses, EMA teacher, memory bank), --budget-semi CPU-minutes;
  4. ablation: the student fine-tuned on the labelled clips alone, same LR schedule and number of
     steps as the semi run (how much of the gain is just more training);
  5. every model on val with and without TTA, and the final ensemble (teacher + semi student).
Prints the table as markdown and writes OUT/results.json. Training budgets are CPU time of the
training process (one thread each), as in ``run_camvid.py``.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
import sys

from run_camvid import predict_and_score, REPO, run_parallel, write_table

sys.path.insert(0, str(REPO))
from vss.config import tiny  # noqa: E402
from vss.io import load_class_names  # noqa: E402

TTA = ["--tta", "--tta-merge", "mean"]  # scales 0.9-1.2 + flips (infer.py defaults), U2PL's mean


def teacher_config(data: Path, out: Path, iters: int) -> Path:
    """The tiny preset with a ResNet-34 backbone instead of ResNet-18 (the paper's teacher is the
    bigger model), for the dataset's classes."""
    cfg = tiny()
    cfg.name = "teacher_r34"
    cfg.model.backbone = "resnet34"
    cfg.model.num_classes = len(load_class_names(data)[0])
    cfg.optim.iters = iters
    out.write_text(cfg.to_json())
    return out


def train_cmd(args, out: Path, budget: float, iters: int, *extra: str) -> list[str]:
    return [
        sys.executable,
        str(REPO / "train.py"),
        "--data",
        str(args.data),
        "--out",
        str(out),
        "--time-budget",
        str(budget),
        "--iters",
        str(iters),
        "--eval-every",
        "0",
        "--workers",
        "0",
        "--resume",
        "auto",
        *extra,
    ]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", type=Path, default=REPO.parent / "shared" / "data" / "camvid_vspw")
    p.add_argument("--out", type=Path, default=REPO / "runs" / "camvid_semi")
    p.add_argument(
        "--student",
        type=Path,
        default=REPO / "runs" / "camvid" / "segmenter" / "last.pt",
        help="stage-1 student checkpoint (trained here with the tiny preset if absent)",
    )
    p.add_argument("--budget-teacher", type=float, default=50, help="CPU-minutes of the teacher")
    p.add_argument("--budget-student", type=float, default=30, help="CPU-minutes of the student")
    p.add_argument("--budget-semi", type=float, default=15, help="CPU-minutes of the semi stage")
    p.add_argument("--iters-teacher", type=int, default=1500)
    p.add_argument("--iters-semi", type=int, default=200)
    p.add_argument("--lr-semi", type=float, default=1e-4, help="fine-tuning LR (student: 2e-4)")
    args = p.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)

    # 1. teacher and (when not given) student, side by side
    student, teacher = args.student, args.out / "teacher" / "last.pt"
    config = teacher_config(args.data, args.out / "teacher_config.json", args.iters_teacher)
    jobs = [
        (
            train_cmd(args, teacher.parent, args.budget_teacher, args.iters_teacher, "--config", str(config)),
            teacher.parent,
        )
    ]
    if not student.exists():
        student = args.out / "student" / "last.pt"
        jobs.append((train_cmd(args, student.parent, args.budget_student, 1200, "--preset", "tiny"), student.parent))
    run_parallel(jobs)

    # 2. pseudo labels = the TTA'd teacher + student ensemble on the unlabelled (val) videos
    table = {
        "teacher": predict_and_score(args, "teacher", ["--checkpoint", str(teacher)]),
        "student": predict_and_score(args, "student", ["--checkpoint", str(student)]),
        "student_tta": predict_and_score(args, "student_tta", ["--checkpoint", str(student), *TTA]),
    }
    table["ensemble_tta"] = predict_and_score(
        args, "ensemble_tta", ["--ensemble", str(teacher), str(student), *TTA, "--save-probs"]
    )
    pseudo = args.out / "pred" / "ensemble_tta"

    # 3. U2PL fine-tuning of the student on train (labelled) + val (pseudo-labelled)
    semi = args.out / "semi" / "last.pt"
    run_parallel(
        [
            (
                train_cmd(
                    args,
                    semi.parent,
                    args.budget_semi,
                    args.iters_semi,
                    "--stage",
                    "semi",
                    "--init",
                    str(student),
                    "--pseudo",
                    str(pseudo),
                    "--unlabeled-split",
                    "val",
                    "--lr",
                    str(args.lr_semi),
                ),
                semi.parent,
            )
        ]
    )

    # 4. ablation: as many supervised-only steps with the same schedule
    steps = json.loads((semi.parent / "log.jsonl").read_text().splitlines()[-1])["step"]
    supervised = args.out / "supervised_ft" / "last.pt"
    run_parallel(
        [
            (
                train_cmd(
                    args,
                    supervised.parent,
                    args.budget_semi,
                    args.iters_semi,
                    "--init",
                    str(student),
                    "--stop-at",
                    str(steps),
                    "--lr",
                    str(args.lr_semi),
                ),
                supervised.parent,
            )
        ]
    )
    table["supervised_ft"] = predict_and_score(args, "supervised_ft", ["--checkpoint", str(supervised)])

    # 5. the semi student alone and in the final ensemble
    table["semi"] = predict_and_score(args, "semi", ["--checkpoint", str(semi)])
    table["semi_tta"] = predict_and_score(args, "semi_tta", ["--checkpoint", str(semi), *TTA])
    table["ensemble_semi_tta"] = predict_and_score(
        args, "ensemble_semi_tta", ["--ensemble", str(teacher), str(semi), *TTA]
    )
    write_table(table, args.out / "results.json")


if __name__ == "__main__":
    main()
