"""Multi-scale deformable attention (MSDeformAttn) on `F.grid_sample`.

Paper: Deformable DETR (Zhu et al., ICLR 2021) §3, Eq. (3) (multi-scale deformable attention):

    MSDeformAttn(z_q, p_q, {x^l}) =
        sum_m W_m [ sum_l sum_k A_mlqk * W'_m x^l(phi_l(p_q) + dp_mlqk) ]

with M heads, L levels, K (here P) points per head and level; the offsets dp and the weights A
(softmax over the L*P samples of a head) are linear functions of the query z_q. Used by the
Mask2Former pixel decoder (Mask2Former §4, "pixel decoder") as a 6-layer encoder.

Readings taken:
- The CUDA kernel of the original is replaced by its pure-PyTorch path: one bilinear
  `grid_sample` per level (zero padding, align_corners=False), which is what the kernel computes.
  A sampling location (x, y) in [0, 1] is a position on the feature map in units of its size:
  pixel centres are at ((j + 0.5) / W, (i + 0.5) / H).
- Offsets are normalised by the level size (2-d reference points); the 4-d "reference box" form of
  two-stage Deformable DETR is not needed by Mask2Former and is not implemented.
- Padding masks / valid ratios: Mask2Former feeds no padding mask (all valid ratios are 1), so
  reference points are plain pixel centres and `padding_mask` is optional.
- `value_ratio` (ViT-Adapter's `ratio`) lets the value width differ from the query width; 1.0 is
  Deformable DETR.
"""

from __future__ import annotations

import math
from typing import Sequence

import torch
from torch import nn, Tensor
import torch.nn.functional as F


def ms_deform_attn_core(
    value: Tensor,
    spatial_shapes: Sequence[tuple[int, int]],
    sampling_locations: Tensor,
    attention_weights: Tensor,
) -> Tensor:
    """The inner sum of Eq. (3): bilinear samples of every level, weighted and summed.

    Args:
        value: (N, S, M, Dh) per-head values of all levels flattened row-major and concatenated,
            S = sum_l H_l * W_l.
        spatial_shapes: L pairs (H_l, W_l) in the order of `value`.
        sampling_locations: (N, Lq, M, L, P, 2) as (x, y) in [0, 1] (outside = zero padding).
        attention_weights: (N, Lq, M, L, P).
    Returns:
        (N, Lq, M*Dh).
    """
    n, s, heads, dh = value.shape
    _, lq, _, n_levels, n_points, _ = sampling_locations.shape
    _check_shapes(s, n_levels, spatial_shapes)
    maps = value_maps(value, spatial_shapes)
    grids = (2 * sampling_locations - 1).permute(0, 2, 3, 4, 1, 5)  # (N, M, L, P, Lq, 2) in [-1, 1]
    weights = attention_weights.permute(0, 2, 3, 4, 1)  # (N, M, L, P, Lq)
    out = sample_and_sum(
        maps, grids.reshape(n * heads, n_levels, n_points, lq, 2), weights.reshape(n * heads, n_levels, n_points, lq)
    )  # (N*M, Dh, Lq)
    return out.view(n, heads * dh, lq).transpose(1, 2)  # (N, Lq, M*Dh)


def _check_shapes(s: int, n_levels: int, spatial_shapes: Sequence[tuple[int, int]]) -> None:
    sizes = [h * w for h, w in spatial_shapes]
    if sum(sizes) != s or len(sizes) != n_levels:
        raise ValueError(
            f"spatial_shapes {list(spatial_shapes)} do not match the value length {s} "
            f"or the {n_levels} levels of the sampling locations"
        )


def value_maps(value: Tensor, spatial_shapes: Sequence[tuple[int, int]]) -> list[Tensor]:
    """Split the flattened per-head values into one feature map per level and head.

    Args:
        value: (N, S, M, Dh), the levels flattened row-major and concatenated.
        spatial_shapes: L pairs (H_l, W_l).
    Returns:
        L maps (N*M, Dh, H_l, W_l).
    """
    n, _, heads, dh = value.shape
    sizes = [h * w for h, w in spatial_shapes]
    return [
        value_l.permute(0, 2, 3, 1).reshape(n * heads, dh, h, w)  # (N*M, Dh, H_l, W_l)
        for value_l, (h, w) in zip(value.split(sizes, dim=1), spatial_shapes)
    ]


def sample_and_sum(maps: list[Tensor], grids: Tensor, weights: Tensor) -> Tensor:
    """Bilinear samples of each level's map, weighted by the attention and summed over levels
    and points (zero padding, align_corners=False: pixel centres at (j + 0.5) / W).

    The points of a query are laid out along the grid's height and the queries along its width,
    (P, Lq) rather than (Lq, P): grid_sample's CPU kernel vectorises over the width, and the
    weighted sum over the points then reads (B, Dh, Lq) slices with Lq contiguous. Both are several
    times faster than with P = 4 innermost, for the same arithmetic.

    Args:
        maps: L maps (B, Dh, H_l, W_l), B = N*M (`value_maps`).
        grids: (B, L, P, Lq, 2) sampling locations as (x, y) in grid_sample's [-1, 1].
        weights: (B, L, P, Lq) attention weights.
    Returns:
        (B, Dh, Lq).
    """
    out = None
    for lvl, value_l in enumerate(maps):
        # (B, Dh, P, Lq)
        sampled = F.grid_sample(value_l, grids[:, lvl], mode="bilinear", padding_mode="zeros", align_corners=False)
        # sum over the points by accumulation: no temporary of the samples' size
        for s_p, w_p in zip(sampled.unbind(2), weights[:, lvl, :, None].unbind(1)):  # (B, Dh, Lq), (B, 1, Lq)
            out = s_p * w_p if out is None else torch.addcmul(out, s_p, w_p)
    return out


def encoder_reference_points(
    spatial_shapes: Sequence[tuple[int, int]], device: torch.device | str | None = None
) -> Tensor:
    """Reference points of an encoder whose queries are the pixels of all levels: each pixel's
    normalised centre ((j + 0.5) / W_l, (i + 0.5) / H_l), the same point on every level (valid
    ratios 1, i.e. no padding mask).

    Args:
        spatial_shapes: L pairs (H_l, W_l).
    Returns:
        (1, S, 1, 2) as (x, y); broadcasts over the batch and the levels in `MSDeformAttn`.
    """
    points = []
    for h, w in spatial_shapes:
        y = (torch.arange(h, dtype=torch.float32, device=device) + 0.5) / h  # (H_l,)
        x = (torch.arange(w, dtype=torch.float32, device=device) + 0.5) / w  # (W_l,)
        yy, xx = torch.meshgrid(y, x, indexing="ij")  # (H_l, W_l)
        points.append(torch.stack((xx, yy), dim=-1).reshape(-1, 2))  # (H_l*W_l, 2)
    return torch.cat(points)[None, :, None, :]  # (1, S, 1, 2)


class MSDeformAttn(nn.Module):
    """Multi-scale deformable attention (Deformable DETR Eq. 3).

    Args:
        d_model: query (and input) width D.
        n_levels: L feature levels.
        n_heads: M heads (D * value_ratio must be divisible by M).
        n_points: P sampling points per head and level.
        value_ratio: value width = D * value_ratio (ViT-Adapter's `ratio`; 1.0 = Deformable DETR).
    """

    def __init__(self, *, d_model: int, n_levels: int, n_heads: int, n_points: int, value_ratio: float = 1.0):
        super().__init__()
        value_dim = int(d_model * value_ratio)
        if value_dim % n_heads:
            raise ValueError(f"value width {value_dim} is not divisible by n_heads {n_heads}")
        self.d_model = d_model
        self.n_levels = n_levels
        self.n_heads = n_heads
        self.n_points = n_points
        self.value_dim = value_dim
        self.sampling_offsets = nn.Linear(d_model, n_heads * n_levels * n_points * 2)
        self.attention_weights = nn.Linear(d_model, n_heads * n_levels * n_points)
        self.value_proj = nn.Linear(d_model, value_dim)
        self.output_proj = nn.Linear(value_dim, d_model)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Deformable DETR's initialisation: offsets start on a ring of M directions (head m points
        towards angle 2*pi*m/M, scaled to the unit square's border), point k at distance k+1
        pixels; uniform attention weights (zero Linear); xavier value/output projections."""
        nn.init.constant_(self.sampling_offsets.weight, 0.0)
        angles = torch.arange(self.n_heads, dtype=torch.float32) * (2.0 * math.pi / self.n_heads)
        direction = torch.stack([angles.cos(), angles.sin()], -1)  # (M, 2)
        direction = direction / direction.abs().max(-1, keepdim=True).values
        distance = torch.arange(1, self.n_points + 1, dtype=torch.float32)  # (P,)
        grid = direction[:, None, None, :] * distance[None, None, :, None]  # (M, 1, P, 2)
        grid = grid.expand(self.n_heads, self.n_levels, self.n_points, 2)  # (M, L, P, 2)
        with torch.no_grad():
            self.sampling_offsets.bias.copy_(grid.reshape(-1))
        nn.init.constant_(self.attention_weights.weight, 0.0)
        nn.init.constant_(self.attention_weights.bias, 0.0)
        nn.init.xavier_uniform_(self.value_proj.weight)
        nn.init.constant_(self.value_proj.bias, 0.0)
        nn.init.xavier_uniform_(self.output_proj.weight)
        nn.init.constant_(self.output_proj.bias, 0.0)

    def forward(
        self,
        query: Tensor,
        reference_points: Tensor,
        input_flatten: Tensor,
        spatial_shapes: Sequence[tuple[int, int]],
        padding_mask: Tensor | None = None,
    ) -> Tensor:
        """
        Args:
            query: (N, Lq, D) (content + position encoding).
            reference_points: (x, y) in [0, 1], shape broadcastable to (N, Lq, L, 2), e.g. the
                (1, S, 1, 2) of `encoder_reference_points`.
            input_flatten: (N, S, D) values of all levels, flattened and concatenated.
            spatial_shapes: L pairs (H_l, W_l), S = sum H_l * W_l.
            padding_mask: optional (N, S) bool, True = padding (its values are zeroed).
        Returns:
            (N, Lq, D).
        """
        n, lq, _ = query.shape
        s = input_flatten.shape[1]
        if len(spatial_shapes) != self.n_levels:
            raise ValueError(f"MSDeformAttn built for {self.n_levels} levels, got {len(spatial_shapes)}")
        heads, levels, points = self.n_heads, self.n_levels, self.n_points

        _check_shapes(s, levels, spatial_shapes)
        value = self.value_proj(input_flatten)  # (N, S, Dv)
        if padding_mask is not None:
            value = value.masked_fill(padding_mask[..., None], 0.0)
        maps = value_maps(value.view(n, s, heads, self.value_dim // heads), spatial_shapes)  # L x (N*M, Dh, H_l, W_l)

        # offsets are in pixels of their level: divide by (W_l, H_l) to get [0, 1] units. One
        # divisor per output feature keeps the division's inner loop long (not pairs of 2).
        size_wh = torch.tensor([[w, h] for h, w in spatial_shapes], dtype=query.dtype, device=query.device)  # (L, 2)
        divisor = size_wh[None, :, None, :].expand(heads, levels, points, 2).reshape(-1)  # (M*L*P*2,)
        offsets = self.sampling_offsets(query) / divisor  # (N, Lq, M*L*P*2)
        # sampling locations in the layout of `sample_and_sum`, in grid_sample's [-1, 1]
        offsets = offsets.view(n, lq, heads, levels, points, 2).permute(0, 2, 3, 4, 1, 5)  # (N, M, L, P, Lq, 2)
        ref = reference_points.expand(n, lq, levels, 2).permute(0, 2, 1, 3)[:, None, :, None]  # (N, 1, L, 1, Lq, 2)
        grids = 2 * (offsets.contiguous() + ref) - 1  # (N, M, L, P, Lq, 2)

        # one softmax over the L*P samples of each head, taken in the layout of `sample_and_sum`
        # (over a middle dimension, Lq contiguous: vectorised, unlike a softmax over 12 numbers)
        logits = self.attention_weights(query).view(n, lq, heads, levels * points)  # (N, Lq, M, L*P)
        weights = logits.permute(0, 2, 3, 1).contiguous().softmax(2)  # (N, M, L*P, Lq)

        out = sample_and_sum(
            maps, grids.view(n * heads, levels, points, lq, 2), weights.view(n * heads, levels, points, lq)
        )  # (N*M, Dh, Lq)
        out = out.view(n, self.value_dim, lq).transpose(1, 2)  # (N, Lq, Dv)
        return self.output_proj(out)
