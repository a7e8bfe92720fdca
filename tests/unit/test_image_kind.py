"""Which sources preprocess treats as images (``tasks.kind_of``), and the one line a venv
without torchvision gives for them. Needs no torchvision: runs in the core venv too."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest

from kubetrain.data.config import DataConfig
from kubetrain.data.shards import ShardWriter, write_manifest
from kubetrain.tasks import kind_of
from vision_data import encode, render

# A CLI run in which torchvision cannot be imported, in either venv (the core venv has none; in
# the vision venv the import is blocked), so the check can fail in both.
_NO_TORCHVISION = (
    "import sys; sys.modules['torchvision'] = None; from kubetrain.cli import main; "
    "sys.exit(main(sys.argv[1:]))"
)


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    root = tmp_path_factory.mktemp("sources")
    for label in range(2):
        (root / "folder" / f"c{label}").mkdir(parents=True)
        (root / "folder" / f"c{label}" / "0.png").write_bytes(encode(render(label, 0), "PNG"))
    (root / "images.csv").write_text("image,label\nfolder/c0/0.png,c0\nfolder/c1/0.png,c1\n")
    (root / "pictures.csv").write_text("path,kind\nfolder/c0/0.png,c0\n")
    (root / "table.csv").write_text("a,b,label\n1,2,0\n3,4,1\n")
    import pandas as pd

    pd.DataFrame({"image": ["folder/c0/0.png"], "label": ["c0"]}).to_parquet(root / "m.parquet")
    pd.DataFrame({"x": [1.0], "label": [0]}).to_parquet(root / "t.parquet")
    np.savez(root / "arrays.npz", x=np.zeros((2, 2)), y=np.zeros(2))
    (root / "table-parts" / "year=2026").mkdir(parents=True)  # a partitioned table
    pd.DataFrame({"x": [1.0], "label": [0]}).to_parquet(root / "table-parts/year=2026/0.parquet")
    (root / "csv-parts").mkdir()
    (root / "csv-parts" / "a.csv").write_text("a,label\n1,0\n")
    with ShardWriter(str(root / "shards"), "train", max_samples=10) as w:
        w.write({"image": encode(render(0, 0), "PNG"), "label": 0})
    write_manifest(str(root / "shards"), [w])
    return root


@pytest.mark.parametrize(
    ("source", "extra", "kind"),
    [
        ("folder", {}, "images"),
        ("table-parts", {}, "tabular"),
        ("csv-parts", {}, "tabular"),
        ("shards", {}, "images"),
        ("train-{000000..000003}.tar", {}, "images"),
        ("one.tar", {}, "images"),
        ("images.csv", {}, "images"),
        ("pictures.csv", {"image_column": "path", "label_column": "kind"}, "images"),
        ("pictures.csv", {}, "tabular"),
        ("m.parquet", {}, "images"),
        ("t.parquet", {}, "tabular"),
        ("table.csv", {}, "tabular"),
        ("arrays.npz", {}, "tabular"),
        ("*.csv", {}, "tabular"),
        ("digits", {}, "tabular"),
        ("fashion-mnist", {}, "images"),
        ("missing-dir", {}, "tabular"),
    ],
    ids=lambda v: v if isinstance(v, str) else None,
)
def test_kind_of_a_source(sources, source, extra, kind):
    path = source if source in ("digits", "fashion-mnist") else str(sources / source)
    assert kind_of(DataConfig(source=path, **extra)) == kind


def test_a_text_task_is_never_images(sources):
    cfg = DataConfig(source=str(sources / "folder"), task="text_classification")
    assert kind_of(cfg) == "text_classification"


@pytest.mark.integration  # whole CLI processes
@pytest.mark.parametrize("command", ["preprocess", "run"])
def test_image_data_without_torchvision_is_one_line_naming_the_vision_extra(
    sources, tmp_path, command
):
    args = [command, "--set", f"data.source={sources / 'folder'}", "--output", str(tmp_path / "o")]
    proc = subprocess.run([sys.executable, "-c", _NO_TORCHVISION, *args], cwd=tmp_path,
                          capture_output=True, text=True, timeout=120)  # fmt: skip
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip() and "WARNING: Location" not in ln]
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr
    assert "data.source" in lines[-1] and "make venv-vision" in lines[-1], lines[-1]
    assert not (tmp_path / "o" / "meta.json").exists()


def test_image_settings_on_tabular_data_are_refused(sources):
    from kubetrain.core.errors import ConfigError
    from kubetrain.pipeline.config import load_config
    from kubetrain.pipeline.steps import check_supported

    cfg = load_config(overrides=[f"data.source={sources / 'table.csv'}", "data.mixup_alpha=0.2"])
    with pytest.raises(ConfigError, match=r"data.mixup_alpha: applies to image data only"):
        check_supported(cfg)
