"""Speed-ups that must not change a number: each fast path against the plain computation it
replaces (benchmarks/bench_model.py measures the speed)."""

import copy

import pytest
import torch
import torch.nn.functional as F

from vss.backbone import ResNet
from vss.config import OptimConfig
from vss.engine import build_optimizer, param_groups


def _plain_resnet_forward(model: ResNet, x: torch.Tensor) -> dict[str, torch.Tensor]:
    """ResNet.forward all in NCHW, as torchvision computes it."""
    x = model.maxpool(model.relu(model.bn1(model.conv1(x))))
    out = {}
    for i, name in enumerate(("res2", "res3", "res4", "res5")):
        x = getattr(model, f"layer{i + 1}")(x)
        out[name] = x
    return out


@pytest.mark.parametrize("kwargs", [{}, {"stem_channels": 8}], ids=["torchvision", "detectron2_stem"])
@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
def test_resnet_channels_last_res2_matches_nchw_and_float64(kwargs, train):
    # the channels-last stem and res2 reorder the convs' and BatchNorm's sums: not bit-equal to
    # the NCHW computation, so both are held against float64, and the fast path must be as close
    torch.manual_seed(0)
    model = ResNet("resnet18", width=16, **kwargs).train(train)
    x = torch.randn(2, 3, 64, 96)
    ref_model = copy.deepcopy(model).double()

    def run(fn, m, inp):
        m.zero_grad()
        out = fn(m, inp)
        sum((o * torch.linspace(-1, 1, o.numel(), dtype=o.dtype).view_as(o)).sum() for o in out.values()).backward()
        grads = (m.conv1.weight.grad, m.layer1[0].conv1.weight.grad, m.layer4[-1].conv2.weight.grad)
        return out, *(g.double() for g in grads)

    fast, *fast_grads = run(ResNet.forward, model, x)
    plain, *plain_grads = run(_plain_resnet_forward, model, x)
    ref, *ref_grads = run(_plain_resnet_forward, ref_model, x.double())
    for name in fast:
        assert fast[name].is_contiguous()
        torch.testing.assert_close(fast[name], plain[name], rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(fast[name].double(), ref[name], rtol=1e-4, atol=1e-4)
    for f, p, r in zip(fast_grads, plain_grads, ref_grads):
        err_fast, err_plain = (f - r).norm() / r.norm(), (p - r).norm() / r.norm()
        assert err_fast < 1e-5 and err_fast <= 2 * err_plain + 1e-7, (err_fast, err_plain)


def test_maxpool_channels_last_ties_and_nan():
    x = torch.relu(torch.randn(2, 8, 20, 24, generator=torch.Generator().manual_seed(1)))
    x[0, 0, :4, :4] = 1.0  # ties at a positive value
    x[1, 3, 5:8, 5:8] = float("nan")
    v1, i1 = F.max_pool2d(x, 3, 2, 1, return_indices=True)
    v2, i2 = F.max_pool2d(x.contiguous(memory_format=torch.channels_last), 3, 2, 1, return_indices=True)
    assert torch.equal(v1.nan_to_num(-1), v2.nan_to_num(-1)) and torch.equal(i1, i2)


def test_build_optimizer_foreach_equals_per_parameter_loop():
    # the multi-tensor AdamW of build_optimizer against torch's per-parameter loop on the same
    # groups (backbone LR multiplier, no decay on norms and biases): bit for bit over 5 steps
    torch.manual_seed(0)
    model = torch.nn.ModuleDict(
        {
            "backbone": torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4)),
            "head": torch.nn.Linear(4, 5),
        }
    )
    loop_model = copy.deepcopy(model)
    cfg = OptimConfig(lr=1e-3)
    fast = build_optimizer(model, cfg)
    loop = torch.optim.AdamW(param_groups(loop_model, cfg), lr=cfg.lr, weight_decay=cfg.weight_decay, foreach=False)
    assert len(fast.param_groups) == len(loop.param_groups) >= 3
    for step in range(5):
        x = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(step))
        for m, opt in ((model, fast), (loop_model, loop)):
            opt.zero_grad()
            m["head"](m["backbone"](x).mean((2, 3))).square().mean().backward()
            opt.step()
    for (name, a), b in zip(model.named_parameters(), loop_model.parameters()):
        assert torch.equal(a, b), name
