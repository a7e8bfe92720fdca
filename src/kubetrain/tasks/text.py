"""Text through the steps: ``text_classification`` (text -> one of the classes) and ``seq2seq``
(text -> text: translation, summarization), as token shards streamed from disk or object storage.

- preprocess (:func:`build`): :func:`kubetrain.data.text.build_text_dataset` writes the tokenizer,
  the token shards and ``text.json``; ``meta.json`` goes last (the artifact is complete with it).
- training: the training split streams in *windows* (``WINDOW_BATCHES`` batches' worth of
  samples, shuffled by the stream) that :class:`kubetrain.data.batching.BucketingCollate` sorts by
  length and cuts into padded batches of ``train.batch_size`` samples or ``train.batch_tokens``
  tokens, then shuffles (so a batch pads to a similar length, not to the longest of a random
  mix); :class:`kubetrain.tasks.stream.StreamBatches` gives every rank the same number of
  steps (from the sizes, or agreed with one all-reduce per epoch under a token budget). The share
  of token slots that were padding is counted and reported in the training summary
  (``padding_share``).
- inputs: a classifier gets ``(input_ids,)`` and returns logits ``[B,C]``; a seq2seq model gets
  ``(src, tgt_in)`` (the target without its last token) and returns ``[B,T,V]`` against
  ``tgt_out`` (the target without its first token), padding ignored, label-smoothed by
  ``train.label_smoothing``.
- validation: mean loss (plain cross-entropy, no smoothing) and accuracy of the val split, each
  rank scoring its block and the sums all-reduced; for seq2seq the accuracy is *token accuracy*
  (teacher-forced next-token predictions over non-padding target tokens).
- ``examples``: token ids padded to ``max_length`` (the latency batches are full-length): a
  classifier's ``input_ids [n, max_length]`` and class ids; a seq2seq model's sources ``[n,
  max_length]`` and whole targets ``<s> ... </s>`` ``[n, max_length]`` (the model takes
  ``(src, target[:, :-1])``).
- ``score``: classification accuracy, macro-F1, per-class accuracy, confusion matrix and
  misclassified examples; seq2seq BLEU and ROUGE-L (0..1) of greedy or beam-search decoding
  (``evaluate.beam_size``, ``length_penalty``, ``max_decode_length``) beside the same scores of
  copying the source, and example predictions. Texts are decoded from the stored token ids (the
  tokenizer's normalisation applied, truncation included), for references and sources alike.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from kubetrain.core.artifacts import DatasetArtifact
from kubetrain.core.records import (
    DatasetPart,
    NetworkSpec,
    PreprocessPlan,
    SlotResult,
    TextDatasetMeta,
)
from kubetrain.data.batching import BucketingCollate, PaddingMeter
from kubetrain.data.streaming import StreamingDataset
from kubetrain.tasks.base import Batch, BatchPlan, Scores, Task
from kubetrain.tasks.config import ScoringConfig
from kubetrain.tasks.stream import StreamBatches, Windows

if TYPE_CHECKING:
    from kubetrain.core.distributed import DistContext
    from kubetrain.data.config import DataConfig
    from kubetrain.data.text import TextMeta
    from kubetrain.models.config import ModelConfig
    from kubetrain.tasks.config import TaskConfig

log = logging.getLogger(__name__)
# rouge-score logs "Using default tokenizer." at INFO for every scorer it makes.
logging.getLogger("absl").setLevel(logging.WARNING)

WINDOW_BATCHES = 32  # batches' worth of samples sorted by length at once
EVAL_BATCH = 128  # samples per batch when scoring (no gradients: larger is faster)
MAX_EXAMPLES = 32


def build(cfg: DataConfig, out_dir: Path) -> TextDatasetMeta:
    """Preprocess a text source into ``out_dir`` (tokenizer, token shards, ``text.json``) and
    write ``meta.json`` last; returns the meta.

    Raises:
        ConfigError, DataError: see :func:`kubetrain.data.text.build_text_dataset`.
    """
    from kubetrain.data.text import build_text_dataset

    started = time.perf_counter()
    text = build_text_dataset(cfg, out_dir)
    return _write_meta(cfg, text, Path(out_dir), None, time.perf_counter() - started)


def _write_meta(
    cfg: DataConfig, text: TextMeta, out: Path, root: str | None, seconds: float, tasks: int = 1
) -> TextDatasetMeta:
    """``meta.json`` of the text dataset at ``root`` (or in ``out``), written last into ``out``:
    its version is the digest of the shards' manifest and of the tokenizer that made them."""
    import hashlib

    import fsspec

    from kubetrain.data.shards import read_manifest
    from kubetrain.data.text import count_notes
    from kubetrain.data.tokenize import TOKENIZER_FILE

    where = root or str(out)
    manifest = read_manifest(where, cfg.storage_options)
    digest = hashlib.sha256(manifest.version.encode())
    with fsspec.open(f"{where.rstrip('/')}/{TOKENIZER_FILE}", "rb", **cfg.storage_options) as f:
        digest.update(f.read())
    meta = TextDatasetMeta(
        kind=cfg.task,
        version=digest.hexdigest()[:16],
        source=cfg.source,
        classes=text.classes,
        input_shape=[text.max_length],
        sizes=dict(text.samples),
        tokens=dict(text.tokens),
        vocab_size=text.vocab_size,
        special_ids=text.special_ids,
        max_length=text.max_length,
        rows=text.rows,
        skipped_empty=text.skipped_empty,
        truncated=text.truncated,
        notes=count_notes(cfg.source, text),
        tokenize_seconds=text.tokenize_seconds,
        tokenize_processes=text.tokenize_processes,
        class_counts=manifest.class_counts.get("train") if text.classes else None,
        config=cfg.model_dump(mode="json"),
        preprocess_seconds=round(seconds, 3),
        preprocess_tasks=tasks,
        root=root,
    )
    DatasetArtifact.write_meta(out, meta)  # last: marks the artifact complete
    return meta


# -- preprocess fanned out over tasks: plan, convert, merge (kubetrain.data.fanout) --------------
def plan(cfg: DataConfig, plan_dir: Path, num_tasks: int) -> PreprocessPlan:
    """The plan task: read every row, train (or load) the tokenizer, fix the shards; the
    tokenizer and counts go to ``plan_dir`` (the caller writes the record).

    Raises:
        ConfigError, DataError: see :func:`kubetrain.data.text.plan_text`.
    """
    from kubetrain.data.text import plan_text

    planned = plan_text(cfg, num_tasks)
    planned.save(plan_dir)
    return planned.record


def convert(
    cfg: DataConfig, plan_dir: Path, planned: PreprocessPlan, task: int, root: str
) -> DatasetPart:
    """A convert task: tokenize its range of shards into ``root``.

    Raises:
        DataError: the source no longer matches the plan, or cannot be read.
    """
    from kubetrain.data.fanout import convert_part
    from kubetrain.data.text import TextPlan, convert_text

    def run(slots: list[int]) -> list[SlotResult]:
        return convert_text(cfg, TextPlan.load(plan_dir, planned), slots, root)

    return convert_part(planned, task, max(1, cfg.num_workers), run)


def merge(
    cfg: DataConfig,
    plan_dir: Path,
    planned: PreprocessPlan,
    results: list[SlotResult],
    parts: list[DatasetPart],
    root: str,
    out: Path,
) -> TextDatasetMeta:
    """The merge task: the manifest, the tokenizer and ``text.json`` at ``root`` (every range
    checked complete by the caller; counts summed from the parts), then ``meta.json`` in ``out``.

    Args:
        results: every slot's result, in slot order.
        parts: the convert tasks' parts (their time and processes are recorded).
        root: where the shards are (``out`` itself, or the shard store).
        out: the dataset artifact's directory.
    """
    from kubetrain.data.text import TextPlan, _warn_counts, merge_text

    started = time.perf_counter()
    text_plan = TextPlan.load(plan_dir, planned)
    working = [p for p in parts if p.slots]
    convert_seconds = sum(p.seconds for p in working)
    processes = sum(p.processes for p in working) or 1
    text = merge_text(cfg, text_plan, results, root, convert_seconds, processes)
    _warn_counts(cfg.source, text)
    stored = None if root == str(out) else root
    seconds = planned.seconds + convert_seconds + time.perf_counter() - started
    return _write_meta(cfg, text, out, stored, seconds, tasks=planned.num_tasks)


def _agree_min(count: int, ctx: DistContext) -> int:
    """The smallest ``count`` over ranks (a collective)."""
    if not ctx.distributed:
        return count
    import torch.distributed as dist

    t = torch.tensor([count], dtype=torch.long, device=ctx.device)
    dist.all_reduce(t, op=dist.ReduceOp.MIN)
    return int(t.item())


class TextTask(Task):
    """What both text tasks share: the tokenizer, the streams, the model build."""

    def __init__(self, cfg: TaskConfig, data: DatasetArtifact) -> None:
        super().__init__(cfg, data)
        self.meta = data.meta_of(TextDatasetMeta)
        self.pad_id = self.meta.special_ids["pad"]
        self.max_length = self.meta.max_length
        self.padding = PaddingMeter(self.pad_id)
        self._tokenizer = None

    # -- the model -----------------------------------------------------------------------------
    def model_spec(self, model: ModelConfig) -> NetworkSpec:
        from kubetrain.models.text import text_spec

        return NetworkSpec(
            config=model.model_dump(mode="json"),
            input_shape=list(self.data.input_shape),
            num_classes=len(self.data.classes) if self.meta.classes else None,
            text=text_spec(self.meta),
            # Decoding settings travel with the model: quantize and evaluate rebuild the
            # task from the model artifact (kubetrain.tasks.task_for_model).
            evaluate=self.scoring.model_dump(mode="json", include=set(ScoringConfig.model_fields)),
        )

    def build_model(self, model: ModelConfig) -> nn.Module:
        from kubetrain.models.text import build_text_network, text_spec

        return build_text_network(model, text_spec(self.meta))

    # -- streams -------------------------------------------------------------------------------
    def stream(self, split: str, batch: int, *, rank: int = 0, world_size: int = 1,
               shuffle: bool = False, seed: int = 0, workers: int = 0,
               batch_tokens: int | None = None, window: int | None = None) -> StreamingDataset:  # fmt: skip
        """``split`` as windows of length-bucketed, padded batches (lists of dicts)."""
        collate = BucketingCollate(
            self.pad_id, batch_size=None if batch_tokens else batch, batch_tokens=batch_tokens,
            seed=seed,
        )  # fmt: skip
        return StreamingDataset(
            self.data.root, split, window or batch * WINDOW_BATCHES, rank=rank,
            world_size=world_size, num_workers=workers, seed=seed, shuffle=shuffle,
            collate=collate, storage_options=self.cfg.data.storage_options,
        )  # fmt: skip

    def batches(self, split: str, batch: int = EVAL_BATCH, rank: int = 0, world_size: int = 1):
        """Every padded batch of this rank's block of ``split``, in a fixed order."""
        for window in self.stream(split, batch, rank=rank, world_size=world_size):
            yield from window

    def records(self, split: str) -> Iterator[dict[str, Any]]:
        """Every record of ``split`` in stream order (token arrays, labels, rows), streamed."""
        ds = StreamingDataset(
            self.data.root, split, 4096, rank=0, world_size=1, shuffle=False,
            collate=list, storage_options=self.cfg.data.storage_options,
        )  # fmt: skip
        for chunk in ds:
            yield from chunk

    @property
    def tokenizer(self):
        if self._tokenizer is None:
            import fsspec

            from kubetrain.data import tokenize

            path = f"{self.data.root.rstrip('/')}/{tokenize.TOKENIZER_FILE}"
            with fsspec.open(path, "r", **self.cfg.data.storage_options) as f:
                self._tokenizer = tokenize._tokenizers().Tokenizer.from_str(f.read())
        return self._tokenizer

    def decode(self, ids) -> str:
        """Text of token ids, special tokens (and padding) dropped."""
        return self.tokenizer.decode([int(i) for i in ids], skip_special_tokens=True)

    # -- training ------------------------------------------------------------------------------
    def train_batches(self, tc: BatchPlan, ctx: DistContext) -> StreamBatches:
        micro = tc.batch_size // (ctx.world_size * tc.grad_accum_steps)
        tokens = tc.tokens_per_micro_batch()
        window = None
        if tokens is not None:
            # A window of about WINDOW_BATCHES budgets of average-length sequences.
            per_sample = max(
                1.0, self.meta.tokens["train"] / max(1, self.meta.num_samples("train"))
            )
            window = max(64, int(WINDOW_BATCHES * tokens / per_sample))
            micro = max(1, int(tokens / per_sample))
        ds = self.stream(
            "train", micro, rank=ctx.rank, world_size=ctx.world_size, shuffle=True,
            seed=tc.seed, workers=self.cfg.data.num_workers, batch_tokens=tokens, window=window,
        )  # fmt: skip
        if tokens is None:
            windows = Windows(per_samples=lambda n: -(-n // micro))
        else:
            collate = cast(BucketingCollate, ds.collate)
            windows = Windows(count=collate.count, agree=lambda n: _agree_min(n, ctx))
        return StreamBatches(
            ds, tc.grad_accum_steps, self.cfg.data.num_workers, self.cfg.data.prefetch,
            unpack=self._unpack, windows=windows, micro=micro,
        )  # fmt: skip

    def _unpack(self, batch: dict[str, torch.Tensor]) -> Batch:
        self.padding.add(batch)
        return self.as_batch(batch)

    def as_batch(self, batch: dict[str, torch.Tensor]) -> Batch:
        """A padded batch dict as ``(inputs, target)``."""
        raise NotImplementedError

    def train_summary(self, ctx: DistContext) -> dict[str, Any]:
        """The padding share of every training batch produced, over all ranks (a collective)."""
        from kubetrain.core.distributed import all_reduce_sum

        padding, total = all_reduce_sum([self.padding.padding, self.padding.total], ctx)
        return {
            "padding_share": padding / total if total else 0.0,
            "tokens_seen": int(total - padding),
        }

    def validate(self, model: nn.Module, ctx: DistContext) -> tuple[float, float]:
        """(mean loss, accuracy) of the val split; each rank scores its block, sums all-reduced."""
        from kubetrain.core.distributed import all_reduce_sum

        model.eval()
        loss_sum = correct = count = 0.0
        with torch.inference_mode():
            for batch in self.batches("val", rank=ctx.rank, world_size=ctx.world_size):
                inputs, target = self.to_device(self.as_batch(batch), ctx.device)
                out = model(*inputs).float()
                keep = target != self.ignore_index
                loss_sum += F.cross_entropy(
                    out.reshape(-1, out.shape[-1]), target.reshape(-1),
                    ignore_index=self.ignore_index, reduction="sum",
                ).item()  # fmt: skip
                correct += ((out.argmax(-1) == target) & keep).sum().item()
                count += keep.sum().item()
        model.train()
        loss_sum, correct, count = all_reduce_sum([loss_sum, correct, count], ctx)
        return loss_sum / max(count, 1), correct / max(count, 1)

    ignore_index = -100

    def loss(
        self, output: torch.Tensor, target: torch.Tensor, label_smoothing: float = 0.0
    ) -> torch.Tensor:
        """Mean label-smoothed (``train.label_smoothing``) cross-entropy, padding ignored."""
        from kubetrain.models.losses import label_smoothed_loss

        return label_smoothed_loss(output, target, label_smoothing, ignore_index=self.ignore_index)

    def _sample(self, split: str, n: int, seed: int) -> list[dict[str, Any]]:
        """``n`` records of ``split`` drawn at random (seeded), in stream order; only those are
        kept while the split streams by (it may be larger than memory)."""
        total = self.meta.num_samples(split)
        if n >= total:
            return list(self.records(split))
        chosen = set(np.random.default_rng(seed).permutation(total)[:n].tolist())
        return [r for i, r in enumerate(self.records(split)) if i in chosen]

    def _full(self, seqs) -> torch.Tensor:
        """Sequences padded to ``max_length`` (one length for every example batch)."""
        out = torch.full((len(seqs), self.max_length), self.pad_id, dtype=torch.long)
        for i, s in enumerate(seqs):
            out[i, : len(s)] = torch.as_tensor(np.asarray(s[: self.max_length], dtype=np.int64))
        return out


class TextClassificationTask(TextTask):
    kind = "text_classification"

    def as_batch(self, batch: dict[str, torch.Tensor]) -> Batch:
        return (batch["input_ids"],), batch["label"].long()

    def examples(self, split: str, n: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
        records = self._sample(split, n, seed)
        labels = torch.as_tensor([int(r["label"]) for r in records], dtype=torch.long)
        return self._full([r["input_ids"] for r in records]), labels

    def score(self, model: nn.Module, split: str) -> Scores:
        from kubetrain.tasks import measure, text_metrics

        truth: list[np.ndarray] = []
        predicted: list[np.ndarray] = []
        wrong: list[tuple[torch.Tensor, int, int]] = []
        started = time.perf_counter()
        with torch.no_grad():  # not inference_mode: compiled int8 models fail under it
            for batch in self.batches(split):
                pred = model(batch["input_ids"]).argmax(-1)
                truth.append(batch["label"].numpy())
                predicted.append(pred.numpy())
                for i in torch.nonzero(pred != batch["label"]).flatten().tolist():
                    if len(wrong) < MAX_EXAMPLES:
                        wrong.append((batch["input_ids"][i], int(batch["label"][i]), int(pred[i])))
        seconds = time.perf_counter() - started
        y, p = np.concatenate(truth).astype(np.int64), np.concatenate(predicted).astype(np.int64)
        classes = self.data.classes
        values = measure.classification(y, p, classes)
        values["macro_f1"] = text_metrics.macro_f1(p.tolist(), y.tolist())
        examples = [
            {"text": self.decode(ids), "true": classes[t], "predicted": classes[q]}
            for ids, t, q in wrong
        ]
        return Scores("accuracy", values, examples, samples=len(y), seconds=seconds)


class Seq2SeqTask(TextTask):
    kind = "seq2seq"
    metric = "token_accuracy"  # what validate() reports during training

    def output_width(self) -> tuple[int, str]:
        """One logit per vocabulary entry at every target position."""
        return self.meta.vocab_size, "tokens in its vocabulary"

    def __init__(self, cfg: TaskConfig, data: DatasetArtifact) -> None:
        super().__init__(cfg, data)
        self.ignore_index = self.pad_id

    @property
    def primary(self) -> str:
        """The evaluation's primary metric: ``evaluate.metric`` when it names a seq2seq metric,
        else BLEU."""
        wanted = self.scoring.metric
        return wanted if wanted in ("bleu", "rouge_l") else "bleu"

    def as_batch(self, batch: dict[str, torch.Tensor]) -> Batch:
        tgt = batch["tgt_ids"]
        return (batch["src_ids"], tgt[:, :-1]), tgt[:, 1:]

    def examples(self, split: str, n: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
        records = self._sample(split, n, seed)
        return self._full([r["src_ids"] for r in records]), self._full(
            [r["tgt_ids"] for r in records]
        )

    def generate(self, model: nn.Module, src: torch.Tensor) -> list[list[int]]:
        """Token ids the model generates for each source (greedy, or beam search)."""
        from kubetrain.models.decoding import beam_search, greedy_decode

        ev = self.scoring
        if ev.beam_size > 1:
            return beam_search(model, src, ev.beam_size, ev.max_decode_length, ev.length_penalty)
        return greedy_decode(model, src, ev.max_decode_length)

    def score(self, model: nn.Module, split: str) -> Scores:
        from kubetrain.tasks import text_metrics

        sources, references, predictions = [], [], []
        started = time.perf_counter()
        batch_size = EVAL_BATCH // max(1, self.scoring.beam_size)
        for batch in self.batches(split, max(8, batch_size)):
            for src, tgt, out in zip(
                batch["src_ids"], batch["tgt_ids"], self.generate(model, batch["src_ids"]),
                strict=True,
            ):  # fmt: skip
                sources.append(self.decode(src))
                references.append(self.decode(tgt))
                predictions.append(self.decode(out))
        seconds = time.perf_counter() - started
        scores = text_metrics.seq2seq_scores(predictions, references)
        copy = text_metrics.copy_source_baseline(sources, references)
        values = {
            "bleu": scores["bleu"] / 100.0,
            "rouge_l": scores["rouge_l"],
            "copy_baseline_bleu": copy["bleu"] / 100.0,
            "copy_baseline_rouge_l": copy["rouge_l"],
        }
        examples = [
            {"source": s, "reference": r, "prediction": p}
            for s, r, p in list(zip(sources, references, predictions, strict=True))[:MAX_EXAMPLES]
        ]
        return Scores(self.primary, values, examples, samples=len(references), seconds=seconds)
