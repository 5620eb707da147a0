"""vss/io.py (VSPW layout, label shift, PNG/JPEG/video I/O) and vss/data.py (clip sampling,
transforms, targets, collate, the training dataset)."""

from __future__ import annotations

import json
import os
from pathlib import Path
import pickle
import stat
import subprocess
import sys

import cv2
import numpy as np
from PIL import Image
import pytest
import torch

from vss import data as D
from vss import io as vio
from vss.config import DataConfig

# Colours far apart in RGB, so a pixel's class can be read back from its colour.
PALETTE = np.array([[255, 0, 0], [0, 255, 0], [0, 0, 255], [255, 255, 0], [0, 255, 255], [255, 0, 255]], np.uint8)


def make_dataset(root: Path, videos: dict[str, int], size=(40, 48), num_classes=6, seed=0, classes_json=True) -> Path:
    """A tiny VSPW-layout dataset: frame j of a video has blocky class regions; the image colour
    is PALETTE[class] (so alignment can be checked), masks are raw (k+1), a void stripe = 255,
    a stripe of "others" = 0. Frame file numbers start at 7 to check sorting."""
    rng = np.random.default_rng(seed)
    h, w = size
    for name, t_len in videos.items():
        (root / "data" / name / "origin").mkdir(parents=True)
        (root / "data" / name / "mask").mkdir()
        for j in range(t_len):
            blocks = rng.integers(0, num_classes, (h // 8 + 1, w // 8 + 1))
            cls = np.kron(blocks, np.ones((8, 8), int))[:h, :w]
            raw = (cls + 1).astype(np.uint8)
            raw[:, :2] = 255
            raw[:2, :] = 0
            img = PALETTE[cls % len(PALETTE)]
            stem = f"{7 + j:05d}"
            cv2.imwrite(str(root / "data" / name / "origin" / f"{stem}.png"), cv2.cvtColor(img, cv2.COLOR_RGB2BGR))
            cv2.imwrite(str(root / "data" / name / "mask" / f"{stem}.png"), raw)
    (root / "train.txt").write_text("".join(f"{n}\n" for n in videos))
    if classes_json:
        (root / "classes.json").write_text(
            json.dumps({"classes": [f"c{k}" for k in range(num_classes)], "palette": PALETTE[:num_classes].tolist()})
        )
    return root


# ---------------------------------------------------------------------------- label shift


def test_shift_labels_every_value():
    raw = np.arange(256, dtype=np.uint8).reshape(16, 16)
    want = np.array([255 if v in (0, 255) else v - 1 for v in range(256)], np.uint8).reshape(16, 16)
    got = vio.shift_labels(raw)
    assert got.dtype == np.uint8
    np.testing.assert_array_equal(got, want)
    assert vio.shift_labels(np.array([0, 1, 124, 125, 254, 255], np.uint8)).tolist() == [255, 0, 123, 124, 253, 255]
    with pytest.raises(ValueError):
        vio.shift_labels(np.array([1, 2], np.int64))


# ---------------------------------------------------------------------------- split files


def test_read_split_newlines_and_errors(tmp_path):
    (tmp_path / "a.txt").write_text("v1\nv2\n\nv3")  # no final newline: v3 must stay whole
    assert vio.read_split(tmp_path, "a") == ["v1", "v2", "v3"]
    (tmp_path / "b.txt").write_text("v1\r\nv2\n\n")
    assert vio.read_split(tmp_path, "b") == ["v1", "v2"]
    (tmp_path / "empty.txt").write_text("\n \n")
    with pytest.raises(ValueError, match="empty.txt"):
        vio.read_split(tmp_path, "empty")
    with pytest.raises(FileNotFoundError, match=str(tmp_path / "missing.txt")):
        vio.read_split(tmp_path, "missing")


# ---------------------------------------------------------------------------- frames, PNGs


def test_list_frames_sorted_and_errors(tmp_path):
    (tmp_path / "v" / "origin").mkdir(parents=True)
    with pytest.raises(ValueError, match=str(tmp_path / "v" / "origin")):
        vio.list_frames(tmp_path / "v")
    with pytest.raises(FileNotFoundError, match="mask"):
        vio.list_frames(tmp_path / "v", "mask")
    for n in ["00010.jpg", "00002.jpg", "notes.txt", "00001.png"]:
        (tmp_path / "v" / "origin" / n).write_bytes(b"x")
    assert [p.name for p in vio.list_frames(tmp_path / "v")] == ["00001.png", "00002.jpg", "00010.jpg"]


def test_label_png_round_trip_and_encodings(tmp_path, monkeypatch):
    real_open = Image.open

    def open_bytes_only(fp, *args, **kwargs):  # the file is read once, then decoded from its bytes
        assert not isinstance(fp, (str, os.PathLike)), f"PIL reads {fp} again"
        return real_open(fp, *args, **kwargs)

    monkeypatch.setattr(vio.Image, "open", open_bytes_only)
    rng = np.random.default_rng(0)
    lab = rng.integers(0, 11, (13, 17)).astype(np.uint8)
    lab[0, :] = 255
    pal = rng.integers(0, 256, (11, 3)).astype(np.uint8)
    path = tmp_path / "deep" / "dir" / "x.png"
    vio.write_label_png(path, lab, pal)
    np.testing.assert_array_equal(vio.read_label_png(path), lab)
    assert vio.read_label_png(path).flags.writeable  # PIL's buffer is wrapped read-only inside
    with real_open(path) as im:
        assert im.mode == "P"
        np.testing.assert_array_equal(np.array(im.getpalette()[:33]).reshape(11, 3), pal)
    assert [p.name for p in path.parent.iterdir()] == ["x.png"]  # no temp file left behind
    # grey PNG: values; colour PNG: the red channel (DVIS++ reads RGB and takes channel 0)
    cv2.imwrite(str(tmp_path / "g.png"), lab)
    np.testing.assert_array_equal(vio.read_label_png(tmp_path / "g.png"), lab)
    rgb = np.stack([lab, lab // 2 + 1, lab // 3 + 2], -1)
    cv2.imwrite(str(tmp_path / "c.png"), cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR))
    np.testing.assert_array_equal(vio.read_label_png(tmp_path / "c.png"), lab)


def test_corrupt_files_name_the_file(tmp_path):
    good = tmp_path / "good.png"
    vio.write_label_png(good, np.zeros((20, 20), np.uint8))
    bad = tmp_path / "bad.png"
    bad.write_bytes(good.read_bytes()[:40])  # truncated palette PNG
    with pytest.raises(ValueError, match="bad.png"):
        vio.read_label_png(bad)
    junk = tmp_path / "junk.png"
    junk.write_bytes(b"not a png at all")
    with pytest.raises(ValueError, match="junk.png"):
        vio.read_label_png(junk)
    with pytest.raises(FileNotFoundError, match="nope.png"):
        vio.read_label_png(tmp_path / "nope.png")
    with pytest.raises(ValueError, match="junk.png"):
        vio.read_frame(junk)


def test_atomic_writes_get_umask_permissions_and_keep_old_file_on_error(tmp_path):
    """Files come out as a plain open() would make them (0o666 minus the umask, not mkstemp's
    0600); a write that fails leaves the previous file and no temporary file."""
    old_umask = os.umask(0o027)
    try:
        path = tmp_path / "x.png"
        vio.write_label_png(path, np.zeros((3, 4), np.uint8))
        assert stat.S_IMODE(path.stat().st_mode) == 0o640
        vio.write_video(tmp_path / "v.mp4", [np.zeros((16, 16, 3), np.uint8)] * 2)
        assert stat.S_IMODE((tmp_path / "v.mp4").stat().st_mode) == 0o640
    finally:
        os.umask(old_umask)
    before = path.read_bytes()
    with pytest.raises(KeyboardInterrupt):
        with vio.atomic_path(path) as tmp:
            tmp.write_bytes(b"half a file")
            raise KeyboardInterrupt
    assert path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["v.mp4", "x.png"]


def test_load_class_names(tmp_path):
    names, pal = vio.load_class_names(tmp_path)  # no classes.json: the 124 VSPW classes
    assert len(names) == 124 and names[0] == "wall" and names[28] == "sky" and pal.shape == (124, 3)
    assert len({tuple(c) for c in pal}) == 124
    (tmp_path / "classes.json").write_text(json.dumps({"classes": ["a", "b"], "palette": [[1, 2, 3], [4, 5, 6]]}))
    names, pal = vio.load_class_names(tmp_path)
    assert names == ["a", "b"] and pal.tolist() == [[1, 2, 3], [4, 5, 6]]
    (tmp_path / "classes.json").write_text(json.dumps({"classes": ["a", "b"], "palette": [[1, 2, 3]]}))
    with pytest.raises(ValueError, match="classes.json"):
        vio.load_class_names(tmp_path)


# ---------------------------------------------------------------------------- normalisation


def test_normalize_matches_formula():
    cfg = DataConfig()
    x = np.random.default_rng(0).integers(0, 256, (2, 5, 7, 3)).astype(np.uint8)
    got = D.normalize(x, cfg)
    assert got.shape == (2, 3, 5, 7) and got.dtype == torch.float32
    want = (x.astype(np.float64) - np.array(cfg.pixel_mean)) / np.array(cfg.pixel_std)
    np.testing.assert_allclose(got.numpy(), want.transpose(0, 3, 1, 2), atol=1e-5)
    np.testing.assert_allclose(D.normalize(torch.from_numpy(x), cfg).numpy(), got.numpy())


# ---------------------------------------------------------------------------- clip sampling


def test_clip_indices_consecutive_and_all_starts():
    starts = set()
    for s in range(300):
        idx = D.sample_clip_indices(10, 4, np.random.default_rng(s))
        assert idx == list(range(idx[0], idx[0] + 4))
        starts.add(idx[0])
    assert starts == set(range(7))  # every window, including the last one
    assert D.sample_clip_indices(5, 5, np.random.default_rng(0)) == [0, 1, 2, 3, 4]
    assert all(len(D.sample_clip_indices(7, 1, np.random.default_rng(s))) == 1 for s in range(5))
    assert {D.sample_clip_indices(3, 1, np.random.default_rng(s))[0] for s in range(100)} == {0, 1, 2}


def test_clip_indices_short_video_padding():
    for s in range(50):
        idx = D.sample_clip_indices(3, 8, np.random.default_rng(s))
        assert len(idx) == 8 and idx == sorted(idx) and set(idx) == {0, 1, 2}
        app = D.sample_clip_indices(3, 8, np.random.default_rng(s), pad_order="append")
        assert app[:3] == [0, 1, 2] and sorted(app) == idx  # same draws, released DVIS++ order
    assert D.sample_clip_indices(1, 4, np.random.default_rng(0)) == [0, 0, 0, 0]


def test_evaluate_and_io_do_not_import_torch():
    """evaluate.py and vss.io (layout, PNG/JPEG decoding) run without importing torch; the
    training dataset in vss.data is an ordinary torch Dataset class that pickles (workers)."""
    code = (
        "import sys; import evaluate, vss.io; assert 'torch' not in sys.modules, 'torch imported'; "
        "import pickle, torch; from vss.data import VSPWDataset; "
        "assert issubclass(VSPWDataset, torch.utils.data.Dataset); "
        "assert pickle.loads(pickle.dumps(VSPWDataset)) is VSPWDataset"
    )
    repo = Path(__file__).resolve().parents[1]
    proc = subprocess.run([sys.executable, "-c", code], cwd=repo, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr


def test_dataset_short_video_reversal_and_reproducibility(tmp_path):
    root = make_dataset(tmp_path, {"short": 3, "long": 9})
    cfg = DataConfig(base_size=40, min_scale=1.0, max_scale=1.0, crop_size=(40, 48), color_jitter=0.0)
    ds = D.VSPWDataset(root, "train", num_frames=5, cfg=cfg, augment=False, length=6)
    assert len(ds) == 6 and ds.num_classes == 6
    item = ds.load_clip(0, np.random.default_rng(1))
    assert item["video"] == "short" and item["frames"].shape == (5, 3, 40, 48) and item["labels"].shape == (5, 40, 48)
    assert item["frame_idx"] == sorted(item["frame_idx"]) and set(item["frame_idx"]) == {0, 1, 2}
    assert item["frame_names"] == [f"{7 + k:05d}" for k in item["frame_idx"]]
    copy = pickle.loads(pickle.dumps(ds))  # as DataLoader workers receive it
    assert type(copy) is D.VSPWDataset and isinstance(copy, torch.utils.data.Dataset)
    assert torch.equal(copy.load_clip(0, np.random.default_rng(1))["frames"], item["frames"])
    # repeated frames are the same picture
    i0 = item["frame_idx"].index(0)
    assert torch.equal(item["labels"][i0], item["labels"][item["frame_idx"].index(0, i0)])
    ds_rev = D.VSPWDataset(root, "train", num_frames=4, cfg=cfg, augment=False, reverse_prob=1.0)
    rev = ds_rev.load_clip(1, np.random.default_rng(2))
    fwd = D.VSPWDataset(root, "train", num_frames=4, cfg=cfg, augment=False).load_clip(1, np.random.default_rng(2))
    assert rev["video"] == "long" and rev["frame_idx"] == fwd["frame_idx"][::-1]
    assert torch.equal(rev["labels"], fwd["labels"].flip(0)) and torch.equal(rev["frames"], fwd["frames"].flip(0))
    # labels are the shifted raw values: 255 stripe (void) and 0 stripe (others) both ignored
    assert (fwd["labels"][:, :, :2] == 255).all() and (fwd["labels"][:, :2, :] == 255).all()
    # reproducible through torch.manual_seed, different for another seed
    ds_aug = D.VSPWDataset(root, "train", num_frames=4, cfg=DataConfig(base_size=40, crop_size=(32, 32)))
    torch.manual_seed(5)
    a = ds_aug[1]
    torch.manual_seed(5)
    b = ds_aug[1]
    torch.manual_seed(6)
    c = ds_aug[1]
    assert torch.equal(a["frames"], b["frames"]) and torch.equal(a["labels"], b["labels"])
    assert not torch.equal(a["frames"], c["frames"])


# ---------------------------------------------------------------------------- transforms


def _unnormalize(x: torch.Tensor, cfg: DataConfig) -> np.ndarray:
    mean, std = np.array(cfg.pixel_mean), np.array(cfg.pixel_std)
    return x.permute(0, 2, 3, 1).numpy() * std + mean  # (T,H,W,3)


def test_transform_keeps_frames_and_labels_aligned():
    rng = np.random.default_rng(0)
    t_len, h, w = 3, 48, 64
    cls = np.stack([np.kron(rng.integers(0, 6, (6, 8)), np.ones((8, 8), int)) for _ in range(t_len)])  # (T,H,W)
    frames = PALETTE[cls]
    labels = cls.astype(np.uint8)
    cfg = DataConfig(base_size=48, min_scale=0.5, max_scale=2.0, crop_size=(40, 56), color_jitter=0.0)
    flips, padded = 0, 0
    for s in range(40):
        tf = D.sample_clip_transform(np.random.default_rng(s), (h, w), cfg)
        x, y = D.apply_clip_transform(frames, labels, tf, cfg)
        assert x.shape == (t_len, 3, 40, 56) and y.shape == (t_len, 40, 56) and y.dtype == torch.int64
        flips += tf.flip
        img = _unnormalize(x, cfg)
        y = y.numpy()
        # pixels whose 3x3 neighbourhood has one class (away from block and crop boundaries)
        pad = np.pad(y, ((0, 0), (1, 1), (1, 1)), constant_values=-1)
        uniform = np.ones_like(y, bool)
        for dy in range(3):
            for dx in range(3):
                uniform &= pad[:, dy : dy + y.shape[1], dx : dx + y.shape[2]] == y
        sel = uniform & (y != 255)
        assert sel.sum() > 300
        err = np.abs(img[sel] - PALETTE[y[sel]]).max()
        assert err < 3, f"seed {s}: colour/class mismatch {err}"
        ignored = y == 255
        if ignored.any():  # padding: ignore labels, zero (= mean) frames
            padded += 1
            assert np.abs(x.permute(0, 2, 3, 1).numpy()[ignored]).max() == 0
    assert 5 < flips < 35 and padded > 0


def test_color_jitter_same_for_all_frames():
    frame = np.random.default_rng(0).integers(0, 256, (16, 16, 3)).astype(np.uint8)
    frames = np.stack([frame, frame, frame])
    tf = D.ClipTransform(size=(16, 16), crop=(0, 0, 16, 16), brightness=1.2, contrast=0.8, saturation=1.3)
    x, _ = D.apply_clip_transform(frames, None, tf, DataConfig())
    assert torch.equal(x[0], x[1]) and torch.equal(x[1], x[2])
    plain, _ = D.apply_clip_transform(frames, None, D.ClipTransform(size=(16, 16), crop=(0, 0, 16, 16)), DataConfig())
    assert (x - plain).abs().max() > 0.1


# ---------------------------------------------------------------------------- targets, collate


def test_clip_targets_union_and_per_frame():
    lab = torch.full((3, 4, 5), 255, dtype=torch.int64)
    lab[0, :2] = 2
    lab[1, 1:3, 1:4] = 5
    lab[2, 3] = 0
    lab[0, 3, 4] = 5
    tg = D.clip_targets(lab)
    assert tg["labels"].tolist() == [0, 2, 5] and tg["labels"].dtype == torch.int64
    assert tg["masks"].shape == (3, 3, 4, 5) and tg["masks"].dtype == torch.bool
    for m, c in enumerate([0, 2, 5]):
        for t in range(3):
            assert torch.equal(tg["masks"][m, t], lab[t] == c)  # empty in frames without the class
    assert not tg["masks"][0, 0].any() and not tg["masks"][1, 2].any()
    f0 = D.per_frame_targets(tg, 0)
    assert f0["labels"].tolist() == [2, 5] and torch.equal(f0["masks"], torch.stack([lab[0] == 2, lab[0] == 5]))
    assert D.per_frame_targets(tg, 2)["labels"].tolist() == [0]
    empty = D.clip_targets(torch.full((2, 3, 3), 255, dtype=torch.int64))
    assert empty["labels"].shape == (0,) and empty["masks"].shape == (0, 2, 3, 3)
    assert D.per_frame_targets(empty, 1)["masks"].shape == (0, 3, 3)


def test_collate_pads_to_multiple_of_32():
    g = torch.Generator().manual_seed(0)
    items = []
    for i, (h, w) in enumerate([(40, 50), (33, 70)]):
        items.append(
            {
                "frames": torch.randn(2, 3, h, w, generator=g),
                "labels": torch.randint(0, 4, (2, h, w), generator=g),
                "video": f"v{i}",
                "frame_names": ["a", "b"],
                "frame_idx": [0, 1],
            }
        )
    b = D.collate_clips(items)
    assert set(b) == {"frames", "labels", "targets", "videos", "frame_names"}
    assert b["frames"].shape == (2, 2, 3, 64, 96) and b["labels"].shape == (2, 2, 64, 96)
    assert b["videos"] == ["v0", "v1"] and b["frame_names"] == [["a", "b"], ["a", "b"]]
    for i, it in enumerate(items):
        h, w = it["labels"].shape[-2:]
        assert torch.equal(b["frames"][i, :, :, :h, :w], it["frames"])
        assert torch.equal(b["labels"][i, :, :h, :w], it["labels"])
        assert (b["frames"][i, :, :, h:] == 0).all() and (b["frames"][i, :, :, :, w:] == 0).all()
        assert (b["labels"][i, :, h:] == 255).all() and (b["labels"][i, :, :, w:] == 255).all()
        tg = b["targets"][i]
        assert tg["masks"].shape[1:] == (2, 64, 96)
        for m, c in enumerate(tg["labels"].tolist()):
            assert torch.equal(tg["masks"][m], b["labels"][i] == c)
    assert D.collate_clips(items[:1], size_divisibility=32)["frames"].shape[-2:] == (64, 64)


# ---------------------------------------------------------------------------- dataset errors


def test_out_of_range_label_names_the_file(tmp_path):
    root = make_dataset(tmp_path, {"v": 2}, num_classes=6)
    bad = root / "data" / "v" / "mask" / "00008.png"
    raw = vio.read_label_png(bad)
    raw[5, 5] = 7  # raw 7 -> id 6, out of range for 6 classes
    cv2.imwrite(str(bad), raw)
    ds = D.VSPWDataset(root, "train", num_frames=2, augment=False)
    with pytest.raises(ValueError, match="00008.png"):
        ds.load_clip(0, np.random.default_rng(0))


def test_empty_frame_folder_names_the_folder(tmp_path):
    root = make_dataset(tmp_path, {"v": 2})
    for p in (root / "data" / "v" / "origin").iterdir():
        p.unlink()
    with pytest.raises(ValueError, match=str(root / "data" / "v" / "origin")):
        D.VSPWDataset(root, "train")


def test_iter_eval_videos(tmp_path):
    root = make_dataset(tmp_path, {"a": 2, "b": 3})
    (root / "data" / "b" / "mask" / "00009.png").unlink()
    vids = list(vio.iter_eval_videos(root, "train"))
    assert [v.name for v in vids] == ["a", "b"]
    name, frames, masks = vids[1]
    assert [f.name for f in frames] == ["00007.png", "00008.png", "00009.png"]
    assert [m.name if m else None for m in masks] == ["00007.png", "00008.png", None]
    import shutil

    shutil.rmtree(root / "data" / "a" / "mask")
    assert next(vio.iter_eval_videos(root, "train")).masks is None


def test_camvid_layout_loads(shared_dir):
    root = shared_dir / "data" / "camvid_vspw"
    if not root.is_dir():
        pytest.skip(f"{root} absent")
    ds = D.VSPWDataset(
        root, "val", num_frames=2, cfg=DataConfig(base_size=120, min_scale=1.0, max_scale=1.0, crop_size=(96, 128))
    )
    assert ds.num_classes == 11
    item = ds.load_clip(0, np.random.default_rng(0))
    lab = item["labels"]
    assert item["frames"].shape == (2, 3, 96, 128)
    valid = lab[lab != 255]
    assert valid.numel() > 0.5 * lab.numel() and valid.max() < 11


# ---------------------------------------------------------------------------- videos


def test_read_write_video_file_and_folder(tmp_path):
    frames = []
    for t in range(6):
        f = np.zeros((48, 64, 3), np.uint8)
        f[:, :, 0] = 40 * t
        f[8:24, 8 + 4 * t : 24 + 4 * t] = (255, 255, 255)
        frames.append(f)
    path = tmp_path / "out" / "v.mp4"
    vio.write_video(path, frames, fps=12)
    assert [p.name for p in path.parent.iterdir()] == ["v.mp4"]
    got, names, fps = vio.read_video(path)
    assert len(got) == 6 and got[0].shape == (48, 64, 3) and names[0] == "00000" and fps == pytest.approx(12)
    for a, b in zip(got, frames):
        assert np.abs(a.astype(int) - b).mean() < 12  # lossy codec, same pictures in the same order
    folder = tmp_path / "frames"
    folder.mkdir()
    for t in [3, 1, 2]:
        cv2.imwrite(str(folder / f"{t:03d}.png"), cv2.cvtColor(frames[t], cv2.COLOR_RGB2BGR))
    got, names, fps = vio.read_video(folder)
    assert names == ["001", "002", "003"] and fps == vio.DEFAULT_FPS
    np.testing.assert_array_equal(got[0], frames[1])
    (tmp_path / "bad.mp4").write_bytes(b"\x00" * 100)
    with pytest.raises(ValueError, match="bad.mp4"):
        vio.read_video(tmp_path / "bad.mp4")
    with pytest.raises(FileNotFoundError, match="missing.mp4"):
        vio.read_video(tmp_path / "missing.mp4")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="empty"):
        vio.read_video(tmp_path / "empty")


def test_clip_indices_reference_rule_of_dvis_plus():
    """frame_range r: a reference frame and T-1 draws (with replacement) from the other frames within
    +-r, sorted (dataset_mapper_vss.py when 2r+1 != T, as CTVIS stage 1 samples 4 frames within 8)."""
    refs, spans = set(), set()
    for s in range(400):
        idx = D.sample_clip_indices(30, 4, np.random.default_rng(s), frame_range=8)
        assert len(idx) == 4 and idx == sorted(idx) and 0 <= idx[0] and idx[-1] < 30
        # some member (the reference) has every other member within 8 of it and distinct from it
        ok = [i for i in idx if all(abs(j - i) <= 8 for j in idx) and idx.count(i) == 1]
        assert ok, idx
        refs.update(ok)
        spans.add(idx[-1] - idx[0])
    assert refs >= {0, 29} and max(spans) > 8  # references cover the video; draws on both sides
    # one-frame video: the reference is repeated
    assert D.sample_clip_indices(1, 4, np.random.default_rng(0), frame_range=8) == [0, 0, 0, 0]
    # two frames: the other frame is always drawn
    assert D.sample_clip_indices(2, 3, np.random.default_rng(1), frame_range=8) in ([0, 1, 1], [0, 0, 1])


def test_rescaled_size_is_detectron2_resize_shortest_edge():
    assert D.rescaled_size(360, 480, 800, 1333) == (800, 1067)  # 1066.67 rounds up
    assert D.rescaled_size(480, 1920, 800, 1333) == (333, 1333)  # long side capped
    assert D.rescaled_size(360, 480, 240) == (240, 320)
    assert D.rescaled_size(2, 11, 3) == (3, 17)  # 16.5 -> 17 (int(x + 0.5)); round() would give 16


def test_clip_transform_short_side_choice_and_crop_kinds():
    cfg = DataConfig(short_sides=(480, 512, 800), max_size=1000, color_jitter=0.0, crop_size=(480, 640))
    sizes, crops = set(), []
    for s in range(200):
        tf = D.sample_clip_transform(np.random.default_rng(s), (360, 480), cfg, crop="none")
        assert tf.crop == (0, 0, *tf.size)  # the whole rescaled frame
        sizes.add(tf.size)
        tr = D.sample_clip_transform(np.random.default_rng(s), (360, 480), cfg, crop="range", crop_range=(600, 720))
        assert tr.size == tf.size  # the same draws up to the crop
        y0, x0, ch, cw = tr.crop
        nh, nw = tr.size
        assert min(nh, 600) <= ch <= min(nh, 720) and min(nw, 600) <= cw <= min(nw, 720)
        assert 0 <= y0 <= nh - ch and 0 <= x0 <= nw - cw
        crops.append((ch, cw))
    # 800 short side -> 1067 long side, capped at 1000 -> (750, 1000)
    assert sizes == {(480, 640), (512, 683), (750, 1000)}
    assert all(cw >= 600 for ch, cw in crops if ch == 480)  # a 480-high frame keeps its height
    assert len({c for c in crops if c[0] > 600}) > 10  # heights drawn in the range when the frame allows
    x, y = D.apply_clip_transform(
        np.zeros((2, 360, 480, 3), np.uint8),
        np.zeros((2, 360, 480), np.int64),
        D.sample_clip_transform(np.random.default_rng(3), (360, 480), cfg, crop="range"),
        cfg,
    )
    assert x.shape[0] == 2 and x.shape[-2:] == y.shape[-2:] and min(x.shape[-2:]) >= 480
    with pytest.raises(ValueError, match="crop must be"):
        D.sample_clip_transform(np.random.default_rng(0), (360, 480), cfg, crop="centre")
