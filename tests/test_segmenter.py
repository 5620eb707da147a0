"""Mask2Former segmenter: masked attention (fully-blocked rows, next-level masks), heads and
semantic inference against explicit computations, the output contract, gradients, fp32 encoder
under autocast, and the shared layers."""

import math

import pytest
import torch
from torch import nn
import torch.nn.functional as F

from vss.config import tiny
from vss.layers import CrossAttentionLayer, sine_position_embedding
from vss.pixel_decoder import MSDeformAttnPixelDecoder
from vss.segmenter import (
    attention_mask_from_masks,
    build_segmenter,
    MultiScaleMaskedTransformerDecoder,
    Segmenter,
    semantic_inference,
)

K, Q, D, MASK_DIM, CONV_DIM, LAYERS, HEADS = 5, 6, 32, 16, 32, 4, 2


class StandInBackbone(nn.Module):
    """A few strided convs giving res2..res5 at strides 4..32."""

    out_channels = {"res2": 8, "res3": 12, "res4": 16, "res5": 20}

    def __init__(self):
        super().__init__()
        self.convs = nn.ModuleList(
            [
                nn.Conv2d(3, 8, 4, stride=4),
                nn.Conv2d(8, 12, 3, 2, 1),
                nn.Conv2d(12, 16, 3, 2, 1),
                nn.Conv2d(16, 20, 3, 2, 1),
            ]
        )

    def forward(self, x):
        out = {}
        for i, conv in enumerate(self.convs):
            x = conv(x)
            out[f"res{i + 2}"] = x
        return out


def make_segmenter(decoder_in=CONV_DIM):
    torch.manual_seed(0)
    pixel_decoder = MSDeformAttnPixelDecoder(
        in_channels=StandInBackbone.out_channels,
        conv_dim=CONV_DIM,
        mask_dim=MASK_DIM,
        enc_layers=2,
        enc_ffn_dim=64,
        enc_heads=2,
        enc_points=2,
    )
    decoder = MultiScaleMaskedTransformerDecoder(
        in_channels=decoder_in,
        num_classes=K,
        hidden_dim=D,
        num_queries=Q,
        nheads=HEADS,
        dim_feedforward=64,
        dec_layers=LAYERS,
        mask_dim=MASK_DIM,
    )
    return Segmenter(StandInBackbone(), pixel_decoder, decoder)


@pytest.fixture(scope="module")
def segmenter():
    return make_segmenter()


def manual_attention(layer: CrossAttentionLayer, x, memory, blocked, pos, query_pos):
    """Post-norm multi-head attention written out with an explicit softmax."""
    attn = layer.multihead_attn
    heads, d = attn.num_heads, x.shape[-1]
    w_q, w_k, w_v = attn.in_proj_weight.chunk(3)
    b_q, b_k, b_v = attn.in_proj_bias.chunk(3)
    q = (x + query_pos) @ w_q.t() + b_q
    k = (memory + pos) @ w_k.t() + b_k
    v = memory @ w_v.t() + b_v
    out = torch.zeros_like(q)
    dh = d // heads
    for h in range(heads):
        sl = slice(h * dh, (h + 1) * dh)
        scores = q[..., sl] @ k[..., sl].transpose(-1, -2) / math.sqrt(dh)  # (N, Lq, Lk)
        scores = scores.masked_fill(blocked, float("-inf"))
        out[..., sl] = scores.softmax(-1) @ v[..., sl]
    return layer.norm(x + attn.out_proj(out))


def test_fully_blocked_query_attends_everywhere():
    torch.manual_seed(0)
    layer = CrossAttentionLayer(16, 2)
    n, lq, h, w = 2, 3, 4, 5
    mask_logits = torch.randn(n, lq, 8, 10)
    mask_logits[0, 1] = -5.0  # query 1 of image 0 predicts an empty mask
    blocked = attention_mask_from_masks(mask_logits, (h, w))
    assert blocked.shape == (n, lq, h * w)
    assert not blocked[0, 1].any()  # un-blocked, not all blocked
    resized = F.interpolate(mask_logits, size=(h, w), mode="bilinear", align_corners=False).flatten(2)
    expected = resized.sigmoid() < 0.5
    expected[0, 1] = False
    assert torch.equal(blocked, expected) and expected.any()

    x, memory = torch.randn(n, lq, 16), torch.randn(n, h * w, 16)
    pos, query_pos = torch.randn(1, h * w, 16), torch.randn(1, lq, 16)
    out = layer(x, memory, blocked=blocked[:, None], pos=pos, query_pos=query_pos)
    with torch.no_grad():
        ref = manual_attention(layer, x, memory, expected, pos, query_pos)
        unmasked = manual_attention(layer, x, memory, torch.zeros_like(expected), pos, query_pos)
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(out[0, 1], unmasked[0, 1], rtol=1e-4, atol=1e-5)
    assert not torch.allclose(out[1], unmasked[1], atol=1e-3)  # other rows really are masked


def test_inference_path_equals_the_all_layers_path(segmenter):
    """In eval mode the decoder makes each attention mask at its level's size from resized mask
    features (no earlier predictions): the same blocked positions and the same final prediction
    as the all-layers path, which resizes every stride-4 prediction."""
    decoder = segmenter.transformer_decoder
    captured = {True: [], None: []}
    images = torch.randn(2, 3, 128, 160)
    segmenter.eval()
    try:
        with torch.no_grad():
            outs = {}
            for all_layers in (True, None):  # None: eval mode's default, the inference path
                handles = [
                    layer.register_forward_pre_hook(
                        lambda m, a, kw, c=captured[all_layers]: c.append(kw["blocked"]), with_kwargs=True
                    )
                    for layer in decoder.transformer_cross_attention_layers
                ]
                outs[all_layers] = segmenter(images, all_layers=all_layers)
                for h in handles:
                    h.remove()
    finally:
        segmenter.train()
    assert "aux_outputs" in outs[True] and "aux_outputs" not in outs[None]
    assert len(captured[None]) == len(captured[True]) == LAYERS
    for fast, full in zip(captured[None], captured[True]):
        assert fast.any() and (fast != full).sum() <= 2  # a logit within rounding of 0 may flip
    for key in ("pred_logits", "pred_masks", "pred_embds", "mask_features"):
        torch.testing.assert_close(outs[None][key], outs[True][key], rtol=1e-4, atol=1e-4)


def test_attention_masks_come_from_previous_prediction_at_next_level(segmenter):
    decoder = segmenter.transformer_decoder
    captured = []

    def hook(module, args, kwargs):
        captured.append((args[1].shape[1], kwargs["blocked"]))

    handles = [
        layer.register_forward_pre_hook(hook, with_kwargs=True) for layer in decoder.transformer_cross_attention_layers
    ]
    try:
        with torch.no_grad():
            out = segmenter(torch.randn(2, 3, 128, 160))
    finally:
        for h in handles:
            h.remove()
    sizes = [tuple(f.shape[-2:]) for f in out["multi_scale_features"]]
    assert sizes == [(4, 5), (8, 10), (16, 20)]  # strides 32, 16, 8
    previous = [aux["pred_masks"] for aux in out["aux_outputs"]]  # predictions 0 .. L-1
    assert len(captured) == LAYERS
    for i, (memory_len, blocked) in enumerate(captured):
        size = sizes[i % 3]  # round-robin: layer i attends to level i % 3
        assert memory_len == size[0] * size[1]
        resized = F.interpolate(previous[i], size=size, mode="bilinear", align_corners=False)
        expected = resized.sigmoid().flatten(2) < 0.5
        expected[expected.all(-1)] = False
        assert blocked.shape == (2, 1, Q, memory_len)
        assert torch.equal(blocked[:, 0], expected)


def test_semantic_inference_matches_loops():
    torch.manual_seed(0)
    logits, masks = torch.randn(2, 3, 4), torch.randn(2, 3, 2, 5)  # N=2, Q=3, K=3
    scores = semantic_inference(logits, masks)
    expected = torch.zeros(2, 3, 2, 5)
    for n in range(2):
        for q in range(3):
            p = torch.softmax(logits[n, q], -1)
            for c in range(3):
                expected[n, c] += p[c] * torch.sigmoid(masks[n, q])
    torch.testing.assert_close(scores, expected)


def test_segmenter_outputs_and_gradients():
    segmenter = make_segmenter()
    # MSDeformAttn starts with zero offset/weight matrices, so the encoder's position encoding
    # (and its level_embed) gets no gradient before the first update; move away from the init
    with torch.no_grad():
        for layer in segmenter.pixel_decoder.transformer.layers:
            layer.self_attn.attention_weights.weight.normal_(std=0.01)
        # the FFN's post-norm already normalises q: give decoder_norm its own affine map so
        # norm(q) and q differ
        segmenter.transformer_decoder.decoder_norm.weight.uniform_(0.5, 1.5)
        segmenter.transformer_decoder.decoder_norm.bias.normal_(std=0.1)
    images = torch.randn(2, 3, 128, 160)
    out = segmenter(images)
    assert set(out) == {
        "pred_logits",
        "pred_masks",
        "aux_outputs",
        "pred_embds",
        "pred_embds_without_norm",
        "mask_features",
        "multi_scale_features",
    }
    assert out["pred_logits"].shape == (2, Q, K + 1)
    assert out["pred_masks"].shape == (2, Q, 32, 40)
    assert out["pred_embds"].shape == out["pred_embds_without_norm"].shape == (2, Q, 2 * D)
    assert out["mask_features"].shape == (2, MASK_DIM, 32, 40)
    assert [tuple(f.shape) for f in out["multi_scale_features"]] == [
        (2, CONV_DIM, 4, 5),
        (2, CONV_DIM, 8, 10),
        (2, CONV_DIM, 16, 20),
    ]
    aux = out["aux_outputs"]
    assert len(aux) == LAYERS
    for a in aux:
        assert a["pred_logits"].shape == (2, Q, K + 1) and a["pred_masks"].shape == (2, Q, 32, 40)
    # every prediction is different (each layer changes the queries)
    preds = [a["pred_masks"] for a in aux] + [out["pred_masks"]]
    for i in range(len(preds) - 1):
        assert not torch.allclose(preds[i], preds[i + 1])
    # prediction 0 comes from the learnable queries: one class distribution for every image
    torch.testing.assert_close(aux[0]["pred_logits"][0], aux[0]["pred_logits"][1])
    assert not torch.allclose(out["pred_logits"][0], out["pred_logits"][1])

    # embeddings: [norm(q) | reid(norm(q))] and [q | reid(norm(q))]
    decoder = segmenter.transformer_decoder
    q = out["pred_embds_without_norm"][..., :D]
    normed = decoder.decoder_norm(q)
    torch.testing.assert_close(out["pred_embds"][..., :D], normed)
    torch.testing.assert_close(out["pred_embds"][..., D:], decoder.reid_embed(normed))
    torch.testing.assert_close(out["pred_embds_without_norm"][..., D:], out["pred_embds"][..., D:])
    torch.testing.assert_close(decoder.class_embed(normed), out["pred_logits"])

    loss = out["pred_logits"].square().mean() + sum(a["pred_masks"].square().mean() for a in aux)
    loss = loss + out["pred_masks"].square().mean() + out["pred_embds"].square().mean()
    loss.backward()
    params = dict(segmenter.named_parameters())
    for name in [
        "transformer_decoder.query_feat.weight",
        "transformer_decoder.query_embed.weight",
        "transformer_decoder.level_embed.weight",
        "transformer_decoder.reid_embed.layers.0.weight",
        "pixel_decoder.input_proj.0.0.weight",
        "pixel_decoder.transformer.level_embed",
        "pixel_decoder.transformer.layers.0.self_attn.sampling_offsets.weight",
        "pixel_decoder.transformer.layers.0.self_attn.attention_weights.weight",
        "pixel_decoder.adapter_1.weight",
        "pixel_decoder.layer_1.norm.weight",
        "pixel_decoder.mask_features.weight",
        "backbone.convs.0.weight",
    ]:
        grad = params[name].grad
        assert grad is not None and grad.abs().sum() > 0, name


def test_input_proj_identity_only_when_widths_match():
    seg = make_segmenter(decoder_in=CONV_DIM)
    assert all(isinstance(p, nn.Identity) for p in seg.transformer_decoder.input_proj)
    decoder = MultiScaleMaskedTransformerDecoder(
        in_channels=48,
        num_classes=K,
        hidden_dim=D,
        num_queries=Q,
        nheads=HEADS,
        dim_feedforward=64,
        dec_layers=1,
        mask_dim=MASK_DIM,
    )
    assert all(isinstance(p, nn.Conv2d) for p in decoder.input_proj)


def test_pixel_decoder_runs_in_fp32_under_bf16_autocast(segmenter):
    encoder_dtypes = []
    layer = segmenter.pixel_decoder.transformer.layers[0]
    handle = layer.self_attn.value_proj.register_forward_hook(lambda m, i, o: encoder_dtypes.append(o.dtype))
    try:
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
            out = segmenter(torch.randn(1, 3, 64, 96))
    finally:
        handle.remove()
    assert encoder_dtypes == [torch.float32]
    assert out["mask_features"].dtype == torch.float32
    assert all(f.dtype == torch.float32 for f in out["multi_scale_features"])
    assert out["pred_masks"].dtype == torch.bfloat16  # the decoder itself does autocast


def test_sine_position_embedding_matches_formula():
    h, w, f = 3, 4, 8
    pos = sine_position_embedding(h, w, f)
    assert pos.shape == (2 * f, h, w)
    for i in range(h):
        for j in range(w):
            y = (i + 1) / (h + 1e-6) * 2 * math.pi
            x = (j + 1) / (w + 1e-6) * 2 * math.pi
            for c in range(f):
                freq = 10000 ** (2 * (c // 2) / f)
                trig = math.sin if c % 2 == 0 else math.cos
                assert pos[c, i, j].item() == pytest.approx(trig(y / freq), abs=1e-5)
                assert pos[f + c, i, j].item() == pytest.approx(trig(x / freq), abs=1e-5)


def test_build_segmenter_from_config():
    cfg = tiny()
    cfg.model.resnet_width = 16  # a narrow ResNet-18 keeps the test fast
    cfg.model.num_queries, cfg.model.dec_layers = 10, 3
    model = build_segmenter(cfg)
    with torch.no_grad():
        out = model(torch.randn(1, 3, 64, 64))
    assert out["pred_logits"].shape == (1, 10, cfg.model.num_classes + 1)
    assert out["pred_masks"].shape == (1, 10, 16, 16)
    assert out["pred_embds"].shape == (1, 10, 2 * cfg.model.hidden_dim)
    assert len(out["aux_outputs"]) == 3
    assert len(model.pixel_decoder.transformer.layers) == cfg.model.enc_layers
    assert model.pixel_decoder.transformer.layers[0].linear1.out_features == cfg.model.enc_ffn_dim
    assert model.pixel_decoder.transformer.layers[0].self_attn.n_points == cfg.model.enc_points


@pytest.mark.parametrize("training", [True, False])
def test_segmenter_is_one_graph_for_torch_compile(training):
    """``torch.compile`` (``bench_model.py --compile``) sees the segmenter as one graph; a graph
    break (an untraceable line, e.g. a closure reading a variable that only one branch defines)
    would split it into pieces that inductor cannot fuse across."""
    segmenter = make_segmenter().train(training)
    torch._dynamo.reset()
    explained = torch._dynamo.explain(segmenter)(torch.randn(2, 3, 64, 64))
    torch._dynamo.reset()
    assert (explained.graph_count, explained.graph_break_count) == (1, 0), explained.break_reasons
