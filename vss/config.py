"""Configuration: one dataclass per component, a few named presets, saved as JSON with every
checkpoint. A ``Config`` describes a whole training run: model, losses, data, schedule, the clips
of every stage, the run's stage and seed, MVC and the semi-supervised (U2PL) settings; a run's
``config.json`` round-trips it exactly, and a resumed run is compared field by field.

Presets (``PRESETS``):
- ``tiny``: a CPU-sized Mask2Former (ResNet-18, hidden 128, 50 queries, 3 encoder / 6 decoder
  layers) for the embedded synthetic data, tests and CPU benchmarks.
- ``r50``: the DVIS++ R50 VSPW config (DVIS_Plus ``configs/dvis_Plus/VSPW/*R50*.yaml``: 100
  queries, hidden 256, 6 deformable encoder layers, 9 masked-attention layers, 12544 points).
- ``vitl``: DVIS++'s ViT-L: DINOv2 ViT-L (frozen) built with 16x16 patches + ViT-Adapter,
  200 queries, otherwise as ``r50`` (``configs/dvis_Plus/VSPW/vit_adapter/*.yaml``).

No config framework: a preset is a function returning a ``Config``; scripts override fields
from argparse flags explicitly.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
import json
import typing


@dataclass
class ModelConfig:
    num_classes: int = 124  # K; VSPW has 124 (ids 0..123, 255 = ignore)
    # --- backbone (vss/backbone.py) ---
    backbone: str = "resnet50"  # resnet18|resnet34|resnet50|resnet101|vit_small|vit_base|vit_large|vit_giant2
    resnet_width: int = 64  # stem/stage-1 width; 64 = torchvision (smaller only for tests)
    # detectron2 STEM_OUT_CHANNELS / RES2_OUT_CHANNELS when they differ from the torchvision
    # layout (0 = resnet_width and resnet_width * expansion); only narrow test models set them.
    resnet_stem_channels: int = 0
    resnet_res2_channels: int = 0
    frozen_bn: bool = True  # detectron2 FrozenBN, as DVIS++ R50 (NORM line commented out)
    vit_patch_size: int = 14
    vit_num_registers: int = 0
    freeze_vit: bool = True  # DVIS++ ViT-L configs: FREEZE_VIT True
    vit_neck: str = "simple"  # "simple" (ViTDet pyramid) or "adapter" (DVIS++'s ViT-Adapter)
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
    reid_hidden_dim: int | None = None  # reid MLP width (DVIS++ REID_HIDDEN_DIM 256); None = hidden_dim
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
    # CTVIS contrastive learning of the segmenter's reid embeddings in stage 1 (vss/ctvis.py;
    # DVIS_Plus CL_PLUGIN REID_WEIGHT 2, AUX_REID_WEIGHT 3)
    ctvis: bool = False
    ctvis_weight: float = 2.0
    ctvis_aux_weight: float = 3.0


@dataclass
class DataConfig:
    # Normalisation of RGB frames in 0..255 (ImageNet, as detectron2/DVIS++).
    pixel_mean: tuple[float, float, float] = (123.675, 116.28, 103.53)
    pixel_std: tuple[float, float, float] = (58.395, 57.12, 57.375)
    # Training: the short side is resized to base_size * s, s ~ U(min_scale, max_scale), or to one
    # of short_sides (uniform choice, detectron2's ResizeShortestEdge "choice") when given; the long
    # side is then capped at max_size (0: no cap); then the stage's crop (StageConfig.crop; "fixed":
    # crop_size), flip p=0.5.
    base_size: int = 480
    min_scale: float = 0.5
    max_scale: float = 2.0
    short_sides: tuple[int, ...] = ()
    max_size: int = 0
    crop_size: tuple[int, int] = (480, 640)  # (H, W)
    color_jitter: float = 0.2
    # Inference: the short side is resized to test_size (0 = keep the original size), the long side
    # capped at max_size.
    test_size: int = 480
    size_divisibility: int = 32


@dataclass
class OptimConfig:
    lr: float = 1e-4  # AdamW base LR (DVIS++)
    weight_decay: float = 0.05
    backbone_lr_mult: float = 0.1
    clip_grad: float = 0.01  # full-model L2 gradient clipping (DVIS++ uses 0.01)
    iters: int = 20000  # 0: fitted to time_budget after the first steps (train.py --time-budget)
    lr_steps: tuple[float, ...] = (0.7, 0.9)  # fractions of iters where LR *= 0.1 (14k, 18k of 20k)
    time_budget: float | None = None  # CPU-minutes of setup + training steps the schedule is fitted to
    batch: int = 1  # clips per rank and micro-batch


@dataclass
class StageConfig:
    """What differs between the training stages (DVIS_Plus configs/dvis_Plus/VSPW/*.yaml and the
    clip sampling of dvis_Plus/data_video/dataset_mapper_vss.py)."""

    frames: int = 1  # T (INPUT.SAMPLING_FRAME_NUM)
    reverse_prob: float = 0.0  # probability of reversing a clip in time (INPUT.REVERSE_AGU: 0.5)
    # 0: T consecutive frames; r > 0: a reference frame and T-1 frames drawn with replacement within
    # +-r of it, sorted (DVIS++'s rule when 2*SAMPLING_FRAME_RANGE+1 != SAMPLING_FRAME_NUM, e.g. CTVIS)
    frame_range: int = 0
    # "fixed": a DataConfig.crop_size window, padded with ignore where the frame is smaller (vss);
    # "none": the whole rescaled frame (DVIS++ stages 1-2); "range": DVIS++'s absolute_range crop,
    # height and width each uniform in [min(side, lo), min(side, hi)] of crop_range, never padded
    crop: str = "fixed"
    crop_range: tuple[int, int] = (600, 720)
    lr_steps: tuple[float, ...] = ()  # the stage's LR drops (fractions of iters); () = OptimConfig.lr_steps


@dataclass
class StagesConfig:
    """The settings of every training stage; a run uses the one of ``TrainConfig.stage``."""

    segmenter: StageConfig = field(default_factory=lambda: StageConfig(frames=1))  # MinVIS: images
    tracker: StageConfig = field(default_factory=lambda: StageConfig(frames=5))  # DVIS++ online NUM 5
    refiner: StageConfig = field(default_factory=lambda: StageConfig(frames=21, reverse_prob=0.5))  # offline
    semi: StageConfig = field(default_factory=lambda: StageConfig(frames=1))


@dataclass
class MVCConfig:
    """Masked Video Consistency (MVC paper section 2.2; ``vss/mvc.py``)."""

    enabled: bool = False
    patch_size: int | None = None  # b; None: 64 at a 480 short side, scaled with DataConfig.base_size
    ratio: float = 0.7  # r, the fraction of hidden patches
    weight: float = 1.0  # lambda of Eq. (4)


@dataclass
class SemiConfig:
    """The semi-supervised stage (PVUW 2024 1st place + U2PL; ``vss/semi_stage.py``)."""

    pseudo: str | None = None  # folder of pseudo labels + entropies (infer.py --save-probs)
    unlabeled_split: str = "test"
    unlabeled_data: str | None = None  # VSPW-layout root of the unlabelled videos (None: --data)
    unsup_weight: float = 1.0  # lambda_u of the pseudo-label set loss
    contrastive_weight: float = 0.1  # lambda_c of the U2PL contrastive loss (the paper's)
    drop_percent: float = 80.0  # U2PL: reliable percentile at the start, -> 100
    entropy_alpha: float = 20.0  # U2PL alpha_0: % of low/high-entropy pixels for anchors/negatives
    ema_decay: float = 0.99  # teacher EMA
    cutmix: bool = False  # U2PL's CutMix of the unlabelled clips (one box per clip, all frames)
    # Memory-bank keys per class (256 float32 = 1 KiB each, in host RAM on every rank and in every
    # checkpoint once filled): U2PL's 30000 is ~3.8 GB with VSPW's 124 classes.
    bank_size: int = 30000


@dataclass
class TrainConfig:
    """What the run trains on and how its randomness is seeded."""

    stage: str = "segmenter"  # segmenter | tracker | refiner | semi
    seed: int = 0  # initialisation, data order and sampling
    split: str = "train"
    extra: tuple[str, ...] = ()  # extra image datasets, "ROOT:MAPFILE" each
    extra_ratio: float | None = None  # fraction of labelled slots from the extra images


@dataclass
class Config:
    name: str = "r50"
    model: ModelConfig = field(default_factory=ModelConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    stages: StagesConfig = field(default_factory=StagesConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    mvc: MVCConfig = field(default_factory=MVCConfig)
    semi: SemiConfig = field(default_factory=SemiConfig)

    @property
    def stage(self) -> StageConfig:
        """The settings of the run's stage (``train.stage``)."""
        return getattr(self.stages, self.train.stage)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=1)

    @classmethod
    def from_dict(cls, d: dict) -> "Config":
        """Inverse of ``to_dict``; unknown keys are an error (a config from another version
        should fail loudly, not be half-read); missing sections and fields take their defaults.
        Configs saved before the per-stage clips existed go through ``migrate_config`` first."""
        return _from_dict(cls, d)


def _from_dict(kind, d: dict):
    if not isinstance(d, dict):
        raise ValueError(f"{kind.__name__}: expected a mapping, got {type(d).__name__}")
    hints = typing.get_type_hints(kind)
    names = {f.name for f in dataclasses.fields(kind)}
    unknown = set(d) - names
    if unknown:
        raise ValueError(f"unknown {kind.__name__} keys: {sorted(unknown)}")
    values = {}
    for name, value in d.items():
        hint = hints[name]
        if dataclasses.is_dataclass(hint):
            value = _from_dict(hint, value)
        elif isinstance(value, list):  # JSON turns tuples into lists; restore them
            value = tuple(value)
        values[name] = value
    return kind(**values)


def config_diff(a: Config, b: Config) -> list[str]:
    """Dotted names of the fields that differ, with both values, e.g. "optim.lr: 0.0001 -> 0.001"."""

    def flat(d: dict, prefix: str = "") -> dict:
        out = {}
        for k, v in d.items():
            out.update(flat(v, f"{prefix}{k}.") if isinstance(v, dict) else {f"{prefix}{k}": v})
        return out

    fa, fb = flat(a.to_dict()), flat(b.to_dict())
    return [f"{k}: {fa.get(k)!r} -> {fb.get(k)!r}" for k in sorted(set(fa) | set(fb)) if fa.get(k) != fb.get(k)]


def migrate_config(config: dict, stage: str | None = None, args: dict | None = None) -> dict:
    """A config dict saved before ``stages``/``train``/``mvc``/``semi`` existed, in today's layout.

    Such a config held the run's clip length in ``optim.frames`` and the run settings in the
    checkpoint's ``args`` (the parsed command line). The clips of the other stages come from the
    preset of the same name. Today's configs are returned unchanged.

    Args:
        config: the saved ``config`` dict.
        stage: the checkpoint's trained stage ("semi" for a semi run).
        args: the checkpoint's ``args`` dict (None: defaults).
    """
    if "optim" not in config or "frames" not in config["optim"]:
        return config
    config = json.loads(json.dumps(config))  # a deep copy
    frames = config["optim"].pop("frames")
    args = args or {}
    stage = stage or args.get("stage") or "segmenter"
    base = PRESETS[config["name"]]() if config.get("name") in PRESETS else Config()
    # the clips of that version: the preset's frames in stages 1 and semi, 5 / 21 (tiny: 9) in the
    # video stages, stage 3 reversed with p 0.5, every stage with the fixed crop and optim.lr_steps
    image_frames = 2 if config.get("name") == "tiny" else 1
    stages = {
        "segmenter": StageConfig(frames=image_frames),
        "tracker": StageConfig(frames=5),
        "refiner": StageConfig(frames=9 if config.get("name") == "tiny" else 21, reverse_prob=0.5),
        "semi": StageConfig(frames=image_frames),
    }
    stages[stage].frames = frames
    config["stages"] = {name: dataclasses.asdict(value) for name, value in stages.items()}
    config["train"] = {
        "stage": stage,
        "seed": args.get("seed", 0),
        "split": args.get("split", "train"),
        "extra": list(args.get("extra") or []),
        "extra_ratio": args.get("extra_ratio"),
    }
    config["mvc"] = {
        "enabled": bool(args.get("mvc")),
        "patch_size": args.get("mvc_patch"),
        "ratio": args.get("mvc_ratio", 0.7),
        "weight": args.get("mvc_weight", 1.0),
    }
    semi = dataclasses.asdict(base.semi)
    for key in (
        "pseudo",
        "unlabeled_split",
        "unlabeled_data",
        "unsup_weight",
        "contrastive_weight",
        "drop_percent",
        "entropy_alpha",
        "ema_decay",
        "bank_size",
    ):
        if args.get(key) is not None:
            semi[key] = args[key]
    config["semi"] = semi
    return config


def tiny() -> Config:
    """CPU preset: a ResNet-18 Mask2Former at 240x320, small enough for tests and laptops."""
    return Config(
        name="tiny",
        model=ModelConfig(
            backbone="resnet18",
            frozen_bn=False,
            conv_dim=128,
            mask_dim=128,
            enc_layers=3,
            enc_ffn_dim=512,
            enc_heads=4,
            hidden_dim=128,
            num_queries=50,
            nheads=4,
            dim_feedforward=512,
            dec_layers=6,
            tracker_layers=3,
            refiner_layers=3,
            video_ffn_dim=512,
        ),
        loss=LossConfig(num_points=3136),  # 56**2: enough for 240x320 masks at stride 4
        data=DataConfig(base_size=240, crop_size=(240, 320), test_size=240),
        optim=OptimConfig(lr=2e-4, iters=600, batch=2, clip_grad=1.0),
        # Stage 3's 21-frame clips cost ~4x a 5-frame one per step: scaled down for the CPU.
        stages=StagesConfig(
            segmenter=StageConfig(frames=2),
            tracker=StageConfig(frames=5),
            refiner=StageConfig(frames=9, reverse_prob=0.5),
            semi=StageConfig(frames=2),
        ),
        # 4096 keys per class: ~24 MB with the synthetic data's 6 classes (30000 made 118 MB of a
        # 342 MB checkpoint there), about two steps of negatives of the default synthetic run.
        semi=SemiConfig(bank_size=4096),
    )


def r50() -> Config:
    """DVIS++'s R50 VSPW configs, stage by stage (DVIS_Plus ``configs/dvis_Plus/VSPW/``:
    CTVIS_R50 for the segmenter, DVIS_Plus_Online_R50 / DVIS_Plus_Offline_R50 for the tracker and
    refiner; their data settings are those ``dvis_Plus/data_video/dataset_mapper_vss.py`` reads):
    short side drawn from 480..800 in steps of 32, long side at most 1333, horizontal flip, no
    colour jitter; no crop in stages 1-2 and an absolute_range crop of (600, 720) in stage 3; clips
    of 4 frames within +-8 (CTVIS), 5 consecutive (online), 21 consecutive reversed with p 0.5
    (offline); AdamW 1e-4, 20000 iterations, LR x0.1 at 14k and 18k (CTVIS) or 14k (online,
    offline); test short side 720; FrozenBN ResNet-50, 100 queries. The segmenter trains with
    CTVIS; ``--no-ctvis --frames 1`` gives MinVIS_R50_720p's stage 1 instead."""
    cfg = Config(name="r50")
    cfg.data = DataConfig(short_sides=tuple(range(480, 801, 32)), max_size=1333, color_jitter=0.0, test_size=720)
    cfg.loss.ctvis = True
    cfg.stages = StagesConfig(
        segmenter=StageConfig(frames=4, frame_range=8, crop="none", lr_steps=(0.7, 0.9)),
        tracker=StageConfig(frames=5, crop="none", lr_steps=(0.7,)),
        refiner=StageConfig(frames=21, reverse_prob=0.5, crop="range", crop_range=(600, 720), lr_steps=(0.7,)),
        semi=StageConfig(frames=1, crop="none"),
    )
    cfg.model.reid_hidden_dim = 256  # REID_HIDDEN_DIM
    return cfg


def vitl() -> Config:
    """DVIS++'s ViT-L VSPW configs (``vit_adapter/*_VitAdapterL.yaml``, whose base is the R50 file of
    the same name): as ``r50`` with a frozen DINOv2 ViT-L built with 16x16 patches (backbone
    ``D2VitAdapterDinoV2``) behind the ViT-Adapter and 200 queries."""
    cfg = r50()
    cfg.name = "vitl"
    cfg.model.backbone = "vit_large"
    cfg.model.vit_patch_size = 16
    cfg.model.vit_neck = "adapter"
    cfg.model.num_queries = 200
    return cfg


PRESETS = {"tiny": tiny, "r50": r50, "vitl": vitl}


def get_preset(name: str) -> Config:
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; choose from {sorted(PRESETS)}")
    return PRESETS[name]()
