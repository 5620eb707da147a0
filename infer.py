"""Predict videos with trained vss checkpoints: plain inference, test-time augmentation, model
ensembles (pseudo labels), per-video model aggregation and VLM correction of ambiguous classes.

    python infer.py                     # runs/default/last.pt on the embedded synthetic val split
    python infer.py --checkpoint runs/r50/best.pt --data VSPW_480p --split val --out pred --tta
    python infer.py --video clip.mp4 frames_dir/ --overlay
    python infer.py --ensemble teacher.pt student.pt --tta --save-probs \
        --data VSPW --split unlabelled --out pseudo
    python infer.py --aggregate mvc.pt plain.pt --tta --data VSPW --split val --out pred_agg
    python infer.py --aggregate-preds pred_mvc pred_plain --data VSPW --split val --out pred_agg

Papers: TTA merged by per-pixel vote (MVC paper sec. 2.4, eq. 8) or by the mean of the class
probabilities (the U2PL paper's pseudo labels), ``vss/tta.py``; pseudo labels = argmax and
per-pixel entropy of the distribution averaged over models x views (semi-supervised paper sec.
2.4, ``vss/semi.py``); per-video choice of the model with the highest mean flow-SSIM (MVC sec.
2.3, ``vss/aggregate.py``); VLM relabelling of ambiguous classes (MVC sec. 2.5, ``vss/vlm.py``).

Every model gets the frames resized so that the short side is its config's ``test_size`` (or
``--test-size``; 0 = original size) and normalised with its config; labels come back at the
original frame size. Outputs (OUT = ``--out``, default ``runs/default/pred``):
    OUT/<video>/<frame>.png           palette PNG, pixel index = class id 0..K-1; <frame> is the
                                      frame stem, which is the GT mask's name in VSPW layout
    OUT/<video>/<frame>.entropy.npy   --save-probs: (H,W) float16 entropy (nats, 0..log K) of
                                      the averaged, normalised class distribution
    OUT/<video>/overlay/<frame>.jpg   --overlay: the frame blended with the class colours
    OUT/<video>.overlay.mp4           --overlay, for --video FILE inputs
    OUT/report.json                   per video: frames, seconds, fps, views, members, choice, VLM
    OUT/run.json                      the fingerprint of the run (see below)
Existing output folder: a run records in OUT/run.json a fingerprint of everything that changes
the labels (checkpoint paths, sizes and mtimes; TTA, ensemble, aggregation and VLM settings;
test size; amp). Same fingerprint: videos whose every output file exists are skipped, so a rerun
completes an interrupted run. Different fingerprint: refused (exit 2) unless --overwrite, which
deletes OUT first (only a folder holding a run.json and none of the inputs).
Bad input (missing checkpoint, class-count mismatch, unreadable video, ...) prints one line
naming the file and exits with code 2.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
from pathlib import Path
import shutil
import sys
import time
from typing import Callable, NamedTuple, Sequence

import cv2
import numpy as np
import torch
from tqdm import tqdm

from vss.aggregate import aggregate_prediction_dirs, choose_per_video
from vss.checkpoint import checkpoint_config, load_checkpoint
from vss.config import Config
from vss.data import normalize
from vss.engine import AMP_DTYPES, resize_short_side
from vss.io import (
    atomic_path,
    DEFAULT_FPS,
    default_palette,
    IMAGE_EXTS,
    iter_eval_videos,
    load_class_names,
    read_frame,
    read_video,
    write_json_atomic,
    write_label_png,
    write_video,
)
from vss.semi import ensemble_pseudo_labels
from vss.tta import run_tta, tta_views
from vss.video_model import build_video_model, predict_video

REPO = Path(__file__).resolve().parent
DEFAULT_CHECKPOINT = REPO / "runs" / "default" / "last.pt"
DEFAULT_OUT = REPO / "runs" / "default" / "pred"
OVERLAY_ALPHA = 0.5  # weight of the class colour in overlays


class Member(NamedTuple):
    """One loaded checkpoint: a model of the ensemble or a candidate of the aggregation."""

    path: Path
    model: torch.nn.Module
    cfg: Config
    stage: str
    test_size: int  # short side given to the model (0 = original size)
    class_names: list[str] | None  # the training data's classes (saved by train.py), if known
    palette: np.ndarray | None


class VideoInput(NamedTuple):
    """A video to predict: a dataset video or frame folder (frame_paths known) or a video file."""

    name: str
    source: Path
    frame_paths: list[Path] | None  # None for a video file (frames come from decoding it)


class Options(NamedTuple):
    """How each model predicts a video; ``tta`` None means a single view."""

    tta: dict | None  # {"scales": [...], "flip": bool, "merge": "vote"|"mean"}
    amp_dtype: torch.dtype | None  # autocast dtype of the networks (None: fp32)
    device: torch.device


# --------------------------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------------------------


TTA_SCALE_RANGE = (0.25, 4.0)  # a view's short side relative to the test size; beyond, a view is a few pixels or GBs


# Named view sets: the MVC paper's scales (sec. 2.4) and the PVUW 2024 1st place's (U2PL-style
# pseudo labels: 512/896 .. 1408/896, a short side of 896 at test time).
TTA_SCALE_SETS = {"mvc": (0.9, 1.0, 1.1, 1.2), "u2pl": tuple(s / 896 for s in range(512, 1409, 128))}


def _scales(text: str) -> tuple[float, ...]:
    if text in TTA_SCALE_SETS:
        return TTA_SCALE_SETS[text]
    try:
        scales = tuple(float(s) for s in text.split(",") if s.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"scales must be comma-separated numbers, got {text!r}") from None
    if not scales or any(not TTA_SCALE_RANGE[0] <= s <= TTA_SCALE_RANGE[1] for s in scales):  # NaN fails too
        raise argparse.ArgumentTypeError(
            f"scales must be in {TTA_SCALE_RANGE[0]}..{TTA_SCALE_RANGE[1]} (x the test "
            f"size) and not empty, got {text!r}"
        )
    return scales


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        epilog="\n\n".join(__doc__.split("\n\n")[1:]),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    g = p.add_argument_group("model")
    g.add_argument(
        "--checkpoint",
        type=Path,
        default=None,
        help="checkpoint to predict with (default without --ensemble/--aggregate: "
        "runs/default/last.pt beside infer.py); with --ensemble/--aggregate it is "
        "one more member",
    )
    g.add_argument(
        "--ensemble",
        type=Path,
        nargs="+",
        default=[],
        metavar="CKPT",
        help="average the class probabilities of these checkpoints (any preset/stage; "
        "with --tta over models x views, mean merge)",
    )
    g.add_argument(
        "--aggregate",
        type=Path,
        nargs="+",
        default=[],
        metavar="CKPT",
        help="candidates: per video keep the one whose labels have the highest mean "
        "flow-SSIM (MVC sec. 2.3); each runs with the same TTA settings",
    )
    g.add_argument(
        "--device",
        default="cuda" if torch.cuda.is_available() else "cpu",
        help="cpu or cuda (default: cuda when available)",
    )
    g.add_argument(
        "--amp",
        choices=("bf16", "fp16", "off"),
        default="off",
        help="autocast dtype of the forward passes (default off: fp32)",
    )
    g.add_argument(
        "--test-size",
        type=int,
        default=None,
        metavar="N",
        help="short side of the frames given to the models (0 = original size; "
        "default: each checkpoint's config data.test_size)",
    )
    g = p.add_argument_group("input (default: the embedded synthetic dataset, split val)")
    g.add_argument(
        "--data",
        type=Path,
        default=None,
        metavar="ROOT",
        help="VSPW-layout dataset root (ROOT/<split>.txt, ROOT/data/<video>/origin)",
    )
    g.add_argument("--split", default="val", help="split name, ROOT/<split>.txt (default: val)")
    g.add_argument(
        "--video",
        type=Path,
        nargs="+",
        default=[],
        metavar="FILE_OR_DIR",
        help="video files (mp4, avi, ...) or frame folders instead of a dataset; "
        "outputs go to OUT/<file or folder stem>/",
    )
    g = p.add_argument_group("output")
    g.add_argument(
        "--out",
        type=Path,
        default=None,
        help="output folder (default: runs/default/pred beside infer.py); see the rule for an existing folder below",
    )
    g.add_argument(
        "--overwrite", action="store_true", help="delete OUT first when it holds the predictions of another run"
    )
    g.add_argument(
        "--overlay",
        action="store_true",
        help="also write colour overlays OUT/<video>/overlay/<frame>.jpg (and OUT/<video>.overlay.mp4 for video files)",
    )
    g.add_argument(
        "--save-probs",
        action="store_true",
        help="also write OUT/<video>/<frame>.entropy.npy: (H,W) float16 per-pixel "
        "entropy (nats) of the averaged class distribution (pseudo labels)",
    )
    g.add_argument("--no-progress", action="store_true", help="no progress bar")
    g = p.add_argument_group("test-time augmentation")
    g.add_argument("--tta", action="store_true", help="multi-scale + flip views of every video")
    g.add_argument(
        "--tta-scales",
        type=_scales,
        default=TTA_SCALE_SETS["mvc"],
        metavar="S,S,...",
        help="view scales relative to the test size, or a named set: mvc = 0.9,1.0,1.1,1.2 (the "
        "default, MVC paper), u2pl = 512/896..1408/896 in steps of 128/896 (PVUW 1st place)",
    )
    g.add_argument(
        "--tta-flip",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="add the horizontally flipped view of every scale (default: on)",
    )
    g.add_argument(
        "--tta-merge",
        choices=("vote", "mean"),
        default=None,
        help="vote: per-pixel mode, ties to the highest resolution (MVC); mean: average "
        "probabilities (U2PL). Default vote; mean with --ensemble/--save-probs",
    )
    g = p.add_argument_group("aggregation of prediction folders (no model)")
    g.add_argument(
        "--aggregate-preds",
        type=Path,
        nargs="+",
        default=[],
        metavar="DIR",
        help="per video, copy the predictions of the folder with the highest mean "
        "flow-SSIM into --out (needs --out; frames from --data/--split)",
    )
    g = p.add_argument_group("VLM post-processing (MVC sec. 2.5; nothing is sent without --vlm)")
    g.add_argument(
        "--vlm",
        action="store_true",
        help="relabel ambiguous-class regions with a multimodal LLM (OpenAI-compatible "
        "API; key from OPENAI_API_KEY, never printed); failures keep the labels",
    )
    g.add_argument("--vlm-model", default="gpt-4o", help="chat model name (default: gpt-4o)")
    g.add_argument(
        "--vlm-base-url", default=None, help="server URL, e.g. http://localhost:8000/v1 for vLLM (default: OpenAI)"
    )
    g.add_argument(
        "--vlm-groups",
        type=Path,
        default=None,
        help="groups file (default: the shipped VSPW groups, vss/vlm_groups.json)",
    )
    g.add_argument("--vlm-cache", type=Path, default=None, help="folder of cached answers (default: OUT/vlm_cache)")
    return p


def check_args(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Reject flag combinations that have no meaning (argparse error, exit 2)."""
    if args.aggregate_preds:
        used = [
            f
            for f, v in (
                ("--checkpoint", args.checkpoint),
                ("--ensemble", args.ensemble),
                ("--aggregate", args.aggregate),
                ("--video", args.video),
                ("--tta", args.tta),
                ("--vlm", args.vlm),
                ("--save-probs", args.save_probs),
                ("--overlay", args.overlay),
            )
            if v
        ]
        if used:
            parser.error(f"--aggregate-preds combines prediction folders without a model; drop {', '.join(used)}")
        if args.out is None:
            parser.error("--aggregate-preds needs --out")
        return
    if args.video and args.data is not None:
        parser.error("give either --data/--split or --video, not both")
    if args.ensemble and args.aggregate:
        parser.error("--ensemble and --aggregate cannot be combined")
    members = ([args.checkpoint] if args.checkpoint else []) + args.ensemble + args.aggregate
    if len({m.resolve() for m in members}) != len(members) and not args.ensemble:
        parser.error("--aggregate lists a checkpoint twice")
    if args.aggregate and len(members) < 2:
        parser.error("--aggregate needs at least two candidates (with --checkpoint)")
    if args.aggregate and args.save_probs:
        parser.error("--save-probs is not available with --aggregate (save it per candidate)")
    if args.tta and args.tta_merge == "vote" and (args.ensemble or args.save_probs):
        parser.error("--ensemble/--save-probs average probabilities: use --tta-merge mean")
    if args.test_size is not None and args.test_size < 0:
        parser.error(f"--test-size must be >= 0, got {args.test_size}")
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        parser.error(f"--device {args.device}: no CUDA device is available (use --device cpu)")


# --------------------------------------------------------------------------------------------
# Models
# --------------------------------------------------------------------------------------------


def load_member(path: Path, device: torch.device, test_size: int | None) -> Member:
    """Build the model a checkpoint's config describes and load its weights (strict)."""
    ckpt = load_checkpoint(path)
    missing = [k for k in ("model", "config", "stage") if k not in ckpt]
    if missing:
        raise ValueError(f"checkpoint {path} has no {missing}: not written by train.py")
    try:
        cfg = checkpoint_config(ckpt)
    except (TypeError, ValueError) as e:
        raise ValueError(f"checkpoint {path}: unreadable config ({e})") from None
    try:
        model = build_video_model(cfg, ckpt["stage"])
    except ValueError as e:
        raise ValueError(f"checkpoint {path}: {e}") from None
    try:
        model.load_state_dict(ckpt["model"], strict=True)
    except RuntimeError as e:
        detail = str(e).split("\n")[0][:300]
        raise ValueError(f"checkpoint {path}: weights do not fit its {ckpt['stage']!r} model ({detail})") from None
    model.to(device).eval()
    size = cfg.data.test_size if test_size is None else test_size
    palette = ckpt.get("palette")
    palette = None if palette is None else np.asarray(palette, dtype=np.uint8)
    return Member(path, model, cfg, ckpt["stage"], size, ckpt.get("class_names"), palette)


def model_paths(args: argparse.Namespace) -> list[Path]:
    """The checkpoints to load, primary first; the default run's last.pt when none is given."""
    paths = ([args.checkpoint] if args.checkpoint else []) + args.ensemble + args.aggregate
    if paths:
        return paths
    if not DEFAULT_CHECKPOINT.is_file():
        raise FileNotFoundError(
            f"no checkpoint at {DEFAULT_CHECKPOINT}: run python train.py first (or pass --checkpoint PATH)"
        )
    return [DEFAULT_CHECKPOINT]


def class_list(members: Sequence[Member], data_root: Path | None) -> tuple[list[str], np.ndarray]:
    """Class names and palette of the data; every checkpoint must predict exactly these classes.

    Without a dataset (--video): the classes the first checkpoint was trained on (train.py saves
    them), else the 124 VSPW classes when K = 124, else "class_k".
    """
    k_by_path = {str(m.path): m.cfg.model.num_classes for m in members}
    if data_root is not None:
        names, palette = load_class_names(data_root)
        source = data_root / "classes.json"
        source = source if source.is_file() else f"{data_root} (no classes.json: the 124 VSPW classes)"
        for path, k in k_by_path.items():
            if k != len(names):
                raise ValueError(f"checkpoint {path} predicts {k} classes but the dataset has {len(names)} ({source})")
    else:
        if len(set(k_by_path.values())) != 1:
            raise ValueError(f"the checkpoints predict different numbers of classes: {k_by_path}")
        k = next(iter(k_by_path.values()))
        if members[0].class_names is not None and len(members[0].class_names) == k:
            return list(members[0].class_names), (
                members[0].palette if members[0].palette is not None else default_palette(k)
            )
        names, palette = load_class_names(None)
        if len(names) != k:
            names, palette = [f"class_{i}" for i in range(k)], None
    return names, palette if palette is not None else default_palette(len(names))


def model_prediction(member: Member, images: np.ndarray, opts: Options, need_probs: bool) -> dict:
    """One model on one video, single view or TTA.

    Args:
        images: (T,H0,W0,3) uint8 RGB frames at the original size.
        need_probs: return the class probabilities (forces mean merge under TTA).
    Returns:
        dict(labels (T,H0,W0) int64, probs (T,K,H0,W0) float32 or None), on the CPU.
    """
    out_size = tuple(images.shape[1:3])
    num_classes = member.cfg.model.num_classes
    if opts.tta is None:
        frames = normalize(
            resize_short_side(images, member.test_size, member.cfg.data.max_size), member.cfg.data
        )  # (T,3,h,w)
        out = predict_video(
            member.model, frames.to(opts.device), out_size, return_probs=need_probs, autocast_dtype=opts.amp_dtype
        )
    else:
        # Every view is made from the original frames (short side = scale x the test size, as
        # multi-scale tests resize the original image) and predicted straight at the original
        # size, so one view at scale 1 without flip is exactly the plain prediction.
        # predict_video pads to its size divisibility itself, so views keep the scaled size.
        base = member.test_size or min(out_size)

        def view_frames(scale: float) -> torch.Tensor:  # (T,3,h,w) at scale x the test size
            size = max(1, round(base * scale))  # the long-side cap scales with the view
            return normalize(resize_short_side(images, size, member.cfg.data.max_size * scale), member.cfg.data).to(
                opts.device
            )

        def predict_fn(view: torch.Tensor) -> torch.Tensor:  # (T,3,h,w) -> (T,K,H0,W0)
            out = predict_video(member.model, view, out_size, return_probs=True, autocast_dtype=opts.amp_dtype)
            return out["probs"]

        merge = "mean" if need_probs else opts.tta["merge"]
        out = run_tta(
            predict_fn,
            view_frames,
            num_classes=num_classes,
            scales=opts.tta["scales"],
            flip=opts.tta["flip"],
            merge=merge,
            out_size=out_size,
        )
    probs = out["probs"].float().cpu() if need_probs else None
    return {"labels": out["labels"].cpu(), "probs": probs}


def ensemble_prediction(
    members: Sequence[Member], images: np.ndarray, opts: Options, need_entropy: bool
) -> tuple[np.ndarray, np.ndarray | None]:
    """Labels (and entropy) of the mean class distribution of the members (one member: its own),
    by ``vss.semi.ensemble_pseudo_labels`` over the members' predictions one at a time.

    Returns:
        labels (T,H0,W0) uint8, entropy (T,H0,W0) float16 (nats) or None.
    """
    if len(members) == 1 and not need_entropy:
        labels = model_prediction(members[0], images, opts, need_probs=False)["labels"]  # (T,H0,W0)
        return labels.numpy().astype(np.uint8), None
    probs = (model_prediction(m, images, opts, need_probs=True)["probs"] for m in members)  # (T,K,H0,W0) each
    labels, entropy = ensemble_pseudo_labels(probs)
    return labels.numpy().astype(np.uint8), entropy.numpy().astype(np.float16) if need_entropy else None


def aggregate_prediction(members: Sequence[Member], images: np.ndarray, opts: Options) -> tuple[np.ndarray, dict]:
    """Every candidate's labels; the most temporally consistent one per video (MVC sec. 2.3)."""
    candidates = {str(m.path): model_prediction(m, images, opts, need_probs=False)["labels"].numpy() for m in members}
    choice, scores = choose_per_video(candidates, images, num_classes=members[0].cfg.model.num_classes)
    return candidates[choice].astype(np.uint8), {"scores": scores, "choice": choice}


# --------------------------------------------------------------------------------------------
# Inputs
# --------------------------------------------------------------------------------------------


def _folder_frames(folder: Path) -> list[Path]:
    """Frames of a folder (its origin/ subfolder when present, as vss.data.read_video)."""
    folder = folder / "origin" if (folder / "origin").is_dir() else folder
    files = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_EXTS and p.is_file())
    if not files:
        raise ValueError(f"no jpg/jpeg/png frame in {folder}")
    return files


def check_video_file(path: Path) -> None:
    """Open a video file and decode its first frame, so a bad file fails before any model runs."""
    cap = cv2.VideoCapture(str(path))
    try:
        ok = cap.isOpened() and cap.read()[0]
    finally:
        cap.release()
    if not ok:
        raise ValueError(f"cannot read video {path} (not a video, corrupt or unsupported codec)")


def resolve_inputs(args: argparse.Namespace) -> tuple[list[VideoInput], Path | None]:
    """The videos to predict and the dataset root (None for --video inputs)."""
    if not args.video:
        root = args.data
        if root is None:
            from vss.synthetic import ensure_default_dataset  # only the default run renders it

            root = ensure_default_dataset()
        videos = [VideoInput(v.name, root / "data" / v.name, v.frames) for v in iter_eval_videos(root, args.split)]
        return videos, Path(root)
    videos = []
    for path in args.video:
        if not path.exists():
            raise FileNotFoundError(f"video not found: {path}")
        if path.is_dir():
            name = path.parent.name if path.name == "origin" else path.name
            videos.append(VideoInput(name, path, _folder_frames(path)))
        else:
            check_video_file(path)
            videos.append(VideoInput(path.stem, path, None))
    names = [v.name for v in videos]
    if len(set(names)) != len(names):
        raise ValueError(f"--video inputs share an output name (file/folder stem): {names}")
    return videos, None


def _stems(video: VideoInput) -> list[str] | None:
    return [p.stem for p in video.frame_paths] if video.frame_paths is not None else None


def load_frames(video: VideoInput) -> tuple[np.ndarray, list[str], float]:
    """(frames (T,H,W,3) uint8 RGB, frame stems, fps) of an input."""
    if video.frame_paths is None:
        frames, names, fps = read_video(video.source)
    else:
        frames = [read_frame(p) for p in video.frame_paths]
        names, fps = [p.stem for p in video.frame_paths], DEFAULT_FPS
        if len({f.shape for f in frames}) != 1:
            raise ValueError(f"frames of {video.source} differ in size: {sorted({f.shape for f in frames})}")
    return np.stack(frames), names, fps


# --------------------------------------------------------------------------------------------
# Output folder, fingerprint, reports
# --------------------------------------------------------------------------------------------


def _write_atomic(path: Path, data: bytes) -> None:
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def file_identity(path: Path) -> dict:
    st = path.stat()
    return {"path": str(path.resolve()), "size": st.st_size, "mtime_ns": st.st_mtime_ns}


def tta_settings(args: argparse.Namespace) -> dict | None:
    """Views and merge of --tta (None without it); the merge defaults to vote, and to mean when
    probabilities are averaged (--ensemble, --save-probs)."""
    if not args.tta:
        return None
    merge = args.tta_merge or ("mean" if args.ensemble or args.save_probs else "vote")
    return {"scales": list(args.tta_scales), "flip": args.tta_flip, "merge": merge}


def inputs_identity(videos: Sequence[VideoInput], root: Path | None, split: str | None) -> dict:
    """What the predictions are of: the dataset root and split (or the --video inputs), and a digest
    of every video's name, source and frame files (names, sizes, modification times), so that
    another dataset, split or video list, or changed frames, is another run."""
    digest = hashlib.sha256()
    for video in videos:
        files = video.frame_paths if video.frame_paths is not None else [video.source]
        stats = [(f.name, f.stat().st_size, f.stat().st_mtime_ns) for f in map(Path, files)]
        digest.update(json.dumps([video.name, str(Path(video.source).resolve()), stats]).encode())
    return {
        "data": str(root.resolve()) if root is not None else None,
        "split": split if root is not None else None,
        "videos": len(videos),
        "digest": digest.hexdigest()[:16],
    }


def run_settings(args: argparse.Namespace, members: Sequence[Member], inputs: dict) -> dict:
    """Everything that changes the labels (models, views, inputs); its hash is the run's fingerprint."""
    tta = tta_settings(args)
    models = [{**file_identity(m.path), "stage": m.stage, "test_size": m.test_size} for m in members]
    vlm = None
    if args.vlm:
        from vss.vlm import default_groups_path

        vlm = {
            "model": args.vlm_model,
            "base_url": args.vlm_base_url,
            "groups": file_identity(args.vlm_groups or default_groups_path()),
        }
    mode = "aggregate" if args.aggregate else "ensemble" if len(members) > 1 else "single"
    return {"mode": mode, "models": models, "tta": tta, "amp": args.amp, "vlm": vlm, "inputs": inputs}


def fingerprint(settings: dict) -> str:
    return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:16]


def _read_json(path: Path) -> dict | None:
    try:
        d = json.loads(path.read_text(encoding="utf-8"))
        return d if isinstance(d, dict) else None
    except (OSError, json.JSONDecodeError):
        return None


def prepare_out_dir(out: Path, settings: dict, overwrite: bool, inputs: Sequence[Path]) -> dict:
    """Apply the existing-output rule (module docstring) and write OUT/run.json.

    Returns:
        The per-video entries of the previous report when resuming a run, else {}.
    """
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {out} exists and is not a folder")
    old = _read_json(out / "run.json") if out.is_dir() else None
    new_fp = fingerprint(settings)
    same = old is not None and old.get("fingerprint") == new_fp
    if out.is_dir() and any(out.iterdir()) and (overwrite or not same):
        if old is None:
            raise ValueError(
                f"{out} is not empty and has no run.json (not written by infer.py); choose another --out or empty it"
            )
        if not overwrite:
            before = old.get("settings") if isinstance(old.get("settings"), dict) else {}
            changed = ", ".join(k for k in settings if before.get(k) != settings[k]) or "settings"
            raise ValueError(
                f"{out} holds the predictions of another run (different {changed}); "
                "pass --overwrite to clear it or choose another --out"
            )
        inside = [p for p in inputs if Path(p).resolve().is_relative_to(out.resolve())]
        if inside:
            raise ValueError(f"--overwrite would delete {out}, which holds the input {inside[0]}")
        shutil.rmtree(out)
        same = False
    out.mkdir(parents=True, exist_ok=True)
    write_json_atomic(out / "run.json", {"fingerprint": new_fp, "settings": settings})
    report = _read_json(out / "report.json") if same else None
    return dict(report.get("videos", {})) if report else {}


def expected_outputs(out: Path, video: VideoInput, names: Sequence[str], args: argparse.Namespace) -> list[Path]:
    """Every file a finished video has (a video missing any of them is predicted again)."""
    vdir = out / video.name
    paths = [vdir / f"{n}.png" for n in names]
    if args.save_probs:
        paths += [vdir / f"{n}.entropy.npy" for n in names]
    if args.overlay:
        paths += [vdir / "overlay" / f"{n}.jpg" for n in names]
        if video.frame_paths is None:
            paths.append(out / f"{video.name}.overlay.mp4")
    return paths


def finished(out: Path, video: VideoInput, names: Sequence[str] | None, report: dict, args: argparse.Namespace) -> bool:
    """True for a video of the resumed run (in its report) whose every output file exists.

    Args:
        names: the frame stems; None for a video file, whose frames are then counted from the
            report (``vss.data.read_video`` names them %05d), so it need not be decoded.
    """
    if video.name not in report:
        return False
    if names is None:
        names = [f"{i:05d}" for i in range(int(report[video.name].get("frames", 0)))]
    return bool(names) and all(p.is_file() for p in expected_outputs(out, video, names, args))


def colour_overlay(images: np.ndarray, labels: np.ndarray, palette: np.ndarray) -> np.ndarray:
    """(T,H,W,3) uint8: frames (T,H,W,3) blended with the colours of their labels (T,H,W)."""
    colours = palette[labels].astype(np.float32)  # (T,H,W,3)
    blend = (1 - OVERLAY_ALPHA) * images.astype(np.float32) + OVERLAY_ALPHA * colours
    return np.round(blend).astype(np.uint8)


def write_outputs(
    out: Path,
    video: VideoInput,
    names: Sequence[str],
    images: np.ndarray,
    labels: np.ndarray,
    entropy: np.ndarray | None,
    palette: np.ndarray,
    overlay: bool,
    fps: float,
) -> None:
    """Label PNGs (+ entropies, overlays) of one video; every file is written atomically."""
    vdir = out / video.name
    for t, name in enumerate(names):
        write_label_png(vdir / f"{name}.png", labels[t], palette)
        if entropy is not None:
            buf = io.BytesIO()
            np.save(buf, entropy[t])
            _write_atomic(vdir / f"{name}.entropy.npy", buf.getvalue())
    if overlay:
        blends = colour_overlay(images, labels, palette)
        for name, img in zip(names, blends):
            bgr = cv2.cvtColor(img, cv2.COLOR_RGB2BGR)
            ok, jpg = cv2.imencode(".jpg", bgr, [cv2.IMWRITE_JPEG_QUALITY, 90])
            if not ok:
                raise ValueError(f"cannot encode the overlay {vdir / 'overlay' / name}.jpg")
            _write_atomic(vdir / "overlay" / f"{name}.jpg", jpg.tobytes())
        if video.frame_paths is None:
            write_video(out / f"{video.name}.overlay.mp4", list(blends), fps)


# --------------------------------------------------------------------------------------------
# Runs
# --------------------------------------------------------------------------------------------


def make_vlm(args: argparse.Namespace, class_names: Sequence[str], out: Path) -> Callable | None:
    """A function (frames, labels, video) -> (labels, report) calling vss.vlm, or None."""
    if not args.vlm:
        return None
    from vss import vlm  # the openai client is needed only here

    try:
        groups = vlm.load_groups(args.vlm_groups, class_names)
    except ValueError as e:
        raise ValueError(f"{e} (pass --vlm-groups FILE with groups of this dataset's classes)") from None
    client = vlm.make_client(args.vlm_base_url)
    cache = args.vlm_cache or out / "vlm_cache"

    def correct(images: np.ndarray, labels: np.ndarray, video: str) -> tuple[np.ndarray, dict]:
        return vlm.correct_video(
            images, labels, class_names, groups, client, model=args.vlm_model, video_name=video, cache_dir=cache
        )

    return correct


def predict_one(
    video: VideoInput,
    members: Sequence[Member],
    args: argparse.Namespace,
    opts: Options,
    palette: np.ndarray,
    vlm_fn: Callable | None,
    out: Path,
) -> dict:
    """Predict, aggregate or ensemble, correct, and write one video; its report entry."""
    start = time.perf_counter()
    images, names, fps = load_frames(video)  # (T,H0,W0,3)
    views = len(tta_views(opts.tta["scales"], opts.tta["flip"])) if opts.tta else 1
    entry: dict = {
        "frames": len(names),
        "views": views,
        "merge": opts.tta["merge"] if opts.tta else None,
        "members": [str(m.path) for m in members],
    }
    if args.aggregate:
        labels, entry["aggregation"] = aggregate_prediction(members, images, opts)
        entropy = None
    else:
        labels, entropy = ensemble_prediction(members, images, opts, need_entropy=args.save_probs)
    if vlm_fn is not None:
        labels, entry["vlm"] = vlm_fn(images, labels, video.name)
    write_outputs(out, video, names, images, labels, entropy, palette, args.overlay, fps)
    entry["seconds"] = round(time.perf_counter() - start, 3)
    entry["fps"] = round(len(names) / max(entry["seconds"], 1e-9), 3)
    return entry


def run_aggregate_preds(args: argparse.Namespace) -> None:
    """--aggregate-preds: per video, the prediction folder with the highest mean flow-SSIM."""
    videos, root = resolve_inputs(args)
    for d in args.aggregate_preds:
        if not d.is_dir():
            raise FileNotFoundError(f"prediction folder not found: {d}")
    settings = {
        "mode": "aggregate-preds",
        "dirs": [str(d.resolve()) for d in args.aggregate_preds],
        "inputs": inputs_identity(videos, root, args.split),
    }
    report = prepare_out_dir(args.out, settings, args.overwrite, [*args.aggregate_preds, root])
    num_classes = len(load_class_names(root)[0])
    for video in tqdm(videos, desc="aggregate", unit="video", disable=args.no_progress):
        names = _stems(video)
        if finished(args.out, video, names, report, args):
            continue
        result = aggregate_prediction_dirs(
            args.aggregate_preds, {video.name: video.frame_paths}, args.out, num_classes=num_classes, progress=False
        )
        report[video.name] = {"frames": len(names), "aggregation": result[video.name]}
        write_json_atomic(args.out / "report.json", {"settings": settings, "videos": report})


def run_inference(args: argparse.Namespace) -> None:
    """Predict every input video with the checkpoints and write OUT (module docstring)."""
    out = args.out if args.out is not None else DEFAULT_OUT
    paths = model_paths(args)  # before resolve_inputs, which may render the default dataset
    videos, root = resolve_inputs(args)
    device = torch.device(args.device)
    members = [load_member(p, device, args.test_size) for p in paths]
    class_names, palette = class_list(members, root)
    vlm_fn = make_vlm(args, class_names, out)
    settings = run_settings(args, members, inputs_identity(videos, root, args.split))
    inputs = [m.path for m in members] + ([root] if root else [v.source for v in videos])
    report = prepare_out_dir(out, settings, args.overwrite, inputs)
    opts = Options(tta_settings(args), AMP_DTYPES[args.amp], device)
    todo = [v for v in videos if not finished(out, v, _stems(v), report, args)]
    for video in tqdm(todo, desc="infer", unit="video", disable=args.no_progress):
        report[video.name] = predict_one(video, members, args, opts, palette, vlm_fn, out)
        write_json_atomic(out / "report.json", {"settings": settings, "videos": report})
    skipped = f" ({len(videos) - len(todo)} already complete, skipped)" if len(todo) < len(videos) else ""
    print(f"wrote {len(todo)} videos to {out}{skipped}")


def main(argv: Sequence[str] | None = None) -> int:
    parser = get_args_parser()
    args = parser.parse_args(argv)
    check_args(parser, args)
    cv2.utils.logging.setLogLevel(cv2.utils.logging.LOG_LEVEL_SILENT)  # our own error lines only
    try:
        if args.aggregate_preds:
            run_aggregate_preds(args)
        else:
            run_inference(args)
    except (ValueError, OSError) as e:
        print(f"infer.py: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
