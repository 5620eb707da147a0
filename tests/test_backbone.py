"""Backbones against the original code's numbers and checkpoint layouts.

Fixtures (see ../shared/fixtures/README.md):
- ``torchvision_resnet.npz`` (22 MB, only beside the dev repo): torchvision resnet18 state dict,
  input and res2..res5 in eval mode.
- ``tests/data/torchvision_resnet_tiny.npz`` (1.4 MB, everywhere): torchvision's resnet18 and
  resnet50 code at width 8, seeded weights with perturbed BatchNorms, an input and the stem,
  res2..res5, pooled features and logits in eval mode; made by
  ``tests/data/make_torchvision_resnet_tiny.py`` (how: its docstring).
- ``tests/data/dinov2_tiny_fixture.npz``: a tiny facebookresearch/dinov2 ViT, input 98x126 (not
  518x518, so the pos-embed interpolation is checked) and its ``forward_features`` outputs.
- ``tests/data/dinov2_keys.json``: state-dict keys/shapes of dinov2 ViT-S/14 and ViT-L/14.
- ``tests/data/torchvision_resnet50_keys.json``: the ``resnet50_keys`` of the npz's ``meta``.
"""

import json
import math

import numpy as np
import pytest
import torch
from torch import nn
import torch.nn.functional as F

from vss.backbone import (
    build_backbone,
    build_vit,
    DinoVisionTransformer,
    FrozenBatchNorm2d,
    LEVELS,
    load_backbone_weights,
    ResNet,
    ViTBackbone,
)
from vss.config import ModelConfig, tiny, vitl


def _rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / b.abs().max()).item()


def _shapes(module: nn.Module) -> dict:
    return {k: list(v.shape) for k, v in module.state_dict().items()}


# ------------------------------------------------------------------------------------ ResNet


@pytest.mark.parametrize("frozen_bn", [False, True])
def test_resnet18_matches_torchvision(shared_dir, tmp_path, frozen_bn):
    z = np.load(shared_dir / "fixtures" / "torchvision_resnet.npz")
    assert "resnet18()" in str(z["meta"])
    sd = {k[3:]: torch.from_numpy(z[k]).float() for k in z.files if k.startswith("sd/")}
    assert "fc.weight" in sd  # the full torchvision file, classifier included
    torch.save(sd, tmp_path / "resnet18.pth")
    model = ResNet("resnet18", frozen_bn=frozen_bn)
    load_backbone_weights(model, tmp_path / "resnet18.pth")
    model.eval()
    with torch.no_grad():
        out = model(torch.from_numpy(z["input"]))
    for name in LEVELS:
        ref = torch.from_numpy(z[name])
        assert out[name].shape == ref.shape, name
        assert _rel_err(out[name], ref) < 1e-4, name


TINY_TOLERANCE = 1e-5  # max |vss - torchvision| / max |torchvision|, per output


def _tiny_torchvision(test_data, depth: str) -> tuple[dict, dict, int]:
    """(state dict in float32, outputs, width) of one model of torchvision_resnet_tiny.npz."""
    z = np.load(test_data / "torchvision_resnet_tiny.npz")
    meta = json.loads(z["meta"].item())
    assert meta["torchvision"].startswith("0.") and meta["models"][depth]["construction"].startswith("torchvision")
    prefix = f"{depth}/sd/"
    sd = {k[len(prefix) :]: torch.from_numpy(z[k]) for k in z.files if k.startswith(prefix)}
    sd = {k: v.float() if v.is_floating_point() else v for k, v in sd.items()}  # float16 on disk, exact
    outputs = {k: torch.from_numpy(z[f"{depth}/{k}"]) for k in ("stem", *LEVELS, "pooled", "logits")}
    outputs["input"] = torch.from_numpy(z["input"])
    return sd, outputs, meta["widths"][depth]


def _stem_stages_pooled(model: ResNet, x: torch.Tensor, fc: tuple[torch.Tensor, torch.Tensor]) -> dict:
    with torch.no_grad():
        out = {"stem": model.maxpool(model.relu(model.bn1(model.conv1(x)))), **model(x)}
    out["pooled"] = out["res5"].mean((2, 3))  # torchvision: avgpool + flatten
    out["logits"] = F.linear(out["pooled"], *fc)
    return out


@pytest.mark.parametrize("depth", ["resnet18", "resnet50"])
@pytest.mark.parametrize("frozen_bn", [False, True])
def test_tiny_resnet_matches_torchvision(test_data, tmp_path, depth, frozen_bn):
    """torchvision's own ResNet code at width 8 (tests/data/make_torchvision_resnet_tiny.py): the
    file loads strictly (torchvision's key names and shapes, classifier dropped) and the stem,
    every stage, the pooled features and the logits match."""
    sd, ref, width = _tiny_torchvision(test_data, depth)
    assert "fc.weight" in sd and any(k.endswith("num_batches_tracked") for k in sd)
    torch.save(sd, tmp_path / f"{depth}.pth")
    model = ResNet(depth, width=width, frozen_bn=frozen_bn)
    load_backbone_weights(model, tmp_path / f"{depth}.pth")
    model.eval()
    out = _stem_stages_pooled(model, ref["input"], (sd["fc.weight"], sd["fc.bias"]))
    for name in ("stem", *LEVELS, "pooled", "logits"):
        assert out[name].shape == ref[name].shape, name
        assert _rel_err(out[name], ref[name]) < TINY_TOLERANCE, (name, _rel_err(out[name], ref[name]))


def test_tiny_torchvision_fixture_detects_stride_in_1x1(test_data):
    """The same weights with the stride in the first 1x1 conv of each downsampling bottleneck
    (ResNet v1 / detectron2 STRIDE_IN_1X1 True) miss res3..res5 by far more than the tolerance:
    the fixture does check torchvision's v1.5 layout, not only the shapes."""
    sd, ref, width = _tiny_torchvision(test_data, "resnet50")
    model = ResNet("resnet50", width=width)
    model.load_state_dict({k: v for k, v in sd.items() if not k.startswith("fc.")}, strict=True)
    for layer in (model.layer2, model.layer3, model.layer4):
        layer[0].conv1.stride, layer[0].conv2.stride = (2, 2), (1, 1)
    out = _stem_stages_pooled(model.eval(), ref["input"], (sd["fc.weight"], sd["fc.bias"]))
    assert _rel_err(out["res2"], ref["res2"]) < TINY_TOLERANCE  # before the first stride: same
    assert all(_rel_err(out[name], ref[name]) > 1e-2 for name in ("res3", "res4", "res5"))


@pytest.mark.parametrize("frozen_bn", [False, True])
def test_resnet50_has_torchvision_keys(test_data, frozen_bn):
    expected = json.loads((test_data / "torchvision_resnet50_keys.json").read_text())["resnet50"]
    expected = {k: v for k, v in expected.items() if not k.startswith("fc.")}
    with torch.device("meta"):
        model = ResNet("resnet50", frozen_bn=frozen_bn)
    assert _shapes(model) == expected
    assert model.out_channels == {"res2": 256, "res3": 512, "res4": 1024, "res5": 2048}
    # torchvision "v1.5" / detectron2 STRIDE_IN_1X1 False: the stride sits in the 3x3 conv.
    first = model.layer2[0]
    assert first.conv1.stride == (1, 1) and first.conv2.stride == (2, 2)
    assert first.downsample[0].stride == (2, 2)


@pytest.mark.parametrize("depth", ["resnet34", "resnet101"])
def test_resnet_block_counts(depth):
    with torch.device("meta"):
        model = ResNet(depth)
    blocks = [len(getattr(model, f"layer{i}")) for i in range(1, 5)]
    assert blocks == {"resnet34": [3, 4, 6, 3], "resnet101": [3, 4, 23, 3]}[depth]


def test_resnet_output_sizes_odd_input():
    model = ResNet("resnet50", width=8).eval()
    out = model(torch.randn(1, 3, 50, 70))
    for name, s in zip(LEVELS, (4, 8, 16, 32)):
        assert out[name].shape == (
            1,
            model.out_channels[name],
            math.ceil(50 / s),
            math.ceil(70 / s),
        )
    assert model.out_channels == {"res2": 32, "res3": 64, "res4": 128, "res5": 256}


def test_frozen_bn_equals_eval_batchnorm():
    torch.manual_seed(0)
    bn = nn.BatchNorm2d(6)
    with torch.no_grad():
        bn.weight.uniform_(0.5, 2)
        bn.bias.normal_()
        bn.running_mean.normal_()
        bn.running_var.uniform_(0.1, 3)
    frozen = FrozenBatchNorm2d(6)
    frozen.load_state_dict(bn.state_dict(), strict=True)  # num_batches_tracked included
    assert list(frozen.parameters()) == []
    assert _shapes(frozen) == _shapes(bn)
    x = torch.randn(2, 6, 5, 7, requires_grad=True)
    frozen.train()  # mode must not matter: statistics stay fixed
    y = frozen(x)
    torch.testing.assert_close(y, bn.eval()(x), rtol=1e-5, atol=1e-6)
    before = {k: v.clone() for k, v in frozen.state_dict().items()}
    y.square().sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0  # gradient flows through to the input
    for k, v in frozen.state_dict().items():
        assert torch.equal(v, before[k]) and not v.requires_grad, k
    # A state dict without num_batches_tracked (old torchvision files) loads strictly.
    frozen.load_state_dict({k: v for k, v in bn.state_dict().items() if "num_batches" not in k})


# ------------------------------------------------------------------------------------- DINOv2


def _tiny_vit(**kwargs) -> DinoVisionTransformer:
    return DinoVisionTransformer(
        img_size=518,
        patch_size=14,
        embed_dim=64,
        depth=2,
        num_heads=2,
        mlp_ratio=4,
        init_values=1.0,
        **kwargs,
    )


def _tiny_fixture(test_data):
    z = np.load(test_data / "dinov2_tiny_fixture.npz")
    sd = {k[3:]: torch.from_numpy(z[k]) for k in z.files if k.startswith("sd/")}
    return z, sd


def test_dinov2_tiny_matches_reference(test_data, tmp_path):
    z, sd = _tiny_fixture(test_data)
    torch.save(sd, tmp_path / "tiny.pth")
    vit = _tiny_vit()
    load_backbone_weights(vit, tmp_path / "tiny.pth")
    vit.eval()
    with torch.no_grad():
        out = vit.forward_features(torch.from_numpy(z["input"]))
    for key in ("x_norm_clstoken", "x_norm_patchtokens"):
        ref = torch.from_numpy(z[key])
        assert out[key].shape == ref.shape
        torch.testing.assert_close(out[key], ref, rtol=1e-5, atol=1e-5)
    # Intermediate tokens of the last block (with the final norm) are the same patch tokens.
    with torch.no_grad():
        (last,) = vit.intermediate_patch_tokens(torch.from_numpy(z["input"]), [1])
    torch.testing.assert_close(last, out["x_norm_patchtokens"], rtol=0, atol=0)


def test_pos_embed_unchanged_only_at_pretraining_grid(test_data):
    """DINOv2 returns pos_embed untouched for a square image with the pretraining token count;
    interpolating there anyway (scale (37 + 0.1)/37) would move the values."""
    _, sd = _tiny_fixture(test_data)
    vit = _tiny_vit()
    vit.load_state_dict(sd, strict=True)
    with torch.no_grad():
        assert vit.interpolate_pos_encoding(37 * 37, 518, 518) is vit.pos_embed
        smaller = vit.interpolate_pos_encoding(36 * 36, 504, 504)
    assert smaller.shape == (1, 1 + 36 * 36, 64)
    torch.testing.assert_close(smaller[:, 0], vit.pos_embed[:, 0].detach(), rtol=0, atol=0)


def test_dinov2_fixture_detects_size_based_interpolation(test_data):
    """Interpolating the pos-embed to a *size* (offset 0) instead of DINOv2's scale factor moves
    the outputs far outside the tolerance: the fixture does check the interpolation."""
    z, sd = _tiny_fixture(test_data)
    vit = _tiny_vit(interpolate_offset=0.0)
    vit.load_state_dict(sd, strict=True)
    with torch.no_grad():
        out = vit.eval().forward_features(torch.from_numpy(z["input"]))
    assert (out["x_norm_patchtokens"] - torch.from_numpy(z["x_norm_patchtokens"])).abs().max() > 1e-2


@pytest.mark.parametrize("name,key", [("vit_small", "dinov2_vits14"), ("vit_large", "dinov2_vitl14")])
def test_vit_has_dinov2_keys(test_data, name, key):
    expected = json.loads((test_data / "dinov2_keys.json").read_text())[key]
    with torch.device("meta"):
        vit = build_vit(name)
    assert _shapes(vit) == expected


def test_vit_giant2_swiglu_and_registers_layout():
    with torch.device("meta"):
        vitg = build_vit("vit_giant2")
        vitb = build_vit("vit_base", num_register_tokens=4)
    shapes = _shapes(vitg)
    assert len(vitg.blocks) == 40 and shapes["pos_embed"] == [1, 1370, 1536]
    assert shapes["blocks.0.mlp.w12.weight"] == [8192, 1536]  # 2 x (6144*2/3 rounded to 8)
    assert shapes["blocks.0.mlp.w3.weight"] == [1536, 4096]
    assert shapes["blocks.39.ls2.gamma"] == [1536]
    assert _shapes(vitb)["register_tokens"] == [1, 4, 768]
    # The hub's *_reg models interpolate with antialias and no offset.
    assert vitb.interpolate_antialias and vitb.interpolate_offset == 0.0


def test_register_token_layout():
    """DINOv2 order [cls | registers | patches]; registers are inserted after the position
    embeddings are added, so they enter the first block unchanged."""
    torch.manual_seed(0)
    vit = _tiny_vit(num_register_tokens=3).eval()
    x = torch.randn(1, 3, 28, 42)
    with torch.no_grad():
        tokens = vit.prepare_tokens(x)
        out = vit.forward_features(x)
    torch.testing.assert_close(tokens[:, 1:4], vit.register_tokens, rtol=0, atol=0)
    assert out["x_norm_regtokens"].shape == (1, 3, 64)
    assert out["x_norm_patchtokens"].shape == (1, 6, 64)
    torch.testing.assert_close(vit.norm(out["x_prenorm"])[:, 4:], out["x_norm_patchtokens"])


def test_vit_rejects_non_multiple_of_patch():
    with pytest.raises(ValueError, match="not a multiple of the patch 14"):
        _tiny_vit().forward_features(torch.randn(1, 3, 30, 28))


# --------------------------------------------------------------------------------------- neck


def test_vit_backbone_shapes_and_token_grid():
    """Any H, W: maps at ceil(H/s); the stride-16 grid is the ViT's token grid of the padded
    image resized by 14/16, reshaped row-major (a transposed reshape would fail for H != W)."""
    torch.manual_seed(0)
    vit = DinoVisionTransformer(embed_dim=32, depth=4, num_heads=2, patch_size=14, img_size=518)
    backbone = ViTBackbone(vit, out_dim=16).eval()
    assert backbone.layers == [0, 1, 2, 3]
    x = torch.randn(2, 3, 100, 130)
    captured = {}
    backbone.neck.register_forward_pre_hook(lambda m, args: captured.setdefault("maps", args[0]))
    with torch.no_grad():
        out = backbone(x)
    for name, s in zip(LEVELS, (4, 8, 16, 32)):
        assert out[name].shape == (2, 16, math.ceil(100 / s), math.ceil(130 / s)), name
    # Reference path: pad to 128x160 (multiple of 32), resize to 112x140 (8x10 patches of 14).
    padded = F.pad(x, (0, 30, 0, 28))
    resized = F.interpolate(padded, size=(112, 140), mode="bilinear", align_corners=False)
    with torch.no_grad():
        tokens = vit.forward_features(resized)["x_norm_patchtokens"]  # (2,80,32)
    grid = tokens.reshape(2, 8, 10, 32).permute(0, 3, 1, 2)
    torch.testing.assert_close(captured["maps"][3], grid)


@pytest.mark.parametrize("freeze", [True, False])
def test_vit_backbone_freezing(freeze):
    torch.manual_seed(0)
    vit = DinoVisionTransformer(embed_dim=32, depth=2, num_heads=2)
    backbone = ViTBackbone(vit, out_dim=8, freeze_vit=freeze)
    out = backbone(torch.randn(1, 3, 64, 64))
    sum(v.square().mean() for v in out.values()).backward()
    assert all(p.grad is not None for p in backbone.neck.parameters())
    for name, p in backbone.vit.named_parameters():
        trains = not freeze and name != "mask_token"  # mask_token is never used
        assert p.requires_grad == trains and (p.grad is not None) == trains, name


def test_build_backbone_from_config():
    r18 = build_backbone(tiny().model)
    assert isinstance(r18, ResNet) and r18.out_channels["res5"] == 512
    assert not any(isinstance(m, FrozenBatchNorm2d) for m in r18.modules())  # tiny: frozen_bn off
    r50 = ModelConfig(backbone="resnet50", resnet_width=8)
    assert any(isinstance(m, FrozenBatchNorm2d) for m in build_backbone(r50).modules())
    cfg = vitl().model
    cfg.vit_neck = "simple"
    with torch.device("meta"):
        vit = build_backbone(cfg)
    assert isinstance(vit, ViTBackbone) and vit.out_channels == {k: cfg.conv_dim for k in LEVELS}
    assert not any(p.requires_grad for p in vit.vit.parameters())
    cfg.vit_neck, cfg.vit_patch_size = "adapter", 14
    with pytest.raises(ValueError, match="vit_patch_size=16"):
        build_backbone(cfg)
    cfg.vit_neck = "fpn"
    with pytest.raises(ValueError, match="vit_neck must be"):
        build_backbone(cfg)
    with pytest.raises(ValueError, match="unknown backbone"):
        build_backbone(ModelConfig(backbone="resnet51"))


# -------------------------------------------------------------------------------- load errors


def test_load_backbone_weights_errors(test_data, tmp_path):
    resnet = ResNet("resnet18", width=8)
    with pytest.raises(FileNotFoundError, match="nope.pth"):
        load_backbone_weights(resnet, tmp_path / "nope.pth")
    garbage = tmp_path / "garbage.pth"
    garbage.write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match=r"garbage\.pth: cannot read"):
        load_backbone_weights(resnet, garbage)
    # A DINOv2 file into a ResNet: named missing and unexpected keys.
    _, sd = _tiny_fixture(test_data)
    torch.save(sd, tmp_path / "dinov2.pth")
    with pytest.raises(
        ValueError,
        match=r"dinov2\.pth.*missing keys: conv1\.weight.*" r"unexpected keys: cls_token",
    ):
        load_backbone_weights(resnet, tmp_path / "dinov2.pth")
    # Right keys, wrong width: a shape mismatch naming the key.
    torch.save(ResNet("resnet18", width=16).state_dict(), tmp_path / "wide.pth")
    with pytest.raises(ValueError, match=r"wide\.pth.*shape mismatch.*conv1\.weight \(16, 3, 7, 7\)"):
        load_backbone_weights(resnet, tmp_path / "wide.pth")
    # A training checkpoint instead of a state dict.
    torch.save({"model": resnet.state_dict(), "step": 3}, tmp_path / "ckpt.pth")
    with pytest.raises(ValueError, match="vss checkpoint"):
        load_backbone_weights(resnet, tmp_path / "ckpt.pth")
    # Into a ViTBackbone the DINOv2 file goes to .vit; extra keys are still errors.
    backbone = ViTBackbone(_tiny_vit(), out_dim=8)
    load_backbone_weights(backbone, tmp_path / "dinov2.pth")
    torch.testing.assert_close(backbone.vit.pos_embed.detach(), sd["pos_embed"])
    torch.save({**sd, "head.weight": torch.zeros(1)}, tmp_path / "extra.pth")
    with pytest.raises(ValueError, match=r"unexpected keys: head\.weight"):
        load_backbone_weights(backbone, tmp_path / "extra.pth")
