"""Segmenter speed and memory on CPU: one training step (forward + set loss + backward + AdamW) on a
2-frame clip at 240x320, and inference per 360x480 frame, for the presets.

    python benchmarks/bench_model.py [--presets tiny,tiny@12544,r50] [--threads 2] [--repeats 5]

`tiny@12544` is the target comparison config (ResNet-18, 50 queries, hidden 128, 6 decoder / 3
encoder layers, 12544 points): the HF transformers Mask2Former takes 0.74-0.82 s per step on this
machine kind. Each preset runs in its own process so peak RSS is per preset.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def make_targets(num_images: int, height: int, width: int, num_classes: int, gen: "torch.Generator"):
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


def run_one(preset: str, threads: int, repeats: int) -> dict:
    import torch

    from vss.config import get_preset
    from vss.criterion import SetCriterion
    from vss.matcher import HungarianMatcher
    from vss.segmenter import build_segmenter, semantic_inference

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    name, _, points = preset.partition("@")
    cfg = get_preset(name)
    if points:
        cfg.loss.num_points = int(points)
    model = build_segmenter(cfg)
    criterion = SetCriterion(cfg.model.num_classes, HungarianMatcher.from_config(cfg.loss), cfg.loss)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    gen = torch.Generator().manual_seed(0)
    images = torch.randn(2, 3, 240, 320, generator=gen)  # a 2-frame clip = 2 images
    targets = make_targets(2, 240, 320, cfg.model.num_classes, gen)

    def step() -> None:
        losses = criterion(model(images), targets)
        opt.zero_grad(set_to_none=True)
        sum(losses.values()).backward()
        opt.step()

    model.train()
    step()  # warm-up (allocator, first-call overheads)
    train_times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        step()
        train_times.append(time.perf_counter() - t0)

    model.eval()
    frame = torch.randn(1, 3, 360, 480, generator=gen)
    infer_times = []
    with torch.inference_mode():
        for i in range(repeats + 1):
            t0 = time.perf_counter()
            out = model(frame)
            semantic_inference(out["pred_logits"], out["pred_masks"]).argmax(1)
            if i:
                infer_times.append(time.perf_counter() - t0)
    return {
        "preset": preset,
        "params_M": sum(p.numel() for p in model.parameters()) / 1e6,
        "train_step_s": statistics.median(train_times),
        "infer_frame_s": statistics.median(infer_times),
        "peak_rss_MB": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "threads": threads,
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--presets", default="tiny,tiny@12544,r50", help="comma list; NAME@P sets num_points")
    p.add_argument("--threads", type=int, default=2, help="torch threads (default 2)")
    p.add_argument("--repeats", type=int, default=5, help="timed repeats after one warm-up (median)")
    p.add_argument("--child", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        print(json.dumps(run_one(args.child, args.threads, args.repeats)))
        return
    print(f"{'preset':<14}{'params (M)':>11}{'train step (s)':>16}{'infer/frame (s)':>17}{'peak RSS (MB)':>15}")
    for preset in args.presets.split(","):
        cmd = [sys.executable, __file__, "--child", preset, "--threads", str(args.threads),
               "--repeats", str(args.repeats)]
        r = json.loads(subprocess.run(cmd, check=True, capture_output=True, text=True).stdout.splitlines()[-1])
        print(f"{r['preset']:<14}{r['params_M']:>11.2f}{r['train_step_s']:>16.3f}{r['infer_frame_s']:>17.3f}"
              f"{r['peak_rss_MB']:>15.0f}", flush=True)


if __name__ == "__main__":
    main()
