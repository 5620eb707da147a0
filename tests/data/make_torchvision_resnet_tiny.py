"""Make tests/data/torchvision_resnet_tiny.npz: torchvision's own ResNet-18 and ResNet-50 code at
reduced width, seeded weights, an input and the outputs of every stage (tests/test_backbone.py
loads the weights into vss.backbone.ResNet and matches them).

Not run by the tests; needs torchvision, which the project's environment does not have:

    python -m venv /work/tvenv
    /work/tvenv/bin/pip install torch==2.13.0 torchvision
    /work/tvenv/bin/python tests/data/make_torchvision_resnet_tiny.py

How the models are made. ``torchvision.models.resnet18()`` / ``resnet50()`` (weights=None) build the
real models; torchvision has no width argument for the stem and the stages (its ``__init__``
hard-codes 64/128/256/512 planes, and ``width_per_group`` only narrows the bottleneck's inner
3x3), so the stem and the four stages are then rebuilt at width W with torchvision's own
``ResNet._make_layer`` (the same calls as its ``__init__``, planes W, 2W, 4W, 8W) and the classifier
as ``nn.Linear(8 W expansion, NUM_CLASSES)``. Blocks (``BasicBlock``, ``Bottleneck``: stride in the
3x3 conv, downsample conv+BN), ``_forward_impl`` (stem conv 7x7/2 + BN + ReLU + maxpool 3x3/2,
layer1..4, avgpool, flatten, fc) and the state-dict layout are torchvision's, unchanged. Weights:
torchvision's init (kaiming fan_out convs) under a fixed seed, then every BatchNorm's weight, bias,
running_mean and running_var perturbed (so eval-mode BN is not the identity), and every float
rounded to float16 and stored as float16 (exact in float32, halves the file); the outputs are
computed in float32 from those rounded weights, eval mode, torch.no_grad, 1 thread.

torchvision 0.28.0 (the version pip resolves for torch 2.13.0 here) ships a CUDA build of its C
extension, which does not load next to the CPU torch wheel, and ``torchvision/__init__`` then fails
registering fake kernels for the missing ops (nms, roi_align, ...). ``_meta_registrations`` is
replaced by an empty module before the import; the ResNet code uses none of those ops.

Keys of the npz (M = resnet18, resnet50):
- ``meta``: JSON (versions, widths, seed, input size, construction, per-output max |value|).
- ``M/sd/<key>``: the state dict (float16; ``num_batches_tracked`` int64), fc included.
- ``input``: (2,3,50,70) float32, shared by both models (odd sizes: every stage rounds up).
- ``M/stem`` (after the maxpool, stride 4), ``M/res2``..``M/res5`` (layer1..layer4, strides
  4/8/16/32), ``M/pooled`` (avgpool + flatten, the features the classifier sees), ``M/logits``.
"""

import json
import sys
import types
from pathlib import Path

import numpy as np
import torch
from torch import nn

sys.modules["torchvision._meta_registrations"] = types.ModuleType("torchvision._meta_registrations")
import torchvision  # noqa: E402
from torchvision.models import resnet  # noqa: E402

OUT = Path(__file__).resolve().parent / "torchvision_resnet_tiny.npz"
SEED = 0
WIDTH = {"resnet18": 8, "resnet50": 8}
NUM_CLASSES = 10
INPUT = (2, 3, 50, 70)


def narrow_resnet(name: str, width: int) -> resnet.ResNet:
    """torchvision's ``name`` with the stem and stages rebuilt at ``width`` by its own code."""
    model = getattr(resnet, name)()  # weights=None
    block = type(model.layer1[0])
    layers = [len(getattr(model, f"layer{i}")) for i in range(1, 5)]
    # What ResNet.__init__ does, with width in place of 64 (the init loop is repeated below).
    model.inplanes = width
    model.conv1 = nn.Conv2d(3, width, kernel_size=7, stride=2, padding=3, bias=False)
    model.bn1 = model._norm_layer(width)
    model.layer1 = model._make_layer(block, width, layers[0])
    model.layer2 = model._make_layer(block, 2 * width, layers[1], stride=2)
    model.layer3 = model._make_layer(block, 4 * width, layers[2], stride=2)
    model.layer4 = model._make_layer(block, 8 * width, layers[3], stride=2)
    model.fc = nn.Linear(8 * width * block.expansion, NUM_CLASSES)
    for m in model.modules():  # torchvision's init loop
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        elif isinstance(m, (nn.BatchNorm2d, nn.GroupNorm)):
            nn.init.constant_(m.weight, 1)
            nn.init.constant_(m.bias, 0)
    return model


def perturb_and_round(model: nn.Module, g: torch.Generator) -> None:
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                c = m.num_features
                m.weight.copy_(torch.empty(c).uniform_(0.5, 1.5, generator=g))
                m.bias.copy_(0.2 * torch.randn(c, generator=g))
                m.running_mean.copy_(0.2 * torch.randn(c, generator=g))
                m.running_var.copy_(torch.empty(c).uniform_(0.5, 2.0, generator=g))
                m.num_batches_tracked.fill_(int(torch.randint(1, 1000, (), generator=g)))
        for t in model.state_dict().values():
            if t.is_floating_point():
                t.copy_(t.half().float())


def main() -> None:
    torch.set_num_threads(1)
    torch.manual_seed(SEED)
    g = torch.Generator().manual_seed(SEED)
    x = torch.randn(INPUT, generator=g)
    arrays = {"input": x.numpy()}
    meta = {"torch": torch.__version__, "torchvision": torchvision.__version__, "seed": SEED, "widths": WIDTH,
            "num_classes": NUM_CLASSES, "input": list(INPUT), "script": "tests/data/make_torchvision_resnet_tiny.py",
            "models": {}}
    for name, width in WIDTH.items():
        model = narrow_resnet(name, width)
        perturb_and_round(model, g)
        model.eval()
        taps = {"stem": model.maxpool, "res2": model.layer1, "res3": model.layer2, "res4": model.layer3,
                "res5": model.layer4, "pooled": model.avgpool, "logits": model.fc}
        outputs = {}
        hooks = [m.register_forward_hook(lambda _m, _i, out, key=key: outputs.__setitem__(key, out.clone()))
                 for key, m in taps.items()]
        with torch.no_grad():
            logits = model(x)
        for h in hooks:
            h.remove()
        outputs["pooled"] = torch.flatten(outputs["pooled"], 1)
        assert torch.equal(logits, outputs["logits"])
        for key, t in model.state_dict().items():
            arrays[f"{name}/sd/{key}"] = (t.half() if t.is_floating_point() else t).numpy()
        for key, t in outputs.items():
            arrays[f"{name}/{key}"] = t.numpy()
        meta["models"][name] = {
            "construction": f"torchvision.models.resnet.{name}(), stem and layer1..4 rebuilt at width {width} "
                            "with ResNet._make_layer, fc Linear(8*width*expansion, num_classes)",
            "shapes": {key: list(t.shape) for key, t in outputs.items()},
            "max_abs": {key: float(t.abs().max()) for key, t in outputs.items()},
            "params": sum(p.numel() for p in model.parameters()),
        }
    arrays["meta"] = np.array(json.dumps(meta))
    np.savez_compressed(OUT, **arrays)
    print(json.dumps(meta, indent=1))
    print(f"wrote {OUT} ({OUT.stat().st_size / 1e6:.2f} MB)")


if __name__ == "__main__":
    main()
