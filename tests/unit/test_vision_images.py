"""Image sources and preprocessing into shards (Pillow only: these run without torchvision)."""

from __future__ import annotations

import io
import logging
import os
import shutil
import tarfile

import numpy as np
import pytest
from PIL import Image

from kubetrain.core.errors import ConfigError, DataError
from kubetrain.data.config import DataConfig
from kubetrain.data.idx import FASHION_MNIST_CLASSES, idx_to_image_folder, read_idx
from kubetrain.data.image_sources import expand_braces, list_images, source_kind
from kubetrain.data.images import build_image_dataset, convert_image
from kubetrain.data.shards import read_manifest, read_shard
from kubetrain.pipeline.config import load_config
from vision_data import CORRUPT, encode, image_folder, render, tar_shards

pytestmark = pytest.mark.vision


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    root = tmp_path_factory.mktemp("images") / "folder"
    counts = image_folder(root, classes=10, per_class=12)
    return root, counts


def cfg(source, **kw) -> DataConfig:
    return DataConfig(source=str(source), shard_samples=kw.pop("shard_samples", 16), **kw)


def all_records(root, manifest, split=None):
    out = []
    for name, shards in manifest.splits.items():
        if split in (None, name):
            for shard in shards:
                cols = read_shard(str(root), shard)
                out += list(zip(cols["image"], cols["label"], strict=True))
    return out


# -- conversion ---------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("mode", "fmt"),
    [("RGB", "PNG"), ("L", "PNG"), ("RGBA", "PNG"), ("I;16", "PNG"), ("P", "PNG"),
     ("RGB", "JPEG"), ("L", "JPEG"), ("CMYK", "JPEG"), ("RGB", "WEBP"), ("RGB", "BMP")],
    ids=lambda v: v.replace(";", ""),
)  # fmt: skip
@pytest.mark.parametrize("target", ["RGB", "L"])
def test_every_mode_converts_to_the_target_mode(mode, fmt, target):
    img = render(3, 7, "RGB")
    source = img.convert("CMYK") if mode == "CMYK" else render(3, 7, mode)
    data, shape = convert_image(encode(source, fmt), target)
    out = Image.open(io.BytesIO(data))
    assert out.mode == target
    assert shape == (img.height, img.width) == (out.height, out.width)
    # The picture survives: the same (converted) content as the RGB original, within JPEG loss.
    ref = np.asarray(img.convert(target), dtype=float)
    assert np.abs(np.asarray(out, dtype=float) - ref).mean() < 25


def test_16_bit_is_scaled_not_clipped():
    gray = Image.fromarray(np.full((8, 8), 128 * 257, dtype=np.uint16))
    data, _ = convert_image(encode(gray, "PNG"), "L")
    assert np.asarray(Image.open(io.BytesIO(data))).max() == 128


def test_unchanged_jpeg_and_png_keep_their_bytes_and_resize_makes_squares():
    png = encode(render(1, 1, "RGB"), "PNG")
    assert convert_image(png, "RGB")[0] == png
    data, shape = convert_image(encode(Image.new("RGB", (60, 40)), "JPEG"), "RGB", size=32)
    assert shape == (32, 32) and Image.open(io.BytesIO(data)).format == "JPEG"


# -- listing ------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("pattern", "expected"),
    [
        ("a.tar", ["a.tar"]),
        ("s-{000..002}.tar", ["s-000.tar", "s-001.tar", "s-002.tar"]),
        ("{a,b}-{8..10}.tar", ["a-8.tar", "a-9.tar", "a-10.tar", "b-8.tar", "b-9.tar", "b-10.tar"]),
    ],
    ids=["plain", "zero-padded-range", "list-times-range"],
)
def test_brace_patterns_expand(pattern, expected):
    assert expand_braces(pattern) == expected


@pytest.mark.parametrize("pattern", ["s-{000..002.tar", "s-000}.tar", "s-{5..1}.tar"])
def test_a_malformed_brace_pattern_is_a_config_error(pattern):
    with pytest.raises(ConfigError, match=r"^config error: data.source: "):
        expand_braces(pattern)


@pytest.mark.parametrize(
    ("source", "kind"),
    [("s3://b/imgs/", "folder"), ("m.CSV", "manifest"), ("m.parquet", "manifest"),
     ("gs://b/train-{0..3}.tar", "tars")],
)  # fmt: skip
def test_source_kind_from_the_name(source, kind):
    assert source_kind(source) == kind


def test_a_folder_lists_every_image_suffix_in_any_case_and_nothing_else(folder):
    root, counts = folder
    listing = list_images(str(root))
    assert len(listing.refs) == counts["good"] + counts["corrupt"]
    suffixes = {os.path.splitext(r.url)[1] for r in listing.refs}
    assert {".JPG", ".jpeg", ".png", ".webp", ".bmp"} <= suffixes
    assert not any(r.url.endswith(".txt") for r in listing.refs)


def test_an_empty_class_folder_is_one_line(tmp_path):
    image_folder(tmp_path / "f", classes=3, per_class=3, corrupt=False)
    (tmp_path / "f" / "cats").mkdir()
    with pytest.raises(DataError, match=r"^data error: \S+/f/cats: class folder has no images"):
        build_image_dataset(cfg(tmp_path / "f"), tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_nothing_decodes_is_one_line_and_writes_nothing(tmp_path):
    for name in ("a", "b"):
        (tmp_path / "f" / name).mkdir(parents=True)
        for i in range(10):
            (tmp_path / "f" / name / f"{i}.png").write_bytes(b"not a png")
    with pytest.raises(DataError, match=r"none of its 20 images decodes \(e\.g\. .*not an image"):
        build_image_dataset(cfg(tmp_path / "f"), tmp_path / "out")
    assert not list((tmp_path / "out").glob("*.parquet"))
    assert not (tmp_path / "out" / "shards.json").exists()


@pytest.mark.parametrize(
    ("source", "message"),
    [
        ("missing-dir", r"missing-dir: not found"),
        ("missing.csv", r"missing.csv: not found"),
        ("missing-{0..1}.tar", r"missing-0.tar: not found"),
    ],
    ids=["folder", "manifest", "tars"],
)
def test_a_missing_source_is_one_line(tmp_path, source, message):
    with pytest.raises(DataError, match=message):
        build_image_dataset(cfg(tmp_path / source), tmp_path / "out")


# -- building shards ----------------------------------------------------------------------------
def test_a_folder_builds_stratified_shards_and_counts_corrupt_images(folder, tmp_path, caplog):
    root, counts = folder
    with caplog.at_level(logging.WARNING):
        manifest = build_image_dataset(cfg(root, image_size=32), str(tmp_path / "out"))
    assert f"skipped {counts['corrupt']} of {counts['good'] + counts['corrupt']}" in caplog.text
    prov, meta = manifest.provenance, manifest.meta
    assert prov["num_skipped"] == counts["corrupt"]
    assert {os.path.basename(p) for p, _ in prov["skipped"]} == set(CORRUPT)
    assert meta["classes"] == [f"class_{k}" for k in range(10)]
    assert meta["input_shape"] == [3, 32, 32]
    sizes = {s: manifest.num_samples(s) for s in manifest.splits}
    assert sum(sizes.values()) == counts["good"]
    assert sizes["train"] > sizes["val"] > 0 and sizes["test"] > 0
    # Stratified: every class in every split, with the manifest's counts.
    for split, per_class in manifest.class_counts.items():
        assert set(per_class) == {str(k) for k in range(10)}
        labels = [lab for _, lab in all_records(tmp_path / "out", manifest, split)]
        assert dict(sorted((str(k), labels.count(k)) for k in set(labels))) == per_class
    for image, _ in all_records(tmp_path / "out", manifest):
        img = Image.open(io.BytesIO(image))
        assert (img.mode, img.size) == ("RGB", (32, 32))
    assert read_manifest(str(tmp_path / "out")).version == manifest.version


def test_workers_change_nothing_and_unchanged_input_keeps_the_version(folder, tmp_path):
    root, _ = folder
    one = build_image_dataset(cfg(root, image_mode="L"), str(tmp_path / "a"))
    two = build_image_dataset(cfg(root, image_mode="L", num_workers=2), str(tmp_path / "b"))
    assert one.version == two.version
    assert one.splits == two.splits  # the same shards, byte for byte (their digests)


def test_a_rebuild_on_unchanged_input_is_a_cache_hit_and_one_changed_image_is_not(tmp_path):
    root = tmp_path / "f"
    image_folder(root, classes=3, per_class=6, corrupt=False)
    out = tmp_path / "out"
    first = build_image_dataset(cfg(root), str(out))
    stamps = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}
    again = build_image_dataset(cfg(root), str(out))
    assert again.version == first.version
    assert {p.name: p.stat().st_mtime_ns for p in out.iterdir()} == stamps  # nothing rewritten
    target = sorted((root / "class_1").glob("*.png"))[0]
    target.write_bytes(encode(render(2, 50), "PNG"))
    changed = build_image_dataset(cfg(root), str(out))
    assert changed.version != first.version
    # A different setting is a different dataset too.
    assert build_image_dataset(cfg(root, image_size=16), str(out)).version != changed.version
    assert {p.name for p in out.glob("*.parquet")} == {
        s.path for v in read_manifest(str(out)).splits.values() for s in v
    }


def test_renaming_a_class_changes_the_version_but_moving_the_data_does_not(tmp_path):
    image_folder(tmp_path / "a", classes=3, per_class=6, corrupt=False)
    first = build_image_dataset(cfg(tmp_path / "a"), str(tmp_path / "out-a"))
    shutil.copytree(tmp_path / "a", tmp_path / "b")
    moved = build_image_dataset(cfg(tmp_path / "b"), str(tmp_path / "out-b"))
    assert moved.version == first.version  # where the data lives is provenance, not content
    (tmp_path / "b" / "class_0").rename(tmp_path / "b" / "class_00")  # same order, new name
    renamed = build_image_dataset(cfg(tmp_path / "b"), str(tmp_path / "out-c"))
    assert renamed.splits == first.splits  # the same shards, byte for byte ...
    assert renamed.version != first.version  # ... but the class names are content too


@pytest.mark.parametrize("fmt", ["csv", "parquet"])
def test_a_manifest_source_with_relative_paths_and_any_labels(folder, tmp_path, fmt):
    import pandas as pd

    root, _ = folder
    shutil.copytree(root, tmp_path / "data")
    rows = [
        {"path": str(p.relative_to(tmp_path / "data")), "species": p.parent.name.upper()}
        for p in sorted((tmp_path / "data").rglob("*"))
        if p.suffix.lower() in (".png", ".jpg", ".jpeg") and p.parent.name != "data"
    ]
    rows.append({"path": "class_0/gone.png", "species": "CLASS_0"})  # listed, never written
    table = pd.DataFrame(rows)
    path = tmp_path / "data" / f"index.{fmt}"
    table.to_csv(path, index=False) if fmt == "csv" else table.to_parquet(path)
    manifest = build_image_dataset(
        cfg(path, image_column="path", label_column="species", image_size=24),
        str(tmp_path / "out"),
    )
    assert manifest.meta["classes"] == [f"CLASS_{k}" for k in range(10)]
    broken = sum(1 for r in rows if os.path.basename(r["path"]) in CORRUPT) + 1
    assert sum(manifest.num_samples(s) for s in manifest.splits) == len(rows) - broken
    assert manifest.provenance["num_skipped"] == broken
    gone = str(tmp_path / "data" / "class_0" / "gone.png")
    assert [gone, "missing"] in manifest.provenance["skipped"]


def test_a_manifest_without_its_columns_is_one_line(tmp_path):
    (tmp_path / "m.csv").write_text("file,label\na.png,1\n")
    with pytest.raises(DataError, match=r"m.csv: no column 'image' \(data.image_column\); it has"):
        build_image_dataset(cfg(tmp_path / "m.csv"), tmp_path / "out")


def test_tar_shards_from_a_brace_pattern(tmp_path):
    tar_shards(tmp_path / "tars", classes=10, per_class=12, num_shards=3)
    source = tmp_path / "tars" / "train-{000000..000002}.tar"
    manifest = build_image_dataset(cfg(source, image_size=32, num_workers=2), tmp_path / "out")
    assert manifest.meta["classes"] == [str(k) for k in range(10)]  # numeric labels, in order
    assert sum(manifest.num_samples(s) for s in manifest.splits) == 120
    assert manifest.provenance["num_skipped"] == 0


def test_a_tar_sample_without_a_label_is_one_line(tmp_path):
    with tarfile.open(tmp_path / "t.tar", "w") as tar:
        data = encode(render(0, 0), "PNG")
        info = tarfile.TarInfo("k1.png")
        info.size = len(data)
        tar.addfile(info, io.BytesIO(data))
    with pytest.raises(DataError, match=r"t.tar::k1.png: no label member \(k1.cls or k1.label\)"):
        build_image_dataset(cfg(tmp_path / "t.tar"), tmp_path / "out")


def test_image_fields_load_from_yaml(tmp_path):
    (tmp_path / "c.yaml").write_text(
        "data:\n  source: s3://bucket/images/\n  image_size: 64\n  image_mode: L\n"
        "  storage_options: {endpoint_url: 'http://127.0.0.1:9000'}\n"
    )
    data = load_config(tmp_path / "c.yaml").data
    assert (data.image_size, data.image_mode) == (64, "L")
    assert data.storage_options == {"endpoint_url": "http://127.0.0.1:9000"}
    with pytest.raises(ConfigError, match=r"data.image_mode"):
        load_config(overrides=["data.image_mode=CMYK"])


# -- IDX (Fashion-MNIST's format) ---------------------------------------------------------------
def write_idx(path, array: np.ndarray) -> None:
    code = {np.uint8: 0x08, np.int32: 0x0C}[array.dtype.type]
    header = bytes([0, 0, code, array.ndim]) + np.asarray(array.shape, ">i4").tobytes()
    path.write_bytes(header + array.astype(array.dtype.newbyteorder(">")).tobytes())


def test_idx_files_read_and_become_an_image_folder(tmp_path):
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (30, 28, 28), dtype=np.uint8)
    labels = (np.arange(30) % 3).astype(np.uint8)
    write_idx(tmp_path / "x-idx3-ubyte", images)
    write_idx(tmp_path / "y-idx1-ubyte", labels)
    assert np.array_equal(read_idx(tmp_path / "x-idx3-ubyte"), images)
    written = idx_to_image_folder(
        tmp_path / "x-idx3-ubyte", tmp_path / "y-idx1-ubyte", tmp_path / "f", ["a", "b", "c"], 7
    )
    assert written == {"a": 7, "b": 7, "c": 7}
    back = np.asarray(Image.open(sorted((tmp_path / "f" / "b").glob("*.png"))[0]))
    assert np.array_equal(back, images[1])
    (tmp_path / "bad").write_bytes(b"\x00\x00\x08\x03" + np.asarray([9, 9, 9], ">i4").tobytes())
    with pytest.raises(DataError, match="bad: truncated"):
        read_idx(tmp_path / "bad")


def test_fashion_mnist_from_debian_builds_shards(tmp_path):
    from kubetrain.data.idx import FASHION_MNIST_DIR, fashion_mnist_files

    if not FASHION_MNIST_DIR.exists():
        pytest.skip("Debian's dataset-fashion-mnist is not installed (apt-get install it)")
    images, labels = fashion_mnist_files("t10k")
    written = idx_to_image_folder(images, labels, tmp_path / "f", FASHION_MNIST_CLASSES, 20)
    assert sorted(written) == sorted(FASHION_MNIST_CLASSES) and set(written.values()) == {20}
    manifest = build_image_dataset(cfg(tmp_path / "f", image_mode="L"), tmp_path / "out")
    assert manifest.meta["input_shape"] == [1, 28, 28]
    assert sum(manifest.num_samples(s) for s in manifest.splits) == 200
    assert manifest.provenance["num_skipped"] == 0
