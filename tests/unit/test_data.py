from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from kubetrain.config import DataConfig
from kubetrain.data import build_dataset, load_dataset
from kubetrain.data.loader import ArrayDataset, GlobalBatchSampler, augment_images
from kubetrain.errors import DataError


def _csv(tmp_path, frame: pd.DataFrame, name="data.csv"):
    path = tmp_path / name
    frame.to_csv(path, index=False)
    return path


def _write(tmp_path, name: str, text: str):
    path = tmp_path / name
    path.write_text(text)
    return path


def _frame(n=60, seed=0, labels=("cat", "dog", "eel")):
    rng = np.random.default_rng(seed)
    y = np.array(labels)[np.arange(n) % len(labels)]
    return pd.DataFrame({"a": rng.normal(size=n), "b": rng.normal(size=n) * 10 + 3, "kind": y})


def test_digits_split_is_stratified_seeded_and_normalised_on_train(digits_dir):
    ds = load_dataset(digits_dir)
    sizes = ds.meta["sizes"]
    assert sum(sizes.values()) == 1797
    assert sizes["val"] == sizes["test"] == 270
    assert ds.input_shape == [1, 8, 8]
    assert ds.meta["classes"] == [str(i) for i in range(10)]
    for split in ("train", "val", "test"):  # every class in every split, in proportion
        _, y = ds.split(split)
        share = np.bincount(y, minlength=10) / len(y)
        assert np.all(np.abs(share - 0.1) < 0.02)
    x_train, _ = ds.split("train")
    x_val, _ = ds.split("val")
    varying = x_train.std(axis=0) > 0
    assert np.allclose(x_train.mean(axis=0), 0, atol=1e-5)  # fitted on train ...
    assert not np.allclose(x_val.mean(axis=0)[varying], 0, atol=1e-3)  # ... not on val
    norm = ds.meta["normalization"]
    assert norm["kind"] == "standard" and len(norm["shift"]) == 64


def test_dataset_version_is_deterministic_and_tracks_config(tmp_path):
    a = build_dataset(DataConfig(), tmp_path / "a").meta["version"]
    b = build_dataset(DataConfig(), tmp_path / "b").meta["version"]
    c = build_dataset(DataConfig(seed=1), tmp_path / "c").meta["version"]
    assert a == b != c


def test_csv_with_string_labels(tmp_path):
    path = _csv(tmp_path, _frame())
    ds = build_dataset(DataConfig(source=str(path), label_column="kind"), tmp_path / "out")
    assert ds.meta["classes"] == ["cat", "dog", "eel"]
    assert ds.input_shape == [2]
    assert sum(ds.meta["sizes"].values()) == 60


def test_csv_rows_with_missing_values_are_dropped(tmp_path):
    frame = _frame()
    frame.loc[[0, 5], "a"] = np.nan
    path = _csv(tmp_path, frame)
    ds = build_dataset(DataConfig(source=str(path), label_column="kind"), tmp_path / "out")
    assert sum(ds.meta["sizes"].values()) == 58


def test_glob_reads_several_files_in_parallel_and_parquet_npz(tmp_path):
    _csv(tmp_path, _frame(30, seed=1), "part-1.csv")
    _csv(tmp_path, _frame(30, seed=2), "part-2.csv")
    cfg = DataConfig(source=str(tmp_path / "part-*.csv"), label_column="kind", num_workers=2)
    ds = build_dataset(cfg, tmp_path / "out")
    assert sum(ds.meta["sizes"].values()) == 60 and len(ds.meta["files"]) == 2

    _frame().to_parquet(tmp_path / "d.parquet")
    pq = build_dataset(
        DataConfig(source=str(tmp_path / "d.parquet"), label_column="kind"), tmp_path / "pq"
    )
    assert pq.meta["classes"] == ["cat", "dog", "eel"]

    rng = np.random.default_rng(0)
    np.savez(tmp_path / "d.npz", x=rng.normal(size=(40, 2, 3, 3)), y=np.arange(40) % 4)
    npz = build_dataset(
        DataConfig(source=str(tmp_path / "d.npz"), image_shape=[2, 3, 3]), tmp_path / "npz"
    )
    assert npz.input_shape == [2, 3, 3] and npz.num_classes == 4


@pytest.mark.parametrize(
    ("make", "label", "expected"),
    [
        (lambda p: p / "absent.csv", "kind", "absent.csv: no such file"),
        (lambda p: _write(p, "empty.csv", ""), "kind", "is empty"),
        (lambda p: _write(p, "h.csv", "a,kind\n"), "kind", "no rows"),
        (lambda p: _csv(p, _frame()), "label", "no label column 'label' (columns: a, b, kind)"),
        (
            lambda p: _csv(p, _frame().assign(colour="red")),
            "kind",
            "non-numeric feature column(s) colour",
        ),
        (lambda p: _write(p, "x.txt", "1"), "kind", "unsupported file"),
        (
            lambda p: _csv(p, _frame(labels=("a",))),
            "kind",
            "needs at least 2 classes",
        ),
    ],
    ids=["missing", "empty", "header-only", "no-label", "text-feature", "suffix", "one-class"],
)
def test_bad_data_gets_one_clear_line(tmp_path, make, label, expected):
    path = make(tmp_path)
    out = tmp_path / "out"
    with pytest.raises(DataError) as info:
        build_dataset(DataConfig(source=str(path), label_column=label), out)
    assert expected in str(info.value)
    assert "\n" not in str(info.value)
    assert not out.exists() or not any(out.iterdir())  # nothing half-written


def test_rare_class_cannot_be_stratified(tmp_path):
    frame = _frame(30)
    frame.loc[0, "kind"] = "zebra"
    with pytest.raises(DataError, match="at least 3 per class"):
        build_dataset(
            DataConfig(source=str(_csv(tmp_path, frame)), label_column="kind"), tmp_path / "o"
        )


@pytest.mark.parametrize(("world", "accum"), [(2, 1), (4, 2), (3, 1)])
def test_ranks_together_see_exactly_the_single_process_batches(world, accum):
    n, batch = 203, 24
    single = list(GlobalBatchSampler(n, batch, 1, 0, accum, seed=3))
    ranks = [list(GlobalBatchSampler(n, batch, world, r, accum, seed=3)) for r in range(world)]
    steps = n // batch
    assert all(len(r) == steps * accum for r in ranks)
    for step in range(steps):
        want = set()
        for micro in range(accum):
            want |= set(single[step * accum + micro][1].tolist())
        got = set()
        for r in ranks:
            for micro in range(accum):
                got |= set(r[step * accum + micro][1].tolist())
        assert got == want and len(want) == batch


def test_augmentation_shifts_and_is_reproducible():
    x = np.zeros((8, 1, 8, 8), dtype=np.float32)
    x[:, 0, 4, 4] = 1.0
    ds = ArrayDataset(x.reshape(8, -1), np.zeros(8, dtype=np.int64), [1, 8, 8],
                      augment={"shift": 1, "noise": 0.0}, seed=0)  # fmt: skip
    import torch

    idx = torch.arange(8)
    a, _ = ds.__getitems__((0, idx))
    b, _ = ds.__getitems__((0, idx))
    c, _ = ds.__getitems__((1, idx))
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert torch.all(a.sum(dim=(1, 2, 3)) == 1)  # a shift keeps the pixel (no wrap-around)
    peaks = {tuple(int(v) for v in (img[0] == 1).nonzero()[0]) for img in a}
    assert peaks <= {(r, c) for r in (3, 4, 5) for c in (3, 4, 5)} and len(peaks) > 1
    noisy = augment_images(a, 0, 0, 0, shift=0, noise=0.1)
    assert 0.05 < (noisy - a).std() < 0.2
