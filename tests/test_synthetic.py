"""vss/synthetic.py: determinism, VSPW layout and encoding, motion, the embedded default."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from vss import data as D
from vss import io as vio
from vss import synthetic as S

SMALL = dict(num_videos=4, frames=(5, 7), height=48, width=64, num_classes=6)


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def small(tmp_path_factory) -> Path:
    return S.render_dataset(tmp_path_factory.mktemp("syn") / "ds", seed=3, **SMALL)


def test_deterministic_bytes(small, tmp_path):
    again = _files(S.render_dataset(tmp_path / "again", seed=3, **SMALL))
    first = _files(small)
    assert again.keys() == first.keys()
    assert any(k.endswith(".png") for k in first) and any(k.endswith(".jpg") for k in first)
    assert all(again[k] == first[k] for k in first)
    other = _files(S.render_dataset(tmp_path / "other", seed=4, **SMALL))
    masks = [k for k in first if k.endswith(".png")]
    assert sum(other.get(k) != first[k] for k in masks) > len(masks) // 2


def test_layout_and_classes_json(small):
    meta = json.loads((small / "classes.json").read_text())
    assert meta["classes"] == ["sky", "grass", "road", "car", "person", "ball"]
    assert np.asarray(meta["palette"]).shape == (6, 3)
    names, pal = vio.load_class_names(small)
    assert names == meta["classes"] and pal.dtype == np.uint8
    train, val = vio.read_split(small, "train"), vio.read_split(small, "val")
    assert len(train) + len(val) == 4 and len(val) >= 1 and not set(train) & set(val)
    for name in train + val:
        frames = vio.list_frames(small / "data" / name)
        masks = vio.list_frames(small / "data" / name, "mask")
        assert 5 <= len(frames) <= 7 and [f.stem for f in frames] == [m.stem for m in masks]
        assert all(f.suffix == ".jpg" for f in frames)
        assert vio.read_frame(frames[0]).shape == (48, 64, 3)
    ds = D.VSPWDataset(small, "train", num_frames=3, cfg=D.DataConfig(base_size=48, crop_size=(48, 64)), length=5)
    batch = D.collate_clips([ds.load_clip(i, np.random.default_rng(i)) for i in range(2)])
    assert batch["frames"].shape == (2, 3, 3, 64, 64)
    assert all(len(t["labels"]) >= 2 for t in batch["targets"])
    assert [v.name for v in vio.iter_eval_videos(small, "val")] == val


def test_raw_encoding_and_motion(tmp_path):
    root = S.render_dataset(tmp_path / "ds", seed=0, num_videos=8, frames=6, height=48, width=64, num_classes=6)
    seen = set()
    for name in vio.read_split(root, "train") + vio.read_split(root, "val"):
        raw = np.stack([vio.read_label_png(m) for m in vio.list_frames(root / "data" / name, "mask")])
        values = set(np.unique(raw).tolist())
        assert values <= set(range(7)) | {255}
        seen |= values
        assert {1, 2} <= values  # sky and grass in every video
        # objects move (and the camera pans): consecutive masks differ
        changed = (raw[1:] != raw[:-1]).mean(axis=(1, 2))
        assert (changed > 0.002).all(), f"{name}: static masks {changed}"
        # thing classes (car, person, ball: raw 4..6) change place, not only the background
        things = np.isin(raw, [4, 5, 6])
        if things.any():
            assert (things[1:] != things[:-1]).any()
    assert {0, 255} <= seen and len(seen & {4, 5, 6}) >= 2  # "others", void and objects occur


def test_render_video_in_memory():
    imgs, masks = S.render_video([1, 2], frames=4, height=32, width=40, num_classes=3)
    assert len(imgs) == 4 and imgs[0].shape == (32, 40, 3) and imgs[0].dtype == np.uint8
    assert set(np.unique(np.stack(masks)).tolist()) <= {0, 1, 2, 3, 255}
    imgs2, masks2 = S.render_video([1, 2], frames=4, height=32, width=40, num_classes=3)
    assert all((a == b).all() for a, b in zip(imgs + masks, imgs2 + masks2))
    with pytest.raises(ValueError):
        S.render_video(0, frames=4, height=32, width=40, num_classes=S.MAX_CLASSES + 1)
    imgs, masks = S.render_video(5, frames=3, height=32, width=40, num_classes=S.MAX_CLASSES)
    assert set(np.unique(np.stack(masks)).tolist()) <= set(range(S.MAX_CLASSES + 1)) | {255}


def test_default_root_and_ensure(tmp_path, monkeypatch):
    monkeypatch.setenv("VSS_DATA", str(tmp_path / "store"))
    assert S.default_root() == tmp_path / "store" / "synthetic"
    monkeypatch.delenv("VSS_DATA")
    assert S.default_root() == Path(S.__file__).resolve().parents[1] / "data" / "synthetic"
    monkeypatch.setattr(S, "DEFAULTS", dict(num_videos=3, frames=3, height=32, width=40, num_classes=4, seed=0))
    root = S.ensure_default_dataset(tmp_path / "def")
    assert S.is_dataset(root) and len(vio.read_split(root, "train")) == 2
    stamp = (root / "classes.json").stat().st_mtime_ns
    assert S.ensure_default_dataset(root) == root and (root / "classes.json").stat().st_mtime_ns == stamp
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp folder left
    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / "x").write_text("x")
    with pytest.raises(FileExistsError, match="junk"):
        S.ensure_default_dataset(tmp_path / "junk")


def test_cli(tmp_path, capsys):
    out = tmp_path / "cli"
    assert (
        S.main(
            [
                "--out",
                str(out),
                "--videos",
                "3",
                "--frames",
                "3",
                "--height",
                "32",
                "--width",
                "40",
                "--classes",
                "4",
                "--seed",
                "1",
            ]
        )
        == 0
    )
    assert S.is_dataset(out) and len(vio.read_split(out, "val")) == 1
    assert S.main(["--out", str(out), "--videos", "3"]) == 2
    assert "not empty" in capsys.readouterr().err
