from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from kubetrain.core.errors import DataError
from kubetrain.data import build_dataset, load_dataset
from kubetrain.data.config import DataConfig
from kubetrain.data.loader import ArrayDataset, GlobalBatchSampler, augment_images


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
    sizes = ds.meta.sizes
    assert sum(sizes.values()) == 1797
    assert sizes["val"] == sizes["test"] == 270
    assert ds.input_shape == [1, 8, 8]
    assert ds.meta.classes == [str(i) for i in range(10)]
    for split in ("train", "val", "test"):  # every class in every split, in proportion
        _, y = ds.split(split)
        share = np.bincount(y, minlength=10) / len(y)
        assert np.all(np.abs(share - 0.1) < 0.02)
    x_train, _ = ds.split("train")
    x_val, _ = ds.split("val")
    varying = x_train.std(axis=0) > 0
    assert np.allclose(x_train.mean(axis=0), 0, atol=1e-5)  # fitted on train ...
    assert not np.allclose(x_val.mean(axis=0)[varying], 0, atol=1e-3)  # ... not on val
    norm = ds.meta.normalization
    assert norm.kind == "standard" and len(norm.shift) == 64


def test_dataset_version_is_deterministic_and_tracks_config(tmp_path):
    a = build_dataset(DataConfig(), tmp_path / "a").meta.version
    b = build_dataset(DataConfig(), tmp_path / "b").meta.version
    c = build_dataset(DataConfig(seed=1), tmp_path / "c").meta.version
    assert a == b != c
    # how preprocess is spread over tasks does not change the table, nor its version
    fanned = DataConfig(parallel_tasks=3, max_parallel_tasks=2, convert_retries=0)
    assert build_dataset(fanned, tmp_path / "d").meta.version == a


def test_csv_with_string_labels(tmp_path):
    path = _csv(tmp_path, _frame())
    ds = build_dataset(DataConfig(source=str(path), label_column="kind"), tmp_path / "out")
    assert ds.meta.classes == ["cat", "dog", "eel"]
    assert ds.input_shape == [2]
    assert sum(ds.meta.sizes.values()) == 60


def test_csv_rows_with_missing_values_are_dropped(tmp_path):
    frame = _frame()
    frame.loc[[0, 5], "a"] = np.nan
    path = _csv(tmp_path, frame)
    ds = build_dataset(DataConfig(source=str(path), label_column="kind"), tmp_path / "out")
    assert sum(ds.meta.sizes.values()) == 58


def test_glob_reads_several_files_in_parallel_and_parquet_npz(tmp_path):
    _csv(tmp_path, _frame(30, seed=1), "part-1.csv")
    _csv(tmp_path, _frame(30, seed=2), "part-2.csv")
    cfg = DataConfig(source=str(tmp_path / "part-*.csv"), label_column="kind", num_workers=2)
    ds = build_dataset(cfg, tmp_path / "out")
    assert sum(ds.meta.sizes.values()) == 60 and len(ds.meta.files) == 2

    _frame().to_parquet(tmp_path / "d.parquet")
    pq = build_dataset(
        DataConfig(source=str(tmp_path / "d.parquet"), label_column="kind"), tmp_path / "pq"
    )
    assert pq.meta.classes == ["cat", "dog", "eel"]

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


def _epoch_batches(num_workers: int, prefetch: int, start_step: int = 0) -> list:
    import torch

    from kubetrain.data.loader import GlobalBatchSampler, make_train_loader

    rng = np.random.default_rng(0)
    x = rng.normal(size=(200, 64)).astype(np.float32)
    ds = ArrayDataset(x, np.arange(200) % 10, [1, 8, 8], augment={"shift": 2, "noise": 0.1})
    sampler = GlobalBatchSampler(200, 32, 1, 0, 2, seed=3)
    sampler.set_epoch(1)
    sampler.start_step = start_step
    loader = make_train_loader(ds, sampler, num_workers, prefetch)
    out = [(xb.clone(), yb.clone()) for xb, yb in loader]
    assert start_step or len(out) == len(loader)
    return [torch.cat([b[0].flatten() for b in out]), torch.cat([b[1] for b in out])]


@pytest.mark.parametrize(("workers", "prefetch"), [(0, 4), (1, 4), (2, 1)])
def test_every_loader_path_yields_the_same_augmented_batches(workers, prefetch):
    """In process (with or without the prefetch thread) or from worker processes in chunks of
    micro-batches: the same samples, the same augmentation, in the same order."""
    import torch

    reference = _epoch_batches(0, 0)
    got = _epoch_batches(workers, prefetch)
    assert torch.equal(got[1], reference[1]) and torch.equal(got[0], reference[0])
    resumed = _epoch_batches(workers, prefetch, start_step=3)  # mid-epoch: the same tail
    assert torch.equal(resumed[1], reference[1][3 * 32 :])


def test_prefetch_thread_stops_when_the_epoch_is_abandoned_and_passes_errors_on(monkeypatch):
    import threading

    from kubetrain.data.loader import GlobalBatchSampler, make_train_loader

    ds = ArrayDataset(np.zeros((64, 64), np.float32), np.zeros(64, np.int64), [1, 8, 8],
                      augment={"shift": 1, "noise": 0.0})  # fmt: skip
    sampler = GlobalBatchSampler(64, 8, 1, 0, 1, seed=0)
    batches = iter(make_train_loader(ds, sampler, 0, prefetch=2))
    next(batches)
    batches.close()  # what leaving the epoch early (an exception in the step) does
    assert not [t for t in threading.enumerate() if t.name == "kubetrain-prefetch"]

    from kubetrain.data import loader

    class Boom(Exception):
        pass

    def fail(*args, **kwargs):
        raise Boom("raised in the prefetch thread")

    monkeypatch.setattr(loader, "augment_images", fail)
    with pytest.raises(Boom, match="raised in the prefetch thread"):  # surfaces in the step
        list(make_train_loader(ds, sampler, 0, prefetch=2))
    assert not [t for t in threading.enumerate() if t.name == "kubetrain-prefetch"]


def test_digits_are_read_without_importing_scikit_learn_and_match_its_loader():
    import subprocess
    import sys

    from sklearn.datasets import load_digits as sklearn_digits

    from kubetrain.data.sources import load_digits

    x, y = load_digits()
    ref = sklearn_digits()
    assert x.dtype == np.float32 and y.dtype == np.int64
    assert np.array_equal(x, ref.data) and np.array_equal(y, ref.target)
    code = "import sys; from kubetrain.data.sources import load_digits; load_digits(); " \
           "print('sklearn' in sys.modules)"  # fmt: skip
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_classification_counts_the_confusion_matrix_by_true_row():
    from kubetrain.tasks.measure import classification

    y_true = np.array([0, 0, 1, 2, 2, 2])
    y_pred = np.array([0, 1, 1, 2, 0, 2])
    got = classification(y_true, y_pred, ["a", "b", "c", "d"])
    assert got["confusion_matrix"] == [[1, 1, 0, 0], [0, 1, 0, 0], [1, 0, 2, 0], [0, 0, 0, 0]]
    assert got["per_class_accuracy"] == {"a": 0.5, "b": 1.0, "c": 2 / 3, "d": None}
    assert got["accuracy"] == pytest.approx(4 / 6)


@pytest.mark.parametrize("seed", [0, 1, 7, 42])
def test_the_stratified_split_is_scikit_learns_without_importing_it(seed):
    from sklearn.model_selection import train_test_split

    from kubetrain.data.dataset import stratified_split

    rng = np.random.default_rng(seed)
    cases = [
        (np.repeat(np.arange(10), 180)[:1797], 0.3),  # digits-like: near-equal classes
        (np.repeat(np.arange(10), 180)[:1797], 0.5),
        (rng.integers(0, 3, 61), 0.3),  # ties in the remainders, broken by the RNG
        (np.array([0] * 50 + [1] * 7 + [2] * 3), 0.25),  # imbalanced
        (rng.integers(0, 7, 400), 0.15),
    ]
    for y, size in cases:
        idx = np.arange(100, 100 + len(y))  # not 0..n-1: indices come back, not positions
        ours = stratified_split(idx, y, size, seed)
        ref = train_test_split(idx, test_size=size, stratify=y, random_state=seed)
        for a, b in zip(ours, ref, strict=True):
            assert np.array_equal(a, b)  # order too: a second split starts from it
    code = "import sys, numpy as np; from kubetrain.data.dataset import stratified_split; " \
           "stratified_split(np.arange(30), np.arange(30) % 3, 0.3, 0); print('sklearn' in sys.modules)"  # fmt: skip
    import subprocess
    import sys

    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_a_split_too_small_for_its_classes_is_a_data_error():
    from kubetrain.data.dataset import split_indices

    with pytest.raises(DataError, match="smaller than the number of classes"):
        split_indices(np.arange(40) % 10, DataConfig(val_fraction=0.05, test_fraction=0.05))


# -- several files of one source: joined by column name --------------------------------------
def test_files_with_their_columns_in_another_order_are_joined_by_name(tmp_path):
    a, b = _frame(30, seed=1), _frame(30, seed=2)
    _csv(tmp_path, a, "part-1.csv")
    _csv(tmp_path, b[["kind", "b", "a"]], "part-2.csv")  # same columns, another order
    (tmp_path / "same").mkdir()
    _csv(tmp_path / "same", a, "part-1.csv")
    _csv(tmp_path / "same", b, "part-2.csv")
    cfg = dict(label_column="kind", normalize="none")
    mixed = build_dataset(DataConfig(source=str(tmp_path / "part-*.csv"), **cfg), tmp_path / "m")
    same = build_dataset(DataConfig(source=str(tmp_path / "same"), **cfg), tmp_path / "s")
    for name in ("x_train", "x_val", "x_test"):
        assert np.array_equal(mixed.arrays[name], same.arrays[name])
    # and the values really are the files' "a" and "b", not the text column shifted in
    x = np.concatenate([mixed.arrays[f"x_{s}"] for s in ("train", "val", "test")])
    expected = pd.concat([a, b])[["a", "b"]].to_numpy(np.float32)
    assert sorted(map(tuple, x.tolist())) == sorted(map(tuple, expected.tolist()))


@pytest.mark.parametrize(
    ("second", "expected"),
    [
        (lambda f: f.drop(columns=["b"]), "part-2.csv: missing column 'b' (that "),
        (lambda f: f.assign(c=1.0), "part-2.csv: extra column 'c' (not in "),
        (lambda f: f.rename(columns={"b": "B"}), "part-2.csv: missing column 'b'"),
        (lambda f: f.drop(columns=["kind"]), "part-2.csv: no label column 'kind'"),
    ],
    ids=["missing-column", "extra-column", "renamed-column", "no-label-in-one-file"],
)
def test_files_that_differ_in_columns_are_refused_naming_file_and_column(
    tmp_path, second, expected
):
    _csv(tmp_path, _frame(30, seed=1), "part-1.csv")
    _csv(tmp_path, second(_frame(30, seed=2)), "part-2.csv")
    out = tmp_path / "out"
    with pytest.raises(DataError) as info:
        build_dataset(DataConfig(source=str(tmp_path / "part-*.csv"), label_column="kind"), out)
    assert expected in str(info.value) and "\n" not in str(info.value)
    assert not out.exists()


def test_npz_files_must_agree_in_width_and_not_mix_with_tables(tmp_path):
    rng = np.random.default_rng(0)
    np.savez(tmp_path / "a.npz", x=rng.normal(size=(30, 4)), y=np.arange(30) % 3)
    np.savez(tmp_path / "b.npz", x=rng.normal(size=(30, 5)), y=np.arange(30) % 3)
    with pytest.raises(DataError, match=r"b\.npz: x has 5 features per row but .*a\.npz has 4"):
        build_dataset(DataConfig(source=str(tmp_path / "*.npz")), tmp_path / "o1")
    (tmp_path / "b.npz").unlink()
    _csv(tmp_path, _frame(30), "c.csv")
    with pytest.raises(DataError, match=r"a\.npz: \.npz features have no column names"):
        build_dataset(
            DataConfig(source=str(tmp_path / "*.*"), label_column="kind"), tmp_path / "o2"
        )


def test_a_folder_with_no_data_files_says_so(tmp_path):
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "notes.txt").write_text("not data")
    with pytest.raises(DataError, match=r"d: a directory with no readable data"):
        build_dataset(DataConfig(source=str(tmp_path / "d")), tmp_path / "o")


def test_a_parquet_file_with_a_duplicated_column_is_one_line(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    columns = [pa.array([1.0, 2.0]), pa.array([3.0, 4.0]), pa.array(["x", "y"])]
    pq.write_table(pa.Table.from_arrays(columns, names=["a", "a", "kind"]), tmp_path / "d.parquet")
    with pytest.raises(DataError, match=r"d\.parquet: cannot parse \(.*\ba\b") as info:
        build_dataset(
            DataConfig(source=str(tmp_path / "d.parquet"), label_column="kind"), tmp_path / "o"
        )
    assert "\n" not in str(info.value)


# -- non-finite features: dropped like missing values, counted --------------------------------
@pytest.mark.parametrize(
    "bad", [np.inf, -np.inf, 1e39, -3.5e38], ids=["inf", "-inf", "beyond-f32", "beyond-f32-neg"]
)
@pytest.mark.parametrize("suffix", ["csv", "parquet"])
def test_rows_with_non_finite_features_are_dropped_and_counted(tmp_path, caplog, bad, suffix):
    frame = _frame()
    frame.loc[[3, 7], "b"] = bad
    frame.loc[11, "a"] = np.nan
    path = tmp_path / f"d.{suffix}"
    frame.to_csv(path, index=False) if suffix == "csv" else frame.to_parquet(path)
    with caplog.at_level("WARNING", logger="kubetrain.data.sources"):
        ds = build_dataset(DataConfig(source=str(path), label_column="kind"), tmp_path / "out")
    assert sum(ds.meta.sizes.values()) == 57
    for split in ("train", "val", "test"):  # nothing non-finite reaches the artifact
        assert np.isfinite(ds.split(split)[0]).all()
    assert np.isfinite(ds.meta.normalization.scale).all()
    (record,) = [r for r in caplog.records if "dropped" in r.getMessage()]
    message = record.getMessage()
    assert f"dropped 3 of 60 rows from {path}" in message
    assert "1 with missing values" in message and "2 with infinite values" in message


def test_non_finite_npz_features_are_dropped_too(tmp_path):
    rng = np.random.default_rng(0)
    x = rng.normal(size=(40, 3))
    x[0, 1], x[1, 2] = np.inf, 1e300
    np.savez(tmp_path / "d.npz", x=x, y=np.arange(40) % 4)
    ds = build_dataset(DataConfig(source=str(tmp_path / "d.npz")), tmp_path / "out")
    assert sum(ds.meta.sizes.values()) == 38
    assert all(np.isfinite(ds.split(s)[0]).all() for s in ("train", "val", "test"))


def test_a_source_with_no_finite_row_is_refused(tmp_path):
    frame = _frame()
    frame["a"] = np.inf
    with pytest.raises(DataError, match="every row has a missing or non-finite value"):
        build_dataset(
            DataConfig(source=str(_csv(tmp_path, frame)), label_column="kind"), tmp_path / "o"
        )
