"""vss.mvc (MVC paper section 2.2, Eq. 1-4): the patch mask against a per-pixel reference, its
statistics (kept fraction, independence across frames), masked pixels at the mean, and the
two-term loss."""

import pytest
import torch

from vss.mvc import mask_frames, mvc_loss, patch_mask, scaled_patch_size


def reference_mask(v: torch.Tensor, b: int, r: float, height: int, width: int) -> torch.Tensor:
    """Eq. (1) pixel by pixel: M[y, x] = [v[y // b, x // b] > r]."""
    n = v.shape[0]
    out = torch.zeros(n, 1, height, width)
    for i in range(n):
        for y in range(height):
            for x in range(width):
                out[i, 0, y, x] = float(v[i, 0, y // b, x // b] > r)
    return out


@pytest.mark.parametrize("shape", [(3, 37, 50), (3, 1, 37, 50), (2, 32, 16)])
def test_patch_mask_matches_equation(shape):
    b, r = 8, 0.6
    height, width = shape[-2:]
    mask = patch_mask(shape, b, r, torch.Generator().manual_seed(5))
    # Same draws: ceil(H/b) x ceil(W/b) per image, partial border cells cropped.
    gh, gw = -(-height // b), -(-width // b)
    v = torch.rand((shape[0], 1, gh, gw), generator=torch.Generator().manual_seed(5))
    assert mask.shape == (shape[0], 1, height, width) and mask.dtype == torch.float32
    assert torch.equal(mask, reference_mask(v, b, r, height, width))


def test_kept_fraction_and_independence():
    b, r, n = 4, 0.7, 4000
    mask = patch_mask((n, 16, 16), b, r, torch.Generator().manual_seed(0))
    cells = mask[:, 0, ::b, ::b].reshape(n, -1)  # (N, 16) one value per patch
    assert abs(cells.mean().item() - (1 - r)) < 0.01
    # Consecutive "frames" (rows) are independent: correlation of the same cell ~ 0.
    a, c = cells[0::2].flatten(), cells[1::2].flatten()
    corr = torch.corrcoef(torch.stack([a, c]))[0, 1].item()
    assert abs(corr) < 0.03
    assert not torch.equal(mask[0], mask[1])


def test_mask_frames_sets_hidden_pixels_to_the_mean():
    g = torch.Generator().manual_seed(1)
    frames = torch.randn(2, 3, 3, 20, 24, generator=g) + 5.0  # (B,T,3,H,W), no zeros
    masked = mask_frames(frames, 4, 0.5, torch.Generator().manual_seed(2))
    mask = patch_mask((6, 20, 24), 4, 0.5, torch.Generator().manual_seed(2))
    mask = mask.reshape(2, 3, 1, 20, 24)
    assert masked.shape == frames.shape
    assert torch.equal(masked[mask.expand_as(frames) == 0], torch.zeros(int((mask == 0).sum()) * 3))
    assert torch.equal(masked[mask.expand_as(frames) == 1], frames[mask.expand_as(frames) == 1])
    # The T frames of a clip get different masks.
    assert not torch.equal(mask[0, 0], mask[0, 1])
    # (N,3,H,W) input works the same way.
    flat = mask_frames(frames.flatten(0, 1), 4, 0.5, torch.Generator().manual_seed(2))
    assert torch.equal(flat, masked.flatten(0, 1))


def test_mvc_loss_is_clean_plus_weighted_masked():
    torch.manual_seed(0)
    weights = torch.randn(3, requires_grad=True)
    frames = torch.randn(1, 2, 3, 8, 8) + 2.0
    targets = [{"labels": torch.tensor([1])}]
    calls = []

    def loss_fn(x, y, masked):
        calls.append((x.detach().clone(), y, masked))
        per_channel = x.mean(dim=(0, 1, 3, 4))  # (3,)
        return {"loss_a": (weights * per_channel).sum(), "loss_b": (weights**2).sum() * x.abs().mean()}

    out = mvc_loss(
        loss_fn, frames, targets, patch_size=2, ratio=0.7, weight=0.5, generator=torch.Generator().manual_seed(3)
    )
    assert sorted(out) == ["loss_a", "loss_b", "mvc_loss_a", "mvc_loss_b"]
    assert len(calls) == 2 and calls[0][1] is targets and calls[1][1] is targets
    assert [c[2] for c in calls] == [False, True]
    assert torch.equal(calls[0][0], frames)
    expected_masked = mask_frames(frames, 2, 0.7, torch.Generator().manual_seed(3))
    assert torch.equal(calls[1][0], expected_masked)
    clean, masked = loss_fn(frames, targets, False), loss_fn(expected_masked, targets, True)
    for key in ("loss_a", "loss_b"):
        assert torch.allclose(out[key], clean[key])
        assert torch.allclose(out[f"mvc_{key}"], 0.5 * masked[key])
    total = sum(out.values())
    total.backward()
    assert weights.grad is not None and torch.isfinite(weights.grad).all()


def test_scaled_patch_size_and_errors():
    assert scaled_patch_size(64, 480, 480) == 64
    assert scaled_patch_size(64, 480, 240) == 32
    assert scaled_patch_size(64, 480, 720) == 96
    assert scaled_patch_size(64, 480, 4) == 1
    with pytest.raises(ValueError, match="ratio"):
        patch_mask((1, 8, 8), 2, 1.0)
    with pytest.raises(ValueError, match="patch size"):
        patch_mask((1, 8, 8), 0, 0.5)
    with pytest.raises(ValueError, match=r"\(N,H,W\)"):
        patch_mask((1, 3, 8, 8), 2, 0.5)
