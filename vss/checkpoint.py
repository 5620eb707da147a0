"""Checkpoints: atomic save, safe load, the RNG states that make a resumed run continue exactly,
and the training state of a run (``--init`` weights, what a checkpoint holds, resume checks).

Not a paper component. A checkpoint is a plain dict of state
dicts (`model` of the unwrapped model, `optimizer`, `scheduler`, `scaler`, `step`, `config`,
`stage`, `rng` per rank, `best_miou`, ...), written so that a crash mid-write never leaves a
half-written file under the real name, and read with `torch.load(weights_only=True)` so that a
checkpoint from an untrusted source cannot run code. Everything stored must therefore be
tensors, numbers, strings, None and lists/tuples/dicts of them: the RNG states below are
converted to tensors for that reason (numpy arrays would be refused by the safe loader).
"""

from __future__ import annotations

from dataclasses import dataclass
import os
from pathlib import Path
import pickle
import pickletools
import random
import re
import signal
from typing import NamedTuple
import zipfile

import numpy as np
import torch
from torch import nn

from vss.backbone import load_backbone_weights
from vss.config import Config, config_diff, migrate_config
from vss.distributed import all_gather_object, any_rank, broadcast_buffers, is_main
from vss.io import atomic_path
from vss.stages import Stage, video_core
from vss.video_model import load_previous_stage, MODULES, VideoModel


def save_checkpoint(path: str | os.PathLike, state: dict) -> None:
    """Write `state` to `path` atomically.

    The bytes go to a temporary file in the same directory (same file system, so the rename is
    atomic), are flushed and fsync'ed, then `os.replace` puts them under the real name. If
    anything fails, the previous file at `path` is untouched and the temporary file is removed.

    Args:
        path: destination file; its directory is created if needed.
        state: dict of tensors / numbers / strings / containers (loadable with weights_only).
    """
    path = Path(path)
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        torch.save(state, f)
        f.flush()
        os.fsync(f.fileno())
    _fsync_dir(path.parent)


def _fsync_dir(directory: Path) -> None:
    # Persist the rename itself (POSIX); not possible on some platforms/file systems.
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def load_checkpoint(path: str | os.PathLike) -> dict:
    """Load a checkpoint onto the CPU with the safe (weights-only) unpickler.

    Args:
        path: a file written by `save_checkpoint` (or any torch.save of plain data).
    Returns:
        The saved dict.
    Raises:
        FileNotFoundError: `path` does not exist.
        ValueError: the file is truncated or corrupt, is not a dict, or holds a pickle that
            would import or run code (refused for safety).
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    if not path.is_file():
        raise ValueError(f"checkpoint {path} is not a file")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        raise _classify_unpickling_error(path, str(e)) from None
    except PermissionError:
        raise
    except (EOFError, RuntimeError, OSError, KeyError, zipfile.BadZipFile, UnicodeDecodeError) as e:
        # torch raises EOFError / RuntimeError (zip reader) / OSError / KeyError depending on
        # where the bytes stop; all of them mean "this is not a complete checkpoint".
        detail = str(e).split("\n")[0][:200] or type(e).__name__
        raise ValueError(f"checkpoint {path} is truncated or corrupt ({detail})") from None
    if not isinstance(state, dict):
        raise ValueError(f"checkpoint {path} holds a {type(state).__name__}, expected a dict")
    return state


def _classify_unpickling_error(path: Path, message: str) -> ValueError:
    """Tell a pickle that would import/run code from bytes that are simply broken.

    The safe unpickler reports both as "Weights only load failed"; the detail names a blocked
    GLOBAL for the former and an unsupported opcode for garbage (or for raw pickles of
    protocol >= 4, whose imports are then found by scanning the opcodes without running them).
    """
    detail = message.split("Weights only load failed.")[-1]
    named = re.search(r"GLOBAL\s+([\w.]+)", detail, flags=re.IGNORECASE)
    imported = named.group(1) if named else None
    if imported is None and zipfile.is_zipfile(path):
        try:
            unsafe = torch.serialization.get_unsafe_globals_in_checkpoint(path)
        except Exception:  # a broken archive: reported as corrupt below
            unsafe = []
        imported = ", ".join(unsafe) or None
    elif imported is None:
        imported = _pickle_imports(path)
    if imported is None:
        reason = re.search(r"Unsupported operand\s*\d+", detail)
        reason = reason.group(0) if reason else "the safe unpickler cannot read it"
        return ValueError(f"checkpoint {path} is truncated or corrupt ({reason})")
    return ValueError(
        f"checkpoint {path} is refused for safety: loading it would import or run code "
        f"({imported}). Only checkpoints of tensors and plain Python data are accepted."
    )


def _pickle_imports(path: Path) -> str | None:
    """The first global a raw pickle file would import, or None if it has none / is not a
    readable pickle. Reads opcodes only (pickletools never executes them)."""
    strings: list[str] = []
    try:
        with open(path, "rb") as f:
            for opcode, arg, _ in pickletools.genops(f):
                if opcode.name == "GLOBAL":
                    return str(arg).replace(" ", ".")
                if opcode.name == "STACK_GLOBAL":
                    return ".".join(strings[-2:]) or "a Python object"
                if opcode.name in ("INST", "OBJ", "REDUCE", "NEWOBJ", "NEWOBJ_EX"):
                    return f"a Python object (opcode {opcode.name})"
                if isinstance(arg, str):
                    strings.append(arg)
    except Exception:  # garbage bytes: pickletools raises ValueError and friends
        return None
    return None


def rng_state() -> dict:
    """The states of Python's, NumPy's and torch's (CPU and every CUDA device) global RNGs,
    as tensors and plain values so that `load_checkpoint` (weights_only) can read them back."""
    version, py_state, gauss = random.getstate()
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state = {
        "python": {"version": version, "state": torch.tensor(py_state, dtype=torch.int64), "gauss": gauss},
        "numpy": {
            "kind": kind,
            "keys": torch.from_numpy(keys.astype(np.int64)),
            "pos": int(pos),
            "has_gauss": int(has_gauss),
            "cached_gaussian": float(cached),
        },
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }
    return state


def set_rng_state(state: dict) -> None:
    """Restore the RNGs from `rng_state()`'s output (possibly after a save/load round trip).

    CUDA states are restored only when the number of visible devices matches; otherwise they
    are skipped (resuming a GPU run on the CPU still restores the CPU streams).
    """
    py = state["python"]
    random.setstate((py["version"], tuple(int(v) for v in py["state"].tolist()), py["gauss"]))
    nps = state["numpy"]
    keys = nps["keys"].numpy().astype(np.uint32)
    np.random.set_state((nps["kind"], keys, nps["pos"], nps["has_gauss"], nps["cached_gaussian"]))
    torch.set_rng_state(state["torch"])
    cuda = state.get("cuda", [])
    if cuda and torch.cuda.is_available() and len(cuda) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(cuda)


# --------------------------------------------------------------------------------------------
# Training runs: --init weights, the full training state, resume
# --------------------------------------------------------------------------------------------


@dataclass
class InitWeights:
    """The weights a new run starts from (``read_init``)."""

    path: Path
    state: dict  # VideoModel-style state dict (keys ``segmenter.*``, ``tracker.*``, ...)
    stage: str  # the stage of the checkpoint's model
    config: dict | None  # its saved config (None for a bare state dict)
    modules: set  # the modules it holds
    bare: bool  # a bare segmenter state dict (e.g. converted Mask2Former weights)


def read_init(path: Path) -> InitWeights:
    """A ``--init`` file: a vss checkpoint or a bare segmenter state dict (which gets the
    ``segmenter.`` prefix). Configs saved by older versions are migrated."""
    ckpt = load_checkpoint(path)
    state, config, stage = ckpt, None, None
    if isinstance(ckpt.get("model"), dict):
        state, stage = ckpt["model"], ckpt.get("stage")
        config = ckpt.get("config") and migrate_config(ckpt["config"], _trained_stage(ckpt), ckpt.get("args"))
    if not state or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError(f"--init {path} is neither a vss checkpoint nor a state dict")
    modules = {k.split(".", 1)[0] for k in state}
    bare = not modules <= set(MODULES)
    if bare:
        state, modules = {f"segmenter.{k}": v for k, v in state.items()}, {"segmenter"}
    if stage not in MODULES:
        stage = [s for s in MODULES if s in modules][-1]
    return InitWeights(Path(path), state, stage, config, modules, bare)


def load_init_weights(
    core: VideoModel, stage: Stage, init: InitWeights | None, backbone_weights: Path | None = None
) -> str:
    """``backbone_weights`` into the segmenter's backbone, then ``init`` into the modules the model
    has (strict per module); the modules the stage keeps frozen must all come from ``init``.

    Returns:
        A one-line report of what was loaded, what trains and what is frozen.
    """
    if backbone_weights is not None:
        load_backbone_weights(core.segmenter.backbone, backbone_weights)
    if init is None:
        if stage.needs is not None:
            raise ValueError(
                f"--stage {stage.name} starts from a trained model: pass --init with {stage.needs} checkpoint"
            )
        return "no --init: fresh weights"
    present = [n for n in MODULES if getattr(core, n) is not None]
    state = {k: v for k, v in init.state.items() if k.split(".", 1)[0] in present}
    loaded = [n for n in present if n in init.modules]
    try:
        if not loaded:
            raise ValueError(f"it holds only {sorted(init.modules)}")
        left = load_previous_stage(core, state, source=str(init.path))
    except (ValueError, RuntimeError) as e:
        detail = str(e).split("\n")[0][:400]
        if init.bare:
            raise ValueError(
                f"--init {init.path} matches neither the {core.stage} model nor a segmenter: {detail}"
            ) from None
        raise ValueError(f"--init {init.path} does not fit the {core.stage} model: {detail}") from None
    frozen = [n for n in present if n != stage.trains]
    required = present if stage.name == "semi" else frozen
    missing = [n for n in required if n in left]
    if missing:
        raise ValueError(
            f"--init {init.path} is a {init.stage} checkpoint without {missing} weights, "
            f"which --stage {stage.name} needs; pass {stage.needs} checkpoint"
        )
    ignored = sorted(init.modules - set(present))
    return (
        f"--init {init.path} ({init.stage} checkpoint): loaded {', '.join(loaded)} "
        f"({len(state)} tensors, strict per module); trains: {stage.trains}; "
        f"frozen: {', '.join(frozen) or 'none'}"
        + (f"; left at initialisation: {', '.join(left)}" if left else "")
        + (f"; ignored from the checkpoint: {', '.join(ignored)}" if ignored else "")
    )


class RunInfo(NamedTuple):
    """What checkpoints carry besides the states: the data's classes and the batch layout."""

    class_names: list[str]
    palette: list[list[int]]
    global_batch: int


def training_state(
    *,
    model: nn.Module,
    criterion: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler,
    scaler,
    cfg: Config,
    step: int,
    best_miou: float | None,
    info: RunInfo,
    cpu_minutes: float,
) -> dict:
    """The full training state (collective: gathers every rank's RNG states and class memory).
    ``cpu_minutes`` is the run's CPU time so far (train.py's budget clock)."""
    core = video_core(model)
    state = {
        "model": core.state_dict(),
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(),
        "scaler": scaler.state_dict() if scaler else None,
        "step": step,
        "config": cfg.to_dict(),
        "stage": core.stage,
        "semi": cfg.train.stage == "semi",
        "rng": all_gather_object(rng_state()),
        "best_miou": best_miou,
        "data": {"seed": cfg.train.seed, "global_batch": info.global_batch, "samples": step * info.global_batch},
        "class_names": list(info.class_names),
        "palette": info.palette,
        "cpu_minutes": cpu_minutes,  # of the whole run so far (resumed processes add up)
    }
    if core.stage == "refiner" and cfg.train.stage == "refiner":
        # per rank (DVIS++ keeps one memory per GPU), for an exact resume of the reid loss
        state["class_memory"] = all_gather_object(dict(core.class_memory.items))
    if hasattr(criterion, "semi_state"):
        state["semi_state"] = {"rep_head": model.rep_head.state_dict(), **criterion.semi_state()}
    return state


def save_training(path: Path, **state) -> None:
    """``training_state(**state)`` written to ``path`` by rank 0 (collective: every rank first
    takes rank 0's BatchNorm statistics and contributes its RNG states)."""
    broadcast_buffers(state["model"])
    if hasattr(state["criterion"], "teacher"):
        broadcast_buffers(state["criterion"].teacher)
    full = training_state(**state)
    if is_main():
        save_checkpoint(path, full)


def _trained_stage(ckpt: dict) -> str | None:
    return "semi" if ckpt.get("semi") else ckpt.get("stage")


def checkpoint_config(ckpt: dict) -> Config:
    """The config of a vss checkpoint (migrated from older versions)."""
    return Config.from_dict(migrate_config(ckpt["config"], _trained_stage(ckpt), ckpt.get("args")))


def check_resume(ckpt: dict, path: Path, cfg: Config, global_batch: int) -> None:
    """A resumed run must define the same data, loss and schedule, else it would not continue
    exactly: ``cfg`` (the checkpoint's config with this command line's settings applied) must
    equal the checkpoint's, and the global batch must be the same."""
    trained = _trained_stage(ckpt)
    if trained != cfg.train.stage:
        raise ValueError(
            f"{path} is a {trained!r} checkpoint, not {cfg.train.stage!r}; start the next stage with --init"
        )
    differ = config_diff(checkpoint_config(ckpt), cfg)
    if ckpt["data"]["global_batch"] != global_batch:
        differ.append(f"global batch {ckpt['data']['global_batch']} -> {global_batch}")
    if differ:
        raise ValueError(
            f"resuming {path} with different settings ({'; '.join(differ)}); pass the "
            "settings of the original run (or none), or start a new run with --init"
        )


def restore_training(
    ckpt: dict,
    *,
    model: nn.Module,
    criterion: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler,
    scaler,
    rank: int,
    world_size: int,
) -> tuple[int, float | None]:
    """Load a resumed run's states; returns (step, best val mIoU so far)."""
    core = video_core(model)
    core.load_state_dict(ckpt["model"])
    optimizer.load_state_dict(ckpt["optimizer"])
    scheduler.load_state_dict(ckpt["scheduler"])
    if scaler is not None and ckpt["scaler"]:
        scaler.load_state_dict(ckpt["scaler"])
    if len(ckpt["rng"]) == world_size:
        set_rng_state(ckpt["rng"][rank])
    if len(ckpt.get("class_memory", [])) == world_size:
        core.class_memory.items = {int(c): t for c, t in ckpt["class_memory"][rank].items()}
    if hasattr(criterion, "load_semi_state"):
        model.rep_head.load_state_dict(ckpt["semi_state"]["rep_head"])
        criterion.load_semi_state(ckpt["semi_state"])
    return ckpt["step"], ckpt["best_miou"]


def load_resume_checkpoint(path: Path, best: Path) -> dict:
    """The checkpoint to resume; when it is unreadable, the error says whether best.pt can serve."""
    try:
        return load_checkpoint(path)
    except ValueError as e:
        if path == best or not best.is_file():
            raise
        raise ValueError(
            f"{e}. {best} (the best validated state, an earlier step) is intact: continue from it with --resume {best}"
        ) from None


class StopRequest:
    """While active, SIGTERM/SIGINT set a flag; the loop saves and exits at the end of the step.
    A second signal exits at once (the previous checkpoint is intact: writes are atomic)."""

    def __enter__(self) -> "StopRequest":
        self.signum: int | None = None
        self._previous = {sig: signal.signal(sig, self._handle) for sig in (signal.SIGTERM, signal.SIGINT)}
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)

    def _handle(self, signum, frame) -> None:
        if self.signum is not None:
            raise SystemExit(128 + signum)
        self.signum = signum

    def agreed(self) -> bool:
        """True on every rank as soon as any rank got a signal (so all stop at the same step)."""
        return any_rank(self.signum is not None)
