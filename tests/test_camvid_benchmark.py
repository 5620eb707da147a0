"""benchmarks/camvid.py's semi table: which checkpoint each run starts from (no training here:
train.py and infer.py are replaced by recorders)."""

import argparse
import json
from pathlib import Path
import runpy

REPO = Path(__file__).resolve().parents[1]


def _log(run: Path, *lines: dict) -> Path:
    run.mkdir(parents=True, exist_ok=True)
    (run / "log.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
    return run / "last.pt"


def test_semi_table_anneals_teacher_and_student_and_starts_both_arms_from_the_annealed_student(tmp_path):
    camvid = runpy.run_path(str(REPO / "benchmarks" / "camvid.py"))
    trained, scored, threads = {}, {}, {}

    class RecordingBench(camvid["Bench"]):
        def train(self, name, *argv, env=camvid["ONE_THREAD"]):
            trained[name], threads[name] = argv, env["OMP_NUM_THREADS"]
            return _log(self.out / name, {"step": 150, "loss": 1.0, "cpu_min": 1.0})

        def score(self, name, *infer_args, split="val", env=None):
            scored[name] = infer_args
            return {"mIoU": 0.5, "VC8": 0.9, "VC16": 0.9, "fps": 1.0, "per_class_IoU": {}}

    step = {"step": 2500, "loss": 1.0, "cpu_min": 90.0}
    base = _log(tmp_path / "base", step, {"step": 2500, "val": {"mIoU": 0.5, "VC8": 0.9}})
    teacher = _log(tmp_path / "teacher", step)
    args = argparse.Namespace(
        out=tmp_path / "out",
        data=tmp_path,
        seeds=2,
        video_seeds=None,
        jobs=2,
        base=base,
        teacher=teacher,
        semi_ensemble=False,
    )
    bench = RecordingBench(args)
    camvid["semi_table"](bench)

    student_ft, teacher_ft = (str(bench.out / "semi" / n / "last.pt") for n in ("student_ft", "teacher_ft"))
    schedule = tuple(camvid["SEMI_FT"])
    assert trained["semi/student_ft"] == ("--init", str(base), *schedule)
    assert trained["semi/teacher_ft"] == ("--init", str(teacher), *schedule)
    pseudo = scored["semi_pseudo"]
    assert pseudo[:3] == ("--ensemble", teacher_ft, student_ft) and "--save-probs" in pseudo
    for seed in (0, 1):
        u2pl, supervised = trained[f"semi/u2pl_s{seed}"], trained[f"semi/supervised_s{seed}"]
        assert u2pl[:3] == ("--stage", "semi", "--init") and u2pl[3] == student_ft
        assert u2pl[u2pl.index("--pseudo") + 1] == str(bench.out / "pred" / "semi_pseudo")
        assert supervised == ("--init", student_ft, *schedule, "--seed", str(seed))
        assert u2pl[-len(schedule) - 2 :] == (*schedule, "--seed", str(seed))  # step-matched
    assert trained["semi/u2pl_cutmix"][-1] == "--cutmix"
    assert threads["semi/student_ft"] == threads["semi/u2pl_s0"] == "1"  # two runs at a time, one core each
    table = json.loads((bench.out / "semi.json").read_text())
    assert len(table["semi_u2pl"]) == len(table["semi_supervised"]) == 2

    # without --base / --teacher both are trained first, one after the other, on both cores
    trained.clear()
    bench = RecordingBench(argparse.Namespace(**{**vars(args), "base": None, "teacher": None, "out": tmp_path / "o2"}))
    camvid["semi_table"](bench)
    assert threads["base"] == threads["teacher"] == "2"
    assert trained["semi/student_ft"][:2] == ("--init", str(bench.out / "base" / "last.pt"))
    assert trained["semi/teacher_ft"][:2] == ("--init", str(bench.out / "teacher" / "last.pt"))
