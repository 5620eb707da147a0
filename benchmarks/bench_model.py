"""Segmenter speed and memory on CPU: one training step (forward + set loss + backward + AdamW) on a
2-frame clip at 240x320, and inference per 360x480 frame.

    python benchmarks/bench_model.py [--presets tiny,tiny@12544,r50] [--threads 2] [--repeats 5] [--amp bf16]
    python benchmarks/bench_model.py --compare-hf [--repeats 7] [--threads 2] [--compile vss|both]

Preset table: each preset runs in its own process (so peak RSS is per preset); ``NAME@P`` sets
the number of points P of the matcher and the mask losses. ``--amp bf16`` runs the forward passes
and losses under bfloat16 autocast (``train.py --amp bf16``); ``--amp off,bf16`` alternates fp32
and bf16 processes per preset, ``--repeats`` rounds each, and prints both medians and the ratio.

``--compare-hf`` times vss against the HF transformers ``Mask2FormerForUniversalSegmentation`` of
the same shape, in ONE process, interleaved (vss, HF, HF, vss, ...: a burst of load from other
jobs hits both alike), median of ``--repeats`` rounds, and prints the versions, threads, machine
load and the ratios. Peak RSS of each comes from its own fresh subprocess (warm-up, 3 training
steps, 3 inferences). The HF model needs the benchmark-only dependency ``transformers`` (not in
requirements.txt)::

    pip install "transformers==5.25.0"     # pure Python; it does not replace the installed torch

The shape is ``tiny@12544``: a ResNet-18 (HF ``ResNetConfig(layer_type="basic")``, trainable
BatchNorm in both), pixel decoder of width 128 with 3 deformable encoder layers (4 heads, 4
points, FFN 512), 6 masked-attention decoder layers (HF ``decoder_layers=7`` counts the
prediction from the learnable queries; 4 heads, FFN 512), hidden 128, 50 queries, K = 124
classes, 12544 points (oversample 3, importance 0.75), weights 2/5/5, no-object 0.1, deep
supervision on all 7 predictions. Random init, nothing downloaded. Same batch (2 images, the
same targets), same losses, same points, same AdamW (lr 1e-4, ``foreach=True`` as
``vss.engine.build_optimizer`` builds it; the HF Trainer would use ``fused=True``, ~25 ms less
per step on both sides, not bit-identical to the others).
Inference: forward + Mask2Former semantic inference (the same function on both outputs) + argmax,
no upsampling. What differs (a few per mille of the work): vss also runs the DVIS++ reid MLP
(3 x 128x128 linears on 50 queries) and returns the query embeddings the tracker needs.
``--compile vss`` runs vss's model through ``torch.compile`` (inductor, static shapes),
``--compile both`` the HF model too; the compilation happens in the warm-up, whose time is printed.
Peak RSS is always measured without it.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
from pathlib import Path
import platform
import resource
import statistics
import subprocess
import sys
import time

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

HF_PIN = "transformers==5.25.0"
CLIP = (2, 240, 320)  # images per training step (a 2-frame clip), H, W
FRAME = (360, 480)  # inference frame


def make_targets(num_images: int, height: int, width: int, num_classes: int, gen):
    """Blocky random label maps -> per-image targets (one mask per class present)."""
    import torch
    import torch.nn.functional as F

    coarse = torch.randint(0, min(num_classes, 8), (num_images, 1, height // 40, width // 40), generator=gen)
    labels = F.interpolate(coarse.float(), size=(height, width), mode="nearest").long()[:, 0]  # (N,H,W)
    targets = []
    for lab in labels:
        ids = lab.unique()
        targets.append({"labels": ids, "masks": lab[None] == ids[:, None, None]})
    return targets


# ------------------------------------------------------------------------------------------
# the two models: build, one training step, one inference
# ------------------------------------------------------------------------------------------


def preset_config(preset: str):
    """The config of a preset name, ``NAME@P`` setting num_points."""
    from vss.config import get_preset

    name, _, points = preset.partition("@")
    cfg = get_preset(name)
    if points:
        cfg.loss.num_points = int(points)
    return cfg


def build_vss(preset: str):
    """(model, criterion, optimizer, config) of a preset name (see ``preset_config``)."""
    import torch

    from vss.criterion import SetCriterion
    from vss.matcher import HungarianMatcher
    from vss.segmenter import build_segmenter

    cfg = preset_config(preset)
    model = build_segmenter(cfg)
    criterion = SetCriterion(cfg.model.num_classes, HungarianMatcher.from_config(cfg.loss), cfg.loss)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, foreach=True)
    return model, criterion, opt, cfg


def build_hf(cfg):
    """HF Mask2FormerForUniversalSegmentation of the same shape as the vss config ``cfg`` (random
    init) and its AdamW."""
    import torch
    from transformers import Mask2FormerConfig, Mask2FormerForUniversalSegmentation, ResNetConfig
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()  # "resnet is not a supported backbone": it works, we checked
    m, loss = cfg.model, cfg.loss
    if m.backbone != "resnet18" or m.enc_heads != m.nheads:
        raise ValueError("the HF comparison is built for the tiny preset (ResNet-18, one head count)")
    backbone = ResNetConfig(
        layer_type="basic",
        depths=[2, 2, 2, 2],
        hidden_sizes=[64, 128, 256, 512],
        embedding_size=64,
        out_features=["stage1", "stage2", "stage3", "stage4"],
    )
    hf_cfg = Mask2FormerConfig(
        backbone_config=backbone,
        feature_size=m.conv_dim,
        mask_feature_size=m.mask_dim,
        hidden_dim=m.hidden_dim,
        encoder_feedforward_dim=m.enc_ffn_dim,
        encoder_layers=m.enc_layers,
        decoder_layers=m.dec_layers + 1,
        num_attention_heads=m.nheads,
        dim_feedforward=m.dim_feedforward,
        num_queries=m.num_queries,
        num_labels=m.num_classes,
        train_num_points=loss.num_points,
        oversample_ratio=loss.oversample_ratio,
        importance_sample_ratio=loss.importance_sample_ratio,
        class_weight=loss.class_weight,
        mask_weight=loss.mask_weight,
        dice_weight=loss.dice_weight,
        no_object_weight=loss.no_object_weight,
        use_auxiliary_loss=True,
    )
    model = Mask2FormerForUniversalSegmentation(hf_cfg)
    return model, torch.optim.AdamW(model.parameters(), lr=1e-4, foreach=True)


def vss_train_step(model, criterion, opt, images, targets, autocast=contextlib.nullcontext) -> None:
    with autocast():
        losses = criterion(model(images), targets)
    opt.zero_grad(set_to_none=True)
    sum(losses.values()).backward()
    opt.step()


def hf_train_step(model, opt, images, targets) -> None:
    out = model(
        pixel_values=images,
        mask_labels=[t["masks"].float() for t in targets],
        class_labels=[t["labels"] for t in targets],
    )
    opt.zero_grad(set_to_none=True)
    out.loss.backward()
    opt.step()


def vss_infer(model, frame, autocast=contextlib.nullcontext):
    from vss.segmenter import semantic_inference

    with autocast():
        out = model(frame)
    return semantic_inference(out["pred_logits"], out["pred_masks"]).argmax(1)  # (1,h,w)


def hf_infer(model, frame):
    from vss.segmenter import semantic_inference

    out = model(pixel_values=frame)
    return semantic_inference(out.class_queries_logits, out.masks_queries_logits).argmax(1)  # (1,h,w)


def make_inputs(num_classes: int):
    import torch

    gen = torch.Generator().manual_seed(0)
    n, h, w = CLIP
    images = torch.randn(n, 3, h, w, generator=gen)  # a 2-frame clip = 2 images
    targets = make_targets(n, h, w, num_classes, gen)
    frame = torch.randn(1, 3, *FRAME, generator=gen)
    return images, targets, frame


def _timed(fn, *args) -> float:
    t0 = time.perf_counter()
    fn(*args)
    return time.perf_counter() - t0


def _timed_both(fn) -> tuple[float, float]:
    """(wall seconds, CPU seconds of this process) of one call."""
    w0, c0 = time.perf_counter(), time.process_time()
    fn()
    return time.perf_counter() - w0, time.process_time() - c0


# ------------------------------------------------------------------------------------------
# preset table (one process per preset)
# ------------------------------------------------------------------------------------------


def run_one(preset: str, threads: int, repeats: int, amp: str = "off") -> dict:
    import torch

    from vss.engine import make_autocast

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    autocast = make_autocast("cpu", amp)[0]
    model, criterion, opt, cfg = build_vss(preset)
    images, targets, frame = make_inputs(cfg.model.num_classes)
    model.train()
    step = (model, criterion, opt, images, targets, autocast)
    vss_train_step(*step)  # warm-up (allocator, first-call overheads)
    train_times = [_timed(vss_train_step, *step) for _ in range(repeats)]
    model.eval()
    with torch.inference_mode():
        vss_infer(model, frame, autocast)
        infer_times = [_timed(vss_infer, model, frame, autocast) for _ in range(repeats)]
    return {
        "preset": preset,
        "amp": amp,
        "params_M": sum(p.numel() for p in model.parameters()) / 1e6,
        "train_step_s": statistics.median(train_times),
        "infer_frame_s": statistics.median(infer_times),
        "peak_rss_MB": peak_rss_mb(),
        "threads": threads,
    }


def preset_child(preset: str, args, amp: str) -> dict:
    """``run_one`` in a fresh process (so that peak RSS is this run's alone)."""
    cmd = [sys.executable, __file__, "--child", preset, "--threads", str(args.threads), "--repeats", str(args.repeats)]
    out = subprocess.run([*cmd, "--amp", amp], check=True, capture_output=True, text=True).stdout
    return json.loads(out.splitlines()[-1])


def preset_table(args) -> None:
    modes = args.amp.split(",")
    print(
        f"{'preset':<14}{'amp':>5}{'params (M)':>11}{'train step (s)':>16}{'infer/frame (s)':>17}{'peak RSS (MB)':>15}"
    )
    for preset in args.presets.split(","):
        runs = {mode: [] for mode in modes}
        for _ in range(args.rounds):
            for mode in modes:  # alternated, so that a burst of load from other jobs hits every mode alike
                r = preset_child(preset, args, mode)
                runs[mode].append(r)
                print(
                    f"{r['preset']:<14}{mode:>5}{r['params_M']:>11.2f}{r['train_step_s']:>16.3f}"
                    f"{r['infer_frame_s']:>17.3f}{r['peak_rss_MB']:>15.0f}",
                    flush=True,
                )
        ref = modes[0]
        for mode in modes[1:]:
            ratio = {
                key: statistics.median(r[key] for r in runs[mode]) / statistics.median(r[key] for r in runs[ref])
                for key in ("train_step_s", "infer_frame_s")
            }
            print(
                f"{preset}: {mode} / {ref} (medians of {args.rounds} rounds): train step "
                f"{ratio['train_step_s']:.2f}x, inference {ratio['infer_frame_s']:.2f}x"
            )


# ------------------------------------------------------------------------------------------
# side by side with HF transformers
# ------------------------------------------------------------------------------------------


def _status_mb(field: str) -> float:
    """A memory field of /proc/self/status in MB (Linux)."""
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field + ":")) / 1024


def peak_rss_mb() -> float:
    """Peak RSS of this process. VmHWM belongs to the process's own address space; ru_maxrss would
    also count the parent's RSS at fork time, which survives the exec of a subprocess."""
    try:
        return _status_mb("VmHWM")
    except OSError:  # no /proc: ru_maxrss (kB on Linux, bytes on macOS; only Linux is measured here)
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def rss_child(which: str, preset: str, threads: int) -> dict:
    """Peak RSS of a fresh process that builds one model and runs 1 + 3 training steps and 1 + 3
    inferences. ``base_MB``: RSS after the imports, before the model is built."""
    import torch

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    import vss.criterion  # noqa: F401  (everything both builds import is in the baseline: scipy too)
    import vss.segmenter  # noqa: F401

    if which == "hf":
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        import transformers.models.mask2former.modeling_mask2former  # noqa: F401
    base = _status_mb("VmRSS")
    if which == "hf":
        cfg = preset_config(preset)
        model, opt = build_hf(cfg)
    else:
        model, criterion, opt, cfg = build_vss(preset)
    images, targets, frame = make_inputs(cfg.model.num_classes)
    model.train()
    for _ in range(4):
        if which == "hf":
            hf_train_step(model, opt, images, targets)
        else:
            vss_train_step(model, criterion, opt, images, targets)
    model.eval()
    with torch.inference_mode():
        for _ in range(4):
            (hf_infer if which == "hf" else vss_infer)(model, frame)
    return {"peak_MB": peak_rss_mb(), "base_MB": base}


def _machine() -> str:
    load = " ".join(f"{x:.2f}" for x in os.getloadavg())
    cpu = (
        next(
            (
                line.split(":", 1)[1].strip()
                for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")
            ),
            platform.processor(),
        )
        if Path("/proc/cpuinfo").exists()
        else ""
    )
    return f"{cpu}, {os.cpu_count()} logical CPUs, load average {load}"


def compare_hf(args) -> None:
    import numpy as np
    import torch

    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # the models are built from configs: nothing to download
    try:
        import transformers
    except ImportError:
        sys.exit(f'--compare-hf needs transformers: pip install "{HF_PIN}"')
    torch.set_num_threads(args.threads)
    print(
        f"python {platform.python_version()}, torch {torch.__version__}, transformers {transformers.__version__}, "
        f"numpy {np.__version__}; torch threads {torch.get_num_threads()}"
    )
    print(f"machine: {_machine()}")
    torch.manual_seed(0)
    vss_model, criterion, vss_opt, cfg = build_vss(args.preset)
    hf_model, hf_opt = build_hf(cfg)
    compiled = {"off": (), "vss": (vss_model,), "both": (vss_model, hf_model)}[args.compile]
    for m in compiled:
        m.compile(dynamic=False)  # in place; static shapes: training and inference sizes differ
    images, targets, frame = make_inputs(cfg.model.num_classes)
    n_vss = sum(p.numel() for p in vss_model.parameters()) / 1e6
    n_hf = sum(p.numel() for p in hf_model.parameters()) / 1e6
    print(
        f"shape {args.preset}: vss {n_vss:.2f} M parameters, HF {n_hf:.2f} M; batch {CLIP[0]} x {CLIP[1]}x{CLIP[2]}, "
        f"{sum(len(t['labels']) for t in targets)} targets, {cfg.loss.num_points} points; inference "
        f"{FRAME[0]}x{FRAME[1]}"
    )

    jobs = {
        "train": {
            "vss": lambda: vss_train_step(vss_model, criterion, vss_opt, images, targets),
            "hf": lambda: hf_train_step(hf_model, hf_opt, images, targets),
        },
        "infer": {"vss": lambda: vss_infer(vss_model, frame), "hf": lambda: hf_infer(hf_model, frame)},
    }
    wall = {(kind, who): [] for kind in jobs for who in ("vss", "hf")}
    cpu = {key: [] for key in wall}
    for kind, pair in jobs.items():
        for m in (vss_model, hf_model):
            m.train(kind == "train")
        with torch.inference_mode(kind == "infer"):
            for who, fn in pair.items():  # warm-up (and compilation)
                seconds = _timed(fn)
                if compiled:
                    print(f"{kind} warm-up {who}: {seconds:.1f} s")
            for r in range(args.repeats):
                order = ("vss", "hf") if r % 2 == 0 else ("hf", "vss")
                for who in order:
                    w, c = _timed_both(pair[who])
                    wall[(kind, who)].append(w)
                    cpu[(kind, who)].append(c)
    print(
        f"\nmedian of {args.repeats} interleaved rounds after a warm-up (seconds); load average now "
        f"{os.getloadavg()[0]:.2f}; torch.compile: {args.compile}"
    )
    print(f"{'':<26}{'vss':>8}{'HF':>8}{'vss/HF':>8}   per-round vss/HF   CPU s: vss    HF  vss/HF")
    for kind, label in (("train", "training step (2 images)"), ("infer", "inference per frame")):
        v, h = wall[(kind, "vss")], wall[(kind, "hf")]
        rounds = [a / b for a, b in zip(v, h)]
        cv, ch = statistics.median(cpu[(kind, "vss")]), statistics.median(cpu[(kind, "hf")])
        print(
            f"{label:<26}{statistics.median(v):8.3f}{statistics.median(h):8.3f}"
            f"{statistics.median(v) / statistics.median(h):8.2f}   {min(rounds):6.2f}-{max(rounds):<9.2f}"
            f"{cv:11.3f}{ch:6.3f}{cv / ch:8.2f}"
        )
    print(
        "(CPU s: process CPU time, all threads; with --threads 1 it does not count the time spent waiting for "
        "a core, so it is the steadier figure on a shared machine)"
    )

    rss = {}
    for who in ("vss", "hf"):
        cmd = [sys.executable, __file__, "--rss-child", who, "--preset", args.preset, "--threads", str(args.threads)]
        rss[who] = json.loads(subprocess.run(cmd, check=True, capture_output=True, text=True).stdout.splitlines()[-1])
    v, h = rss["vss"], rss["hf"]
    print(
        f"{'peak RSS (MB)':<26}{v['peak_MB']:8.0f}{h['peak_MB']:8.0f}{v['peak_MB'] / h['peak_MB']:8.2f}"
        f"   above the after-import RSS: {v['peak_MB'] - v['base_MB']:.0f} vs {h['peak_MB'] - h['base_MB']:.0f}"
        f" ({(v['peak_MB'] - v['base_MB']) / (h['peak_MB'] - h['base_MB']):.2f})"
    )


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--presets", default="tiny,tiny@12544,r50", help="comma list; NAME@P sets num_points")
    p.add_argument("--threads", type=int, default=2, help="torch threads (default 2)")
    p.add_argument("--repeats", type=int, default=5, help="timed repeats after one warm-up (median)")
    p.add_argument(
        "--amp",
        default="off",
        help="preset table: autocast mode(s), comma list of off/bf16 alternated per preset (default off)",
    )
    p.add_argument("--rounds", type=int, default=1, help="preset table: alternated rounds of the --amp modes")
    p.add_argument(
        "--compare-hf",
        action="store_true",
        help=f"time vss against HF transformers' Mask2Former side by side (needs {HF_PIN})",
    )
    p.add_argument("--preset", default="tiny@12544", help="shape of the --compare-hf run (a tiny preset)")
    p.add_argument(
        "--compile",
        choices=("off", "vss", "both"),
        default="off",
        help="--compare-hf: torch.compile vss's model, or both models (default off)",
    )
    p.add_argument("--child", help=argparse.SUPPRESS)
    p.add_argument("--rss-child", choices=("vss", "hf"), help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        print(json.dumps(run_one(args.child, args.threads, args.repeats, args.amp)))
    elif args.rss_child:
        print(json.dumps(rss_child(args.rss_child, args.preset, args.threads)))
    elif args.compare_hf:
        compare_hf(args)
    else:
        preset_table(args)


if __name__ == "__main__":
    main()
