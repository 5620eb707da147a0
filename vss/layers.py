"""Small shared layers of the Mask2Former / DVIS++ transformers.

Paper: Mask2Former (Cheng et al., CVPR 2022) §3.2 and DVIS++ (Zhang et al., 2023) §3: every
transformer block there is built from the three post-norm sub-layers below (self-attention,
cross-attention, FFN), a small MLP head, the 2-D sine position encoding of DETR (Carion et al.,
2020, §A.4) and detectron2's "c2 xavier" initialisation.

Readings taken:
- **Batch-first everywhere**: tokens are (N, L, D) (N sequences of L tokens). The originals use
  (L, N, D) for `nn.MultiheadAttention`; the computation is the same.
- **Post-norm only** (`PRE_NORM: False` in every DVIS++ config) and **no dropout** (`DROPOUT: 0.0`
  in the decoder, encoder, tracker and refiner), so neither is a parameter here.
- Attention masks are boolean with **True = blocked** (the `nn.MultiheadAttention` convention the
  Mask2Former code is written in); `MultiHeadAttention` inverts them for
  `F.scaled_dot_product_attention`, whose boolean masks mean "may attend". SDPA with a boolean
  mask is the fastest of SDPA / `nn.MultiheadAttention` / explicit softmax on CPU (torch 2.13).
- Parameter names equal those of `nn.MultiheadAttention` (`in_proj_weight`, `in_proj_bias`,
  `out_proj`) and of Mask2Former's layer classes (`self_attn`, `multihead_attn`, `norm`,
  `linear1`, `linear2`, `layers`), so Mask2Former weights map onto these modules key for key.
"""

from __future__ import annotations

import math

import torch
from torch import nn, Tensor
import torch.nn.functional as F


def c2_xavier_fill(module: nn.Module) -> None:
    """detectron2's `c2_xavier_fill`: kaiming-uniform weights with a=1 (Caffe2's "XavierFill"),
    zero bias."""
    nn.init.kaiming_uniform_(module.weight, a=1)
    if getattr(module, "bias", None) is not None:
        nn.init.constant_(module.bias, 0)


class Conv2dNorm(nn.Conv2d):
    """A conv followed by an optional norm and ReLU (detectron2 `Conv2d(..., norm=, activation=)`),
    so the parameter keys (`weight`, `norm.weight`, ...) match detectron2 checkpoints."""

    def __init__(self, *args, norm: nn.Module | None = None, relu: bool = False, **kwargs):
        super().__init__(*args, **kwargs)
        self.norm = norm
        self.relu = relu

    def forward(self, x: Tensor) -> Tensor:
        x = super().forward(x)
        if self.norm is not None:
            x = self.norm(x)
        return F.relu(x) if self.relu else x


class MLP(nn.Module):
    """`num_layers` linear layers with ReLU between them (not after the last).

    Args:
        input_dim, hidden_dim, output_dim: widths of the first input, the hidden layers and the
            output.
        num_layers: number of linear layers (>= 1).
    """

    def __init__(self, input_dim: int, hidden_dim: int, output_dim: int, num_layers: int):
        super().__init__()
        if num_layers < 1:
            raise ValueError(f"MLP needs num_layers >= 1, got {num_layers}")
        dims_in = [input_dim] + [hidden_dim] * (num_layers - 1)
        dims_out = [hidden_dim] * (num_layers - 1) + [output_dim]
        self.layers = nn.ModuleList(nn.Linear(i, o) for i, o in zip(dims_in, dims_out))

    def forward(self, x: Tensor) -> Tensor:
        """x (..., input_dim) -> (..., output_dim)."""
        for i, layer in enumerate(self.layers):
            x = layer(x)
            if i < len(self.layers) - 1:
                x = F.relu(x)
        return x


def sine_position_embedding(
    height: int,
    width: int,
    num_pos_feats: int,
    *,
    device: torch.device | str | None = None,
    temperature: float = 10000.0,
    normalize: bool = True,
    scale: float = 2 * math.pi,
) -> Tensor:
    """DETR's 2-D sine position encoding of a `height` x `width` grid without padding (the
    Mask2Former `PositionEmbeddingSine(num_pos_feats, normalize=True)` with mask=None).

    Row i (1-based) gets y = i, column j gets x = j; with `normalize`, y <- y / (height + 1e-6) *
    scale (same for x). Each coordinate is encoded as [sin(c/f_0), cos(c/f_0), sin(c/f_1), ...]
    with f_k = temperature ** (2k / num_pos_feats), k < num_pos_feats / 2.

    Args:
        height, width: grid size.
        num_pos_feats: channels per axis (the output has 2 * num_pos_feats channels, y first).
        device: output device.
    Returns:
        pos: (2*num_pos_feats, height, width) float32; identical for every image, so callers
        broadcast it over the batch.
    """
    if num_pos_feats % 2:
        raise ValueError(f"num_pos_feats must be even, got {num_pos_feats}")
    y = torch.arange(1, height + 1, dtype=torch.float32, device=device)  # (H,)
    x = torch.arange(1, width + 1, dtype=torch.float32, device=device)  # (W,)
    if normalize:
        eps = 1e-6
        y = y / (height + eps) * scale
        x = x / (width + eps) * scale
    k = torch.arange(num_pos_feats // 2, dtype=torch.float32, device=device)
    freq = temperature ** (2 * k / num_pos_feats)  # (F/2,)

    def encode(c: Tensor) -> Tensor:  # (S,) -> (S, F): interleaved sin/cos of each frequency
        angle = c[:, None] / freq  # (S, F/2)
        return torch.stack((angle.sin(), angle.cos()), dim=-1).flatten(1)  # (S, F)

    pos_y = encode(y)[:, None, :].expand(height, width, num_pos_feats)  # (H, W, F)
    pos_x = encode(x)[None, :, :].expand(height, width, num_pos_feats)  # (H, W, F)
    return torch.cat((pos_y, pos_x), dim=-1).permute(2, 0, 1).contiguous()  # (2F, H, W)


class MultiHeadAttention(nn.Module):
    """Multi-head attention with `nn.MultiheadAttention`'s parameters, batch-first, computed by
    `F.scaled_dot_product_attention`.

    Args:
        embed_dim: D (query, key and value width).
        num_heads: heads; D must be divisible by it.
    """

    def __init__(self, embed_dim: int, num_heads: int):
        super().__init__()
        if embed_dim % num_heads:
            raise ValueError(f"embed_dim {embed_dim} is not divisible by num_heads {num_heads}")
        self.embed_dim = embed_dim
        self.num_heads = num_heads
        self.in_proj_weight = nn.Parameter(torch.empty(3 * embed_dim, embed_dim))
        self.in_proj_bias = nn.Parameter(torch.zeros(3 * embed_dim))
        self.out_proj = nn.Linear(embed_dim, embed_dim)
        # nn.MultiheadAttention's own initialisation
        nn.init.xavier_uniform_(self.in_proj_weight)
        nn.init.constant_(self.out_proj.bias, 0.0)

    def forward(self, query: Tensor, key: Tensor, value: Tensor, blocked: Tensor | None = None) -> Tensor:
        """
        Args:
            query: (N, Lq, D); key, value: (N, Lk, D).
            blocked: optional bool mask, True = query i may NOT attend to key j; any shape that
                broadcasts to (N, heads, Lq, Lk), e.g. (Lq, Lk), (N, 1, Lq, Lk). A fully blocked
                row gives NaN (as in `nn.MultiheadAttention`): callers must un-block such rows.
        Returns:
            (N, Lq, D).
        """
        n, lq, d = query.shape
        lk = key.shape[1]
        heads = self.num_heads
        w_q, w_k, w_v = self.in_proj_weight.chunk(3)
        b_q, b_k, b_v = self.in_proj_bias.chunk(3)
        dh = d // heads
        q = F.linear(query, w_q, b_q).view(n, lq, heads, dh).transpose(1, 2)  # (N, heads, Lq, dh)
        k = F.linear(key, w_k, b_k).view(n, lk, heads, dh).transpose(1, 2)  # (N, heads, Lk, dh)
        v = F.linear(value, w_v, b_v).view(n, lk, heads, dh).transpose(1, 2)  # (N, heads, Lk, dh)
        allowed = None if blocked is None else ~blocked  # SDPA's boolean masks mean "may attend"
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=allowed)  # (N, heads, Lq, dh)
        out = out.transpose(1, 2).reshape(n, lq, d)  # (N, Lq, D)
        return self.out_proj(out)


def _with_pos(x: Tensor, pos: Tensor | None) -> Tensor:
    return x if pos is None else x + pos


def xavier_fill_matrices(module: nn.Module) -> None:
    """xavier_uniform on every parameter with >= 2 dims (biases and norms untouched): the
    `_reset_parameters` of Mask2Former's / DVIS++'s layers and Deformable DETR's encoder."""
    for p in module.parameters():
        if p.dim() > 1:
            nn.init.xavier_uniform_(p)


class SelfAttentionLayer(nn.Module):
    """Post-norm self-attention: x <- LN(x + Attn(q=k=x+query_pos, v=x))."""

    def __init__(self, d_model: int, nhead: int):
        super().__init__()
        self.self_attn = MultiHeadAttention(d_model, nhead)
        self.norm = nn.LayerNorm(d_model)
        xavier_fill_matrices(self)

    def forward(self, x: Tensor, query_pos: Tensor | None = None, blocked: Tensor | None = None) -> Tensor:
        """x (N, L, D), query_pos broadcastable to x, blocked as in `MultiHeadAttention`
        -> (N, L, D)."""
        q = k = _with_pos(x, query_pos)
        return self.norm(x + self.self_attn(q, k, x, blocked))


class CrossAttentionLayer(nn.Module):
    """Post-norm cross-attention: x <- LN(x + Attn(q=x+query_pos, k=memory+pos, v=memory))."""

    def __init__(self, d_model: int, nhead: int):
        super().__init__()
        self.multihead_attn = MultiHeadAttention(d_model, nhead)
        self.norm = nn.LayerNorm(d_model)
        xavier_fill_matrices(self)

    def forward(
        self,
        x: Tensor,
        memory: Tensor,
        blocked: Tensor | None = None,
        pos: Tensor | None = None,
        query_pos: Tensor | None = None,
    ) -> Tensor:
        """
        Args:
            x: queries (N, Lq, D); memory: keys/values (N, Lk, D).
            blocked: bool, True = blocked, broadcastable to (N, heads, Lq, Lk).
            pos: key position encoding broadcastable to memory; query_pos: broadcastable to x.
        Returns:
            (N, Lq, D).
        """
        out = self.multihead_attn(_with_pos(x, query_pos), _with_pos(memory, pos), memory, blocked)
        return self.norm(x + out)


class FFNLayer(nn.Module):
    """Post-norm feed-forward: x <- LN(x + W2 relu(W1 x))."""

    def __init__(self, d_model: int, dim_feedforward: int):
        super().__init__()
        self.linear1 = nn.Linear(d_model, dim_feedforward)
        self.linear2 = nn.Linear(dim_feedforward, d_model)
        self.norm = nn.LayerNorm(d_model)
        xavier_fill_matrices(self)

    def forward(self, x: Tensor) -> Tensor:
        """x (..., D) -> (..., D)."""
        return self.norm(x + self.linear2(F.relu(self.linear1(x))))
