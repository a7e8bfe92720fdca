"""The ``train`` config section: optimisation and distribution of the training step
(``kubetrain.train``)."""

from __future__ import annotations

from typing import ClassVar, Literal

from pydantic import Field, model_validator

from kubetrain.core.config import Section
from kubetrain.tasks.config import TaskConfig


class TrainConfig(Section):
    """Optimisation and distribution of the training step."""

    epochs: int = Field(20, ge=1, description="Passes over the training split.")
    batch_size: int = Field(
        64, ge=1, description="Global batch: summed over processes, nodes and accumulation."
    )
    batch_tokens: int | None = Field(
        None,
        ge=1,
        description="Text tasks: a global budget of tokens per step (padding included, summed "
        "over processes and accumulation) instead of batch_size samples; length-bucketed "
        "batches are cut to fit it. A sequence longer than a process's share is a batch alone.",
    )
    lr: float = Field(3e-3, gt=0, description="Peak learning rate.")
    optimizer: Literal["adam", "adamw", "rmsprop", "sgd"] = Field(
        "adamw", description="Optimizer (fused kernels where PyTorch has them; sgd: Nesterov)."
    )
    weight_decay: float = Field(1e-4, ge=0, description="L2 penalty (decoupled for adamw).")
    momentum: float = Field(0.9, ge=0, lt=1, description="Momentum of sgd and rmsprop.")
    lr_schedule: Literal["cosine", "step", "constant", "inverse_sqrt"] = Field(
        "cosine",
        description="Learning-rate schedule per optimizer step, after the warm-up: cosine to 0 "
        "at the end, step decay, constant, or inverse_sqrt (lr * sqrt(warm-up steps / step), "
        "the Transformer schedule).",
    )
    warmup_epochs: int = Field(0, ge=0, description="Linear warm-up before the schedule.")
    warmup_steps: int = Field(
        0,
        ge=0,
        description="Linear warm-up in optimizer steps (instead of warmup_epochs; the two "
        "cannot both be set).",
    )
    label_smoothing: float = Field(
        0.0,
        ge=0,
        lt=1,
        description="Text tasks: share of each target's probability spread over the whole "
        "vocabulary or class set (0 = plain cross-entropy).",
    )
    step_size: int = Field(10, ge=1, description="Epochs between decays of the step schedule.")
    gamma: float = Field(0.1, gt=0, le=1, description="Decay factor of the step schedule.")
    grad_accum_steps: int = Field(1, ge=1, description="Micro-batches accumulated per step.")
    max_grad_norm: float | None = Field(None, gt=0, description="Clip gradients to this norm.")
    nproc: int = Field(2, ge=1, le=64, description="Worker processes per node (torchrun).")
    nnodes: int = Field(1, ge=1, le=64, description="Nodes (PyTorchJob replicas; local: agents).")
    num_threads: int = Field(
        0, ge=0, description="torch threads per process; 0 = (CPU cores - 1) / processes, ≥ 1."
    )
    seed: int = Field(0, description="Seed of initialisation, shuffling and augmentation.")
    precision: Literal["fp32", "bf16", "fp16", "auto"] = Field(
        "fp32",
        description="Autocast precision: bf16 (CPU/GPU), fp16 (GPU, with a gradient scaler); "
        "auto = bf16 where the device computes it natively, else fp32.",
    )
    strategy: Literal["ddp", "fsdp"] = Field(
        "ddp",
        description="How several processes train one model: ddp (every rank holds the whole "
        "model, gradients all-reduced) or fsdp (FSDP2: parameters, gradients and optimizer "
        "state sharded over the ranks, each Transformer layer gathered only while it computes; "
        "checkpoints with torch.distributed.checkpoint, resumable on another number of "
        "processes). Checkpoints resume only under the strategy that wrote them.",
    )
    compile: bool = Field(False, description="torch.compile the model (compile time reported).")
    no_sync: bool = Field(
        True, description="Skip the all-reduce on accumulation micro-steps (off only to measure)."
    )
    grad_compression: Literal["none", "bf16", "fp16"] = Field(
        "none", description="Compress gradients for the DDP all-reduce (a DDP comm hook)."
    )
    checkpoint_every_steps: int = Field(
        200, ge=0, description="Optimizer steps between checkpoints (0: only at the end)."
    )
    checkpoint_dir: str | None = Field(
        None, description="Where checkpoints go (default: <model output>/checkpoints)."
    )
    keep_checkpoints: int = Field(2, ge=1, description="Newest checkpoints kept on disk.")
    resume: bool = Field(
        True, description="Continue from the newest good checkpoint of the same job, if any."
    )
    max_restarts: int = Field(
        0, ge=0, le=100, description="Restarts of the worker group after a failure (torchrun)."
    )
    collective_timeout_seconds: float = Field(
        120.0,
        gt=0,
        description="How long a CPU (gloo) process group waits for the other ranks, at set-up "
        "and in each collective, before it fails: a hang becomes a failure that max_restarts "
        "can retry.",
    )

    # Fields that change how a job runs, not what it computes: a checkpoint stays valid and a
    # promoted model stays current across them (batches are global, so nproc/nnodes too).
    RUN_ONLY_FIELDS: ClassVar[frozenset[str]] = frozenset(
        {
            "nproc", "nnodes", "num_threads", "checkpoint_every_steps", "checkpoint_dir",
            "keep_checkpoints", "resume", "max_restarts", "compile", "no_sync",
            "collective_timeout_seconds", "strategy",
        }
    )  # fmt: skip

    @property
    def world_size(self) -> int:
        """Processes in the job: ``nproc`` per node times ``nnodes``."""
        return self.nproc * self.nnodes

    @model_validator(mode="after")
    def _batch_divides(self) -> TrainConfig:
        parts = self.world_size * self.grad_accum_steps
        if self.batch_size % parts:
            raise ValueError(
                f"batch_size {self.batch_size} must be divisible by nnodes*nproc*grad_accum_steps "
                f"= {parts}"
            )
        return self

    @model_validator(mode="after")
    def _one_warmup(self) -> TrainConfig:
        if self.warmup_steps and self.warmup_epochs:
            raise ValueError("give warmup_steps or warmup_epochs, not both")
        return self

    @model_validator(mode="after")
    def _fsdp_precision(self) -> TrainConfig:
        # fp16 needs a gradient scaler that agrees over ranks on overflow; under FSDP each rank
        # sees only its shard of the gradients (bf16 needs no scaler).
        if self.strategy == "fsdp" and self.precision == "fp16":
            raise ValueError("strategy fsdp does not support precision fp16: use bf16")
        return self

    @model_validator(mode="after")
    def _tokens_divide(self) -> TrainConfig:
        parts = self.world_size * self.grad_accum_steps
        if self.batch_tokens is not None and self.batch_tokens < parts:
            raise ValueError(
                f"batch_tokens {self.batch_tokens} is less than one token per micro-batch: "
                f"nnodes*nproc*grad_accum_steps = {parts}"
            )
        return self

    def tokens_per_micro_batch(self) -> int | None:
        """One process's share of ``batch_tokens`` per micro-batch (None without a budget)."""
        if self.batch_tokens is None:
            return None
        return self.batch_tokens // (self.world_size * self.grad_accum_steps)


class TrainingConfig(TaskConfig):
    """What one training run reads: the task's sections and the ``train`` section. It is what a
    job's pods and torchrun workers receive (``KUBETRAIN_CONFIG``); the pipeline's config
    extends it."""

    train: TrainConfig = Field(default_factory=TrainConfig, description=TrainConfig.__doc__)
