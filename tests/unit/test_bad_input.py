"""The catalogue of bad inputs and faults (issue #11): one line, the right exit code, nothing left.

Every case runs the real CLI entry point (``kubetrain.cli.main``) in this process and checks the
promise the README makes:

- the exit code: 2 for a bad config or argument, 1 for bad data, a failed outside service or a
  fault (argparse's own usage errors exit 2 too);
- stderr ends in one line, ``kubetrain...``, that names the field or the file;
- no traceback anywhere in stderr;
- no ``metrics.json`` under the case's directory: nothing that looks like a result.

Cases are grouped by class: CONFIG (the model checked before the first step and on its data
included), CONFIG_FILES, PATHS (CLI arguments, ``runs`` and ``compare`` too), DATA (text
included), a cluster that is not there, FAULTS (full disks, stale temporary files, signals),
object storage that cannot be read and compiling that never reads data, images (decoding bombs,
missing files, transforms, mixed sizes), figures that must not contradict each other, what
preprocessing leaves out, and the run experience (file modes, temporary folders, a tracking
server that is down). Cases that need a whole process (signals, ``kubetrain run``'s pipeline,
moto's S3 server) are in tests/integration/test_bad_input_run.py; the answers of a real
Kubernetes API server in tests/cluster/test_bad_input_cluster.py. Image cases are marked
``vision`` (they need torchvision: ``make test-vision``).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from kubetrain.cli import main
from kubetrain.launch.local import cpu_cores

# -- the check every case makes ---------------------------------------------------------------


def run_main(argv: list[str], capsys) -> tuple[int, str]:
    """``kubetrain ARGV`` in this process: its exit code and stderr."""
    try:
        code = main(argv)
    except SystemExit as exc:  # argparse's usage errors
        code = exc.code if isinstance(exc.code, int) else 1
    return code, capsys.readouterr().err


def assert_one_line(code: int, err: str, want_code: int, names: str, root: Path) -> str:
    """The catalogue's promise; returns the last line."""
    assert code == want_code, err
    assert "Traceback" not in err, err
    lines = [line for line in err.splitlines() if line.strip()]
    assert lines, "nothing said"
    last = lines[-1]
    assert last.startswith("kubetrain"), err
    assert names in last, f"expected {names!r} in the last line: {last!r}"
    assert not list(root.rglob("metrics.json")), "a result was left behind"
    return last


# -- builders of the files the cases read -----------------------------------------------------


def frame(n: int = 60, seed: int = 0, labels=("cat", "dog", "eel")) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    y = np.array(labels)[np.arange(n) % len(labels)]
    return pd.DataFrame({"a": rng.normal(size=n), "b": rng.normal(size=n), "kind": y})


def csv(tmp: Path, name: str, data: pd.DataFrame) -> None:
    data.to_csv(tmp / name, index=False)


def text(tmp: Path, name: str, content: str | bytes) -> None:
    path = tmp / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(content.encode() if isinstance(content, str) else content)


def npz(tmp: Path, name: str, width: int, **extra) -> None:
    rng = np.random.default_rng(0)
    arrays = {"x": rng.normal(size=(30, width)), "y": np.arange(30) % 3, **extra}
    np.savez(tmp / name, **arrays)


def run_dirs(tmp: Path, *names: str) -> None:
    """Directories marked as `kubetrain run` marks its run directories (nothing inside)."""
    for name in names:
        text(tmp, f"{name}/.kubetrain-run", "")


def fake_artifacts(tmp: Path, *names: str) -> None:
    """Directories with only an artifact's marker file: enough to pass the path checks."""
    markers = {"m": "model.json", "q": "quant.json", "t": "best_params.json", "ds": "meta.json"}
    for name in names:
        (tmp / name).mkdir()
        (tmp / name / markers[name]).write_text("{}")


# -- the table --------------------------------------------------------------------------------


@dataclass(frozen=True)
class Case:
    """``argv`` may hold ``{tmp}`` (the case's directory) and ``{digits}`` (a dataset artifact);
    ``setup(tmp)`` writes the files it reads."""

    argv: list[str]
    code: int
    names: str
    setup: Callable[[Path], None] | None = None
    kept: dict[str, str] = field(default_factory=dict)  # files that must be left as they were


# A valid meta.json of a tabular dataset, for cases that damage the rest of the artifact.
TABULAR_META = json.dumps(
    {"kind": "tabular", "version": "v1", "source": "digits", "classes": ["a", "b"],
     "input_shape": [2], "sizes": {"train": 2, "val": 1, "test": 1}, "config": {},
     "files": [], "num_features": 2, "class_counts": [2, 2],
     "normalization": {"kind": "standard", "shift": [0, 0], "scale": [1, 1]}}
)  # fmt: skip


def _sets(*settings: str) -> list[str]:
    return [arg for s in settings for arg in ("--set", s)]


def show(*settings: str) -> list[str]:
    return ["config", "show", *_sets(*settings)]


def prep(*settings: str) -> list[str]:
    return ["preprocess", "--output", "{tmp}/ds", *_sets(*settings)]


def source(path: str, *settings: str) -> list[str]:
    return prep(f"data.source={{tmp}}/{path}", "data.label_column=kind", *settings)


CONFIG = {
    "lr-negative": Case(show("train.lr=-1"), 2, "train.lr: Input should be greater than 0"),
    "lr-inf": Case(show("train.lr=.inf"), 2, "train.lr: Input should be a finite number"),
    "lr-nan-text": Case(show("train.lr=nan"), 2, "train.lr: Input should be a finite number"),
    "nan-in-search-list": Case(
        show("tune.parameters.1.feasibleSpace.list=[.nan, 0.1]"),
        2,
        "tune.parameters.1.feasibleSpace.list: Input should be a finite number",
    ),
    "inf-bar": Case(show("evaluate.min_accuracy=-.inf"), 2, "evaluate.min_accuracy"),
    "inf-search-bound": Case(
        show("tune.parameters.0.feasibleSpace.max=.inf"), 2, "tune.parameters.0.feasibleSpace.max"
    ),
    "epochs-true": Case(show("train.epochs=true"), 2, "train.epochs: Input should be a number"),
    "epochs-fraction": Case(show("train.epochs=2.5"), 2, "train.epochs"),
    "switch-as-number": Case(show("train.compile=1"), 2, "train.compile: Input should be true"),
    "switch-as-text": Case(show('data.augment="on"'), 2, "data.augment: Input should be true"),
    "bool-in-int-list": Case(show("model.hidden_sizes=[true, 8]"), 2, "model.hidden_sizes"),
    "nproc-zero": Case(show("train.nproc=0"), 2, "train.nproc"),
    "unknown-field": Case(show("train.learning_rate=0.1"), 2, "train.learning_rate: no such"),
    "unknown-section": Case(show("trainer.lr=0.1"), 2, "trainer: no such field"),
    "bad-choice": Case(show("model.name=resnet"), 2, "model.name"),
    "fraction-out-of-range": Case(show("data.val_fraction=0.6"), 2, "data.val_fraction"),
    "batch-not-divisible": Case(show("train.batch_size=63"), 2, "batch_size 63 must be divisible"),
    "image-shape-negative": Case(show("data.image_shape=[1,-8,8]"), 2, "data.image_shape"),
    "image-shape-zero": Case(show("data.image_shape=[0,8,8]"), 2, "data.image_shape"),
    "image-shape-empty": Case(show("data.image_shape=[]"), 2, "data.image_shape"),
    "empty-search-space": Case(
        show("tune.parameters=[]"), 2, "tune.parameters: an empty search space"
    ),
    "cluster-only-algorithm": Case(show("tune.algorithm=enas"), 2, "tune.algorithm"),
    "search-names-no-field": Case(
        show("tune.parameters.0.name=train.nope"), 2, "tune.parameters.0.name"
    ),
    "gpus-vs-nproc": Case(show("cluster.num_gpus=1"), 2, "must equal cluster.num_gpus"),
    "registry-needed": Case(show("retrain.only_if_changed=true"), 2, "retrain.registry"),
    "namespace-not-dns": Case(show("cluster.namespace=Team_A"), 2, "cluster.namespace"),
    "quantity-not-k8s": Case(show("cluster.memory=lots"), 2, "cluster.memory"),
    "set-without-value": Case(show("train.epochs"), 2, "expected KEY=VALUE"),
    "metric-of-another-task": Case(
        show("evaluate.metric=bleu"),
        2,
        "evaluate.metric: 'bleu' does not apply to tabular or images data",
    ),
    "metric-of-another-task-on-run": Case(
        ["run", "--output", "{tmp}/r", *_sets("evaluate.metric=macro_f1")],
        2,
        "evaluate.metric: 'macro_f1' does not apply",
    ),
    "metric-top5-on-a-declared-table": Case(
        show("data.kind=tabular", "evaluate.metric=top5_accuracy"),
        2,
        "'top5_accuracy' does not apply to tabular data",
    ),
    "set-duplicate-key": Case(show("cluster.env={A: x, A: y}"), 2, "duplicate key 'A'"),
    "kind-images-with-seq2seq-task": Case(
        show("data.kind=images", "data.task=seq2seq"),
        2,
        "data.kind 'images' is classification data; data.task is 'seq2seq'",
    ),
    "kind-disagrees-with-task": Case(
        show("data.kind=seq2seq", "data.task=text_classification"),
        2,
        "data.kind 'seq2seq' and data.task 'text_classification' disagree",
    ),
    # a section's fields are fixed, a free-form mapping's keys are not (see test_set_reaches_...)
    "set-misspelt-mapping": Case(
        show("model.name=torchvision:resnet18", "model.kwarg.dropout=0.1"),
        2,
        "model.kwarg: no such field",
    ),
    # the model is built once, before any worker, on the dataset it trains on
    "train-factory-head-too-wide": Case(
        [
            "train",
            "--dataset",
            "{digits}",
            "--output",
            "{tmp}/m",
            *_sets("model.name=vision_factory:head_of", "model.kwargs.extra=5"),
        ],
        2,
        "model.name: vision_factory:head_of gives 15 outputs per sample but the data has 10 "
        "classes",
    ),
    "train-factory-head-too-narrow": Case(
        [
            "train",
            "--dataset",
            "{digits}",
            "--output",
            "{tmp}/m",
            *_sets(
                "model.name=vision_factory:head_of",
                "model.kwargs.extra=-1",
                "train.nproc=2",
                "train.batch_size=64",
            ),
        ],
        2,
        "model.name: vision_factory:head_of gives 9 outputs per sample but the data has 10",
    ),
    "tune-factory-head-too-wide": Case(
        [
            "tune",
            "--dataset",
            "{digits}",
            "--output",
            "{tmp}/t",
            *_sets("model.name=vision_factory:head_of", "model.kwargs.extra=5"),
        ],
        2,
        "model.name: vision_factory:head_of gives 15 outputs per sample",
    ),
    "train-factory-fails-on-the-inputs": Case(
        [
            "train",
            "--dataset",
            "{digits}",
            "--output",
            "{tmp}/m",
            *_sets("model.name=vision_factory:rgb_only"),
        ],
        2,
        "model.name: vision_factory:rgb_only fails on this data's inputs (RuntimeError",
    ),
    # the same rules hold on the steps and on `run`, before anything is written
    "train-step-lr-inf": Case(
        ["train", "--dataset", "{digits}", "--output", "{tmp}/m", *_sets("train.lr=.inf")],
        2,
        "train.lr",
    ),
    "preprocess-step-image-shape": Case(prep("data.image_shape=[1,-8,8]"), 2, "data.image_shape"),
    "run-epochs-true": Case(
        ["run", "--output", "{tmp}/r", *_sets("train.epochs=true")], 2, "epochs"
    ),
    "run-empty-search-space": Case(
        ["run", "--output", "{tmp}/r", *_sets("tune.parameters=[]")], 2, "tune.parameters"
    ),
}

CONFIG_FILES = {
    "missing": Case(["config", "show", "--config", "{tmp}/nope.yaml"], 2, "nope.yaml: no such"),
    "a-directory": Case(
        ["config", "show", "--config", "{tmp}/conf"],
        2,
        "conf: is a directory, not a YAML config file",
        setup=lambda t: (t / "conf").mkdir(),
    ),
    "not-utf8": Case(
        ["config", "show", "--config", "{tmp}/c.yaml"],
        2,
        "c.yaml: not UTF-8 text (byte 0xe9",
        setup=lambda t: text(t, "c.yaml", "train:\n  lr: 0.1  # café\n".encode("latin-1")),
    ),
    "duplicate-section": Case(
        ["config", "show", "--config", "{tmp}/c.yaml"],
        2,
        "c.yaml:4: duplicate key 'train' (first on line 1)",
        setup=lambda t: text(t, "c.yaml", "train:\n  lr: 0.1\ndata: {}\ntrain:\n  epochs: 2\n"),
    ),
    "duplicate-field": Case(
        ["train", "--dataset", "{digits}", "--output", "{tmp}/m", "--config", "{tmp}/c.yaml"],
        2,
        "c.yaml:3: duplicate key 'epochs' (first on line 2)",
        setup=lambda t: text(t, "c.yaml", "train:\n  epochs: 2\n  epochs: 3\n"),
    ),
    "not-yaml": Case(
        ["config", "show", "--config", "{tmp}/c.yaml"],
        2,
        "c.yaml:3: not valid YAML",
        setup=lambda t: text(t, "c.yaml", "train:\n  lr: [0.1\n"),
    ),
    "top-level-list": Case(
        ["config", "show", "--config", "{tmp}/c.yaml"],
        2,
        "the top level must be a mapping",
        setup=lambda t: text(t, "c.yaml", "- train\n"),
    ),
    "unknown-field-in-file": Case(
        ["run", "--output", "{tmp}/r", "--config", "{tmp}/c.yaml"],
        2,
        "train.epochz: unknown field",
        setup=lambda t: text(t, "c.yaml", "train:\n  epochz: 2\n"),
    ),
}

PATHS = {
    "output-is-a-file": Case(
        ["preprocess", "--output", "{tmp}/f"],
        2,
        "--output {tmp}/f: exists and is a file",
        setup=lambda t: text(t, "f", "keep me"),
        kept={"f": "keep me"},
    ),
    "output-under-a-file": Case(
        ["train", "--dataset", "{digits}", "--output", "{tmp}/f/model"],
        2,
        "is a file, not a directory",
        setup=lambda t: text(t, "f", "keep me"),
        kept={"f": "keep me"},
    ),
    "run-output-is-a-file": Case(
        ["run", "--output", "{tmp}/f"],
        2,
        "--output {tmp}/f: exists and is a file",
        setup=lambda t: text(t, "f", "keep me"),
        kept={"f": "keep me"},
    ),
    "run-output-foreign-dir": Case(
        ["run", "--output", "{tmp}/mine"],
        1,
        "not a kubetrain run directory",
        setup=lambda t: text(t, "mine/thesis.tex", "keep me"),
        kept={"mine/thesis.tex": "keep me"},
    ),
    "compile-output-is-a-dir": Case(
        ["compile", "-o", "{tmp}/d"],
        2,
        "--output {tmp}/d: is a directory",
        setup=lambda t: (t / "d").mkdir(),
    ),
    "config-docs-output-is-a-dir": Case(
        ["config", "docs", "-o", "{tmp}/d"],
        2,
        "--output {tmp}/d: is a directory",
        setup=lambda t: (t / "d").mkdir(),
    ),
    "config-docs-output-under-a-file": Case(
        ["config", "docs", "-o", "{tmp}/f/configuration.md"],
        2,
        "--output {tmp}/f: exists and is a file",
        setup=lambda t: text(t, "f", "keep me"),
        kept={"f": "keep me"},
    ),
    "dataset-missing": Case(
        ["train", "--dataset", "{tmp}/none", "--output", "{tmp}/m"], 1, "none: no such directory"
    ),
    "dataset-is-a-file": Case(
        ["tune", "--dataset", "{tmp}/f", "--output", "{tmp}/t"],
        1,
        "f: is a file, not a dataset artifact directory",
        setup=lambda t: text(t, "f", "x"),
    ),
    "dataset-not-an-artifact": Case(
        ["train", "--dataset", "{tmp}", "--output", "{tmp}/m"], 1, "not a dataset artifact"
    ),
    "dataset-corrupt-arrays": Case(
        ["train", "--dataset", "{tmp}/ds", "--output", "{tmp}/m", *_sets("train.nproc=1")],
        1,
        "ds/data.npz: unreadable",
        setup=lambda t: (
            text(t, "ds/meta.json", TABULAR_META),
            text(t, "ds/data.npz", "PK garbage"),
        ),
    ),
    "dataset-corrupt-meta": Case(
        ["train", "--dataset", "{tmp}/ds", "--output", "{tmp}/m", *_sets("train.nproc=1")],
        1,
        "ds/meta.json: not valid JSON",
        setup=lambda t: (text(t, "ds/meta.json", '{"format_'), text(t, "ds/data.npz", "")),
    ),
    "params-is-a-dir": Case(
        ["train", "--dataset", "{digits}", "--params", "{tmp}", "--output", "{tmp}/m"],
        1,
        "is a directory, not a best_params.json file",
    ),
    "params-missing": Case(
        ["train", "--dataset", "{digits}", "--params", "{tmp}/b.json", "--output", "{tmp}/m"],
        1,
        "b.json: no such file",
    ),
    "model-not-an-artifact": Case(
        ["quantize", "--dataset", "{digits}", "--model", "{tmp}", "--output", "{tmp}/q"],
        1,
        "not a model artifact (no model.json)",
    ),
    "quantized-missing": Case(
        [
            "evaluate",
            "--dataset",
            "{digits}",
            "--model",
            "{tmp}/m",
            "--quantized",
            "{tmp}/q",
            "--output",
            "{tmp}/e",
        ],
        1,
        "q: no such directory (expected a quantized model artifact)",
        setup=lambda t: fake_artifacts(t, "m"),
    ),
    "tune-dir-not-an-artifact": Case(
        [
            "evaluate",
            "--dataset",
            "{digits}",
            "--model",
            "{tmp}/m",
            "--quantized",
            "{tmp}/q",
            "--tune",
            "{tmp}/m",
            "--output",
            "{tmp}/e",
        ],
        1,
        "not a tune artifact (no best_params.json)",
        setup=lambda t: fake_artifacts(t, "m", "q"),
    ),
    "unknown-command": Case(["trian"], 2, "invalid choice: 'trian'"),
    "unknown-runner": Case(["run", "--runner", "k8s"], 2, "argument --runner: invalid choice"),
    "missing-argument": Case(["train", "--output", "{tmp}/m"], 2, "--dataset"),
    "schedule-without-cron": Case(["schedule", "--name", "n"], 2, "--cron"),
    "submit-without-host": Case(["submit", "--host", ""], 1, "submit: give --host URL"),
    # `runs` and `compare`: their arguments are usage errors too (exit 2, as the README says)
    "runs-root-missing": Case(["runs", "--root", "{tmp}/nowhere"], 2, "nowhere: no such directory"),
    "compare-one-run": Case(
        ["compare", "a", "--root", "{tmp}"],
        2,
        "compare: give at least two runs",
        setup=lambda t: run_dirs(t, "a"),
    ),
    "compare-unknown-run": Case(
        ["compare", "a", "ghost", "--root", "{tmp}"],
        2,
        "ghost: not a run directory",
        setup=lambda t: run_dirs(t, "a"),
    ),
    "compare-output-is-a-dir": Case(
        ["compare", "a", "b", "--root", "{tmp}", "-o", "{tmp}/d"],
        2,
        "--output {tmp}/d: is a directory",
        setup=lambda t: (run_dirs(t, "a", "b"), (t / "d").mkdir()),
    ),
    "compare-output-under-a-file": Case(
        ["compare", "a", "b", "--root", "{tmp}", "-o", "{tmp}/f/c.html"],
        2,
        "--output {tmp}/f: exists and is a file",
        setup=lambda t: (run_dirs(t, "a", "b"), text(t, "f", "keep me")),
        kept={"f": "keep me"},
    ),
}

DATA = {
    "source-missing": Case(source("missing.csv"), 1, "missing.csv: no such file"),
    "source-empty": Case(prep("data.source="), 2, "data.source: empty"),
    "source-dir-without-data": Case(
        source("d"),
        1,
        "d: a directory with no readable data",
        setup=lambda t: text(t, "d/README.txt", "no data here"),
    ),
    "file-empty": Case(
        source("e.csv"), 1, "e.csv: the file is empty", lambda t: text(t, "e.csv", "")
    ),
    "header-only": Case(
        source("h.csv"),
        1,
        "h.csv: the file has a header but no rows",
        lambda t: text(t, "h.csv", "a,kind\n"),
    ),
    "no-label-column": Case(
        prep("data.source={tmp}/d.csv"),
        1,
        "d.csv: no label column 'label'",
        lambda t: csv(t, "d.csv", frame()),
    ),
    "text-feature": Case(
        source("d.csv"),
        1,
        "non-numeric feature column(s) colour",
        lambda t: csv(t, "d.csv", frame().assign(colour="red")),
    ),
    "unsupported-suffix": Case(
        source("d.txt"), 1, "d.txt: unsupported file type", lambda t: text(t, "d.txt", "1")
    ),
    "rare-class": Case(
        source("d.csv"),
        1,
        "at least 3 per class",
        lambda t: csv(t, "d.csv", frame(30).assign(kind=lambda f: f.kind.where(f.index > 0, "z"))),
    ),
    "glob-missing-column": Case(
        source("part-*.csv"),
        1,
        "part-2.csv: missing column 'b'",
        lambda t: (
            csv(t, "part-1.csv", frame(30)),
            csv(t, "part-2.csv", frame(30, 1).drop(columns=["b"])),
        ),
    ),
    "glob-extra-column": Case(
        source("part-*.csv"),
        1,
        "part-2.csv: extra column 'c'",
        lambda t: (csv(t, "part-1.csv", frame(30)), csv(t, "part-2.csv", frame(30, 1).assign(c=1))),
    ),
    "folder-renamed-column": Case(
        source("parts"),
        1,
        "missing column 'b'",
        lambda t: (
            (t / "parts").mkdir(),
            csv(t, "parts/1.csv", frame(30)),
            csv(t, "parts/2.csv", frame(30, 1).rename(columns={"b": "B"})),
        ),
    ),
    "npz-width-mismatch": Case(
        prep("data.source={tmp}/*.npz"),
        1,
        "b.npz: x has 5 features per row",
        lambda t: (npz(t, "a.npz", 4), npz(t, "b.npz", 5)),
    ),
    "npz-mixed-with-csv": Case(
        source("*.*"),
        1,
        ".npz features have no column names",
        lambda t: (npz(t, "a.npz", 2), csv(t, "b.csv", frame(30))),
    ),
    "npz-without-x-y": Case(
        prep("data.source={tmp}/a.npz"),
        1,
        "a.npz: an .npz needs arrays 'x' and 'y'",
        lambda t: np.savez(t / "a.npz", features=np.zeros((3, 2))),
    ),
    "all-rows-non-finite": Case(
        source("d.csv"),
        1,
        "every row has a missing or non-finite value",
        lambda t: csv(t, "d.csv", frame().assign(a=np.inf)),
    ),
    "image-shape-product": Case(
        source("d.csv", "data.image_shape=[1,3,3]"),
        1,
        "data.image_shape [1, 3, 3] has 9 values",
        lambda t: csv(t, "d.csv", frame()),
    ),
    "csv-not-utf8": Case(
        source("d.csv"),
        1,
        "d.csv: cannot parse",
        lambda t: text(t, "d.csv", "a,kind\n1,caf\xe9\n".encode("latin-1")),
    ),
    "parquet-duplicate-column": Case(
        source("d.parquet"), 1, "d.parquet: cannot parse", lambda t: _duplicate_parquet(t)
    ),
    # text: the same rules as tables and images
    "text-one-class": Case(
        prep("data.task=text_classification", "data.source={tmp}/t.csv"),
        1,
        "t.csv: needs at least 2 classes in column 'label', found 1 ('spam')",
        lambda t: text(t, "t.csv", "text,label\n" + "".join(f"mail {i},spam\n" for i in range(40))),
    ),
    "seq2seq-every-target-empty": Case(
        prep("data.task=seq2seq", "data.source={tmp}/p.jsonl", "data.target_column=german"),
        1,
        "p.jsonl: no usable training text (40 rows read: every target in column 'german' is empty)",
        lambda t: text(
            t,
            "p.jsonl",
            "".join(json.dumps({"text": f"line {i}", "german": ""}) + "\n" for i in range(40)),
        ),
    ),
    # `run` checks the data before it writes anything (preflight)
    "run-torchvision-on-tabular-data": Case(
        [
            "run",
            "--output",
            "{tmp}/r",
            *_sets(
                "data.source={tmp}/d.csv",
                "data.label_column=kind",
                "model.name=torchvision:resnet18",
            ),
        ],
        2,
        "model.name: torchvision:resnet18 needs image data (C,H,W) and this data is not images",
        lambda t: csv(t, "d.csv", frame()),
    ),
    "run-factory-not-importable": Case(
        ["run", "--output", "{tmp}/r", *_sets("model.name=no_such_pkg.models:net")],
        2,
        "model.name: cannot import module 'no_such_pkg.models'",
    ),
    "run-factory-not-callable": Case(
        ["run", "--output", "{tmp}/r", *_sets("model.name=vision_factory:NOT_CALLABLE")],
        2,
        "model.name: module 'vision_factory' has a non-callable attribute 'NOT_CALLABLE'",
    ),
    "run-hf-directory-missing": Case(
        [
            "run",
            "--output",
            "{tmp}/r",
            *_sets(
                "data.task=text_classification",
                "data.source={tmp}/t.csv",
                "model.name=hf:{tmp}/no-model",
            ),
        ],
        2,
        "model.name: hf:{tmp}/no-model: no such directory",
        lambda t: text(t, "t.csv", "text,label\n" + "".join(f"m {i},{i % 2}\n" for i in range(40))),
    ),
    "run-weights-missing": Case(
        [
            "run",
            "--output",
            "{tmp}/r",
            *_sets("model.name=vision_factory:head_of", "model.weights={tmp}/w.pt"),
        ],
        2,
        "model.weights: {tmp}/w.pt: no such file",
    ),
    "run-glob-missing-column": Case(
        [
            "run",
            "--output",
            "{tmp}/r",
            *_sets("data.source={tmp}/part-*.csv", "data.label_column=kind"),
        ],
        1,
        "part-2.csv: missing column 'b'",
        lambda t: (
            csv(t, "part-1.csv", frame(30)),
            csv(t, "part-2.csv", frame(30, 1).drop(columns=["b"])),
        ),
    ),
    "run-source-dir-without-data": Case(
        ["run", "--output", "{tmp}/r", *_sets("data.source={tmp}/d")],
        1,
        "d: a directory with no readable data",
        setup=lambda t: (t / "d").mkdir(),
    ),
    "run-cnn-on-tabular-data": Case(
        [
            "run",
            "--output",
            "{tmp}/r",
            *_sets("data.source={tmp}/d.csv", "data.label_column=kind", "model.name=cnn"),
        ],
        2,
        "model.name: 'cnn' needs image data",
        lambda t: csv(t, "d.csv", frame()),
    ),
}


def _duplicate_parquet(tmp: Path) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    columns = [pa.array([1.0, 2.0]), pa.array([3.0, 4.0]), pa.array(["x", "y"])]
    pq.write_table(pa.Table.from_arrays(columns, names=["a", "a", "kind"]), tmp / "d.parquet")


@pytest.mark.parametrize(
    ("setting", "where", "want"),
    [
        ("model.kwargs.dropout=0.1", "model.kwargs", {"dropout": 0.1}),
        ("data.storage_options.client_kwargs.region_name=eu-west-1", "data.storage_options",
         {"client_kwargs": {"region_name": "eu-west-1"}}),
        ("cluster.env.HF_HOME=/cache", "cluster.env", {"HF_HOME": "/cache"}),
    ],
    ids=["builder-argument", "nested-storage-option", "environment"],
)  # fmt: skip
def test_set_reaches_into_free_form_mappings(setting, where, want):
    """``--set model.kwargs.dropout=0.1`` is what the mapping form ``model.kwargs={dropout:
    0.1}`` says: a real builder argument, not "no such field"."""
    from kubetrain.pipeline.config import load_config

    cfg = load_config(None, ["model.name=torchvision:resnet18", setting])
    section, name = where.split(".")
    assert getattr(getattr(cfg, section), name) == want


TABLE = {
    **{f"config/{k}": v for k, v in CONFIG.items()},
    **{f"config-file/{k}": v for k, v in CONFIG_FILES.items()},
    **{f"cli/{k}": v for k, v in PATHS.items()},
    **{f"data/{k}": v for k, v in DATA.items()},
}


@pytest.mark.parametrize("case", list(TABLE.values()), ids=list(TABLE))
def test_bad_input_is_one_line(case: Case, tmp_path, digits_dir, capsys, monkeypatch):
    monkeypatch.delenv("KF_PIPELINES_ENDPOINT", raising=False)
    monkeypatch.chdir(tmp_path)  # `run` without --output would write runs/ here
    if case.setup:
        case.setup(tmp_path)
    argv = [
        a.replace("{tmp}", str(tmp_path)).replace("{digits}", str(digits_dir)) for a in case.argv
    ]
    before = _files(tmp_path)
    code, err = run_main(argv, capsys)
    assert_one_line(code, err, case.code, case.names.replace("{tmp}", str(tmp_path)), tmp_path)
    for name, content in case.kept.items():
        assert (tmp_path / name).read_text() == content
    assert _files(tmp_path) == before, "a failed command left files behind"


def _files(root: Path) -> list[Path]:
    return sorted(p.relative_to(root) for p in root.rglob("*") if not p.is_dir())


# -- requests this machine cannot serve -------------------------------------------------------


def test_more_local_workers_than_cores_is_refused(tmp_path, digits_dir, capsys):
    n = cpu_cores() + 1
    if n > 64:
        pytest.skip("more than 63 cores: train.nproc cannot exceed them")
    argv = [
        "train",
        "--dataset",
        str(digits_dir),
        "--output",
        str(tmp_path / "m"),
        *_sets(f"train.nproc={n}", f"train.batch_size={8 * n}"),
    ]
    last = assert_one_line(*run_main(argv, capsys), 2, "train.nproc", tmp_path)
    assert f"{n} workers, but this machine has {n - 1} CPU core(s)" in last
    assert not (tmp_path / "m").exists()


def test_emulated_nodes_count_against_the_cores_too(tmp_path, digits_dir, capsys):
    cores = cpu_cores()
    if cores > 32:
        pytest.skip("more than 32 cores")
    nproc = cores // 2 + 1
    argv = [
        "train",
        "--dataset",
        str(digits_dir),
        "--output",
        str(tmp_path / "m"),
        *_sets("train.nnodes=2", f"train.nproc={nproc}", f"train.batch_size={16 * nproc}"),
    ]
    last = assert_one_line(*run_main(argv, capsys), 2, "train.nproc", tmp_path)
    assert f"x 2 nodes = {2 * nproc} workers" in last


# -- read-only places -------------------------------------------------------------------------


@contextmanager
def mounted_tmpfs(path: Path, options: str):
    """A tmpfs at ``path`` (root only here); skips the test where mounting is not allowed."""
    path.mkdir(parents=True, exist_ok=True)
    proc = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(path)], capture_output=True, text=True
    )
    if proc.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {proc.stderr.strip() or proc.returncode}")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], capture_output=True)


@pytest.fixture
def read_only_dir(tmp_path):
    """A directory this process cannot write in: mode 555, or for root a read-only tmpfs."""
    path = tmp_path / "ro"
    if os.geteuid() != 0:
        path.mkdir()
        path.chmod(0o555)
        yield path
        path.chmod(0o755)
        return
    with mounted_tmpfs(path, "ro,size=64k"):
        yield path


@pytest.mark.parametrize(
    "argv",
    [
        ["preprocess", "--output", "{ro}/ds"],
        ["run", "--output", "{ro}/run"],
        ["compile", "-o", "{ro}/p.yaml"],
    ],
    ids=["preprocess", "run", "compile"],
)
def test_an_output_that_cannot_be_written_is_named(argv, read_only_dir, tmp_path, capsys):
    argv = [a.format(ro=read_only_dir) for a in argv]
    last = assert_one_line(*run_main(argv, capsys), 2, f"--output {read_only_dir}", tmp_path)
    assert f"cannot write in {read_only_dir}" in last
    if os.geteuid() == 0:
        assert "read-only file system" in last


# -- answers of a cluster that is not there (answers of a real one: tests/cluster) -------------


def cluster_argv(step: str, tmp: Path, *settings: str) -> list[str]:
    (tmp / "ds").mkdir(exist_ok=True)
    (tmp / "ds" / "meta.json").write_text("{}")
    (tmp / "claim").mkdir(exist_ok=True)
    sets = _sets("cluster.backend=kubernetes", f"cluster.mount_path={tmp / 'claim'}",
                 "cluster.namespace=team-a", "cluster.image=registry.example/kubetrain:test",
                 *settings)  # fmt: skip
    return [step, "--dataset", str(tmp / "ds"), "--output", str(tmp / "out"), *sets]


@pytest.mark.parametrize("step", ["train", "tune"])
def test_no_kubeconfig_is_one_line(step, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("KUBECONFIG", str(tmp_path / "no-such-kubeconfig"))
    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
    result = run_main(cluster_argv(step, tmp_path), capsys)
    assert_one_line(*result, 1, "no usable Kubernetes configuration", tmp_path)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("step", ["train", "tune"])
def test_an_unreachable_cluster_is_named(step, tmp_path, capsys, monkeypatch):
    import socket

    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    (tmp_path / "kubeconfig").write_text(
        "apiVersion: v1\nkind: Config\ncurrent-context: c\n"
        f"clusters: [{{name: c, cluster: {{server: 'http://127.0.0.1:{port}'}}}}]\n"
        "users: [{name: u, user: {token: t}}]\n"
        "contexts: [{name: c, context: {cluster: c, user: u, namespace: team-a}}]\n"
    )
    monkeypatch.setenv("KUBECONFIG", str(tmp_path / "kubeconfig"))
    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
    result = run_main(cluster_argv(step, tmp_path), capsys)
    assert_one_line(*result, 1, f"http://127.0.0.1:{port}", tmp_path)


# -- faults: a full disk ------------------------------------------------------------------------


def test_a_full_disk_while_writing_a_dataset_says_so_and_where(tmp_path, capsys):
    with mounted_tmpfs(tmp_path / "disk", "size=128k") as disk:
        code, err = run_main(["preprocess", "--output", str(disk / "ds")], capsys)
        last = assert_one_line(code, err, 1, "no space left on device", tmp_path)
        assert f"{disk / 'ds' / 'data.npz'}" in last
        assert not (disk / "ds" / "meta.json").exists()  # no half artifact
        assert [p.name for p in (disk / "ds").iterdir()] == []  # temporary file gone too


def _digest_ok(checkpoint: Path) -> bool:
    meta = json.loads(checkpoint.with_suffix(".json").read_text())
    return hashlib.sha256(checkpoint.read_bytes()).hexdigest() == meta["sha256"]


def test_a_full_disk_while_checkpointing_keeps_the_previous_checkpoint(
    tmp_path, digits_dir, capsys
):
    tiny = [
        "train.nproc=1",
        "train.epochs=1",
        "model.hidden_sizes=[8]",
        "tune.enabled=false",
        "train.checkpoint_every_steps=1",
        "train.keep_checkpoints=5",
    ]
    # How big one checkpoint is, measured on a normal disk.
    probe = tmp_path / "probe"
    argv = [
        "train",
        "--dataset",
        str(digits_dir),
        "--output",
        str(tmp_path / "m0"),
        *_sets(*tiny, f"train.checkpoint_dir={probe}", "train.checkpoint_every_steps=0"),
    ]
    assert run_main(argv, capsys)[0] == 0
    size = sum(p.stat().st_size for p in probe.iterdir())
    # Room for one checkpoint and a half: the second one cannot fit.
    room = (size * 3 // 2 // 4096 + 1) * 4096
    with mounted_tmpfs(tmp_path / "disk", f"size={room}") as disk:
        argv = [
            "train",
            "--dataset",
            str(digits_dir),
            "--output",
            str(tmp_path / "m"),
            *_sets(*tiny, f"train.checkpoint_dir={disk}"),
        ]
        shutil.rmtree(tmp_path / "m0")  # its metrics.json is a result of the probe run
        code, err = run_main(argv, capsys)
        last = assert_one_line(code, err, 1, "no space left on device while writing", tmp_path)
        assert str(disk / "ckpt-") in last
        kept = sorted(disk.glob("ckpt-*.pt"))
        assert len(kept) == 1 and _digest_ok(kept[0])  # the previous checkpoint, intact
        assert not list(disk.glob(".*.tmp"))


# -- faults: what a killed process leaves behind ------------------------------------------------


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_stale_temporary_dirs_are_removed_at_the_next_start(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    dead = _dead_pid()
    stale = [tmp_path / f"kubetrain-torchrun-{dead}-abc", tmp_path / f"kubetrain-steps-{dead}-x1"]
    live = tmp_path / f"kubetrain-steps-{os.getpid()}-x2"
    foreign = tmp_path / f"someone-{dead}-else"
    for d in (*stale, live, foreign):
        (d / "inner").mkdir(parents=True)
    assert run_main(["config", "show"], capsys)[0] == 0
    assert not any(d.exists() for d in stale)
    assert live.exists() and foreign.exists()


def test_stale_temporary_files_of_atomic_writes_are_removed(tmp_path):
    from kubetrain.core.io import _host, write_json

    dead = _dead_pid()
    stale = tmp_path / f".ckpt-00000004.pt.{_host()}-{dead}.k2j4h1.tmp"
    live = tmp_path / f".ckpt-00000006.pt.{_host()}-{os.getpid()}.a9d8s7.tmp"
    other_host = tmp_path / f".ckpt-00000005.pt.otherhost-{dead}.a9d8s7.tmp"
    for p in (stale, live, other_host):
        p.write_bytes(b"half a checkpoint")
    write_json(tmp_path / "manifest.json", {"ok": True})
    assert not stale.exists()
    assert live.exists() and other_host.exists()  # alive, or another pod's on a shared volume


# -- the run experience: what a teammate sharing the run directory can read ---------------------


@pytest.mark.parametrize("umask", [0o022, 0o027, 0o077], ids=["022", "027", "077"])
def test_files_written_atomically_take_the_umask(umask, tmp_path):
    from kubetrain.core.io import atomic_write, write_json

    old = os.umask(umask)
    try:
        written = [
            write_json(tmp_path / "metrics.json", {"ok": True}),
            atomic_write(tmp_path / "model.pt", lambda tmp: Path(tmp).write_bytes(b"w")),
        ]
        (tmp_path / "neighbour.txt").write_text("plain open()")
    finally:
        os.umask(old)
    want = 0o666 & ~umask
    assert (tmp_path / "neighbour.txt").stat().st_mode & 0o777 == want
    assert [oct(p.stat().st_mode & 0o777) for p in written] == [oct(want)] * 2


# -- object storage: what s3fs raises, as one line (end to end against moto: the integration
# catalogue, tests/integration/test_bad_input_run.py) ----------------------------------------


def _boto(name: str, code: str = ""):
    import botocore.exceptions as b

    if name == "ClientError":
        return b.ClientError({"Error": {"Code": code, "Message": "m"}}, "ListObjectsV2")
    if name == "EndpointConnectionError":
        return b.EndpointConnectionError(endpoint_url="http://127.0.0.1:9")
    return getattr(b, name)()


@pytest.mark.parametrize(
    ("error", "code", "line"),
    [
        (("NoCredentialsError",), 2, "data.source s3://b/x.csv: no credentials for s3:// (set "
         "AWS_ACCESS_KEY_ID"),
        (("EndpointConnectionError",), 1, "s3://b/x.csv: cannot reach the storage endpoint "
         "http://127.0.0.1:9 (data.storage_options)"),
        (("ClientError", "NoSuchBucket"), 1, "s3://b/x.csv: no such bucket 'b'"),
        (("ClientError", "InvalidAccessKeyId"), 1, "refused the credentials or access "
         "(InvalidAccessKeyId)"),
    ],
    ids=["no-credentials", "endpoint-unreachable", "no-bucket", "credentials-refused"],
)  # fmt: skip
def test_object_storage_failures_are_one_line(error, code, line):
    pytest.importorskip("botocore")
    from kubetrain.data.storage import storage_errors

    options = {"client_kwargs": {"endpoint_url": "http://127.0.0.1:9"}}
    cause = _boto(*error)
    with pytest.raises(Exception) as raised, storage_errors("s3://b/x.csv", options):
        try:  # as s3fs raises them: the client's error as the cause of its own
            raise cause
        except Exception as inner:
            raise RuntimeError("s3fs wrapper") from inner
    assert raised.value.exit_code == code and line in str(raised.value)


def test_other_errors_pass_through_storage_errors():
    from kubetrain.data.storage import storage_errors

    with pytest.raises(ZeroDivisionError), storage_errors("s3://b/x.csv"):
        _ = 1 / 0


RECIPES = sorted(
    p.stem for p in (Path(__file__).parents[2] / "src/kubetrain/pipeline/recipes").glob("*.yaml")
)


@pytest.mark.parametrize("recipe", RECIPES)
def test_compiling_never_reads_the_data(recipe, tmp_path, monkeypatch, capsys):
    """``kubetrain compile`` (and the run parameters ``submit`` sends) take the kind from the
    config: the source is never listed or opened, so an unreachable bucket cannot stop it."""
    import fsspec

    import kubetrain.data.image_sources as image_sources
    import kubetrain.tasks.images as images
    from kubetrain.pipeline import submit

    def touched(*args, **kwargs):
        raise AssertionError(f"compiling read the data: {args}")

    for module, name in ((images, "is_image_source"), (image_sources, "filesystem"),
                         (fsspec, "open"), (fsspec, "get_fs_token_paths"),
                         (fsspec.core, "url_to_fs")):  # fmt: skip
        monkeypatch.setattr(module, name, touched)
    code, err = run_main(["compile", "--config", recipe, "-o", str(tmp_path / "p.yaml")], capsys)
    assert code == 0, err
    assert (tmp_path / "p.yaml").stat().st_size > 0
    req = submit.request(recipe, ["data.source=s3://elsewhere/{date}/"])
    assert req.params["min_accuracy"] == pytest.approx(
        0.0 if req.cfg.data.task == "seq2seq" and req.cfg.evaluate.min_value is None
        else req.cfg.evaluate.min_value or req.cfg.evaluate.min_accuracy
    )  # fmt: skip


def test_a_declared_text_kind_sets_the_task():
    from kubetrain.pipeline.config import load_config

    assert load_config(None, ["data.kind=seq2seq"]).data.task == "seq2seq"


# -- faults: signals (whole processes: tests/integration/test_bad_input_run.py) ----------------


def test_a_second_signal_while_stopping_changes_nothing():
    """GNU timeout signals the process and its group: two SIGTERMs milliseconds apart. The
    first unwinds; the second, arriving while the stop runs, is ignored (it re-entered the
    handler in the middle of an import and printed a traceback)."""
    import signal

    from kubetrain.core.processes import stop_once

    calls = []

    def first(signum: int) -> None:
        calls.append(signum)
        raise KeyboardInterrupt

    before = signal.getsignal(signal.SIGTERM)
    stopped_cleanly = False
    try:
        with stop_once((signal.SIGTERM,), first):
            try:
                os.kill(os.getpid(), signal.SIGTERM)
                time.sleep(1)
            except KeyboardInterrupt:
                os.kill(os.getpid(), signal.SIGTERM)  # while stopping
                time.sleep(0.2)
                stopped_cleanly = True
        assert signal.getsignal(signal.SIGTERM) is signal.SIG_IGN  # on its way out
    finally:
        signal.signal(signal.SIGTERM, before)
    assert calls == [signal.SIGTERM] and stopped_cleanly


def test_a_child_learns_its_parent_is_gone(tmp_path):
    """A torchrun agent (and each worker) gets SIGTERM when the process that started it dies
    without stopping it: nothing keeps training after a launcher is killed outright."""
    script = (
        "import os, signal, subprocess, sys, time\n"
        "from kubetrain.core.processes import parent_death_signal\n"
        "child = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)'],\n"
        "                         preexec_fn=parent_death_signal())\n"
        "print(child.pid, flush=True)\n"
        "os.kill(os.getpid(), signal.SIGKILL)\n"
    )
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    pid = int(proc.stdout.split()[0])
    import psutil

    deadline = time.monotonic() + 10
    while psutil.pid_exists(pid) and time.monotonic() < deadline:
        try:
            if psutil.Process(pid).status() == psutil.STATUS_ZOMBIE:
                break
        except psutil.NoSuchProcess:
            break
        time.sleep(0.05)
    assert not psutil.pid_exists(pid) or psutil.Process(pid).status() == psutil.STATUS_ZOMBIE


# -- figures that contradict each other ----------------------------------------------------------


def test_both_models_are_warmed_up_before_their_scoring_pass(digits_dir):
    """The scoring throughput counted a compiled int8 model's compilation (int8 read 17x
    slower than fp32 over the test split while its latency rows said faster): both models now
    get the latency rows' warm-up first."""
    import torch

    from kubetrain.data import load_dataset
    from kubetrain.evaluate.compare import score
    from kubetrain.evaluate.config import WARMUP_CALLS
    from kubetrain.pipeline.config import load_config
    from kubetrain.tasks import open_task

    task = open_task(load_config(), load_dataset(digits_dir))
    calls: list[int] = []

    class Counting(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.inner = task.build_model(load_config().model).eval()

        def forward(self, x):
            calls.append(len(x))
            return self.inner(x)

    scored = score(Counting(), task, warm_batch=64)
    assert calls[:WARMUP_CALLS] == [64] * WARMUP_CALLS  # warm-up batches, then the test split
    assert sum(calls[WARMUP_CALLS:]) == task.data.meta.num_samples("test")
    assert scored.samples_per_second and scored.samples_per_second > 0


@pytest.mark.parametrize(
    ("scoring", "latency", "says"),
    [((5000.0, 2000.0), (1.0, 0.5), "disagree: int8 is faster at batch 64"),
     ((2000.0, 5000.0), (0.5, 1.0), "disagree: fp32 is faster at batch 64"),
     ((5000.0, 6000.0), (1.0, 0.5), None)],
    ids=["int8-faster-per-batch-slower-per-pass", "the-other-way", "agree"],
)  # fmt: skip
def test_the_report_says_what_each_speed_figure_measures(scoring, latency, says):
    from types import SimpleNamespace

    from kubetrain.evaluate.report import throughput_note

    e = SimpleNamespace(
        fp32=SimpleNamespace(samples_per_second=scoring[0]),
        int8=SimpleNamespace(samples_per_second=scoring[1]),
        latency=[SimpleNamespace(batch_size=1, fp32_ms=0.1, int8_ms=0.1),
                 SimpleNamespace(batch_size=64, fp32_ms=latency[0], int8_ms=latency[1])],
    )  # fmt: skip
    note = throughput_note(e)
    assert "one pass over the whole test split" in note and "one fixed batch" in note
    assert (says in note) if says else "disagree" not in note


# -- what preprocessing leaves out is said, not only logged ------------------------------------


def _rows_with_gaps(tmp: Path) -> None:
    csv(tmp, "d.csv", frame().assign(a=lambda f: f.a.where(f.index % 20 > 0)))


def _texts_some_empty(tmp: Path) -> None:
    rows = "".join(f"{'' if i % 10 == 0 else 'word ' * (i % 7 + 1)},{i % 2}\n" for i in range(60))
    text(tmp, "t.csv", "text,label\n" + rows)


@pytest.mark.parametrize(
    ("settings", "setup", "note"),
    [
        (("data.source={tmp}/d.csv", "data.label_column=kind"), _rows_with_gaps,
         "dropped 3 of 60 rows from {tmp}/d.csv: 3 with missing values"),
        (("data.task=text_classification", "data.source={tmp}/t.csv"), _texts_some_empty,
         "skipped 6 of 60 rows with empty text"),
    ],
    ids=["table-rows-dropped", "text-rows-skipped"],
)  # fmt: skip
def test_what_preprocess_leaves_out_is_in_the_dataset_meta(settings, setup, note, tmp_path,
                                                           capsys):  # fmt: skip
    setup(tmp_path)
    argv = prep(*settings)
    argv = [a.replace("{tmp}", str(tmp_path)) for a in argv]
    code, err = run_main(argv, capsys)
    assert code == 0, err
    notes = json.loads((tmp_path / "ds" / "meta.json").read_text())["notes"]
    assert any(note.replace("{tmp}", str(tmp_path)) in n for n in notes), notes
    assert note.replace("{tmp}", str(tmp_path)) in err  # and on the terminal (a warning)


def test_the_report_says_what_the_data_lost():
    from kubetrain.evaluate.report import _data_notes

    page = _data_notes(["d.csv: dropped 3 of 60 rows <b>"])
    assert "Data left out or cut" in page and "dropped 3 of 60 rows &lt;b&gt;" in page
    assert _data_notes([]) == ""


# -- images: decoding bombs, missing files, full disks, transforms, mixed sizes -----------------


def _png_declaring(width: int, height: int) -> bytes:
    """A PNG whose header declares ``width`` x ``height`` pixels and that holds no pixel data:
    a few dozen bytes (a real one of zeros compresses to kilobytes, and decodes to gigabytes)."""
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        body = kind + data
        return struct.pack(">I", len(data)) + body + struct.pack(">I", zlib.crc32(body))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)  # 8-bit grayscale
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IEND", b"")


def _image_folder(root: Path, per_class: int = 12, sizes=((32, 32),)) -> None:
    from PIL import Image

    for c in ("cat", "dog"):
        (root / c).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            w, h = sizes[i % len(sizes)]
            Image.new("RGB", (w, h), (i * 9, 40 if c == "cat" else 200, 0)).save(
                root / c / f"{i}.png"
            )


def test_an_image_declaring_more_pixels_than_the_budget_is_skipped_before_decoding(tmp_path):
    from kubetrain.data.config import DataConfig
    from kubetrain.data.images import ImageDecodeError, build_image_dataset, convert_image

    bomb = _png_declaring(12_000, 12_000)
    assert len(bomb) < 100
    with pytest.raises(ImageDecodeError, match=r"too large: 12000x12000 = 144\.0 MP, above "
                       r"data\.max_image_pixels \(64\.0 MP\)"):  # fmt: skip
        convert_image(bomb, "RGB", 32, max_pixels=64_000_000)
    _image_folder(tmp_path / "imgs")
    (tmp_path / "imgs" / "cat" / "bomb.png").write_bytes(bomb)
    manifest = build_image_dataset(
        DataConfig(source=str(tmp_path / "imgs"), shard_samples=8), str(tmp_path / "ds")
    )
    prov = manifest.provenance
    assert prov["num_skipped"] == 1 and prov["skipped_by_reason"] == {"too large": 1}


def test_manifest_rows_whose_files_are_gone_are_counted_and_said(tmp_path):
    from kubetrain.data.config import DataConfig
    from kubetrain.data.images import build_image_dataset, skipped_note

    _image_folder(tmp_path / "imgs")
    rows = [f"imgs/{c}/{i}.png,{c}" for c in ("cat", "dog") for i in range(12)]
    rows += ["imgs/cat/gone-1.png,cat", "imgs/dog/gone-2.png,dog"]
    (tmp_path / "index.csv").write_text("image,label\n" + "\n".join(rows) + "\n")
    cfg = DataConfig(source=str(tmp_path / "index.csv"), shard_samples=8)
    manifest = build_image_dataset(cfg, str(tmp_path / "ds"))
    assert manifest.provenance["skipped_by_reason"] == {"missing": 2}
    note = skipped_note(manifest.provenance)
    assert note.startswith(f"{tmp_path / 'index.csv'}: skipped 2 of 26 images: 2 missing (e.g. ")


def test_a_full_disk_while_writing_image_shards_names_the_shard_and_leaves_none(tmp_path):
    from PIL import Image

    from kubetrain.core.errors import KubetrainError
    from kubetrain.data.config import DataConfig
    from kubetrain.data.images import build_image_dataset

    root = tmp_path / "imgs"
    for c in ("a", "b"):
        (root / c).mkdir(parents=True)
        for i in range(12):  # noise: PNG cannot compress it, so the shards fill the disk
            pixels = np.random.default_rng([i, ord(c)]).integers(0, 255, (96, 96, 3), np.uint8)
            Image.fromarray(pixels).save(root / c / f"{i}.png")
    with mounted_tmpfs(tmp_path / "disk", "size=192k") as disk:
        cfg = DataConfig(source=str(root), shard_samples=4)
        with pytest.raises(KubetrainError) as raised:
            build_image_dataset(cfg, str(disk / "ds"))
        line = str(raised.value)
        assert line.startswith(f"no space left on device while writing {disk / 'ds'}/"), line
        assert ".parquet" in line and "\n" not in line
        assert sorted(p.name for p in (disk / "ds").iterdir()) == []  # no shard, no .tmp


VISION_CASES = {
    "transform-value-applied": Case(
        prep("data.source={tmp}/imgs",
             "data.transforms.train=[{name: RandomResizedCrop, kwargs: {size: 16, scale: [0.9, 0.1]}}]",
             "data.transforms.eval=[{name: Resize, kwargs: {size: 16}}, {name: CenterCrop, kwargs: {size: 16}}]"),
        2,
        "config error: data.transforms.train[0] (RandomResizedCrop): ",
        lambda t: _image_folder(t / "imgs"),
    ),
    "transform-value-later-in-the-list": Case(
        prep("data.source={tmp}/imgs",
             "data.transforms.train=[{name: Resize, kwargs: {size: 16}}, {name: RandomErasing, kwargs: {p: 1.0, scale: [0.5, 0.1]}}, {name: CenterCrop, kwargs: {size: 16}}]",
             "data.transforms.eval=[{name: Resize, kwargs: {size: 16}}, {name: CenterCrop, kwargs: {size: 16}}]"),
        2,
        "config error: data.transforms.train[1] (RandomErasing): ",
        lambda t: _image_folder(t / "imgs"),
    ),
}  # fmt: skip


@pytest.mark.vision
@pytest.mark.parametrize("case", list(VISION_CASES.values()), ids=list(VISION_CASES))
def test_bad_image_input_is_one_line(case, tmp_path, capsys, monkeypatch):
    pytest.importorskip("torchvision", reason="the image kind needs torchvision")
    monkeypatch.chdir(tmp_path)
    case.setup(tmp_path)
    argv = [a.replace("{tmp}", str(tmp_path)) for a in case.argv]
    before = _files(tmp_path)
    assert_one_line(*run_main(argv, capsys), case.code, case.names, tmp_path)
    assert _files(tmp_path) == before, "a failed command left files behind"


@pytest.mark.vision
def test_the_vision_recipe_takes_a_folder_of_mixed_sizes(tmp_path, capsys):
    pytest.importorskip("torchvision", reason="the image kind needs torchvision")
    _image_folder(tmp_path / "imgs", sizes=((32, 32), (40, 28), (23, 61)))
    argv = ["preprocess", "--config", "vision", "--output", str(tmp_path / "ds"),
            "--set", f"data.source={tmp_path / 'imgs'}"]  # fmt: skip
    code, err = run_main(argv, capsys)
    assert code == 0, err
    meta = json.loads((tmp_path / "ds" / "meta.json").read_text())
    assert meta["input_shape"] == [1, 28, 28] and meta["stored_shape"] is None


@pytest.mark.vision
def test_images_preprocess_skips_are_in_the_meta_and_on_the_terminal(tmp_path, capsys):
    pytest.importorskip("torchvision", reason="the image kind needs torchvision")
    _image_folder(tmp_path / "imgs")
    (tmp_path / "imgs" / "cat" / "bomb.png").write_bytes(_png_declaring(12_000, 12_000))
    (tmp_path / "imgs" / "dog" / "broken.png").write_bytes(b"not a png")
    code, err = run_main(["preprocess", "--output", str(tmp_path / "ds"),
                          "--set", f"data.source={tmp_path / 'imgs'}"], capsys)  # fmt: skip
    assert code == 0, err
    (note,) = json.loads((tmp_path / "ds" / "meta.json").read_text())["notes"]
    assert "skipped 2 of 26 images: 1 do not decode, 1 too large" in note
    assert note in err


@pytest.mark.vision
def test_a_full_disk_while_preprocessing_images_is_one_line_and_leaves_no_shard(tmp_path, capsys):
    pytest.importorskip("torchvision", reason="the image kind needs torchvision")
    from PIL import Image

    root = tmp_path / "imgs"
    for c in ("a", "b"):
        (root / c).mkdir(parents=True)
        for i in range(12):
            pixels = np.random.default_rng([i, ord(c)]).integers(0, 255, (96, 96, 3), np.uint8)
            Image.fromarray(pixels).save(root / c / f"{i}.png")
    with mounted_tmpfs(tmp_path / "disk", "size=192k") as disk:
        argv = ["preprocess", "--output", str(disk / "ds"), "--set", f"data.source={root}",
                "--set", "data.shard_samples=4"]  # fmt: skip
        last = assert_one_line(*run_main(argv, capsys), 1, "no space left on device", tmp_path)
        assert f"while writing {disk / 'ds'}/" in last and ".parquet" in last
        assert [p.name for p in (disk / "ds").iterdir()] == []


# -- a tracking server that is down (end to end against a closed port: the integration catalogue)


def test_a_failed_track_task_keeps_the_runs_results(tmp_path, capsys, monkeypatch):
    """Only the track task failed: metrics.json and the report are still written from the
    evaluation, the summary printed, and the last line is the tracking one (exit 1)."""
    from kubetrain.pipeline import run

    url = "http://127.0.0.1:9"

    def pipeline_whose_tracking_fails(cfg, run_dir, *args):
        evaluation = run_dir / "kfp" / "kubetrain-1" / "evaluate" / "evaluation"
        evaluation.mkdir(parents=True)
        (evaluation / "metrics.json").write_text(json.dumps({
            "metric": "accuracy", "test_accuracy_fp32": 0.97, "test_accuracy_int8": 0.96,
            "quantize_method": "dynamic_int8", "model_size_bytes_fp32": 4,
            "model_size_bytes_int8": 1, "train_samples_per_second": 10.0, "promoted": False,
        }))  # fmt: skip
        (evaluation / "report.html").write_text("<html>report</html>")
        line = f"track: tracking: cannot log to MLflow at {url}: connection refused (log: x)"
        raise run.StepFailed(line, 1, "track")

    monkeypatch.setattr(run, "_run_pipeline", pipeline_whose_tracking_fails)
    code = main(["run", "--output", str(tmp_path / "r"), "--set", f"tracking.mlflow_uri={url}"])
    out, err = capsys.readouterr()
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 1 and "Traceback" not in err
    assert lines[-1].startswith("kubetrain: track: tracking: cannot log to MLflow at " + url)
    assert json.loads((tmp_path / "r" / "metrics.json").read_text())["test_accuracy_fp32"] == 0.97
    assert (tmp_path / "r" / "report.html").read_text() == "<html>report</html>"
    assert "test accuracy fp32: 0.9700" in out


def test_kfp_local_tasks_get_a_temporary_directory_that_goes_with_the_run(tmp_path, monkeypatch):
    """kfp.local's subprocess runner starts each task with `mktemp -d` and never removes it
    (482 folders in an afternoon): the tasks' TMPDIR is ours for the run, and removed; torch's
    compile cache (and inductor's precompiled header) stays where it was."""
    from kubetrain.pipeline.run import _tasks_temp_dir

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    monkeypatch.setenv("TMPDIR", "/somewhere/else")
    monkeypatch.delenv("TORCHINDUCTOR_CACHE_DIR", raising=False)
    with _tasks_temp_dir() as tmp:
        assert os.environ["TMPDIR"] == str(tmp) and tmp.parent == tmp_path
        made = subprocess.run(["mktemp", "-d"], capture_output=True, text=True).stdout.strip()
        assert Path(made).parent == tmp  # what a task's shell makes lands inside
        cache = Path(os.environ["TORCHINDUCTOR_CACHE_DIR"])
        assert cache.parent == tmp_path  # torch's compile cache kept where it was
        # inductor's precompiled header goes beside tempfile.gettempdir(): a link leads there
        (tmp / cache.name / "precompiled_headers").mkdir()
        assert (cache / "precompiled_headers").is_dir()
    assert not tmp.exists()
    assert (cache / "precompiled_headers").is_dir()  # the link went, not what it leads to
    assert os.environ["TMPDIR"] == "/somewhere/else" and "TORCHINDUCTOR_CACHE_DIR" not in os.environ
