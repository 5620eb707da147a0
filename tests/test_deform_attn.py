"""Multi-scale deformable attention: the grid_sample core against a slow per-point bilinear
reference, gradients, the module's wiring, its initialisation and the reference points."""

import math

import torch

from vss.deform_attn import encoder_reference_points, ms_deform_attn_core, MSDeformAttn

SHAPES = [(5, 7), (3, 4), (2, 3)]


def bilinear_zero_pad(image: torch.Tensor, x: float, y: float) -> torch.Tensor:
    """image (C, H, W) at normalised (x, y): pixel j covers [j/W, (j+1)/W), centre (j+0.5)/W;
    corners outside the map contribute zero."""
    _, h, w = image.shape
    px, py = x * w - 0.5, y * h - 0.5
    x0, y0 = math.floor(px), math.floor(py)
    out = torch.zeros(image.shape[0], dtype=image.dtype)
    for yy in (y0, y0 + 1):
        for xx in (x0, x0 + 1):
            if 0 <= yy < h and 0 <= xx < w:
                weight = (1 - abs(px - xx)) * (1 - abs(py - yy))
                out += weight * image[:, yy, xx]
    return out


def slow_core(value, shapes, locations, weights):
    n, _, heads, dh = value.shape
    _, lq, _, levels, points, _ = locations.shape
    starts = [0]
    for h, w in shapes:
        starts.append(starts[-1] + h * w)
    out = torch.zeros(n, lq, heads, dh, dtype=value.dtype)
    for b in range(n):
        for m in range(heads):
            maps = [value[b, starts[l] : starts[l + 1], m].t().reshape(dh, h, w) for l, (h, w) in enumerate(shapes)]
            for q in range(lq):
                for l in range(levels):
                    for p in range(points):
                        x, y = locations[b, q, m, l, p].tolist()
                        out[b, q, m] += weights[b, q, m, l, p] * bilinear_zero_pad(maps[l], x, y)
    return out.reshape(n, lq, heads * dh)


def random_inputs(n=2, lq=4, heads=2, dh=3, points=3, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    s = sum(h * w for h, w in SHAPES)
    value = torch.randn(n, s, heads, dh, generator=g, dtype=dtype)
    # some locations fall outside [0, 1] to exercise the zero padding
    locations = torch.rand(n, lq, heads, len(SHAPES), points, 2, generator=g, dtype=dtype) * 1.4 - 0.2
    weights = torch.rand(n, lq, heads, len(SHAPES), points, generator=g, dtype=dtype)
    return value, locations, weights


def test_core_matches_slow_bilinear_reference():
    value, locations, weights = random_inputs()
    fast = ms_deform_attn_core(value, SHAPES, locations, weights)
    slow = slow_core(value, SHAPES, locations, weights)
    assert fast.shape == (2, 4, 6)
    torch.testing.assert_close(fast, slow, rtol=1e-5, atol=1e-5)


def test_core_samples_pixel_centres_exactly():
    # zero offsets at the encoder reference points read each pixel of its own level exactly
    value, _, _ = random_inputs(n=1, heads=1, dh=2)
    ref = encoder_reference_points(SHAPES)  # (1, S, 1, 2)
    s = ref.shape[1]
    start = 0
    for lvl, (h, w) in enumerate(SHAPES):
        locations = ref[:, :, None, None, None, 0, :].expand(1, s, 1, len(SHAPES), 1, 2)
        weights = torch.zeros(1, s, 1, len(SHAPES), 1)
        weights[..., lvl, 0] = 1.0
        out = ms_deform_attn_core(value, SHAPES, locations, weights)  # (1, S, 2)
        own = slice(start, start + h * w)
        torch.testing.assert_close(out[0, own], value[0, own, 0])
        start += h * w


def test_core_gradcheck_float64():
    value, locations, weights = random_inputs(n=1, lq=2, heads=2, dh=2, points=2, dtype=torch.float64, seed=1)
    locations = locations.clamp(0.05, 0.95)
    inputs = tuple(t.requires_grad_() for t in (value, locations, weights))
    assert torch.autograd.gradcheck(lambda v, loc, wt: ms_deform_attn_core(v, SHAPES, loc, wt), inputs)


def manual_module_forward(module: MSDeformAttn, query, ref, inp, shapes):
    """MSDeformAttn written out with the slow core."""
    n, lq, _ = query.shape
    heads, levels, points = module.n_heads, module.n_levels, module.n_points
    value = module.value_proj(inp).view(n, inp.shape[1], heads, -1)
    offsets = module.sampling_offsets(query).view(n, lq, heads, levels, points, 2)
    logits = module.attention_weights(query).view(n, lq, heads, levels * points)
    weights = torch.softmax(logits, -1).view(n, lq, heads, levels, points)
    locations = torch.empty_like(offsets)
    for l, (h, w) in enumerate(shapes):
        locations[:, :, :, l, :, 0] = ref[:, :, None, l, None, 0] + offsets[:, :, :, l, :, 0] / w
        locations[:, :, :, l, :, 1] = ref[:, :, None, l, None, 1] + offsets[:, :, :, l, :, 1] / h
    return module.output_proj(slow_core(value, shapes, locations, weights))


def test_module_matches_manual_computation():
    torch.manual_seed(0)
    module = MSDeformAttn(d_model=8, n_levels=3, n_heads=2, n_points=2)
    with torch.no_grad():  # non-trivial weights, so a softmax over the wrong axis would show
        module.attention_weights.weight.normal_()
        module.sampling_offsets.weight.normal_(std=0.3)
    s = sum(h * w for h, w in SHAPES)
    inp = torch.randn(2, s, 8)
    query = torch.randn(2, 3, 8)
    ref = torch.rand(2, 3, 3, 2)
    out = module(query, ref, inp, SHAPES)
    with torch.no_grad():
        expected = manual_module_forward(module, query, ref, inp, SHAPES)
    torch.testing.assert_close(out, expected, rtol=1e-4, atol=1e-5)


def test_module_gradcheck_float64():
    torch.manual_seed(0)
    shapes = [(3, 3), (2, 2)]
    module = MSDeformAttn(d_model=4, n_levels=2, n_heads=2, n_points=2).double()
    with torch.no_grad():
        module.attention_weights.weight.normal_()
        module.sampling_offsets.weight.normal_(std=0.1)
    s = sum(h * w for h, w in shapes)
    inp = torch.randn(1, s, 4, dtype=torch.float64, requires_grad=True)
    query = torch.randn(1, 2, 4, dtype=torch.float64, requires_grad=True)
    ref = torch.rand(1, 2, 2, 2, dtype=torch.float64) * 0.6 + 0.2
    assert torch.autograd.gradcheck(lambda q, x: module(q, ref, x, shapes), (query, inp))


def test_deformable_detr_initialisation():
    module = MSDeformAttn(d_model=16, n_levels=3, n_heads=8, n_points=4)
    grid = module.sampling_offsets.bias.view(8, 3, 4, 2)
    # head 0 looks right, head 2 down, head 1 diagonally (scaled to the unit square), point k at k+1
    torch.testing.assert_close(grid[0, 2, 3], torch.tensor([4.0, 0.0]))
    torch.testing.assert_close(grid[2, 0, 1], torch.tensor([0.0, 2.0]), atol=1e-6, rtol=0)
    torch.testing.assert_close(grid[1, 1, 0], torch.tensor([1.0, 1.0]))
    assert (module.sampling_offsets.weight == 0).all()
    assert (module.attention_weights.weight == 0).all() and (module.attention_weights.bias == 0).all()


def test_encoder_reference_points_are_pixel_centres():
    ref = encoder_reference_points([(2, 4), (1, 2)])
    assert ref.shape == (1, 10, 1, 2)
    expected = torch.tensor(
        [[x, y] for y in (0.25, 0.75) for x in (0.125, 0.375, 0.625, 0.875)] + [[0.25, 0.5], [0.75, 0.5]]
    )
    torch.testing.assert_close(ref[0, :, 0], expected)
