"""evaluate.py: the official numbers of tests/data/vspw_synth through the CLI (1 and 2 workers),
prediction decoding, and one clear error line + exit code 2 for each kind of bad input."""

import json
from pathlib import Path
import subprocess
import sys

import cv2
import numpy as np
import pytest

import evaluate as ev
from vss import io as vio
from vss.io import write_label_png

REPO = Path(__file__).resolve().parents[1]


def _run_cli(*args, timeout=120):
    return subprocess.run(
        [sys.executable, str(REPO / "evaluate.py"), "--no-progress", *map(str, args)],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=timeout,
    )


@pytest.mark.parametrize("workers", [1, 2])
def test_cli_reproduces_official_numbers(test_data, tmp_path, workers):
    root = test_data / "vspw_synth"
    expected = json.loads((root / "expected.json").read_text())
    out = tmp_path / "res" / "metrics.json"
    proc = _run_cli(
        "--gt",
        root / "VSPW",
        "--pred",
        root / "pred",
        "--split",
        "val",
        "--vc",
        "8,16",
        "--workers",
        workers,
        "--json",
        out,
    )
    assert proc.returncode == 0, proc.stderr
    res = json.loads(out.read_text())
    for key in ("mIoU", "fwIoU", "pixel_acc", "VC8", "VC16"):
        assert res[key] == pytest.approx(expected[key], abs=1e-12), key
    assert res["VC8_windows"] == expected["VC8_windows"] and res["VC16_windows"] == expected["VC16_windows"]
    assert res["num_classes"] == 124 and res["num_videos"] == 7
    # per-video windows follow the official loop: T - n, and none when T <= n
    for video in res["per_video"].values():
        assert video["VC8_windows"] == max(video["frames"] - 8, 0)
        assert video["VC16_windows"] == max(video["frames"] - 16, 0)
    assert sum(v["VC8_windows"] for v in res["per_video"].values()) == 57
    assert res["per_video"]["vid_d_8"]["VC8"] is None  # NaN (no window) is written as null
    assert "mIoU" in proc.stdout and "VC16" in proc.stdout and "wall" in proc.stdout
    assert [p.name for p in out.parent.iterdir()] == ["metrics.json"]  # no temp file left behind


def test_include_last_window_option(test_data):
    root = test_data / "vspw_synth"
    res = ev.evaluate(root / "VSPW", root / "pred", "val", vc_sizes=(8,), include_last_window=True, progress=False)
    assert res["VC8_windows"] == 57 + 7  # every fixture video has T >= 8


# ------------------------------------------------------------------------------------------
# a tiny dataset for prediction decoding and bad input
# ------------------------------------------------------------------------------------------

K = 4


def make_set(root: Path, videos=("va", "vb"), frames=3, h=6, w=8) -> tuple[Path, Path]:
    """GT (raw encoding, grey PNG) and grey-PNG predictions that are exactly right."""
    rng = np.random.default_rng(0)
    gt_root, pred = root / "gt", root / "pred"
    for v in videos:
        for t in range(frames):
            raw = rng.integers(0, K + 1, (h, w)).astype(np.uint8)  # 0 = others
            raw[0, 0] = 255
            (gt_root / "data" / v / "mask").mkdir(parents=True, exist_ok=True)
            (pred / v).mkdir(parents=True, exist_ok=True)
            cv2.imwrite(str(gt_root / "data" / v / "mask" / f"{t + 5:05d}.png"), raw)
            p = np.where((raw == 0) | (raw == 255), 0, raw - 1).astype(np.uint8)
            cv2.imwrite(str(pred / v / f"{t + 5:05d}.png"), p)
    (gt_root / "val.txt").write_text("".join(f"{v}\n" for v in videos))
    return gt_root, pred


def _main(capsys, gt, pred, *extra):
    rc = ev.main(["--gt", str(gt), "--pred", str(pred), "--num-classes", str(K), "--no-progress", *extra])
    return rc, capsys.readouterr()


def test_palette_predictions_give_their_indices(tmp_path, capsys):
    gt, pred = make_set(tmp_path)
    for f in (pred / "va").iterdir():  # rewrite as palette PNGs: cv2 alone would expand the colours
        ids = cv2.imread(str(f), cv2.IMREAD_UNCHANGED)
        write_label_png(f, ids)
        np.testing.assert_array_equal(ev.read_prediction_png(f), ids)
    rc, out = _main(capsys, gt, pred, "--json", str(tmp_path / "r.json"))
    assert rc == 0, out.err
    res = json.loads((tmp_path / "r.json").read_text())
    assert res["mIoU"] == 1.0 and res["pixel_acc"] == 1.0


def test_colour_prediction_is_refused(tmp_path, capsys):
    gt, pred = make_set(tmp_path)
    bad = pred / "vb" / "00006.png"
    cv2.imwrite(str(bad), np.zeros((6, 8, 3), np.uint8))
    rc, out = _main(capsys, gt, pred)
    assert rc == 2 and str(bad) in out.err and "single-channel" in out.err


def _break(kind: str, gt: Path, pred: Path) -> str:
    """Damage the tiny set one way; return the text the error line must contain."""
    if kind == "missing_frame":
        (pred / "vb" / "00006.png").unlink()
        return str(pred / "vb" / "00006.png")
    if kind == "missing_video":
        for f in (pred / "vb").iterdir():
            f.unlink()
        (pred / "vb").rmdir()
        return str(pred / "vb")
    if kind == "wrong_size":
        cv2.imwrite(str(pred / "va" / "00007.png"), np.zeros((6, 9), np.uint8))
        return str(pred / "va" / "00007.png")
    if kind == "id_too_large":
        p = np.zeros((6, 8), np.uint8)
        p[3, 3] = K  # GT at (3,3) is valid or 'others'; make it valid
        raw = cv2.imread(str(gt / "data" / "va" / "mask" / "00005.png"), cv2.IMREAD_UNCHANGED)
        raw[3, 3] = 1
        cv2.imwrite(str(gt / "data" / "va" / "mask" / "00005.png"), raw)
        cv2.imwrite(str(pred / "va" / "00005.png"), p)
        return f"{pred / 'va' / '00005.png'}: prediction holds class id {K}"
    if kind == "corrupt_pred":
        (pred / "vb" / "00005.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\x00" * 40)
        return str(pred / "vb" / "00005.png")
    if kind == "corrupt_gt":
        (gt / "data" / "vb" / "mask" / "00007.png").write_bytes(b"not a png")
        return str(gt / "data" / "vb" / "mask" / "00007.png")
    if kind == "empty_split":
        (gt / "val.txt").write_text("\n")
        return str(gt / "val.txt")
    if kind == "video_without_frames":
        for f in (gt / "data" / "vb" / "mask").iterdir():
            f.unlink()
        return str(gt / "data" / "vb" / "mask")
    if kind == "missing_video_folder":
        (gt / "val.txt").write_text("va\nvc\n")
        return "vc"
    if kind == "gt_id_too_large":  # raw K+2 = train id K+1 on 3 pixels: more classes than --num-classes
        raw = cv2.imread(str(gt / "data" / "vb" / "mask" / "00006.png"), cv2.IMREAD_UNCHANGED)
        raw[1, :3] = K + 2
        cv2.imwrite(str(gt / "data" / "vb" / "mask" / "00006.png"), raw)
        return (
            f"{gt / 'data' / 'vb' / 'mask' / '00006.png'}: train ids [{K + 1}] (raw values [{K + 2}]) are out of "
            f"range for {K} classes (3 pixels)"
        )
    if kind == "empty_pred":
        (pred / "va" / "00006.png").write_bytes(b"")
        return f"prediction PNG {pred / 'va' / '00006.png'} is an empty file"
    if kind == "empty_gt":
        (gt / "data" / "va" / "mask" / "00005.png").write_bytes(b"")
        return f"label PNG {gt / 'data' / 'va' / 'mask' / '00005.png'} is an empty file"
    raise AssertionError(kind)


BAD = [
    "missing_frame",
    "missing_video",
    "wrong_size",
    "id_too_large",
    "corrupt_pred",
    "corrupt_gt",
    "empty_split",
    "video_without_frames",
    "missing_video_folder",
    "gt_id_too_large",
    "empty_pred",
    "empty_gt",
]


@pytest.mark.parametrize("kind", BAD)
def test_bad_input_one_line_exit_2(tmp_path, capsys, kind):
    gt, pred = make_set(tmp_path)
    rc, out = _main(capsys, gt, pred)
    assert rc == 0, out.err  # the intact set is fine
    must = _break(kind, gt, pred)
    rc, out = _main(capsys, gt, pred)
    assert rc == 2
    lines = out.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("evaluate.py: error:"), out.err
    assert must in lines[0]
    assert out.out == ""


@pytest.mark.parametrize("workers,kind", [(1, "corrupt_pred"), (2, "wrong_size")])
def test_bad_input_exit_code_of_the_process(tmp_path, workers, kind):
    """The real process exits 2 with one line (no traceback, no OpenCV log), also when a worker
    process fails."""
    gt, pred = make_set(tmp_path)
    must = _break(kind, gt, pred)
    proc = _run_cli("--gt", gt, "--pred", pred, "--num-classes", K, "--workers", workers)
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr and must in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1


def test_default_run_without_predictions_says_run_infer(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(ev, "DEFAULT_PRED", tmp_path / "runs" / "default" / "pred")
    assert ev.main([]) == 2
    err = capsys.readouterr().err
    assert "python infer.py" in err and str(tmp_path / "runs" / "default" / "pred") in err


def test_half_given_paths_is_a_usage_error(tmp_path):
    with pytest.raises(SystemExit) as e:
        ev.main(["--gt", str(tmp_path)])
    assert e.value.code == 2


def test_default_run_evaluates_the_synthetic_dataset(tmp_path, monkeypatch, capsys):
    """No --gt/--pred: the embedded synthetic dataset (rendered into $VSS_DATA) against
    runs/default/pred; perfect predictions score 1 and K comes from its classes.json."""
    from vss.io import list_frames, load_class_names, read_label_png, read_split, shift_labels
    from vss.synthetic import ensure_default_dataset

    monkeypatch.setenv("VSS_DATA", str(tmp_path / "data"))
    root = ensure_default_dataset()
    pred = tmp_path / "runs" / "default" / "pred"
    for video in read_split(root, "val"):
        for mask in list_frames(root / "data" / video, kind="mask"):
            ids = shift_labels(read_label_png(mask))
            ids[ids == 255] = 0
            write_label_png(pred / video / mask.name, ids)
    monkeypatch.setattr(ev, "DEFAULT_PRED", pred)
    assert ev.main(["--json", str(tmp_path / "r.json"), "--no-progress"]) == 0, capsys.readouterr().err
    res = json.loads((tmp_path / "r.json").read_text())
    assert res["mIoU"] == 1.0 and res["num_videos"] == len(read_split(root, "val"))
    assert res["num_classes"] == len(load_class_names(root)[0]) and res["config"]["gt"] == str(root)
    assert res["VC8_windows"] > 0 and res["VC8"] == 1.0  # the prediction is a function of the GT


def test_fewer_classes_than_the_data_is_refused(tmp_path, capsys):
    """--num-classes below the data's: the GT pixels of the extra classes are not dropped (which
    inflated mIoU to 100% for a 5-class run on 11-class data) but refused."""
    gt, pred = make_set(tmp_path)
    rc, out = (
        ev.main(["--gt", str(gt), "--pred", str(pred), "--num-classes", str(K - 1), "--no-progress"]),
        capsys.readouterr(),
    )
    assert rc == 2 and f"out of range for {K - 1} classes" in out.err and "pixels" in out.err


@pytest.mark.parametrize("workers", ["0", "-1"])
def test_workers_must_be_positive(tmp_path, workers):
    gt, pred = make_set(tmp_path)
    proc = _run_cli("--gt", gt, "--pred", pred, "--num-classes", K, "--workers", workers)
    assert proc.returncode == 2 and "--workers must be >= 1" in proc.stderr


# ------------------------------------------------------------------------------------------
# the plain-PNG fast path of the decoders
# ------------------------------------------------------------------------------------------


def _chunk(kind: bytes, body: bytes) -> bytes:
    import struct
    import zlib

    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))


def _unfiltered_grey_png(label: np.ndarray) -> bytes:
    """An 8-bit grey PNG with every row unfiltered, written by hand (no library writes one)."""
    import struct
    import zlib

    h, w = label.shape
    rows = np.concatenate([np.zeros((h, 1), np.uint8), label], axis=1)  # filter type 0 on each row
    return (
        b"\x89PNG\r\n\x1a\n"
        + _chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 0, 0, 0, 0))
        + _chunk(b"IDAT", zlib.compress(rows.tobytes()))
        + _chunk(b"IEND", b"")
    )


def _png_variants(tmp_path: Path):
    """The same 37x23 label map (values 0..124 and 255) as PNGs of several kinds."""
    from PIL import Image

    rng = np.random.default_rng(0)
    label = rng.choice(np.r_[np.arange(125), 255], (23, 37)).astype(np.uint8)
    label[5:15, 3:30] = 7  # a flat region: long deflate matches
    files = {
        "palette": tmp_path / "palette.png",
        "grey_plain": tmp_path / "grey_plain.png",
        "grey_pil": tmp_path / "grey_pil.png",
        "grey_cv2": tmp_path / "grey_cv2.png",
        "grey16": tmp_path / "grey16.png",
    }
    write_label_png(files["palette"], label)  # PIL's palette PNGs: every row unfiltered
    files["grey_plain"].write_bytes(_unfiltered_grey_png(label))
    Image.fromarray(label, mode="L").save(files["grey_pil"])  # filtered rows
    cv2.imwrite(str(files["grey_cv2"]), label)  # filtered rows
    cv2.imwrite(str(files["grey16"]), label.astype(np.uint16) * 3)
    return label, files


def test_plain_png_fast_path_equals_the_library_decoders(tmp_path):
    """Unfiltered 8-bit palette and grey PNGs take the fast path and decode to exactly what
    PIL / cv2 give; filtered rows and 16 bits fall back to them, with the same values; an
    interlaced header is left to them too."""
    from vss.io import decode_png, read_label_png, shift_labels

    label, files = _png_variants(tmp_path)
    for kind, path in files.items():
        data = path.read_bytes()
        fast = vio.decode_plain_png(data)
        if kind in ("palette", "grey_plain"):
            assert fast is not None and fast.flags.c_contiguous, kind
            np.testing.assert_array_equal(fast, decode_png(data, path))
        else:
            assert fast is None, kind
        expected = label.astype(np.uint16) * 3 if kind == "grey16" else label
        np.testing.assert_array_equal(vio.read_prediction_png(path), expected)
        if kind != "grey16":
            np.testing.assert_array_equal(vio.read_shifted_label(path), shift_labels(read_label_png(path)))
    data = files["grey_plain"].read_bytes()  # IHDR at byte 8: length, type, 13 bytes, CRC
    ihdr = bytearray(data[12:29])
    ihdr[-1] = 1  # interlace method: Adam7
    assert vio.decode_plain_png(data[:8] + _chunk(bytes(ihdr[:4]), bytes(ihdr[4:])) + data[33:]) is None


def test_plain_png_broken_files_fall_back_to_the_library_decoders(tmp_path):
    """A flipped byte in the compressed data (chunk CRC), a cut file or a missing IEND give None
    from the fast path; the readers then do what the library decoder does with the file (PIL
    raises for some, decodes others), as before the fast path existed."""
    from vss.io import decode_png

    _, files = _png_variants(tmp_path)
    data = files["palette"].read_bytes()
    idat = data.index(b"IDAT")
    broken = {
        "flipped": data[: idat + 20] + bytes([data[idat + 20] ^ 0xFF]) + data[idat + 21 :],
        "cut": data[: idat + 30],
        "no_iend": data[: data.index(b"IEND") - 4],
    }
    raised = 0
    for kind, blob in broken.items():
        assert vio.decode_plain_png(blob) is None, kind
        path = tmp_path / f"{kind}.png"
        path.write_bytes(blob)
        try:
            expected = decode_png(blob, path)
        except ValueError:
            raised += 1
            for reader in (vio.read_prediction_png, vio.read_shifted_label):
                with pytest.raises(ValueError, match=str(path)):
                    reader(path)
        else:
            np.testing.assert_array_equal(vio.read_prediction_png(path), expected)
    assert raised >= 1  # the cut file at least
