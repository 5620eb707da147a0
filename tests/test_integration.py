"""End-to-end integration tests on rendered synthetic videos (``vss.synthetic``): real models,
real losses, real inference and the official metrics, trained for a bounded number of steps.

These are the slow tests of the suite (one thread, a shared 2-core machine):
- ``test_tiny_preset_overfits_one_clip`` (~10 s): the ``tiny`` preset's segmenter overfits
  one clip.
- ``test_stage3_flickers_less_than_stage1`` (~80 s): stage 3 (segmenter -> tracker -> refiner)
  is more temporally consistent (VC8) than stage 1 with the same segmenter weights, on videos
  where a single frame is a noisy view of a region's class.
"""

import time

import numpy as np
import torch

from vss.config import tiny
from vss.criterion import SetCriterion
from vss.data import clip_targets, normalize
from vss.engine import build_optimizer, train_step
from vss.io import shift_labels
from vss.matcher import HungarianMatcher
from vss.metrics import merge, summarize, VideoStats
from vss.synthetic import render_video
from vss.video_model import build_video_model, load_previous_stage, predict_video, video_loss

NUM_CLASSES = 6  # sky, grass, road, car, person, ball


def render(seed, frames: int, height: int, width: int, data_cfg) -> tuple[torch.Tensor, torch.Tensor]:
    """One synthetic video: normalised frames (T,3,H,W) and train-id labels (T,H,W) int64."""
    images, raw = render_video(seed, frames=frames, height=height, width=width, num_classes=NUM_CLASSES)
    labels = torch.from_numpy(shift_labels(np.stack(raw)).astype(np.int64))
    return normalize(np.stack(images), data_cfg), labels


def video_figures(model, videos: list, num_classes: int = NUM_CLASSES) -> tuple[float, float]:
    """mIoU and VC8 (official rules, ``vss.metrics``) of ``predict_video`` over the videos."""
    stats = []
    for i, (frames, labels) in enumerate(videos):
        pred = predict_video(model, frames, tuple(labels.shape[-2:]))["labels"]  # (T,H,W)
        video = VideoStats(num_classes, (8,), name=f"video{i}")
        for t in range(frames.shape[0]):
            video.update(labels[t].numpy().astype(np.uint8), pred[t].numpy().astype(np.uint8))
        stats.append(video)
    figures = summarize(merge(stats))
    return figures["mIoU"], figures["VC8"]


def train(model, criterion, cfg, steps: int, next_batch, guided_steps: int = 0, callback=None) -> int:
    """``steps`` AdamW steps of ``video_loss`` (the first ``guided_steps`` with guided matching).
    ``callback(step)`` after each step may return True to stop early. Returns the steps run."""
    optimizer = build_optimizer(model, cfg.optim)
    for step in range(1, steps + 1):
        model.train()
        guided = step <= guided_steps
        train_step(
            model,
            [next_batch()],
            lambda m, b: video_loss(m, b, criterion, guided=guided),
            optimizer,
            None,
            None,
            cfg.optim.clip_grad,
        )
        if callback is not None and callback(step):
            return step
    return steps


# ---------------------------------------------------------------------------------------------
# 1. The tiny preset overfits one clip
# ---------------------------------------------------------------------------------------------

OVERFIT_MAX_STEPS = 120  # 40-50 steps were needed for clip seeds 0-4 (see the docstring)


def test_tiny_preset_overfits_one_clip():
    """Issue requirement: "The tiny preset overfits one synthetic clip: train mIoU > 0.9 within
    a bounded number of steps."

    The ``tiny`` architecture unchanged (ResNet-18 from scratch, hidden 128, 50 queries, 3 encoder
    / 6 decoder layers); what is reduced: a 2-frame clip at 96x128, 1024 points per mask instead
    of 3136; the LR is raised to 1e-3 (backbone 1e-4). The segmenter stage trains on the clip with
    ``SetCriterion`` through ``video_loss``; every 10 steps from step 30 the clip is predicted
    (``predict_video``, Mask2Former semantic inference) and scored with ``vss.metrics``. Measured
    (clip seeds 0-4, torch seed = clip seed): mIoU first > 0.9 at step 40, 50, 50, 40, 40; the
    bound is 120 steps (0.23 s per step on a quiet core: 9 s when it passes at step 40).
    """
    cfg = tiny()
    cfg.model.num_classes = NUM_CLASSES
    cfg.loss.num_points = 1024
    cfg.optim.lr = 1e-3
    frames, labels = render([0, 7], 2, 96, 128, cfg.data)
    batch = {"frames": frames[None], "targets": [clip_targets(labels)]}
    torch.manual_seed(0)
    model = build_video_model(cfg, "segmenter")
    criterion = SetCriterion(NUM_CLASSES, HungarianMatcher.from_config(cfg.loss), cfg.loss)

    miou_before, _ = video_figures(model, [(frames, labels)])
    history = []

    def check(step):
        if step < 30 or step % 10:
            return False
        history.append((step, video_figures(model, [(frames, labels)])[0]))
        return history[-1][1] > 0.9

    start = time.perf_counter()
    steps = train(model, criterion, cfg, OVERFIT_MAX_STEPS, lambda: batch, callback=check)
    seconds = time.perf_counter() - start
    assert miou_before < 0.5, f"the untrained model already scores mIoU {miou_before:.3f}: the test proves nothing"
    assert history and history[-1][1] > 0.9, (
        f"train mIoU did not exceed 0.9 within {OVERFIT_MAX_STEPS} steps ({seconds:.0f} s): "
        f"(step, mIoU) = {[(s, round(m, 3)) for s, m in history]}"
    )
    print(f"overfit: mIoU {miou_before:.3f} -> {history[-1][1]:.3f} in {steps} steps, {seconds:.1f} s")


# ---------------------------------------------------------------------------------------------
# 2. Stage 3 flickers less than stage 1 with the same segmenter weights
# ---------------------------------------------------------------------------------------------

FLICKER_SEED = 0
FRAME_SIZE = (64, 96)  # masks at stride 4: 16 x 24
TRAIN_VIDEOS, TRAIN_FRAMES = 6, 16
HELD_OUT_VIDEOS, HELD_OUT_FRAMES = 6, 24
THING_CLASSES = (3, 4, 5)  # car, person, ball: the moving objects of vss.synthetic
GRASS, MEADOW = 1, 6  # meadow: a 7th class, grass re-labelled in every other video
CUE_CLASSES = NUM_CLASSES + 1
CUE_SHIFT, CUE_NOISE = 40.0, 40.0  # 0..255 units: meadow +SHIFT, grass -SHIFT, + N(0, NOISE) per frame


def small_config():
    """The tiny preset's layout (3 encoder / 6 decoder / 3 tracker / 3 refiner layers, 4 heads)
    at smaller widths: ResNet-18 of width 16, hidden 64, 10 queries (7 classes), 512 points."""
    cfg = tiny()
    m = cfg.model
    m.num_classes = CUE_CLASSES
    m.resnet_width = 16
    m.hidden_dim = m.conv_dim = m.mask_dim = 64
    m.enc_ffn_dim = m.dim_feedforward = m.video_ffn_dim = 256
    m.num_queries = 10
    cfg.loss.num_points = 512
    return cfg


def render_noisy_cue(seed, frames: int, data_cfg) -> tuple[torch.Tensor, torch.Tensor]:
    """A synthetic video whose grass is "meadow" in every other video (odd ``seed[1]``), told
    apart only by brightness seen through per-frame noise: the grass region is brightened by
    +CUE_SHIFT (meadow) or -CUE_SHIFT (grass) plus N(0, CUE_NOISE) drawn per frame. One frame
    is often misleading (the shifts are one noise s.d. from the midpoint: ~16 % of frames look
    like the other class, more with the per-video colour variation); the mean over a video is
    not. Returns normalised frames (T,3,H,W) and train-id labels (T,H,W) int64."""
    images, raw = render_video(seed, frames=frames, height=FRAME_SIZE[0], width=FRAME_SIZE[1], num_classes=NUM_CLASSES)
    labels = shift_labels(np.stack(raw))  # (T,H,W) uint8
    meadow = seed[1] % 2 == 1
    rng = np.random.default_rng([555, *seed])
    shift = (CUE_SHIFT if meadow else -CUE_SHIFT) + rng.normal(0, CUE_NOISE, frames)  # (T,)
    grass = labels == GRASS  # (T,H,W)
    images = np.stack(images).astype(np.float32) + (grass * shift[:, None, None])[..., None]  # (T,H,W,3)
    if meadow:
        labels[grass] = MEADOW
    images = np.rint(images).clip(0, 255).astype(np.uint8)
    return normalize(images, data_cfg), torch.from_numpy(labels.astype(np.int64))


def object_travel(labels: torch.Tensor) -> float:
    """Largest centroid displacement (pixels) between the first and last frame in which a thing
    class is present, over the thing classes of the video."""
    travel = 0.0
    for c in THING_CLASSES:
        present = [t for t in range(labels.shape[0]) if (labels[t] == c).any()]
        if len(present) < 2:
            continue
        a, b = (torch.nonzero(labels[t] == c).float().mean(0) for t in (present[0], present[-1]))
        travel = max(travel, float((a - b).norm()))
    return travel


def clip_sampler(videos: list, num_frames: int, rng: np.random.Generator):
    """A function returning a random clip of ``num_frames`` consecutive frames as a batch of 1."""

    def next_batch():
        frames, labels = videos[int(rng.integers(len(videos)))]
        s = int(rng.integers(0, frames.shape[0] - num_frames + 1))
        return {"frames": frames[s : s + num_frames][None], "targets": [clip_targets(labels[s : s + num_frames])]}

    return next_batch


def train_three_stages(seed: int):
    """Stage 1 on 2-frame clips, stage 2 on 10-frame clips (segmenter frozen), stage 3 on whole
    16-frame training videos (segmenter and tracker frozen), each loading the previous stage's
    weights. Returns the three models, the held-out videos and the seconds spent."""
    cfg = small_config()
    criterion = SetCriterion(CUE_CLASSES, HungarianMatcher.from_config(cfg.loss), cfg.loss)
    train_set = [render_noisy_cue([seed, 100 + i], TRAIN_FRAMES, cfg.data) for i in range(TRAIN_VIDEOS)]
    held_out = [render_noisy_cue([seed, 900 + i], HELD_OUT_FRAMES, cfg.data) for i in range(HELD_OUT_VIDEOS)]
    start = time.perf_counter()

    torch.manual_seed(seed)
    cfg.optim.lr = 1e-3
    stage1 = build_video_model(cfg, "segmenter")
    train(stage1, criterion, cfg, 150, clip_sampler(train_set, 2, np.random.default_rng([seed, 1])))

    # DVIS++ trains the tracker on 5-frame clips; trained that briefly it drifts after ~5-10
    # frames (unmatched slots turn into a class), so the clips are as long as affordable here.
    torch.manual_seed(seed + 1)
    cfg.optim.lr = 5e-4
    stage2 = build_video_model(cfg, "tracker")
    load_previous_stage(stage2, stage1.state_dict())
    train(stage2, criterion, cfg, 200, clip_sampler(train_set, 10, np.random.default_rng([seed, 2])), guided_steps=100)

    # The refiner sees whole training videos (DVIS++ uses 21-frame clips) and guided matching
    # for the whole (short) stage: left free in the second half, it may move an object to
    # another slot than the tracker's, and the inference rule max(offline, online) per slot
    # then pairs one object's mask with another's class.
    torch.manual_seed(seed + 2)
    stage3 = build_video_model(cfg, "refiner")
    load_previous_stage(stage3, stage2.state_dict())
    train(
        stage3,
        criterion,
        cfg,
        600,
        clip_sampler(train_set, TRAIN_FRAMES, np.random.default_rng([seed, 3])),
        guided_steps=600,
    )
    return stage1, stage2, stage3, held_out, time.perf_counter() - start


def test_stage3_flickers_less_than_stage1():
    """Issue requirement: "on a synthetic video with a moving object, the stage-3 model's
    predictions flicker less (VC8) than the stage-1 model's from the same segmenter weights."

    What a video model has over a per-frame one is evidence from other frames. The videos here
    (``render_noisy_cue``) hold one class, meadow, that differs from grass only by a brightness
    seen through per-frame noise, so a single frame often misleads and the whole video does
    not: the per-frame model flips the region between grass and meadow from frame to frame,
    while the refiner gives each object one class per video (activation-weighted temporal
    pooling, DVIS++ sec. 3.3) and the tracker's time-averaged online class is pooled over the
    video too. The rest of each scene is ``vss.synthetic`` (moving, occluding objects, camera
    pan, sensor noise), in colour.

    A small segmenter (``small_config``) is trained briefly on 6 such videos (3 grass, 3
    meadow), then the tracker and the refiner with the earlier stages frozen (``video_loss``);
    stage 1 and stage 3 (same segmenter weights, checked) predict 6 held-out videos of 24
    frames with moving objects (``predict_video``); VC8 and mIoU follow the official rules
    (``vss.metrics``, pooled over the videos). Stage 3 must flicker less and lose at most 0.1
    mIoU (a guard against consistency bought by predicting one class everywhere; the short
    video stages do lose a little mIoU on rare classes, as on CamVid). ~80 s on a quiet core.

    Measured with exactly this procedure, seeds 0-13 (mIoU / VC8, stage 1 -> stage 3):
        seed 0: 0.494/0.845 -> 0.451/0.895    seed 7:  0.417/0.746 -> 0.417/0.872
        seed 1: 0.645/0.794 -> 0.656/0.878    seed 8:  0.521/0.847 -> 0.485/0.891
        seed 2: 0.509/0.860 -> 0.496/0.908    seed 9:  0.449/0.858 -> 0.411/0.871
        seed 3: 0.555/0.893 -> 0.551/0.895    seed 10: 0.494/0.837 -> 0.479/0.887
        seed 4: 0.457/0.765 -> 0.400/0.889    seed 11: 0.494/0.853 -> 0.461/0.861
        seed 5: 0.419/0.812 -> 0.406/0.848    seed 12: 0.496/0.900 -> 0.543/0.897
        seed 6: 0.524/0.849 -> 0.549/0.793    seed 13: 0.567/0.660 -> 0.661/0.887
    12 of 14 pass (VC8 +0.05 on average; the test runs seed 0). The two failures: seed 12's
    stage 1 hardly flickered on these videos, and in seed 6 stage 3 undid the tracker's gain
    (stage 2 alone: 0.893). Looked into on an earlier variant (noise 30, stage 3 for 300 steps
    on 10-frame clips) where seed 6 failed the same way: the tracker has a "meadow" slot at
    probability 0.99 in every video, whose mask covers the region, and the refiner shrank the
    masks of the weaker grass slots; the max rule keeps the tracker's 0.99, so meadow wins in
    parts of grass videos. Stage 2 flickers less than stage 1 in 11 of 14 seeds. How the setup
    was chosen (noise 30, 3 held-out videos): stage 3 for 300 steps on 10-frame clips failed on
    3 of seeds 0-12 (6, 7, 8); for 600 steps on whole 16-frame videos on 2 of seeds 0-13 (12,
    13: the ones whose stage 1 hardly flickered).

    Earlier versions of this test, on grey-level frames without the noisy cue, found no robust
    difference (VC8 +0.004 on average over 6 seeds): at 64x96 most of stage 1's flicker is
    boundary jitter of the per-frame mask features (88 % of its inconsistent pixels lie within
    3 px of a GT edge), which stage 3 shares, its masks being dot products with the same mask
    features. Other choices in ``train_three_stages``: 10 queries instead of 50 (with 50, ~44
    unmatched slots of an under-trained refiner each add ~0.1 class probability times a ~0.3
    sigmoid mask: more score than the matched slots), tracker clips of 10 frames (trained on 5,
    its unmatched slots turn into "grass" after frame 5-10), guided matching for all of stage 3.
    """
    stage1, stage2, stage3, held_out, seconds = train_three_stages(FLICKER_SEED)
    for name, param in stage1.segmenter.state_dict().items():
        assert torch.equal(param, stage3.segmenter.state_dict()[name]), f"segmenter {name} changed in stages 2/3"
    for i, (_, labels) in enumerate(held_out):
        assert object_travel(labels) > 5, f"held-out video {i} has no moving object"
    assert sum(bool((labels == MEADOW).any()) for _, labels in held_out) == HELD_OUT_VIDEOS // 2

    miou1, vc1 = video_figures(stage1, held_out, CUE_CLASSES)
    miou2, vc2 = video_figures(stage2, held_out, CUE_CLASSES)
    miou3, vc3 = video_figures(stage3, held_out, CUE_CLASSES)
    summary = (
        f"stage 1 mIoU {miou1:.3f} VC8 {vc1:.3f}; stage 2 mIoU {miou2:.3f} VC8 {vc2:.3f}; "
        f"stage 3 mIoU {miou3:.3f} VC8 {vc3:.3f} (training {seconds:.0f} s)"
    )
    print(summary)
    assert miou1 > 0.4, f"the segmenter is too weak for the comparison to mean anything: {summary}"
    assert vc3 > vc1, f"stage 3 flickers as much as stage 1 or more: {summary}"
    assert miou3 >= miou1 - 0.1, f"stage 3 loses more than 0.1 mIoU: {summary}"
