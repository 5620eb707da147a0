"""Mask2Former's multi-scale deformable-attention pixel decoder.

Paper: Mask2Former (Cheng et al., CVPR 2022) §3.2.2 and §4 ("Pixel decoder": MSDeformAttn with
6 layers over the 1/32, 1/16 and 1/8 feature maps, plus an FPN-style upsampling to the 1/4 map for
the per-pixel embeddings); the encoder layer is Deformable DETR's (Zhu et al., ICLR 2021, §3,
Eq. 3). DVIS++ (`DVIS_Plus/mask2former/modeling/pixel_decoder/msdeformattn.py`) uses it unchanged.

Steps of `forward`:
 1. res5, res4, res3 (deepest first) -> 1x1 conv + GroupNorm(32) to conv_dim; sine position
    encoding (normalize=True, conv_dim/2 features per axis) + a learned per-level embedding.
 2. `enc_layers` post-norm deformable encoder layers over the 3 levels jointly (self-attention by
    MSDeformAttn, FFN with ReLU, dropout 0).
 3. One FPN level for res2: lateral 1x1 conv + GN, plus the bilinearly upsampled stride-8 output,
    then 3x3 conv + GN + ReLU.
 4. mask_features = 1x1 conv (mask_dim) of the stride-4 map.

Readings taken:
- Like the original (`@autocast(enabled=False)`), the whole decoder runs in fp32 even inside an
  autocast region (deformable sampling is not robust in half precision); the autocast is switched
  off for the input's device type, so this holds for CUDA fp16 and CPU bf16 alike.
- Module and parameter names follow Mask2Former (`input_proj`, `transformer.level_embed`,
  `adapter_1`, `layer_1`, `mask_features`; encoder layers `self_attn`, `norm1`, `linear1`,
  `linear2`, `norm2`) except `transformer.layers.*`, which is `transformer.encoder.layers.*` there.
- The number of FPN levels is fixed at one (res2): the transformer always sees res3..res5 and the
  masks are always at stride 4 (`COMMON_STRIDE: 4`).
"""

from __future__ import annotations

import torch
from torch import nn, Tensor
import torch.nn.functional as F

from vss.deform_attn import encoder_reference_points, MSDeformAttn
from vss.layers import c2_xavier_fill, Conv2dNorm, sine_position_embedding, xavier_fill_matrices

ENCODER_FEATURES = ("res5", "res4", "res3")  # deepest first, the order of the encoder levels
FPN_FEATURE = "res2"


class DeformableEncoderLayer(nn.Module):
    """Post-norm encoder layer: x <- LN(x + MSDeformAttn(x + pos)); x <- LN(x + FFN(x))."""

    def __init__(self, *, d_model: int, d_ffn: int, n_levels: int, n_heads: int, n_points: int):
        super().__init__()
        self.self_attn = MSDeformAttn(d_model=d_model, n_levels=n_levels, n_heads=n_heads, n_points=n_points)
        self.norm1 = nn.LayerNorm(d_model)
        self.linear1 = nn.Linear(d_model, d_ffn)
        self.linear2 = nn.Linear(d_ffn, d_model)
        self.norm2 = nn.LayerNorm(d_model)

    def forward(
        self,
        x: Tensor,
        pos: Tensor,
        reference_points: Tensor,
        spatial_shapes: list[tuple[int, int]],
    ) -> Tensor:
        """x (N, S, D), pos broadcastable to x, reference_points (1, S, 1, 2) -> (N, S, D)."""
        x = self.norm1(x + self.self_attn(x + pos, reference_points, x, spatial_shapes))
        return self.norm2(x + self.linear2(F.relu(self.linear1(x))))


class DeformableEncoder(nn.Module):
    """A stack of deformable encoder layers plus the learned level embedding."""

    def __init__(
        self,
        *,
        d_model: int,
        d_ffn: int,
        num_layers: int,
        n_levels: int,
        n_heads: int,
        n_points: int,
    ):
        super().__init__()
        self.level_embed = nn.Parameter(torch.empty(n_levels, d_model))
        self.layers = nn.ModuleList(
            DeformableEncoderLayer(d_model=d_model, d_ffn=d_ffn, n_levels=n_levels, n_heads=n_heads, n_points=n_points)
            for _ in range(num_layers)
        )
        # Deformable DETR: xavier on every matrix, then MSDeformAttn's own init, normal level embed
        xavier_fill_matrices(self)
        for m in self.modules():
            if isinstance(m, MSDeformAttn):
                m.reset_parameters()
        nn.init.normal_(self.level_embed)

    def forward(self, srcs: list[Tensor]) -> list[Tensor]:
        """srcs: L maps (N, D, H_l, W_l) -> L encoded maps of the same shapes."""
        shapes = [(x.shape[-2], x.shape[-1]) for x in srcs]
        d = srcs[0].shape[1]
        tokens = torch.cat([x.flatten(2).transpose(1, 2) for x in srcs], dim=1)  # (N, S, D)
        # position encoding + level embedding, (1, S, D): the same for every image
        pos = [
            sine_position_embedding(h, w, d // 2, device=tokens.device).flatten(1).t() + self.level_embed[lvl]
            for lvl, (h, w) in enumerate(shapes)
        ]
        pos = torch.cat(pos)[None]  # (1, S, D)
        ref = encoder_reference_points(shapes, device=tokens.device)  # (1, S, 1, 2)
        for layer in self.layers:
            tokens = layer(tokens, pos, ref, shapes)
        sizes = [h * w for h, w in shapes]
        return [
            t.transpose(1, 2).reshape(t.shape[0], d, h, w)  # (N, D, H_l, W_l)
            for t, (h, w) in zip(tokens.split(sizes, dim=1), shapes)
        ]


class MSDeformAttnPixelDecoder(nn.Module):
    """Mask2Former pixel decoder (see the module docstring for the steps).

    Args:
        in_channels: channels of the backbone maps, keys res2..res5.
        conv_dim: width of the encoder and the FPN (`CONVS_DIM`).
        mask_dim: channels of mask_features (`MASK_DIM`).
        enc_layers: deformable encoder layers.
        enc_ffn_dim: FFN width of the encoder (1024 in Mask2Former, independent of the decoder's).
        enc_heads: MSDeformAttn heads.
        enc_points: sampling points per head and level.
    """

    def __init__(
        self,
        *,
        in_channels: dict[str, int],
        conv_dim: int,
        mask_dim: int,
        enc_layers: int,
        enc_ffn_dim: int,
        enc_heads: int,
        enc_points: int,
    ):
        super().__init__()
        missing = {FPN_FEATURE, *ENCODER_FEATURES} - set(in_channels)
        if missing:
            raise ValueError(f"pixel decoder needs backbone features {sorted(missing)}, got {sorted(in_channels)}")
        if conv_dim % 32:
            raise ValueError(f"conv_dim {conv_dim} must be a multiple of 32 (GroupNorm(32))")
        self.input_proj = nn.ModuleList(
            nn.Sequential(nn.Conv2d(in_channels[name], conv_dim, kernel_size=1), nn.GroupNorm(32, conv_dim))
            for name in ENCODER_FEATURES
        )
        for proj in self.input_proj:
            nn.init.xavier_uniform_(proj[0].weight, gain=1)
            nn.init.constant_(proj[0].bias, 0)
        self.transformer = DeformableEncoder(
            d_model=conv_dim,
            d_ffn=enc_ffn_dim,
            num_layers=enc_layers,
            n_levels=len(ENCODER_FEATURES),
            n_heads=enc_heads,
            n_points=enc_points,
        )
        # FPN level for res2; the names are Mask2Former's ("adapter" = lateral, "layer" = output)
        self.adapter_1 = Conv2dNorm(
            in_channels[FPN_FEATURE],
            conv_dim,
            kernel_size=1,
            bias=False,
            norm=nn.GroupNorm(32, conv_dim),
        )
        self.layer_1 = Conv2dNorm(
            conv_dim,
            conv_dim,
            kernel_size=3,
            padding=1,
            bias=False,
            norm=nn.GroupNorm(32, conv_dim),
            relu=True,
        )
        self.mask_features = nn.Conv2d(conv_dim, mask_dim, kernel_size=1)
        for conv in (self.adapter_1, self.layer_1, self.mask_features):
            c2_xavier_fill(conv)

    def forward(self, features: dict[str, Tensor]) -> tuple[Tensor, list[Tensor]]:
        """
        Args:
            features: backbone maps res2..res5, (N, C_l, H/4 .. H/32, W/4 .. W/32).
        Returns:
            mask_features (N, mask_dim, h, w) at stride 4, and multi_scale_features: 3 maps
            (N, conv_dim, ., .) at strides [32, 16, 8]; all float32.
        """
        with torch.autocast(device_type=features[FPN_FEATURE].device.type, enabled=False):
            # 1. project res5, res4, res3; 2. deformable encoder (position encodings added inside)
            srcs = [proj(features[name].float()) for proj, name in zip(self.input_proj, ENCODER_FEATURES)]
            # [(N, D, H/32, W/32), (N, D, H/16, W/16), (N, D, H/8, W/8)]
            multi_scale = self.transformer(srcs)
            # 3. FPN level at stride 4
            lateral = self.adapter_1(features[FPN_FEATURE].float())  # (N, D, h, w)
            up = F.interpolate(multi_scale[-1], size=lateral.shape[-2:], mode="bilinear", align_corners=False)
            fpn = self.layer_1(lateral + up)  # (N, D, h, w)
            # 4. per-pixel embeddings
            mask_features = self.mask_features(fpn)  # (N, mask_dim, h, w)
        return mask_features, multi_scale
