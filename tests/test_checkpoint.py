"""vss.checkpoint: atomic writes survive a crash mid-write, unsafe and truncated files give clear
errors (and the unsafe one runs nothing), RNG states round-trip through the safe loader."""

import os
import pickle
import random

import numpy as np
import pytest
import torch

from vss import checkpoint as ck


def test_save_load_round_trip(tmp_path):
    state = {
        "model": {"w": torch.randn(3, 4)},
        "step": 7,
        "stage": "segmenter",
        "config": {"optim": {"lr_steps": (0.7, 0.9)}},
        "best_miou": None,
    }
    path = tmp_path / "sub" / "last.pt"
    ck.save_checkpoint(path, state)
    out = ck.load_checkpoint(path)
    assert torch.equal(out["model"]["w"], state["model"]["w"])
    assert out["step"] == 7 and out["stage"] == "segmenter" and out["best_miou"] is None
    assert os.listdir(path.parent) == ["last.pt"]  # no temporary file left behind


def test_crash_mid_write_keeps_old_file(tmp_path, monkeypatch):
    path = tmp_path / "last.pt"
    ck.save_checkpoint(path, {"step": 1, "w": torch.ones(5)})
    real_save = torch.save

    def crashing_save(obj, f):
        real_save({"step": 2, "w": torch.zeros(10000)}, f)  # the bytes are written ...
        f.truncate(100)  # ... partly, and then the process "dies"
        raise KeyboardInterrupt

    monkeypatch.setattr(ck.torch, "save", crashing_save)
    with pytest.raises(KeyboardInterrupt):
        ck.save_checkpoint(path, {"step": 2})
    monkeypatch.undo()
    out = ck.load_checkpoint(path)
    assert out["step"] == 1 and torch.equal(out["w"], torch.ones(5))
    assert os.listdir(tmp_path) == ["last.pt"]


class _RunsCode:
    """A pickle payload that would create a file when unpickled by an unsafe loader."""

    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")
@pytest.mark.parametrize("fmt", ["torch", "raw_pickle"])
def test_code_running_pickle_is_refused(tmp_path, fmt):
    marker = tmp_path / "side_effect"
    path = tmp_path / "evil.pt"
    payload = {"model": {}, "x": _RunsCode(str(marker))}
    if fmt == "torch":
        torch.save(payload, path)
    else:
        with open(path, "wb") as f:
            pickle.dump(payload, f)
    assert not marker.exists()
    with pytest.raises(ValueError, match=r"evil\.pt.*refused for safety"):
        ck.load_checkpoint(path)
    assert not marker.exists()
    if fmt == "raw_pickle":  # sanity: the payload really does run code when unpickled unsafely
        with open(path, "rb") as f:
            pickle.load(f)
        assert marker.exists()


def test_truncated_and_missing(tmp_path):
    path = tmp_path / "last.pt"
    ck.save_checkpoint(path, {"w": torch.randn(1000), "step": 3})
    data = path.read_bytes()
    for n in (0, 10, len(data) // 2, len(data) - 10):
        bad = tmp_path / f"cut{n}.pt"
        bad.write_bytes(data[:n])
        with pytest.raises(ValueError, match=rf"cut{n}\.pt is truncated or corrupt"):
            ck.load_checkpoint(bad)
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"not a checkpoint" * 8)
    with pytest.raises(ValueError, match="garbage.pt is truncated or corrupt"):
        ck.load_checkpoint(garbage)
    with pytest.raises(FileNotFoundError, match="nope.pt"):
        ck.load_checkpoint(tmp_path / "nope.pt")
    torch.save([1, 2], tmp_path / "list.pt")
    with pytest.raises(ValueError, match="list.pt holds a list"):
        ck.load_checkpoint(tmp_path / "list.pt")


def _draw() -> tuple:
    return (
        random.random(),
        random.gauss(0, 1),
        np.random.rand(3).tolist(),
        float(np.random.randn()),
        torch.rand(3).tolist(),
    )


def test_rng_state_round_trip(tmp_path):
    random.seed(1)
    np.random.seed(2)
    torch.manual_seed(3)
    random.gauss(0, 1)  # leave a cached gaussian in both generators
    np.random.randn()
    ck.save_checkpoint(tmp_path / "rng.pt", {"rng": ck.rng_state()})
    expected = _draw()
    _draw()  # move every stream on
    ck.set_rng_state(ck.load_checkpoint(tmp_path / "rng.pt")["rng"])
    assert _draw() == expected
