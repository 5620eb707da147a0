"""Configuration: one dataclass per component, a few named presets, saved as JSON with every
checkpoint.

Presets (``PRESETS``):
- ``tiny``: a CPU-sized Mask2Former (ResNet-18, hidden 128, 50 queries, 3 encoder / 6 decoder
  layers) for the embedded synthetic data, tests and CPU benchmarks.
- ``r50``: the DVIS++ R50 VSPW config (``reference/dvis_plus.md`` section 1: 100 queries,
  hidden 256, 6 deformable encoder layers, 9 masked-attention layers, 12544 points).
- ``vitl``: DINOv2 ViT-L/14 (frozen) + multi-scale neck, 200 queries, otherwise as ``r50``.

No config framework: a preset is a function returning a ``Config``; scripts override fields
from argparse flags explicitly.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field


@dataclass
class ModelConfig:
    num_classes: int = 124  # K; VSPW has 124 (ids 0..123, 255 = ignore)
    # --- backbone (vss/backbone.py) ---
    backbone: str = "resnet50"  # resnet18|resnet34|resnet50|resnet101|vit_small|vit_base|vit_large|vit_giant2
    resnet_width: int = 64  # stem/stage-1 width; 64 = torchvision (smaller only for tests)
    frozen_bn: bool = True  # detectron2 FrozenBN, as DVIS++ R50 (NORM line commented out)
    vit_patch_size: int = 14
    vit_num_registers: int = 0
    freeze_vit: bool = True  # DVIS++ ViT-L configs: FREEZE_VIT True
    vit_neck: str = "simple"  # "simple" (documented gap) or "adapter" (ViT-Adapter)
    # --- pixel decoder (vss/pixel_decoder.py) ---
    conv_dim: int = 256
    mask_dim: int = 256
    enc_layers: int = 6  # deformable encoder layers over strides 8/16/32
    enc_ffn_dim: int = 1024
    enc_heads: int = 8
    enc_points: int = 4
    # --- masked-attention decoder (vss/segmenter.py) ---
    hidden_dim: int = 256  # D; query embeddings passed downstream are 2*D ([norm(q) | reid(q)])
    num_queries: int = 100  # Q
    nheads: int = 8
    dim_feedforward: int = 2048
    dec_layers: int = 9  # masked-attention layers; +1 prediction from the learnable queries
    # --- video stages (vss/tracker.py, vss/refiner.py) ---
    tracker_layers: int = 6
    refiner_layers: int = 6
    video_ffn_dim: int = 2048
    noise_ratio: float = 0.5  # "wa" denoising probability per frame t > 0 (training only)
    window_size: int = 3  # frames per online inference window (WINDOW_SIZE 3)


@dataclass
class LossConfig:
    class_weight: float = 2.0
    mask_weight: float = 5.0  # point-sampled BCE
    dice_weight: float = 5.0
    no_object_weight: float = 0.1
    num_points: int = 12544  # 112**2 points per mask, matching and loss
    oversample_ratio: float = 3.0
    importance_sample_ratio: float = 0.75
    reid_weight: float = 2.0  # contrastive reid losses of the tracker/refiner


@dataclass
class DataConfig:
    # Normalisation of RGB frames in 0..255 (ImageNet, as detectron2/DVIS++).
    pixel_mean: tuple[float, float, float] = (123.675, 116.28, 103.53)
    pixel_std: tuple[float, float, float] = (58.395, 57.12, 57.375)
    # Training: the short side is resized to base_size * s, s ~ U(min_scale, max_scale), then a
    # crop of crop_size (padded with ignore where the frame is smaller), flip p=0.5.
    base_size: int = 480
    min_scale: float = 0.5
    max_scale: float = 2.0
    crop_size: tuple[int, int] = (480, 640)  # (H, W)
    color_jitter: float = 0.2
    # Inference: the short side is resized to test_size (0 = keep the original size).
    test_size: int = 480
    size_divisibility: int = 32


@dataclass
class OptimConfig:
    lr: float = 1e-4  # AdamW base LR (DVIS++)
    weight_decay: float = 0.05
    backbone_lr_mult: float = 0.1
    clip_grad: float = 0.01  # full-model L2 gradient clipping (DVIS++ uses 0.01)
    iters: int = 20000
    lr_steps: tuple[float, ...] = (0.7, 0.9)  # fractions of iters where LR *= 0.1 (14k, 18k of 20k)
    batch: int = 1  # clips per rank
    frames: int = 1  # clip length (stage 1 MinVIS: 1; stage 2: 5; stage 3: 21)


@dataclass
class Config:
    name: str = "r50"
    model: ModelConfig = field(default_factory=ModelConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=1)

    @classmethod
    def from_dict(cls, d: dict) -> "Config":
        """Inverse of ``to_dict``; unknown keys are an error (a config from another version
        should fail loudly, not be half-read)."""
        parts = {}
        for f in dataclasses.fields(cls):
            if f.name not in d:
                continue
            value = d[f.name]
            sub = {"model": ModelConfig, "loss": LossConfig, "data": DataConfig, "optim": OptimConfig}
            if f.name in sub:
                value = _from_dict(sub[f.name], value)
            parts[f.name] = value
        unknown = set(d) - {f.name for f in dataclasses.fields(cls)}
        if unknown:
            raise ValueError(f"unknown config keys: {sorted(unknown)}")
        return cls(**parts)


def _from_dict(kind, d: dict):
    names = {f.name: f for f in dataclasses.fields(kind)}
    unknown = set(d) - set(names)
    if unknown:
        raise ValueError(f"unknown {kind.__name__} keys: {sorted(unknown)}")
    # JSON turns tuples into lists; restore them so configs compare equal after a round trip.
    return kind(**{k: tuple(v) if isinstance(v, list) else v for k, v in d.items()})


def tiny() -> Config:
    """CPU preset: a ResNet-18 Mask2Former at 240x320, small enough for tests and laptops."""
    return Config(
        name="tiny",
        model=ModelConfig(
            backbone="resnet18", frozen_bn=False, conv_dim=128, mask_dim=128, enc_layers=3,
            enc_ffn_dim=512, enc_heads=4, hidden_dim=128, num_queries=50, nheads=4,
            dim_feedforward=512, dec_layers=6, tracker_layers=3, refiner_layers=3,
            video_ffn_dim=512,
        ),
        loss=LossConfig(num_points=3136),  # 56**2: enough for 240x320 masks at stride 4
        data=DataConfig(base_size=240, crop_size=(240, 320), test_size=240),
        optim=OptimConfig(lr=2e-4, iters=600, batch=2, frames=2, clip_grad=1.0),
    )


def r50() -> Config:
    """DVIS++ R50 VSPW config (MinVIS_R50_720p / DVIS_Plus_*_R50 yaml)."""
    return Config(name="r50")


def vitl() -> Config:
    """DINOv2 ViT-L/14 (frozen) + multi-scale neck, 200 queries (DVIS++ vit_adapter configs)."""
    cfg = Config(name="vitl")
    cfg.model.backbone = "vit_large"
    cfg.model.num_queries = 200
    return cfg


PRESETS = {"tiny": tiny, "r50": r50, "vitl": vitl}


def get_preset(name: str) -> Config:
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; choose from {sorted(PRESETS)}")
    return PRESETS[name]()
