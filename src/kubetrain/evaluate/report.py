"""One self-contained HTML report (plots embedded as PNG data URIs)."""

from __future__ import annotations

import base64
import html
import io
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt


def _png(fig) -> str:
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90, bbox_inches="tight")
    plt.close(fig)
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def _curves(history: list[dict]) -> str:
    epochs = [h["epoch"] for h in history]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 3.4))
    ax1.plot(epochs, [h["train_loss"] for h in history], marker="o", label="train loss")
    ax1.plot(epochs, [h["val_loss"] for h in history], marker="o", label="val loss")
    ax1.set_xlabel("epoch")
    ax1.set_ylabel("cross-entropy")
    ax1.legend()
    ax2.plot(epochs, [h["val_accuracy"] for h in history], marker="o", color="tab:green")
    ax2.set_xlabel("epoch")
    ax2.set_ylabel("validation accuracy")
    for ax in (ax1, ax2):
        ax.grid(alpha=0.3)
    return _png(fig)


def _trials(trials: list[dict], goal: str) -> str:
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 3.4))
    colours = {"complete": "tab:blue", "pruned": "tab:orange", "fail": "tab:red"}
    best, best_line = None, []
    for t in trials:
        value = t["value"] if t["value"] is not None else (t["curve"][-1] if t["curve"] else None)
        if value is not None:
            ax1.scatter(t["number"], value, color=colours.get(t["state"], "grey"), label=t["state"])
        if t["state"] == "complete":
            better = best is None or (value > best if goal == "maximize" else value < best)
            best = value if better else best
        best_line.append(best)
        if t["curve"]:
            ax2.plot(range(1, len(t["curve"]) + 1), t["curve"], color=colours.get(t["state"], "grey"),
                     alpha=0.7)  # fmt: skip
    ax1.plot([t["number"] for t in trials], best_line, color="black", lw=1, label="best so far")
    handles, labels = ax1.get_legend_handles_labels()
    unique = dict(zip(labels, handles, strict=False))
    ax1.legend(unique.values(), unique.keys())
    ax1.set_xlabel("trial")
    ax1.set_ylabel("objective")
    ax2.set_xlabel("epoch")
    ax2.set_ylabel("objective per epoch")
    for ax in (ax1, ax2):
        ax.grid(alpha=0.3)
    return _png(fig)


def _compare(m: dict[str, Any]) -> str:
    fig, axes = plt.subplots(1, 4, figsize=(12, 3))
    panels = [
        ("test accuracy", "test_accuracy"),
        ("latency batch 1 (ms)", "latency_ms_b1"),
        ("latency batch 64 (ms)", "latency_ms_b64"),
        ("size (KiB)", "model_size_bytes"),
    ]
    for ax, (title, key) in zip(axes, panels, strict=True):
        values = [m.get(f"{key}_fp32"), m.get(f"{key}_int8")]
        if key == "model_size_bytes":
            values = [v / 1024 if v is not None else None for v in values]
        ax.bar(["fp32", "int8"], [v or 0 for v in values], color=["tab:blue", "tab:purple"])
        ax.set_title(title, fontsize=10)
        for i, v in enumerate(values):
            if v is not None:
                ax.text(i, v, f"{v:.3g}", ha="center", va="bottom", fontsize=9)
    return _png(fig)


def _confusion(matrix: list[list[int]], classes: list[str]) -> str:
    size = max(3.5, 0.45 * len(classes))
    fig, ax = plt.subplots(figsize=(size, size))
    ax.imshow(matrix, cmap="Blues")
    ax.set_xticks(range(len(classes)), classes, rotation=90 if len(classes) > 12 else 0)
    ax.set_yticks(range(len(classes)), classes)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    peak = max(max(r) for r in matrix) or 1
    for i, row in enumerate(matrix):
        for j, v in enumerate(row):
            if v:
                ax.text(j, i, v, ha="center", va="center", fontsize=8,
                        color="white" if v > peak / 2 else "black")  # fmt: skip
    return _png(fig)


def _objective(value: float | None) -> str:
    return "" if value is None else f"{value:.4f}"


def _table(rows: list[tuple[str, Any]]) -> str:
    def fmt(v: Any) -> str:
        if isinstance(v, float):
            return f"{v:.4g}"
        return html.escape(str(v))

    body = "".join(f"<tr><th>{html.escape(k)}</th><td>{fmt(v)}</td></tr>" for k, v in rows)
    return f"<table>{body}</table>"


def render(metrics: dict[str, Any], details: dict[str, Any]) -> str:
    """HTML of the run: ``metrics`` is metrics.json; ``details`` holds history, trials, tuning."""
    m = metrics
    verdict = "promoted" if m.get("promoted") else "not promoted"
    headline = [
        ("test accuracy fp32", m["test_accuracy_fp32"]),
        ("test accuracy int8", m["test_accuracy_int8"]),
        ("quantization", m["quantize_method"]),
        ("model size fp32 / int8 (bytes)", f"{m['model_size_bytes_fp32']} / {m['model_size_bytes_int8']}"),
        ("latency batch 1 fp32 / int8 (ms)", f"{m['latency_ms_b1_fp32']:.3f} / {m['latency_ms_b1_int8']:.3f}"),
        ("latency batch 64 fp32 / int8 (ms)", f"{m['latency_ms_b64_fp32']:.3f} / {m['latency_ms_b64_int8']:.3f}"),
        ("training time (s)", m["train_seconds"]),
        ("time per step (ms)", 1e3 * m["train_step_seconds"]),
        ("training samples/s", m["train_samples_per_second"]),
        ("data-wait share of step time", m["train_data_wait_share"]),
        ("processes (world size)", m["train_world_size"]),
        ("ranks ended with identical weights", m["train_ranks_identical"]),
        ("dataset version", m["dataset_version"]),
        ("promotion bar (min accuracy)", m["min_accuracy"]),
    ]  # fmt: skip
    tuning = details.get("tuning") or {}
    parts = [
        f"<h1>kubetrain run report</h1><p class='verdict {verdict.split()[0]}'>Model {verdict}: "
        f"test accuracy fp32 {m['test_accuracy_fp32']:.4f}, int8 {m['test_accuracy_int8']:.4f}, "
        f"bar {m['min_accuracy']:.4f}.</p>",
        "<h2>Summary</h2>" + _table(headline),
        "<h2>Training</h2>",
        f"<img src='{_curves(details['history'])}' alt='loss and accuracy curves'>",
        "<h2>Tuning</h2>",
    ]
    if tuning.get("enabled"):
        parts.append(
            f"<p>{tuning['trials_total']} trials ({tuning['trials_complete']} complete, "
            f"{tuning['trials_pruned']} stopped early, {tuning['trials_failed']} failed) with "
            f"<code>{html.escape(tuning['algorithm'])}</code>; best {tuning['metric']} "
            f"{tuning['best_value']:.4f} at trial {tuning['best_trial']}: "
            f"<code>{html.escape(str(tuning['best_params']))}</code></p>"
            f"<img src='{_trials(details['trials'], tuning['goal'])}' alt='tuning trials'>"
        )
        rows = "".join(
            f"<tr><td>{t['number']}</td><td>{t['state']}</td>"
            f"<td>{_objective(t['value'])}</td>"
            f"<td>{len(t['curve'])}</td><td><code>{html.escape(str(t['params']))}</code></td></tr>"
            for t in details["trials"]
        )
        parts.append(
            "<table><tr><th>trial</th><th>state</th><th>objective</th><th>epochs</th>"
            f"<th>parameters</th></tr>{rows}</table>"
        )
    else:
        parts.append("<p>Tuning was disabled (tune.enabled=false).</p>")
    parts += [
        "<h2>fp32 vs int8</h2>",
        f"<img src='{_compare(m)}' alt='fp32 vs int8'>",
        "<p>Latency: median of repeated forward passes in this process "
        f"({m['latency_threads']} torch thread(s)); measure on the target hardware before "
        "relying on it.</p>",
        "<h2>Per class (fp32)</h2>",
        f"<img src='{_confusion(details['confusion_matrix'], details['classes'])}' "
        "alt='confusion matrix'>",
        _table(list(details["per_class_accuracy"].items())),
    ]
    style = (
        "body{font-family:system-ui,sans-serif;max-width:1100px;margin:2em auto;color:#222}"
        "table{border-collapse:collapse;margin:1em 0}th,td{border:1px solid #ccc;padding:4px 8px;"
        "text-align:left}img{max-width:100%}.verdict{font-size:1.2em;padding:.5em}"
        ".promoted{background:#e6f4ea}.not{background:#fdecea}"
    )
    return (
        "<!doctype html><html><head><meta charset='utf-8'><title>kubetrain report</title>"
        f"<style>{style}</style></head><body>{''.join(parts)}</body></html>"
    )
