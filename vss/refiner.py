"""The temporal refiner of DVIS++ (stage 3, offline): it refines the tracker's object tracks with
attention over the whole video and predicts one class per object for the video.

Paper: DVIS (Zhang et al., ICCV 2023) section 3.3 "Temporal refiner" (long-term temporal
self-attention + short-term temporal convolution, then object self-attention and
cross-attention to the frame's queries) and its class prediction by an activation-weighted
temporal average; DVIS++ keeps it unchanged. Details from the code
(``DVIS_Plus/dvis_Plus/refiner.py::TemporalRefiner``; stage 3 of ``dvis_Plus/meta_architecture.py``).

Block i, on x (B,T,Q,C) initialised with the tracker's last-layer outputs:
 1. long-term temporal self-attention over the T frames of each (clip, object) sequence;
 2. short-term temporal conv: Conv1d(k=5) -> ReLU -> Conv1d(k=3) along T, "same" length with
    replicate padding, plus a residual, then LayerNorm;
 3. object self-attention across the Q objects of each frame;
 4. cross-attention from each object at frame t to the segmenter's Q raw (un-normed) queries
    of frame t (standard post-norm: the residual is the query);
 5. FFN.
All sub-layers are post-norm with dropout 0 and no positional encodings.
Heads, on decoder_norm(x): per-frame masks einsum(mask_embed(x_t), F_t) with the *segmenter's*
mask features F_t; one class per object: a = softmax over T of activation_proj(x),
logits = class_embed(sum_t a_t x_t), repeated over T only to keep the output format.

Readings taken:
- Layout (B,T,Q,C) for embeddings and (B,T,Q,h,w) for masks (the original: (B,C,T,Q) and
  (B,Q,T,h,w)).
- The blocks, the class head and the mask head are separate methods (``refine``,
  ``predict_class``, ``predict_masks``) so whole-video inference can run the blocks and the class
  head once over all T frames and the mask head window by window, as the original's
  ``windows_prediction`` does, without holding the mask features of the whole video.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import nn, Tensor

from vss.layers import CrossAttentionLayer, FFNLayer, MLP, SelfAttentionLayer

if TYPE_CHECKING:
    from vss.config import Config


def short_temporal_conv(hidden_dim: int) -> nn.Sequential:
    """Conv1d(k5) -> ReLU -> Conv1d(k3) over T, "same" length, replicate padding."""
    return nn.Sequential(
        nn.Conv1d(hidden_dim, hidden_dim, kernel_size=5, padding="same", padding_mode="replicate"),
        nn.ReLU(),
        nn.Conv1d(hidden_dim, hidden_dim, kernel_size=3, padding="same", padding_mode="replicate"),
    )


class TemporalRefiner(nn.Module):
    """DVIS++ ``TemporalRefiner``.

    Args:
        hidden_dim: C = 2*D (the tracker's width).
        nheads: attention heads.
        dim_feedforward: FFN width.
        num_layers: refiner blocks (6 in DVIS++).
        mask_dim: channels of the segmenter's mask features.
        num_classes: K (the class head has K+1 outputs).
    """

    def __init__(
        self,
        *,
        hidden_dim: int,
        nheads: int,
        dim_feedforward: int,
        num_layers: int,
        mask_dim: int,
        num_classes: int,
    ):
        super().__init__()
        if num_layers < 1:
            raise ValueError(f"num_layers must be >= 1, got {num_layers}")
        self.num_layers = num_layers
        self.transformer_time_self_attention_layers = nn.ModuleList(
            SelfAttentionLayer(hidden_dim, nheads) for _ in range(num_layers)
        )
        self.conv_short_aggregate_layers = nn.ModuleList(short_temporal_conv(hidden_dim) for _ in range(num_layers))
        self.conv_norms = nn.ModuleList(nn.LayerNorm(hidden_dim) for _ in range(num_layers))
        self.transformer_obj_self_attention_layers = nn.ModuleList(
            SelfAttentionLayer(hidden_dim, nheads) for _ in range(num_layers)
        )
        self.transformer_cross_attention_layers = nn.ModuleList(
            CrossAttentionLayer(hidden_dim, nheads) for _ in range(num_layers)
        )
        self.transformer_ffn_layers = nn.ModuleList(FFNLayer(hidden_dim, dim_feedforward) for _ in range(num_layers))
        self.decoder_norm = nn.LayerNorm(hidden_dim)
        self.class_embed = nn.Linear(hidden_dim, num_classes + 1)
        self.mask_embed = MLP(hidden_dim, hidden_dim, mask_dim, 3)
        self.activation_proj = nn.Linear(hidden_dim, 1)

    def refine(self, instance_embeds: Tensor, frame_embeds: Tensor, all_layers: bool = True) -> list[Tensor]:
        """The refiner blocks.

        Args:
            instance_embeds: (B,T,Q,C) the tracker's last-layer outputs (``pred_embds``).
            frame_embeds: (B,T,Q,C) the segmenter's un-normed queries, raw per-frame order.
            all_layers: return every block's output (else only the last).
        Returns:
            list of (B,T,Q,C) un-normed block outputs, last = final.
        """
        if instance_embeds.dim() != 4 or frame_embeds.shape[:2] != instance_embeds.shape[:2]:
            raise ValueError(
                f"refiner expects (B,T,Q,C) embeddings of one clip size, got "
                f"{tuple(instance_embeds.shape)} and {tuple(frame_embeds.shape)}"
            )
        b, t, q, c = instance_embeds.shape
        memory = frame_embeds.flatten(0, 1)  # (B*T,Q_f,C) keys/values of each frame
        x = instance_embeds
        outputs = []
        for i in range(self.num_layers):
            # 1. long-term: attention along T for every (clip, object)
            seq = x.transpose(1, 2).reshape(b * q, t, c)  # (B*Q,T,C)
            seq = self.transformer_time_self_attention_layers[i](seq)
            # 2. short-term: temporal conv + residual + LN
            chan = seq.transpose(1, 2)  # (B*Q,C,T)
            chan = self.conv_short_aggregate_layers[i](chan) + chan
            seq = self.conv_norms[i](chan.transpose(1, 2))  # (B*Q,T,C)
            # 3. objects of a frame attend to each other
            objs = seq.reshape(b, q, t, c).transpose(1, 2).reshape(b * t, q, c)  # (B*T,Q,C)
            objs = self.transformer_obj_self_attention_layers[i](objs)
            # 4. read the same frame's segmenter queries; 5. FFN
            objs = self.transformer_cross_attention_layers[i](objs, memory)
            objs = self.transformer_ffn_layers[i](objs)
            x = objs.reshape(b, t, q, c)  # (B,T,Q,C)
            if all_layers or i == self.num_layers - 1:
                outputs.append(x)
        return outputs

    def predict_class(self, normed: Tensor) -> Tensor:
        """One class per object for the whole clip: activation-weighted temporal pooling.

        Args:
            normed: (B,T,Q,C) decoder_norm of a block output.
        Returns:
            (B,Q,K+1) logits.
        """
        weights = self.activation_proj(normed).softmax(dim=1)  # (B,T,Q,1), softmax over T
        pooled = (normed * weights).sum(dim=1)  # (B,Q,C)
        return self.class_embed(pooled)

    def predict_masks(self, normed: Tensor, mask_features: Tensor) -> Tensor:
        """Per-frame masks from the segmenter's mask features.

        Args:
            normed: (B,T,Q,C) decoder_norm of a block output.
            mask_features: (B,T,mask_dim,h,w) of the same frames.
        Returns:
            (B,T,Q,h,w) mask logits.
        """
        embed = self.mask_embed(normed)  # (B,T,Q,mask_dim)
        return torch.einsum("btqc,btchw->btqhw", embed, mask_features)

    def forward(
        self,
        instance_embeds: Tensor,
        frame_embeds: Tensor,
        mask_features: Tensor,
        *,
        all_layers: bool | None = None,
    ) -> dict:
        """Refine a clip (training; inference uses the parts, see ``vss.video_model``).

        Args:
            instance_embeds: (B,T,Q,C) tracker ``pred_embds``.
            frame_embeds: (B,T,Q,C) segmenter ``pred_embds_without_norm`` (raw order).
            mask_features: (B,T,mask_dim,h,w) segmenter mask features.
            all_layers: supervise every block (default ``self.training``).
        Returns:
            ``pred_logits`` (B,T,Q,K+1) (the video-level logits repeated over T),
            ``pred_masks`` (B,T,Q,h,w), ``pred_embds`` (B,T,Q,C) = decoder_norm(last block), and
            ``aux_outputs`` (the earlier blocks, when all_layers).
        """
        if all_layers is None:
            all_layers = self.training
        num_frames = instance_embeds.shape[1]
        predictions = []
        for x in self.refine(instance_embeds, frame_embeds, all_layers):
            normed = self.decoder_norm(x)
            logits = self.predict_class(normed)[:, None].expand(-1, num_frames, -1, -1)  # (B,T,Q,K+1)
            predictions.append((logits, self.predict_masks(normed, mask_features), normed))
        out = {
            "pred_logits": predictions[-1][0],
            "pred_masks": predictions[-1][1],
            "pred_embds": predictions[-1][2],
        }
        if all_layers:
            out["aux_outputs"] = [{"pred_logits": c, "pred_masks": m} for c, m, _ in predictions[:-1]]
        return out


def build_refiner(cfg: "Config") -> TemporalRefiner:
    """The refiner of ``cfg.model`` (a ``vss.config.Config``): hidden 2*hidden_dim."""
    m = cfg.model
    return TemporalRefiner(
        hidden_dim=2 * m.hidden_dim,
        nheads=m.nheads,
        dim_feedforward=m.video_ffn_dim,
        num_layers=m.refiner_layers,
        mask_dim=m.mask_dim,
        num_classes=m.num_classes,
    )
