"""The accuracy gate and the ``auto`` choice: pure functions over measured candidates."""

from __future__ import annotations

from kubetrain.core.errors import KubetrainError
from kubetrain.core.records import Candidate
from kubetrain.quantize.config import QuantizeConfig


def within_budget(candidate: Candidate, max_drop: float) -> bool:
    """True if a built candidate loses at most ``max_drop`` of the primary validation metric
    (accuracy, BLEU, ...: ``accuracy_drop``) against fp32."""
    drop = candidate.accuracy_drop
    return drop is not None and drop <= max_drop + 1e-9


def choose(candidates: list[Candidate], max_drop: float, batch: int = 64) -> Candidate | None:
    """The fastest candidate at ``batch`` (64; a detector's 8) among those within the budget
    (``None`` if none)."""
    ok = [c for c in candidates if within_budget(c, max_drop)]
    return min(ok, key=lambda c: c.latency_ms(batch) or float("inf")) if ok else None


def verdicts(candidates: list[Candidate], chosen: Candidate | None, max_drop: float) -> None:
    """Set each candidate's one-line ``verdict`` (kept / slower / over budget / failed)."""
    for c in candidates:
        if c.error:
            c.verdict = f"failed: {c.error}"
        elif not within_budget(c, max_drop):
            c.verdict = f"over budget: drop {c.accuracy_drop or 0:+.4f} > {max_drop:.4f}"
        elif chosen is not None and c.name == chosen.name:
            c.verdict = "chosen"
        else:
            c.verdict = "within budget, slower"


def explain(
    chosen: Candidate | None,
    candidates: list[Candidate],
    max_drop: float,
    metric: str = "accuracy",
    batch: int = 64,
) -> str:
    """One sentence saying what was kept and why (``metric``: what the drop is measured on,
    ``batch``: the latency it was chosen on)."""
    if chosen is None:
        tried = ", ".join(f"{c.name} ({c.verdict})" for c in candidates)
        return f"no int8 candidate within the accuracy budget {max_drop:.4f}; tried {tried}"
    others = [c for c in candidates if c is not chosen]
    rest = "; ".join(f"{c.name}: {c.verdict}" for c in others)
    return (
        f"kept {chosen.name}: batch-{batch} latency "
        f"{getattr(chosen, f'latency_ratio_b{batch}', None) or 0:.2f}× fp32, "
        f"size {chosen.size_ratio or 0:.2f}× fp32, validation {metric} drop "
        f"{chosen.accuracy_drop or 0:+.4f} ≤ {max_drop:.4f}"
        + (f" (others — {rest})" if rest else "")
    )


def decide(
    candidates: list[Candidate], qcfg: QuantizeConfig, metric: str, reference: float,
    batch: int = 64, none: str | None = None,
) -> tuple[Candidate | None, str]:  # fmt: skip
    """The gate and the choice over the measured ``candidates``: (the chosen one, or None for
    fp32; the one-line decision). ``none``: nothing was tried, and why (fp32 is kept).

    Raises:
        KubetrainError: nothing passes the gate and ``quantize.on_drop`` is ``fail`` (the
            message has every candidate's verdict and the fp32 ``reference``).
    """
    budget = qcfg.max_accuracy_drop
    chosen = None if none is not None else choose(candidates, budget, batch)
    verdicts(candidates, chosen, budget)
    if none is not None:
        return None, none
    decision = explain(chosen, candidates, budget, metric, batch)
    if chosen is None:
        if qcfg.on_drop == "fail":
            raise KubetrainError(
                f"quantize: {decision} (fp32 validation {metric} {reference:.4f}); raise "
                "quantize.max_accuracy_drop or set quantize.on_drop=keep_fp32"
            )
        decision += "; keeping fp32 (quantize.on_drop=keep_fp32)"
    return chosen, decision
