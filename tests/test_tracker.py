"""Referring tracker (vss/tracker.py): RCA semantics, the frame loop against a slow reference,
alignment, "wa" denoising, state carrying and batching."""

import itertools
import math

import pytest
import torch
import torch.nn.functional as F

import vss.tracker as tracker_mod
from vss.tracker import hungarian_align, ReferringCrossAttentionLayer, ReferringTracker, TrackerState, wa_noise

C, HEADS, Q, K_CLASSES, MASK_DIM = 16, 2, 4, 3, 8


def make_tracker(noise_ratio=0.5, layers=2, seed=0):
    torch.manual_seed(seed)
    return ReferringTracker(
        hidden_dim=C,
        nheads=HEADS,
        dim_feedforward=32,
        num_layers=layers,
        mask_dim=MASK_DIM,
        num_classes=K_CLASSES,
        noise_ratio=noise_ratio,
    )


def make_inputs(b=1, t=3, h=5, w=6, seed=1):
    g = torch.Generator().manual_seed(seed)
    raw = torch.randn(b, t, Q, C, generator=g)
    normed = F.layer_norm(raw, (C,)) + 0.1 * torch.randn(b, t, Q, C, generator=g)
    feats = torch.randn(b, t, MASK_DIM, h, w, generator=g)
    return normed, raw, feats


def manual_mha(attn, query, key, value):
    """nn.MultiheadAttention's math written out: per-head softmax(q k^T / sqrt(d)) v."""
    d = query.shape[-1]
    wq, wk, wv = attn.in_proj_weight.chunk(3)
    bq, bk, bv = attn.in_proj_bias.chunk(3)
    heads = attn.num_heads
    q = (query @ wq.T + bq).unflatten(-1, (heads, d // heads)).transpose(-3, -2)  # (...,h,L,d)
    k = (key @ wk.T + bk).unflatten(-1, (heads, d // heads)).transpose(-3, -2)
    v = (value @ wv.T + bv).unflatten(-1, (heads, d // heads)).transpose(-3, -2)
    att = (q @ k.transpose(-1, -2) / math.sqrt(d // heads)).softmax(-1)
    out = (att @ v).transpose(-3, -2).flatten(-2)
    return attn.out_proj(out)


def test_rca_residual_is_identity_not_query():
    torch.manual_seed(0)
    layer = ReferringCrossAttentionLayer(C, HEADS)
    identity, reference, memory = torch.randn(2, Q, C), torch.randn(2, Q, C), torch.randn(2, 7, C)
    out = layer(identity, reference, memory)
    expected = F.layer_norm(
        identity + manual_mha(layer.multihead_attn, reference, memory, memory), (C,), layer.norm.weight, layer.norm.bias
    )
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)
    # the standard cross-attention (residual = query) is a different function
    standard = F.layer_norm(
        reference + manual_mha(layer.multihead_attn, reference, memory, memory),
        (C,),
        layer.norm.weight,
        layer.norm.bias,
    )
    assert (out - standard).abs().max() > 1e-2


def brute_force_perm(prev, cur):
    """The permutation maximising the summed cosine similarity, by enumeration."""
    prev = F.normalize(prev, dim=-1)
    cur = F.normalize(cur, dim=-1)
    sim = prev @ cur.T
    best = max(itertools.permutations(range(prev.shape[0])), key=lambda p: sum(sim[k, p[k]] for k in range(len(p))))
    return torch.tensor(best)


def reference_track(trk, normed, raw, feats):
    """Slow single-clip DVIS++ tracker written from DVIS_Plus dvis_Plus/tracker.py (eval mode)."""

    def layer(j, identity, reference, memory):
        rca = trk.transformer_cross_attention_layers[j]
        x = F.layer_norm(
            identity + manual_mha(rca.multihead_attn, reference, memory, memory), (C,), rca.norm.weight, rca.norm.bias
        )
        x = trk.transformer_self_attention_layers[j](x[None])[0]
        return trk.transformer_ffn_layers[j](x)

    logits, masks, embeds, refs, perms = [], [], [], [], []
    prev_out = prev_emb = None
    for t in range(raw.shape[0]):
        if t == 0:
            perm = torch.arange(Q)
            ref = trk.ref_proj(raw[0])
            x = raw[0]
            for j in range(trk.num_layers):
                x = layer(j, x, ref if j == 0 else trk.ref_proj(x), raw[0])
        else:
            ref = trk.ref_proj(prev_out)
            perm = brute_force_perm(prev_emb, normed[t])
            x = raw[t][perm]
            for j in range(trk.num_layers):
                x = layer(j, x, ref, raw[t])
        prev_out, prev_emb = x, normed[t][perm]
        normed_out = trk.decoder_norm(x)
        logits.append(trk.class_embed(torch.cat([ref, normed_out], -1)))
        proj = trk.mask_feature_proj(feats[t][None])[0]
        masks.append(torch.einsum("qc,chw->qhw", trk.mask_embed(normed_out), proj))
        embeds.append(x)
        refs.append(ref)
        perms.append(perm)
    return [torch.stack(v) for v in (logits, masks, embeds, refs, perms)]


def test_tracker_matches_slow_reference_and_state_resumes():
    trk = make_tracker().eval()
    normed, raw, feats = make_inputs(t=4)
    with torch.no_grad():
        out, state = trk(normed, raw, feats)
        exp_logits, exp_masks, exp_embeds, exp_refs, exp_perms = reference_track(trk, normed[0], raw[0], feats[0])
        torch.testing.assert_close(out["pred_logits"][0], exp_logits, atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(out["pred_masks"][0], exp_masks, atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(out["pred_embds"][0], exp_embeds, atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(out["pred_references"][0], exp_refs, atol=1e-4, rtol=1e-4)
        assert torch.equal(out["indices"][0], exp_perms)
        assert "aux_outputs" not in out  # only the last layer at inference
        # windows with the state carried = one pass
        first, mid = trk(normed[:, :1], raw[:, :1], feats[:, :1])
        second, mid = trk(normed[:, 1:3], raw[:, 1:3], feats[:, 1:3], mid)
        third, end = trk(normed[:, 3:], raw[:, 3:], feats[:, 3:], mid)
    joined = torch.cat([first["pred_masks"], second["pred_masks"], third["pred_masks"]], dim=1)
    torch.testing.assert_close(joined, out["pred_masks"])
    torch.testing.assert_close(end.last_output, state.last_output)
    # the stored embeddings are E_t in slot order
    torch.testing.assert_close(state.last_embeds[0], normed[0, -1][out["indices"][0, -1]])


def test_hungarian_align_recovers_permutation():
    g = torch.Generator().manual_seed(3)
    prev = torch.randn(2, 6, C, generator=g)
    perm = torch.stack([torch.randperm(6, generator=g) for _ in range(2)])  # slot k -> query perm[k]
    cur = torch.empty_like(prev)
    for b in range(2):
        cur[b, perm[b]] = prev[b] * 2.0 + 0.05 * torch.randn(6, C, generator=g)  # scale-free cosine
    assert torch.equal(hungarian_align(prev, cur), perm)


def test_wa_noise_formula_and_recorded_indices():
    raw = torch.randn(2, 5, C)
    init, idx = wa_noise(raw, torch.Generator().manual_seed(7))
    g = torch.Generator().manual_seed(7)
    sigma = torch.rand(2, 5, generator=g).argsort(1)
    w = torch.rand(2, 5, 1, generator=g)
    for b in range(2):
        for k in range(5):
            expected = w[b, k] * raw[b, k] + (1 - w[b, k]) * raw[b, sigma[b, k]]
            torch.testing.assert_close(init[b, k], expected)
            assert idx[b, k] == (k if w[b, k] >= 0.5 else sigma[b, k])


def test_noise_only_in_training_and_never_at_frame_zero(monkeypatch):
    calls = []

    def counting_noise(raw, generator=None):
        calls.append(raw.shape)
        return wa_noise(raw, generator)

    monkeypatch.setattr(tracker_mod, "wa_noise", counting_noise)
    trk = make_tracker(noise_ratio=1.0)
    normed, raw, feats = make_inputs(t=4)
    trk.eval()
    with torch.no_grad():
        trk(normed, raw, feats)
    assert calls == []
    trk.train()
    _, state = trk(normed, raw, feats)
    assert len(calls) == 3  # frames 1..3, never frame 0
    trk(normed, raw, feats, state)  # a continued video has no frame 0
    assert len(calls) == 3 + 4
    trk_off = make_tracker(noise_ratio=0.0).train()
    trk_off(normed, raw, feats)
    assert len(calls) == 7


def test_noise_sets_indices_and_state_and_is_reproducible():
    trk = make_tracker(noise_ratio=1.0).train()
    normed, raw, feats = make_inputs(t=3)
    torch.manual_seed(11)
    out1, state1 = trk(normed, raw, feats)
    torch.manual_seed(11)
    out2, _ = trk(normed, raw, feats)
    assert torch.equal(out1["indices"], out2["indices"])
    torch.testing.assert_close(out1["pred_logits"], out2["pred_logits"])
    # the noisy slots' recorded queries set the next frame's alignment reference
    torch.testing.assert_close(state1.last_embeds[0], normed[0, -1][out1["indices"][0, -1]])
    # training returns every layer: last + (layers - 1) aux, each with masks
    assert len(out1["aux_outputs"]) == trk.num_layers - 1
    assert out1["aux_outputs"][0]["pred_masks"].shape == out1["pred_masks"].shape


def test_batched_clips_equal_separate_clips():
    trk = make_tracker().eval()
    normed, raw, feats = make_inputs(b=2, t=3)
    with torch.no_grad():
        both, _ = trk(normed, raw, feats)
        for b in range(2):
            one, _ = trk(normed[b : b + 1], raw[b : b + 1], feats[b : b + 1])
            torch.testing.assert_close(both["pred_masks"][b], one["pred_masks"][0], atol=1e-5, rtol=1e-5)
            assert torch.equal(both["indices"][b], one["indices"][0])


def test_bad_shapes_raise():
    trk = make_tracker()
    with pytest.raises(ValueError, match="tracker expects"):
        trk(torch.zeros(1, 2, Q, C), torch.zeros(1, 2, Q + 1, C))


def test_state_detach():
    s = TrackerState(torch.ones(1, 2, 3, requires_grad=True) * 2, torch.zeros(1, 2, 3))
    assert not s.detach().last_output.requires_grad
