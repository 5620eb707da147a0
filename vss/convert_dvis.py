"""Convert released DVIS++ (and detectron2 model-zoo) checkpoints into vss checkpoints.

    python -m vss.convert_dvis DVIS_Plus_Offline_R50_VSPW.pth --out dvis_offline_r50.pt
    python -m vss.convert_dvis DVIS_Plus_Online_VitAdapterL_VSPW.pth --out dvis_online_vitl.pt
    python infer.py --checkpoint dvis_offline_r50.pt --data VSPW_480p --split val --out pred

Not a paper component: the bridge that lets this reference start where the MVC paper started,
from DVIS++'s released VSPW weights (DVIS++, Zhang et al., 2023; DVIS_Plus ``MODEL_ZOO.md``). The
modules of vss compute what DVIS_Plus's do (``tests/test_convert_dvis.py`` matches the original
code's outputs); only the names differ:

=============================================  ==============================================
DVIS++ / detectron2                            vss
=============================================  ==============================================
``backbone.stem.conv1.{weight,norm.*}``        ``segmenter.backbone.{conv1.weight,bn1.*}``
``backbone.res{k}.{i}.conv{j}.{weight,norm.*}``  ``segmenter.backbone.layer{k-1}.{i}.{conv{j}.weight,bn{j}.*}``
``backbone.res{k}.{i}.shortcut.{weight,norm.*}``  ``...layer{k-1}.{i}.downsample.{0.weight,1.*}``
``backbone.vit_module.*`` (ViT-L)              ``segmenter.backbone.vit.*``
``backbone.{spm,interactions,up,norm1..4,level_embed}.*``  ``segmenter.backbone.*`` (ViT-Adapter)
``sem_seg_head.pixel_decoder.transformer.encoder.layers.*``  ``segmenter.pixel_decoder.transformer.layers.*``
``sem_seg_head.pixel_decoder.*``               ``segmenter.pixel_decoder.*``
``sem_seg_head.predictor.*``                   ``segmenter.transformer_decoder.*``
``tracker.*``, ``refiner.*``                   unchanged
``criterion.empty_weight``, ``pixel_mean/std``  dropped (a loss buffer; input normalisation)
=============================================  ==============================================

detectron2's FrozenBN has no ``num_batches_tracked``; it is added as 0 (vss's norms keep
``nn.BatchNorm2d``'s keys). Floating tensors are stored as float32.

Steps: 1. read the file without running pickle code: ``.pth`` with
``torch.load(weights_only=True)`` (a detectron2 ``{"model": state_dict, ...}`` or a bare state
dict), ``.pkl`` (detectron2 model zoo: numpy arrays) with ``RestrictedUnpickler``, which admits
only numpy arrays and dtypes, dicts, lists, tuples, strings and numbers; 2. rename; 3. pick the
config (``--preset``, default from the backbone's keys: ``r50`` or ``vitl``, or ``--config`` JSON
for other dimensions) and the stage (the last module present: a CTVIS/MinVIS segmenter ->
``segmenter``, an online model -> ``tracker``, an offline model -> ``refiner``); 4. check every key
and shape against that model (built on the ``meta`` device, nothing allocated): an error lists the
missing, unexpected and mismatched keys; 5. write ``{"model", "config", "stage", "class_names",
"palette", "converted_from"}`` atomically, which ``infer.py --checkpoint``, ``train.py --init`` and
``--stage tracker|refiner --init`` read. A bare detectron2 ResNet (e.g. ``R-50.pkl``, keys
``stem.*``/``res2.*``) is written as a torchvision-layout state dict for ``train.py
--backbone-weights``.
"""

from __future__ import annotations

import argparse
import codecs
import collections
import importlib
import json
from pathlib import Path
import pickle
import re
import sys

import numpy as np
import torch
from torch import Tensor

from vss.checkpoint import save_checkpoint
from vss.config import Config, get_preset
from vss.io import default_palette, load_class_names
from vss.video_model import build_video_model, MODULES

DROPPED = ("criterion.empty_weight", "pixel_mean", "pixel_std")
# torchvision's ImageNet classifier, kept by detectron2's convert-torchvision-to-d2.py as "stem.fc"
BACKBONE_DROPPED = ("stem.fc.weight", "stem.fc.bias")


# --------------------------------------------------------------------------------------------
# Reading
# --------------------------------------------------------------------------------------------


def _numpy_global(module: str, name: str):
    """A numpy function by its pickled location (numpy 2 moved ``numpy.core`` to ``numpy._core``)."""
    for mod in (module.replace("numpy.core", "numpy._core"), module):
        try:
            return getattr(importlib.import_module(mod), name)
        except (ImportError, AttributeError):
            continue
    raise pickle.UnpicklingError(f"numpy has no {module}.{name}")


class RestrictedUnpickler(pickle.Unpickler):
    """A pickle reader that can build numpy arrays, dicts, lists, strings and numbers and nothing
    else: every global a pickle names must be one of ``ALLOWED`` (numpy's array/dtype/scalar
    reconstructors, ``collections.OrderedDict`` and ``_codecs.encode``, which protocol-2 pickles
    use for bytes), so a malicious file cannot import or call anything else. Object arrays are
    refused after loading (their items would be arbitrary)."""

    ALLOWED = {
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
        ("numpy.core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "_reconstruct"),
        ("numpy.core.multiarray", "scalar"),
        ("numpy._core.multiarray", "scalar"),
        ("numpy.core.numeric", "_frombuffer"),
        ("numpy._core.numeric", "_frombuffer"),
        ("collections", "OrderedDict"),
        ("_codecs", "encode"),  # how Python 3 writes bytes (the arrays' buffers) at protocol 2
    }

    def find_class(self, module: str, name: str):
        if (module, name) not in self.ALLOWED:
            raise pickle.UnpicklingError(
                f"refused to load {module}.{name}: only numpy arrays and plain Python data are accepted"
            )
        if module == "collections":
            return collections.OrderedDict
        if module == "_codecs":
            return codecs.encode
        if module == "numpy":
            return getattr(np, name)
        return _numpy_global(module, name)


def _to_tensor(key: str, value, source: Path) -> Tensor:
    if isinstance(value, Tensor):
        return value
    if isinstance(value, np.ndarray) and value.dtype != object:
        return torch.from_numpy(np.ascontiguousarray(value))
    raise ValueError(
        f"{source}: {key} is a {type(value).__name__}"
        f"{' of objects' if isinstance(value, np.ndarray) else ''}, not an array"
    )


def read_source(path: str | Path) -> dict[str, Tensor]:
    """The model state dict of a DVIS++ / detectron2 checkpoint, read without running code.

    Args:
        path: ``.pkl`` (pickle of numpy arrays, detectron2 model zoo) or any other suffix
            (``torch.save`` file: ``{"model": state_dict, ...}`` or a bare state dict).
    Returns:
        {key: tensor} with the file's own key names.
    Raises:
        FileNotFoundError, ValueError (unreadable, unsafe or not a state dict; names the file).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist")
    try:
        if path.suffix == ".pkl":
            with open(path, "rb") as f:
                obj = RestrictedUnpickler(f, encoding="latin1").load()
        else:
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        raise ValueError(f"{path}: refused or unreadable pickle ({str(e).splitlines()[0][:300]})") from None
    except PermissionError:
        raise
    except Exception as e:  # noqa: BLE001 - truncated or foreign bytes fail in many ways (EOF, struct, zip...)
        raise ValueError(f"{path}: not a readable checkpoint ({type(e).__name__}: {str(e)[:200]})") from None
    if isinstance(obj, dict) and isinstance(obj.get("model"), dict):
        obj = obj["model"]
    if not isinstance(obj, dict) or not obj:
        raise ValueError(f"{path}: expected a state dict or a dict with 'model', got {type(obj).__name__}")
    return {str(k): _to_tensor(str(k), v, path) for k, v in obj.items()}


# --------------------------------------------------------------------------------------------
# Renaming
# --------------------------------------------------------------------------------------------

_NORM = r"(?P<param>weight|norm\.(?:weight|bias|running_mean|running_var|num_batches_tracked))"
_STEM = re.compile(r"stem\.conv1\." + _NORM)
_RESNET_BLOCK = re.compile(r"res(?P<stage>[2-5])\.(?P<block>\d+)\.(?P<kind>conv[123]|shortcut)\." + _NORM)


def resnet_key(key: str) -> str | None:
    """A detectron2 ResNet key (without ``backbone.``) in torchvision's layout, or None if the key
    is not one (``stem.conv1.norm.weight`` -> ``bn1.weight``, ``res3.0.shortcut.weight`` ->
    ``layer2.0.downsample.0.weight``, ``res2.1.conv2.norm.running_var`` -> ``layer1.1.bn2.running_var``)."""
    m = _STEM.fullmatch(key)
    if m is not None:
        prefix, conv, norm = "", "conv1", "bn1"
    elif (m := _RESNET_BLOCK.fullmatch(key)) is not None:
        stage, block, kind = m.group("stage", "block", "kind")
        prefix = f"layer{int(stage) - 1}.{block}."
        conv, norm = ("downsample.0", "downsample.1") if kind == "shortcut" else (kind, f"bn{kind[-1]}")
    else:
        return None
    param = m.group("param")
    return prefix + (f"{conv}.weight" if param == "weight" else f"{norm}.{param[len('norm.') :]}")


def rename_key(key: str) -> str | None:
    """The vss name of a DVIS++ key; None for the keys vss does not keep (``DROPPED``). Keys of no
    known module come back unchanged (and are reported as unexpected by ``check_keys``)."""
    if key in DROPPED:
        return None
    if key.startswith("backbone."):
        rest = key[len("backbone.") :]
        if rest.startswith("vit_module."):
            return "segmenter.backbone.vit." + rest[len("vit_module.") :]
        converted = resnet_key(rest)
        return "segmenter.backbone." + (converted if converted is not None else rest)
    if key.startswith("sem_seg_head.pixel_decoder."):
        rest = key[len("sem_seg_head.pixel_decoder.") :].replace("transformer.encoder.layers.", "transformer.layers.")
        return "segmenter.pixel_decoder." + rest
    if key.startswith("sem_seg_head.predictor."):
        return "segmenter.transformer_decoder." + key[len("sem_seg_head.predictor.") :]
    return key


def _with_batch_counters(state: dict[str, Tensor]) -> dict[str, Tensor]:
    """Add ``num_batches_tracked`` = 0 beside every ``running_var`` that lacks one (FrozenBN)."""
    out = dict(state)
    for key in state:
        if key.endswith(".running_var"):
            out.setdefault(key[: -len("running_var")] + "num_batches_tracked", torch.tensor(0, dtype=torch.long))
    return out


def convert_state_dict(source: dict[str, Tensor]) -> dict[str, Tensor]:
    """Rename a DVIS++ state dict to vss's ``VideoModel`` names (module docstring table), drop
    ``DROPPED``, add FrozenBN's missing counters and store floats as float32."""
    out = {}
    for key, value in source.items():
        new = rename_key(key)
        if new is None:
            continue
        if new in out:
            raise ValueError(f"two keys map to {new} (one is {key})")
        out[new] = value.float() if value.is_floating_point() else value
    return _with_batch_counters(out)


def is_bare_resnet(source: dict[str, Tensor]) -> bool:
    """A detectron2 backbone file (``R-50.pkl``): every key a ResNet key without ``backbone.``."""
    return all(resnet_key(k) is not None or k in BACKBONE_DROPPED for k in source)


# --------------------------------------------------------------------------------------------
# Config, stage, strict check
# --------------------------------------------------------------------------------------------


def detect_preset(state: dict[str, Tensor]) -> str:
    """``vitl`` for a ViT-Adapter backbone, ``r50`` for a ResNet one."""
    if any(k.startswith("segmenter.backbone.vit.") for k in state):
        return "vitl"
    if "segmenter.backbone.conv1.weight" in state:
        return "r50"
    raise ValueError("the checkpoint has neither a ResNet nor a ViT-Adapter backbone (no backbone.* keys?)")


def detect_stage(state: dict[str, Tensor]) -> str:
    """The last stage whose module is present: segmenter (CTVIS/MinVIS), tracker (online),
    refiner (offline)."""
    modules = {k.split(".", 1)[0] for k in state}
    present = [s for s in MODULES if s in modules]
    if not present:
        raise ValueError(f"no segmenter/tracker/refiner keys (modules: {sorted(modules)})")
    return present[-1]


def expected_shapes(cfg: Config, stage: str) -> dict[str, tuple[int, ...]]:
    """Key -> shape of the vss model of ``cfg`` and ``stage``, built on the meta device."""
    with torch.device("meta"):
        model = build_video_model(cfg, stage)
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


def _listing(items: list[str], limit: int = 10) -> str:
    more = f" ... (+{len(items) - limit} more)" if len(items) > limit else ""
    return ", ".join(items[:limit]) + more


def check_keys(state: dict[str, Tensor], expected: dict[str, tuple[int, ...]], source: str) -> None:
    """Strict check: same keys, same shapes; else ValueError listing missing / unexpected /
    mismatched keys (vss names; the DVIS++ names follow from the module docstring)."""
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    mismatched = [
        f"{k} {tuple(state[k].shape)} vs {expected[k]}"
        for k in expected
        if k in state and tuple(state[k].shape) != expected[k]
    ]
    if missing or unexpected or mismatched:
        parts = [f"{len(missing)} missing: {_listing(missing)}"] if missing else []
        parts += [f"{len(unexpected)} unexpected: {_listing(unexpected)}"] if unexpected else []
        parts += [f"{len(mismatched)} mismatched (file vs model): {_listing(mismatched)}"] if mismatched else []
        raise ValueError(f"{source} does not fit the model; " + "; ".join(parts))


def convert(
    source_path: str | Path, *, preset: str | None = None, config: Config | None = None, stage: str | None = None
) -> dict:
    """Everything up to writing: the vss checkpoint dict of a DVIS++ file.

    Args:
        source_path: the DVIS++ / detectron2 checkpoint.
        preset: vss preset of the model (default: ``detect_preset``); ignored with ``config``.
        config: a full vss config instead (other dimensions, e.g. test models).
        stage: keep only the modules up to this stage (default: ``detect_stage``); the later
            modules' keys are dropped.
    Returns:
        {"model", "config", "stage", "class_names", "palette", "converted_from"}.
    """
    source_path = Path(source_path)
    state = convert_state_dict(read_source(source_path))
    present = detect_stage(state)
    stage = stage or present
    if MODULES.index(stage) > MODULES.index(present):
        raise ValueError(f"{source_path} has no {stage} weights (its last module is the {present})")
    keep = MODULES[: MODULES.index(stage) + 1]
    dropped = sorted({k.split(".", 1)[0] for k in state} - set(keep))
    state = {k: v for k, v in state.items() if k.split(".", 1)[0] in keep or k.split(".", 1)[0] not in MODULES}
    cfg = Config.from_dict((config if config is not None else get_preset(preset or detect_preset(state))).to_dict())
    cfg.train.stage = stage  # the stage the model is (as a checkpoint train.py writes)
    check_keys(state, expected_shapes(cfg, stage), str(source_path))
    names, palette = load_class_names(None)
    if len(names) != cfg.model.num_classes:  # not VSPW
        names, palette = [f"class_{k}" for k in range(cfg.model.num_classes)], default_palette(cfg.model.num_classes)
    return {
        "model": state,
        "config": cfg.to_dict(),
        "stage": stage,
        "class_names": names,
        "palette": palette.tolist(),
        "converted_from": {"file": source_path.name, "dropped_modules": dropped},
    }


def convert_backbone(source: dict[str, Tensor]) -> dict[str, Tensor]:
    """A bare detectron2 ResNet as a torchvision-layout state dict (``--backbone-weights``)."""
    return _with_batch_counters(
        {
            resnet_key(k): v.float() if v.is_floating_point() else v
            for k, v in source.items()
            if k not in BACKBONE_DROPPED
        }
    )


# --------------------------------------------------------------------------------------------
# CLI
# --------------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m vss.convert_dvis",
        description="Convert a DVIS++ / detectron2 checkpoint (.pth or model-zoo .pkl) into a vss checkpoint "
        "for infer.py --checkpoint and train.py --init (a bare detectron2 ResNet becomes a "
        "torchvision state dict for train.py --backbone-weights).",
    )
    p.add_argument("source", type=Path, help="DVIS++ checkpoint (.pth with a 'model' dict, or a .pkl of numpy arrays)")
    p.add_argument("--out", type=Path, required=True, help="vss checkpoint to write (.pt)")
    p.add_argument(
        "--preset",
        choices=["r50", "vitl"],
        default=None,
        help="vss preset of the model (default: from the backbone keys)",
    )
    p.add_argument(
        "--config", type=Path, default=None, help="a vss config JSON instead of a preset (models of other dimensions)"
    )
    p.add_argument(
        "--stage",
        choices=list(MODULES),
        default=None,
        help="keep the modules up to this stage (default: all in the file; offline -> refiner, "
        "online -> tracker, CTVIS/MinVIS -> segmenter)",
    )
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        config = None
        if args.config is not None:
            try:
                config = Config.from_dict(json.loads(args.config.read_text(encoding="utf-8")))
            except (OSError, ValueError, TypeError) as e:
                raise ValueError(f"cannot read config {args.config}: {e}") from None
        source = read_source(args.source)
        if is_bare_resnet(source):
            save_checkpoint(args.out, convert_backbone(source))
            print(
                f"{args.source}: a bare ResNet ({len(source)} tensors) -> {args.out} "
                "(torchvision layout, for train.py --backbone-weights)"
            )
            return 0
        ckpt = convert(args.source, preset=args.preset, config=config, stage=args.stage)
    except (FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    save_checkpoint(args.out, ckpt)
    dropped = ckpt["converted_from"]["dropped_modules"]
    print(
        f"{args.source} -> {args.out}: {len(ckpt['model'])} tensors, preset {ckpt['config']['name']}, "
        f"stage {ckpt['stage']}" + (f" (dropped: {', '.join(dropped)})" if dropped else "")
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
