"""vss.label_remap: mapping-file checks, the look-up table, and the image-folder dataset."""

import json
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

from vss import data as vd
from vss import io as vio
from vss.label_remap import ImageFolderDataset, load_label_map, remap

REPO = Path(__file__).resolve().parents[1]
EXAMPLE = REPO / "vss" / "remap_examples" / "ade20k150_to_camvid11.json"
ADE_TO_VSPW = REPO / "vss" / "remap_examples" / "ade20k150_to_vspw124.json"
COCO_TO_VSPW = REPO / "vss" / "remap_examples" / "coco133_to_vspw124.json"
# ADE20K-150 class names in objectInfo150 order (annotation value k = ADE150[k - 1]; 0 = other),
# the short names the SceneParsing toolkits use.
ADE150 = tuple(
    name.replace("_", " ")
    for name in """wall building sky floor tree ceiling road bed windowpane grass cabinet sidewalk person earth door
    table mountain plant curtain chair car water painting sofa shelf house sea mirror rug field armchair seat fence
    desk rock wardrobe lamp bathtub railing cushion base box column signboard chest_of_drawers counter sand sink
    skyscraper fireplace refrigerator grandstand path stairs runway case pool_table pillow screen_door stairway river
    bridge bookcase blind coffee_table toilet flower book hill bench countertop stove palm kitchen_island computer
    swivel_chair boat bar arcade_machine hovel bus towel light truck tower chandelier awning streetlight booth
    television_receiver airplane dirt_track apparel pole land bannister escalator ottoman bottle buffet poster stage
    van ship fountain conveyer_belt canopy washer plaything swimming_pool stool barrel basket waterfall tent bag
    minibike cradle oven ball food step tank trade_name microwave pot animal bicycle lake dishwasher screen blanket
    sculpture hood sconce vase traffic_light tray ashcan fan pier crt_screen plate monitor bulletin_board shower
    radiator glass clock flag""".split()
)


def write_map(tmp_path: Path, spec, name: str = "map.json") -> Path:
    path = tmp_path / name
    path.write_text(spec if isinstance(spec, str) else json.dumps(spec), encoding="utf-8")
    return path


def test_example_map_ids():
    lut = load_label_map(EXAMPLE, 11)
    assert lut.shape == (256,) and lut.dtype == np.uint8
    names = json.loads(EXAMPLE.read_text())["target_names"]
    # ADE20K-150 ids (1-based objectInfo150 order) -> CamVid train ids.
    expect = {
        3: "sky",
        2: "building",
        7: "road",
        12: "pavement",
        5: "tree",
        21: "car",
        13: "pedestrian",
        128: "bicyclist",
        44: "sign_symbol",
        94: "pole",
        33: "fence",
    }
    for src, target in expect.items():
        assert names[lut[src]] == target, src
    assert lut[0] == 255 and lut[1] == 255 and lut[150] == 255  # other, wall, flag: unmapped
    assert sorted(set(lut[lut != 255].tolist())) == list(range(11))  # every CamVid class reachable


def test_ade20k_to_vspw_map():
    """The shipped ADE20K-150 -> VSPW-124 table: ids and names agree, same-named classes map to each
    other, the classes that straddle VSPW classes are ignored."""
    spec = json.loads(ADE_TO_VSPW.read_text())
    lut = load_label_map(ADE_TO_VSPW, 124)
    vspw = json.loads((REPO / "vss" / "vspw_classes.json").read_text())["classes"]
    assert len(ADE150) == 150 and spec["target_names"] == vspw
    assert spec["source_names"].keys() == spec["map"].keys()
    assert all(ADE150[int(k) - 1] == name for k, name in spec["source_names"].items())  # no off-by-one

    def target(ade_name: str) -> str | None:
        value = lut[ADE150.index(ade_name) + 1]
        return None if value == 255 else vspw[value]

    same = [name for name in ADE150 if name in vspw]
    assert len(same) > 40 and all(target(name) == name for name in same)
    assert (target("skyscraper"), target("palm"), target("van"), target("minibike")) == (
        "building",
        "tree",
        "car",
        "motorcycle",
    )
    assert (target("windowpane"), target("toilet"), target("rock"), target("ashcan")) == (
        "window",
        "commode",
        "stone",
        "trash_can",
    )
    assert target("animal") is target("streetlight") is target("field") is None  # straddle VSPW classes
    assert lut[0] == 255 and (lut[151:] == 255).all()


# COCO panoptic's 133 classes in detectron2's COCO_CATEGORIES order (value k of Mask2Former's
# semantic PNGs = COCO133[k]; 255 = unlabelled).
COCO133 = tuple(
    name.replace("_", " ")
    for name in """person bicycle car motorcycle airplane bus train truck boat traffic_light fire_hydrant stop_sign
    parking_meter bench bird cat dog horse sheep cow elephant bear zebra giraffe backpack umbrella handbag tie suitcase
    frisbee skis snowboard sports_ball kite baseball_bat baseball_glove skateboard surfboard tennis_racket bottle
    wine_glass cup fork knife spoon bowl banana apple sandwich orange broccoli carrot hot_dog pizza donut cake chair
    couch potted_plant bed dining_table toilet tv laptop mouse remote keyboard cell_phone microwave oven toaster sink
    refrigerator book clock vase scissors teddy_bear hair_drier toothbrush banner blanket bridge cardboard counter
    curtain door-stuff floor-wood flower fruit gravel house light mirror-stuff net pillow platform playingfield
    railroad river road roof sand sea shelf snow stairs tent towel wall-brick wall-stone wall-tile wall-wood
    water-other window-blind window-other tree-merged fence-merged ceiling-merged sky-other-merged cabinet-merged
    table-merged floor-other-merged pavement-merged mountain-merged grass-merged dirt-merged paper-merged
    food-other-merged building-other-merged rock-merged wall-other-merged rug-merged""".split()
)


def test_coco_to_vspw_map():
    """The shipped COCO-panoptic-133 -> VSPW-124 table: 0-based ids and names agree, same-named
    classes map to each other, the straddling ones are ignored."""
    spec = json.loads(COCO_TO_VSPW.read_text())
    lut = load_label_map(COCO_TO_VSPW, 124)
    vspw = json.loads((REPO / "vss" / "vspw_classes.json").read_text())["classes"]
    assert len(COCO133) == 133 and spec["target_names"] == vspw
    assert spec["source_names"].keys() == spec["map"].keys()
    assert all(COCO133[int(k)] == name for k, name in spec["source_names"].items())  # 0-based, no shift

    def target(coco_name: str) -> str | None:
        value = lut[COCO133.index(coco_name)]
        return None if value == 255 else vspw[value]

    same = [name for name in COCO133 if name in vspw]
    assert len(same) > 25 and all(target(name) == name for name in same)
    walls = [name for name in COCO133 if name.startswith("wall-")]
    assert len(walls) == 5 and {target(name) for name in walls} == {"wall"}
    assert (target("couch"), target("cow"), target("giraffe"), target("tv")) == (
        "sofa",
        "cattle",
        "other_animal",
        "screen_or_television",
    )
    assert target("potted plant") is target("roof") is target("fire hydrant") is None
    assert (lut[133:] == 255).all()


@pytest.mark.parametrize(
    "images, labels",
    [("images", "labels"), ("images/training", "annotations/training"), ("train2017", "panoptic_semseg_train2017")],
)
def test_open_extra_finds_the_dataset_layouts(tmp_path, images, labels):
    from vss.config import tiny
    from vss.sampler import open_extra

    root = tmp_path / "extra"
    (root / images).mkdir(parents=True)
    (root / labels).mkdir(parents=True)
    cv2.imwrite(str(root / images / "a.jpg"), np.zeros((8, 8, 3), np.uint8))
    cv2.imwrite(str(root / labels / "a.png"), np.zeros((8, 8), np.uint8))
    cfg = tiny()
    cfg.model.num_classes = 11
    ds = open_extra(f"{root}:{EXAMPLE}", cfg)
    assert ds.items == [(root / images / "a.jpg", root / labels / "a.png")]
    with pytest.raises(FileNotFoundError, match="folder not found"):
        open_extra(f"{tmp_path / 'empty'}:{EXAMPLE}", cfg)


def test_remap_unmapped_to_ignore(tmp_path):
    path = write_map(tmp_path, {"num_target_classes": 3, "map": {"7": 2, "9": 0, "4": 255}})
    lut = load_label_map(path, 3)
    label = np.arange(256, dtype=np.uint8).reshape(16, 16)
    out = remap(label, lut)
    expect = np.full(256, 255, np.uint8)
    expect[7], expect[9] = 2, 0
    np.testing.assert_array_equal(out.ravel(), expect)
    with pytest.raises(ValueError, match="uint8"):
        remap(label.astype(np.int32), lut)


def test_out_of_range_target_rejected_naming_file_and_entry(tmp_path):
    path = write_map(tmp_path, {"num_target_classes": 11, "map": {"3": 0, "21": 11}}, "bad_map.json")
    with pytest.raises(ValueError) as e:
        load_label_map(path, 11)
    assert "bad_map.json" in str(e.value) and "'21'" in str(e.value) and "11" in str(e.value)


@pytest.mark.parametrize(
    "spec, message",
    [
        ("{not json", "not valid JSON"),
        ("[1, 2]", "top level"),
        ({"map": {"1": 0}}, "missing keys"),
        ({"num_target_classes": 2, "map": {"1": 0}, "extra": 1}, "unknown keys"),
        ('{"num_target_classes": 2, "map": {"1": 0, "1": 1}}', "duplicate key"),
        ({"num_target_classes": 2, "map": {"1": 0, "01": 1}}, "same source id"),
        ({"num_target_classes": 2, "map": {"x": 0}}, "not an integer source id"),
        ({"num_target_classes": 2, "map": {"256": 0}}, "outside the 8-bit"),
        ({"num_target_classes": 2, "map": {"1": 1.0}}, "map entry '1'"),
        ({"num_target_classes": 2, "map": {"1": True}}, "map entry '1'"),
        ({"num_target_classes": 2, "map": {"1": -1}}, "map entry '1'"),
        ({"num_target_classes": 2, "map": {}}, "non-empty"),
        ({"num_target_classes": 0, "map": {"1": 0}}, "num_target_classes"),
        ({"num_target_classes": 3, "map": {"1": 0}}, "model has 2 classes"),
        ({"num_target_classes": 2, "map": {"1": 0}, "ignore": 0}, "ignore must be 255"),
        ({"num_target_classes": 2, "map": {"1": 0}, "target_names": ["a"]}, "target_names"),
        ({"num_target_classes": 2, "map": {"1": 0}, "source_names": {"1": 3}}, "source_names"),
    ],
)
def test_malformed_map_rejected(tmp_path, spec, message):
    path = write_map(tmp_path, spec, "broken.json")
    with pytest.raises(ValueError, match=message) as e:
        load_label_map(path, 2)
    assert "broken.json" in str(e.value)


def test_missing_map_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.json"):
        load_label_map(tmp_path / "nope.json")


def make_folder(root: Path, sizes) -> list[np.ndarray]:
    (root / "images").mkdir(parents=True)
    (root / "labels").mkdir()
    rng = np.random.default_rng(0)
    raws = []
    for i, (h, w) in enumerate(sizes):
        img = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
        cv2.imwrite(str(root / "images" / f"img{i}.jpg"), img[:, :, ::-1])
        raw = rng.choice(np.array([0, 3, 7, 21, 150], np.uint8), size=(h, w))
        if i == 0:
            vio.write_label_png(root / "labels" / f"img{i}.png", raw)  # palette PNG
        else:
            cv2.imwrite(str(root / "labels" / f"img{i}.png"), raw)  # grey PNG
        raws.append(raw)
    return raws


def test_image_folder_dataset_items(tmp_path):
    raws = make_folder(tmp_path / "ade", [(20, 30), (24, 18)])
    ds = ImageFolderDataset(tmp_path / "ade", EXAMPLE, num_classes=11, augment=False)
    assert len(ds) == 2
    lut = load_label_map(EXAMPLE, 11)
    items = [ds.load_item(i, np.random.default_rng(i)) for i in range(2)]
    for i, item in enumerate(items):
        assert item["frames"].shape == (1, 3, *raws[i].shape) and item["frames"].dtype == torch.float32
        np.testing.assert_array_equal(item["labels"][0].numpy(), lut[raws[i]].astype(np.int64))
        assert set(np.unique(item["labels"]).tolist()) <= {0, 3, 8, 255}  # sky, road, car, ignore
        img = vio.read_frame(tmp_path / "ade" / "images" / f"img{i}.jpg")
        torch.testing.assert_close(item["frames"][0], vd.normalize(img, ds.cfg))
        assert item["video"] == f"img{i}" and item["frame_names"] == [f"img{i}"]
    batch = vd.collate_clips(items)
    assert batch["frames"].shape == (2, 1, 3, 32, 32)
    assert all(set(tg["labels"].tolist()) <= {0, 3, 8} for tg in batch["targets"])
    augmented = ImageFolderDataset(tmp_path / "ade", EXAMPLE, cfg=vd.DataConfig(base_size=16, crop_size=(12, 12)))
    assert augmented[0]["labels"].shape == (1, 12, 12)


def test_image_folder_dataset_errors(tmp_path):
    make_folder(tmp_path / "ade", [(8, 8)])
    with pytest.raises(ValueError, match="model has 124 classes"):
        ImageFolderDataset(tmp_path / "ade", EXAMPLE, num_classes=124)
    with pytest.raises(FileNotFoundError, match="annotations"):
        ImageFolderDataset(tmp_path / "ade", EXAMPLE, label_dir="annotations")
    cv2.imwrite(str(tmp_path / "ade" / "labels" / "orphan.png"), np.zeros((8, 8), np.uint8))
    with pytest.raises(ValueError, match="orphan.png"):
        ImageFolderDataset(tmp_path / "ade", EXAMPLE)
    (tmp_path / "ade" / "labels" / "orphan.png").unlink()
    cv2.imwrite(str(tmp_path / "ade" / "labels" / "img0.png"), np.zeros((5, 8), np.uint8))
    ds = ImageFolderDataset(tmp_path / "ade", EXAMPLE, augment=False)
    with pytest.raises(ValueError, match="img0.png"):
        ds.load_item(0, np.random.default_rng(0))
