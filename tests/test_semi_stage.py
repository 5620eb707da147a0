"""The semi-supervised stage (vss/semi_stage.py, train.py --stage semi): pseudo-labelled clips
from infer.py's files (labels and entropy aligned through the clip transform), the loss glue
(reliable pixels -> set-loss targets, unreliable pixels -> contrastive negatives, gradients on
every trainable parameter), the EMA teacher across a resume, a student of another stage keeping
its stage, and a 2-rank torchrun run whose ranks hold identical memory banks."""

import contextlib
import json
import os
from pathlib import Path
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # train.py and infer.py are scripts at the repository root

from helpers import script_main, train_args, write_ddp_train_wrapper  # noqa: E402

import evaluate  # noqa: E402
import infer  # noqa: E402
from vss.checkpoint import load_checkpoint  # noqa: E402
from vss.config import Config, DataConfig, tiny  # noqa: E402
from vss.data import apply_clip_transform, collate_clips, sample_clip_transform  # noqa: E402
from vss.engine import make_autocast  # noqa: E402
from vss.io import read_label_png  # noqa: E402
import vss.semi_stage as semi_stage  # noqa: E402
from vss.semi_stage import (  # noqa: E402
    collate_pseudo,
    PseudoLabelClips,
    SemiLoss,
    SemiStudent,
    transform_map,
)
from vss.stages import set_criterion  # noqa: E402
from vss.synthetic import render_dataset  # noqa: E402
from vss.video_model import build_video_model  # noqa: E402

train_main = script_main("train.py")

ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
K = 5


def micro_config() -> Config:
    cfg = tiny()
    m = cfg.model
    m.num_classes = K
    m.resnet_width, m.conv_dim, m.mask_dim, m.hidden_dim = 16, 64, 64, 32
    m.enc_layers, m.enc_ffn_dim, m.enc_heads = 1, 64, 2
    m.num_queries, m.nheads, m.dim_feedforward, m.dec_layers = 10, 2, 64, 3
    m.video_ffn_dim, m.tracker_layers = 64, 2
    cfg.loss.num_points = 64
    cfg.data.base_size, cfg.data.min_scale, cfg.data.max_scale = 32, 1.0, 1.0
    cfg.data.crop_size, cfg.data.test_size = (32, 32), 32
    cfg.optim.batch, cfg.optim.iters = 1, 3
    cfg.stages.segmenter.frames = cfg.stages.semi.frames = cfg.stages.tracker.frames = 2
    return cfg


def semi_args(setup, out, init, *extra) -> list[str]:
    return train_args(
        setup,
        out,
        "--stage",
        "semi",
        "--init",
        init,
        "--pseudo",
        setup["pseudo"],
        "--unlabeled-split",
        "unlabeled",
        *extra,
    )


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """Micro dataset (train / val / unlabeled), two segmenters A and B, a tracker on A, and the
    pseudo labels of the unlabelled split by `infer.py --ensemble A B --tta --save-probs`."""
    base = tmp_path_factory.mktemp("semi")
    data = render_dataset(
        base / "data",
        num_videos=6,
        frames=(5, 6),
        height=32,
        width=32,
        num_classes=K,
        seed=5,
        splits={"train": 2, "val": 1, "unlabeled": 3},
    )
    (base / "micro.json").write_text(micro_config().to_json())
    setup = {"base": base, "data": data, "config": base / "micro.json", "pseudo": base / "pseudo"}
    for name, seed in (("a", 0), ("b", 1)):
        assert train_main(train_args(setup, base / name, "--iters", 2, "--seed", seed)) == 0
    assert (
        train_main(
            train_args(
                setup, base / "trk", "--stage", "tracker", "--init", base / "a" / "last.pt", "--iters", 1, "--frames", 2
            )
        )
        == 0
    )
    res = subprocess.run(
        [
            sys.executable,
            "infer.py",
            "--ensemble",
            str(base / "a" / "last.pt"),
            str(base / "b" / "last.pt"),
            "--tta",
            "--tta-scales",
            "1.0,1.25",
            "--tta-merge",
            "mean",
            "--save-probs",
            "--data",
            str(data),
            "--split",
            "unlabeled",
            "--out",
            str(setup["pseudo"]),
            "--no-progress",
        ],
        cwd=REPO,
        env=ENV,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert res.returncode == 0, res.stderr[-3000:]
    return setup


# --------------------------------------------------------------------------------------------
# Data
# --------------------------------------------------------------------------------------------


def test_transform_map_follows_the_label_geometry():
    cfg = DataConfig(base_size=40, min_scale=0.5, max_scale=2.0, crop_size=(48, 56), color_jitter=0.0)
    gen = np.random.default_rng(0)
    codes = gen.integers(0, 255, size=(3, 30, 50), dtype=np.uint8)  # (T,H,W), no 255
    frames = gen.integers(0, 256, size=(3, 30, 50, 3), dtype=np.uint8)
    flips = set()
    for seed in range(12):
        tf = sample_clip_transform(np.random.default_rng(seed), (30, 50), cfg)
        flips.add(tf.flip)
        _, labels = apply_clip_transform(frames, codes, tf, cfg)  # (T,h,w), 255 on padding
        maps = transform_map(codes.astype(np.float32), tf, fill=-1.0)
        inside = labels != 255
        assert torch.equal(maps[inside], labels[inside].float())
        assert bool((maps[~inside] == -1).all())
    assert flips == {True, False}


def test_pseudo_label_clips_pair_frames_with_their_files(setup):
    cfg = DataConfig(base_size=32, min_scale=1.0, max_scale=1.0, crop_size=(32, 32), color_jitter=0.0)
    clips = PseudoLabelClips(setup["data"], "unlabeled", setup["pseudo"], num_frames=3, cfg=cfg, num_classes=K)
    assert len(clips) == 3
    for i in range(6):
        item = clips.load_clip(i, np.random.default_rng(i))
        assert item["frames"].shape == (3, 3, 32, 32) and item["entropy"].dtype == torch.float32
        vdir = setup["pseudo"] / item["video"]
        for t, stem in enumerate(item["frame_names"]):
            lab = torch.from_numpy(read_label_png(vdir / f"{stem}.png")).long()
            ent = torch.from_numpy(np.load(vdir / f"{stem}.entropy.npy").astype(np.float32))
            pairs = [(lab, ent), (lab.flip(-1), ent.flip(-1))]  # the clip may be mirrored
            assert any(torch.equal(item["labels"][t], a) and torch.equal(item["entropy"][t], b) for a, b in pairs)
    batch = collate_pseudo([clips.load_clip(0, np.random.default_rng(0)), clips.load_clip(1, np.random.default_rng(1))])
    assert batch["entropy"].shape == batch["labels"].shape == (2, 3, 32, 32)


def test_missing_pseudo_labels_name_the_file(setup, tmp_path):
    pseudo = tmp_path / "p"
    for video in (setup["pseudo"]).iterdir():
        if video.is_dir():
            (pseudo / video.name).mkdir(parents=True)
    with pytest.raises(FileNotFoundError, match=r"\.png|entropy\.npy"):
        PseudoLabelClips(setup["data"], "unlabeled", pseudo, num_frames=2, cfg=DataConfig(), num_classes=K)


# --------------------------------------------------------------------------------------------
# Loss glue
# --------------------------------------------------------------------------------------------


def test_semi_loss_cutmix_pastes_one_box_per_clip_into_every_frame(monkeypatch):
    """cutmix=True: the student (and the EMA teacher) see unlabelled clips with a box of the next
    clip pasted in, the same box in all frames; the pseudo-label targets and entropies follow it."""
    torch.manual_seed(0)
    cfg = micro_config()
    student = SemiStudent(build_video_model(cfg, "segmenter"), cfg.model.mask_dim)
    loss = SemiLoss(set_criterion(cfg), student, K, queue_size=50, drop_base=100.0, cutmix=True)
    g = torch.Generator().manual_seed(1)
    labels_l = torch.randint(0, K, (1, 2, 32, 32), generator=g)
    labelled = collate_clips(
        [
            {
                "frames": torch.randn(2, 3, 32, 32, generator=g),
                "labels": labels_l[0],
                "video": "l",
                "frame_names": ["0", "1"],
            }
        ]
    )
    labels_u = torch.stack([torch.full((2, 32, 32), 1), torch.full((2, 32, 32), 3)])  # (Bu=2,T,H,W), one class a clip
    frames_u = torch.stack([torch.full((2, 3, 32, 32), 1.0), torch.full((2, 3, 32, 32), -1.0)])
    unlabelled = {"frames": frames_u, "labels": labels_u, "entropy": torch.rand(2, 2, 32, 32, generator=g)}
    seen_images, seen_targets = [], []
    real_forward, criterion_forward = student.forward, loss.criterion.forward
    monkeypatch.setattr(student, "forward", lambda images: seen_images.append(images) or real_forward(images))
    monkeypatch.setattr(
        loss.criterion, "forward", lambda o, t, i=None: seen_targets.append(t) or criterion_forward(o, t, i)
    )
    loss(student, labelled, unlabelled, progress=0.0)
    mixed = seen_images[0][2:].view(2, 2, 3, 32, 32)  # the unlabelled frames the student saw
    for b in range(2):
        pasted = mixed[b, 0, 0] != frames_u[b, 0, 0]  # (H,W) where the next clip shows
        assert 0.3 < pasted.float().mean() < 0.7  # about half the area, one rectangle
        rows, cols = pasted.any(1).nonzero()[:, 0], pasted.any(0).nonzero()[:, 0]
        assert bool(pasted[rows.min() : rows.max() + 1, cols.min() : cols.max() + 1].all())
        assert torch.equal(mixed[b, 1], mixed[b, 0])  # the same box in every frame
        for t in range(2):
            target = seen_targets[1][2 * b + t]  # the pseudo-label targets of frame t of clip b
            by_class = dict(zip(target["labels"].tolist(), target["masks"]))
            valid = target["valid"]  # reliable pixels: all but the highest-entropy one(s) at drop 100
            assert valid.float().mean() > 0.99
            assert torch.equal(by_class[int(labels_u[1 - b, 0, 0, 0])], pasted & valid)
            assert torch.equal(by_class[int(labels_u[b, 0, 0, 0])], ~pasted & valid)


def micro_batches(seed: int = 1) -> tuple[dict, dict]:
    """(labelled, unlabelled) micro-batches of one 2-frame 32x32 clip each, labels in 8x8 blocks."""
    g = torch.Generator().manual_seed(seed)
    labels_l = torch.randint(0, K, (1, 2, 4, 4), generator=g).repeat_interleave(8, 2).repeat_interleave(8, 3)
    labels_u = torch.randint(0, K, (1, 2, 4, 4), generator=g).repeat_interleave(8, 2).repeat_interleave(8, 3)
    entropy_u = torch.rand(1, 2, 32, 32, generator=g)
    clip = {
        "frames": torch.randn(2, 3, 32, 32, generator=g),
        "labels": labels_l[0],
        "video": "l",
        "frame_names": ["0", "1"],
    }
    unlabelled = {"frames": torch.randn(1, 2, 3, 32, 32, generator=g), "labels": labels_u, "entropy": entropy_u}
    return collate_clips([clip]), unlabelled


def test_semi_loss_splits_reliable_and_unreliable_pixels(monkeypatch):
    torch.manual_seed(0)
    cfg = micro_config()
    student = SemiStudent(build_video_model(cfg, "segmenter"), cfg.model.mask_dim)
    loss = SemiLoss(set_criterion(cfg), student, K, unsup_weight=1.0, contrastive_weight=0.1, queue_size=50)
    labelled, unlabelled = micro_batches()
    labels_u, entropy_u = unlabelled["labels"], unlabelled["entropy"]

    seen_targets, seen_contra = [], {}
    criterion_forward = loss.criterion.forward

    def spy_criterion(outputs, targets, indices=None):
        seen_targets.append(targets)
        return criterion_forward(outputs, targets, indices)

    def spy_contra(*args, **kwargs):
        seen_contra.update(args=args, kwargs=kwargs)
        return real_contra(*args, **kwargs)

    real_contra = semi_stage.compute_contra_memobank_loss
    monkeypatch.setattr(loss.criterion, "forward", spy_criterion)
    monkeypatch.setattr(semi_stage, "compute_contra_memobank_loss", spy_contra)
    student.train()
    terms = loss(student, labelled, unlabelled, progress=0.0)
    assert {"loss_ce", "loss_dice_0", "unsup_loss_ce", "unsup_loss_mask_2", "loss_contra"} <= set(terms)

    # L_u targets: the 80 % lowest-entropy pixels of the micro-batch (one numpy percentile)
    thresh = np.percentile(entropy_u.numpy().ravel(), 80)
    dropped = entropy_u[0] >= thresh  # (T,H,W)
    gt_targets, pseudo_targets = seen_targets
    for t in range(2):
        covered = pseudo_targets[t]["masks"].any(0)
        assert torch.equal(covered, ~dropped[t])
        for cls, mask in zip(pseudo_targets[t]["labels"], pseudo_targets[t]["masks"]):
            assert torch.equal(mask, (labels_u[0, t] == cls) & ~dropped[t])
        # unreliable pixels are ignored by the mask losses (U2PL), ground truth has no ignore map
        assert torch.equal(pseudo_targets[t]["valid"], ~dropped[t])
        assert "valid" not in gt_targets[t]
        assert torch.equal(gt_targets[t]["masks"].any(0), torch.ones(32, 32, dtype=torch.bool))

    # L_c: negatives (high mask) of the unlabelled frames = exactly the dropped pixels, anchors
    # (low mask) = the 20 % lowest-entropy ones; labelled frames: every valid pixel; paper flags
    args, kwargs = seen_contra["args"], seen_contra["kwargs"]
    rep, label_l, label_u, prob_l, prob_u, low, high = args[:7]
    small = lambda m: F.interpolate(m[:, None].float(), size=(8, 8), mode="nearest")  # noqa: E731
    assert torch.equal(high[2:], small(dropped))
    assert torch.equal(low[2:], small(entropy_u[0] <= np.percentile(entropy_u.numpy().ravel(), 20)))
    assert bool((high[:2] == 1).all()) and bool((low[:2] == 1).all())
    assert torch.equal(label_u, F.one_hot(small(labels_u[0])[:, 0].long(), K).permute(0, 3, 1, 2))
    assert rep.shape == (4, 256, 8, 8)
    assert torch.allclose(torch.cat([prob_l, prob_u]).sum(1), torch.ones(4, 8, 8))
    assert kwargs == {"official_pairing": False, "paper_negatives": True}
    assert sum(loss.memory_bank.lengths()) > 0

    # every trainable parameter gets a gradient (DDP without an unused-parameter search)
    sum(terms.values()).backward()
    missing = [n for n, p in student.named_parameters() if p.requires_grad and p.grad is None]
    assert not missing, missing[:5]
    reid = student.model.segmenter.transformer_decoder.reid_embed  # no reid loss here: frozen
    assert not any(p.requires_grad for p in reid.parameters())


def test_semi_loss_under_bf16_autocast_follows_fp32():
    """The headline trains the semi stage under bf16 autocast (camvid.py --amp bf16): the networks
    do run in bf16 there, yet every loss term stays a finite fp32 value near its fp32-run value
    (same weights, batch and sampled points), the contrastive loss and memory bank included, and
    every trainable parameter gets a gradient."""
    torch.manual_seed(0)
    cfg = micro_config()
    student = SemiStudent(build_video_model(cfg, "segmenter"), cfg.model.mask_dim)
    labelled, unlabelled = micro_batches()
    student.train()
    conv_dtypes = []
    student.model.segmenter.backbone.register_forward_hook(lambda m, i, out: conv_dtypes.append(out["res2"].dtype))
    terms, banks = {}, {}
    for mode, ctx in (("fp32", contextlib.nullcontext), ("bf16", make_autocast("cpu", "bf16")[0])):
        loss = SemiLoss(set_criterion(cfg), student, K, unsup_weight=1.0, contrastive_weight=0.1, queue_size=50)
        torch.manual_seed(1)  # the same sampled points and contrastive anchors in both modes
        conv_dtypes.clear()
        with ctx():
            terms[mode] = loss(student, labelled, unlabelled, progress=0.0)
        assert set(conv_dtypes) == {torch.bfloat16 if mode == "bf16" else torch.float32}, (mode, conv_dtypes)
        banks[mode] = loss.memory_bank
    student.zero_grad(set_to_none=True)
    sum(terms["bf16"].values()).backward()
    for name, value in terms["fp32"].items():
        low = terms["bf16"][name]
        assert low.dtype == torch.float32 and torch.isfinite(low), name
        # per term 10%: with random weights the queries' matching costs nearly tie, so rounding
        # can swap a pair of matches in one decoder layer (measured: up to 8% on one term)
        assert abs(low.item() - value.item()) <= 0.1 * abs(value.item()), (name, low.item(), value.item())
    total = {mode: sum(t.item() for t in terms[mode].values()) for mode in terms}
    assert abs(total["bf16"] - total["fp32"]) <= 0.03 * total["fp32"], total
    assert banks["bf16"].lengths() == banks["fp32"].lengths()
    missing = [n for n, p in student.named_parameters() if p.requires_grad and p.grad is None]
    assert not missing, missing[:5]


# --------------------------------------------------------------------------------------------
# train.py --stage semi
# --------------------------------------------------------------------------------------------


def _teacher(ck: dict, prefix: str) -> dict:
    return {k[len(prefix) + 1 :]: v for k, v in ck["semi_state"]["teacher"].items() if k.startswith(prefix + ".")}


def _params(ck: dict) -> set[str]:
    cfg = Config.from_dict(ck["config"])
    student = SemiStudent(build_video_model(cfg, ck["stage"]), cfg.model.mask_dim)
    return {n for n, _ in student.model.segmenter.named_parameters()}


@pytest.fixture(scope="module")
def semi_runs(setup):
    """From A: 2 steps straight (evaluated), and 1 step + resume for 1 more (iters 3)."""
    base, init = setup["base"], setup["base"] / "a" / "last.pt"
    assert train_main(semi_args(setup, base / "s_straight", init, "--stop-at", 2, "--eval-every", 2)) == 0
    assert train_main(semi_args(setup, base / "s_split", init, "--stop-at", 1)) == 0
    first = load_checkpoint(base / "s_split" / "last.pt")
    # an explicit --bank-size equal to the tiny preset's default is the same setting
    assert (
        train_main(
            semi_args(
                setup, base / "s_split", init, "--stop-at", 2, "--resume", "auto", "--bank-size", tiny().semi.bank_size
            )
        )
        == 0
    )
    return {
        "first": first,
        "straight": load_checkpoint(base / "s_straight" / "last.pt"),
        "resumed": load_checkpoint(base / "s_split" / "last.pt"),
        "out": base / "s_straight",
    }


def test_semi_checkpoint_keeps_the_student_stage_and_fills_the_bank(semi_runs, setup, tmp_path):
    ck = semi_runs["straight"]
    assert ck["stage"] == "segmenter" and ck["semi"] is True and ck["step"] == 2
    assert {"teacher", "rep_head", "memory_bank"} <= set(ck["semi_state"])
    assert sum(q.shape[0] for q in ck["semi_state"]["memory_bank"]["queues"]) > 0
    # the tiny preset's bank size (not U2PL's 30000), and only the filled rows are saved
    bank = ck["semi_state"]["memory_bank"]
    assert bank["sizes"].tolist() == [tiny().semi.bank_size] * K
    assert all(q.shape[0] <= tiny().semi.bank_size for q in bank["queues"])
    member = infer.load_member(semi_runs["out"] / "last.pt", torch.device("cpu"), None)
    assert member.stage == "segmenter"
    lines = [json.loads(x) for x in (semi_runs["out"] / "log.jsonl").read_text().splitlines()]
    train_lines = [x for x in lines if "loss" in x]
    assert len(train_lines) == 2
    assert all(x["bank_keys"] > 0 and "unsup_loss_ce" in x and "loss_contra" in x for x in train_lines)
    # predict_video of the student's VideoModel: the same figures as infer.py on best.pt (saved
    # right after that validation) scored by evaluate.py (integer counts: equal, not close)
    (val,) = [x["val"] for x in lines if "val" in x]
    assert (
        infer.main(
            [
                "--checkpoint",
                str(semi_runs["out"] / "best.pt"),
                "--data",
                str(setup["data"]),
                "--split",
                "val",
                "--out",
                str(tmp_path / "pred"),
                "--device",
                "cpu",
                "--no-progress",
            ]
        )
        == 0
    )
    assert (
        evaluate.main(
            [
                "--pred",
                str(tmp_path / "pred"),
                "--gt",
                str(setup["data"]),
                "--split",
                "val",
                "--json",
                str(tmp_path / "eval.json"),
                "--no-progress",
            ]
        )
        == 0
    )
    summary = json.loads((tmp_path / "eval.json").read_text())
    assert {"mIoU", "VC8"} <= set(val) and val == {k: summary[k] for k in val}, (val, summary)
    assert ck["best_miou"] == val["mIoU"]
    assert ck["class_names"] == json.loads((setup["data"] / "classes.json").read_text())["classes"]


def test_teacher_starts_as_the_student_then_follows_the_ema(semi_runs):
    first, second = semi_runs["first"], semi_runs["resumed"]
    params = _params(first)
    t1, t2 = _teacher(first, "segmenter"), _teacher(second, "segmenter")
    s1 = {k[len("segmenter.") :]: v for k, v in first["model"].items() if k.startswith("segmenter.")}
    s2 = {k[len("segmenter.") :]: v for k, v in second["model"].items() if k.startswith("segmenter.")}
    # step 1: decay ema_decay(0) = 0, the teacher is the updated student
    assert all(torch.equal(t1[k], s1[k]) for k in params)
    # step 2: decay ema_decay(1) = 0.5
    assert all(torch.allclose(t2[k], 0.5 * t1[k] + 0.5 * s2[k], atol=1e-7) for k in params)
    changed = [k for k in params if not torch.equal(t2[k], t1[k])]
    assert changed
    r1, r2 = _teacher(first, "rep_head"), _teacher(second, "rep_head")
    h2 = second["semi_state"]["rep_head"]
    assert all(
        torch.allclose(r2[k], 0.5 * r1[k] + 0.5 * h2[k], atol=1e-7)
        for k in h2
        if "running" not in k and "num_batches" not in k
    )


def test_semi_resume_rejects_another_bank_size(semi_runs, setup, capsys):
    out = setup["base"] / "s_split"
    argv = semi_args(
        setup, out, setup["base"] / "a" / "last.pt", "--resume", "auto", "--bank-size", tiny().semi.bank_size + 1
    )
    assert train_main(argv) == 2
    assert "different settings (semi.bank_size: 4096 -> 4097)" in capsys.readouterr().err


def test_semi_resume_is_exact(semi_runs):
    a, b = semi_runs["straight"], semi_runs["resumed"]
    for key in a["model"]:
        assert torch.equal(a["model"][key], b["model"][key]), key
    for part in ("teacher", "rep_head"):
        for key, value in a["semi_state"][part].items():
            assert torch.equal(value, b["semi_state"][part][key]), (part, key)
    qa, qb = a["semi_state"]["memory_bank"]["queues"], b["semi_state"]["memory_bank"]["queues"]
    assert all(torch.equal(x, y) for x, y in zip(qa, qb))


def test_semi_from_a_tracker_keeps_the_tracker_frozen(setup, tmp_path):
    init = setup["base"] / "trk" / "last.pt"
    out = tmp_path / "semi_trk"
    assert train_main(semi_args(setup, out, init, "--iters", 1)) == 0
    before, after = load_checkpoint(init), load_checkpoint(out / "last.pt")
    assert after["stage"] == "tracker" and after["semi"] is True
    tracker = [k for k in before["model"] if k.startswith("tracker.")]
    assert tracker and all(torch.equal(before["model"][k], after["model"][k]) for k in tracker)
    assert any(
        not torch.equal(before["model"][k], after["model"][k])
        for k in before["model"]
        if k.startswith("segmenter.transformer_decoder.class_embed")
    )
    assert infer.load_member(out / "last.pt", torch.device("cpu"), None).stage == "tracker"


def test_semi_flag_errors(setup, tmp_path, capsys):
    with pytest.raises(SystemExit):
        train_main(train_args(setup, tmp_path / "a", "--stage", "semi", "--init", "x.pt"))
    assert "--pseudo" in capsys.readouterr().err
    init = setup["base"] / "a" / "last.pt"
    assert (
        train_main(semi_args(setup, tmp_path / "b", init, "--unlabeled-split", "val", "--pseudo", tmp_path / "nothing"))
        == 2
    )
    assert "nothing" in capsys.readouterr().err


# --------------------------------------------------------------------------------------------
# DDP
# --------------------------------------------------------------------------------------------


def test_two_rank_semi_run_gathers_the_memory_bank(setup, tmp_path):
    wrapper = write_ddp_train_wrapper(tmp_path / "wrapper.py")
    out = tmp_path / "ddp"
    argv = semi_args(setup, out, setup["base"] / "a" / "last.pt", "--iters", 2)
    res = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(wrapper), *argv],
        cwd=REPO,
        env=ENV,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert res.returncode == 0, res.stderr[-3000:]
    r0, r1 = load_checkpoint(out / "last.pt.rank0"), load_checkpoint(out / "last.pt.rank1")
    assert r0["step"] == r1["step"] == 2 and len(r0["rng"]) == 2
    q0, q1 = r0["semi_state"]["memory_bank"]["queues"], r1["semi_state"]["memory_bank"]["queues"]
    assert sum(q.shape[0] for q in q0) > 0
    assert all(torch.equal(a, b) for a, b in zip(q0, q1))  # gathered: both ranks hold the same keys
    for key in r0["model"]:
        assert torch.equal(r0["model"][key], r1["model"][key]), key
    for key, value in r0["semi_state"]["teacher"].items():
        if "running_" not in key and "num_batches" not in key:  # teacher BN stats are per rank
            assert torch.equal(value, r1["semi_state"]["teacher"][key]), key
