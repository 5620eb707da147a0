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
    """ResNet.forward with the max-pool in NCHW, as torchvision computes it."""
    x = model.maxpool(model.relu(model.bn1(model.conv1(x))))
    out = {}
    for i, name in enumerate(("res2", "res3", "res4", "res5")):
        x = getattr(model, f"layer{i + 1}")(x)
        out[name] = x
    return out


@pytest.mark.parametrize("kwargs", [{}, {"stem_channels": 8}], ids=["torchvision", "detectron2_stem"])
def test_resnet_channels_last_maxpool_equals_nchw(kwargs):
    # ReLU zeros tie inside most pooling windows: the gradient must go to the same element
    torch.manual_seed(0)
    model = ResNet("resnet18", width=16, **kwargs).train()
    x = torch.randn(2, 3, 64, 96)
    fast = model(x)
    plain = _plain_resnet_forward(model, x)
    for name in fast:
        assert fast[name].is_contiguous()
        assert torch.equal(fast[name], plain[name]), name
    grads = []
    for out in (fast, plain):
        model.zero_grad()
        sum((o * torch.linspace(-1, 1, o.numel()).view_as(o)).sum() for o in out.values()).backward()
        grads.append(model.conv1.weight.grad.clone())
    assert torch.equal(grads[0], grads[1])


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
