"""DVIS++'s ViT-L backbone: DINOv2 built with 16x16 patches (the released 14x14 kernel resized,
positions interpolated DINOv2's way) under the ViT-Adapter. Each piece is checked against a slow
reference written from its definition: bilinear (align_corners) kernel resize, bicubic
scale-factor interpolation of the position grid, the extractor (deformable attention through the
per-point reference of test_deform_attn, per-level depthwise conv), and the adapter's assembly of
spatial-prior tokens, ViT maps and batch norms. The key layout of the real ViT-L model is checked
against the original code's in test_convert_dvis."""

import math

import numpy as np
import pytest
from test_deform_attn import slow_core
import torch
import torch.nn.functional as F

from vss.backbone import DinoVisionTransformer, load_backbone_weights, resize_patch_kernel
from vss.deform_attn import encoder_reference_points
from vss.vit_adapter import DWConv, Extractor, interaction_indexes, ViTAdapter


def _vit(depth: int = 4, dim: int = 32, heads: int = 2) -> DinoVisionTransformer:
    """A small DINOv2 with DVIS++'s patch 16 and img_size 592 (37 x 37 position grid)."""
    return DinoVisionTransformer(img_size=592, patch_size=16, embed_dim=dim, depth=depth, num_heads=heads)


def _perturb(module: torch.nn.Module, seed: int, scale: float = 0.2) -> None:
    """Random weights everywhere (norms and biases included) and random BatchNorm statistics."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, t in module.state_dict().items():
            if t.is_floating_point():
                t.add_(scale * torch.randn(t.shape, generator=g))
                if name.endswith("running_var"):
                    t.abs_().add_(0.5)


# ------------------------------------------------------------------------ patch kernel, pos-embed


def _linear_weights(n_in: int, n_out: int) -> torch.Tensor:
    """(n_out, n_in) bilinear interpolation matrix with align_corners=True: output i samples
    input position i * (n_in - 1) / (n_out - 1)."""
    m = torch.zeros(n_out, n_in, dtype=torch.float64)
    for i in range(n_out):
        src = i * (n_in - 1) / (n_out - 1)
        i0 = min(int(math.floor(src)), n_in - 2)
        m[i, i0], m[i, i0 + 1] = 1 - (src - i0), src - i0
    return m


def test_resize_patch_kernel_is_bilinear_with_align_corners():
    g = torch.Generator().manual_seed(0)
    kernel = torch.randn(5, 3, 14, 14, generator=g)
    resized = resize_patch_kernel(kernel, 16)
    m = _linear_weights(14, 16)
    expected = torch.einsum("ia,jb,ncab->ncij", m, m, kernel.double())
    assert resized.shape == (5, 3, 16, 16)
    torch.testing.assert_close(resized.double(), expected, rtol=0, atol=1e-5)
    torch.testing.assert_close(resized[..., [0, -1], :][..., [0, -1]], kernel[..., [0, -1], :][..., [0, -1]])


def _cubic_weights(n_in: int, n_out: int, scale: float) -> torch.Tensor:
    """(n_out, n_in) bicubic matrix (Keys kernel, A = -0.75, borders clamped) sampling input
    position (o + 0.5) / scale - 0.5 for output o: what F.interpolate(scale_factor=scale,
    mode="bicubic", align_corners=False) computes."""
    a = -0.75

    def kernel(x: float) -> float:
        x = abs(x)
        if x <= 1:
            return ((a + 2) * x - (a + 3)) * x * x + 1
        if x < 2:
            return ((a * x - 5 * a) * x + 8 * a) * x - 4 * a
        return 0.0

    m = torch.zeros(n_out, n_in, dtype=torch.float64)
    for o in range(n_out):
        src = (o + 0.5) / scale - 0.5
        base = math.floor(src)
        for k in range(base - 1, base + 3):
            m[o, min(max(k, 0), n_in - 1)] += kernel(src - k)
    return m


def test_patch16_position_embedding_is_interpolated_as_dvis_plus_does():
    """DVIS++'s copy of DINOv2: a 37 x 37 grid resized bicubically with scale factor
    (H/16 + 0.1) / 37 (not to a size), class token untouched."""
    vit = _vit()
    _perturb(vit, 1, scale=1.0)
    H, W = 64, 96  # a 4 x 6 token grid
    with torch.no_grad():
        pos = vit.interpolate_pos_encoding(4 * 6, H, W)  # (1,1+24,D)
    grid = vit.pos_embed[0, 1:].detach().double().reshape(37, 37, -1)  # (37,37,D)
    rows, cols = _cubic_weights(37, 4, (4 + 0.1) / 37), _cubic_weights(37, 6, (6 + 0.1) / 37)
    expected = torch.einsum("ia,jb,abd->ijd", rows, cols, grid).reshape(24, -1)
    torch.testing.assert_close(pos[0, 1:].double(), expected, rtol=0, atol=1e-5)
    torch.testing.assert_close(pos[0, 0], vit.pos_embed[0, 0].detach(), rtol=0, atol=0)
    by_size = _cubic_weights(37, 4, 4 / 37)  # sampling for size=(4, 6): a different grid
    assert (torch.einsum("ia,jb,abd->ijd", by_size, cols, grid).reshape(24, -1) - expected).abs().max() > 1e-2


def test_released_dinov2_file_loads_into_the_patch16_vit(test_data, tmp_path):
    """A DINOv2 file (14x14 kernel, 1 + 37*37 positions) into a ViT-Adapter's patch-16 ViT: the
    kernel is resized, everything else loads unchanged and strictly."""
    z = np.load(test_data / "dinov2_tiny_fixture.npz")
    sd = {k[3:]: torch.from_numpy(z[k]) for k in z.files if k.startswith("sd/")}
    torch.save(sd, tmp_path / "dinov2.pth")
    backbone = ViTAdapter(_vit(depth=4, dim=64), conv_inplane=8)
    backbone.vit.blocks = backbone.vit.blocks[:2]  # the fixture has 2 blocks
    load_backbone_weights(backbone, tmp_path / "dinov2.pth")
    loaded = backbone.vit.state_dict()
    kernel = "patch_embed.proj.weight"
    torch.testing.assert_close(loaded[kernel], resize_patch_kernel(sd[kernel], 16))
    assert all(torch.equal(loaded[k], v) for k, v in sd.items() if k != kernel)


# ------------------------------------------------------------------------------ adapter pieces


def test_dwconv_convolves_each_level_on_its_own():
    torch.manual_seed(0)
    conv = DWConv(6)
    sizes = [(4, 6), (2, 3), (1, 2)]
    maps = [torch.randn(2, 6, h, w) for h, w in sizes]
    tokens = torch.cat([m.flatten(2).transpose(1, 2) for m in maps], dim=1)  # (2,24+6+2,6)
    out = conv(tokens, sizes)
    expected = torch.cat(
        [
            F.conv2d(m, conv.dwconv.weight, conv.dwconv.bias, padding=1, groups=6).flatten(2).transpose(1, 2)
            for m in maps
        ],
        dim=1,
    )
    torch.testing.assert_close(out, expected, rtol=0, atol=1e-6)


def test_extractor_matches_a_slow_reference():
    """c + A, then + ConvFFN(LN(.)); A = deformable attention (one level: the ViT tokens) from the
    normed spatial tokens, through the per-point bilinear reference."""
    torch.manual_seed(0)
    dim, heads, points = 8, 2, 3
    ext = Extractor(dim, heads, points, cffn_ratio=0.5)
    _perturb(ext, 2, scale=0.5)
    sizes, grid = [(4, 6), (2, 3), (1, 2)], (2, 3)
    query = torch.randn(2, sum(h * w for h, w in sizes), dim)
    feat = torch.randn(2, 6, dim)
    ref = encoder_reference_points(sizes)  # (1,S,1,2)
    with torch.no_grad():
        out = ext(query, ref, feat, grid, sizes)
        attn = ext.attn
        q = F.layer_norm(query, (dim,), ext.query_norm.weight, ext.query_norm.bias, 1e-6)
        value = attn.value_proj(F.layer_norm(feat, (dim,), ext.feat_norm.weight, ext.feat_norm.bias, 1e-6))
        n, s = q.shape[:2]
        offsets = attn.sampling_offsets(q).view(n, s, heads, 1, points, 2) / torch.tensor([grid[1], grid[0]])
        locations = ref.view(1, s, 1, 1, 1, 2) + offsets
        weights = attn.attention_weights(q).view(n, s, heads, points).softmax(-1).view(n, s, heads, 1, points)
        core = slow_core(value.view(n, 6, heads, dim // heads), [grid], locations, weights)
        x = query + attn.output_proj(core)
        hidden = ext.ffn.fc1(F.layer_norm(x, (dim,), ext.ffn_norm.weight, ext.ffn_norm.bias, 1e-6))
        parts, start = [], 0
        for h, w in sizes:  # the depthwise conv level by level
            m = hidden[:, start : start + h * w].transpose(1, 2).reshape(n, -1, h, w)
            parts.append(ext.ffn.dwconv.dwconv(m).flatten(2).transpose(1, 2))
            start += h * w
        expected = x + ext.ffn.fc2(F.gelu(torch.cat(parts, dim=1)))
    torch.testing.assert_close(out, expected, rtol=0, atol=1e-5)


def test_interaction_indexes_split_the_vit_in_quarters():
    assert interaction_indexes(24) == [(0, 5), (6, 11), (12, 17), (18, 23)]
    assert interaction_indexes(12) == [(0, 2), (3, 5), (6, 8), (9, 11)]
    with pytest.raises(ValueError):
        interaction_indexes(10)


def test_adapter_assembles_spatial_prior_vit_maps_and_norms():
    """With the extractors' residual branches zeroed, every output is the batch-normed sum of the
    spatial prior's level (+ level embedding; stride 4: up(c2) + c1) and the ViT's raw tokens
    after its group of blocks, resized (x4, x2, x1, x0.5 as 2x2 means), cropped to ceil(H/s)."""
    torch.manual_seed(0)
    adapter = ViTAdapter(_vit(), conv_inplane=8, n_points=2).eval()
    _perturb(adapter, 3)
    with torch.no_grad():
        for m in adapter.modules():
            if isinstance(m, Extractor):
                for lin in (m.attn.output_proj, m.ffn.fc2):
                    lin.weight.zero_()
                    lin.bias.zero_()
    x = torch.randn(2, 3, 50, 70)  # padded to 64 x 96
    with torch.no_grad():
        out = adapter(x)
        xp = F.pad(x, (0, 26, 0, 14))
        c1, c2, c3, c4 = adapter.spm(xp)
        c2, c3, c4 = (
            t.transpose(1, 2).reshape(2, -1, h, w) + adapter.level_embed[i][:, None, None]
            for i, (t, (h, w)) in enumerate(zip((c2, c3, c4), [(8, 12), (4, 6), (2, 3)]))
        )
        tokens, vit_maps = adapter.vit.prepare_tokens(xp), []
        for i, blk in enumerate(adapter.vit.blocks):  # depth 4: one block per interaction
            tokens = blk(tokens)
            vit_maps.append(tokens[:, 1:].transpose(1, 2).reshape(2, -1, 4, 6))
        up = [
            F.interpolate(vit_maps[0], scale_factor=4, mode="bilinear", align_corners=False),
            F.interpolate(vit_maps[1], scale_factor=2, mode="bilinear", align_corners=False),
            vit_maps[2],
            F.avg_pool2d(vit_maps[3], 2),
        ]
        feats = [adapter.up(c2) + c1, c2, c3, c4]
    norms = (adapter.norm1, adapter.norm2, adapter.norm3, adapter.norm4)
    for (name, got), feat, vit_map, norm, stride in zip(out.items(), feats, up, norms, (4, 8, 16, 32)):
        mean, var, weight, bias = (
            v[:, None, None] for v in (norm.running_mean, norm.running_var, norm.weight, norm.bias)
        )
        expected = (feat + vit_map - mean) / torch.sqrt(var + 1e-5) * weight + bias
        expected = expected[..., : -(-50 // stride), : -(-70 // stride)]
        assert got.shape == expected.shape, name
        torch.testing.assert_close(got, expected, rtol=0, atol=1e-4, msg=name)


def test_adapter_extractors_change_the_output_and_the_frozen_vit_gets_no_gradient():
    torch.manual_seed(0)
    adapter = ViTAdapter(_vit(), conv_inplane=8, n_points=2)
    _perturb(adapter, 4)
    x = torch.randn(1, 3, 64, 64)
    out = adapter(x)
    sum(v.square().mean() for v in out.values()).backward()
    trainable = [n for n, p in adapter.named_parameters() if not n.startswith("vit.")]
    assert all(adapter.get_parameter(n).grad is not None for n in trainable)
    assert not any(p.requires_grad or p.grad is not None for p in adapter.vit.parameters())
    with torch.no_grad():  # the extractors do contribute (guards the zeroing in the test above)
        for m in adapter.modules():
            if isinstance(m, Extractor):
                m.ffn.fc2.weight.zero_()
                m.ffn.fc2.bias.zero_()
                m.attn.output_proj.weight.zero_()
                m.attn.output_proj.bias.zero_()
        assert (adapter(x)["res3"] - out["res3"]).abs().max() > 1e-3
    with pytest.raises(ValueError, match="16x16 patches"):
        ViTAdapter(DinoVisionTransformer(embed_dim=32, depth=4, num_heads=2), conv_inplane=8)(x)
