"""Temporal refiner (vss/refiner.py): a block against a slow loop reference, the temporal conv's
replicate padding, activation-weighted class pooling, output contract."""

import pytest
import torch
import torch.nn.functional as F

from vss.refiner import TemporalRefiner

C, HEADS, Q, K_CLASSES, MASK_DIM = 16, 2, 4, 3, 8


def make_refiner(layers=2, seed=0):
    torch.manual_seed(seed)
    return TemporalRefiner(
        hidden_dim=C, nheads=HEADS, dim_feedforward=32, num_layers=layers, mask_dim=MASK_DIM, num_classes=K_CLASSES
    )


def make_inputs(b=2, t=6, h=4, w=5, seed=1):
    g = torch.Generator().manual_seed(seed)
    return (
        torch.randn(b, t, Q, C, generator=g),
        torch.randn(b, t, Q, C, generator=g),
        torch.randn(b, t, MASK_DIM, h, w, generator=g),
    )


def conv_replicate_reference(seq, conv):
    """Conv1d(k5) -> ReLU -> Conv1d(k3) with explicit replicate padding of the time axis."""
    c1, c2 = conv[0], conv[2]
    x = F.conv1d(F.pad(seq, (2, 2), mode="replicate"), c1.weight, c1.bias)
    x = F.relu(x)
    return F.conv1d(F.pad(x, (1, 1), mode="replicate"), c2.weight, c2.bias)


def reference_refine(ref, inst, frame):
    """One loop per clip / object / frame, written from DVIS_Plus dvis_Plus/refiner.py."""
    b, t, q, c = inst.shape
    x = inst.clone()
    outs = []
    for i in range(ref.num_layers):
        y = torch.empty_like(x)
        for bi in range(b):
            for qi in range(q):
                seq = ref.transformer_time_self_attention_layers[i](x[bi, :, qi][None])[0]  # (T,C) along time
                conv = conv_replicate_reference(seq.T[None], ref.conv_short_aggregate_layers[i])[0].T
                y[bi, :, qi] = ref.conv_norms[i](conv + seq)
        z = torch.empty_like(y)
        for bi in range(b):
            for ti in range(t):
                objs = ref.transformer_obj_self_attention_layers[i](y[bi, ti][None])
                objs = ref.transformer_cross_attention_layers[i](objs, frame[bi, ti][None])
                z[bi, ti] = ref.transformer_ffn_layers[i](objs)[0]
        x = z
        outs.append(x)
    return outs


def test_blocks_match_slow_reference():
    ref = make_refiner().eval()
    inst, frame, feats = make_inputs(b=1, t=5)
    with torch.no_grad():
        got = ref.refine(inst, frame, all_layers=True)
        expected = reference_refine(ref, inst, frame)
        for g, e in zip(got, expected):
            torch.testing.assert_close(g, e, atol=1e-4, rtol=1e-4)
        out = ref(inst, frame, feats, all_layers=True)
        normed = ref.decoder_norm(expected[-1])
        torch.testing.assert_close(out["pred_embds"], normed, atol=1e-4, rtol=1e-4)
        masks = torch.einsum("btqc,btchw->btqhw", ref.mask_embed(normed), feats)
        torch.testing.assert_close(out["pred_masks"], masks, atol=1e-4, rtol=1e-4)


def test_temporal_conv_uses_replicate_padding():
    ref = make_refiner(layers=1)
    conv = ref.conv_short_aggregate_layers[0]
    assert [m.padding_mode for m in (conv[0], conv[2])] == ["replicate", "replicate"]
    assert (conv[0].kernel_size, conv[2].kernel_size) == ((5,), (3,))
    seq = torch.randn(3, C, 7)
    torch.testing.assert_close(conv(seq), conv_replicate_reference(seq, conv), atol=1e-5, rtol=1e-5)
    zero_padded = F.conv1d(
        F.relu(F.conv1d(seq, conv[0].weight, conv[0].bias, padding=2)), conv[2].weight, conv[2].bias, padding=1
    )
    assert (conv(seq) - zero_padded).abs().max() > 1e-3


def test_class_pooling_is_softmax_weighted_sum_over_time():
    ref = make_refiner()
    normed = torch.randn(2, 5, Q, C)
    logits = ref.predict_class(normed)
    for b in range(2):
        for q in range(Q):
            a = torch.stack([ref.activation_proj(normed[b, t, q]) for t in range(5)])[:, 0]  # (T,)
            weights = torch.exp(a) / torch.exp(a).sum()
            pooled = (weights[:, None] * normed[b, :, q]).sum(0)
            torch.testing.assert_close(logits[b, q], ref.class_embed(pooled), atol=1e-5, rtol=1e-5)


def test_output_contract_training_and_eval():
    ref = make_refiner(layers=3)
    inst, frame, feats = make_inputs(t=4)
    out = ref.train()(inst, frame, feats)
    assert out["pred_logits"].shape == (2, 4, Q, K_CLASSES + 1)
    assert out["pred_masks"].shape == (2, 4, Q, 4, 5)
    assert len(out["aux_outputs"]) == 2
    # one class per object and video: identical over T
    assert torch.equal(out["pred_logits"], out["pred_logits"][:, :1].expand_as(out["pred_logits"]))
    with torch.no_grad():
        ev = ref.eval()(inst, frame, feats)
    assert "aux_outputs" not in ev
    torch.testing.assert_close(ev["pred_masks"], out["pred_masks"].detach())
    single = ref(inst[:, :1], frame[:, :1], feats[:, :1])  # one frame: replicate padding still works
    assert single["pred_masks"].shape == (2, 1, Q, 4, 5)


def test_objects_are_permutation_equivariant_and_frame_queries_unordered():
    ref = make_refiner().eval()
    inst, frame, feats = make_inputs()
    perm = torch.tensor([2, 0, 3, 1])
    with torch.no_grad():
        base = ref(inst, frame, feats)
        permuted = ref(inst[:, :, perm], frame, feats)
        reordered_frames = ref(inst, frame[:, :, perm.flip(0)], feats)
    torch.testing.assert_close(permuted["pred_masks"], base["pred_masks"][:, :, perm], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(reordered_frames["pred_logits"], base["pred_logits"], atol=1e-5, rtol=1e-5)


def test_bad_shapes_raise():
    ref = make_refiner()
    with pytest.raises(ValueError, match="refiner expects"):
        ref.refine(torch.zeros(1, 3, Q, C), torch.zeros(1, 2, Q, C))
