"""Local runs you can see: ``kubetrain runs`` lists the run directories under ``runs/``;
``kubetrain compare RUN RUN...`` sets runs side by side (config differences and results) and
writes an HTML page with their training curves overlaid.

Everything is read from what ``kubetrain run`` leaves in a run directory: ``config.yaml`` (the
effective config, written when the run starts), ``metrics.json`` (written when it succeeds) and
the train step's ``history.json`` (per-epoch loss and validation metric) under ``kfp/``. A run
without ``metrics.json`` failed or has not finished; it is listed as such, never skipped.
"""

from __future__ import annotations

import html
import json
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import yaml

from kubetrain.core.artifacts import MODEL_HISTORY, RUN_MARKER, RUN_METRICS
from kubetrain.core.errors import UsageError

# (metrics.json key, column title, format) of the results shown for each run, after its primary
# metric (``primary``).
RESULTS: tuple[tuple[str, str, str], ...] = (
    ("quantize_method", "int8 method", "{}"),
    ("model_size_bytes_int8", "int8 bytes", "{:,}"),
    ("train_samples_per_second", "train samples/s", "{:,.0f}"),
    ("train_epochs", "epochs", "{}"),
    ("tune_trials", "trials", "{}"),
)


@dataclass
class Run:
    """One run directory as found on disk; ``status`` is done, incomplete or unreadable."""

    path: Path
    started: datetime | None
    status: str
    config: dict[str, Any] = field(default_factory=dict)  # nested, as config.yaml has it
    metrics: dict[str, Any] = field(default_factory=dict)
    problem: str = ""  # why a run is not "done"

    @property
    def name(self) -> str:
        return self.path.name

    @property
    def promoted(self) -> bool | None:
        return self.metrics.get("promoted") if self.status == "done" else None

    def history(self) -> list[dict[str, Any]]:
        """Per-epoch records of the newest train step (empty if there is none)."""
        found = sorted(self.path.glob(f"kfp/*/train/model/{MODEL_HISTORY}"),
                       key=lambda p: p.stat().st_mtime)  # fmt: skip
        for path in reversed(found):
            try:
                records = json.loads(path.read_text())
            except (OSError, ValueError):
                continue
            if isinstance(records, list):
                return [r for r in records if isinstance(r, dict) and "epoch" in r]
        return []


def _read_yaml(path: Path) -> tuple[dict[str, Any], str]:
    try:
        data = yaml.safe_load(path.read_text())
    except FileNotFoundError:
        return {}, f"no {path.name}"
    except (OSError, yaml.YAMLError):
        return {}, f"{path.name} is not valid YAML"
    return (data, "") if isinstance(data, dict) else ({}, f"{path.name} is not a mapping")


def _read_json(path: Path) -> tuple[dict[str, Any], str]:
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        return {}, f"no {path.name}"
    except (OSError, ValueError):
        return {}, f"{path.name} is not valid JSON"
    return (data, "") if isinstance(data, dict) else ({}, f"{path.name} is not an object")


def load_run(path: Path) -> Run:
    """Read one run directory; never raises for what is inside it (see ``Run.status``)."""
    started = None
    for stamp in (path / RUN_MARKER, path / "config.yaml", path):
        if stamp.exists():
            started = datetime.fromtimestamp(stamp.stat().st_mtime)
            break
    config, config_problem = _read_yaml(path / "config.yaml")
    metrics, metrics_problem = _read_json(path / RUN_METRICS)
    if not metrics_problem:
        status, problem = "done", config_problem
    elif metrics_problem.startswith("no "):
        status, problem = "incomplete", "failed or still running (no metrics.json)"
    else:
        status, problem = "unreadable", metrics_problem
    return Run(path, started, status, config, metrics, problem)


def is_run_dir(path: Path) -> bool:
    return path.is_dir() and any((path / f).exists() for f in (RUN_MARKER, "config.yaml"))


def find_runs(root: Path) -> list[Run]:
    """Every run directory directly under ``root``, oldest first.

    Raises:
        UsageError: ``root`` is not a directory (exit 2).
    """
    if not root.is_dir():
        raise UsageError(f"{root}: no such directory (runs are kept under runs/; see --root)")
    runs = [load_run(p) for p in root.iterdir() if is_run_dir(p)]
    return sorted(runs, key=lambda r: (r.started or datetime.min, r.name))


def resolve_run(text: str, root: Path) -> Run:
    """A run given as a path or as a name under ``root``.

    Raises:
        UsageError: neither names a run directory (exit 2).
    """
    for path in (Path(text), root / text):
        if is_run_dir(path):
            return load_run(path)
    raise UsageError(f"{text}: not a run directory (no {RUN_MARKER} or config.yaml; see "
                         f"`kubetrain runs --root {root}`)")  # fmt: skip


def primary(metrics: dict[str, Any]) -> tuple[str, Any, Any]:
    """``(metric, fp32 value, int8 value)``: the run's primary metric on the test split, whatever
    the task (accuracy, bleu, rouge_l, map, ...); ``("-", None, None)`` for a run without
    results. A metrics.json that names no metric has accuracy (written before it named one)."""
    if not metrics:
        return "-", None, None
    metric = str(metrics.get("metric", "accuracy"))
    return metric, metrics.get(f"test_{metric}_fp32"), metrics.get(f"test_{metric}_int8")


def _fmt(value: Any, spec: str = "{}") -> str:
    if value is None:
        return "-"
    try:
        return spec.format(value)
    except (ValueError, TypeError):
        return str(value)


def _duration(seconds: Any) -> str:
    if not isinstance(seconds, (int, float)):
        return "-"
    minutes, sec = divmod(round(seconds), 60)
    return f"{minutes}m{sec:02d}s" if minutes else f"{seconds:.1f}s"


def list_rows(runs: list[Run]) -> tuple[list[str], list[list[str]]]:
    """The ``kubetrain runs`` table: header and one row per run."""
    header = ["run", "started", "status", "data version", "metric", "test fp32", "test int8",
              "promoted", "duration"]  # fmt: skip
    rows = []
    for r in runs:
        m = r.metrics
        metric, fp32, int8 = primary(m)
        promoted = {True: "yes", False: "no", None: "-"}[r.promoted]
        rows.append([
            r.name,
            r.started.strftime("%Y-%m-%d %H:%M") if r.started else "-",
            r.status if r.status == "done" else f"{r.status}: {r.problem}",
            _fmt(m.get("dataset_version")),
            metric,
            _fmt(fp32, "{:.4f}"),
            _fmt(int8, "{:.4f}"),
            promoted,
            _duration(m.get("pipeline_seconds")),
        ])  # fmt: skip
    return header, rows


def flatten(tree: Any, prefix: str = "") -> dict[str, Any]:
    """``{"train": {"lr": 0.1}}`` -> ``{"train.lr": 0.1}`` (lists stay values)."""
    if not isinstance(tree, dict):
        return {prefix: tree}
    out: dict[str, Any] = {}
    for key, value in tree.items():
        out.update(flatten(value, f"{prefix}.{key}" if prefix else str(key)))
    return out


def config_differences(runs: list[Run]) -> dict[str, list[Any]]:
    """Dotted config keys whose value differs between the runs -> the value of each run
    (None where a run has no such key)."""
    # A path inside the run's own directory (train.checkpoint_dir) is the same setting.
    flat = [{k: v.replace(str(r.path), "<run>") if isinstance(v, str) else v
             for k, v in flatten(r.config).items()} for r in runs]  # fmt: skip
    diff = {}
    for key in sorted(set().union(*flat)):
        # A run without the key (no config.yaml) shows "-" and is no difference by itself.
        present = [f[key] for f in flat if key in f]
        if any(v != present[0] for v in present[1:]):
            diff[key] = [f.get(key) for f in flat]
    return diff


def result_rows(runs: list[Run]) -> list[tuple[str, list[str]]]:
    """The results of each run, one row per measure (``-`` where a run has none)."""
    rows = [
        ("status", [r.status for r in runs]),
        ("data version", [_fmt(r.metrics.get("dataset_version")) for r in runs]),
    ]
    primaries = [primary(r.metrics) for r in runs]
    rows.append(("metric", [metric for metric, _, _ in primaries]))
    rows.append(("test fp32", [_fmt(fp32, "{:.4f}") for _, fp32, _ in primaries]))
    rows.append(("test int8", [_fmt(int8, "{:.4f}") for _, _, int8 in primaries]))
    for key, title, spec in RESULTS:
        rows.append((title, [_fmt(r.metrics.get(key), spec) for r in runs]))
    rows.append(("promoted", [{True: "yes", False: "no", None: "-"}[r.promoted] for r in runs]))
    rows.append(("duration", [_duration(r.metrics.get("pipeline_seconds")) for r in runs]))
    return rows


def _value(v: Any) -> str:
    return "-" if v is None else json.dumps(v) if isinstance(v, (list, dict)) else str(v)


def compare_tables(runs: list[Run]) -> tuple[list[str], list[tuple[str, list[str]]],
                                             list[tuple[str, list[str]]]]:  # fmt: skip
    """(run names, config-difference rows, result rows) for ``kubetrain compare``."""
    diffs = [(k, [_value(v) for v in vals]) for k, vals in config_differences(runs).items()]
    return [r.name for r in runs], diffs, result_rows(runs)


def _curves(runs: list[Run]) -> str | None:
    """Loss and validation accuracy per epoch, every run on the same axes (a PNG data URI)."""
    from matplotlib.ticker import MaxNLocator

    # the report's figure style and PNG embedding (it also selects the Agg backend)
    from kubetrain.evaluate.report import _png, plt

    histories = [(r.name, r.history()) for r in runs]
    if not any(h for _, h in histories):
        return None
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 3.8))
    for i, (name, hist) in enumerate(histories):
        if not hist:
            continue
        colour = f"C{i % 10}"
        epochs = [h["epoch"] for h in hist]
        ax1.plot(epochs, [h.get("train_loss") for h in hist], color=colour, marker="o",
                 label=f"{name} train")  # fmt: skip
        ax1.plot(epochs, [h.get("val_loss") for h in hist], color=colour, marker=".", ls="--",
                 label=f"{name} val")  # fmt: skip
        ax2.plot(epochs, [h.get("val_accuracy") for h in hist], color=colour, marker="o",
                 label=name)  # fmt: skip
    ax1.set_xlabel("epoch")
    ax1.set_ylabel("cross-entropy (dashed: validation)")
    ax2.set_xlabel("epoch")
    ax2.set_ylabel("validation accuracy")
    for ax in (ax1, ax2):
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    return _png(fig)


def _table(title: str, names: list[str], rows: list[tuple[str, list[str]]], cls: str) -> str:
    esc = html.escape
    head = "".join(f"<th>{esc(n)}</th>" for n in names)
    body = "".join(
        f"<tr><th>{esc(k)}</th>" + "".join(f"<td>{esc(v)}</td>" for v in vals) + "</tr>"
        for k, vals in rows
    )
    if not rows:
        body = f'<tr><td colspan="{len(names) + 1}">no differences</td></tr>'
    return (f'<h2>{esc(title)}</h2><table class="{cls}"><thead><tr><th></th>{head}</tr>'
            f"</thead><tbody>{body}</tbody></table>")  # fmt: skip


def render_html(runs: list[Run]) -> str:
    """A self-contained page: config differences, results, and the overlaid curves."""
    names, diffs, results = compare_tables(runs)
    curves = _curves(runs)
    figure = (f'<h2>Training curves</h2><img id="curves" alt="training curves of '
              f'{html.escape(", ".join(names))}" src="{curves}">') if curves else (
              "<h2>Training curves</h2><p>No run has a training history.</p>")  # fmt: skip
    style = (
        "body{font-family:sans-serif;margin:2em;color:#222}table{border-collapse:collapse;"
        "margin-bottom:1.5em}th,td{border:1px solid #ccc;padding:4px 10px;text-align:left}"
        "thead th{background:#eef}img{max-width:100%}"
    )
    return (
        f"<!doctype html><html><head><meta charset='utf-8'><title>kubetrain compare: "
        f"{html.escape(' vs '.join(names))}</title><style>{style}</style></head><body>"
        f"<h1>kubetrain compare</h1><p>{len(runs)} runs: {html.escape(', '.join(names))}</p>"
        + _table("Results", names, results, "results")
        + _table("Config differences", names, diffs, "config")
        + figure
        + "</body></html>"
    )
