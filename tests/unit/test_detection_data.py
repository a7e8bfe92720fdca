"""Detection sources: COCO, Pascal VOC and YOLO folders read into the same shards, every bad
annotation counted or refused in one line, category ids mapped to labels and back, the split
stratified on the classes an image holds, the Fashion-MNIST scenes."""

from __future__ import annotations

import json
import logging

import numpy as np
import pytest

from detection_data import SHAPES, coco_folder, scenes, voc_folder, yolo_folder
from kubetrain.core.errors import ConfigError, DataError
from kubetrain.data.boxes import BoxCounts, Categories, check_boxes, strata
from kubetrain.data.config import DataConfig
from kubetrain.data.detection import annotation_format, build_detection_dataset
from kubetrain.data.shards import read_manifest, read_shard


def _build(source, out, **kw):
    cfg = DataConfig(source=str(source), task="detection", shard_samples=8, **kw)
    return build_detection_dataset(cfg, str(out))


def _records(root) -> dict[str, list[dict]]:
    manifest = read_manifest(str(root))
    out = {}
    for split, shards in manifest.splits.items():
        out[split] = []
        for shard in shards:
            cols = read_shard(str(root), shard)
            out[split] += [{k: v[i] for k, v in cols.items()} for i in range(shard.num_samples)]
    return out


def _by_source(root) -> dict[str, tuple[np.ndarray, list[int]]]:
    """source id -> (boxes, labels) over every split."""
    found = {}
    for records in _records(root).values():
        for r in records:
            boxes = np.frombuffer(r["boxes"], np.float32).reshape(-1, 4)
            found[r["source"]] = (boxes, [int(v) for v in r["labels"]])
    return found


# -- boxes ---------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("box", "kept", "clipped", "expected"),
    [
        ([2, 3, 10, 12], True, False, [2, 3, 10, 12]),
        ([-5, 3, 10, 12], True, True, [0, 3, 10, 12]),
        ([2, 3, 90, 70], True, True, [2, 3, 40, 30]),
        ([5, 5, 5, 12], False, False, None),  # zero width
        ([9, 5, 4, 12], False, False, None),  # negative width
        ([50, 5, 60, 12], False, False, None),  # wholly outside: nothing left after clipping
        ([np.nan, 5, 6, 12], False, False, None),
    ],
    ids=[
        "inside",
        "left-edge",
        "past-right-and-bottom",
        "zero-size",
        "negative",
        "outside",
        "nan",
    ],
)
def test_check_boxes(box, kept, clipped, expected):
    counts = BoxCounts()
    boxes = np.array([box], dtype=np.float64)
    keep = check_boxes(boxes, 40, 30, counts, "img.png")
    assert bool(keep[0]) is kept
    assert counts.clipped == int(clipped) and counts.kept == int(kept)
    assert counts.dropped.get("degenerate", 0) == int(not kept)
    if expected is not None:
        assert boxes[0].tolist() == expected


def test_categories_map_gappy_ids_to_labels_and_back():
    cats = Categories.from_pairs([(7, "c"), (1, "a"), (3, "b")])
    assert cats.names == ("a", "b", "c")
    assert cats.labels(np.array([3, 7, 1, 5])).tolist() == [2, 3, 1, 0]
    assert cats.ids_of(np.array([1, 2, 3])).tolist() == [1, 3, 7]
    with pytest.raises(DataError, match="category id 3 is defined twice"):
        Categories.from_pairs([(3, "a"), (3, "b")])


def test_strata_take_the_rarest_class_and_merge_small_ones():
    sets = [[1, 2]] * 6 + [[1]] * 20 + [[2, 3]] * 2 + [[]] * 5
    keys = strata(sets, min_count=3)
    assert set(keys[:6]) == {2}  # 2 is rarer than 1 (8 vs 26 images)
    assert set(keys[6:26]) == {1}
    assert set(keys[26:28]) == {0}  # class 3's two images join the empty-image stratum
    assert set(keys[28:]) == {0}


# -- the three formats ----------------------------------------------------------------------------
def test_coco_voc_and_yolo_give_the_same_boxes(tmp_path):
    coco_folder(tmp_path / "coco", category_ids=(1, 2, 3))
    voc_folder(tmp_path / "voc")
    yolo_folder(tmp_path / "yolo")
    built = {}
    for fmt in ("coco", "voc", "yolo"):
        manifest = _build(tmp_path / fmt, tmp_path / f"out-{fmt}")
        assert manifest.meta["annotation_format"] == fmt
        built[fmt] = _by_source(tmp_path / f"out-{fmt}")
    # The same scenes in each: match them by position (COCO id 100+i, file 000i.png).
    expected = scenes(30)
    for i, (_, objects) in enumerate(expected):
        truth = np.array([b for _, b in objects], dtype=np.float32).reshape(-1, 4)
        coco_boxes, coco_labels = built["coco"][str(100 + i)]
        voc_boxes, voc_labels = built["voc"][f"{i:04d}.png"]
        yolo_boxes, yolo_labels = built["yolo"][f"train/{i:04d}.png"]
        np.testing.assert_allclose(coco_boxes, truth)
        np.testing.assert_allclose(voc_boxes, truth)
        np.testing.assert_allclose(yolo_boxes, truth, atol=1e-3)
        assert coco_labels == yolo_labels == [c + 1 for c, _ in objects]
        # VOC's categories are its names, sorted.
        assert [sorted(SHAPES)[v - 1] for v in voc_labels] == [SHAPES[c] for c, _ in objects]


def test_images_without_objects_are_samples(tmp_path):
    coco_folder(tmp_path / "coco")
    manifest = _build(tmp_path / "coco", tmp_path / "out")
    assert sum(manifest.num_samples(s) for s in ("train", "val", "test")) == 30
    assert sum(manifest.meta["empty_images"].values()) == 3  # every tenth scene is empty


def test_gappy_category_ids_keep_their_ids_and_names(tmp_path):
    coco_folder(tmp_path / "coco", category_ids=(1, 3, 7))
    manifest = _build(tmp_path / "coco", tmp_path / "out")
    assert manifest.meta["categories"] == [{"id": 1, "name": "square"},
                                           {"id": 3, "name": "disc"},
                                           {"id": 7, "name": "triangle"}]  # fmt: skip
    labels = {v for recs in _records(tmp_path / "out").values() for r in recs
              for v in r["labels"].tolist()}  # fmt: skip
    assert labels == {1, 2, 3}


def test_bad_annotations_are_counted_in_one_warning(tmp_path, caplog):
    bad = [
        {"image_id": 100, "category_id": 1, "bbox": [60, 50, 40, 40]},  # clipped at 80x64
        {"image_id": 100, "category_id": 1, "bbox": [5, 5, 0, 9]},  # zero width
        {"image_id": 100, "category_id": 42, "bbox": [5, 5, 9, 9]},  # unknown category
        {"image_id": 999, "category_id": 1, "bbox": [5, 5, 9, 9]},  # image not listed
        {"image_id": 101, "category_id": 1, "bbox": [5, 5, 9, 9], "iscrowd": 1},
        {"image_id": 101, "category_id": 1, "bbox": "5 5 9 9"},  # malformed
    ]
    missing = [{"id": 500, "file_name": "gone.png", "width": 80, "height": 64}]
    coco_folder(tmp_path / "coco", category_ids=(1, 2, 3), extra_annotations=bad,
                extra_images=missing)  # fmt: skip
    (tmp_path / "coco" / "images" / "train" / "0004.png").write_bytes(b"not a png")
    with caplog.at_level(logging.WARNING):
        manifest = _build(tmp_path / "coco", tmp_path / "out")
    boxes = manifest.provenance["boxes"]
    assert boxes["clipped"] == 1
    assert boxes["dropped"] == {"degenerate": 1, "unknown_category": 1, "missing_image": 1,
                                "crowd": 1, "malformed": 1}  # fmt: skip
    assert manifest.provenance["num_skipped"] == 2  # the missing file and the corrupt one
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1
    line = warnings[0]
    for part in ("2 image(s) skipped", "1 box(es) reaching outside the image clipped",
                 "an unknown category id", "an annotation whose image is not listed",
                 "zero or negative size", "crowd"):  # fmt: skip
        assert part in line
    assert "\n" not in line


@pytest.mark.parametrize(
    ("write", "message"),
    [
        (lambda r: (r / "annotations").mkdir() or (r / "annotations" / "instances_x.json")
         .write_text("{not json"), "instances_x.json: not valid JSON"),
        (lambda r: (r / "annotations").mkdir() or (r / "annotations" / "instances_x.json")
         .write_text(json.dumps({"images": []})), "not COCO instances"),
        (lambda r: (r / "notes.txt").write_text("hello"), "not a detection source"),
        (lambda r: (r / "labels").mkdir() or (r / "images").mkdir(),
         "YOLO folder needs its class names"),
        (lambda r: (r / "Annotations").mkdir() or (r / "Annotations" / "a.xml")
         .write_text("<annotation><object>"), "a.xml: not valid XML"),
    ],
    ids=["coco-not-json", "coco-not-instances", "no-layout", "yolo-no-names", "voc-bad-xml"],
)  # fmt: skip
def test_malformed_sources_are_one_line(tmp_path, write, message):
    root = tmp_path / "src"
    root.mkdir()
    write(root)
    with pytest.raises(DataError, match=message) as info:
        _build(root, tmp_path / "out")
    assert "\n" not in str(info.value)


def test_nothing_usable_names_the_annotation_file(tmp_path):
    coco = coco_folder(tmp_path / "coco", count=12)
    for ann in coco["annotations"]:
        ann["bbox"] = [90, 70, 5, 5]  # every box outside its 80x64 image
    path = tmp_path / "coco" / "annotations" / "instances_train.json"
    path.write_text(json.dumps(coco))
    with pytest.raises(DataError, match=r"instances_train.json: no usable box is left .*zero or"):
        _build(tmp_path / "coco", tmp_path / "out")
    assert not (tmp_path / "out" / "shards.json").exists()


def test_image_size_is_refused_for_detection(tmp_path):
    coco_folder(tmp_path / "coco", count=12)
    with pytest.raises(ConfigError, match="data.image_size: detection stores images"):
        _build(tmp_path / "coco", tmp_path / "out", image_size=32)


def test_yolo_classes_txt_and_out_of_range_class(tmp_path):
    yolo_folder(tmp_path / "yolo", names_as="txt")
    (tmp_path / "yolo" / "labels" / "train" / "0000.txt").write_text(
        "7 0.5 0.5 0.2 0.2\n0 0.5 0.5 0.2\n"
    )
    manifest = _build(tmp_path / "yolo", tmp_path / "out")
    assert manifest.meta["classes"] == list(SHAPES)
    assert manifest.provenance["boxes"]["dropped"] == {"unknown_category": 1, "malformed": 1}


def test_format_is_found_from_the_layout(tmp_path):
    coco_folder(tmp_path / "coco", count=3)
    voc_folder(tmp_path / "voc", count=3)
    yolo_folder(tmp_path / "yolo", count=3)
    assert annotation_format(str(tmp_path / "coco"), "auto") == "coco"
    json_file = tmp_path / "coco" / "annotations" / "instances_train.json"
    assert annotation_format(str(json_file), "auto") == "coco"
    assert annotation_format(str(tmp_path / "voc"), "auto") == "voc"
    assert annotation_format(str(tmp_path / "yolo"), "auto") == "yolo"
    with pytest.raises(DataError, match="not found"):
        annotation_format(str(tmp_path / "nope"), "auto")


def test_split_is_stratified_and_rebuilds_are_cached(tmp_path):
    coco_folder(tmp_path / "coco", count=60)
    first = _build(tmp_path / "coco", tmp_path / "out")
    for split in ("train", "val", "test"):
        present = [k for k, n in first.class_counts[split].items() if n]
        assert len(present) == 3, split  # every class in every split
    again = _build(tmp_path / "coco", tmp_path / "out")
    assert again.version == first.version
    path = tmp_path / "coco" / "annotations" / "instances_train.json"
    coco = json.loads(path.read_text())
    coco["annotations"][0]["bbox"][2] -= 1
    path.write_text(json.dumps(coco))
    assert _build(tmp_path / "coco", tmp_path / "out").version != first.version


def test_fashion_mnist_scenes(tmp_path):
    from kubetrain.data.idx import FASHION_MNIST_DIR
    from kubetrain.data.scenes import CANVAS, scenes_folder

    if not FASHION_MNIST_DIR.exists():
        pytest.skip("dataset-fashion-mnist is not installed")
    folder = scenes_folder(tmp_path, 40, seed=3)
    coco = json.loads((folder / "annotations" / "instances_all.json").read_text())
    assert len(coco["images"]) == 40 and len(coco["categories"]) == 10
    per_image = {i["id"]: 0 for i in coco["images"]}
    for ann in coco["annotations"]:
        per_image[ann["image_id"]] += 1
        x, y, w, h = ann["bbox"]
        img = coco["images"][ann["image_id"] - 1]
        assert x >= 0 and y >= 0 and x + w <= img["width"] and y + h <= img["height"]
        assert w > 0 and h > 0
    assert max(per_image.values()) <= 4
    assert all(CANVAS[0] <= i["width"] == i["height"] <= CANVAS[1] for i in coco["images"])
    assert scenes_folder(tmp_path, 40, seed=3) == folder  # written once
