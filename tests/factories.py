"""Typed records of the artifacts (``kubetrain.core.records``) with plausible values, for tests
that hand-make an artifact: each takes keyword overrides of its fields."""

from __future__ import annotations

from typing import Any

from kubetrain.core.records import EpochStats, ModelSpec, QuantInfo, TrainSummary


def train_summary(**over: Any) -> TrainSummary:
    values: dict[str, Any] = dict(
        world_size=1, epochs=1, steps=10, samples_seen=640, train_seconds=1.0, wall_seconds=1.2,
        step_seconds=0.1, samples_per_second=640.0, data_wait_share=0.0, compute_share=0.8,
        optimizer_share=0.1, comm_seconds=0.0, allreduce_calls=0, cpu_percent=100.0,
        peak_rss_mib=300.0, rank_peak_rss_mib=[300.0], rank_cpu_percent=[100.0],
        precision="fp32", checkpoints_written=0, checkpoint_seconds=0.0,
        final_val_accuracy=0.5, best_val_accuracy=0.5, final_val_loss=1.0, parameters=100,
        ranks_identical=True,
    )  # fmt: skip
    return TrainSummary(**{**values, **over})


def epoch(**over: Any) -> EpochStats:
    values: dict[str, Any] = dict(
        epoch=1, train_loss=1.0, val_loss=1.0, val_accuracy=0.5, lr=0.01,
        samples_per_second=100.0, data_wait_share=0.1, epoch_seconds=1.0, step_seconds=0.01,
    )  # fmt: skip
    return EpochStats(**{**values, **over})


def model_spec(**over: Any) -> ModelSpec:
    values: dict[str, Any] = dict(
        config={}, input_shape=[1], num_classes=2, dataset_version="v1", data_config={},
        train={},
    )  # fmt: skip
    return ModelSpec(**{**values, **over})


def quant_info(**over: Any) -> QuantInfo:
    values: dict[str, Any] = dict(
        name="dynamic_int8/torchao", method="dynamic_int8", backend="torchao", runtime="eager",
        decision="kept it",
    )  # fmt: skip
    return QuantInfo(**{**values, **over})
