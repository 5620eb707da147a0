"""The ViT-Adapter as DVIS++ puts it on a frozen DINOv2 ViT-L: multi-scale maps res2..res5 for
the Mask2Former pixel decoder.

Paper: ViT-Adapter (Chen et al., ICLR 2023) §3.2-3.3: a convolutional *spatial prior module*
gives feature tokens at strides 8/16/32 (and a stride-4 map); the ViT is split into N blocks of
layers ("interactions"); after each block an *extractor* (Eq. 5-6: sparse cross-attention by
multi-scale deformable attention from the spatial tokens to the ViT tokens, then a ConvFFN with a
3x3 depthwise conv) updates the spatial tokens; the last interaction has two extra extractors.
The outputs are the spatial tokens plus the resized ViT maps of the four interactions, each
batch-normed.

What DVIS++ builds (``DVIS_Plus/mask2former/modeling/backbones_vitAdapter/adapter.py``,
``D2VitAdapterDinoV2`` with ``InteractionBlockWithCls_Efficient``, ``get_adapter_args('vitl')``),
and therefore what this module builds, key for key:
- **No injectors.** The paper's injector (spatial tokens -> ViT tokens, Eq. 4) is left out of
  the "Efficient" interaction block DVIS++ uses, so the ViT runs unchanged (and, with
  ``FINETUNE: False``, under ``no_grad``); only the extractors read it.
- Interactions over blocks [0-5], [6-11], [12-17], [18-23] of ViT-L (quarters of the depth);
  deformable attention with as many heads as the ViT (16), 4 points, one level (the stride-16 ViT
  tokens); ConvFFN ratio 0.25; LayerNorm eps 1e-6; ``conv_inplane`` 64.
- ``deform_ratio`` 0.5 is passed but DVIS++'s ``MSDeformAttn`` ignores it (value width = D), so
  ``value_proj`` is D x D here too.
- The ViT tokens fed to the extractors and added to the outputs are the blocks' raw outputs (no
  final ``norm``), with the class token carried through the blocks.
- The stride-32 ViT map is bilinearly resized by 0.5 (align_corners False), the stride-8/4 ones
  by 2 and 4; the stride-4 output is ``up(c2) + c1`` (a 2x2 transposed conv of the stride-8
  tokens plus the spatial prior's stride-4 map).
- The final norms are ``nn.SyncBatchNorm`` there and ``nn.BatchNorm2d`` here (same keys and,
  in eval mode, the same computation; a multi-GPU stage-1 run would convert them with
  ``nn.SyncBatchNorm.convert_sync_batchnorm``).
- The ViT is DINOv2 built with 16x16 patches (``img_size`` 592, 37 x 37 position grid): see
  ``vss.backbone.resize_patch_kernel`` for how the released 14x14 kernel is resized.

Inputs of any size are zero-padded to a multiple of 32 (DVIS++ pads with ``SIZE_DIVISIBILITY``
32 before the backbone; the token splits need it) and the maps cropped back to the sizes a
ResNet gives, as ``vss.backbone.ViTBackbone`` does.
"""

from __future__ import annotations

import math

import torch
from torch import nn, Tensor
import torch.nn.functional as F

from vss.deform_attn import encoder_reference_points, MSDeformAttn

LEVELS = ("res2", "res3", "res4", "res5")
STRIDES = {"res2": 4, "res3": 8, "res4": 16, "res5": 32}


def conv_bn_relu(cin: int, cout: int, stride: int) -> list[nn.Module]:
    return [nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True)]


class SpatialPriorModule(nn.Module):
    """ViT-Adapter §3.2 "spatial prior module": a ResNet-like stem and three stride-2 convs.

    Args:
        inplanes: stem width (64 in DVIS++).
        embed_dim: D of the ViT (every output is projected to it by a 1x1 conv).
    """

    def __init__(self, inplanes: int, embed_dim: int):
        super().__init__()
        self.stem = nn.Sequential(
            *conv_bn_relu(3, inplanes, 2),
            *conv_bn_relu(inplanes, inplanes, 1),
            *conv_bn_relu(inplanes, inplanes, 1),
            nn.MaxPool2d(kernel_size=3, stride=2, padding=1),
        )
        self.conv2 = nn.Sequential(*conv_bn_relu(inplanes, 2 * inplanes, 2))
        self.conv3 = nn.Sequential(*conv_bn_relu(2 * inplanes, 4 * inplanes, 2))
        self.conv4 = nn.Sequential(*conv_bn_relu(4 * inplanes, 4 * inplanes, 2))
        self.fc1 = nn.Conv2d(inplanes, embed_dim, 1)
        self.fc2 = nn.Conv2d(2 * inplanes, embed_dim, 1)
        self.fc3 = nn.Conv2d(4 * inplanes, embed_dim, 1)
        self.fc4 = nn.Conv2d(4 * inplanes, embed_dim, 1)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """x (N,3,H,W), H and W multiples of 32 -> c1 (N,D,H/4,W/4) as a map and c2, c3, c4 as
        tokens (N,H/8*W/8,D), (N,H/16*W/16,D), (N,H/32*W/32,D)."""
        c1 = self.stem(x)
        c2 = self.conv2(c1)
        c3 = self.conv3(c2)
        c4 = self.conv4(c3)
        tokens = [fc(c).flatten(2).transpose(1, 2) for fc, c in ((self.fc2, c2), (self.fc3, c3), (self.fc4, c4))]
        return self.fc1(c1), *tokens


class DWConv(nn.Module):
    """3x3 depthwise conv applied to each level of the concatenated stride-8/16/32 tokens."""

    def __init__(self, dim: int):
        super().__init__()
        self.dwconv = nn.Conv2d(dim, dim, 3, 1, 1, groups=dim)

    def forward(self, x: Tensor, sizes: list[tuple[int, int]]) -> Tensor:
        """x (N,S,C) with S = sum h*w over ``sizes`` -> (N,S,C)."""
        parts = x.split([h * w for h, w in sizes], dim=1)
        out = [
            self.dwconv(p.transpose(1, 2).unflatten(2, hw)).flatten(2).transpose(1, 2) for p, hw in zip(parts, sizes)
        ]  # each (N,h*w,C)
        return torch.cat(out, dim=1)


class ConvFFN(nn.Module):
    """fc1 -> depthwise 3x3 conv -> GELU -> fc2 (ViT-Adapter Eq. 6)."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.dwconv = DWConv(hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: Tensor, sizes: list[tuple[int, int]]) -> Tensor:
        return self.fc2(self.act(self.dwconv(self.fc1(x), sizes)))


class Extractor(nn.Module):
    """ViT-Adapter extractor (Eq. 5-6): c <- c + MSDeformAttn(LN(c), LN(vit tokens));
    c <- c + ConvFFN(LN(c)).

    Args:
        dim: D.
        num_heads: deformable-attention heads.
        n_points: sampling points per head.
        cffn_ratio: ConvFFN hidden width / D.
    """

    def __init__(self, dim: int, num_heads: int, n_points: int, cffn_ratio: float):
        super().__init__()
        self.query_norm = nn.LayerNorm(dim, eps=1e-6)
        self.feat_norm = nn.LayerNorm(dim, eps=1e-6)
        self.attn = MSDeformAttn(d_model=dim, n_levels=1, n_heads=num_heads, n_points=n_points)
        self.ffn = ConvFFN(dim, int(dim * cffn_ratio))
        self.ffn_norm = nn.LayerNorm(dim, eps=1e-6)

    def forward(
        self,
        query: Tensor,
        reference_points: Tensor,
        feat: Tensor,
        feat_size: tuple[int, int],
        query_sizes: list[tuple[int, int]],
    ) -> Tensor:
        """
        Args:
            query: (N,S,D) spatial tokens of the levels ``query_sizes`` (strides 8/16/32).
            reference_points: (1,S,1,2) their pixel centres in [0, 1].
            feat: (N,h*w,D) ViT tokens on the ``feat_size`` = (h, w) grid.
        Returns:
            (N,S,D).
        """
        query = query + self.attn(self.query_norm(query), reference_points, self.feat_norm(feat), [feat_size])
        return query + self.ffn(self.ffn_norm(query), query_sizes)


class InteractionBlock(nn.Module):
    """One group of ViT blocks followed by an extractor (and two more in the last group): the
    ``InteractionBlockWithCls_Efficient`` of DVIS++ (no injector). The ViT blocks are not owned
    here (they stay in the ViT, so its keys are DINOv2's); ``ViTAdapter`` runs them."""

    def __init__(self, dim: int, num_heads: int, n_points: int, cffn_ratio: float, extra_extractor: bool):
        super().__init__()
        self.extractor = Extractor(dim, num_heads, n_points, cffn_ratio)
        self.extra_extractors = None
        if extra_extractor:
            self.extra_extractors = nn.Sequential(*(Extractor(dim, num_heads, n_points, cffn_ratio) for _ in range(2)))

    def forward(
        self,
        c: Tensor,
        reference_points: Tensor,
        x: Tensor,
        feat_size: tuple[int, int],
        query_sizes: list[tuple[int, int]],
    ) -> Tensor:
        c = self.extractor(c, reference_points, x, feat_size, query_sizes)
        for extractor in self.extra_extractors or []:
            c = extractor(c, reference_points, x, feat_size, query_sizes)
        return c


def interaction_indexes(depth: int, groups: int = 4) -> list[tuple[int, int]]:
    """First and last block of each interaction: equal groups, [(0,5),(6,11),(12,17),(18,23)]
    for ViT-L (DVIS++ ``get_adapter_args``; ViT-B: [(0,2),(3,5),(6,8),(9,11)])."""
    if depth % groups:
        raise ValueError(f"a ViT of depth {depth} cannot be split into {groups} interactions")
    size = depth // groups
    return [(g * size, (g + 1) * size - 1) for g in range(groups)]


class ViTAdapter(nn.Module):
    """DINOv2 ViT + ViT-Adapter with the ``res2..res5`` contract of ``vss.backbone.ResNet``.

    Parameter names follow DVIS++'s ``D2VitAdapterDinoV2`` except ``vit_module`` -> ``vit``
    (as ``ViTBackbone``), so its checkpoints convert by one prefix rename.

    Args:
        vit: ``vss.backbone.DinoVisionTransformer`` (16x16 patches in DVIS++).
        conv_inplane: spatial prior module width (64).
        n_points: deformable sampling points (4).
        num_heads: deformable-attention heads (default: the ViT's, 16 for ViT-L).
        cffn_ratio: ConvFFN width ratio (0.25).
        freeze_vit: the ViT gets no gradient and runs under ``no_grad`` (DVIS++ ``FREEZE_VIT``).
    """

    def __init__(
        self,
        vit: nn.Module,
        *,
        conv_inplane: int = 64,
        n_points: int = 4,
        num_heads: int | None = None,
        cffn_ratio: float = 0.25,
        freeze_vit: bool = True,
    ):
        super().__init__()
        dim = vit.embed_dim
        heads = num_heads or vit.blocks[0].attn.num_heads
        self.indexes = interaction_indexes(len(vit.blocks))
        self.level_embed = nn.Parameter(torch.zeros(3, dim))
        self.spm = SpatialPriorModule(conv_inplane, dim)
        self.interactions = nn.Sequential(
            *(
                InteractionBlock(dim, heads, n_points, cffn_ratio, extra_extractor=i == len(self.indexes) - 1)
                for i in range(len(self.indexes))
            )
        )
        self.up = nn.ConvTranspose2d(dim, dim, 2, 2)
        self.norm1, self.norm2, self.norm3, self.norm4 = (nn.BatchNorm2d(dim) for _ in range(4))
        for part in (self.up, self.spm, self.interactions):
            part.apply(_init_weights)
        for m in self.modules():
            if isinstance(m, MSDeformAttn):
                m.reset_parameters()
        nn.init.normal_(self.level_embed)
        self.vit = vit
        self.freeze_vit = freeze_vit
        self.vit.requires_grad_(not freeze_vit)
        # iBOT-only token, never used here; DDP rejects trainable parameters without gradient.
        self.vit.mask_token.requires_grad_(False)
        self.out_channels = {name: dim for name in LEVELS}

    def forward(self, x: Tensor) -> dict[str, Tensor]:
        """
        Args:
            x: (N,3,H,W) normalised images, any H, W.
        Returns:
            dict ``res2..res5``: (N,D,ceil(H/s),ceil(W/s)) for s = 4, 8, 16, 32.
        """
        H, W = x.shape[-2:]
        Hp, Wp = -(-H // 32) * 32, -(-W // 32) * 32
        x = F.pad(x, (0, Wp - W, 0, Hp - H))  # (N,3,Hp,Wp), 0 = the mean after normalisation
        n = x.shape[0]
        sizes = [(Hp // 8, Wp // 8), (Hp // 16, Wp // 16), (Hp // 32, Wp // 32)]  # spatial tokens
        grid = (Hp // 16, Wp // 16)  # ViT tokens
        if self.vit.patch_size != 16:
            raise ValueError(f"the ViT-Adapter needs a ViT with 16x16 patches, got {self.vit.patch_size}")
        reference_points = encoder_reference_points(sizes, device=x.device)  # (1,S,1,2)

        # 1. spatial prior: c1 a stride-4 map, c = [c2 | c3 | c4] tokens with level embeddings
        c1, c2, c3, c4 = self.spm(x)
        c = torch.cat([c2 + self.level_embed[0], c3 + self.level_embed[1], c4 + self.level_embed[2]], dim=1)

        # 2. ViT block groups, each followed by its extractor(s)
        vit_grad = torch.is_grad_enabled() and not self.freeze_vit
        with torch.set_grad_enabled(vit_grad):
            tokens = self.vit.prepare_tokens(x)  # (N,1+L,D) [cls | patches]
        maps = []
        for (first, last), interaction in zip(self.indexes, self.interactions):
            with torch.set_grad_enabled(vit_grad):
                for blk in self.vit.blocks[first : last + 1]:
                    tokens = blk(tokens)
            patches = tokens[:, 1:]  # (N,L,D)
            c = interaction(c, reference_points, patches, grid, sizes)
            maps.append(patches.transpose(1, 2).reshape(n, -1, *grid))  # (N,D,H/16,W/16)

        # 3. tokens back to maps; stride 4 = up(c2) + c1; plus the resized ViT maps; batch norms
        c2, c3, c4 = (
            t.transpose(1, 2).reshape(n, -1, h, w)
            for t, (h, w) in zip(c.split([h * w for h, w in sizes], dim=1), sizes)
        )
        c1 = self.up(c2) + c1
        resize = [4, 2, 1, 0.5]
        outs = {}
        for name, feat, vit_map, scale, norm in zip(
            LEVELS, (c1, c2, c3, c4), maps, resize, (self.norm1, self.norm2, self.norm3, self.norm4)
        ):
            if scale != 1:
                vit_map = F.interpolate(vit_map, scale_factor=scale, mode="bilinear", align_corners=False)
            out = norm(feat + vit_map)  # (N,D,Hp/s,Wp/s)
            outs[name] = out[..., : -(-H // STRIDES[name]), : -(-W // STRIDES[name])]
        return outs


def _init_weights(m: nn.Module) -> None:
    """ViT-Adapter's ``_init_weights``: trunc-normal Linear, unit norms, He-normal convs."""
    if isinstance(m, nn.Linear):
        nn.init.trunc_normal_(m.weight, std=0.02)
        if m.bias is not None:
            nn.init.zeros_(m.bias)
    elif isinstance(m, (nn.LayerNorm, nn.BatchNorm2d)):
        nn.init.ones_(m.weight)
        nn.init.zeros_(m.bias)
    elif isinstance(m, (nn.Conv2d, nn.ConvTranspose2d)):
        fan_out = m.kernel_size[0] * m.kernel_size[1] * m.out_channels // m.groups
        nn.init.normal_(m.weight, 0.0, math.sqrt(2.0 / fan_out))
        if m.bias is not None:
            nn.init.zeros_(m.bias)
