"""Backbones: torchvision-layout ResNets, DINOv2 ViTs and a simple multi-scale ViT neck.

Paper: Mask2Former (Cheng et al., CVPR 2022), meta architecture (§3): the pixel decoder reads
four backbone maps ``res2..res5`` at strides 4/8/16/32. DVIS++ (Zhang et al., 2023; VSPW configs
``configs/dvis_Plus/VSPW/``) uses a ResNet-50 (detectron2, ``STRIDE_IN_1X1: False`` = torchvision
layout, FrozenBN, ``FREEZE_AT: 0``) or a frozen DINOv2 ViT-L/14 (Oquab et al., 2023) under a
ViT-Adapter (Chen et al., ICLR 2023); the 1st-place U2PL solution's student is also
Mask2Former + ViT-Adapter-L (its Table 1).

Parts:
- ``ResNet`` (He et al., CVPR 2016): the module tree and parameter names of torchvision's
  ``resnet18/34/50/101`` (stride in the 3x3 conv of the bottleneck, BN eps 1e-5), so the released
  ImageNet ``.pth`` files load key for key. ``FrozenBatchNorm2d`` (detectron2/torchvision) has
  the same state-dict keys as ``nn.BatchNorm2d`` (``num_batches_tracked`` included).
- ``DinoVisionTransformer``: the parameter names and numerics of facebookresearch/dinov2
  (``vision_transformer.py``, ``layers/*``), so the released ``dinov2_vit{s,b,l,g}14*.pth`` load
  with ``strict=True``; position-embedding interpolation exactly as DINOv2 (bicubic through
  ``scale_factor = (grid + interpolate_offset) / M``, M = 37, see ``interpolate_pos_encoding``).
- ``SimpleFeaturePyramid`` + ``ViTBackbone``: a frozen ViT turned into res2..res5 by a ViTDet
  pyramid; ``vss.vit_adapter.ViTAdapter``: the same by DVIS++'s ViT-Adapter (``vit_neck``).

Readings and gaps:
- **Two necks.** ``vit_neck="adapter"`` is DVIS++'s ViT-Adapter (``vss/vit_adapter.py``: spatial
  prior module + 4 groups of deformable-attention extractors, no injectors), key for key with
  DVIS++'s ``D2VitAdapterDinoV2``; the ``vitl`` preset uses it. ``vit_neck="simple"`` is a
  lighter alternative: a ViTDet "simple feature pyramid" (Li et al., ECCV 2022, §3; layers as in
  detectron2's ``SimpleFeaturePyramid``: deconvs for strides 4 and 8, identity for 16, max-pool
  for 32, then 1x1 + 3x3 convs with LayerNorm). Each level reads a different block (default: the
  last block of each quarter of the ViT, i.e. blocks 5/11/17/23 of ViT-L, where the adapter's
  four interaction stages end), shallow blocks for fine strides as in DPT (Ranftl et al., ICCV
  2021); set all four to the last block for ViTDet's single-input form. It is not DVIS++'s
  backbone and will not reproduce the ViT-L numbers.
- **Stride 16 from DINOv2's 14x14 patches, DVIS++'s way** (``vit_patch_size=16``, the ``vitl``
  preset): the ViT is built with 16x16 patches and ``img_size`` 592 (37 x 37 = DINOv2's position
  grid, so ``pos_embed`` loads unchanged), and ``load_backbone_weights`` resizes the released
  14x14 kernel to 16x16 bilinearly with ``align_corners=True`` (``resize_patch_kernel``; DVIS++
  ``backbones_vitAdapter/backbones.py::load_pretrained_weights``). Positions are interpolated as
  DINOv2 (and DVIS++'s copy of it) does: bicubic, scale factor (H/16 + 0.1) / 37, no antialias.
  With ``vit_patch_size=14`` (the simple neck only) the ViT keeps DINOv2's kernel and the *image*
  is resized by 14/16 instead, so one token still covers 16x16 input pixels. In both cases the
  image is first zero-padded (0 = the mean after normalisation) to a multiple of 32, and the maps
  are cropped back to ceil(H/s) x ceil(W/s), the sizes a ResNet gives, so every backbone is
  interchangeable for any H, W.
- DINOv2's own ``PatchEmbed`` rejects sizes that are not multiples of the patch (it asserts);
  ``DinoVisionTransformer.forward_features`` raises ``ValueError`` likewise. Only the neck pads.
- ``fc`` (the ImageNet classifier) is not part of ``ResNet``: an unused 2M-parameter head would
  get no gradient, which DDP rejects. ``load_backbone_weights`` drops exactly ``fc.weight`` /
  ``fc.bias`` from a torchvision file and loads everything else with strict semantics.
- ``mask_token`` (iBOT masked-image training) is kept so DINOv2 files load strictly, but it is
  never used by segmentation, so ``ViTBackbone`` sets ``requires_grad=False`` on it.
- Stochastic depth (``drop_path``) is not implemented: DVIS++ keeps the ViT frozen.
- ``ResNet`` also takes detectron2's separate stem / first-stage output widths
  (``STEM_OUT_CHANNELS``, ``RES2_OUT_CHANNELS``), used only by narrow test models; the released
  detectron2 ResNets have the torchvision layout, and ``vss.convert_dvis`` renames their keys.
- Inputs are normalised with ImageNet mean/std in 0..255 space (``DataConfig``); torchvision and
  DINOv2 were trained with the same statistics in 0..1 space, which is the same normalised input.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
from torch import nn, Tensor
import torch.nn.functional as F

from vss.config import ModelConfig

LEVELS = ("res2", "res3", "res4", "res5")
STRIDES = {"res2": 4, "res3": 8, "res4": 16, "res5": 32}


# --------------------------------------------------------------------------------------------
# ResNet (torchvision layout)
# --------------------------------------------------------------------------------------------


class FrozenBatchNorm2d(nn.Module):
    """BatchNorm2d with fixed statistics and affine parameters (all buffers, no parameters).

    State-dict keys equal ``nn.BatchNorm2d``'s (weight, bias, running_mean, running_var,
    num_batches_tracked), so frozen and trainable ResNets share checkpoints. A missing
    ``num_batches_tracked`` is filled with 0, as ``nn.BatchNorm2d`` does for old state dicts.
    """

    def __init__(self, num_features: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.register_buffer("weight", torch.ones(num_features))
        self.register_buffer("bias", torch.zeros(num_features))
        self.register_buffer("running_mean", torch.zeros(num_features))
        self.register_buffer("running_var", torch.ones(num_features))
        self.register_buffer("num_batches_tracked", torch.tensor(0, dtype=torch.long))

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        state_dict.setdefault(prefix + "num_batches_tracked", torch.tensor(0, dtype=torch.long))
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def forward(self, x: Tensor) -> Tensor:
        scale = self.weight * (self.running_var + self.eps).rsqrt()  # (C,)
        shift = self.bias - self.running_mean * scale  # (C,)
        return x * scale[None, :, None, None] + shift[None, :, None, None]  # (N,C,H,W)

    def extra_repr(self) -> str:
        return f"{self.weight.shape[0]}, eps={self.eps}"


def _norm(channels: int, frozen: bool) -> nn.Module:
    return FrozenBatchNorm2d(channels) if frozen else nn.BatchNorm2d(channels)


class BasicBlock(nn.Module):
    """Two 3x3 convs (ResNet-18/34); stride in the first conv."""

    expansion = 1

    def __init__(self, inplanes: int, planes: int, stride: int, frozen_bn: bool):
        super().__init__()
        self.conv1 = nn.Conv2d(inplanes, planes, 3, stride, 1, bias=False)
        self.bn1 = _norm(planes, frozen_bn)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = _norm(planes, frozen_bn)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = _downsample(inplanes, planes, stride, frozen_bn)

    def forward(self, x: Tensor) -> Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + identity)


class Bottleneck(nn.Module):
    """1x1 -> 3x3 -> 1x1 (x4) convs (ResNet-50/101); stride in the 3x3 conv (torchvision
    "ResNet v1.5", detectron2 ``STRIDE_IN_1X1: False``). ``outplanes`` defaults to 4 x planes;
    detectron2 sets it apart (``RES2_OUT_CHANNELS`` vs ``WIDTH_PER_GROUP``)."""

    expansion = 4

    def __init__(self, inplanes: int, planes: int, stride: int, frozen_bn: bool, outplanes: int | None = None):
        super().__init__()
        outplanes = outplanes or planes * self.expansion
        self.conv1 = nn.Conv2d(inplanes, planes, 1, bias=False)
        self.bn1 = _norm(planes, frozen_bn)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride, 1, bias=False)
        self.bn2 = _norm(planes, frozen_bn)
        self.conv3 = nn.Conv2d(planes, outplanes, 1, bias=False)
        self.bn3 = _norm(outplanes, frozen_bn)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = _downsample(inplanes, outplanes, stride, frozen_bn)

    def forward(self, x: Tensor) -> Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.relu(out + identity)


def _downsample(inplanes: int, outplanes: int, stride: int, frozen_bn: bool) -> nn.Module | None:
    if stride == 1 and inplanes == outplanes:
        return None
    # Keys downsample.0 (conv) / downsample.1 (norm), as torchvision.
    return nn.Sequential(nn.Conv2d(inplanes, outplanes, 1, stride, bias=False), _norm(outplanes, frozen_bn))


RESNET_SPECS = {
    "resnet18": (BasicBlock, (2, 2, 2, 2)),
    "resnet34": (BasicBlock, (3, 4, 6, 3)),
    "resnet50": (Bottleneck, (3, 4, 6, 3)),
    "resnet101": (Bottleneck, (3, 4, 23, 3)),
}


class ResNet(nn.Module):
    """torchvision ResNet without the classifier; returns the four stage outputs.

    Args:
        depth: one of ``RESNET_SPECS`` ("resnet18", "resnet34", "resnet50", "resnet101").
        width: first-stage (bottleneck) width, doubled per stage; 64 is torchvision (smaller
            only for tests).
        frozen_bn: ``FrozenBatchNorm2d`` instead of ``nn.BatchNorm2d`` (DVIS++ R50 default).
        stem_channels: stem width (detectron2 ``STEM_OUT_CHANNELS``); 0 = ``width``.
        res2_channels: output channels of the first stage, doubled per stage (detectron2
            ``RES2_OUT_CHANNELS``; bottleneck ResNets only); 0 = ``width * expansion``. The
            torchvision layout is the default; narrow detectron2 test models set these apart.
    """

    def __init__(
        self,
        depth: str = "resnet50",
        *,
        width: int = 64,
        frozen_bn: bool = False,
        stem_channels: int = 0,
        res2_channels: int = 0,
    ):
        super().__init__()
        if depth not in RESNET_SPECS:
            raise ValueError(f"unknown ResNet {depth!r}; choose from {sorted(RESNET_SPECS)}")
        block, counts = RESNET_SPECS[depth]
        if block is BasicBlock and res2_channels not in (0, width):
            raise ValueError(f"{depth} has no bottleneck: res2_channels must equal width ({width})")
        stem_channels = stem_channels or width
        res2_channels = res2_channels or width * block.expansion
        self.depth = depth
        self.conv1 = nn.Conv2d(3, stem_channels, 7, 2, 3, bias=False)
        self.bn1 = _norm(stem_channels, frozen_bn)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, 2, 1)
        inplanes, self.out_channels = stem_channels, {}
        for i, (name, count) in enumerate(zip(LEVELS, counts)):
            planes, outplanes, stride = width * 2**i, res2_channels * 2**i, 1 if i == 0 else 2
            blocks = []
            for j in range(count):
                extra = {"outplanes": outplanes} if block is Bottleneck else {}
                blocks.append(block(inplanes, planes, stride if j == 0 else 1, frozen_bn, **extra))
                inplanes = outplanes
            self.add_module(f"layer{i + 1}", nn.Sequential(*blocks))
            self.out_channels[name] = inplanes
        self._init_weights()

    def _init_weights(self) -> None:
        # torchvision's init (zero_init_residual=False); BN weight 1 / bias 0 are the defaults.
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x: Tensor) -> dict[str, Tensor]:
        """Args:
            x: (N,3,H,W) normalised images.

        Returns:
            dict ``res2..res5``: (N,C_s,ceil(H/s),ceil(W/s)) for s = 4, 8, 16, 32.
        """
        if x.device.type == "cpu":
            # CPU: the stem and res2 run in channels-last. The max-pool is then vectorised over
            # the channels (~4x faster than NCHW's pixel-by-pixel kernel) and gets its gradient
            # in channels-last (NCHW's costs a conversion there and back: 14 vs 3 ms per step);
            # oneDNN's weight gradient of the 7x7 conv is faster and closer to float64 (relative
            # error 4e-6 vs 1e-3). A 3-channel input costs nothing to convert. The deeper stages
            # are no faster in channels-last, so every output is NCHW. Batch 2 at 240x320:
            # backbone forward + backward 392 vs 438 ms, forward alone equal.
            x = x.contiguous(memory_format=torch.channels_last)
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))  # (N,stem,H/4,W/4)
        out = {}
        for i, name in enumerate(LEVELS):
            x = getattr(self, f"layer{i + 1}")(x).contiguous()  # (N,C_s,H/s,W/s)
            out[name] = x
        return out


# --------------------------------------------------------------------------------------------
# DINOv2 ViT
# --------------------------------------------------------------------------------------------


class PatchEmbed(nn.Module):
    """Non-overlapping patch projection (N,3,H,W) -> (N,L,D); H and W must be multiples of the
    patch (as DINOv2's ``PatchEmbed``, which asserts)."""

    def __init__(self, patch_size: int, embed_dim: int):
        super().__init__()
        self.patch_size = patch_size
        self.proj = nn.Conv2d(3, embed_dim, patch_size, patch_size)

    def forward(self, x: Tensor) -> Tensor:
        H, W = x.shape[-2:]
        if H % self.patch_size or W % self.patch_size:
            raise ValueError(f"image size {H}x{W} is not a multiple of the patch {self.patch_size}")
        return self.proj(x).flatten(2).transpose(1, 2)  # (N,L,D), row-major over the grid


class Attention(nn.Module):
    """Multi-head self-attention with a fused qkv projection (DINOv2 ``Attention``)."""

    def __init__(self, dim: int, num_heads: int):
        super().__init__()
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, dim * 3)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: Tensor) -> Tensor:
        N, L, D = x.shape
        qkv = self.qkv(x).reshape(N, L, 3, self.num_heads, D // self.num_heads)  # (N,L,3,h,D/h)
        q, k, v = qkv.permute(2, 0, 3, 1, 4)  # each (N,heads,L,D/heads)
        x = F.scaled_dot_product_attention(q, k, v)  # (N,heads,L,D/heads); scale = head_dim^-0.5
        return self.proj(x.transpose(1, 2).reshape(N, L, D))  # (N,L,D)


class Mlp(nn.Module):
    """fc1 -> exact GELU -> fc2."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(self.act(self.fc1(x)))


class SwiGLUFFN(nn.Module):
    """SwiGLU FFN of ViT-g/14 (DINOv2 ``SwiGLUFFNFused``): w3(silu(x1) * x2), [x1|x2] = w12(x).
    The hidden size is 2/3 of ``hidden`` rounded up to a multiple of 8 (6144 -> 4096)."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        hidden = (int(hidden * 2 / 3) + 7) // 8 * 8
        self.w12 = nn.Linear(dim, 2 * hidden)
        self.w3 = nn.Linear(hidden, dim)

    def forward(self, x: Tensor) -> Tensor:
        x1, x2 = self.w12(x).chunk(2, dim=-1)  # (N,L,hidden) each
        return self.w3(F.silu(x1) * x2)


class LayerScale(nn.Module):
    def __init__(self, dim: int, init_values: float):
        super().__init__()
        self.gamma = nn.Parameter(torch.full((dim,), float(init_values)))

    def forward(self, x: Tensor) -> Tensor:
        return x * self.gamma


class Block(nn.Module):
    """Pre-norm transformer block: x + ls1(attn(norm1(x))), then x + ls2(mlp(norm2(x)))."""

    def __init__(self, dim: int, num_heads: int, mlp_hidden: int, ffn: str, init_values: float | None):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = Attention(dim, num_heads)
        self.ls1 = LayerScale(dim, init_values) if init_values else nn.Identity()
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = SwiGLUFFN(dim, mlp_hidden) if ffn == "swiglu" else Mlp(dim, mlp_hidden)
        self.ls2 = LayerScale(dim, init_values) if init_values else nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.ls1(self.attn(self.norm1(x)))  # (N,L,D)
        return x + self.ls2(self.mlp(self.norm2(x)))  # (N,L,D)


class DinoVisionTransformer(nn.Module):
    """DINOv2 ViT (``block_chunks=0`` layout: keys ``blocks.<i>.*``).

    Args:
        img_size: pretraining size; ``pos_embed`` has 1 + (img_size/patch)^2 tokens.
        patch_size: 14 for the released DINOv2 models.
        embed_dim, depth, num_heads: D, number of blocks, heads.
        mlp_ratio: FFN hidden = mlp_ratio * D (before SwiGLU's 2/3 rounding).
        ffn: "mlp" or "swiglu" (ViT-g/14).
        init_values: LayerScale init (1.0 in the hub models); None = no LayerScale.
        num_register_tokens: 0, or 4 for the ``*_reg`` models.
        interpolate_antialias, interpolate_offset: pos-embed interpolation; the hub models use
            (False, 0.1) without registers and (True, 0.0) with registers.
    """

    def __init__(
        self,
        *,
        img_size: int = 518,
        patch_size: int = 14,
        embed_dim: int = 768,
        depth: int = 12,
        num_heads: int = 12,
        mlp_ratio: float = 4.0,
        ffn: str = "mlp",
        init_values: float | None = 1.0,
        num_register_tokens: int = 0,
        interpolate_antialias: bool = False,
        interpolate_offset: float = 0.1,
    ):
        super().__init__()
        if ffn not in ("mlp", "swiglu"):
            raise ValueError(f"ffn must be 'mlp' or 'swiglu', got {ffn!r}")
        self.patch_size, self.embed_dim = patch_size, embed_dim
        self.num_register_tokens = num_register_tokens
        self.interpolate_antialias = interpolate_antialias
        self.interpolate_offset = interpolate_offset
        grid = img_size // patch_size
        self.patch_embed = PatchEmbed(patch_size, embed_dim)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, 1 + grid * grid, embed_dim))
        self.register_tokens = None
        if num_register_tokens:
            self.register_tokens = nn.Parameter(torch.zeros(1, num_register_tokens, embed_dim))
        hidden = int(embed_dim * mlp_ratio)
        self.blocks = nn.ModuleList(Block(embed_dim, num_heads, hidden, ffn, init_values) for _ in range(depth))
        self.norm = nn.LayerNorm(embed_dim, eps=1e-6)
        self.mask_token = nn.Parameter(torch.zeros(1, embed_dim))
        self._init_weights()

    def _init_weights(self) -> None:
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        nn.init.normal_(self.cls_token, std=1e-6)
        if self.register_tokens is not None:
            nn.init.normal_(self.register_tokens, std=1e-6)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                nn.init.zeros_(m.bias)

    def interpolate_pos_encoding(self, num_tokens: int, H: int, W: int) -> Tensor:
        """Position embeddings for an H x W image, (1, 1 + L, D).

        DINOv2's exact rule: unchanged when the grid has as many tokens as the pretraining grid
        *and* the image is square; otherwise bicubic interpolation of the M x M grid in float32
        with ``scale_factor = ((H/p + offset)/M, (W/p + offset)/M)``. The offset (0.1) makes the
        floor in the output size safe, and because a scale factor (not a size) is passed, the
        sampling positions use exactly that factor: passing ``size=`` gives different numbers.
        """
        N = self.pos_embed.shape[1] - 1
        if num_tokens == N and H == W:
            return self.pos_embed
        M = math.isqrt(N)
        Hp, Wp = H // self.patch_size, W // self.patch_size
        grid = self.pos_embed[:, 1:].float().reshape(1, M, M, -1).permute(0, 3, 1, 2)  # (1,D,M,M)
        if self.interpolate_offset:
            offset = self.interpolate_offset
            sizing = {"scale_factor": ((Hp + offset) / M, (Wp + offset) / M)}
        else:
            sizing = {"size": (Hp, Wp)}
        grid = F.interpolate(grid, mode="bicubic", antialias=self.interpolate_antialias, **sizing)
        if grid.shape[-2:] != (Hp, Wp):
            got = tuple(grid.shape[-2:])
            raise RuntimeError(f"pos-embed interpolation gave {got}, expected {(Hp, Wp)}")
        patch_pos = grid.permute(0, 2, 3, 1).reshape(1, Hp * Wp, -1)  # (1,L,D)
        cls_pos = self.pos_embed[:, :1].float()  # (1,1,D)
        return torch.cat([cls_pos, patch_pos], dim=1).to(self.pos_embed.dtype)  # (1,1+L,D)

    def prepare_tokens(self, x: Tensor, masks: Tensor | None = None) -> Tensor:
        """(N,3,H,W) -> (N, 1 + R + L, D): [cls | registers | patches], positions added to cls
        and patches only (registers carry none). ``masks`` (N,L) bool replaces patches by
        ``mask_token`` (iBOT)."""
        H, W = x.shape[-2:]
        tokens = self.patch_embed(x)  # (N,L,D)
        if masks is not None:
            tokens = torch.where(masks.unsqueeze(-1), self.mask_token.to(tokens.dtype), tokens)
        tokens = torch.cat([self.cls_token.expand(len(tokens), -1, -1), tokens], dim=1)  # (N,1+L,D)
        tokens = tokens + self.interpolate_pos_encoding(tokens.shape[1] - 1, H, W).to(tokens.dtype)
        if self.register_tokens is not None:
            regs = self.register_tokens.expand(len(tokens), -1, -1)  # (N,R,D)
            tokens = torch.cat([tokens[:, :1], regs, tokens[:, 1:]], dim=1)  # (N,1+R+L,D)
        return tokens

    def forward_features(self, x: Tensor, masks: Tensor | None = None) -> dict[str, Tensor]:
        """Args:
            x: (N,3,H,W) normalised images, H and W multiples of the patch.
            masks: optional (N,L) bool, True = replace that patch by ``mask_token``.

        Returns:
            dict ``x_norm_clstoken`` (N,D), ``x_norm_regtokens`` (N,R,D),
            ``x_norm_patchtokens`` (N,L,D) with L = (H/p)*(W/p) row-major, ``x_prenorm``
            (N,1+R+L,D).
        """
        x = self.prepare_tokens(x, masks)
        for blk in self.blocks:
            x = blk(x)
        x_norm = self.norm(x)  # (N,1+R+L,D)
        R = self.num_register_tokens
        return {
            "x_norm_clstoken": x_norm[:, 0],
            "x_norm_regtokens": x_norm[:, 1 : R + 1],
            "x_norm_patchtokens": x_norm[:, R + 1 :],
            "x_prenorm": x,
        }

    def intermediate_patch_tokens(self, x: Tensor, indices: list[int]) -> list[Tensor]:
        """Patch tokens after blocks ``indices`` (0-based), each passed through the final
        ``norm`` (DINOv2 ``get_intermediate_layers(norm=True)``): list of (N,L,D)."""
        bad = [i for i in indices if not 0 <= i < len(self.blocks)]
        if bad:
            raise ValueError(f"block indices {bad} out of range for a {len(self.blocks)}-block ViT")
        x = self.prepare_tokens(x)
        start = 1 + self.num_register_tokens
        taken = {}
        for i, blk in enumerate(self.blocks[: max(indices) + 1]):
            x = blk(x)
            if i in indices:
                taken[i] = self.norm(x[:, start:])  # (N,L,D)
        return [taken[i] for i in indices]


VIT_SPECS = {  # embed_dim, depth, num_heads, ffn (DINOv2 vit_small/base/large/giant2)
    "vit_small": (384, 12, 6, "mlp"),
    "vit_base": (768, 12, 12, "mlp"),
    "vit_large": (1024, 24, 16, "mlp"),
    "vit_giant2": (1536, 40, 24, "swiglu"),
}


def build_vit(name: str, *, patch_size: int = 14, num_register_tokens: int = 0) -> DinoVisionTransformer:
    """A DINOv2 ViT with the torch-hub settings of ``dinov2_vit{s,b,l,g}14[_reg]``: img_size
    518 (37x37 grid at patch 14; 37*patch otherwise), LayerScale 1.0, and pos-embed interpolation
    (antialias False, offset 0.1) or, with registers, (antialias True, offset 0.0)."""
    if name not in VIT_SPECS:
        raise ValueError(f"unknown ViT {name!r}; choose from {sorted(VIT_SPECS)}")
    embed_dim, depth, num_heads, ffn = VIT_SPECS[name]
    return DinoVisionTransformer(
        img_size=37 * patch_size,
        patch_size=patch_size,
        embed_dim=embed_dim,
        depth=depth,
        num_heads=num_heads,
        ffn=ffn,
        init_values=1.0,
        num_register_tokens=num_register_tokens,
        interpolate_antialias=num_register_tokens > 0,
        interpolate_offset=0.0 if num_register_tokens > 0 else 0.1,
    )


# --------------------------------------------------------------------------------------------
# Simple multi-scale neck (ViTDet pyramid; the ViT-Adapter neck is vss/vit_adapter.py)
# --------------------------------------------------------------------------------------------


class LayerNorm2d(nn.Module):
    """LayerNorm over channels of an (N,C,H,W) map (ViTDet's norm in the simple pyramid)."""

    def __init__(self, channels: int, eps: float = 1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(channels))
        self.bias = nn.Parameter(torch.zeros(channels))
        self.eps = eps

    def forward(self, x: Tensor) -> Tensor:
        x = F.layer_norm(x.permute(0, 2, 3, 1), x.shape[1:2], self.weight, self.bias, self.eps)
        return x.permute(0, 3, 1, 2)  # (N,C,H,W)


class SimpleFeaturePyramid(nn.Module):
    """ViTDet's simple feature pyramid: four stride-16 token maps -> strides 4/8/16/32.

    Args:
        embed_dim: D of the ViT.
        out_dim: channels of every output level.
    """

    def __init__(self, embed_dim: int, out_dim: int):
        super().__init__()
        D = embed_dim
        self.resample = nn.ModuleList(
            [
                nn.Sequential(  # stride 16 -> 4
                    nn.ConvTranspose2d(D, D // 2, 2, 2),
                    LayerNorm2d(D // 2),
                    nn.GELU(),
                    nn.ConvTranspose2d(D // 2, D // 4, 2, 2),
                ),
                nn.ConvTranspose2d(D, D // 2, 2, 2),  # 16 -> 8
                nn.Identity(),  # 16
                nn.MaxPool2d(2, 2),  # 16 -> 32
            ]
        )
        self.output = nn.ModuleList(
            nn.Sequential(
                nn.Conv2d(c, out_dim, 1, bias=False),
                LayerNorm2d(out_dim),
                nn.Conv2d(out_dim, out_dim, 3, padding=1, bias=False),
                LayerNorm2d(out_dim),
            )
            for c in (D // 4, D // 2, D, D)
        )

    def forward(self, maps: list[Tensor]) -> dict[str, Tensor]:
        """Args:
            maps: four (N,D,H/16,W/16) token maps, for res2..res5 in that order.

        Returns:
            dict ``res2..res5``: (N,out_dim,H/s,W/s).
        """
        return {name: out(resample(m)) for name, m, resample, out in zip(LEVELS, maps, self.resample, self.output)}


def default_neck_layers(depth: int) -> list[int]:
    """The last block of each quarter of the ViT: [5, 11, 17, 23] for 24 blocks."""
    return [max(0, depth * q // 4 - 1) for q in (1, 2, 3, 4)]


class ViTBackbone(nn.Module):
    """DINOv2 ViT + simple feature pyramid with the ``res2..res5`` contract of ``ResNet``.

    Args:
        vit: the ViT.
        out_dim: channels of every level.
        freeze_vit: ViT parameters get no gradient and run under ``no_grad`` (DVIS++
            ``FREEZE_VIT: True``); the neck always trains.
        layers: 4 block indices feeding res2..res5 (default ``default_neck_layers``).
    """

    def __init__(
        self,
        vit: DinoVisionTransformer,
        *,
        out_dim: int,
        freeze_vit: bool = True,
        layers: list[int] | None = None,
    ):
        super().__init__()
        self.vit = vit
        self.neck = SimpleFeaturePyramid(vit.embed_dim, out_dim)
        self.layers = list(layers) if layers is not None else default_neck_layers(len(vit.blocks))
        if len(self.layers) != 4:
            raise ValueError(f"layers must name 4 blocks (res2..res5), got {self.layers}")
        self.freeze_vit = freeze_vit
        self.vit.requires_grad_(not freeze_vit)
        # iBOT-only token, never used here; DDP rejects trainable parameters without gradient.
        self.vit.mask_token.requires_grad_(False)
        self.out_channels = {name: out_dim for name in LEVELS}

    def forward(self, x: Tensor) -> dict[str, Tensor]:
        """Args:
            x: (N,3,H,W) normalised images, any H, W.

        Returns:
            dict ``res2..res5``: (N,out_dim,ceil(H/s),ceil(W/s)) for s = 4, 8, 16, 32.
        """
        H, W = x.shape[-2:]
        # 1. Pad to a multiple of 32 (0 = mean) so every level is whole, then rescale so one
        #    patch of p pixels covers 16 input pixels: the token grid is the stride-16 map.
        Hp, Wp = -(-H // 32) * 32, -(-W // 32) * 32
        x = F.pad(x, (0, Wp - W, 0, Hp - H))  # (N,3,Hp,Wp)
        p = self.vit.patch_size
        if p != 16:
            size = (Hp // 16 * p, Wp // 16 * p)
            x = F.interpolate(x, size=size, mode="bilinear", align_corners=False)  # (N,3,·,·)
        # 2. Tokens of the chosen blocks, as (N,D,Hp/16,Wp/16) maps.
        with torch.set_grad_enabled(torch.is_grad_enabled() and not self.freeze_vit):
            tokens = self.vit.intermediate_patch_tokens(x, self.layers)  # 4 x (N,L,D)
        maps = [t.transpose(1, 2).reshape(len(t), -1, Hp // 16, Wp // 16) for t in tokens]
        # 3. Pyramid, cropped back to the sizes a ResNet gives for H x W.
        feats = self.neck(maps)
        return {
            name: f[..., : -(-H // STRIDES[name]), : -(-W // STRIDES[name])]  # (N,C,ceil(H/s),·)
            for name, f in feats.items()
        }


# --------------------------------------------------------------------------------------------
# Builders and weight loading
# --------------------------------------------------------------------------------------------


def build_backbone(cfg: ModelConfig) -> nn.Module:
    """The backbone named by ``cfg.backbone``.

    Args:
        cfg: uses ``backbone``, ``resnet_width``, ``frozen_bn`` (ResNets), ``vit_patch_size``,
            ``vit_num_registers``, ``freeze_vit``, ``vit_neck`` and ``conv_dim`` (neck width).

    Returns:
        a module mapping (N,3,H,W) normalised images to dict ``res2..res5`` at strides
        4/8/16/32, with ``out_channels: dict[str, int]``.
    """
    if cfg.backbone in RESNET_SPECS:
        return ResNet(
            cfg.backbone,
            width=cfg.resnet_width,
            frozen_bn=cfg.frozen_bn,
            stem_channels=cfg.resnet_stem_channels,
            res2_channels=cfg.resnet_res2_channels,
        )
    if cfg.backbone in VIT_SPECS:
        if cfg.vit_neck not in ("simple", "adapter"):
            raise ValueError(f"vit_neck must be 'simple' or 'adapter', got {cfg.vit_neck!r}")
        vit = build_vit(cfg.backbone, patch_size=cfg.vit_patch_size, num_register_tokens=cfg.vit_num_registers)
        if cfg.vit_neck == "adapter":
            from vss.vit_adapter import ViTAdapter  # its own paper component; imported late on purpose

            if cfg.vit_patch_size != 16:
                raise ValueError(f"vit_neck='adapter' needs vit_patch_size=16 (DVIS++), got {cfg.vit_patch_size}")
            return ViTAdapter(vit, freeze_vit=cfg.freeze_vit)
        return ViTBackbone(vit, out_dim=cfg.conv_dim, freeze_vit=cfg.freeze_vit)
    names = sorted(RESNET_SPECS) + sorted(VIT_SPECS)
    raise ValueError(f"unknown backbone {cfg.backbone!r}; choose from {names}")


def resize_patch_kernel(weight: Tensor, patch_size: int) -> Tensor:
    """DVIS++'s patch-kernel resize (``backbones_vitAdapter/backbones.py::load_pretrained_weights``):
    the (D,3,p,p) patch-embedding kernel bilinearly resized to (D,3,patch_size,patch_size) with
    ``align_corners=True`` (corner taps kept; no rescaling of the values, so a patch of 16x16
    pixels sums about (16/14)^2 more than DINOv2's 14x14 patch did, as in DVIS++).

    Args:
        weight: (D,3,p,p) kernel, e.g. DINOv2's (1024,3,14,14).
        patch_size: target p' (16).
    Returns:
        (D,3,p',p') in the input's dtype.
    """
    out = F.interpolate(weight.float(), size=(patch_size, patch_size), mode="bilinear", align_corners=True)
    return out.to(weight.dtype)


def _list(keys: list[str], limit: int = 8) -> str:
    more = f" ... (+{len(keys) - limit} more)" if len(keys) > limit else ""
    return ", ".join(keys[:limit]) + more


def load_backbone_weights(backbone: nn.Module, path: str | Path) -> None:
    """Load a torchvision ResNet ``.pth`` or a DINOv2 ``.pth`` into a backbone, strictly.

    A ResNet file's ImageNet classifier (``fc.weight``, ``fc.bias``) is dropped; every other key
    must match in name and shape (a missing ``num_batches_tracked`` is filled with 0, as
    ``nn.BatchNorm2d`` does). For a ``ViTBackbone`` or ``ViTAdapter`` the file is loaded into
    ``backbone.vit`` (the neck starts from its init); a 14x14 DINOv2 patch kernel going into a
    ViT built with 16x16 patches is resized as DVIS++ does (``resize_patch_kernel``).

    Args:
        backbone: a ``ResNet``, ``ViTBackbone``, ``ViTAdapter`` or ``DinoVisionTransformer``.
        path: the state-dict file (``torch.load(weights_only=True)``).

    Raises:
        FileNotFoundError: no such file.
        ValueError: unreadable file, not a state dict, or mismatching keys/shapes (named).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"backbone weights not found: {path}")
    try:
        sd = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - any unpickling failure is a bad file
        raise ValueError(f"{path}: cannot read backbone weights ({type(e).__name__}: {e})") from e
    if not isinstance(sd, dict) or not all(isinstance(v, Tensor) for v in sd.values()):
        hint = ""
        if isinstance(sd, dict) and "model" in sd:
            hint = " (it looks like a vss checkpoint: use vss.checkpoint.load_checkpoint)"
        raise ValueError(f"{path}: expected a state dict of tensors, got {type(sd).__name__}{hint}")
    target = backbone.vit if isinstance(getattr(backbone, "vit", None), DinoVisionTransformer) else backbone
    if isinstance(target, ResNet):
        sd = {k: v for k, v in sd.items() if k not in ("fc.weight", "fc.bias")}
    expected = target.state_dict()
    kernel = "patch_embed.proj.weight"
    if isinstance(target, DinoVisionTransformer) and kernel in sd and sd[kernel].dim() == 4:
        if sd[kernel].shape[-2:] != expected[kernel].shape[-2:]:
            sd = {**sd, kernel: resize_patch_kernel(sd[kernel], target.patch_size)}
    missing = [k for k in expected if k not in sd and not k.endswith("num_batches_tracked")]
    unexpected = [k for k in sd if k not in expected]
    shapes = [
        f"{k} {tuple(sd[k].shape)} vs {tuple(v.shape)}"
        for k, v in expected.items()
        if k in sd and sd[k].shape != v.shape
    ]
    if missing or unexpected or shapes:
        parts = [f"missing keys: {_list(missing)}"] if missing else []
        parts += [f"unexpected keys: {_list(unexpected)}"] if unexpected else []
        parts += [f"shape mismatch (file vs model): {_list(shapes)}"] if shapes else []
        raise ValueError(f"{path}: does not match the {type(target).__name__} backbone; " + "; ".join(parts))
    target.load_state_dict(sd, strict=True)
