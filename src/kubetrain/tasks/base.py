"""What differs between kinds of data, behind one interface the steps call.

A *task* is one kind of dataset artifact and what the steps do with it: how preprocess
builds it, how its training batches are produced (per rank, resumable), how the model is built
for it and rebuilt later, what the loss is, how a model is scored on a split, and which inputs
quantize calibrates and times with. The trainer, the quantize driver and the evaluation call
these; they never ask which kind of data they have.

Kinds (``DatasetArtifact.kind``): ``tabular`` (features in memory: ``kubetrain.tasks
.tabular``), ``images`` (sharded images streamed from disk or object storage), and the text
tasks ``text_classification`` and ``seq2seq`` (token shards).

A training batch is ``(inputs, target)``: ``inputs`` a tuple of tensors passed to the model as
positional arguments, ``target`` class ids (N,), soft labels (N, C) or token ids (N, T). A
detection batch is ``((images,), targets)``: a list of images and a list of target dicts, which
the detector takes together and turns into its own losses (``forward_loss``).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any, ClassVar, Protocol

import torch
import torch.nn.functional as F
from torch import nn

from kubetrain.core.artifacts import Scores

if TYPE_CHECKING:
    from kubetrain.core.artifacts import DatasetArtifact
    from kubetrain.core.distributed import DistContext
    from kubetrain.core.records import NetworkSpec
    from kubetrain.models.config import ModelConfig
    from kubetrain.tasks.config import ScoringConfig, TaskConfig

Batch = tuple[tuple[Any, ...], Any]


class BatchPlan(Protocol):
    """How a task cuts its training split into batches (the ``train`` section has these)."""

    @property
    def batch_size(self) -> int:
        """The global batch: summed over processes, nodes and accumulation."""

    @property
    def grad_accum_steps(self) -> int:
        """Micro-batches per optimizer step."""

    @property
    def seed(self) -> int:
        """Seed of the shuffle (and of everything else random)."""

    def tokens_per_micro_batch(self) -> int | None:
        """Text: a micro-batch's token budget per process, if batches are sized by tokens."""


class TrainBatches(ABC):
    """One rank's training micro-batches, epoch by epoch.

    ``steps`` is the number of optimizer steps per epoch, the same on every rank (a rank that
    would have one batch more drops it: DDP needs every rank in every all-reduce).
    """

    steps: int
    micro: int  # nominal samples per micro-batch (logs, throughput)

    @abstractmethod
    def set_epoch(self, epoch: int, start_step: int = 0) -> None:
        """Produce ``epoch``'s batches from optimizer step ``start_step`` on (a resume)."""

    @abstractmethod
    def __iter__(self) -> Iterator[Batch]:
        """The rest of the epoch: ``(steps - start_step) * grad_accum_steps`` micro-batches."""


class Task(ABC):
    """One kind of data through the steps. Built with ``open_task(cfg, data)``."""

    kind: ClassVar[str]
    # The primary metric of this kind, and whether higher is better (for the search).
    metric: ClassVar[str] = "accuracy"

    def __init__(self, cfg: TaskConfig, data: DatasetArtifact) -> None:
        """Args:
        cfg: the data and model sections and how to score (a training run's or the
            pipeline's config: they extend ``TaskConfig``).
        data: the dataset artifact.
        """
        self.cfg, self.data = cfg, data
        self.scoring: ScoringConfig = cfg.evaluate

    def measure_as(self, scoring: ScoringConfig) -> Task:
        """Score with ``scoring`` (metric, beam size, decode length) from now on, not with the
        settings the model was trained with; returns this task."""
        self.scoring = scoring
        return self

    # -- the model -----------------------------------------------------------------------------
    def model_spec(self, model: ModelConfig) -> NetworkSpec:
        """What ``kubetrain.models.networks.build_from_spec`` needs to rebuild the network in
        another process (quantize, evaluate, a serving pod)."""
        from kubetrain.models.networks import model_spec

        return model_spec(model, self.data.input_shape, self.data.num_classes)

    def build_model(self, model: ModelConfig) -> nn.Module:
        from kubetrain.models.networks import build_model

        return build_model(model, self.data.input_shape, self.data.num_classes)

    def prepare_model(self, model: nn.Module, device: torch.device) -> nn.Module:
        """The model on ``device``, in the layout its batches come in (e.g. channels_last)."""
        return model.to(device)

    def output_width(self) -> tuple[int, str]:
        """How many values the model must give per sample (per position, for sequences), and
        what they are, for messages: one per class here."""
        return self.data.num_classes, "classes"

    def check_model(self, model: ModelConfig) -> None:
        """Build the model once on the CPU and run it on two training examples: what cannot
        be built (a wrong name, factory, weights, ``hf:`` path) or does not fit the task (an
        output width other than ``output_width``) stops here, before any worker starts, in
        one line naming ``model.name`` (it would train, and a wider head be promoted, or fail
        in every worker with torch's own words).

        Raises:
            ConfigError: naming ``model.name``.
        """
        from kubetrain.core.errors import ConfigError, KubetrainError
        from kubetrain.tasks.measure import latency_inputs

        net = self.build_model(model).eval()
        x, y = self.examples("train", 2)
        try:
            with torch.no_grad():
                out = net(*latency_inputs(x, y, self.kind))
        except KubetrainError:
            raise
        except Exception as err:
            first = str(err).splitlines()[0] if str(err) else type(err).__name__
            raise ConfigError(
                f"config error: model.name: {model.name} fails on this data's inputs "
                f"({type(err).__name__}: {first})"
            ) from None
        if not isinstance(out, torch.Tensor):
            return  # not one tensor: the task's own loss says what it lacks
        width, what = self.output_width()
        if out.shape[-1] != width:
            raise ConfigError(
                f"config error: model.name: {model.name} gives {out.shape[-1]} outputs per "
                f"sample but the data has {width} {what}: its head must give {width} (a "
                "factory gets the number as num_classes)"
            )

    # -- training ----------------------------------------------------------------------------
    @abstractmethod
    def train_batches(self, tc: BatchPlan, ctx: DistContext) -> TrainBatches:
        """This rank's training batches (``tc.batch_size`` is the global batch)."""

    def to_device(self, batch: Batch, device: torch.device) -> Batch:
        """A batch on the training device (non-blocking: batches come pinned on a GPU)."""
        if device.type == "cpu":
            return batch
        inputs, target = batch
        return (
            tuple(t.to(device, non_blocking=True) for t in inputs),
            target.to(device, non_blocking=True),
        )

    def loss(
        self, output: torch.Tensor, target: torch.Tensor, label_smoothing: float = 0.0
    ) -> torch.Tensor:
        """Mean loss of a micro-batch: cross-entropy over classes (soft targets allowed), with
        ``label_smoothing`` (``train.label_smoothing``)."""
        return F.cross_entropy(output, target, label_smoothing=label_smoothing)

    def forward_loss(
        self, net: nn.Module, inputs: tuple[Any, ...], target: Any, label_smoothing: float = 0.0
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor] | None]:
        """Forward one micro-batch through ``net``: its mean loss, and the loss's named parts
        (detached; None when the loss is one term), which the trainer logs per epoch.

        The default is ``loss(net(*inputs), target)``; a detector takes the targets itself and
        returns its losses (``kubetrain.tasks.detection``).
        """
        return self.loss(net(*inputs).float(), target, label_smoothing), None

    @staticmethod
    def batch_samples(batch: Batch) -> int:
        return len(batch[1])

    def train_summary(self, ctx: DistContext) -> dict[str, Any]:
        """What this kind adds to the training summary (e.g. the padding share of text
        batches), agreed over ranks: a collective, called on every rank at the end."""
        return {}

    @abstractmethod
    def validate(self, model: nn.Module, ctx: DistContext) -> tuple[float, float]:
        """(mean loss, primary metric) on the validation split, agreed over ranks (a
        collective where the split is streamed in parts), in eval mode."""

    # -- quantize and evaluate ---------------------------------------------------------------
    @abstractmethod
    def examples(self, split: str, n: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
        """Up to ``n`` model inputs of ``split`` as one tensor, and their class ids, drawn at
        random (seeded) and prepared as for evaluation: calibration, QAT, export examples and
        latency batches."""

    @abstractmethod
    def score(self, model: nn.Module, split: str) -> Scores:
        """``model`` (fp32 or int8, in eval mode) on the whole of ``split``."""
