"""train.py end to end on a micro model (CPU, 32x32 clips): checkpoints loadable with
weights_only, exact resume, DDP (2 gloo ranks) == one process accumulating the same two
micro-batches, SIGTERM leaves a checkpoint, a NaN loss stops with the last good checkpoint, bad
input gives a clear error."""

import contextlib
import dataclasses
import functools
import io
import json
import os
from pathlib import Path
import select
import shutil
import signal
import subprocess
import sys
import time

import cv2
from helpers import REPO, script_main, train_args, write_ddp_train_wrapper
import numpy as np
import pytest
import torch

from vss.checkpoint import load_checkpoint
from vss.config import Config, migrate_config, tiny
import vss.engine
from vss.io import read_label_png, read_split, shift_labels
from vss.mvc import mvc_settings
from vss.sampler import build_dataset
import vss.stages
from vss.stages import STAGES
from vss.synthetic import render_dataset, TRAIN_ITERS

train_main = script_main("train.py")
infer_main, evaluate_main = script_main("infer.py"), script_main("evaluate.py")

ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """A 2-class synthetic dataset of 32x32 videos and a micro config (whole frames as clips)."""
    base = tmp_path_factory.mktemp("train")
    data = render_dataset(base / "data", num_videos=6, frames=(9, 10), height=32, width=32, num_classes=2, seed=3)
    cfg = tiny()
    m = cfg.model
    m.resnet_width, m.conv_dim, m.mask_dim, m.hidden_dim = 16, 64, 64, 32
    m.enc_layers, m.enc_ffn_dim, m.enc_heads = 1, 64, 2
    m.num_queries, m.nheads, m.dim_feedforward, m.dec_layers = 10, 2, 64, 3
    cfg.loss.num_points = 64
    cfg.data.base_size, cfg.data.min_scale, cfg.data.max_scale = 32, 1.0, 1.0
    cfg.data.crop_size, cfg.data.test_size = (32, 32), 32
    cfg.optim.batch, cfg.stages.segmenter.frames, cfg.optim.iters = 1, 2, 4
    (base / "micro.json").write_text(cfg.to_json())
    return {"base": base, "data": data, "config": base / "micro.json"}


def run(argv, launcher=(sys.executable, "train.py"), timeout=180) -> subprocess.CompletedProcess:
    return subprocess.run([*launcher, *argv], cwd=REPO, env=ENV, capture_output=True, text=True, timeout=timeout)


def printed_config(argv) -> Config:
    """The config train.py resolves for a command line (--print-config); raises its error."""
    out = io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(io.StringIO()) as err:
        code = train_main([*map(str, argv), "--print-config"])
    if code != 0:
        raise ValueError(err.getvalue())
    return Config.from_dict(json.loads(out.getvalue()))


def log_lines(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]


def assert_val_recomputed(out: Path, data: Path, tmp: Path) -> dict:
    """train.py's one val line of run ``out`` equals the figures of another path: infer.py on
    OUT/best.pt (saved right after that validation) writes the val label PNGs, evaluate.py scores
    them against the GT (all integer counts: equal, not close). Returns the val line."""
    (val,) = [x["val"] for x in log_lines(out) if "val" in x]
    pred = tmp / "pred"
    assert (
        infer_main(
            [
                "--checkpoint",
                str(out / "best.pt"),
                "--data",
                str(data),
                "--split",
                "val",
                "--out",
                str(pred),
                "--device",
                "cpu",
                "--no-progress",
            ]
        )
        == 0
    )
    assert (
        evaluate_main(
            [
                "--pred",
                str(pred),
                "--gt",
                str(data),
                "--split",
                "val",
                "--json",
                str(tmp / "eval.json"),
                "--no-progress",
            ]
        )
        == 0
    )
    summary = json.loads((tmp / "eval.json").read_text())
    assert val == {k: summary[k] for k in val}, (val, summary)
    assert {"mIoU", "fwIoU", "VC8", "VC16"} <= set(val)
    return val


def assert_same_state(a: dict, b: dict, exact: bool = True) -> None:
    assert a["model"].keys() == b["model"].keys()
    for key in a["model"]:
        if exact:
            assert torch.equal(a["model"][key], b["model"][key]), key
        elif "running_" not in key and "num_batches" not in key:  # DDP buffers come from rank 0
            assert torch.allclose(a["model"][key], b["model"][key], rtol=1e-5, atol=1e-7), key
    sa, sb = a["optimizer"]["state"], b["optimizer"]["state"]
    assert sa.keys() == sb.keys()
    for i in sa:
        for key in sa[i]:
            same = torch.equal if exact else (lambda x, y: torch.allclose(x, y, rtol=1e-5, atol=1e-9))
            assert same(sa[i][key], sb[i][key]), (i, key)


@pytest.fixture(scope="module")
def straight(setup):
    """4 steps in one go, evaluated at the end."""
    out = setup["base"] / "straight"
    res = run(train_args(setup, out, "--eval-every", 4))
    assert res.returncode == 0, res.stderr[-3000:]
    return out


def test_run_writes_safe_checkpoints_config_and_log(straight, setup, tmp_path):
    for name in ("last.pt", "best.pt"):
        torch.load(straight / name, map_location="cpu", weights_only=True)  # plain data only
    ck = load_checkpoint(straight / "last.pt")
    assert ck["step"] == 4 and ck["stage"] == "segmenter"
    assert {"model", "optimizer", "scheduler", "scaler", "config", "rng", "best_miou", "data"} <= set(ck)
    assert len(ck["rng"]) == 1 and ck["data"] == {"seed": 0, "global_batch": 1, "samples": 4}
    assert ck["config"]["model"]["num_classes"] == 2  # from the dataset's classes.json
    assert all(k.startswith("segmenter.") for k in ck["model"])  # a VideoModel, for --init of stage 2
    saved = Config.from_dict(json.loads((straight / "config.json").read_text()))
    assert saved == Config.from_dict(ck["config"])
    lines = log_lines(straight)
    train_lines = [x for x in lines if "loss" in x]
    assert [x["step"] for x in train_lines] == [1, 2, 3, 4]
    assert all(x["loss"] > 0 and x["clips_per_s"] > 0 and not x["skipped"] for x in train_lines)
    # LR drops 10x at round(0.7 * 4) = 3 (0-based iteration 3 = step 4)
    assert [x["lr"] for x in train_lines] == pytest.approx([2e-4, 2e-4, 2e-4, 2e-5])
    val = assert_val_recomputed(straight, setup["data"], tmp_path)
    assert val["VC16"] is None  # 10-frame videos
    assert ck["best_miou"] == val["mIoU"] == load_checkpoint(straight / "best.pt")["best_miou"]


def test_resume_continues_exactly(straight, setup):
    out = setup["base"] / "resumed"
    first = run(train_args(setup, out, "--eval-every", 4, "--stop-at", 2))
    assert first.returncode == 0, first.stderr[-3000:]
    assert load_checkpoint(out / "last.pt")["step"] == 2
    second = run(train_args(setup, out, "--eval-every", 4, "--resume", "auto"))
    assert second.returncode == 0, second.stderr[-3000:]
    a, b = load_checkpoint(straight / "last.pt"), load_checkpoint(out / "last.pt")
    assert_same_state(a, b, exact=True)
    assert a["scheduler"] == b["scheduler"] and a["best_miou"] == b["best_miou"]

    def steps_3_4(out):  # the same losses, LR, grad norm, val metrics; timings differ
        return [
            {k: v for k, v in x.items() if k not in ("clips_per_s", "mem_mb", "cpu_min")}
            for x in log_lines(out)
            if x["step"] > 2
        ]

    assert steps_3_4(out) == steps_3_4(straight) and len(steps_3_4(out)) == 4  # steps 3, 4, val, done


def test_ddp_two_ranks_equal_one_process_with_two_micro_batches(setup, tmp_path):
    # Equal normalisers on both sides need the same number of targets per micro-batch: with 2
    # classes both present in every whole frame, every frame has exactly 2.
    for video in read_split(setup["data"], "train"):
        for mask in sorted((setup["data"] / "data" / video / "mask").iterdir()):
            assert set(shift_labels(read_label_png(mask)).ravel().tolist()) - {255} == {0, 1}
    extra = ("--iters", 3, "--mvc", "--mvc-patch", 8)
    wrapper = write_ddp_train_wrapper(tmp_path / "ddp_wrapper.py")
    launcher = (sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(wrapper))
    ddp = run(train_args(setup, tmp_path / "ddp", *extra), launcher=launcher)
    assert ddp.returncode == 0, ddp.stderr[-3000:]
    single = run(train_args(setup, tmp_path / "single", *extra, "--accum", 2))
    assert single.returncode == 0, single.stderr[-3000:]
    rank0 = load_checkpoint(tmp_path / "ddp" / "last.pt.rank0")
    rank1 = load_checkpoint(tmp_path / "ddp" / "last.pt.rank1")
    ref = load_checkpoint(tmp_path / "single" / "last.pt")
    assert rank0["step"] == rank1["step"] == ref["step"] == 3
    assert len(rank0["rng"]) == 2 and rank0["data"]["global_batch"] == ref["data"]["global_batch"] == 2
    for key in rank0["model"]:  # ranks stay in sync (buffers: rank 0's, broadcast before saving)
        assert torch.equal(rank0["model"][key], rank1["model"][key]), key
    assert_same_state(rank0, ref, exact=False)
    assert any("mvc_loss_ce" in x for x in log_lines(tmp_path / "single"))


def test_sigterm_saves_a_loadable_checkpoint(setup, tmp_path):
    out = tmp_path / "sig"
    argv = train_args(setup, out, "--iters", 1000)
    argv[argv.index("--workers") + 1] = "1"  # the signal goes to the data worker as well
    with open(tmp_path / "stdout.txt", "wb") as stdout:
        proc = subprocess.Popen(
            [sys.executable, "train.py", *argv],
            cwd=REPO,
            env=ENV,
            stdout=stdout,
            stderr=subprocess.PIPE,
            start_new_session=True,
        )
    # The signal goes out once step 1 is done: its loss shows on the progress bar (stderr), so the
    # data worker has delivered a batch and set its signal handlers. (The 600 s cap only ends a
    # hung run; the test waits for the event, not for a time.)
    err = b""
    while b"loss=" not in err and select.select([proc.stderr], [], [], 600)[0]:
        chunk = os.read(proc.stderr.fileno(), 4096)
        if not chunk:
            break  # the run ended before its first step
        err += chunk
    assert b"loss=" in err, err.decode()[-3000:]
    os.killpg(proc.pid, signal.SIGTERM)  # as SLURM or a terminal: the whole process group
    err = (err + proc.communicate(timeout=600)[1]).decode()
    assert proc.returncode == 128 + signal.SIGTERM, err[-3000:]
    ck = load_checkpoint(out / "last.pt")
    assert 1 <= ck["step"] < 1000 and ck["data"]["samples"] == ck["step"]
    # every step is logged before the loop looks for a signal: the last one logged is the one saved
    steps = [x["step"] for x in log_lines(out)]
    assert steps == list(range(1, ck["step"] + 1))
    assert f"stopped by a signal at step {ck['step']}; saved" in (tmp_path / "stdout.txt").read_text()


def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(setup, tmp_path, monkeypatch, capsys):
    stage = STAGES["segmenter"]

    def loss_nan_at_step_3(model, criterion, batch, step, cfg):
        terms = stage.loss(model, criterion, batch, step, cfg)
        if step == 3:
            terms["loss_dice"] = terms["loss_dice"] * float("nan")
        return terms

    monkeypatch.setitem(STAGES, "segmenter", dataclasses.replace(stage, loss=loss_nan_at_step_3))
    out = tmp_path / "nan"
    assert train_main(train_args(setup, out, "--save-every", 1)) == 1
    assert "non-finite loss" in capsys.readouterr().err
    assert load_checkpoint(out / "last.pt")["step"] == 2
    assert signal.getsignal(signal.SIGTERM) == signal.SIG_DFL  # handlers restored


def test_bad_input_gives_a_clear_error(setup, straight, tmp_path, capsys):
    assert train_main(train_args(setup, tmp_path / "a", "--resume", tmp_path / "missing.pt")) == 2
    assert "missing.pt does not exist" in capsys.readouterr().err
    assert train_main(train_args(setup, tmp_path / "b", "--resume", straight / "last.pt", "--seed", 5)) == 2
    assert "different settings (train.seed: 0 -> 5)" in capsys.readouterr().err
    bad = train_args(setup, tmp_path / "c")
    bad[bad.index("--data") + 1] = str(tmp_path / "nowhere")
    assert train_main(bad) == 2
    assert "nowhere" in capsys.readouterr().err


def test_init_loads_a_checkpoint_and_rejects_a_foreign_one(setup, straight, tmp_path, capsys):
    out = tmp_path / "init"
    assert train_main(train_args(setup, out, "--init", straight / "last.pt", "--lr", 0, "--iters", 1)) == 0
    start, after = load_checkpoint(straight / "last.pt"), load_checkpoint(out / "last.pt")
    assert after["step"] == 1  # a new run, starting from the weights
    params = [k for k in start["model"] if "running_" not in k and "num_batches" not in k]
    assert all(torch.equal(start["model"][k], after["model"][k]) for k in params)  # lr 0
    torch.save({"head.weight": torch.zeros(3)}, tmp_path / "foreign.pt")
    assert train_main(train_args(setup, tmp_path / "x", "--init", tmp_path / "foreign.pt")) == 2
    assert "foreign.pt matches neither" in capsys.readouterr().err


def test_default_data_is_the_embedded_synthetic_set(setup, tmp_path):
    env_data = tmp_path / "vss_data"
    argv = [
        "--config",
        str(setup["config"]),
        "--out",
        str(tmp_path / "run"),
        "--workers",
        "0",
        "--iters",
        "1",
        "--eval-every",
        "0",
    ]
    res = subprocess.run(
        [sys.executable, "train.py", *argv],
        cwd=REPO,
        capture_output=True,
        text=True,
        env={**ENV, "VSS_DATA": str(env_data)},
        timeout=180,
    )
    assert res.returncode == 0, res.stderr[-3000:]
    assert (env_data / "synthetic" / "classes.json").is_file()
    assert load_checkpoint(tmp_path / "run" / "last.pt")["config"]["model"]["num_classes"] == 6


# --------------------------------------------------------------------------------------------
# Video stages, --init, time budget, extra image datasets, config defaults
# --------------------------------------------------------------------------------------------


def _keys(state: dict, module: str) -> list[str]:
    return [k for k in state if k.startswith(module + ".")]


def _video_model(ck: dict):
    from vss.video_model import build_video_model

    model = build_video_model(Config.from_dict(ck["config"]), ck["stage"])
    model.load_state_dict(ck["model"], strict=True)  # what infer.py's load_member does
    return model


@pytest.fixture(scope="module")
def tracker_run(setup, straight, tmp_path_factory):
    """Stage 2 from the segmenter checkpoint: 4 steps, 3-frame clips, evaluated at the end;
    records the `guided` flag of every video_loss call."""
    out = tmp_path_factory.mktemp("tracker")
    flags = []
    real = vss.stages._guided

    def spy(step, cfg):
        flags.append(real(step, cfg))
        return flags[-1]

    vss.stages._guided = spy
    try:
        code = train_main(
            train_args(
                setup, out, "--stage", "tracker", "--init", straight / "last.pt", "--frames", 3, "--eval-every", 4
            )
        )
    finally:
        vss.stages._guided = real
    assert code == 0
    return out, flags


def test_tracker_stage_freezes_the_segmenter_and_guides_the_first_half(tracker_run, straight, setup, tmp_path):
    out, guided = tracker_run
    seg, trk = load_checkpoint(straight / "last.pt"), load_checkpoint(out / "last.pt")
    assert trk["stage"] == "tracker" and trk["semi"] is False and trk["step"] == 4
    assert trk["config"]["stages"]["tracker"]["frames"] == 3
    # the frozen segmenter (parameters and BatchNorm buffers) is bitwise the init's
    assert _keys(trk["model"], "segmenter") == _keys(seg["model"], "segmenter")
    assert all(torch.equal(trk["model"][k], seg["model"][k]) for k in _keys(seg["model"], "segmenter"))
    assert _keys(trk["model"], "tracker") and not _keys(trk["model"], "refiner")
    # DVIS++: guided while the 0-based iteration < iters // 2 (iterations 0, 1 of 4)
    assert guided == [True, True, False, False]
    _video_model(trk)
    assert trk["class_names"] == json.loads((setup["data"] / "classes.json").read_text())["classes"]
    assert len(trk["palette"]) == 2 and all(len(c) == 3 for c in trk["palette"])
    # predict_video of a tracker model: infer.py on best.pt gives the same figures
    assert assert_val_recomputed(out, setup["data"], tmp_path)["mIoU"] == trk["best_miou"]


def test_refiner_stage_from_the_tracker_with_mvc(tracker_run, setup, tmp_path):
    trk = load_checkpoint(tracker_run[0] / "last.pt")
    out = tmp_path / "refiner"
    assert (
        train_main(
            train_args(
                setup,
                out,
                "--stage",
                "refiner",
                "--init",
                tracker_run[0] / "last.pt",
                "--frames",
                4,
                "--iters",
                2,
                "--eval-every",
                2,
                "--mvc",
                "--mvc-patch",
                8,
            )
        )
        == 0
    )
    ref = load_checkpoint(out / "last.pt")
    assert ref["stage"] == "refiner" and ref["step"] == 2
    frozen = _keys(trk["model"], "segmenter") + _keys(trk["model"], "tracker")
    assert all(torch.equal(ref["model"][k], trk["model"][k]) for k in frozen)
    assert _keys(ref["model"], "refiner")
    assert len(ref["class_memory"]) == 1  # the reid memory of each rank, for an exact resume
    _video_model(ref)
    lines = log_lines(out)
    assert any("mvc_loss_ce" in x and "mvc_loss_reid" in x for x in lines)
    assert any("val" in x for x in lines)


def test_refiner_resume_restores_the_class_memory(tracker_run, setup, tmp_path):
    extra = ("--stage", "refiner", "--init", tracker_run[0] / "last.pt", "--frames", 3, "--iters", 3)
    straight_out, split_out = tmp_path / "a", tmp_path / "b"
    assert train_main(train_args(setup, straight_out, *extra)) == 0
    assert train_main(train_args(setup, split_out, *extra, "--stop-at", 1)) == 0
    assert train_main(train_args(setup, split_out, *extra, "--resume", "auto")) == 0
    a, b = load_checkpoint(straight_out / "last.pt"), load_checkpoint(split_out / "last.pt")
    assert_same_state(a, b, exact=True)
    assert a["class_memory"][0].keys() == b["class_memory"][0].keys()
    assert all(torch.equal(a["class_memory"][0][c], b["class_memory"][0][c]) for c in a["class_memory"][0])


def test_init_rules_of_the_video_stages(setup, straight, tracker_run, tmp_path, capsys):
    assert train_main(train_args(setup, tmp_path / "a", "--stage", "refiner", "--init", straight / "last.pt")) == 2
    assert "without ['tracker'] weights" in capsys.readouterr().err
    assert train_main(train_args(setup, tmp_path / "b", "--stage", "tracker")) == 2
    assert "pass --init with a segmenter checkpoint" in capsys.readouterr().err
    # a tracker checkpoint as --init of the segmenter stage: the segmenter is loaded, the
    # tracker ignored, and the message says so
    assert train_main(train_args(setup, tmp_path / "c", "--init", tracker_run[0] / "last.pt", "--iters", 1)) == 0
    printed = capsys.readouterr().out
    assert "loaded segmenter" in printed and "ignored from the checkpoint: tracker" in printed


def test_time_budget_fits_the_whole_schedule_and_logs_it(setup, tmp_path, monkeypatch, capsys):
    """--time-budget times the steps after this process's first, fits the number of steps to the
    budget and runs the whole schedule: the LR reaches its last value (base x 0.01 after the drops
    at 0.7 and 0.9 of the fitted length), and the fitted schedule is in log.jsonl and config.json.
    The budget clock reads a fake CPU clock, setup_s + step_s x (training steps begun), so the
    fitted length is known exactly (binary-exact numbers): timed from step 1 (3.25 s) to step 11
    (5.75 s), 0.25 s a step, (7.5 - 5.75) / 0.25 = 7 more steps: 18, LR drops at round(12.6) = 13
    and round(16.2) = 16."""
    setup_s, step_s, budget_min = 3.0, 0.25, 0.125  # the budget: 7.5 CPU-s
    stage, begun = STAGES["segmenter"], []

    def counted_loss(model, criterion, batch, step, cfg):
        begun.append(step)
        return stage.loss(model, criterion, batch, step, cfg)

    monkeypatch.setitem(STAGES, "segmenter", dataclasses.replace(stage, loss=counted_loss))
    monkeypatch.setattr(
        vss.engine,
        "BudgetClock",
        functools.partial(vss.engine.BudgetClock, cpu_time=lambda: setup_s + step_s * len(begun)),
    )
    main = script_main("train.py")  # binds the patched BudgetClock
    assert main.__globals__["FIT_STEPS"] == 10
    out = tmp_path / "budget"
    assert main(train_args(setup, out, "--time-budget", budget_min)) == 0
    lines = log_lines(out)
    fitted = [x for x in lines if "schedule" in x]
    assert fitted == [
        {
            "step": 11,
            "schedule": {"iters": 18, "milestones": [13, 16], "budget_cpu_min": budget_min, "cpu_s_per_step": step_s},
        }
    ]
    steps = [x for x in lines if "loss" in x]
    assert [x["step"] for x in steps] == list(range(1, 19)) and begun == list(range(1, 19))
    # LR of step s (0-based iteration s - 1): 2e-4 x 0.1 ** #(milestones <= s - 1)
    assert [x["lr"] for x in steps] == pytest.approx([2e-4] * 13 + [2e-5] * 3 + [2e-6] * 2)
    assert lines[-1] == {"step": 18, "done": True, "cpu_min": budget_min}  # 3 + 18 x 0.25 = 7.5 s
    config = json.loads((out / "config.json").read_text())
    assert config["optim"]["iters"] == 18 and config["optim"]["time_budget"] == budget_min
    ck = load_checkpoint(out / "last.pt")
    assert ck["step"] == 18 and ck["cpu_minutes"] == budget_min
    # resumed with the same budget: nothing left to do; another budget is another run
    assert main(train_args(setup, out, "--time-budget", budget_min, "--resume", "auto")) == 0
    assert begun == list(range(1, 19)) and [x for x in log_lines(out) if "loss" in x] == steps
    capsys.readouterr()
    assert main(train_args(setup, out, "--time-budget", 0.5, "--resume", "auto")) == 2
    assert f"optim.time_budget: {budget_min} -> 0.5" in capsys.readouterr().err


def test_budget_clock_reads_process_cpu_time_and_excludes_validation():
    """What the fake clock above stands for: by default BudgetClock reads time.process_time; a
    resumed run's earlier CPU time is added and the time inside ``excluded()`` left out."""
    assert vss.engine.BudgetClock().cpu_time is time.process_time
    now = [10.0]
    clock = vss.engine.BudgetClock(prior_s=60.0, cpu_time=lambda: now[0])
    assert clock.seconds() == 70.0
    with clock.excluded():
        now[0] += 5.0  # validation
    now[0] += 2.0  # training
    assert clock.seconds() == 72.0


def _image_folder(root: Path, values: list[int]) -> Path:
    """One constant-label 32x32 image per source value (label = the value, image grey = 4 * value)."""
    (root / "images").mkdir(parents=True)
    (root / "labels").mkdir()
    for i, v in enumerate(values):
        cv2.imwrite(str(root / "images" / f"im{i}.png"), np.full((32, 32, 3), 4 * v, np.uint8))
        cv2.imwrite(str(root / "labels" / f"im{i}.png"), np.full((32, 32), v, np.uint8))
    return root


def test_extra_image_datasets_mix_into_the_labelled_stream(setup, tmp_path):
    root = _image_folder(tmp_path / "imgs", [10, 20, 30])
    mapping = tmp_path / "map.json"
    mapping.write_text(json.dumps({"num_target_classes": 2, "map": {"10": 0, "20": 1}}))
    cfg = printed_config(train_args(setup, tmp_path / "x", "--extra", f"{root}:{mapping}"))
    assert cfg.train.extra == (f"{root}:{mapping}",)
    positioned = build_dataset(setup["data"], cfg)
    n_videos = len(positioned.dataset.videos)
    # proportional: one epoch = every video and every image exactly once
    epoch = [positioned.locate(g) for g in range(n_videos + 3)]
    assert sorted(epoch) == sorted([(-1, i) for i in range(n_videos)] + [(0, i) for i in range(3)])
    # an image slot is a T-frame clip of remapped images (10 -> 0, 20 -> 1, 30 -> ignore)
    g = next(g for g, (src, _) in enumerate(epoch) if src == 0)
    clip = positioned.labelled(g)
    assert clip["frames"].shape == (2, 3, 32, 32) and clip["video"].startswith("imgs/")
    for t, name in enumerate(clip["frame_names"]):
        expect = {"im0": 0, "im1": 1, "im2": 255}[name]
        assert set(clip["labels"][t].unique().tolist()) == {expect}
    # --extra-ratio 1: every slot is an image; training runs on them
    out = tmp_path / "run"
    assert train_main(train_args(setup, out, "--extra", f"{root}:{mapping}", "--extra-ratio", 1, "--iters", 2)) == 0
    positioned = build_dataset(setup["data"], Config.from_dict(load_checkpoint(out / "last.pt")["config"]))
    assert all(positioned.locate(g)[0] == 0 for g in range(20))
    assert load_checkpoint(out / "last.pt")["step"] == 2


def test_extra_flag_errors(setup, tmp_path, capsys):
    with pytest.raises(SystemExit):
        train_main(train_args(setup, tmp_path / "a", "--stage", "tracker", "--extra", "x:y"))
    assert "per-frame stage" in capsys.readouterr().err
    assert train_main(train_args(setup, tmp_path / "b", "--extra", f"{tmp_path}/none:{tmp_path}/m.json")) == 2
    assert "m.json" in capsys.readouterr().err


def test_config_defaults_of_stages_and_embedded_data(setup, straight, tracker_run, tmp_path):
    data = ["--data", setup["data"]]
    cfg = printed_config(["--preset", "r50", "--stage", "refiner", *data])
    assert (cfg.stage.frames, cfg.stage.reverse_prob, cfg.data.base_size, cfg.optim.iters) == (21, 0.5, 480, 20000)
    frames = lambda argv: printed_config(argv).stage.frames  # noqa: E731
    assert frames(["--preset", "r50", "--stage", "tracker", *data]) == 5
    assert frames(["--stage", "refiner", "--frames", 6, *data]) == 6
    assert frames(["--stage", "refiner", *data]) == tiny().stages.refiner.frames == 9
    assert frames(["--stage", "tracker", *data]) == 5 and frames(["--stage", "semi", "--pseudo", "p", *data]) == 2
    # the embedded synthetic data (no --data): its own scale and a short schedule
    cfg = printed_config([])
    assert (cfg.data.base_size, cfg.data.crop_size, cfg.data.test_size) == (120, (128, 160), 120)
    assert cfg.optim.iters == TRAIN_ITERS and cfg.stage.frames == 2 and cfg.model.num_classes == 6
    cfg = printed_config(["--crop", 96, 96, "--test-size", 100, "--iters", 7])
    assert (cfg.data.base_size, cfg.data.crop_size, cfg.data.test_size, cfg.optim.iters) == (240, (96, 96), 100, 7)
    assert printed_config(["--base-size", 64, *data]).data.base_size == 64
    # every setting lands in the config: MVC, semi, seed, split
    cfg = printed_config(["--mvc", "--mvc-ratio", 0.5, "--mvc-weight", 2, "--seed", 7, "--split", "val", *data])
    assert (cfg.mvc.enabled, cfg.mvc.patch_size, cfg.mvc.ratio, cfg.mvc.weight) == (True, None, 0.5, 2.0)
    # MVC's patch: 64 at a 480 short side, scaled with the training short side, unless given
    assert mvc_settings(cfg) == {"patch_size": round(64 * cfg.data.base_size / 480), "ratio": 0.5, "weight": 2.0}
    assert mvc_settings(printed_config(["--preset", "r50", "--mvc", *data]))["patch_size"] == 64
    assert mvc_settings(printed_config(["--mvc", "--mvc-patch", 8, "--base-size", 64, *data]))["patch_size"] == 8
    assert mvc_settings(printed_config(data)) is None
    # CTVIS in stage 1: on for r50 (4-frame clips), off for tiny unless asked
    r50 = printed_config(["--preset", "r50", *data])
    assert r50.loss.ctvis and r50.stage.frames == 4 and not printed_config(data).loss.ctvis
    assert (
        printed_config(["--ctvis", *data]).loss.ctvis
        and not printed_config(["--preset", "r50", "--no-ctvis", *data]).loss.ctvis
    )
    assert (cfg.train.seed, cfg.train.split) == (7, "val")
    # --lr-steps: the stage's own drops (other stages keep theirs); 1 keeps the LR constant
    cfg = printed_config(["--stage", "semi", "--pseudo", "p", "--lr-steps", "0.5,0.8", "--iters", 10, *data])
    assert cfg.stage.lr_steps == (0.5, 0.8) and vss.engine.lr_milestones(cfg.optim, cfg.stage.lr_steps) == [5, 8]
    assert cfg.stages.segmenter.lr_steps == () and cfg.optim.lr_steps == (0.7, 0.9)
    cfg = printed_config(["--lr-steps", "1", "--iters", 10, *data])
    assert vss.engine.lr_milestones(cfg.optim, cfg.stage.lr_steps) == [10]
    cfg = printed_config(["--stage", "semi", "--pseudo", "p", "--bank-size", 9, "--ema-decay", 0.5, *data])
    assert (cfg.semi.pseudo, cfg.semi.bank_size, cfg.semi.ema_decay, cfg.semi.unsup_weight) == ("p", 9, 0.5, 1.0)
    # without --config/--preset the --init checkpoint's config is the base
    cfg = printed_config(["--stage", "tracker", "--init", straight / "last.pt", *data])
    assert cfg.model.hidden_dim == 32 and cfg.stage.frames == 5 and cfg.optim.batch == 1
    # ... whose LR schedule does not carry into a new video stage (new modules, the preset's base LR)
    fine_tune = load_checkpoint(straight / "last.pt")
    fine_tune["config"]["optim"].update(lr=5e-5, iters=150, lr_steps=[0.5])
    torch.save(fine_tune, tmp_path / "fine_tune.pt")
    for stage in ("tracker", "segmenter", "semi"):
        semi = ["--pseudo", "p"] if stage == "semi" else []
        cfg = printed_config(["--stage", stage, *semi, "--init", tmp_path / "fine_tune.pt", *data])
        schedule = (cfg.optim.lr, cfg.optim.iters, cfg.optim.lr_steps, cfg.optim.batch)
        assert schedule == ((2e-4, 600, (0.7, 0.9), 1) if stage == "tracker" else (5e-5, 150, (0.5,), 1)), stage
    cfg = printed_config(["--stage", "tracker", "--init", tmp_path / "fine_tune.pt", "--lr", 3e-5, *data])
    assert cfg.optim.lr == 3e-5  # a given --lr still wins
    # a tracker checkpoint already holds the tracker: training it further is a fine-tune, schedule kept
    assert printed_config(["--stage", "tracker", "--init", tracker_run[0] / "last.pt", *data]).optim.iters == 4
    # ... but not what its run did: a stage 2 from an MVC run with seed 3 is neither MVC nor seed 3
    mvc_run = load_checkpoint(straight / "last.pt")
    mvc_run["config"]["mvc"]["enabled"], mvc_run["config"]["train"]["seed"] = True, 3
    torch.save(mvc_run, tmp_path / "mvc_run.pt")
    cfg = printed_config(["--stage", "tracker", "--init", tmp_path / "mvc_run.pt", *data])
    assert not cfg.mvc.enabled and cfg.train.seed == 0 and cfg.train.stage == "tracker"
    with pytest.raises(ValueError, match="predicts 2 classes"):
        printed_config(["--init", straight / "last.pt", "--num-classes", 3, *data])


def test_config_json_round_trips_every_setting(tmp_path):
    """config.json (Config.to_json) gives back an equal Config, with every field non-default."""
    cfg = tiny()
    cfg.train.extra, cfg.train.extra_ratio, cfg.mvc.patch_size = ("a:b", "c:d"), 0.25, 12
    cfg.semi.pseudo, cfg.stages.refiner.reverse_prob, cfg.data.crop_size = "p", 0.3, (10, 20)
    path = tmp_path / "config.json"
    path.write_text(cfg.to_json())
    back = Config.from_dict(json.loads(path.read_text()))
    assert back == cfg and back.to_dict() == cfg.to_dict()
    assert type(back.train.extra) is tuple and type(back.data.crop_size) is tuple
    with pytest.raises(ValueError, match="unknown MVCConfig keys"):
        Config.from_dict({**cfg.to_dict(), "mvc": {"enabled": True, "lamda": 1}})


@pytest.mark.parametrize("stage", ["tracker", "refiner"])
def test_video_stages_give_every_trainable_parameter_a_gradient(setup, stage):
    """DDP runs without an unused-parameter search: each step must reach every trainable
    parameter, guided or not."""
    from vss.data import collate_clips

    cfg = Config.from_dict(json.loads(setup["config"].read_text()))
    cfg.model.num_classes = 3
    g = torch.Generator().manual_seed(0)
    items = [
        {
            "frames": torch.randn(3, 3, 32, 32, generator=g),
            "video": "v",
            "frame_names": list("abc"),
            "labels": torch.randint(0, 3, (3, 4, 4), generator=g).repeat_interleave(8, 1).repeat_interleave(8, 2),
        }
        for _ in range(2)
    ]
    for guided in (True, False):
        torch.manual_seed(0)
        cfg.train.stage, cfg.optim.iters = stage, 2
        model, criterion = STAGES[stage].build(cfg, stage)
        model.train()
        terms = STAGES[stage].loss(model, criterion, collate_clips(items), 1 if guided else 2, cfg)
        sum(terms.values()).backward()
        missing = [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]
        assert not missing and all(n.startswith(stage + ".") for n, p in model.named_parameters() if p.requires_grad)


def test_a_checkpoint_of_the_previous_version_resumes_and_training_is_unchanged(tmp_path, capsys):
    """tests/data/legacy_checkpoint_meta.json holds the metadata of a checkpoint saved by train.py
    before the typed per-stage config (step 2 of a 4-step MVC run; config with optim.frames, the
    run settings in "args"). The same command line on today's code, stopped at step 2, its
    checkpoint turned into the old format, then resumed, must end bit for bit where the same run
    without a stop ends; changed settings are refused, leaving them out takes the checkpoint's."""
    meta = json.loads((REPO / "tests" / "data" / "legacy_checkpoint_meta.json").read_text())
    data = render_dataset(tmp_path / "data", num_videos=4, frames=(4, 5), height=32, width=32, num_classes=2, seed=3)
    migrated = Config.from_dict(migrate_config(meta["config"], meta["stage"], meta["args"]))
    assert (migrated.mvc.enabled, migrated.mvc.patch_size, migrated.mvc.ratio) == (True, 8, 0.7)
    assert (migrated.train.seed, migrated.stage.frames, migrated.semi.bank_size) == (3, 2, 4096)
    (tmp_path / "micro.json").write_text(json.dumps(meta["config"]))  # an old-format --config is migrated too
    argv = [
        "--config",
        tmp_path / "micro.json",
        "--data",
        data,
        "--out",
        tmp_path / "run",
        "--workers",
        0,
        "--eval-every",
        0,
        "--mvc",
        "--mvc-patch",
        8,
        "--seed",
        3,
    ]
    assert train_main([*map(str, argv), "--stop-at", "2"]) == 0
    ckpt = load_checkpoint(tmp_path / "run" / "last.pt")
    ckpt.update({"config": meta["config"], "args": meta["args"]})
    torch.save(ckpt, tmp_path / "run" / "last.pt")
    resume = ["--data", data, "--out", tmp_path / "run", "--workers", 0, "--eval-every", 0, "--resume", "auto"]
    assert train_main([*map(str, resume), "--mvc-ratio", "0.5"]) == 2
    assert "different settings (mvc.ratio: 0.7 -> 0.5)" in capsys.readouterr().err
    assert train_main(list(map(str, resume))) == 0
    final = load_checkpoint(tmp_path / "run" / "last.pt")
    assert final["step"] == 4 and final["config"] == migrated.to_dict()
    straight = [*argv[:5], tmp_path / "straight", *argv[6:]]
    assert train_main(list(map(str, straight))) == 0
    reference = load_checkpoint(tmp_path / "straight" / "last.pt")
    assert reference["step"] == 4 and final["model"].keys() == reference["model"].keys()
    for key, value in reference["model"].items():
        assert torch.equal(final["model"][key], value), key


def test_ctvis_stage_one_trains_the_reid_head(setup, straight, tmp_path):
    """--ctvis: stage 1 logs CTVIS's two terms and updates the reid head (frozen without it)."""
    out = tmp_path / "ctvis"
    assert train_main(train_args(setup, out, "--ctvis", "--iters", 2)) == 0
    lines = [x for x in log_lines(out) if "loss" in x]
    assert all(x["loss_reid"] > 0 and x["loss_aux_reid"] > 0 for x in lines)
    reid = lambda ck: {k: v for k, v in ck["model"].items() if ".reid_embed." in k}  # noqa: E731
    plain, trained = reid(load_checkpoint(straight / "last.pt")), reid(load_checkpoint(out / "last.pt"))
    assert plain and all(not torch.equal(plain[k], trained[k]) for k in plain if k.endswith("weight"))
    fresh = load_checkpoint(out / "last.pt")["config"]
    assert fresh["loss"]["ctvis"] is True


def _copy_data(setup, tmp_path) -> Path:
    return Path(shutil.copytree(setup["data"], tmp_path / "data"))


@pytest.mark.parametrize("damage", ["truncated_jpeg", "empty_mask", "empty_frame"])
def test_broken_training_files_are_named(setup, tmp_path, capsys, damage):
    """A truncated JPEG (decoded half grey by cv2.imread, with only a libjpeg warning) or a 0-byte
    frame or mask among the training frames: a named error, exit 2."""
    data = _copy_data(setup, tmp_path)
    for video in read_split(data, "train"):  # every training file, so the first clip meets one
        for frame in (data / "data" / video / "origin").glob("*.jpg"):
            if damage == "truncated_jpeg":
                frame.write_bytes(frame.read_bytes()[:400])
            elif damage == "empty_frame":
                frame.write_bytes(b"")
        for mask in (data / "data" / video / "mask").glob("*.png"):
            if damage == "empty_mask":
                mask.write_bytes(b"")
    argv = train_args(setup, tmp_path / "run", "--iters", 1)
    argv[argv.index("--data") + 1] = str(data)
    capsys.readouterr()
    assert train_main(argv) == 2
    err = capsys.readouterr().err
    expected = {
        "truncated_jpeg": "is a truncated JPEG",
        "empty_frame": "is an empty file",
        "empty_mask": "is an empty file",
    }[damage]
    assert expected in err and str(data) in err and "Traceback" not in err


def test_a_killed_save_leaves_nothing_behind_and_the_log_continues(setup, tmp_path, capsys):
    """SIGKILL during a save leaves a hidden temporary file (as large as a checkpoint): the next start
    removes it. Steps logged after the last checkpoint are logged again on resume, once."""
    out = tmp_path / "run"
    assert train_main(train_args(setup, out, "--stop-at", 2, "--save-every", 2)) == 0
    stale = out / ".last.pt.0badc0de.tmp"
    stale.write_bytes(b"x" * 1000)
    keep = out / ".last.pt.notours.tmp"  # not a name atomic_path makes: left alone
    keep.write_bytes(b"x")
    with open(out / "log.jsonl", "a") as f:  # step 3 ran, then the process was killed before its save
        f.write(json.dumps({"step": 3, "loss": 1.0}) + "\n")
    assert train_main(train_args(setup, out, "--resume", "auto")) == 0
    assert not stale.exists() and keep.exists() and f"removed {stale}" in capsys.readouterr().out
    steps = [x["step"] for x in log_lines(out) if "loss" in x]
    assert steps == [1, 2, 3, 4]


def test_corrupt_last_checkpoint_points_to_best(setup, straight, tmp_path, capsys):
    out = tmp_path / "run"
    shutil.copytree(straight, out)
    assert (out / "best.pt").is_file()
    (out / "last.pt").write_bytes((out / "last.pt").read_bytes()[:5000])
    assert train_main(train_args(setup, out, "--resume", "auto")) == 2
    err = capsys.readouterr().err
    assert "truncated or corrupt" in err and f"--resume {out / 'best.pt'}" in err


@pytest.mark.parametrize("workers", ["-1"])
def test_negative_workers_is_a_usage_error(setup, tmp_path, capsys, workers):
    with pytest.raises(SystemExit) as e:
        train_main(train_args(setup, tmp_path / "x", "--workers", workers))
    assert e.value.code == 2 and "--workers must be >= 0" in capsys.readouterr().err


@pytest.mark.parametrize("steps", ["70", "0.7,0"])
def test_lr_steps_outside_the_schedule_are_a_usage_error(setup, tmp_path, capsys, steps):
    with pytest.raises(SystemExit) as e:
        train_main(train_args(setup, tmp_path / "x", "--lr-steps", steps))
    assert e.value.code == 2 and "--lr-steps must be fractions of the schedule in (0, 1]" in capsys.readouterr().err
