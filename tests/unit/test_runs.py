"""`kubetrain runs` and `kubetrain compare` on run directories laid out as `kubetrain run` leaves
them (config.yaml, metrics.json, kfp/<run>/train/model/history.json). The page in headless
Chromium: tests/integration/test_compare_page.py."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from kubetrain.cli import main
from kubetrain.pipeline.config import load_config
from kubetrain.pipeline.runs import config_differences, find_runs, load_run


def make_run(root: Path, name: str, sets=(), metrics=None, history=None, age=0) -> Path:
    """A run directory as `kubetrain run` writes it (``metrics=None``: it never finished)."""
    run = root / name
    (run / "kfp" / "kubetrain-x" / "train" / "model").mkdir(parents=True)
    (run / ".kubetrain-run").touch()
    cfg = load_config(overrides=[*sets, f"train.checkpoint_dir={run}/kfp/checkpoints"])
    (run / "config.yaml").write_text(cfg.to_yaml())
    if history is not None:
        path = run / "kfp" / "kubetrain-x" / "train" / "model" / "history.json"
        path.write_text(json.dumps(history))
    if metrics is not None:
        (run / "metrics.json").write_text(json.dumps(metrics))
    stamp = 1_780_000_000 + age
    os.utime(run / ".kubetrain-run", (stamp, stamp))
    return run


def history(epochs: int, base: float) -> list[dict]:
    return [{"epoch": e, "train_loss": base / e, "val_loss": base / e + 0.1,
             "val_accuracy": 1 - base / (e + 3)} for e in range(1, epochs + 1)]  # fmt: skip


def metrics(acc: float, promoted: bool, seconds: float) -> dict:
    return {"test_accuracy_fp32": acc, "test_accuracy_int8": acc - 0.002, "promoted": promoted,
            "dataset_version": "fa30d69871e0ce77", "pipeline_seconds": seconds,
            "quantize_method": "dynamic_int8", "model_size_bytes_int8": 53978,
            "train_samples_per_second": 12199.4, "train_epochs": 3, "tune_trials": 2}  # fmt: skip


@pytest.fixture
def runs_root(tmp_path) -> Path:
    root = tmp_path / "runs"
    make_run(root, "20261130-0300", metrics=metrics(0.9593, True, 45.5), history=history(3, 1.0))
    make_run(root, "20261130-0400", ["train.epochs=5", "model.hidden_sizes=[64]"],
             metrics=metrics(0.8370, False, 97.6), history=history(5, 1.6), age=3600)  # fmt: skip
    make_run(root, "20261130-0500", age=7200)  # failed: no metrics.json
    broken = make_run(root, "20261130-0600", age=10800)
    (broken / "metrics.json").write_text("{half a file")
    (root / "not-a-run").mkdir()
    return root


def test_runs_lists_every_run_and_never_crashes_on_a_broken_one(runs_root, capsys):
    assert main(["runs", "--root", str(runs_root)]) == 0
    out = capsys.readouterr().out
    lines = {line.split()[1]: line for line in out.splitlines() if "20261130-" in line}
    assert list(lines) == ["20261130-0300", "20261130-0400", "20261130-0500", "20261130-0600"]
    assert "0.9593" in lines["20261130-0300"] and "yes" in lines["20261130-0300"]
    assert "45.5s" in lines["20261130-0300"] and "fa30d69871e0ce77" in lines["20261130-0300"]
    assert "no" in lines["20261130-0400"].split() and "1m38s" in lines["20261130-0400"]
    assert "incomplete: failed or still running" in lines["20261130-0500"]
    assert "unreadable: metrics.json is not valid JSON" in lines["20261130-0600"]
    assert "not-a-run" not in out


# Bad arguments of `runs` and `compare` (exit 2): the catalogue, tests/unit/test_bad_input.py.


def test_every_task_shows_its_primary_metric(tmp_path, capsys):
    """A seq2seq run shows BLEU, a classification run accuracy: never "-" for a finished run."""
    seq2seq = {"metric": "bleu", "test_bleu_fp32": 21.53, "test_bleu_int8": 21.07,
               "test_accuracy_fp32": None, "promoted": True}  # fmt: skip
    make_run(tmp_path, "20261130-0300", metrics=seq2seq)
    make_run(tmp_path, "20261130-0400", metrics=metrics(0.9593, True, 45.5), age=60)
    assert main(["runs", "--root", str(tmp_path)]) == 0
    lines = {line.split()[1]: line for line in capsys.readouterr().out.splitlines()
             if "20261130-" in line}  # fmt: skip
    assert "bleu" in lines["20261130-0300"].split() and "21.5300" in lines["20261130-0300"]
    assert "21.0700" in lines["20261130-0300"]
    assert "accuracy" in lines["20261130-0400"].split() and "0.9593" in lines["20261130-0400"]
    assert main(["compare", "20261130-0300", "20261130-0400", "--root", str(tmp_path)]) == 0
    cells = [line.replace("│", " ").split() for line in capsys.readouterr().out.splitlines()]
    rows = {c[0] if c[0] != "test" else " ".join(c[:2]): c[1:] for c in cells if c}
    assert rows["metric"] == ["bleu", "accuracy"]
    assert rows["test fp32"][-2:] == ["21.5300", "0.9593"]


def test_compare_shows_only_what_differs(runs_root):
    runs = [load_run(runs_root / n) for n in ("20261130-0300", "20261130-0400", "20261130-0500")]
    diff = config_differences(runs)
    # the checkpoint directory inside each run's own directory is not a difference
    assert diff == {"model.hidden_sizes": [[256, 128], [64], [256, 128]],
                    "train.epochs": [20, 5, 20]}  # fmt: skip
    assert [r.status for r in find_runs(runs_root)].count("done") == 2


def test_compare_prints_tables_and_writes_the_page(runs_root, capsys):
    out_html = runs_root / "cmp.html"
    rc = main(["compare", "20261130-0300", str(runs_root / "20261130-0400"), "20261130-0500",
               "--root", str(runs_root), "-o", str(out_html)])  # fmt: skip
    assert rc == 0
    out = capsys.readouterr().out
    assert "model.hidden_sizes" in out and "[256, 128]" in out and "[64]" in out
    assert "0.9593" in out and "0.8370" in out and "incomplete" in out
    assert f"wrote {out_html}" in out
    page = out_html.read_text()
    assert page.count("data:image/png;base64,") == 1
    assert "http://" not in page and "https://" not in page  # self-contained
