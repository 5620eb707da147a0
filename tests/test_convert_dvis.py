"""DVIS++ checkpoints in vss: the converter (safe reading, renaming, strict checking, CLI), and
vss's modules against the original DVIS_Plus code.

Fixtures (``../shared/fixtures/README.md``): ``dvis_plus_official.npz`` holds the original
DVIS_Plus R50 VSPW model at small dimensions (state dict under the original names), inputs and
every output of its pixel decoder, segmenter, tracker, refiner and VSS inference; the tests that
need it skip without ../shared. ``tests/data/dvis_plus_tracker_subset.npz`` (made from it by
``tests/data/make_dvis_subset.py``) keeps the tracker and part C and runs everywhere;
``tests/data/dvis_plus_{r50,vitl}_vspw_keys.json`` are the key -> shape layouts of the real-size
DVIS++ VSPW models as the original code builds them.

Tolerances are the fixture's: atol 1e-4 on features / embeddings / logits, 3e-4 on mask logits
(the original moves by up to 1e-5 / 3e-5 just from batching frames differently), slot indices
exact, label maps exact wherever the top-2 margin of the fixture's score volume is >= 1e-4.
"""

import json
from pathlib import Path
import pickle

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import infer
import train
from vss.backbone import load_backbone_weights, ResNet
from vss.checkpoint import load_checkpoint
from vss.config import Config, r50, vitl
from vss.convert_dvis import (
    check_keys,
    convert,
    convert_state_dict,
    detect_preset,
    detect_stage,
    expected_shapes,
    main,
    read_source,
    rename_key,
    RestrictedUnpickler,
)
from vss.data import normalize
from vss.io import read_frame, read_label_png
from vss.synthetic import render_dataset
from vss.video_model import (
    _frame_scores,
    _PaddedVideo,
    _segmenter_mask_features,
    _video_level_classes,
    build_video_model,
    predict_video,
)

ATOL, ATOL_MASK, MARGIN = 1e-4, 3e-4, 1e-4
WINDOWS = [(0, 3), (3, 5)]  # WINDOW_SIZE 3 over T = 5 frames
KEY_CONFIGS = {  # DVIS++ config -> the vss stage its checkpoint becomes
    "CTVIS": "segmenter",
    "DVIS_Plus_Online": "tracker",
    "DVIS_Plus_Offline": "refiner",
}


def fixture_config() -> Config:
    """vss config of the fixture's model (its ``meta.dims``: DVIS_Plus_Offline_R50.yaml with small
    dims; detectron2 ResNet-50 with stem 16, bottleneck 8, res2 64)."""
    cfg = Config(name="dvis_fixture")
    m = cfg.model
    m.num_classes, m.backbone, m.frozen_bn = 5, "resnet50", True
    m.resnet_width, m.resnet_stem_channels, m.resnet_res2_channels = 8, 16, 64
    m.conv_dim = m.mask_dim = m.hidden_dim = 64
    m.enc_layers, m.enc_ffn_dim, m.enc_heads, m.enc_points = 2, 1024, 4, 4
    m.num_queries, m.nheads, m.dim_feedforward, m.dec_layers, m.reid_hidden_dim = 10, 4, 128, 3, 256
    m.tracker_layers = m.refiner_layers = 2
    m.video_ffn_dim, m.window_size = 128, 3
    return cfg


def _tensors(z, prefix: str) -> dict:
    return {k[len(prefix) :]: torch.from_numpy(z[k]) for k in z.keys() if k.startswith(prefix)}


def _close(actual, expected, atol=ATOL, name=""):
    torch.testing.assert_close(actual.float(), torch.as_tensor(expected).float(), rtol=0, atol=atol, msg=name)


def _bctq(x):
    """vss (B,T,Q,C) -> the original's (B,C,T,Q)."""
    return x.permute(0, 3, 1, 2)


def _bqthw(x):
    """vss (B,T,Q,h,w) -> the original's (B,Q,T,h,w)."""
    return x.transpose(1, 2)


def _vss_labels(class_probs, masks_qthw, z):
    """The VSS label map from (Q,K) class probabilities and (Q,T,h,w) mask logits, by vss's merge
    (``_frame_scores``), and the top-2 margin of the scores."""
    valid, padded, out = (tuple(int(v) for v in z[f"in/{k}"]) for k in ("img_size", "first_resize_size", "out_hw"))
    scores = torch.stack(
        [
            _frame_scores(class_probs, masks_qthw[:, t], padded, valid, out, sigmoid_first=True)
            for t in range(masks_qthw.shape[1])
        ],
        dim=1,
    )  # (K,T,H,W)
    top2 = scores.topk(2, dim=0).values
    return scores.argmax(0), top2[0] - top2[1]


def _probs(logits):
    return logits.softmax(-1)[..., :-1]


def _assert_labels(labels, class_probs, masks_qthw, z, expected, name):
    """labels equal the original's wherever the margin of the original's own scores is >= 1e-4."""
    _, margin = _vss_labels(class_probs, masks_qthw, z)
    sure = margin >= MARGIN
    assert sure.float().mean() > 0.99, name
    expected = torch.as_tensor(expected)
    assert torch.equal(labels[sure], expected[sure]), f"{name}: {(labels[sure] != expected[sure]).sum()} pixels"


def _run_tracker(tracker, embds, embds_no_norm, mask_features):
    """The original's window inference of the tracker: windows of 3 frames, resume after the
    first. Inputs in the original layout; returns the concatenated vss outputs (B,T,...)."""
    e, k = embds.permute(0, 2, 3, 1), embds_no_norm.permute(0, 2, 3, 1)  # (1,C,T,Q) -> (1,T,Q,C)
    mf = mask_features[None]  # (1,T,D,h,w)
    state, outs = None, []
    for s, t in WINDOWS:
        out, state = tracker(e[:, s:t], k[:, s:t], mf[:, s:t], state, all_layers=False)
        outs.append(out)
    return {key: torch.cat([o[key] for o in outs], dim=1) for key in outs[0] if key != "aux_outputs"}


def _check_tracker(out, z, part):
    _close(out["pred_logits"], z[f"{part}/trk/pred_logits"], name="pred_logits")
    _close(_bqthw(out["pred_masks"]), z[f"{part}/trk/pred_masks"], ATOL_MASK, "pred_masks")
    _close(_bctq(out["pred_embds"]), z[f"{part}/trk/pred_embds"], name="pred_embds")
    _close(_bctq(out["pred_references"]), z[f"{part}/trk/pred_references"], name="pred_references")
    assert torch.equal(out["indices"][0], torch.from_numpy(z[f"{part}/trk/indices"]))


def _online_labels(out, z, part):
    """DVIS_Plus_online's VSS: class = softmax of the mean tracker logits over T."""
    pred_cls = out["pred_logits"][0].mean(0)  # (Q,K+1)
    _close(pred_cls, z[f"{part}/vss_on/pred_cls"], name="vss_on/pred_cls")
    labels, _ = _vss_labels(_probs(pred_cls), _bqthw(out["pred_masks"])[0], z)
    _assert_labels(
        labels,
        _probs(torch.from_numpy(z[f"{part}/vss_on/pred_cls"])),
        torch.from_numpy(z[f"{part}/vss_on/pred_masks"]),
        z,
        z[f"{part}/vss_on/labels"],
        "vss_on",
    )


# --------------------------------------------------------------------------------------------
# Equality with the original code
# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def official(shared_dir):
    return np.load(shared_dir / "fixtures" / "dvis_plus_official.npz")


@pytest.fixture(scope="module")
def fixture_model(official):
    """vss's offline model with the fixture's weights, converted from the original names."""
    model = build_video_model(fixture_config(), "refiner").eval()
    model.load_state_dict(convert_state_dict(_tensors(official, "sd/")), strict=True)
    return model


def test_fixture_config_is_the_fixture_meta(official):
    dims = json.loads(official["meta"].item())["dims"]
    m = fixture_config().model
    assert (m.num_classes, m.num_queries, m.hidden_dim, m.conv_dim, m.mask_dim, m.nheads) == (
        dims["num_classes"],
        dims["num_queries"],
        dims["hidden_dim"],
        dims["conv_dim"],
        dims["mask_dim"],
        dims["nheads"],
    )
    assert (m.dim_feedforward, m.dec_layers, m.enc_layers, m.enc_ffn_dim, m.reid_hidden_dim) == (
        dims["dim_feedforward"],
        dims["decoder_transformer_layers"],
        dims["pixel_decoder_enc_layers"],
        dims["pixel_decoder_dim_feedforward"],
        dims["reid_hidden_dim"],
    )
    assert (2 * m.hidden_dim, m.tracker_layers, m.refiner_layers, m.window_size) == (
        dims["tracker_hidden"],
        dims["tracker_layers"],
        dims["refiner_layers"],
        dims["window_size"],
    )


@pytest.mark.parametrize("all_layers", [False, True], ids=["inference", "all layers"])
def test_part_a_pixel_decoder_and_segmenter_match_the_original(official, fixture_model, all_layers):
    """Both decoder paths: inference (attention masks at the levels' sizes, last prediction only)
    and all layers (every prediction at stride 4, as the original computes them)."""
    z, seg = official, fixture_model.segmenter
    outs = []
    with torch.no_grad():
        for s, t in WINDOWS:
            feats = {f"res{i}": torch.from_numpy(z[f"in/feat_res{i}"][s:t]) for i in range(2, 6)}
            mask_features, multi_scale = seg.pixel_decoder(feats)
            outs.append((mask_features, multi_scale, seg.transformer_decoder(multi_scale, mask_features, all_layers)))
    _close(torch.cat([o[0] for o in outs]), z["a/pixdec/mask_features"], name="mask_features")
    for lvl in range(3):  # strides 32, 16, 8
        _close(torch.cat([o[1][lvl] for o in outs]), z[f"a/pixdec/multi_scale_features_{lvl}"], name=f"level {lvl}")

    def cat(get):
        return torch.cat([get(o[2]) for o in outs])  # over the N = T frames

    _close(cat(lambda o: o["pred_logits"])[None], z["a/seg/pred_logits"], name="pred_logits")
    _close(cat(lambda o: o["pred_masks"]).transpose(0, 1)[None], z["a/seg/pred_masks"], ATOL_MASK, "pred_masks")
    for key in ("pred_embds", "pred_embds_without_norm"):  # (N,Q,2D) -> (1,2D,T,Q)
        _close(cat(lambda o: o[key]).permute(2, 0, 1)[None], z[f"a/seg/{key}"], name=key)
    reid = cat(lambda o: o["pred_embds"])[..., fixture_config().model.hidden_dim :]
    _close(reid.permute(2, 0, 1)[None], z["a/seg/pred_reid_embed"], name="reid")
    assert ("aux_outputs" in outs[0][2]) == all_layers
    for j in range(3 if all_layers else 0):  # from the learnable queries, after layers 1 and 2
        _close(cat(lambda o: o["aux_outputs"][j]["pred_logits"])[None], z[f"a/seg/aux{j}/pred_logits"], name=f"aux{j}")
        _close(
            cat(lambda o: o["aux_outputs"][j]["pred_masks"]).transpose(0, 1)[None],
            z[f"a/seg/aux{j}/pred_masks"],
            ATOL_MASK,
            f"aux{j} masks",
        )


@pytest.mark.parametrize("part", ["a", "c"])
def test_tracker_refiner_and_vss_merge_match_the_original(official, fixture_model, part):
    """Part A: the segmenter's own outputs; part C: crafted queries permuted from frame to frame
    (the tracker must recover indices[t] = argsort(perms[t])[perms[0]])."""
    z = official
    src = "a/seg" if part == "a" else "c/in"
    embds, no_norm = (torch.from_numpy(z[f"{src}/{k}"]) for k in ("pred_embds", "pred_embds_without_norm"))
    mask_features = torch.from_numpy(z["a/pixdec/mask_features" if part == "a" else "c/in/mask_features"])
    with torch.no_grad():
        trk = _run_tracker(fixture_model.tracker, embds, no_norm, mask_features)
        # the refiner reads the segmenter's un-reordered no-norm queries and un-projected features
        ref = fixture_model.refiner(
            trk["pred_embds"], no_norm.permute(0, 2, 3, 1), mask_features[None], all_layers=False
        )
    _check_tracker(trk, z, part)
    if part == "c":
        perms = z["c/in/perms"]
        assert all((z["c/trk/indices"][t] == np.argsort(perms[t])[perms[0]]).all() for t in range(len(perms)))
    _close(ref["pred_logits"], z[f"{part}/ref/pred_logits"], name="ref logits")
    _close(_bqthw(ref["pred_masks"]), z[f"{part}/ref/pred_masks"], ATOL_MASK, "ref masks")
    _close(_bctq(ref["pred_embds"]), z[f"{part}/ref/pred_embds"], name="ref embds")
    # DVIS_Plus_offline's VSS: max of the refiner's and the tracker's class probabilities
    pred_cls, aux_cls = ref["pred_logits"][0].mean(0), trk["pred_logits"][0].mean(0)
    _close(pred_cls, z[f"{part}/vss_off/pred_cls"], name="vss_off/pred_cls")
    _close(aux_cls, z[f"{part}/vss_off/aux_pred_cls"], name="vss_off/aux_pred_cls")
    labels, _ = _vss_labels(torch.maximum(_probs(pred_cls), _probs(aux_cls)), _bqthw(ref["pred_masks"])[0], z)
    fixture_probs = torch.maximum(
        _probs(torch.from_numpy(z[f"{part}/vss_off/pred_cls"])),
        _probs(torch.from_numpy(z[f"{part}/vss_off/aux_pred_cls"])),
    )
    _assert_labels(
        labels,
        fixture_probs,
        torch.from_numpy(z[f"{part}/vss_off/pred_masks"]),
        z,
        z[f"{part}/vss_off/labels"],
        "vss_off",
    )
    _online_labels(trk, z, part)


def test_part_b_end_to_end_matches_the_original_forward(official, fixture_model):
    """uint8 frames -> normalised, padded batch -> ResNet -> ... -> label maps, through vss's
    own whole-video inference (``predict_video``) of the offline and the online model."""
    z, cfg = official, fixture_config()
    images = z["in/images_uint8"]  # (T,3,60,90)
    frames = normalize(images.transpose(0, 2, 3, 1), cfg.data)  # (T,3,60,90)
    out_hw = tuple(int(v) for v in z["in/out_hw"])
    online = build_video_model(cfg, "tracker").eval()
    online.load_state_dict({k: v for k, v in fixture_model.state_dict().items() if not k.startswith("refiner.")})
    with torch.no_grad():
        padded = F.pad(frames, (0, 6, 0, 4))  # to a multiple of 32: (T,3,64,96)
        _close(padded, z["b/backbone_input"], 0, "backbone input")
        feats = fixture_model.segmenter.backbone(padded)
        for name in ("res2", "res3", "res4", "res5"):
            _close(feats[name], z[f"b/backbone/{name}"], name=name)
        for model, kind in ((fixture_model, "off"), (online, "on")):
            labels = predict_video(model, frames, out_hw)["labels"]
            video = _PaddedVideo(frames, 3, 32, torch.device("cpu"), None)
            class_probs, mask_head = _video_level_classes(model, video)
            masks = torch.cat(
                [mask_head(s, t, _segmenter_mask_features(model.segmenter, video.load(s, t))) for s, t in video.windows]
            ).transpose(0, 1)  # (Q,T,h,w)
            expected_probs = _probs(torch.from_numpy(z[f"b/vss_{kind}/pred_cls"]))
            if kind == "off":
                expected_probs = torch.maximum(expected_probs, _probs(torch.from_numpy(z["b/vss_off/aux_pred_cls"])))
            _close(class_probs, expected_probs, name=f"{kind} class probabilities")
            _close(masks, z[f"b/vss_{kind}/pred_masks"], ATOL_MASK, f"{kind} masks")
            _assert_labels(
                labels,
                expected_probs,
                torch.from_numpy(z[f"b/vss_{kind}/pred_masks"]),
                z,
                z[f"b/vss_{kind}/labels"],
                f"b/vss_{kind}",
            )


def test_tracker_subset_in_the_repository_matches_the_original(test_data):
    """Runs on every clone: the tracker's weights and part C of the fixture (~2.3 MB)."""
    z = np.load(test_data / "dvis_plus_tracker_subset.npz")
    model = build_video_model(fixture_config(), "tracker").eval()
    tracker_state = {k: v for k, v in convert_state_dict(_tensors(z, "sd/")).items() if k.startswith("tracker.")}
    model.tracker.load_state_dict({k[len("tracker.") :]: v for k, v in tracker_state.items()}, strict=True)
    with torch.no_grad():
        inputs = (torch.from_numpy(z[f"c/in/{k}"]) for k in ("pred_embds", "pred_embds_without_norm", "mask_features"))
        out = _run_tracker(model.tracker, *inputs)
    _check_tracker(out, z, "c")
    perms = z["c/in/perms"]
    assert (out["indices"][0].numpy() != np.arange(perms.shape[1])).mean() > 0.5  # really permuted
    _online_labels(out, z, "c")


# --------------------------------------------------------------------------------------------
# Real-size key layouts
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("preset", ["r50", "vitl"])
def test_real_size_checkpoints_map_key_for_key(test_data, preset):
    """Every key of the real DVIS++ VSPW models (as the original code builds them) maps onto the
    vss preset with its shape; nothing missing, nothing left over (models built on meta)."""
    layouts = json.loads((test_data / f"dvis_plus_{preset}_vspw_keys.json").read_text())
    suffix = "R50" if preset == "r50" else "VitAdapterL"
    cfg = r50() if preset == "r50" else vitl()
    assert (cfg.model.num_classes, cfg.model.num_queries) == (124, 100 if preset == "r50" else 200)
    for name, stage in KEY_CONFIGS.items():
        layout = layouts[f"{name}_{suffix}"]
        with torch.device("meta"):
            source = {k: torch.empty(shape) for k, shape in layout.items()}
        state = convert_state_dict(source)
        assert detect_preset(state) == preset and detect_stage(state) == stage
        expected = expected_shapes(cfg, stage)
        check_keys(state, expected, name)
        dropped = {k for k in layout if rename_key(k) is None}
        assert dropped == {"criterion.empty_weight"}
        # every vss key comes from the file, except the counters FrozenBN does not store
        counters = {k for k in expected if k.endswith("num_batches_tracked") and k not in map(rename_key, layout)}
        assert len(state) - len(counters) == len(layout) - len(dropped)
        if preset == "vitl":
            assert expected["segmenter.backbone.vit.patch_embed.proj.weight"] == (1024, 3, 16, 16)
            assert not counters  # SyncBatchNorm keys carry their counters


# --------------------------------------------------------------------------------------------
# Reading files safely, errors
# --------------------------------------------------------------------------------------------


def _dvis_names(state: dict) -> dict:
    """A vss VideoModel state dict under DVIS++'s names (the inverse of the rename, built from the
    real R50 layout's keys), without the counters detectron2's FrozenBN does not have."""
    layout = json.loads((Path(__file__).parent / "data" / "dvis_plus_r50_vspw_keys.json").read_text())
    inverse = {rename_key(k): k for k in layout["DVIS_Plus_Offline_R50"] if rename_key(k) is not None}
    out = {inverse[k]: v for k, v in state.items() if not k.endswith("num_batches_tracked")}
    return {**out, "criterion.empty_weight": torch.ones(fixture_config().model.num_classes + 1)}


class _Boom:
    def __reduce__(self):
        import os

        return os.system, ("touch /tmp/vss_convert_dvis_pwned",)


def test_read_source_formats_and_refusals(tmp_path):
    arrays = {"backbone.stem.conv1.weight": np.ones((2, 3, 1, 1), np.float32), "tracker.x": np.arange(3.0)}
    # detectron2 model zoo: a pickle of numpy arrays (protocols 2 and 5)
    for protocol in (2, 5):
        path = tmp_path / f"zoo{protocol}.pkl"
        path.write_bytes(
            pickle.dumps(
                {"model": arrays, "__author__": "Detectron2 Model Zoo", "matching_heuristics": True}, protocol=protocol
            )
        )
        sd = read_source(path)
        assert sd.keys() == arrays.keys() and torch.equal(sd["tracker.x"], torch.arange(3.0, dtype=torch.float64))
    # a .pth with a "model" dict, and a bare state dict
    torch.save({"model": {"a": torch.ones(2)}, "iteration": 7}, tmp_path / "d2.pth")
    torch.save({"a": torch.ones(2)}, tmp_path / "bare.pth")
    assert read_source(tmp_path / "d2.pth").keys() == read_source(tmp_path / "bare.pth").keys() == {"a"}
    # code in a pickle is refused, not run
    evil = tmp_path / "evil.pkl"
    evil.write_bytes(pickle.dumps({"model": {"a": _Boom()}}, protocol=2))
    with pytest.raises(ValueError, match=r"evil\.pkl: refused.*posix\.system|evil\.pkl: refused.*os\.system"):
        read_source(evil)
    assert not Path("/tmp/vss_convert_dvis_pwned").exists()
    torch.save({"model": {"a": torch.ones(1)}, "obj": Config()}, tmp_path / "evil.pth")
    with pytest.raises(ValueError, match=r"evil\.pth: refused"):
        read_source(tmp_path / "evil.pth")
    (tmp_path / "objects.pkl").write_bytes(pickle.dumps({"model": {"a": np.array([1, "x"], dtype=object)}}))
    with pytest.raises(ValueError, match="objects.pkl: a is a ndarray of objects"):
        read_source(tmp_path / "objects.pkl")
    (tmp_path / "junk.pth").write_bytes(b"junk")
    with pytest.raises(ValueError, match="junk.pth"):
        read_source(tmp_path / "junk.pth")
    with pytest.raises(FileNotFoundError):
        read_source(tmp_path / "nope.pth")
    assert RestrictedUnpickler.ALLOWED  # the whitelist is the whole policy


def test_strict_check_lists_missing_unexpected_and_mismatched_keys(tmp_path):
    cfg = fixture_config()
    model = build_video_model(cfg, "tracker")
    source = _dvis_names(model.state_dict())
    del source["sem_seg_head.predictor.query_embed.weight"]
    source["sem_seg_head.predictor.extra.weight"] = torch.zeros(1)
    source["tracker.class_embed.bias"] = torch.zeros(7)
    torch.save({"model": source}, tmp_path / "bad.pth")
    (tmp_path / "cfg.json").write_text(cfg.to_json())
    with pytest.raises(ValueError) as err:
        convert(tmp_path / "bad.pth", config=cfg)
    msg = str(err.value)
    assert "bad.pth does not fit the model" in msg
    assert "1 missing: segmenter.transformer_decoder.query_embed.weight" in msg
    assert "1 unexpected: segmenter.transformer_decoder.extra.weight" in msg
    assert "1 mismatched (file vs model): tracker.class_embed.bias (7,) vs (6,)" in msg
    cli = [str(tmp_path / "bad.pth"), "--out", str(tmp_path / "x.pt"), "--config", str(tmp_path / "cfg.json")]
    assert main(cli) == 2
    assert not (tmp_path / "x.pt").exists()
    # a preset of the wrong size: counted, the first ten of each kind named
    with pytest.raises(
        ValueError,
        match=r"245 missing: .*439 mismatched \(file vs model\): "
        r"segmenter\.backbone\.conv1\.weight \(16, 3, 7, 7\) vs \(64, 3, 7, 7\)",
    ):
        convert(tmp_path / "bad.pth", preset="r50")
    with pytest.raises(ValueError, match="no refiner weights"):
        convert(tmp_path / "bad.pth", config=cfg, stage="refiner")


def test_bare_detectron2_resnet_becomes_backbone_weights(tmp_path):
    resnet = ResNet("resnet50", width=8, stem_channels=16, res2_channels=64, frozen_bn=True)
    layout = json.loads((Path(__file__).parent / "data" / "dvis_plus_r50_vspw_keys.json").read_text())
    inverse = {
        rename_key(k)[len("segmenter.backbone.") :]: k[len("backbone.") :]
        for k in layout["CTVIS_R50"]
        if k.startswith("backbone.")
    }
    arrays = {inverse[k]: v.numpy() for k, v in resnet.state_dict().items() if not k.endswith("num_batches_tracked")}
    arrays.update({"stem.fc.weight": np.zeros((3, 2048), np.float32), "stem.fc.bias": np.zeros(3, np.float32)})
    (tmp_path / "R-50.pkl").write_bytes(pickle.dumps({"model": arrays, "__author__": "torchvision"}, protocol=2))
    assert main([str(tmp_path / "R-50.pkl"), "--out", str(tmp_path / "r50.pth")]) == 0
    fresh = ResNet("resnet50", width=8, stem_channels=16, res2_channels=64, frozen_bn=True)
    load_backbone_weights(fresh, tmp_path / "r50.pth")
    assert all(torch.equal(a, b) for a, b in zip(fresh.state_dict().values(), resnet.state_dict().values()))


# --------------------------------------------------------------------------------------------
# Converted checkpoints in infer.py and train.py
# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    """A DVIS++-format offline checkpoint (.pkl of numpy arrays, original names) of a random
    model at the fixture's dims, converted by the CLI; and a 5-class synthetic dataset."""
    base = tmp_path_factory.mktemp("dvis")
    cfg = fixture_config()
    cfg.data.test_size = 0
    cfg.data.base_size, cfg.data.min_scale, cfg.data.max_scale, cfg.data.crop_size = 64, 1.0, 1.0, (64, 64)
    cfg.loss.num_points = 64
    torch.manual_seed(0)
    model = build_video_model(cfg, "refiner")
    arrays = {k: v.numpy() for k, v in _dvis_names(model.state_dict()).items()}
    (base / "offline.pkl").write_bytes(pickle.dumps({"model": arrays, "__author__": "test"}, protocol=2))
    (base / "cfg.json").write_text(cfg.to_json())
    assert main([str(base / "offline.pkl"), "--out", str(base / "offline.pt"), "--config", str(base / "cfg.json")]) == 0
    data = render_dataset(
        base / "data",
        num_videos=2,
        frames=(4, 4),
        height=48,
        width=64,
        num_classes=5,
        seed=1,
        splits={"train": 0.5, "val": 0.5},
    )
    return {"base": base, "model": model.eval(), "ckpt": base / "offline.pt", "data": data}


def test_converted_checkpoint_has_the_weights_and_predicts_with_infer(converted, tmp_path):
    ckpt = load_checkpoint(converted["ckpt"])
    assert ckpt["stage"] == "refiner" and ckpt["converted_from"]["file"] == "offline.pkl"
    state = converted["model"].state_dict()
    assert ckpt["model"].keys() == state.keys() and all(torch.equal(ckpt["model"][k], state[k]) for k in state)
    out = tmp_path / "pred"
    assert (
        infer.main(
            [
                "--checkpoint",
                str(converted["ckpt"]),
                "--data",
                str(converted["data"]),
                "--split",
                "val",
                "--out",
                str(out),
                "--no-progress",
                "--device",
                "cpu",
            ]
        )
        == 0
    )
    video = (converted["data"] / "val.txt").read_text().split()[0]
    images = np.stack([read_frame(p) for p in sorted((converted["data"] / "data" / video / "origin").glob("*.jpg"))])
    expected = predict_video(converted["model"], normalize(images, Config().data), images.shape[1:3])["labels"]
    labels = np.stack([read_label_png(p) for p in sorted((out / video).glob("*.png"))])
    np.testing.assert_array_equal(labels, expected.numpy())


@pytest.mark.parametrize("stage", ["segmenter", "tracker", "refiner"])
def test_train_init_from_a_converted_checkpoint(converted, tmp_path, stage):
    out = tmp_path / stage
    argv = [
        "--init",
        str(converted["ckpt"]),
        "--stage",
        stage,
        "--data",
        str(converted["data"]),
        "--out",
        str(out),
        "--workers",
        "0",
        "--eval-every",
        "0",
        "--iters",
        "1",
        "--frames",
        "2",
        "--lr",
        "0",
    ]
    assert train.main(argv) == 0
    after = load_checkpoint(out / "last.pt")
    start = converted["model"].state_dict()
    assert after["stage"] == stage
    frozen_or_lr0 = [k for k in after["model"] if "running_" not in k and "num_batches" not in k]
    assert frozen_or_lr0 and all(torch.equal(after["model"][k], start[k]) for k in frozen_or_lr0)
