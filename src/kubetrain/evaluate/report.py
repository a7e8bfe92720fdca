"""One self-contained HTML report (plots embedded as PNG data URIs)."""

from __future__ import annotations

import base64
import html
import io
import re
from typing import TYPE_CHECKING, Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt

from kubetrain.evaluate.config import WARMUP_CALLS

if TYPE_CHECKING:
    from kubetrain.core.artifacts import Evaluation, Scores, TrainEfficiency
    from kubetrain.core.records import Candidate, EpochStats, SearchSummary, Trial


def _png(fig) -> str:
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90, bbox_inches="tight")
    plt.close(fig)
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def _curves(history: list[EpochStats], metric: str = "accuracy") -> str:
    epochs = [h.epoch for h in history]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 3.4))
    ax1.plot(epochs, [h.train_loss for h in history], marker="o", label="train loss")
    ax1.plot(epochs, [h.val_loss for h in history], marker="o", label="val loss")
    # The loss's named parts (a detector's classifier, box, objectness ... losses), dashed.
    for name in sorted({k for h in history for k in h.loss_components}):
        values = [h.loss_components.get(name) for h in history]
        ax1.plot(epochs, values, ls="--", marker=".", label=f"train {name}")
    ax1.set_xlabel("epoch")
    ax1.set_ylabel("loss")
    ax1.legend()
    ax2.plot(epochs, [h.val_accuracy for h in history], marker="o", color="tab:green")
    ax2.set_xlabel("epoch")
    ax2.set_ylabel(f"validation {metric}")
    for ax in (ax1, ax2):
        ax.grid(alpha=0.3)
    return _png(fig)


def _efficiency(history: list[EpochStats]) -> str:
    """Per epoch: step time split, throughput and data wait, CPU and memory of every rank."""
    epochs = [h.epoch for h in history]
    fig, (ax1, ax2, ax3) = plt.subplots(1, 3, figsize=(13, 3.4))
    _step_time_panel(ax1, epochs, history)
    _throughput_panel(ax2, epochs, history)
    _rank_usage_panel(ax3, epochs, history)
    for ax in (ax1, ax2, ax3):
        ax.grid(alpha=0.3)
    return _png(fig)


def _step_time_panel(ax, epochs: list[int], history: list[EpochStats]) -> None:
    """A step's time, stacked: data wait, forward+backward, optimizer; all-reduce as a line
    (it overlaps the backward pass, so it is not a slice of the stack)."""
    bottom = [0.0] * len(history)
    for key, label in (
        ("data_seconds", "data wait"),
        ("compute_seconds", "forward+backward"),
        ("optimizer_seconds", "optimizer"),
    ):
        per_step = [1e3 * getattr(h, key) * h.step_seconds / max(h.epoch_seconds, 1e-12)
                    for h in history]  # fmt: skip
        ax.bar(epochs, per_step, bottom=bottom, label=label)
        bottom = [b + v for b, v in zip(bottom, per_step, strict=True)]
    comm = [1e3 * h.comm_seconds * h.step_seconds / max(h.epoch_seconds, 1e-12)
            for h in history]  # fmt: skip
    if any(comm):
        ax.plot(epochs, comm, color="black", marker=".", label="all-reduce (overlaps)")
    ax.set_xlabel("epoch")
    ax.set_ylabel("ms per step")
    ax.legend(fontsize=8)


def _throughput_panel(ax, epochs: list[int], history: list[EpochStats]) -> None:
    """Samples per second, and on a second axis the share of step time spent waiting for data."""
    ax.plot(epochs, [h.samples_per_second for h in history], marker="o", label="samples/s")
    ax.set_xlabel("epoch")
    ax.set_ylabel("samples/s")
    twin = ax.twinx()
    twin.plot(epochs, [100 * h.data_wait_share for h in history], color="tab:red", marker=".")
    twin.set_ylabel("data-wait share (%)", color="tab:red")


def _rank_usage_panel(ax, epochs: list[int], history: list[EpochStats]) -> None:
    """CPU % of every rank, and on a second axis (dashed) each rank's peak memory."""
    ranks = max((len(h.rank_cpu_percent) for h in history), default=0)
    for r in range(ranks):
        ax.plot(
            epochs, [h.rank_cpu_percent[r] for h in history], marker=".", label=f"rank {r} CPU %"
        )
    ax.set_xlabel("epoch")
    ax.set_ylabel("CPU % (100 = one core)")
    if ranks:
        mem = ax.twinx()
        for r in range(ranks):
            mem.plot(epochs, [h.rank_peak_rss_mib[r] for h in history], ls="--",
                     label=f"rank {r} peak MiB")  # fmt: skip
        mem.set_ylabel("peak memory (MiB, dashed)")
        ax.legend(fontsize=8, loc="lower left")


def _efficiency_rows(t: TrainEfficiency) -> list[tuple[str, Any]]:
    def pct(v):
        return "n/a" if v is None else f"{100 * v:.1f} %"

    rows = [
        ("precision", t.precision),
        ("FLOPs per sample (forward + backward)", t.flops_per_sample),
        ("MFU (vs a measured dense-GEMM peak of this device)", pct(t.mfu)),
        ("step time: forward+backward / optimizer",
         f"{pct(t.compute_share)} / {pct(t.optimizer_share)}"),
        ("all-reduce calls / time (s)", f"{t.allreduce_calls} / {(t.comm_seconds or 0):.3f}"),
        ("CPU % per rank (100 = one core)", t.rank_cpu_percent),
        ("peak memory per rank (MiB)", t.rank_peak_rss_mib),
        ("GPU peak memory (MiB)", t.gpu_peak_mib or "no GPU"),
        ("checkpoints written / time (s)",
         f"{t.checkpoints_written} / {(t.checkpoint_seconds or 0):.3f}"),
        ("torch.compile time (s)", t.compile_seconds or "not compiled"),
        ("resumed from step / restarts", f"{t.resumed_from_step} / {t.restarts or 0}"),
    ]  # fmt: skip
    return [(k, [round(x, 1) for x in v] if isinstance(v, list) else v) for k, v in rows]


def _trials(trials: list[Trial], goal: str, objective: str = "objective") -> str:
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 3.4))
    colours = {"complete": "tab:blue", "pruned": "tab:orange", "fail": "tab:red"}
    best: float | None = None
    best_line: list[float | None] = []
    for t in trials:
        value = t.value if t.value is not None else (t.curve[-1] if t.curve else None)
        if value is not None:
            ax1.scatter(t.number, value, color=colours.get(t.state, "grey"), label=t.state)
        if t.state == "complete" and value is not None:
            better = best is None or (value > best if goal == "maximize" else value < best)
            best = value if better else best
        best_line.append(best)
        if t.curve:
            ax2.plot(range(1, len(t.curve) + 1), t.curve, color=colours.get(t.state, "grey"),
                     alpha=0.7)  # fmt: skip
    ax1.plot([t.number for t in trials], best_line, color="black", lw=1, label="best so far")
    handles, labels = ax1.get_legend_handles_labels()
    unique = dict(zip(labels, handles, strict=False))
    ax1.legend(unique.values(), unique.keys())
    ax1.set_xlabel("trial")
    ax1.set_ylabel(objective)
    ax2.set_xlabel("epoch")
    ax2.set_ylabel(f"{objective} per epoch")
    for ax in (ax1, ax2):
        ax.grid(alpha=0.3)
    return _png(fig)


def _search_summary(trials: list[Trial], importance: dict[str, float]) -> str:
    """Pruned vs completed (trials and the epochs they spent) and parameter importance."""
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 3.0))
    states = ["complete", "pruned", "fail"]
    colours = ["tab:blue", "tab:orange", "tab:red"]
    counts = [sum(t.state == s for t in trials) for s in states]
    epochs = [sum(len(t.curve) for t in trials if t.state == s) for s in states]
    xs = range(len(states))
    ax1.bar([x - 0.2 for x in xs], counts, width=0.4, color=colours, label="trials")
    ax1b = ax1.twinx()
    ax1b.bar([x + 0.2 for x in xs], epochs, width=0.4, color=colours, alpha=0.4, hatch="//")
    ax1.set_xticks(list(xs), states)
    ax1.set_ylabel("trials (solid)")
    ax1b.set_ylabel("trial-epochs spent (hatched)")
    ax1.set_title("pruned vs completed", fontsize=10)
    if importance:
        names = list(importance)[::-1]
        ax2.barh(names, [importance[n] for n in names], color="tab:green")
        ax2.set_xlabel("importance (fANOVA)")
    else:
        ax2.text(0.5, 0.5, "too few completed trials", ha="center", va="center")
        ax2.set_axis_off()
    ax2.set_title("parameter importance", fontsize=10)
    return _png(fig)


def search_section(tuning: SearchSummary, trials: list[Trial]) -> str:
    """HTML of a search: summary line, plots and the trials table."""
    objective = tuning.objective or tuning.metric or "objective"
    html_parts = [
        f"<p>{tuning.trials_total} trials ({tuning.trials_complete} complete, "
        f"{tuning.trials_pruned} stopped early, {tuning.trials_failed} failed; "
        f"{'?' if tuning.trial_epochs_total is None else tuning.trial_epochs_total} trial-epochs) with "
        f"<code>{html.escape(tuning.algorithm or '')}</code>; best {html.escape(objective)} "
        f"{tuning.best_value or float('nan'):.4f} at trial {tuning.best_trial}: "
        f"<code>{html.escape(str(tuning.best_params))}</code></p>",
        f"<img src='{_trials(trials, tuning.goal or 'maximize', objective)}' alt='objective vs trial'>",
        f"<img src='{_search_summary(trials, tuning.param_importance or {})}' "
        "alt='pruned vs completed, parameter importance'>",
    ]
    rows = "".join(
        f"<tr><td>{t.number}</td><td>{t.state}</td>"
        f"<td>{_objective(t.value)}</td>"
        f"<td>{len(t.curve)}</td><td>{t.world_size or ''}</td>"
        f"<td><code>{html.escape(str(t.params))}</code></td>"
        f"<td>{html.escape(t.error or '')}</td></tr>"
        for t in trials
    )
    html_parts.append(
        "<table><tr><th>trial</th><th>state</th><th>objective</th><th>epochs</th>"
        f"<th>processes</th><th>parameters</th><th>error</th></tr>{rows}</table>"
    )
    return "".join(html_parts)


def render_search(tuning: SearchSummary, trials: list[Trial]) -> str:
    """The tune step's own HTML page."""
    return _page(
        "kubetrain search report", "<h1>kubetrain search</h1>" + search_section(tuning, trials)
    )


def _quant_table(candidates: list[Candidate], metric: str = "accuracy") -> str:
    """Every quantization tried: size, latency, throughput (tokens/s for text), the primary
    metric on validation, verdict."""
    if not candidates:
        return ""
    tokens = any(c.tokens_per_second_b64 for c in candidates)
    # A detector's candidates are timed at batch 8 (kubetrain.quantize.detection), others at 64.
    big = 8 if any(c.latency_ms_b8 is not None for c in candidates) else 64
    head = (
        f"<tr><th>candidate</th><th>val {html.escape(metric)}</th><th>drop</th>"
        f"<th>size (bytes)</th><th>× fp32</th><th>batch 1 (ms)</th><th>batch {big} (ms)</th>"
        f"<th>× fp32 b{big}</th><th>samples/s b{big}</th>"
        + ("<th>tokens/s b1</th><th>tokens/s b64</th>" if tokens else "")
        + "<th>verdict</th></tr>"
    )

    def num(v: Any, fmt: str) -> str:
        return "" if v is None else format(v, fmt)

    rows = "".join(
        f"<tr><td>{html.escape(c.name)}</td>"
        f"<td>{num(c.val_metric, '.4f')}</td>"
        f"<td>{num(c.accuracy_drop, '+.4f')}</td><td>{num(c.size_bytes, 'd')}</td>"
        f"<td>{num(c.size_ratio, '.2f')}</td><td>{num(c.latency_ms_b1, '.3f')}</td>"
        f"<td>{num(c.latency_ms(big), '.3f')}</td>"
        f"<td>{num(getattr(c, f'latency_ratio_b{big}', None), '.2f')}</td>"
        f"<td>{num(_rate(c, big), '.1f')}</td>"
        + (
            f"<td>{num(c.tokens_per_second_b1, '.0f')}</td>"
            f"<td>{num(c.tokens_per_second_b64, '.0f')}</td>"
            if tokens
            else ""
        )
        + f"<td>{html.escape(c.verdict or '')}</td></tr>"
        for c in candidates
    )
    return f"<table>{head}{rows}</table>"


def _rate(candidate: Candidate, batch: int) -> float | None:
    ms = candidate.latency_ms(batch)
    return batch * 1e3 / ms if ms else None


def _page(title: str, body: str) -> str:
    style = (
        "body{font-family:system-ui,sans-serif;max-width:1100px;margin:2em auto;color:#222}"
        "table{border-collapse:collapse;margin:1em 0}th,td{border:1px solid #ccc;padding:4px 8px;"
        "text-align:left}img{max-width:100%}.verdict{font-size:1.2em;padding:.5em}"
        ".promoted{background:#e6f4ea}.not{background:#fdecea}"
        ".grid{display:flex;flex-wrap:wrap;gap:8px}.grid figure{margin:0;text-align:center;"
        "font-size:.8em}.grid img{width:64px;height:64px;image-rendering:pixelated}"
        ".examples td{max-width:420px;white-space:pre-wrap;word-break:break-word}"
        ".boxes{display:flex;flex-wrap:wrap;gap:12px}.boxes figure{margin:0;font-size:.8em;"
        "max-width:420px}.boxes img{image-rendering:pixelated}"
    )
    return (
        f"<!doctype html><html><head><meta charset='utf-8'><title>{title}</title>"
        f"<style>{style}</style></head><body>{body}</body></html>"
    )


def _compare(e: Evaluation) -> str:
    by_batch = {lat.batch_size: lat for lat in e.latency}
    panels: list[tuple[str, float | None, float | None]] = [
        (f"test {e.metric}", e.fp32.value, e.int8.value)
    ]
    batches = sorted(by_batch)[:2] if len(by_batch) >= 2 else [1, 64]
    for batch in batches:
        lat = by_batch.get(batch)
        panels.append(
            (f"latency batch {batch} (ms)", lat.fp32_ms if lat else None,
             lat.int8_ms if lat else None)
        )  # fmt: skip
    panels.append(("size (KiB)", e.sizes.weights_fp32 / 1024, e.sizes.weights_int8 / 1024))
    fig, axes = plt.subplots(1, 4, figsize=(12, 3))
    for ax, (title, *values) in zip(axes, panels, strict=True):
        ax.bar(["fp32", "int8"], [v or 0 for v in values], color=["tab:blue", "tab:purple"])
        ax.set_title(title, fontsize=10)
        for i, v in enumerate(values):
            if v is not None:
                ax.text(i, v, f"{v:.3g}", ha="center", va="bottom", fontsize=9)
    return _png(fig)


# A confusion matrix with more classes than this shows those with the most errors only.
MAX_CONFUSION_CLASSES = 20


def top_error_classes(matrix: list[list[int]], limit: int = MAX_CONFUSION_CLASSES) -> list[int]:
    """Indices of the ``limit`` classes with the most errors (a true sample of the class
    predicted as another, or another class's sample predicted as it), in class order; all
    classes if there are at most ``limit``."""
    k = len(matrix)
    if k <= limit:
        return list(range(k))
    errors = [
        sum(matrix[i]) - matrix[i][i] + sum(matrix[r][i] for r in range(k)) - matrix[i][i]
        for i in range(k)
    ]
    ranked = sorted(range(k), key=lambda i: (-errors[i], i))[:limit]
    return sorted(ranked)


def _confusion(matrix: list[list[int]], classes: list[str]) -> str:
    keep = top_error_classes(matrix)
    matrix = [[matrix[i][j] for j in keep] for i in keep]
    classes = [classes[i] for i in keep]
    size = max(3.5, 0.45 * len(classes))
    fig, ax = plt.subplots(figsize=(size, size))
    ax.imshow(matrix, cmap="Blues")
    ax.set_xticks(range(len(classes)), classes, rotation=90 if len(classes) > 12 else 0)
    ax.set_yticks(range(len(classes)), classes)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    peak = max((max(r) for r in matrix), default=0) or 1
    for i, row in enumerate(matrix):
        for j, v in enumerate(row):
            if v:
                ax.text(j, i, str(v), ha="center", va="center", fontsize=8,
                        color="white" if v > peak / 2 else "black")  # fmt: skip
    return _png(fig)


# Precision-recall curves drawn, one panel a class (the classes with the lowest AP first).
MAX_PR_CURVES = 20


def _pr_curves(curves: dict[str, list[float]], ap: dict[str, float | None]) -> str:
    names = sorted(curves, key=lambda n: (ap.get(n) or 0.0, n))[:MAX_PR_CURVES]
    cols = min(5, len(names))
    rows = -(-len(names) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(2.6 * cols, 2.3 * rows), squeeze=False)
    recall = [i / 100 for i in range(101)]
    for ax, name in zip(axes.flat, names, strict=False):
        ax.plot(recall, curves[name], color="tab:blue")
        ax.set_title(f"{name} (AP50 {ap.get(name) or 0:.2f})", fontsize=8)
        ax.set_xlim(0, 1)
        ax.set_ylim(0, 1.02)
        ax.tick_params(labelsize=7)
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(names) :]:
        ax.set_axis_off()
    fig.supxlabel("recall", fontsize=9)
    fig.supylabel("precision", fontsize=9)
    return _png(fig)


def detection_section(scores: Scores) -> str:
    """A detector's AP per class (COCO AP@[.5:.95] and AP50) and its precision-recall curve per
    class at IoU 0.5; empty for other tasks."""
    values = scores.values
    per_class = values.get("per_class_ap")
    if per_class is None:
        return ""
    ap50 = values.get("per_class_ap50") or {}
    rows = "".join(
        f"<tr><th>{html.escape(str(n))}</th><td>{_fmt(a)}</td><td>{_fmt(ap50.get(n))}</td></tr>"
        for n, a in per_class.items()
    )
    curves = values.get("pr_curves") or {}
    shown = min(len(curves), MAX_PR_CURVES)
    note = f" (the {shown} with the lowest AP50 of {len(curves)})" if shown < len(curves) else ""
    plot = (
        f"<h3>Precision-recall per class at IoU 0.5{note}</h3>"
        f"<img src='{_pr_curves(curves, ap50)}' alt='precision-recall curves'>"
        if curves
        else ""
    )
    return (
        "<h2>Per class (fp32, COCO's evaluator)</h2><table><tr><th>class</th>"
        f"<th>AP@[.5:.95]</th><th>AP50</th></tr>{rows}</table>" + plot
    )


def per_class_section(scores: Scores, classes: list[str]) -> str:
    """The confusion matrix (the classes with most errors when there are many) and per-class
    accuracy of a classification model; empty for other tasks."""
    matrix = scores.confusion_matrix
    if not matrix or not classes:
        return ""
    shown = top_error_classes(matrix)
    note = (
        f"<p>{len(classes)} classes: the matrix shows the {len(shown)} with the most errors.</p>"
        if len(shown) < len(classes)
        else ""
    )
    return (
        "<h2>Per class (fp32)</h2>" + note
        + f"<img src='{_confusion(matrix, classes)}' alt='confusion matrix'>"
        + _table(list((scores.per_class_accuracy or {}).items()))
    )  # fmt: skip


def metrics_table(e: Evaluation) -> str:
    """Every single-number result of both models side by side (primary metric first), the
    scoring throughput and, for seq2seq, the copy-the-source baseline."""
    fp32, int8 = e.fp32.scalars(), e.int8.scalars()
    rows: list[tuple[str, float | None, float | None]] = []
    for name, value in fp32.items():
        if name.startswith("copy_baseline_"):
            continue
        primary = " (primary)" if name == e.metric else ""
        rows.append((f"{name}{primary}", value, int8.get(name)))
    rows.append(("test samples/s (one scoring pass)", e.fp32.samples_per_second,
                 e.int8.samples_per_second))  # fmt: skip
    body = "".join(
        f"<tr><th>{html.escape(n)}</th><td>{_fmt(a)}</td><td>{_fmt(b)}</td></tr>"
        for n, a, b in rows
    )
    baselines = "".join(
        f"<tr><th>{html.escape(n)}</th><td colspan='2'>{_fmt(v)}</td></tr>"
        for n, v in fp32.items()
        if n.startswith("copy_baseline_")
    )
    return f"<table><tr><th>test</th><th>fp32</th><th>int8</th></tr>{body}{baselines}</table>"


def throughput_note(e: Evaluation) -> str:
    """What the two speed figures measure, and a word when they disagree on which model is
    faster (they measure different things; neither is wrong)."""
    note = (
        "Two speed figures, measured differently: the latency rows time the model alone on one "
        "fixed batch (median of repeated calls); 'test samples/s (one scoring pass)' is one "
        "pass over the whole test split, its varying batch shapes and the task's own work "
        "(decoding text, argmax, collecting examples) included. Both models are warmed up "
        f"the same way first ({WARMUP_CALLS} forward passes on a test batch of the largest "
        "latency batch size)."
    )
    fp32, int8 = e.fp32.samples_per_second, e.int8.samples_per_second
    largest = max(e.latency, key=lambda lat: lat.batch_size, default=None)
    if fp32 and int8 and largest is not None:
        faster_scoring = int8 > fp32
        faster_latency = largest.int8_ms < largest.fp32_ms
        if faster_scoring != faster_latency:
            which = "int8" if faster_latency else "fp32"
            note += (
                f" Here they disagree: {which} is faster at batch {largest.batch_size}, but "
                f"not over the scoring pass ({fp32:.0f} vs {int8:.0f} samples/s fp32 vs "
                "int8): per-call costs the fixed batch does not show (a compiled model's "
                "recompiles for new batch shapes, small batches) weigh there."
            )
    return note


def _data_uri(value: Any) -> str | None:
    """``value`` if it is a base64 image data URI (what an example image must be), else None."""
    if isinstance(value, str) and re.fullmatch(
        r"data:image/(png|jpeg|webp);base64,[A-Za-z0-9+/=]+", value
    ):
        return value
    return None


def examples_section(examples: list[dict[str, Any]], kind: str | None = None) -> str:
    """The task's example predictions (``Scores.examples``), by their fields: misclassified
    images as a grid with true and predicted labels; text with true and predicted labels; or
    source / reference / prediction (seq2seq). All text is HTML-escaped.

    Args:
        examples: the examples, all of one task's shape (the first one decides which).
        kind: the dataset kind (not read: the fields decide the layout).

    Returns:
        The section's HTML; empty without examples.
    """
    if not examples:
        return ""
    first = examples[0]
    if "image" in first and "missed" in first:  # detection: ground truth | predictions
        return _detection_examples(examples)
    if "image" in first:
        return _image_examples(examples)
    if "source" in first:  # seq2seq
        return _examples_table(
            "Example predictions (fp32)", ("source", "reference", "prediction"), examples
        )
    return _examples_table(
        "Misclassified test examples (fp32)", ("text", "true", "predicted"), examples
    )


def _esc(value: Any) -> str:
    return html.escape(str(value))


def _example_image(example: dict[str, Any]) -> str:
    """The example's image, or a placeholder when it is not an image data URI."""
    uri = _data_uri(example.get("image"))
    return f"<img src='{uri}' alt='test image'>" if uri else "<span>(no image)</span>"


def _detection_examples(examples: list[dict[str, Any]]) -> str:
    """Detection: each test image with its missed and false detections, most errors first."""
    cells = []
    for ex in examples:
        cells.append(
            f"<figure>{_example_image(ex)}<figcaption><b>{_esc(ex.get('source', ''))}</b>: "
            f"{_esc(ex.get('missed', 0))} missed, {_esc(ex.get('false', 0))} false "
            f"detection(s)<br>true: {_esc(ex.get('true', ''))}<br>predicted: "
            f"{_esc(ex.get('predicted', ''))}</figcaption></figure>"
        )
    return (
        "<h2>Test images, most errors first (fp32)</h2><p>Left: ground truth (green); "
        "right: detections with a score of at least 0.5 (orange). Errors at IoU 0.5, as "
        "COCO's evaluator matches them.</p><div class='boxes'>" + "".join(cells) + "</div>"
    )


def _image_examples(examples: list[dict[str, Any]]) -> str:
    """Image classification: the misclassified images as a grid, true and predicted labels."""
    cells = []
    for ex in examples:
        cells.append(
            f"<figure>{_example_image(ex)}<figcaption>true <b>{_esc(ex.get('true', ''))}</b>"
            f"<br>predicted <b>{_esc(ex.get('predicted', ''))}</b></figcaption></figure>"
        )
    return (
        "<h2>Misclassified test images (fp32)</h2><div class='grid'>" + "".join(cells)
        + "</div>"
    )  # fmt: skip


def _examples_table(title: str, fields: tuple[str, ...], examples: list[dict[str, Any]]) -> str:
    """Text examples as a table, a column per field (the field's name is its heading)."""
    head = "<tr>" + "".join(f"<th>{f}</th>" for f in fields) + "</tr>"
    rows = "".join(
        "<tr>" + "".join(f"<td>{_esc(ex.get(f, ''))}</td>" for f in fields) + "</tr>"
        for ex in examples
    )
    return f"<h2>{title}</h2><table class='examples'>{head}{rows}</table>"


def _objective(value: float | None) -> str:
    return "" if value is None else f"{value:.4f}"


def _fmt(v: Any) -> str:
    if v is None:
        return ""
    if isinstance(v, float):
        return f"{v:.4g}"
    return html.escape(str(v))


def _data_notes(notes: list[str] | tuple[str, ...]) -> str:
    """What preprocessing left out of the data, one item a line (nothing: no section)."""
    if not notes:
        return ""
    items = "".join(f"<li>{html.escape(str(n))}</li>" for n in notes)
    return f"<h3>Data left out or cut</h3><ul class='data-notes'>{items}</ul>"


def _table(rows: list[tuple[str, Any]]) -> str:
    body = "".join(f"<tr><th>{html.escape(str(k))}</th><td>{_fmt(v)}</td></tr>" for k, v in rows)
    return f"<table>{body}</table>"


def render(e: Evaluation, data_notes: list[str] | tuple[str, ...] = ()) -> str:
    """HTML of the run's evaluation: the primary metric and the others, what preprocessing
    dropped, skipped or clipped (``data_notes``: the dataset meta's ``notes``), training, the
    search, fp32 vs int8, per class (classification), example predictions.

    Args:
        e: the evaluation of the run.
        data_notes: what preprocessing left out (the dataset meta's ``notes``).

    Returns:
        One self-contained HTML page.
    """
    parts = [
        _verdict(e),
        "<h2>Summary</h2>" + _table(_headline_rows(e)),
        _data_notes(data_notes),
        "<h3>All test metrics</h3>" + metrics_table(e),
        _training_section(e),
        _tuning_section(e),
        _quantization_section(e),
        per_class_section(e.fp32, e.classes or []),
        detection_section(e.fp32),
        examples_section(e.fp32.examples, e.kind),
    ]
    return _page("kubetrain report", "".join(parts))


def _verdict(e: Evaluation) -> str:
    """The title and the one line that says whether the model was promoted, and why."""
    verdict = "promoted" if e.promoted else "not promoted"
    metric = html.escape(e.metric)
    baseline = e.copy_baseline
    beyond = ""
    if baseline is not None and e.beat_copy_baseline:
        beyond = f", and above copying the source ({baseline:.4f})"
    return (
        f"<h1>kubetrain run report</h1><p class='verdict {verdict.split()[0]}'>Model {verdict}: "
        f"test {metric} fp32 {e.fp32.value:.4f}, int8 {e.int8.value:.4f}, "
        f"bar {e.min_value:.4f}{beyond}.</p>"
    )


def _latency_rows(e: Evaluation) -> list[tuple[str, Any]]:
    """fp32 / int8 latency at each timed batch size (and tokens/s where the task has tokens)."""
    latency: list[tuple[str, Any]] = []
    for lat in e.latency:
        latency.append((f"latency batch {lat.batch_size} fp32 / int8 (ms)",
                        f"{lat.fp32_ms:.3f} / {lat.int8_ms:.3f}"))  # fmt: skip
        if lat.tokens:
            latency.append((f"tokens/s batch {lat.batch_size} fp32 / int8",
                            f"{lat.tokens_per_second('fp32'):.0f} / "
                            f"{lat.tokens_per_second('int8'):.0f}"))  # fmt: skip
    return latency


def _headline_rows(e: Evaluation) -> list[tuple[str, Any]]:
    """The summary table: results, size, latency, training cost, data version, the bar."""
    t = e.train
    baseline = e.copy_baseline
    return [
        (f"test {e.metric} fp32", e.fp32.value),
        (f"test {e.metric} int8", e.int8.value),
        *([(f"copy-the-source {e.metric}", baseline)] if baseline is not None else []),
        ("quantization", e.quantization.method),
        ("model size fp32 / int8 (bytes)", f"{e.sizes.weights_fp32} / {e.sizes.weights_int8}"),
        *_latency_rows(e),
        ("training time (s)", t.seconds),
        ("time per step (ms)", 1e3 * t.step_seconds),
        ("training samples/s", t.samples_per_second),
        ("data-wait share of step time", t.data_wait_share),
        ("processes (world size)", t.world_size),
        ("ranks ended with identical weights", t.ranks_identical),
        ("dataset version", e.dataset_version),
        (f"promotion bar (min {e.metric})", e.min_value),
    ]


def _training_section(e: Evaluation) -> str:
    """Training: the loss and validation curves, then the efficiency plots and table."""
    return "".join(
        [
            "<h2>Training</h2>",
            f"<img src='{_curves(e.history)}' alt='loss and validation metric curves'>",
            "<h3>Efficiency</h3>",
            f"<img src='{_efficiency(e.history)}' alt='step time split, throughput, CPU'>",
            _table(_efficiency_rows(e.train)),
        ]
    )


def _tuning_section(e: Evaluation) -> str:
    """Tuning: the search, or a line saying it was disabled."""
    if e.search.enabled:
        return "<h2>Tuning</h2>" + search_section(e.search.summary, e.search.trials)
    return "<h2>Tuning</h2><p>Tuning was disabled (tune.enabled=false).</p>"


def _quantization_section(e: Evaluation) -> str:
    """fp32 vs int8: the decision, the comparison plot, every candidate, how speed was timed."""
    quant = e.quantization
    return "".join(
        [
            "<h2>fp32 vs int8</h2>",
            f"<p>{html.escape(quant.decision)}</p>",
            f"<img src='{_compare(e)}' alt='fp32 vs int8'>",
            _quant_table(quant.candidates, quant.metric or "accuracy"),
            "<p>Latency: median of repeated forward passes in this process "
            f"({e.latency_threads} torch thread(s)); measure on the target hardware before "
            "relying on it.</p>",
            f"<p>{html.escape(throughput_note(e))}</p>",
        ]
    )
