"""Checkpoints: atomic save, safe load, and the RNG states that make a resumed run continue
exactly.

Not a paper component (DESIGN.md "Engineering rules"). A checkpoint is a plain dict of state
dicts (`model` of the unwrapped model, `optimizer`, `scheduler`, `scaler`, `step`, `config`,
`stage`, `rng` per rank, `best_miou`, ...), written so that a crash mid-write never leaves a
half-written file under the real name, and read with `torch.load(weights_only=True)` so that a
checkpoint from an untrusted source cannot run code. Everything stored must therefore be
tensors, numbers, strings, None and lists/tuples/dicts of them: the RNG states below are
converted to tensors for that reason (numpy arrays would be refused by the safe loader).
"""

from __future__ import annotations

import os
import pickle
import pickletools
import random
import re
import zipfile
from pathlib import Path

import numpy as np
import torch

from vss.io import atomic_path


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
        "python": {"version": version, "state": torch.tensor(py_state, dtype=torch.int64),
                   "gauss": gauss},
        "numpy": {"kind": kind, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                  "has_gauss": int(has_gauss), "cached_gaussian": float(cached)},
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
