"""vss.engine: DVIS++ optimiser groups, multi-step schedule, AMP contexts, and the training step
(unscale before clipping, skipped-step accounting, non-finite losses stop every rank)."""

import math
import os

import numpy as np
import pytest
import torch
from torch import nn
import torch.distributed as dist
import torch.multiprocessing as mp

from vss import distributed as vd
from vss.checkpoint import load_checkpoint, save_checkpoint
from vss.config import DataConfig, OptimConfig
from vss.data import normalize
from vss.engine import (
    build_optimizer,
    build_scheduler,
    evaluate_model,
    lr_milestones,
    make_autocast,
    NonFiniteLossError,
    param_groups,
    resize_short_side,
    train_step,
)
from vss.io import iter_eval_videos, read_frame, read_label_png, shift_labels
from vss.metrics import merge, summarize, VideoStats
from vss.synthetic import render_dataset


class LayerNorm2d(nn.Module):
    """Stand-in for a custom channels-first norm (counted as a norm by its class name)."""

    def __init__(self, c):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(c))
        self.bias = nn.Parameter(torch.zeros(c))

    def forward(self, x):
        return nn.functional.layer_norm(x.permute(0, 2, 3, 1), x.shape[1:2], self.weight, self.bias).permute(0, 3, 1, 2)


class Backbone(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)
        self.ln = LayerNorm2d(4)
        self.frozen = nn.Parameter(torch.ones(2), requires_grad=False)

    def forward(self, x):
        return self.ln(self.bn(self.conv(x)))


class Toy(nn.Module):
    def __init__(self):
        super().__init__()
        self.backbone = Backbone()
        self.proj = nn.Linear(4, 6)
        self.norm = nn.LayerNorm(6)
        self.gn = nn.GroupNorm(2, 6)
        self.query_feat = nn.Embedding(3, 6)
        self.head = nn.Linear(6, 2)
        self.tied = self.head  # shared module: its parameters must appear once

    def forward(self, x):
        f = self.backbone(x).mean(dim=(2, 3))  # (N,4)
        q = self.norm(self.proj(f)) + self.query_feat.weight.mean(0)  # (N,6)
        q = self.gn(q.unsqueeze(-1)).squeeze(-1)
        return self.head(q)


def test_param_groups_follow_dvis_rules():
    model = Toy()
    cfg = OptimConfig(lr=1e-4, weight_decay=0.05, backbone_lr_mult=0.1)
    groups = {g["name"]: g for g in param_groups(model, cfg)}
    ids = {name: {id(p) for p in g["params"]} for name, g in groups.items()}
    b = model.backbone
    assert ids["backbone"] == {id(b.conv.weight), id(b.conv.bias)}
    assert ids["backbone_no_wd"] == {id(p) for p in (b.bn.weight, b.bn.bias, b.ln.weight, b.ln.bias)}
    assert ids["head"] == {
        id(p) for p in (model.proj.weight, model.proj.bias, model.head.weight, model.head.bias)
    }  # biases keep weight decay
    assert ids["head_no_wd"] == {
        id(p) for p in (model.norm.weight, model.norm.bias, model.gn.weight, model.gn.bias, model.query_feat.weight)
    }
    assert sum(len(g["params"]) for g in groups.values()) == sum(
        p.requires_grad for p in model.parameters()
    )  # frozen left out, shared once
    assert groups["backbone"]["lr"] == pytest.approx(1e-5) and groups["head"]["lr"] == 1e-4
    assert groups["backbone"]["weight_decay"] == 0.05 and groups["head"]["weight_decay"] == 0.05
    assert groups["backbone_no_wd"]["weight_decay"] == 0.0 and groups["head_no_wd"]["weight_decay"] == 0.0
    assert groups["backbone_no_wd"]["lr"] == pytest.approx(1e-5)
    opt = build_optimizer(model, cfg)
    assert isinstance(opt, torch.optim.AdamW) and len(opt.param_groups) == 4


def test_multistep_schedule_and_state_round_trip(tmp_path):
    cfg = OptimConfig(lr=1.0, iters=100, lr_steps=(0.7, 0.9))
    assert lr_milestones(cfg) == [70, 90]
    param = nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([{"params": [param], "lr": 1.0}, {"params": [], "lr": 0.1}])
    sched = build_scheduler(opt, cfg)
    lrs = []
    for _ in range(100):
        lrs.append((opt.param_groups[0]["lr"], opt.param_groups[1]["lr"]))
        opt.step()
        sched.step()
        if len(lrs) == 50:
            save_checkpoint(tmp_path / "s.pt", {"sched": sched.state_dict(), "opt": opt.state_dict()})
    expected = [1.0] * 70 + [0.1] * 20 + [0.01] * 10
    assert [a for a, _ in lrs] == pytest.approx(expected)
    assert [b for _, b in lrs] == pytest.approx([0.1 * e for e in expected])
    # Resume at step 50 from a weights_only checkpoint: the same LRs follow.
    state = load_checkpoint(tmp_path / "s.pt")
    opt2 = torch.optim.SGD([{"params": [param], "lr": 1.0}, {"params": [], "lr": 0.1}])
    sched2 = build_scheduler(opt2, cfg)
    opt2.load_state_dict(state["opt"])
    sched2.load_state_dict(state["sched"])
    resumed = []
    for _ in range(50):
        resumed.append(opt2.param_groups[0]["lr"])
        opt2.step()
        sched2.step()
    assert resumed == pytest.approx(expected[50:])
    with pytest.raises(ValueError, match="lr_steps"):
        lr_milestones(OptimConfig(lr_steps=(70,)))


def _toy_batch():
    g = torch.Generator().manual_seed(0)
    return torch.randn(4, 3, 8, 8, generator=g), torch.randint(0, 2, (4,), generator=g)


def _loss_fn(model, batch):
    x, y = batch
    logits = model(x)
    return {"loss_ce": nn.functional.cross_entropy(logits, y), "loss_reg": 0.1 * logits.pow(2).mean()}


def _params(model):
    return [p.detach().clone() for p in model.parameters()]


def test_scaler_unscales_before_clipping_and_counts_skips():
    torch.manual_seed(0)
    plain, scaled = Toy(), Toy()
    scaled.load_state_dict(plain.state_dict())
    # SGD: unlike Adam its update is not scale invariant, so clipping scaled grads would show.
    opt_p = torch.optim.SGD(plain.parameters(), lr=0.1)
    opt_s = torch.optim.SGD(scaled.parameters(), lr=0.1)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
    batch = _toy_batch()

    # Reference grad norm of the first step, measured by hand.
    terms = _loss_fn(plain, batch)
    sum(terms.values()).backward()
    manual = torch.sqrt(sum(p.grad.pow(2).sum() for p in plain.parameters() if p.grad is not None))
    out_p = train_step(plain, [batch], _loss_fn, opt_p, None, None, clip=0.01)
    out_s = train_step(scaled, [batch], _loss_fn, opt_s, scaler, None, clip=0.01)
    assert out_p["grad_norm"] == pytest.approx(manual.item(), rel=1e-5)
    assert out_s["grad_norm"] == pytest.approx(manual.item(), rel=1e-5)  # unscaled
    assert not out_s["skipped"] and scaler.get_scale() == 2.0**10
    for a, b in zip(_params(plain), _params(scaled)):
        assert torch.allclose(a, b, atol=1e-6)
    assert out_s["loss"] == pytest.approx(out_s["loss_ce"] + out_s["loss_reg"])

    # An inf gradient: the step is skipped, nothing moves, the scale halves.
    before = _params(scaled)
    hook = scaled.head.weight.register_hook(lambda g: torch.full_like(g, math.inf))
    out = train_step(scaled, [batch], _loss_fn, opt_s, scaler, None, clip=0.01)
    hook.remove()
    assert out["skipped"] and not math.isfinite(out["grad_norm"])
    assert scaler.get_scale() == 2.0**9
    assert all(torch.equal(a, b) for a, b in zip(before, _params(scaled)))
    out = train_step(scaled, [batch], _loss_fn, opt_s, scaler, None, clip=0.01)
    assert not out["skipped"]
    assert not all(torch.equal(a, b) for a, b in zip(before, _params(scaled)))


def test_micro_batches_accumulate_to_the_full_batch_update():
    torch.manual_seed(0)
    full, accum = Toy().eval(), Toy().eval()  # eval: BatchNorm uses running stats, no batch coupling
    accum.load_state_dict(full.state_dict())
    opt_f = torch.optim.SGD(full.parameters(), lr=0.5)
    opt_a = torch.optim.SGD(accum.parameters(), lr=0.5)
    x, y = _toy_batch()
    out_f = train_step(full, [(x, y)], _loss_fn, opt_f, None, None, clip=0.05)
    out_a = train_step(accum, [(x[:2], y[:2]), (x[2:], y[2:])], _loss_fn, opt_a, None, None, clip=0.05)
    assert out_a["grad_norm"] == pytest.approx(out_f["grad_norm"], rel=1e-5)
    assert out_a["loss"] == pytest.approx(out_f["loss"], rel=1e-5)
    for a, b in zip(_params(full), _params(accum)):
        assert torch.allclose(a, b, atol=1e-6)
    with pytest.raises(ValueError, match="micro-batch"):
        train_step(full, [], _loss_fn, opt_f, None, None, clip=0.05)


def test_inf_gradient_without_scaler_skips_and_nan_loss_raises():
    model = Toy()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    sched = build_scheduler(opt, OptimConfig(iters=10))
    before = _params(model)
    hook = model.proj.bias.register_hook(lambda g: torch.full_like(g, math.nan))
    out = train_step(model, [_toy_batch()], _loss_fn, opt, None, sched, clip=1.0)
    hook.remove()
    assert out["skipped"] and sched.last_epoch == 1  # the schedule counts the iteration
    assert all(torch.equal(a, b) for a, b in zip(before, _params(model)))

    def nan_loss(model, batch):
        terms = _loss_fn(model, batch)
        terms["loss_dice"] = torch.tensor(math.nan)
        return terms

    with pytest.raises(NonFiniteLossError, match="loss_dice"):
        train_step(model, [_toy_batch()], nan_loss, opt, None, sched, clip=1.0)
    assert all(torch.equal(a, b) for a, b in zip(before, _params(model)))


def test_autocast_modes():
    ctx, scaler = make_autocast("cpu", "bf16")
    assert scaler is None
    layer = nn.Linear(4, 4)
    with ctx():
        assert layer(torch.randn(2, 4)).dtype == torch.bfloat16
    model = Toy()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    out = train_step(model, [_toy_batch()], _loss_fn, opt, None, None, clip=0.01, autocast_ctx=ctx)
    assert math.isfinite(out["loss"]) and not out["skipped"]
    ctx, scaler = make_autocast(torch.device("cpu"), "fp16")
    assert isinstance(scaler, torch.amp.GradScaler)
    with ctx():
        assert layer(torch.randn(2, 4)).dtype == torch.float16
    ctx, scaler = make_autocast("cpu", "off")
    assert scaler is None
    with ctx():
        assert layer(torch.randn(2, 4)).dtype == torch.float32
    with pytest.raises(ValueError, match="amp mode"):
        make_autocast("cpu", "fp8")


def _predict(frames: torch.Tensor, out_size) -> torch.Tensor:
    """A deterministic stand-in model: class = quantised red channel, at the original size."""
    labels = (frames[:, 0] > -0.5).long() + (frames[:, 0] > 0.8).long()  # (T,h,w) in 0..2
    return nn.functional.interpolate(labels[:, None].float(), size=tuple(out_size), mode="nearest")[:, 0].long()


def _reference_metrics(root) -> dict:
    """The figures straight from vss.metrics, one process, no sharding."""
    cfg = DataConfig(test_size=20)
    videos = list(iter_eval_videos(root, "val"))
    stats = []
    for video in videos:
        images = np.stack([read_frame(p) for p in video.frames])
        frames = normalize(resize_short_side(images, cfg.test_size), cfg)
        pred = _predict(frames, images.shape[1:3]).numpy().astype(np.uint8)
        vs = VideoStats(3, (2, 4), name=video.name)
        for t, m in enumerate(video.masks):
            vs.update(shift_labels(read_label_png(m)), pred[t])
        stats.append(vs.finish())
    return summarize(merge(stats))


def _nan_step(rank: int) -> str:
    """One DDP step with a NaN on rank 1 only; the error text (the DDP wrapper is freed on return,
    before the process group is destroyed, as train.py's)."""
    torch.manual_seed(0)
    model = nn.parallel.DistributedDataParallel(Toy())
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)

    def loss_fn(model, batch):
        terms = _loss_fn(model, batch)
        if rank == 1:
            terms["loss_ce"] = terms["loss_ce"] * math.nan
        return terms

    try:
        train_step(model, [_toy_batch()], loss_fn, opt, None, None, clip=1.0)
        return "no error"
    except NonFiniteLossError as e:
        return str(e)


def _two_rank_worker(rank: int, world: int, store: str, out_dir: str, data_root: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    vd.init_distributed("cpu")
    try:
        # 1. a NaN on rank 1 only stops both ranks (no hang in the gradient all-reduce)
        result = _nan_step(rank)
        # 2. distributed evaluation: each rank its share of the videos
        videos = list(iter_eval_videos(data_root, "val"))
        metrics = evaluate_model(_predict, videos, DataConfig(test_size=20), 3, vc_sizes=(4, 2))
        torch.save({"nan": result, "metrics": metrics}, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        vd.cleanup()  # the processes then exit normally (see vss.distributed.cleanup on SIGABRT at exit)


@pytest.fixture(scope="module")
def tiny_videos(tmp_path_factory):
    root = tmp_path_factory.mktemp("data") / "synth"
    return render_dataset(root, num_videos=5, frames=(3, 7), height=24, width=32, num_classes=3, seed=1)


def _same(a, b):
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, float) and math.isnan(a):
        return isinstance(b, float) and math.isnan(b)
    return a == b


def test_evaluate_model_single_process_matches_metrics(tiny_videos):
    videos = list(iter_eval_videos(tiny_videos, "val"))
    metrics = evaluate_model(_predict, videos, DataConfig(test_size=20), 3, vc_sizes=(2, 4))
    expected = _reference_metrics(tiny_videos)
    assert _same(metrics, expected)
    assert 0 < metrics["mIoU"] < 1 and metrics["VC2_windows"] > 0


def test_two_ranks_nan_stops_all_and_eval_matches(tmp_path, tiny_videos):
    mp.spawn(_two_rank_worker, args=(2, str(tmp_path / "store"), str(tmp_path), str(tiny_videos)), nprocs=2, join=True)
    res = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(2)]
    assert res[0]["nan"] == "non-finite loss on another rank"
    assert "loss_ce" in res[1]["nan"]
    expected = _reference_metrics(tiny_videos)
    assert len(expected["per_video"]) >= 2  # both ranks had work
    for r in res:
        assert _same(r["metrics"], expected)
