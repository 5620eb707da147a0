"""Masked Video Consistency (MVC).

Paper: Liang et al., "Semantic Segmentation on VSPW Dataset through Masked Video Consistency"
(arXiv 2406.04979), section 2.2, Eq. (1)-(4):
    (1) M[m*b:(m+1)*b, n*b:(n+1)*b] = [v > r],  v ~ U(0, 1) per b x b patch
    (2) X_M = M * X
    (3) Y_M = f(X_M)
    (4) L = L_base(f(X), Y) + lambda * L_base(Y_M, Y)
The equation is MIC's masking (Hoyer et al., CVPR 2023; `lhoyer/MIC` BlockMaskGenerator,
read for understanding, not copied).

Readings of what the paper leaves open (configurable, ``vss.config.MVCConfig``):
- The mask is drawn independently for every frame of every clip (MIC draws one per image);
  each region then stays visible in some frames, which is what makes the paper's "use the
  preceding and succeeding frames" rationale possible.
- M keeps a patch where v > r, so r is the masked fraction (r = 0.7 hides 70%).
- M multiplies the *normalised* frames, so masked pixels equal the dataset mean (0).
- The patch grid starts at the top-left pixel; when H or W is not a multiple of b, the last
  row/column of patches is cut by the border (ceil(H/b) x ceil(W/b) draws, then cropped), so
  every cell is a whole b x b patch of the grid. (MIC resizes round(H/b) x round(W/b) draws to
  H x W instead, which stretches the cells.)
- Both terms use the same, unmasked ground truth, and each runs the full model + criterion, so
  each has its own Hungarian matching and deep supervision.
- The masked pass does not update BatchNorm running statistics (``mvc_loss``), and in stage 3
  it reads the refiner's class memory of earlier videos exactly as the clean pass did, without
  adding to it (``vss.video_model.refiner_loss``).
- Defaults b = 64 at the VSPW 480p scale, r = 0.7, lambda = 1 (MIC's values; the paper gives
  none). `scaled_patch_size` keeps b proportional to the input size.
"""

from __future__ import annotations

import contextlib
import math
from typing import Callable, Iterator, TYPE_CHECKING

import torch
from torch import nn

if TYPE_CHECKING:
    from vss.config import Config

BASE_PATCH, BASE_SIZE = 64, 480  # b = 64 at the VSPW 480p scale (MIC's value)


def scaled_patch_size(base_patch: int, base_size: int, size: int) -> int:
    """Patch size b for inputs of short side `size`, keeping b / size as at the reference scale.

    Args:
        base_patch: b at the reference scale (64 for VSPW 480p, as MIC at its scale).
        base_size: short side of the reference scale (480).
        size: short side of the frames being masked (e.g. DataConfig.base_size).
    Returns:
        max(1, round(base_patch * size / base_size)); e.g. (64, 480, 240) -> 32.
    """
    if base_patch < 1 or base_size < 1 or size < 1:
        raise ValueError(f"sizes must be positive, got {base_patch=}, {base_size=}, {size=}")
    return max(1, round(base_patch * size / base_size))


def mvc_settings(cfg: "Config") -> dict | None:
    """Keyword arguments of ``mvc_loss`` from ``cfg.mvc`` (None when MVC is off): b is
    ``cfg.mvc.patch_size``, else 64 scaled from a 480 short side to ``cfg.data.base_size``."""
    if not cfg.mvc.enabled:
        return None
    patch = cfg.mvc.patch_size or scaled_patch_size(BASE_PATCH, BASE_SIZE, cfg.data.base_size)
    return {"patch_size": patch, "ratio": cfg.mvc.ratio, "weight": cfg.mvc.weight}


def patch_mask(
    shape: tuple[int, ...] | torch.Size,
    patch_size: int,
    ratio: float,
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """Eq. (1): one independent patch mask per image.

    Args:
        shape: (N, H, W) or (N, 1, H, W).
        patch_size: b, the side of a square patch in pixels.
        ratio: r in [0, 1), the probability that a patch is hidden.
        generator: CPU torch.Generator for the draws (None: torch's global RNG).
        device: device of the returned mask (draws happen on the CPU so that a seeded
            generator gives the same masks on every device).
    Returns:
        (N, 1, H, W) float32, 1 = keep, 0 = masked; constant within each b x b grid cell.
    """
    if len(shape) == 4:
        if shape[1] != 1:
            raise ValueError(f"patch_mask expects (N,H,W) or (N,1,H,W), got {tuple(shape)}")
        shape = (shape[0], shape[2], shape[3])
    if len(shape) != 3:
        raise ValueError(f"patch_mask expects (N,H,W) or (N,1,H,W), got {tuple(shape)}")
    if not 0.0 <= ratio < 1.0:
        raise ValueError(f"mask ratio must be in [0, 1), got {ratio}")
    if patch_size < 1:
        raise ValueError(f"patch size must be >= 1, got {patch_size}")
    n, height, width = shape
    gh, gw = math.ceil(height / patch_size), math.ceil(width / patch_size)
    v = torch.rand((n, 1, gh, gw), generator=generator)  # (N,1,gh,gw) one draw per patch
    keep = (v > ratio).float()  # Iverson bracket [v > r]
    # Nearest upsampling by whole cells, then crop the partial cells at the bottom/right border.
    keep = keep.repeat_interleave(patch_size, dim=2).repeat_interleave(patch_size, dim=3)
    return keep[:, :, :height, :width].to(device)  # (N,1,H,W)


def mask_frames(
    frames: torch.Tensor,
    patch_size: int,
    ratio: float,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Eq. (2): X_M = M * X, with an independent mask per frame.

    Args:
        frames: (B,T,3,H,W) or (N,3,H,W) normalised frames (0 = the dataset mean).
        patch_size, ratio, generator: as in `patch_mask`.
    Returns:
        Masked frames with `frames`' shape and dtype; hidden pixels are exactly 0.
    """
    if frames.dim() < 4:
        raise ValueError(f"mask_frames expects (B,T,3,H,W) or (N,3,H,W), got {tuple(frames.shape)}")
    lead, (channels, height, width) = frames.shape[:-3], frames.shape[-3:]
    n = math.prod(lead)
    mask = patch_mask((n, height, width), patch_size, ratio, generator, frames.device)  # (N,1,H,W)
    masked = frames.reshape(n, channels, height, width) * mask.to(frames.dtype)  # (N,3,H,W)
    return masked.reshape(frames.shape)


@contextlib.contextmanager
def batch_norm_statistics_kept(module: nn.Module | None) -> Iterator[None]:
    """Within the block, BatchNorm layers of ``module`` in training mode normalise with the
    statistics of the batch they see but leave their running statistics (and
    ``num_batches_tracked``) untouched: ``track_running_stats`` is off for the block. Frozen BN and
    eval-mode BN are not affected."""
    layers = [
        m
        for m in (module.modules() if module is not None else ())
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.training and m.track_running_stats
    ]
    for m in layers:
        m.track_running_stats = False
    try:
        yield
    finally:
        for m in layers:
            m.track_running_stats = True


def mvc_loss(
    loss_fn: Callable[[torch.Tensor, object, bool], dict[str, torch.Tensor]],
    frames: torch.Tensor,
    targets: object,
    *,
    patch_size: int,
    ratio: float,
    weight: float,
    generator: torch.Generator | None = None,
    model: nn.Module | None = None,
) -> dict[str, torch.Tensor]:
    """Eq. (4): L_base(X, Y) + lambda * L_base(M * X, Y).

    The masked pass leaves the model's BatchNorm running statistics as the clean pass left them
    (``batch_norm_statistics_kept``): the masked frames are normalised with their own batch
    statistics, as any training batch, but never enter the running mean/variance used at
    inference. Frames whose 70% are mean-grey have a much smaller variance (0.29x of a CamVid
    batch's at a ResNet-18's first BN); tracked, they would shrink the running variance towards
    0.6x, and clean frames at inference would be scaled up by ~1.3x. (DVIS++ never meets this: its
    R50 uses FrozenBN and its ViT-L is frozen with LayerNorm; MIC's masked pass runs its model in
    train mode, but its BN statistics are those of a pre-trained, frozen-BN backbone as well.)

    Args:
        loss_fn: (frames, targets, masked) -> dict of weighted loss terms whose sum is the base
            loss; it runs the model and the criterion, so each call does its own matching and deep
            supervision. ``masked`` tells the loss it is the masked pass (the stage-3 class memory
            is then read as the clean pass read it and not updated: ``vss.video_model``).
        frames: normalised frames given to ``loss_fn`` ((B,T,3,H,W) or (N,3,H,W)).
        targets: ground truth, passed unchanged to both calls (the unmasked Y).
        patch_size, ratio: b and r of Eq. (1).
        weight: lambda of Eq. (4).
        generator: for the mask draws (None: torch's global RNG, saved by checkpoints).
        model: the module whose BatchNorm statistics the masked pass must not update (None: none).
    Returns:
        The terms of the clean pass under their own keys, plus the masked pass's terms times
        ``weight`` under "mvc_<key>". The total loss is the sum of all values.

    Both passes keep their autograd graphs until the backward, so activation memory doubles.
    """
    clean = loss_fn(frames, targets, False)
    with batch_norm_statistics_kept(model):
        masked = loss_fn(mask_frames(frames, patch_size, ratio, generator), targets, True)
    out = dict(clean)
    for key, value in masked.items():
        out[f"mvc_{key}"] = weight * value
    return out
