"""The referring tracker of DVIS++ (stage 2, online): it links the segmenter's per-frame queries
into tracks, one query slot = one object (in VSS: one class) over the whole video.

Paper: DVIS (Zhang et al., ICCV 2023) section 3.2 "Referring tracker" (referring cross-attention,
Eq. 2-3) and DVIS++ (Zhang et al., 2023) section 3.2 "Denoising training" (the "weighted average"
noise). Details from the code
(``DVIS_Plus/dvis_Plus/tracker.py::ReferringTracker_noiser`` and ``noiser.py``):

Per frame t, with E_t the segmenter's normed embeddings (``pred_embds``) and K_t the un-normed
ones (``pred_embds_without_norm``), both (B,Q,C) with C = 2*D ([query | reid]):
 1. Pre-alignment (MinVIS): Hungarian matching on 1 - cos(previous aligned E, E_t) gives a
    permutation pi_t, slot k at t continues slot k at t-1; the layer-0 state is K_t[pi_t]. At the
    first frame of a video pi is the identity.
 2. Denoising ("wa", training only, frames t > 0, probability ``noise_ratio`` per frame and
    clip): the layer-0 state is instead w*K_t + (1-w)*K_t[sigma] in the raw (unaligned) order,
    w ~ U(0,1) per slot and sigma a random permutation; the slot's recorded index is its own if
    w >= 0.5, else sigma(slot).
 3. Each layer: referring cross-attention (RCA) -> self-attention over the Q slots -> FFN, all
    post-norm, no positional encodings. RCA: out = LN(identity + MHA(q=reference, k=v=K_t)),
    identity = the slot's running state, reference = ref_proj(previous frame's final output),
    the same for every layer of the frame.
 4. First frame of a video: layer 0 uses reference ref_proj(K_0); layer j > 0 uses
    ref_proj(output of layer j-1); the reference stored for the loss is ref_proj(K_0).
 5. Heads: class logits = class_embed([reference | decoder_norm(out)]); masks =
    einsum(mask_embed(decoder_norm(out)), mask_feature_proj(F_t)). Every layer when training
    (deep supervision), only the last at inference.

Readings taken:
- Tensor layout is (B,T,Q,C) for embeddings and (B,T,Q,h,w) for masks (the original uses
  (B,C,T,Q) and (B,Q,T,h,w)); the computation is the same.
- The carried state is an explicit ``TrackerState`` returned by ``forward`` and passed back in to
  continue a video (the original's ``resume=True`` with module attributes). Only the previous
  frame's last-layer output is kept: the original stores every layer's output but reads only the
  last one.
- Batches are vectorised: alignment and the noise draw happen per clip, so B clips give what B
  separate calls would (DVIS++ only supports B=1 per forward).
- Random numbers come from torch (``generator`` or the global RNG, drawn on the CPU), not
  numpy/random as in the original, so ``torch.manual_seed`` makes runs reproducible.
- The first-frame alignment is the identity itself (the original Hungarian-matches E_0 with
  itself, which returns the identity).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
from scipy.optimize import linear_sum_assignment
import torch
from torch import nn, Tensor

from vss.layers import c2_xavier_fill, FFNLayer, MLP, MultiHeadAttention, SelfAttentionLayer, xavier_fill_matrices

if TYPE_CHECKING:
    from vss.config import Config


@dataclass
class TrackerState:
    """What the tracker carries from one frame to the next, and across inference windows.

    Attributes:
        last_output: (B,Q,C) final layer's output at the previous frame (un-normed).
        last_embeds: (B,Q,C) the previous frame's normed segmenter embeddings in slot order
            (E_{t-1}[indices]), the reference of the next Hungarian pre-alignment.
    """

    last_output: Tensor
    last_embeds: Tensor

    def detach(self) -> "TrackerState":
        return TrackerState(self.last_output.detach(), self.last_embeds.detach())


@torch.no_grad()
def hungarian_align(prev_embeds: Tensor, cur_embeds: Tensor) -> Tensor:
    """MinVIS pre-alignment: the permutation of the current queries that continues each slot.

    Args:
        prev_embeds: (B,Q,C) previous frame's normed embeddings, in slot order.
        cur_embeds: (B,Q,C) current frame's normed embeddings, in the segmenter's order.
    Returns:
        (B,Q) int64 on cur_embeds' device: slot k continues with current query ``perm[b, k]``,
        minimising sum_k 1 - cos(prev[k], cur[perm[k]]).
    """
    # float32 outside autocast: a half-precision cost makes near-ties flip between runs
    with torch.autocast(device_type=cur_embeds.device.type, enabled=False):
        prev = prev_embeds.detach().float()
        cur = cur_embeds.detach().float()
        prev = prev / (prev.norm(dim=-1, keepdim=True) + 1e-6)
        cur = cur / (cur.norm(dim=-1, keepdim=True) + 1e-6)
        cost = 1 - torch.einsum("bkc,bjc->bkj", prev, cur)  # (B,Q,Q) slot x current
    cost = torch.nan_to_num(cost, nan=0.0).cpu().numpy()
    perms = [linear_sum_assignment(c)[1] for c in cost]  # rows come back sorted: cols = perm
    return torch.as_tensor(np.stack(perms), dtype=torch.int64).to(cur_embeds.device)


def gather_slots(x: Tensor, index: Tensor) -> Tensor:
    """x (B,Q,C) re-ordered by index (B,Q): out[b, k] = x[b, index[b, k]]."""
    return x.gather(1, index[..., None].expand(-1, -1, x.shape[-1]))


def wa_noise(raw: Tensor, generator: torch.Generator | None = None) -> tuple[Tensor, Tensor]:
    """DVIS++ "wa" (weighted-average) noise on one frame's un-normed queries, raw order.

    init[k] = w_k * raw[k] + (1 - w_k) * raw[sigma(k)], w_k ~ U(0,1), sigma a random permutation;
    the slot's index is k if w_k >= 0.5 else sigma(k) (the query that dominates the mixture).

    Args:
        raw: (B,Q,C) the segmenter's un-normed queries K_t (not aligned).
        generator: CPU generator for the draws (None: torch's global RNG).
    Returns:
        init (B,Q,C) and indices (B,Q) int64, both on raw's device.
    """
    b, q = raw.shape[:2]
    sigma = torch.rand(b, q, generator=generator).argsort(dim=1).to(raw.device)  # (B,Q)
    w = torch.rand(b, q, 1, generator=generator).to(device=raw.device, dtype=raw.dtype)  # (B,Q,1)
    init = w * raw + (1 - w) * gather_slots(raw, sigma)  # (B,Q,C)
    own = torch.arange(q, device=raw.device).expand(b, q)
    indices = torch.where(w[..., 0] >= 0.5, own, sigma)  # (B,Q)
    return init, indices


class ReferringCrossAttentionLayer(nn.Module):
    """RCA (DVIS Eq. 2): out = LN(identity + MHA(query=reference, key=memory, value=memory)).

    With identity = reference it is the ordinary post-norm cross-attention; here the reference
    (what the object looked like at the previous frame) decides which current queries to read,
    and the result is added to the object's own running state.
    """

    def __init__(self, d_model: int, nhead: int):
        super().__init__()
        self.multihead_attn = MultiHeadAttention(d_model, nhead)
        self.norm = nn.LayerNorm(d_model)
        xavier_fill_matrices(self)

    def forward(self, identity: Tensor, reference: Tensor, memory: Tensor) -> Tensor:
        """identity, reference (N,Q,C); memory (N,L,C) -> (N,Q,C)."""
        return self.norm(identity + self.multihead_attn(reference, memory, memory))


class ReferringTracker(nn.Module):
    """DVIS++ ``ReferringTracker_noiser`` with "wa" denoising.

    Args:
        hidden_dim: C = 2*D, width of the segmenter's [query | reid] embeddings.
        nheads: attention heads.
        dim_feedforward: FFN width.
        num_layers: tracker layers (6 in DVIS++).
        mask_dim: channels of the segmenter's mask features.
        num_classes: K (the class head has K+1 outputs).
        noise_ratio: probability of the "wa" noise per frame t > 0 in training.
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
        noise_ratio: float = 0.5,
    ):
        super().__init__()
        if num_layers < 1:
            raise ValueError(f"num_layers must be >= 1, got {num_layers}")
        if not 0.0 <= noise_ratio <= 1.0:
            raise ValueError(f"noise_ratio must be in [0, 1], got {noise_ratio}")
        self.num_layers = num_layers
        self.noise_ratio = noise_ratio
        self.transformer_cross_attention_layers = nn.ModuleList(
            ReferringCrossAttentionLayer(hidden_dim, nheads) for _ in range(num_layers)
        )
        self.transformer_self_attention_layers = nn.ModuleList(
            SelfAttentionLayer(hidden_dim, nheads) for _ in range(num_layers)
        )
        self.transformer_ffn_layers = nn.ModuleList(FFNLayer(hidden_dim, dim_feedforward) for _ in range(num_layers))
        self.decoder_norm = nn.LayerNorm(hidden_dim)
        self.class_embed = nn.Linear(2 * hidden_dim, num_classes + 1)
        self.mask_embed = MLP(hidden_dim, hidden_dim, mask_dim, 3)
        self.ref_proj = MLP(hidden_dim, hidden_dim, hidden_dim, 3)
        for layer in self.ref_proj.layers:
            c2_xavier_fill(layer)
        self.mask_feature_proj = nn.Conv2d(mask_dim, mask_dim, kernel_size=1)

    def _layer(self, j: int, identity: Tensor, reference: Tensor, memory: Tensor) -> Tensor:
        # RCA -> self-attention over the slots -> FFN
        x = self.transformer_cross_attention_layers[j](identity, reference, memory)
        x = self.transformer_self_attention_layers[j](x)
        return self.transformer_ffn_layers[j](x)

    def _first_frame(self, key_t: Tensor) -> tuple[list[Tensor], Tensor]:
        """Frame 0 of a video (docstring step 4): the slots are the segmenter's queries; layer 0
        refers to ref_proj(K_0), layer j > 0 to ref_proj(its own input).

        Returns:
            every layer's output, L x (B,Q,C), and the reference ref_proj(K_0) (B,Q,C).
        """
        reference = self.ref_proj(key_t)  # (B,Q,C)
        x, outs = key_t, []
        for j in range(self.num_layers):
            x = self._layer(j, x, reference if j == 0 else self.ref_proj(x), key_t)
            outs.append(x)
        return outs, reference

    def _next_frame(
        self, norm_t: Tensor, key_t: Tensor, state: TrackerState, generator: torch.Generator | None
    ) -> tuple[list[Tensor], Tensor, Tensor]:
        """Frame t > 0 (docstring steps 1-3): align to the previous frame, maybe noise (training),
        then every layer refers to ref_proj(previous frame's final output).

        Returns:
            every layer's output, L x (B,Q,C); the reference (B,Q,C); the slot indices (B,Q).
        """
        reference = self.ref_proj(state.last_output)  # (B,Q,C), shared by all layers
        index = hungarian_align(state.last_embeds, norm_t)  # (B,Q)
        x = gather_slots(key_t, index)  # (B,Q,C) K_t[pi_t]
        if self.training and self.noise_ratio > 0:
            noisy = torch.rand(key_t.shape[0], generator=generator) < self.noise_ratio  # (B,) per clip
            if noisy.any():
                noised, noise_index = wa_noise(key_t, generator)
                noisy = noisy.to(x.device)
                x = torch.where(noisy[:, None, None], noised, x)
                index = torch.where(noisy[:, None], noise_index, index)
        outs = []
        for j in range(self.num_layers):
            x = self._layer(j, x, reference, key_t)
            outs.append(x)
        return outs, reference, index

    def forward(
        self,
        frame_embeds: Tensor,
        frame_embeds_no_norm: Tensor,
        mask_features: Tensor | None = None,
        state: TrackerState | None = None,
        *,
        all_layers: bool | None = None,
        generator: torch.Generator | None = None,
    ) -> tuple[dict, TrackerState]:
        """Track T frames, continuing from ``state`` (None = the first frame starts a video).

        Args:
            frame_embeds: (B,T,Q,C) segmenter ``pred_embds`` (normed; used only for alignment).
            frame_embeds_no_norm: (B,T,Q,C) segmenter ``pred_embds_without_norm`` (initial
                states, keys and values).
            mask_features: (B,T,mask_dim,h,w) segmenter mask features; None skips the mask head
                (``predict_masks`` can make them later from ``pred_embds``).
            state: what a previous call returned, to continue the same videos.
            all_layers: predict (and keep) every layer's output; default ``self.training``.
            generator: CPU generator for the denoising draws (None: global RNG).
        Returns:
            (outputs, state). outputs: ``pred_logits`` (B,T,Q,K+1) and ``pred_masks``
            (B,T,Q,h,w, if mask_features given) of the last layer; ``aux_outputs`` (the earlier
            layers' dicts, when all_layers); ``pred_embds`` (B,T,Q,C) last-layer output without
            norm; ``pred_references`` (B,T,Q,C); ``indices`` (B,T,Q) int64, the segmenter query
            each slot was initialised from (alignment or noise).
        """
        if frame_embeds.shape != frame_embeds_no_norm.shape or frame_embeds.dim() != 4:
            raise ValueError(
                f"tracker expects two (B,T,Q,C) embeddings of one shape, got "
                f"{tuple(frame_embeds.shape)} and {tuple(frame_embeds_no_norm.shape)}"
            )
        if all_layers is None:
            all_layers = self.training
        b, num_frames, q, _ = frame_embeds.shape
        identity_perm = torch.arange(q, device=frame_embeds.device).expand(b, q)
        layer_outputs, references, indices = [], [], []
        for t in range(num_frames):
            norm_t = frame_embeds[:, t]  # (B,Q,C) E_t
            key_t = frame_embeds_no_norm[:, t]  # (B,Q,C) K_t
            if state is None:
                outs, reference = self._first_frame(key_t)
                index = identity_perm
            else:
                outs, reference, index = self._next_frame(norm_t, key_t, state, generator)
            state = TrackerState(last_output=outs[-1], last_embeds=gather_slots(norm_t, index))
            layer_outputs.append(torch.stack(outs if all_layers else outs[-1:]))  # (L,B,Q,C)
            references.append(reference)
            indices.append(index)

        hidden = torch.stack(layer_outputs, dim=2)  # (L,B,T,Q,C)
        refs = torch.stack(references, dim=1)  # (B,T,Q,C)
        out = self._predictions(hidden, refs, mask_features, all_layers)
        out["indices"] = torch.stack(indices, dim=1)  # (B,T,Q)
        return out, state

    def _predictions(self, hidden: Tensor, refs: Tensor, mask_features: Tensor | None, all_layers: bool) -> dict:
        """The heads on every kept layer (hidden (L,B,T,Q,C), refs (B,T,Q,C)): the output dict
        of ``forward`` without ``indices``."""
        logits = self.predict_logits(hidden, refs[None])  # (L,B,T,Q,K+1)
        masks = None
        if mask_features is not None:
            projected = self.project_mask_features(mask_features)
            masks = [self.predict_masks(h, projected, projected=True) for h in hidden]  # L x (B,T,Q,h,w)
        out = {"pred_logits": logits[-1], "pred_embds": hidden[-1], "pred_references": refs}
        if masks is not None:
            out["pred_masks"] = masks[-1]
        if all_layers:
            out["aux_outputs"] = [
                {"pred_logits": logits[i], **({"pred_masks": masks[i]} if masks is not None else {})}
                for i in range(len(hidden) - 1)
            ]
        return out

    def predict_logits(self, outputs: Tensor, references: Tensor) -> Tensor:
        """Class head on [reference | decoder_norm(out)].

        Args:
            outputs: (...,Q,C) un-normed tracker outputs.
            references: (...,Q,C) broadcastable to outputs.
        Returns:
            (...,Q,K+1) logits.
        """
        normed = self.decoder_norm(outputs)
        return self.class_embed(torch.cat([references.expand_as(normed), normed], dim=-1))

    def project_mask_features(self, mask_features: Tensor) -> Tensor:
        """mask_feature_proj (1x1 conv) on (B,T,mask_dim,h,w) -> same shape."""
        b, t = mask_features.shape[:2]
        return self.mask_feature_proj(mask_features.flatten(0, 1)).unflatten(0, (b, t))

    def predict_masks(self, outputs: Tensor, mask_features: Tensor, projected: bool = False) -> Tensor:
        """Mask head: einsum(mask_embed(decoder_norm(out)), mask_feature_proj(F)).

        Args:
            outputs: (B,T,Q,C) un-normed tracker outputs (e.g. ``pred_embds``).
            mask_features: (B,T,mask_dim,h,w) the segmenter's mask features, or the output of
                ``project_mask_features`` with ``projected=True`` (projected once for all layers).
            projected: whether ``mask_features`` already went through ``mask_feature_proj``.
        Returns:
            (B,T,Q,h,w) mask logits.
        """
        if not projected:
            mask_features = self.project_mask_features(mask_features)
        embed = self.mask_embed(self.decoder_norm(outputs))  # (B,T,Q,mask_dim)
        return torch.einsum("btqc,btchw->btqhw", embed, mask_features)


def build_tracker(cfg: "Config") -> ReferringTracker:
    """The tracker of ``cfg.model`` (a ``vss.config.Config``): hidden 2*hidden_dim."""
    m = cfg.model
    return ReferringTracker(
        hidden_dim=2 * m.hidden_dim,
        nheads=m.nheads,
        dim_feedforward=m.video_ffn_dim,
        num_layers=m.tracker_layers,
        mask_dim=m.mask_dim,
        num_classes=m.num_classes,
        noise_ratio=m.noise_ratio,
    )
