"""The r50 / vitl presets equal DVIS++'s VSPW configs stage by stage (DVIS_Plus
configs/dvis_Plus/VSPW/{CTVIS_R50,DVIS_Plus_Online_R50,DVIS_Plus_Offline_R50}.yaml, their Base file,
and the clip sampling / augmentation of dvis_Plus/data_video/dataset_mapper_vss.py); every value
pinned, so a change to a preset is a deliberate one."""

from __future__ import annotations

import numpy as np

from vss import data as D
from vss.config import get_preset, StageConfig
from vss.engine import lr_milestones


def test_r50_data_and_solver_are_dvis_plus():
    cfg = get_preset("r50")
    d, o, m = cfg.data, cfg.optim, cfg.model
    # INPUT.MIN_SIZE_TRAIN (480, 512, ..., 800) "choice", MAX_SIZE_TRAIN 1333, flip, no colour jitter
    assert d.short_sides == (480, 512, 544, 576, 608, 640, 672, 704, 736, 768, 800) and d.max_size == 1333
    assert d.color_jitter == 0.0
    assert d.test_size == 720 and d.size_divisibility == 32  # MIN_SIZE_TEST 720 (MAX_SIZE_TEST 1333)
    assert d.pixel_mean == (123.675, 116.28, 103.53) and d.pixel_std == (58.395, 57.12, 57.375)
    # SOLVER: AdamW 1e-4, 20000 iterations, weight decay 0.05, backbone x0.1, full-model clip 0.01,
    # one clip per GPU (IMS_PER_BATCH = #GPUs in GETTING_STARTED.md)
    assert (o.lr, o.iters, o.weight_decay, o.backbone_lr_mult, o.clip_grad, o.batch) == (
        1e-4,
        20000,
        0.05,
        0.1,
        0.01,
        1,
    )
    # MODEL: FrozenBN ResNet-50, 100 queries, 6 pixel-decoder layers, 9 decoder layers (+ the first
    # prediction: 10 supervised outputs), hidden 256, 124 classes, 12544 points
    assert (m.backbone, m.frozen_bn, m.num_queries, m.enc_layers, m.dec_layers, m.hidden_dim, m.num_classes) == (
        "resnet50",
        True,
        100,
        6,
        9,
        256,
        124,
    )
    # the reid MLP of the DVIS++ decoder (REID_HIDDEN_DIM 256), torchvision-width ResNet stem/res2
    assert (m.reid_hidden_dim, m.resnet_width, m.resnet_stem_channels, m.resnet_res2_channels) == (256, 64, 0, 0)
    assert (cfg.loss.num_points, cfg.loss.class_weight, cfg.loss.mask_weight, cfg.loss.dice_weight) == (
        12544,
        2.0,
        5.0,
        5.0,
    )
    assert cfg.loss.ctvis and (cfg.loss.ctvis_weight, cfg.loss.ctvis_aux_weight) == (2.0, 3.0)


def test_r50_stages_are_dvis_plus():
    s = get_preset("r50").stages
    # CTVIS_R50: 4 frames around a reference within +-8, no crop, LR drops at 14k and 18k
    assert s.segmenter == StageConfig(frames=4, frame_range=8, crop="none", lr_steps=(0.7, 0.9))
    # DVIS_Plus_Online_R50: 5 consecutive frames, no crop, one drop at 14k
    assert s.tracker == StageConfig(frames=5, crop="none", lr_steps=(0.7,))
    # DVIS_Plus_Offline_R50: 21 consecutive frames reversed with p 0.5, absolute_range crop (600, 720)
    assert s.refiner == StageConfig(frames=21, reverse_prob=0.5, crop="range", crop_range=(600, 720), lr_steps=(0.7,))
    o = get_preset("r50").optim
    assert lr_milestones(o, s.segmenter.lr_steps) == [14000, 18000]
    assert lr_milestones(o, s.tracker.lr_steps) == lr_milestones(o, s.refiner.lr_steps) == [14000]


def test_vitl_is_r50_with_the_vit_and_200_queries():
    """configs/dvis_Plus/VSPW/vit_adapter/*_VitAdapterL.yaml: backbone D2VitAdapterDinoV2 (DINOv2
    ViT-L built with 16x16 patches, no registers, FREEZE_VIT True) under the ViT-Adapter,
    NUM_OBJECT_QUERIES 200; everything else from the R50 file of the same name (REID_HIDDEN_DIM 256
    included)."""
    r50, vitl = get_preset("r50"), get_preset("vitl")
    m = vitl.model
    assert (m.backbone, m.vit_patch_size, m.vit_num_registers, m.freeze_vit, m.vit_neck, m.num_queries) == (
        "vit_large",
        16,
        0,
        True,
        "adapter",
        200,
    )
    assert m.reid_hidden_dim == 256 and m.hidden_dim == 256
    changed = {"backbone", "vit_patch_size", "vit_neck", "num_queries"}
    assert {k: v for k, v in vars(m).items() if k not in changed} == {
        k: v for k, v in vars(r50.model).items() if k not in changed
    }
    assert vitl.data == r50.data and vitl.stages == r50.stages and vitl.optim == r50.optim and vitl.loss == r50.loss


def test_tiny_keeps_the_cpu_recipe():
    """tiny is the CPU variant: continuous scales around 240, a fixed 240x320 crop, colour jitter,
    test 240, 2-frame stage-1 clips, 9-frame stage-3 clips."""
    cfg = get_preset("tiny")
    assert (cfg.data.base_size, cfg.data.crop_size, cfg.data.test_size, cfg.data.short_sides) == (
        240,
        (240, 320),
        240,
        (),
    )
    assert cfg.stages.segmenter == StageConfig(frames=2) and cfg.stages.refiner == StageConfig(
        frames=9, reverse_prob=0.5
    )
    assert lr_milestones(cfg.optim, cfg.stage.lr_steps) == [420, 540]


def test_r50_clips_of_a_vspw_sized_video():
    """What the r50 stages give for a 480x854 VSPW frame: a whole rescaled frame in stages 1-2 (short
    side one of the choices unless the long side would pass 1333), a crop in [600, 720] per side in stage 3."""
    cfg = get_preset("r50")
    for s in range(50):
        rng = np.random.default_rng(s)
        tf = D.sample_clip_transform(rng, (480, 854), cfg.data, crop=cfg.stages.tracker.crop)
        assert tf.size in {D.rescaled_size(480, 854, short, 1333) for short in cfg.data.short_sides}
        assert max(tf.size) <= 1333 and tf.crop == (0, 0, *tf.size)
        st = cfg.stages.refiner
        tf = D.sample_clip_transform(rng, (480, 854), cfg.data, crop=st.crop, crop_range=st.crop_range)
        assert min(tf.size[0], 600) <= tf.crop[2] <= min(tf.size[0], 720)
        assert 600 <= tf.crop[3] <= 720
