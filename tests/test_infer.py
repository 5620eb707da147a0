"""infer.py: plain inference, TTA (vote / mean), ensembles with entropies, aggregation, video files
with overlays, the VLM hook, the existing-output rule and bad input, on a tiny checkpoint fitted
in a fixture and a small rendered synthetic dataset. Expected labels are recomputed here from
predict_video (frames resized and views built by hand), so wiring mistakes in infer.py fail."""

import functools
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
import json
import os
from pathlib import Path
import shutil
import threading

import cv2
import numpy as np
from PIL import Image
import pytest
import torch
import torch.nn.functional as F

import evaluate
import infer
from vss.checkpoint import load_checkpoint, save_checkpoint
from vss.config import Config, tiny
from vss.data import normalize
from vss.io import read_frame, read_label_png, shift_labels, write_label_png
from vss.segmenter import semantic_inference
from vss.semi import pixel_entropy
from vss.synthetic import render_dataset, render_video
from vss.tta import tta_views, view_priority, vote
from vss.video_model import build_video_model, predict_video

K = 4  # sky, grass, road, car
H0, W0 = 48, 64
TEST_SIZE = 40  # frames are predicted at 40x53 and labels resized back to 48x64


def tiny_config(num_classes: int = K) -> Config:
    cfg = tiny()
    m = cfg.model
    m.num_classes, m.resnet_width, m.conv_dim, m.mask_dim = num_classes, 16, 32, 32
    m.enc_layers, m.enc_ffn_dim, m.enc_heads, m.enc_points = 1, 64, 2, 2
    m.hidden_dim, m.num_queries, m.nheads, m.dim_feedforward, m.dec_layers = 32, 8, 2, 64, 2
    cfg.data.test_size = TEST_SIZE
    return cfg


def _fit_decoder(model, root: Path, cfg: Config, steps: int = 60) -> None:
    """A few Adam steps of the transformer decoder on per-pixel NLL of the semantic scores
    (backbone + pixel decoder frozen and run once), so predictions are not one constant class."""
    seg = model.segmenter
    vdir = root / "data" / (root / "train.txt").read_text().split()[0]
    frames = sorted((vdir / "origin").glob("*.jpg"))[:3]
    images = np.stack([read_frame(p) for p in frames])
    labels = torch.from_numpy(
        np.stack([shift_labels(read_label_png(vdir / "mask" / f"{p.stem}.png")) for p in frames])
    ).long()
    x = F.pad(normalize(images, cfg.data), (0, 0, 0, 64 - H0))  # (3,3,64,64)
    with torch.no_grad():
        mask_features, multi_scale = seg.pixel_decoder(seg.backbone(x))
    opt = torch.optim.Adam(seg.transformer_decoder.parameters(), lr=3e-3)
    for _ in range(steps):
        out = seg.transformer_decoder(multi_scale, mask_features)
        masks = F.interpolate(out["pred_masks"], size=(64, 64), mode="bilinear", align_corners=False)[..., :H0, :]
        scores = semantic_inference(out["pred_logits"], masks)  # (3,K,H0,W0)
        probs = scores / scores.sum(1, keepdim=True).clamp_min(1e-6)
        loss = F.nll_loss(probs.clamp_min(1e-6).log(), labels, ignore_index=255)
        opt.zero_grad()
        loss.backward()
        opt.step()


def _save(path: Path, model, cfg: Config) -> Path:
    save_checkpoint(path, {"model": model.state_dict(), "config": cfg.to_dict(), "stage": "segmenter", "step": 1})
    return path


@pytest.fixture(scope="module")
def data_root(tmp_path_factory) -> Path:
    # named "synthetic" so that VSS_DATA=<parent> makes it the embedded default dataset
    root = tmp_path_factory.mktemp("vssdata") / "synthetic"
    render_dataset(
        root,
        num_videos=3,
        frames=(3, 4),
        height=H0,
        width=W0,
        num_classes=K,
        seed=3,
        splits={"train": 1 / 3, "val": 2 / 3},
    )
    return root


@pytest.fixture(scope="module")
def ckpts(data_root, tmp_path_factory) -> tuple[Path, Path]:
    """Two different tiny checkpoints: a fitted one and a perturbed copy."""
    cfg = tiny_config()
    torch.manual_seed(0)
    model = build_video_model(cfg, "segmenter")
    _fit_decoder(model, data_root, cfg)
    folder = tmp_path_factory.mktemp("ckpt")
    a = _save(folder / "a.pt", model, cfg)
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in model.segmenter.transformer_decoder.parameters():
            p.add_(0.3 * torch.randn(p.shape, generator=gen) * p.std().nan_to_num(0.1))
    return a, _save(folder / "b.pt", model, cfg)


def _infer(capsys, *args) -> tuple[int, str]:
    """Run infer.main in-process; (exit code, stderr)."""
    capsys.readouterr()
    code = infer.main([*map(str, args), "--no-progress", "--device", "cpu"])
    return code, capsys.readouterr().err


@pytest.fixture(scope="module")
def plain_a(ckpts, data_root, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("pred") / "a"
    assert (
        infer.main(
            [
                "--checkpoint",
                str(ckpts[0]),
                "--data",
                str(data_root),
                "--out",
                str(out),
                "--no-progress",
                "--device",
                "cpu",
            ]
        )
        == 0
    )
    return out


def _val_videos(root: Path) -> list[str]:
    return (root / "val.txt").read_text().split()


def _pngs(out: Path, video: str) -> np.ndarray:
    return np.stack([read_label_png(p) for p in sorted((out / video).glob("*.png"))])


def _resized(images: np.ndarray, scale: float = 1.0) -> np.ndarray:
    """Short side 48 -> round(scale * TEST_SIZE), computed here independently of vss.engine."""
    h = round(TEST_SIZE * scale)
    w = round(W0 * h / H0)
    return np.stack([cv2.resize(f, (w, h), interpolation=cv2.INTER_LINEAR) for f in images])


@functools.lru_cache(maxsize=4)
def _load(ckpt: Path):
    state = load_checkpoint(ckpt)
    cfg = Config.from_dict(state["config"])
    model = build_video_model(cfg, state["stage"])
    model.load_state_dict(state["model"])
    return model, cfg


def _view_probs(ckpt: Path, images: np.ndarray, scale: float = 1.0, flip: bool = False) -> torch.Tensor:
    """(T,K,H0,W0) probabilities of one TTA view, built by hand: the original frames resized to
    scale x the test size (not the test-size frames resized again)."""
    model, cfg = _load(ckpt)
    x = normalize(_resized(images, scale), cfg.data)  # (T,3,h,w), (40,53) at scale 1
    probs = predict_video(model, x.flip(-1) if flip else x, images.shape[1:3], return_probs=True)["probs"]
    return probs.flip(-1) if flip else probs


def _png_palette(path: Path) -> np.ndarray:
    return np.asarray(Image.open(path).getpalette(), np.uint8).reshape(-1, 3)


def _images(root: Path, video: str) -> np.ndarray:
    return np.stack([read_frame(p) for p in sorted((root / "data" / video / "origin").glob("*.jpg"))])


# --------------------------------------------------------------------------------------------


def test_default_run_writes_one_png_per_mask_and_evaluates(ckpts, data_root, plain_a, tmp_path, monkeypatch, capsys):
    run = tmp_path / "runs" / "default"
    run.mkdir(parents=True)
    (run / "last.pt").write_bytes(ckpts[0].read_bytes())
    monkeypatch.setattr(infer, "DEFAULT_CHECKPOINT", run / "last.pt")
    monkeypatch.setattr(infer, "DEFAULT_OUT", run / "pred")
    monkeypatch.setenv("VSS_DATA", str(data_root.parent))
    assert infer.main([]) == 0
    out = run / "pred"
    for video in _val_videos(data_root):
        masks = sorted((data_root / "data" / video / "mask").glob("*.png"))
        pngs = sorted((out / video).glob("*.png"))
        assert [p.name for p in pngs] == [m.name for m in masks]
        labels = _pngs(out, video)
        assert labels.shape == (len(masks), H0, W0) and labels.max() < K
        np.testing.assert_array_equal(labels, _pngs(plain_a, video))  # same weights, same labels
        # the labels are the model's, at the original size
        expected = _view_probs(ckpts[0], _images(data_root, video)).argmax(1).numpy()
        np.testing.assert_array_equal(labels, expected)
    assert len(np.unique(np.concatenate([_pngs(out, v).ravel() for v in _val_videos(data_root)]))) > 1
    report = json.loads((out / "report.json").read_text())
    assert set(report["videos"]) == set(_val_videos(data_root))
    assert all(v["views"] == 1 and v["frames"] > 0 and v["fps"] > 0 for v in report["videos"].values())
    assert evaluate.main(["--pred", str(out), "--gt", str(data_root), "--split", "val", "--no-progress"]) == 0


@pytest.mark.parametrize("merge", ["vote", "mean"])
def test_tta_matches_hand_built_views(ckpts, data_root, tmp_path, capsys, merge):
    out = tmp_path / merge
    code, err = _infer(
        capsys,
        "--checkpoint",
        ckpts[0],
        "--data",
        data_root,
        "--out",
        out,
        "--tta",
        "--tta-scales",
        "0.8,1.25",
        "--tta-merge",
        merge,
    )
    assert code == 0, err
    views = tta_views((0.8, 1.25), flip=True)
    for video in _val_videos(data_root):
        images = _images(data_root, video)
        probs = [_view_probs(ckpts[0], images, v.scale, v.flip) for v in views]  # V x (T,K,H0,W0)
        if merge == "mean":
            total = probs[0].clone()
            for p in probs[1:]:
                total += p
            expected = (total / len(views)).argmax(1)
        else:
            expected = vote(torch.stack([p.argmax(1) for p in probs]), view_priority(views))
        got = _pngs(out, video)
        assert got.max() < K
        np.testing.assert_array_equal(got, expected.numpy())
    report = json.loads((out / "report.json").read_text())
    assert all(v["views"] == 4 and v["merge"] == merge for v in report["videos"].values())


@pytest.mark.parametrize("merge", ["vote", "mean"])
def test_tta_single_view_equals_plain_inference(ckpts, data_root, plain_a, tmp_path, capsys, merge):
    out = tmp_path / "tta1"
    code, err = _infer(
        capsys,
        "--checkpoint",
        ckpts[0],
        "--data",
        data_root,
        "--out",
        out,
        "--tta",
        "--tta-scales",
        "1.0",
        "--no-tta-flip",
        "--tta-merge",
        merge,
    )
    assert code == 0, err
    for video in _val_videos(data_root):
        np.testing.assert_array_equal(_pngs(out, video), _pngs(plain_a, video))


def test_ensemble_of_one_model_twice_equals_the_model(ckpts, data_root, plain_a, tmp_path, capsys):
    out = tmp_path / "twice"
    code, err = _infer(capsys, "--ensemble", ckpts[0], ckpts[0], "--data", data_root, "--out", out)
    assert code == 0, err
    for video in _val_videos(data_root):
        np.testing.assert_array_equal(_pngs(out, video), _pngs(plain_a, video))


def test_ensemble_save_probs_writes_labels_and_entropy_of_the_mean(ckpts, data_root, tmp_path, capsys):
    out = tmp_path / "pseudo"
    code, err = _infer(
        capsys, "--checkpoint", ckpts[0], "--ensemble", ckpts[1], "--data", data_root, "--out", out, "--save-probs"
    )
    assert code == 0, err
    for video in _val_videos(data_root):
        images = _images(data_root, video)
        mean = (_view_probs(ckpts[0], images) + _view_probs(ckpts[1], images)) / 2  # (T,K,H0,W0)
        np.testing.assert_array_equal(_pngs(out, video), mean.argmax(1).numpy())
        files = sorted((out / video).glob("*.entropy.npy"))
        assert [f.name.split(".")[0] for f in files] == [p.stem for p in sorted((out / video).glob("*.png"))]
        entropy = np.stack([np.load(f) for f in files])
        assert entropy.dtype == np.float16 and entropy.shape == (len(images), H0, W0)
        expected = pixel_entropy(mean, dim=1).numpy()
        np.testing.assert_allclose(entropy.astype(np.float32), expected, rtol=2e-3, atol=2e-3)
        assert entropy.max() <= np.log(K) + 1e-2 and entropy.std() > 0
    report = json.loads((out / "report.json").read_text())
    assert all(v["members"] == [str(ckpts[0]), str(ckpts[1])] for v in report["videos"].values())


def test_video_file_round_trip_with_overlays(ckpts, tmp_path, capsys):
    images, _ = render_video(7, frames=5, height=H0, width=W0, num_classes=K)
    path = tmp_path / "clip.mp4"
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"mp4v"), 10.0, (W0, H0))
    for img in images:
        writer.write(cv2.cvtColor(img, cv2.COLOR_RGB2BGR))
    writer.release()
    cap = cv2.VideoCapture(str(path))
    decoded = []
    while (frame := cap.read())[0]:
        decoded.append(cv2.cvtColor(frame[1], cv2.COLOR_BGR2RGB))
    cap.release()
    out = tmp_path / "out"
    code, err = _infer(capsys, "--checkpoint", ckpts[0], "--video", path, "--out", out, "--overlay")
    assert code == 0, err
    labels = _pngs(out, "clip")
    assert labels.shape == (len(decoded), H0, W0) == (5, H0, W0)
    np.testing.assert_array_equal(labels, _view_probs(ckpts[0], np.stack(decoded)).argmax(1).numpy())
    assert len(list((out / "clip" / "overlay").glob("*.jpg"))) == len(decoded)
    cap = cv2.VideoCapture(str(out / "clip.overlay.mp4"))
    count = 0
    while cap.read()[0]:
        count += 1
    cap.release()
    assert count == len(decoded)
    # an overlay is the frame blended with the palette colour of its label
    overlay = cv2.cvtColor(cv2.imread(str(out / "clip" / "overlay" / "00000.jpg")), cv2.COLOR_BGR2RGB)
    palette = _png_palette(out / "clip" / "00000.png")
    blend = 0.5 * decoded[0].astype(float) + 0.5 * palette[labels[0]]
    # the JPEG error depends on the picture, so the expected blend goes through the same encoder
    # (quality 90); what is left is rounding. A wrong colour or label would cost tens of levels.
    bgr = cv2.cvtColor(np.round(blend).astype(np.uint8), cv2.COLOR_RGB2BGR)
    expected = cv2.imdecode(cv2.imencode(".jpg", bgr, [cv2.IMWRITE_JPEG_QUALITY, 90])[1], cv2.IMREAD_COLOR)
    error = np.abs(overlay.astype(float) - cv2.cvtColor(expected, cv2.COLOR_BGR2RGB)).mean()
    assert error < 1, error


def test_bad_inputs_exit_2_naming_the_file(ckpts, data_root, tmp_path, monkeypatch, capsys):
    code, err = _infer(capsys, "--checkpoint", tmp_path / "nope.pt", "--data", data_root, "--out", tmp_path / "o1")
    assert code == 2 and "nope.pt" in err
    monkeypatch.setattr(infer, "DEFAULT_CHECKPOINT", tmp_path / "runs" / "default" / "last.pt")
    code, err = _infer(capsys, "--data", data_root, "--out", tmp_path / "o2")
    assert code == 2 and "python train.py" in err and "last.pt" in err
    # a checkpoint of another number of classes than the dataset
    cfg = tiny_config(num_classes=K + 3)
    other = _save(tmp_path / "seven.pt", build_video_model(cfg, "segmenter"), cfg)
    code, err = _infer(capsys, "--checkpoint", other, "--data", data_root, "--out", tmp_path / "o3")
    assert code == 2 and "seven.pt" in err and str(K + 3) in err and str(K) in err and "classes.json" in err
    # an unreadable and a missing video
    bad = tmp_path / "bad.mp4"
    bad.write_bytes(b"this is not a video" * 100)
    code, err = _infer(capsys, "--checkpoint", ckpts[0], "--video", bad, "--out", tmp_path / "o4")
    assert code == 2 and "bad.mp4" in err
    code, err = _infer(capsys, "--checkpoint", ckpts[0], "--video", tmp_path / "gone.avi", "--out", tmp_path / "o5")
    assert code == 2 and "gone.avi" in err
    # a truncated checkpoint
    broken = tmp_path / "broken.pt"
    broken.write_bytes(ckpts[0].read_bytes()[:1000])
    code, err = _infer(capsys, "--checkpoint", broken, "--data", data_root, "--out", tmp_path / "o6")
    assert code == 2 and "broken.pt" in err
    assert not any((tmp_path / f"o{i}").exists() for i in range(1, 7))


def test_existing_output_rule(ckpts, data_root, tmp_path, capsys):
    out = tmp_path / "pred"
    args = ("--checkpoint", ckpts[0], "--data", data_root, "--out", out)
    assert _infer(capsys, *args)[0] == 0
    first, second = _val_videos(data_root)
    kept = sorted((out / second).glob("*.png"))
    stamps = [p.stat().st_mtime_ns for p in kept]
    lost = sorted((out / first).glob("*.png"))[-1]
    reference = read_label_png(lost)
    lost.unlink()  # an interrupted run
    code, err = _infer(capsys, *args)
    assert code == 0, err
    np.testing.assert_array_equal(read_label_png(lost), reference)  # completed
    assert [p.stat().st_mtime_ns for p in kept] == stamps  # the complete video was skipped
    # other settings: refused, the folder untouched; --overwrite clears it
    code, err = _infer(capsys, *args, "--tta", "--tta-scales", "1.0")
    assert code == 2 and "--overwrite" in err and "tta" in err and str(out) in err
    assert [p.stat().st_mtime_ns for p in kept] == stamps
    (out / "stray.txt").write_text("x")
    code, err = _infer(capsys, *args, "--tta", "--tta-scales", "1.0", "--overwrite")
    assert code == 0, err
    assert not (out / "stray.txt").exists()
    assert json.loads((out / "run.json").read_text())["settings"]["tta"]["scales"] == [1.0]
    # a folder that infer.py did not write is never deleted
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "keep.txt").write_text("x")
    code, err = _infer(capsys, "--checkpoint", ckpts[0], "--data", data_root, "--out", foreign, "--overwrite")
    assert code == 2 and (foreign / "keep.txt").exists()


def test_aggregate_preds_picks_the_consistent_folder_per_video(data_root, tmp_path, capsys):
    first, second = _val_videos(data_root)
    rng = np.random.default_rng(0)
    good_first, good_second = tmp_path / "A", tmp_path / "B"
    for video in (first, second):
        for mask in sorted((data_root / "data" / video / "mask").glob("*.png")):
            gt = shift_labels(read_label_png(mask))
            gt[gt == 255] = 0
            noise = rng.integers(0, K, gt.shape).astype(np.uint8)
            write_label_png(good_first / video / mask.name, gt if video == first else noise)
            write_label_png(good_second / video / mask.name, noise if video == first else gt)
    out = tmp_path / "agg"
    code, err = _infer(capsys, "--aggregate-preds", good_first, good_second, "--data", data_root, "--out", out)
    assert code == 0, err
    report = json.loads((out / "report.json").read_text())["videos"]
    assert report[first]["aggregation"]["choice"] == str(good_first)
    assert report[second]["aggregation"]["choice"] == str(good_second)
    for video, winner in ((first, good_first), (second, good_second)):
        scores = report[video]["aggregation"]["scores"]
        assert scores[str(winner)] > max(v for k, v in scores.items() if k != str(winner))
        np.testing.assert_array_equal(_pngs(out, video), _pngs(winner, video))
    assert evaluate.main(["--pred", str(out), "--gt", str(data_root), "--split", "val", "--no-progress"]) == 0


def test_aggregate_models_keeps_one_candidate_per_video(ckpts, data_root, plain_a, tmp_path, capsys):
    plain_b = tmp_path / "b"
    assert _infer(capsys, "--checkpoint", ckpts[1], "--data", data_root, "--out", plain_b)[0] == 0
    out = tmp_path / "agg"
    code, err = _infer(capsys, "--aggregate", ckpts[0], ckpts[1], "--data", data_root, "--out", out)
    assert code == 0, err
    report = json.loads((out / "report.json").read_text())["videos"]
    by_path = {str(ckpts[0]): plain_a, str(ckpts[1]): plain_b}
    for video, entry in report.items():
        scores = entry["aggregation"]["scores"]
        assert set(scores) == set(by_path)
        assert entry["aggregation"]["choice"] == max(scores, key=scores.get)
        np.testing.assert_array_equal(_pngs(out, video), _pngs(by_path[entry["aggregation"]["choice"]], video))


class _ChatHandler(BaseHTTPRequestHandler):
    def do_POST(self):  # noqa: N802 (http.server API)
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        self.server.requests.append(body)
        reply = {
            "id": "x",
            "object": "chat.completion",
            "created": 0,
            "model": body["model"],
            "choices": [
                {"index": 0, "finish_reason": "stop", "message": {"role": "assistant", "content": "It is grass."}}
            ],
        }
        data = json.dumps(reply).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args):
        pass


def test_vlm_relabels_the_group_region_and_hides_the_key(ckpts, data_root, plain_a, tmp_path, monkeypatch, capsys):
    server = ThreadingHTTPServer(("127.0.0.1", 0), _ChatHandler)
    server.requests = []
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    secret = "sk-test-SECRET0123456789abcdef"
    monkeypatch.setenv("OPENAI_API_KEY", secret)
    groups = tmp_path / "groups.json"
    groups.write_text(json.dumps([{"name": "green", "stuff": "ground", "classes": ["sky", "grass"]}]))
    url = f"http://127.0.0.1:{server.server_address[1]}/v1"
    try:
        # without --vlm nothing is sent
        code, _ = _infer(
            capsys,
            "--checkpoint",
            ckpts[0],
            "--data",
            data_root,
            "--out",
            tmp_path / "novlm",
            "--vlm-base-url",
            url,
            "--vlm-groups",
            groups,
        )
        assert code == 0 and server.requests == []
        out = tmp_path / "vlm"
        capsys.readouterr()
        code = infer.main(
            [
                "--checkpoint",
                str(ckpts[0]),
                "--data",
                str(data_root),
                "--out",
                str(out),
                "--vlm",
                "--vlm-base-url",
                url,
                "--vlm-groups",
                str(groups),
                "--vlm-model",
                "llava",
                "--no-progress",
                "--device",
                "cpu",
            ]
        )
        captured = capsys.readouterr()
    finally:
        server.shutdown()
        server.server_close()
    assert code == 0, captured.err
    assert secret not in captured.out + captured.err
    assert server.requests and all(r["model"] == "llava" for r in server.requests)
    report = json.loads((out / "report.json").read_text())["videos"]
    for video in _val_videos(data_root):
        before, after = _pngs(plain_a, video), _pngs(out, video)
        region = (before == 0) | (before == 1)  # sky or grass -> all grass
        np.testing.assert_array_equal(after[region], 1)
        np.testing.assert_array_equal(after[~region], before[~region])
        if region.any():
            assert report[video]["vlm"]["green"]["choice"] == "grass"
    assert list((out / "vlm_cache").glob("*.json"))  # answers cached


def test_existing_output_of_other_inputs_is_refused(ckpts, data_root, tmp_path, capsys):
    """Predictions in --out are reused only for the same inputs: another dataset whose video names
    match, another split, or changed frames is another run (refused; --overwrite redoes it)."""
    data_root = Path(shutil.copytree(data_root, tmp_path / "data" / "synthetic"))  # its frames get touched below
    out = tmp_path / "pred"
    assert _infer(capsys, "--checkpoint", ckpts[0], "--data", data_root, "--out", out)[0] == 0
    twin = tmp_path / "twin" / "synthetic"  # the same video names, other frames
    render_dataset(
        twin,
        num_videos=3,
        frames=(3, 4),
        height=H0,
        width=W0,
        num_classes=K,
        seed=4,
        splits={"train": 1 / 3, "val": 2 / 3},
    )
    code, err = _infer(capsys, "--checkpoint", ckpts[0], "--data", twin, "--out", out)
    assert code == 2 and "inputs" in err and "--overwrite" in err
    code, err = _infer(capsys, "--checkpoint", ckpts[0], "--data", data_root, "--split", "train", "--out", out)
    assert code == 2 and "inputs" in err
    frame = sorted((data_root / "data" / _val_videos(data_root)[0] / "origin").glob("*.jpg"))[0]
    os.utime(frame, ns=(frame.stat().st_atime_ns, frame.stat().st_mtime_ns + 10**9))  # a re-extracted frame
    code, err = _infer(capsys, "--checkpoint", ckpts[0], "--data", data_root, "--out", out)
    assert code == 2 and "inputs" in err
    assert _infer(capsys, "--checkpoint", ckpts[0], "--data", data_root, "--out", out, "--overwrite")[0] == 0


def test_truncated_and_empty_frames_are_refused(ckpts, data_root, tmp_path, capsys):
    """A JPEG cut short (cv2.imread would return it half grey with only a libjpeg warning) and an
    empty frame file: a named error, exit 2."""
    folder = tmp_path / "clip"
    folder.mkdir()
    frames = sorted((data_root / "data" / _val_videos(data_root)[0] / "origin").glob("*.jpg"))
    for f in frames:
        shutil.copy(f, folder / f.name)
    data = frames[1].read_bytes()
    (folder / frames[1].name).write_bytes(data[: len(data) * 2 // 3])
    code, err = _infer(capsys, "--checkpoint", ckpts[0], "--video", folder, "--out", tmp_path / "o1")
    assert code == 2 and f"{folder / frames[1].name} is a truncated JPEG" in err
    (folder / frames[1].name).write_bytes(b"")
    code, err = _infer(capsys, "--checkpoint", ckpts[0], "--video", folder, "--out", tmp_path / "o2")
    assert code == 2 and f"{folder / frames[1].name} is an empty file" in err


@pytest.mark.parametrize("scales", ["inf", "nan", "0.001", "1.0,9", ""])
def test_tta_scales_out_of_range_are_a_usage_error(ckpts, data_root, tmp_path, capsys, scales):
    with pytest.raises(SystemExit) as e:
        infer.main(
            [
                "--checkpoint",
                str(ckpts[0]),
                "--data",
                str(data_root),
                "--out",
                str(tmp_path / "o"),
                "--tta",
                "--tta-scales",
                scales,
            ]
        )
    assert e.value.code == 2 and "scales must be in 0.25..4.0" in capsys.readouterr().err
