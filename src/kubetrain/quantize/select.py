"""The accuracy gate and the ``auto`` choice: pure functions over measured candidates."""

from __future__ import annotations

from kubetrain.core.records import Candidate


def within_budget(candidate: Candidate, max_drop: float) -> bool:
    """True if a built candidate loses at most ``max_drop`` of the primary validation metric
    (accuracy, BLEU, ...: ``accuracy_drop``) against fp32."""
    drop = candidate.accuracy_drop
    return drop is not None and drop <= max_drop + 1e-9


def choose(candidates: list[Candidate], max_drop: float) -> Candidate | None:
    """The fastest candidate at batch 64 among those within the budget (``None`` if none)."""
    ok = [c for c in candidates if within_budget(c, max_drop)]
    return min(ok, key=lambda c: c.latency_ms_b64 or float("inf")) if ok else None


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
) -> str:
    """One sentence saying what was kept and why (``metric``: what the drop is measured on)."""
    if chosen is None:
        tried = ", ".join(f"{c.name} ({c.verdict})" for c in candidates)
        return f"no int8 candidate within the accuracy budget {max_drop:.4f}; tried {tried}"
    others = [c for c in candidates if c is not chosen]
    rest = "; ".join(f"{c.name}: {c.verdict}" for c in others)
    return (
        f"kept {chosen.name}: batch-64 latency {chosen.latency_ratio_b64 or 0:.2f}× fp32, "
        f"size {chosen.size_ratio or 0:.2f}× fp32, validation {metric} drop "
        f"{chosen.accuracy_drop or 0:+.4f} ≤ {max_drop:.4f}"
        + (f" (others — {rest})" if rest else "")
    )
