"""Language-model training efficiency, measured side by side in one run (the machine is shared).

Three parts, each written to benchmarks/results/text_train.{json,md} (RESULTS.md: ``collect.py``):

1. **throughput**: training tokens/s (source + target tokens) of the built-in encoder-decoder
   (``kubetrain.models.transformer.Seq2SeqTransformer``) through kubetrain's training step
   (``Trainer`` + ``train.step.train_step``) vs a hand-written loop vs Hugging Face ``Trainer``
   -- the same model object class (our model wrapped in an ``nn.Module`` that returns
   ``{"loss": ...}``, so only the loops differ), the same optimizer (fused AdamW, cosine
   schedule, no clipping), the same batches collated from per-sample tensors, one thread.
   Interleaved (kubetrain, hand, HF, kubetrain, ...) and repeated: medians with min-max.
2. **fsdp**: 2 torchrun processes (gloo) with ``train.strategy`` ddp vs fsdp: parameter,
   gradient and optimizer-state bytes held per rank, and step time.
3. **mfu**: a compute-bound size of the same model through kubetrain's step: FLOPs per step
   (``torch.utils.flop_counter``) per second against the dense-GEMM peak measured just before
   each round in the same process and thread count (``train.instrument.peak_flops``).

The batches are random token ids of fixed lengths (no padding): a speed measurement, not a
model of any language. Run: ``.venv/bin/python benchmarks/text_train.py [--rounds 3]
[--only throughput,fsdp,mfu]`` (about 3 minutes on 2 cores).
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from common import cpu_model, stats
from torch import nn

from kubetrain.core.artifacts import DatasetArtifact
from kubetrain.core.distributed import DistContext
from kubetrain.models.transformer import Seq2SeqTransformer, TransformerConfig
from kubetrain.pipeline.config import load_config
from kubetrain.tasks import KINDS
from kubetrain.tasks.base import Task, TrainBatches

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"
PAD, BOS, EOS = 0, 1, 2

# name -> model sizes and batch shape. "step": the throughput/FSDP model; "compute": the MFU one.
SHAPES: dict[str, dict[str, int]] = {
    "step": {"d_model": 128, "heads": 4, "layers": 2, "ff": 512, "vocab": 4000,
             "batch": 16, "src": 32, "tgt": 32},
    "compute": {"d_model": 512, "heads": 8, "layers": 2, "ff": 2048, "vocab": 8000,
                "batch": 8, "src": 64, "tgt": 64},
}  # fmt: skip
LR, WEIGHT_DECAY = 1e-3, 1e-4


def build_model(shape: dict[str, int], dropout: float = 0.1) -> Seq2SeqTransformer:
    sizes = TransformerConfig(
        d_model=shape["d_model"], heads=shape["heads"], layers=shape["layers"], ff=shape["ff"],
        dropout=dropout, max_len=max(shape["src"], shape["tgt"]),
    )  # fmt: skip
    return Seq2SeqTransformer(shape["vocab"], sizes, PAD, BOS, EOS)


def samples(shape: dict[str, int], n: int, seed: int = 0) -> list[tuple[torch.Tensor, ...]]:
    """``n`` (src, tgt_in, tgt_out) samples of random non-special token ids."""
    g = torch.Generator().manual_seed(seed)
    src = torch.randint(3, shape["vocab"], (n, shape["src"]), generator=g)
    tgt = torch.randint(3, shape["vocab"], (n, shape["tgt"] + 1), generator=g)
    return [(src[i], tgt[i, :-1], tgt[i, 1:]) for i in range(n)]


def collate(rows) -> tuple[torch.Tensor, ...]:
    return tuple(torch.stack(col) for col in zip(*rows, strict=True))


def seq2seq_loss(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits.flatten(0, 1), target.flatten(), ignore_index=PAD)


def tokens_per_step(shape: dict[str, int]) -> int:
    return shape["batch"] * (shape["src"] + shape["tgt"])


# -- kubetrain's step, through a task of these token batches -------------------------------
class TokenBatches(TrainBatches):
    """This rank's share of each global batch, collated from per-sample tensors as a loader
    would; the same samples every epoch (a speed measurement)."""

    def __init__(self, rows, micro: int, steps: int, rank: int, world: int) -> None:
        self.rows, self.micro, self.steps = rows, micro, steps
        self.rank, self.world = rank, world

    def set_epoch(self, epoch: int, start_step: int = 0) -> None:
        self.start = start_step

    def __iter__(self):
        for step in range(self.start, self.steps):
            first = (step * self.world + self.rank) * self.micro % len(self.rows)
            src, tgt_in, tgt_out = collate(self.rows[first : first + self.micro])
            yield (src, tgt_in), tgt_out


class TokenTask(Task):
    """A seq2seq task over random token batches (the text task's interface, minus
    evaluation): what ``Trainer`` needs to run its step here."""

    kind = "bench_tokens"

    def build_model(self, model):
        return build_model(self.data.meta["shape"])

    def train_batches(self, tc, ctx):
        shape = self.data.meta["shape"]
        micro = tc.batch_size // ctx.world_size
        rows = samples(shape, max(4 * tc.batch_size, 64))
        return TokenBatches(rows, micro, self.data.meta["steps"], ctx.rank, ctx.world_size)

    def loss(self, output, target):
        return seq2seq_loss(output, target)

    @staticmethod
    def batch_samples(batch) -> int:
        (src, tgt_in), _ = batch
        return src.numel() + tgt_in.numel()  # tokens: flops_per_sample is then per token

    def validate(self, model, ctx):
        return float("nan"), float("nan")

    def examples(self, split, n, seed=0):
        raise NotImplementedError

    def score(self, model, split):
        raise NotImplementedError


def kubetrain_trainer(
    shape_name: str, steps: int, ctx: DistContext, strategy: str = "ddp", *overrides: str
):
    """kubetrain's ``Trainer`` for ``SHAPES[shape_name]`` over ``steps`` token batches, with
    ``train.strategy`` and any further ``--set`` style ``overrides`` (precision, compile)."""
    from kubetrain.train.trainer import Trainer

    KINDS[TokenTask.kind] = f"{__name__}:TokenTask"
    shape = SHAPES[shape_name]
    cfg = load_config(
        overrides=[
            f"train.nproc={ctx.world_size}", f"train.batch_size={shape['batch']}",
            f"train.lr={LR}", f"train.weight_decay={WEIGHT_DECAY}", "train.epochs=1",
            f"train.strategy={strategy}", "tune.enabled=false", *overrides,
        ]
    )  # fmt: skip
    meta = {"kind": TokenTask.kind, "version": "bench", "shape": shape, "steps": steps,
            "sizes": {"train": steps * shape["batch"]}}  # fmt: skip
    return Trainer(cfg, DatasetArtifact(path=Path("."), meta=meta, arrays={}), ctx)


def run_kubetrain(trainer, steps: int, meter_out: list | None = None) -> list[float]:
    """Wall seconds of each of ``steps`` optimizer steps (the batch's production included);
    the step's own meter (forward/backward and optimizer seconds) goes to ``meter_out``."""
    from kubetrain.train.metrics import EpochMeter
    from kubetrain.train.step import batch_generator, train_step

    trainer.batches.set_epoch(0, 0)
    meter = EpochMeter(trainer)
    batches = batch_generator(trainer, meter)
    trainer.net.train()
    times = []
    for _ in range(steps):
        started = time.perf_counter()
        train_step(trainer, batches, meter)
        times.append(time.perf_counter() - started)
    if meter_out is not None:
        meter_out.append(meter)
    return times


# -- a hand-written loop -----------------------------------------------------------------------
class HandLoop:
    """What a user writes: model, optimizer, schedule, batches, forward/backward/step."""

    def __init__(self, shape: dict[str, int], steps: int) -> None:
        from kubetrain.train.optim import build_optimizer, build_scheduler

        tc = load_config(overrides=[f"train.lr={LR}", f"train.weight_decay={WEIGHT_DECAY}",
                                    "train.epochs=1"]).train  # fmt: skip
        torch.manual_seed(0)
        self.shape = shape
        self.model = build_model(shape)
        self.optimizer = build_optimizer(self.model.parameters(), tc)  # the same fused AdamW
        self.scheduler = build_scheduler(self.optimizer, tc, steps)
        self.rows = samples(shape, max(4 * shape["batch"], 64))
        self.model.train()
        self.done = 0

    def step(self) -> None:
        first = self.done * self.shape["batch"] % len(self.rows)
        src, tgt_in, tgt_out = collate(self.rows[first : first + self.shape["batch"]])
        loss = seq2seq_loss(self.model(src, tgt_in), tgt_out)
        loss.backward()
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.done += 1


# -- Hugging Face Trainer ----------------------------------------------------------------------
class HFWrapped(nn.Module):
    """Our model as HF ``Trainer`` expects a model: keyword inputs, ``{"loss": ...}`` out."""

    def __init__(self, model: Seq2SeqTransformer) -> None:
        super().__init__()
        self.model = model

    def forward(self, src, tgt_in, labels):
        return {"loss": seq2seq_loss(self.model(src, tgt_in), labels)}


def interleaved_round(
    shape_name: str, warmup: int, steps: int, work: Path
) -> dict[str, list[float]]:
    """tokens/s of HF ``Trainer``, kubetrain's step and the hand loop, one step of each in
    turn: HF's loop runs, and at the end of each of its steps a callback runs one kubetrain step
    and one hand-loop step, in alternating order (each timed; HF's step is the time from the
    callback's return to its next call). The machine's load then weighs on all three alike.
    Returns each one's step times after ``warmup``, in step order (step i of each adjacent)."""
    import transformers
    from transformers import Trainer, TrainerCallback, TrainingArguments

    from kubetrain.train.metrics import EpochMeter
    from kubetrain.train.step import batch_generator, train_step

    transformers.logging.set_verbosity_error()
    shape = SHAPES[shape_name]
    total = warmup + steps
    ours = kubetrain_trainer(shape_name, total + 1, DistContext())
    ours.batches.set_epoch(0, 0)
    meter = EpochMeter(ours)
    our_batches = batch_generator(ours, meter)
    ours.net.train()
    hand = HandLoop(shape, total + 1)
    times: dict[str, list[float]] = {"kubetrain": [], "hand": [], "hf_trainer": []}

    class Interleave(TrainerCallback):
        resumed: float | None = None

        def on_step_end(self, args, state, control, **kwargs):
            now = time.perf_counter()
            if self.resumed is not None:
                times["hf_trainer"].append(now - self.resumed)
            # Which of the two runs first alternates: neither always finds the cache HF left.
            steps = [("kubetrain", lambda: train_step(ours, our_batches, meter)),
                     ("hand", hand.step)]  # fmt: skip
            for name, step in steps if state.global_step % 2 else steps[::-1]:
                started = time.perf_counter()
                step()
                times[name].append(time.perf_counter() - started)
            self.resumed = time.perf_counter()

    torch.manual_seed(0)
    model = HFWrapped(build_model(shape))
    rows = [
        {"src": s, "tgt_in": ti, "labels": to}
        for s, ti, to in samples(shape, max(4 * shape["batch"], 64))
    ]
    args = TrainingArguments(
        output_dir=str(work / "hf"), per_device_train_batch_size=shape["batch"],
        max_steps=total + 1, learning_rate=LR, weight_decay=WEIGHT_DECAY,
        lr_scheduler_type="cosine", max_grad_norm=0.0, optim="adamw_torch_fused",
        logging_strategy="no", save_strategy="no", eval_strategy="no", report_to=[],
        use_cpu=True, dataloader_num_workers=0, remove_unused_columns=False,
        disable_tqdm=True, seed=0,
    )  # fmt: skip
    collator = lambda batch: {k: torch.stack([r[k] for r in batch]) for k in batch[0]}  # noqa: E731
    with contextlib.redirect_stdout(io.StringIO()):  # its end-of-training summary line
        Trainer(model=model, args=args, train_dataset=rows, data_collator=collator,
                callbacks=[Interleave()]).train()  # fmt: skip
    return {k: v[warmup:] for k, v in times.items()}


def bench_throughput(rounds: int, work: Path) -> dict[str, Any]:
    """tokens/s per round; the ratios pair step i of kubetrain with step i of the other (taken
    within a second of each other): their median over all steps, and its range over rounds."""
    warmup, steps = 3, 12
    tokens = tokens_per_step(SHAPES["step"])
    rates: dict[str, list[float]] = {"kubetrain": [], "hand": [], "hf_trainer": []}
    paired: dict[str, list[list[float]]] = {"hand": [], "hf_trainer": []}
    for r in range(rounds):
        times = interleaved_round("step", warmup, steps, work)
        for name, values in times.items():
            rates[name].append(tokens * len(values) / sum(values))
        for other in paired:  # tokens/s ratio = inverse time ratio
            paired[other].append([o / k for k, o in zip(times["kubetrain"], times[other],
                                                         strict=False)])  # fmt: skip
        print(f"  throughput round {r + 1}: " + ", ".join(f"{k} {v[-1]:.0f}" for k, v in rates.items()),
              flush=True)  # fmt: skip

    def ratio(other: str) -> dict[str, float]:
        per_round = [statistics.median(v) for v in paired[other]]
        pooled = statistics.median([x for v in paired[other] for x in v])
        return {"median": pooled, "min": min(per_round), "max": max(per_round),
                "n": sum(len(v) for v in paired[other])}  # fmt: skip

    return {
        "shape": SHAPES["step"],
        "parameters": sum(p.numel() for p in build_model(SHAPES["step"]).parameters()),
        "tokens_per_second": {k: stats(v) for k, v in rates.items()},
        "kubetrain_over_hand": ratio("hand"),
        "kubetrain_over_hf": ratio("hf_trainer"),
    }


# -- FSDP vs DDP, 2 processes ------------------------------------------------------------------
def rank_bytes(trainer) -> dict[str, int]:
    """Bytes this rank holds of parameters, gradients (after a backward) and optimizer state."""
    from kubetrain.train.distributed import local_tensor
    from kubetrain.train.step import forward_backward_step

    size = lambda t: local_tensor(t).numel() * t.element_size()  # noqa: E731
    params = sum(size(p) for p in trainer.model.parameters())
    state = sum(
        size(v)
        for per_param in trainer.optimizer.state.values()
        for v in per_param.values()
        if isinstance(v, torch.Tensor) and v.dim() > 0  # not the scalar step counts
    )
    trainer.batches.set_epoch(0, 0)
    forward_backward_step(trainer, next(iter(trainer.batches)), sync_gradients=True)
    grads = sum(size(p.grad) for p in trainer.model.parameters() if p.grad is not None)
    trainer.optimizer.zero_grad(set_to_none=True)
    return {"parameters": params, "gradients": grads, "optimizer_state": state}


def fsdp_worker(out: Path, steps: int) -> None:
    """One rank of ``torchrun --nproc-per-node 2 text_train.py --worker``: the same model as a
    DDP trainer and as an FSDP trainer in one job, one step of each in turn (so the machine's
    load weighs on both alike); rank 0 writes every rank's bytes and step times to ``out``."""
    from kubetrain.core.distributed import gather_objects, init_from_env, shutdown
    from kubetrain.train.metrics import EpochMeter
    from kubetrain.train.step import batch_generator, train_step

    torch.set_num_threads(1)
    ctx = init_from_env()
    warmup = 2
    trainers = {s: kubetrain_trainer("step", warmup + steps, ctx, strategy=s)
                for s in ("ddp", "fsdp")}  # fmt: skip
    runs = {}
    for name, trainer in trainers.items():
        trainer.batches.set_epoch(0, 0)
        meter = EpochMeter(trainer)
        runs[name] = (trainer, batch_generator(trainer, meter), meter, [])
    for _ in range(warmup + steps):
        for trainer, batches, meter, times in runs.values():
            started = time.perf_counter()
            train_step(trainer, batches, meter)
            times.append(time.perf_counter() - started)
    mine = {
        name: {"bytes": rank_bytes(trainer), "step_seconds": times[warmup:]}
        for name, (trainer, _, _, times) in runs.items()
    }
    per_rank = gather_objects(mine, ctx)
    if ctx.is_main:
        out.write_text(json.dumps(per_rank))
    shutdown()


def bench_fsdp(rounds: int, work: Path) -> dict[str, Any]:
    out = work / "fsdp.json"
    subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--standalone",
         str(Path(__file__).resolve()), "--worker", "--out", str(out),
         "--rounds", str(rounds)],
        check=True, env={**os.environ, "OMP_NUM_THREADS": "1"},
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    per_rank = json.loads(out.read_text())
    summary: dict[str, Any] = {}
    for strategy in ("ddp", "fsdp"):
        # A step ends when the slower rank's does: the max over ranks, step by step.
        steps = [max(s) for s in zip(*(r[strategy]["step_seconds"] for r in per_rank), strict=True)]
        summary[strategy] = {
            "bytes_per_rank": [r[strategy]["bytes"] for r in per_rank],
            "step_seconds": stats(steps),
        }
    total = lambda b: sum(b.values())  # noqa: E731
    summary["fsdp_over_ddp_bytes"] = max(
        total(f) / total(d)
        for f, d in zip(summary["fsdp"]["bytes_per_rank"], summary["ddp"]["bytes_per_rank"],
                        strict=True)
    )  # fmt: skip
    summary["fsdp_over_ddp_step_time"] = (
        summary["fsdp"]["step_seconds"]["median"] / summary["ddp"]["step_seconds"]["median"]
    )
    print(f"  fsdp: {json.dumps({k: summary[k] for k in ('fsdp_over_ddp_bytes', 'fsdp_over_ddp_step_time')})}",
          flush=True)  # fmt: skip
    return summary


# -- MFU ---------------------------------------------------------------------------------------
# Kinds of operator for the MFU breakdown, first match wins (substrings of aten op names).
OP_KINDS = (
    ("GEMM (mm, addmm, bmm)", ("aten::mm", "aten::addmm", "aten::bmm")),
    ("dropout masks (bernoulli)", ("bernoulli", "dropout")),
    ("softmax / log-softmax", ("softmax",)),
    ("optimizer (fused AdamW, zero_grad)", ("adam", "zero_grad")),
    ("GELU", ("gelu",)),
    ("layer norm", ("layer_norm",)),
)


def op_shares(step) -> dict[str, float]:
    """Share of one profiled ``step()``'s CPU time by kind of operator (what MFU's missing part
    is spent on); the rest is elementwise arithmetic, copies and fills."""
    from torch.profiler import profile

    with profile() as prof:
        step()
    shares: dict[str, float] = {}
    rows = [r for r in prof.key_averages() if r.self_cpu_time_total > 0]
    total = sum(r.self_cpu_time_total for r in rows)
    for r in rows:
        name = r.key.lower()
        kind = next((k for k, keys in OP_KINDS if any(x in name for x in keys)), "other")
        shares[kind] = shares.get(kind, 0.0) + r.self_cpu_time_total / total
    return dict(sorted(shares.items(), key=lambda kv: -kv[1]))


def bench_mfu(rounds: int) -> dict[str, Any]:
    """Per step: the dense-GEMM peak measured just before and just after it (the higher is the
    divisor: the conservative MFU), so a change in the machine's load moves both alike."""
    from kubetrain.train.instrument import peak_flops
    from kubetrain.train.metrics import EpochMeter
    from kubetrain.train.step import batch_generator, train_step

    warmup, steps = 1, 2 * rounds
    shape = SHAPES["compute"]
    trainer = kubetrain_trainer("compute", warmup + steps + 1, DistContext())  # +1: profiled
    trainer.batches.set_epoch(0, 0)
    meter = EpochMeter(trainer)
    batches = batch_generator(trainer, meter)
    trainer.net.train()

    def peak() -> float:
        peak_flops.cache_clear()
        return peak_flops("cpu")

    def big_peak() -> float:  # a 1024^3 GEMM: the 512^3 of peak_flops fills the core less
        a, b = torch.randn(1024, 1024), torch.randn(1024, 1024)
        a @ b
        started = time.perf_counter()
        for _ in range(3):
            a @ b
        return 2 * 1024**3 * 3 / (time.perf_counter() - started)

    mfus, peaks, achieved, every_step, big_mfus = [], [], [], [], []
    before, big_before = peak(), big_peak()
    for i in range(warmup + steps):
        started = time.perf_counter()
        train_step(trainer, batches, meter)
        seconds = time.perf_counter() - started
        every_step.append(seconds)
        after, big_after = peak(), big_peak()
        if i >= warmup:
            flops = trainer.flops_per_sample * tokens_per_step(shape)
            divisor = max(before, after)
            peaks.append(divisor)
            achieved.append(flops / seconds)
            mfus.append(flops / seconds / divisor)
            big_mfus.append(flops / seconds / max(big_before, big_after))
            print(f"  mfu step {i}: {100 * mfus[-1]:.1f} % ({flops / seconds / 1e9:.1f} of "
                  f"{divisor / 1e9:.1f} GFLOP/s)", flush=True)  # fmt: skip
        before, big_before = after, big_after
    return {
        "time_by_op": op_shares(lambda: train_step(trainer, batches, meter)),
        "shape": SHAPES["compute"],
        "parameters": sum(p.numel() for p in trainer.model.parameters()),
        "flops_per_step": trainer.flops_per_sample * tokens_per_step(shape),
        "gemm_peak_flops": stats(peaks),
        "achieved_flops": stats(achieved),
        "mfu": stats(mfus),
        "mfu_vs_1024_gemm": stats(big_mfus),
        # The optimizer step (no GEMM at all): a share of step time that MFU cannot count.
        "optimizer_share": meter.optimizer_seconds / sum(every_step),
    }


# -- report ------------------------------------------------------------------------------------
def fmt(s: dict[str, float], scale: float = 1.0, digits: int = 0) -> str:
    return (f"{s['median'] * scale:.{digits}f} ({s['min'] * scale:.{digits}f}–"
            f"{s['max'] * scale:.{digits}f})")  # fmt: skip


def shape_text(shape: dict[str, int]) -> str:
    return (f"d_model {shape['d_model']}, {shape['heads']} heads, {shape['layers']}+"
            f"{shape['layers']} layers, ff {shape['ff']}, vocab {shape['vocab']}, batch "
            f"{shape['batch']} x ({shape['src']} source + {shape['tgt']} target) tokens")  # fmt: skip


def render(results: dict[str, Any]) -> str:
    m = results["machine"]
    lines = ["## Language-model training (`benchmarks/text_train.py`)", "",
             f"Machine: {m['cpu']}, {m['cores']} cores, torch {m['torch']}, one torch thread "
             f"per process; {m['date']}; `{results['command']}`.", ""]  # fmt: skip
    if "throughput" in results:
        t = results["throughput"]
        tps = t["tokens_per_second"]
        lines += [
            "### Training tokens/s: kubetrain's step vs a hand-written loop vs HF `Trainer`", "",
            f"Seq2SeqTransformer ({t['parameters'] / 1e6:.1f} M parameters; "
            f"{shape_text(t['shape'])}), fused AdamW + cosine schedule, no clipping, dropout "
            "0.1, fp32. HF `Trainer` trains the same model class, wrapped in an `nn.Module` "
            "that returns `{\"loss\": ...}` (not an HF config), with `adamw_torch_fused`. "
            "One step of each in turn (kubetrain's and the hand loop's run from a callback at "
            "the end of each HF step). tokens/s: median (min–max) of rounds; ratios: median "
            "over all steps of step i's time ratio (min–max of the rounds' medians).", "",
            "| kubetrain | hand loop | HF Trainer | kubetrain / hand (target ≥ 0.97) | "
            "kubetrain / HF (target ≥ 1.0) |",
            "|---|---|---|---|---|",
            f"| {fmt(tps['kubetrain'])} | {fmt(tps['hand'])} | {fmt(tps['hf_trainer'])} | "
            f"{fmt(t['kubetrain_over_hand'], digits=3)} | {fmt(t['kubetrain_over_hf'], digits=3)} |",
            "",
        ]  # fmt: skip
    if "fsdp" in results:
        f = results["fsdp"]
        lines += ["### FSDP vs DDP, 2 processes (gloo, CPU), the model above", "",
                  "| strategy | rank | parameters MiB | gradients MiB | optimizer state MiB | "
                  "total MiB | step s |", "|---|---|---|---|---|---|---|"]  # fmt: skip
        for strategy in ("ddp", "fsdp"):
            for rank, b in enumerate(f[strategy]["bytes_per_rank"]):
                mib = {k: v / 2**20 for k, v in b.items()}
                lines.append(
                    f"| {strategy} | {rank} | {mib['parameters']:.1f} | {mib['gradients']:.1f} | "
                    f"{mib['optimizer_state']:.1f} | {sum(mib.values()):.1f} | "
                    f"{fmt(f[strategy]['step_seconds'], digits=3) if rank == 0 else ''} |"
                )
        lines += ["", f"FSDP / DDP bytes per rank: {f['fsdp_over_ddp_bytes']:.3f} (≈ 1/2 "
                  f"expected); step time: {f['fsdp_over_ddp_step_time']:.2f}×.", ""]  # fmt: skip
    if "mfu" in results:
        u = results["mfu"]
        lines += ["### MFU of a compute-bound Transformer (1 process, 1 thread, fp32)", "",
                  f"Seq2SeqTransformer ({u['parameters'] / 1e6:.1f} M parameters; "
                  f"{shape_text(u['shape'])}) through kubetrain's step: "
                  f"{u['flops_per_step'] / 1e9:.1f} GFLOP per step (FlopCounterMode).", "",
                  "| dense-GEMM peak GFLOP/s (peak_flops: 512³) | achieved GFLOP/s | MFU (target ≥ 45 %) | "
                  "optimizer step / step | MFU vs a 1024³ GEMM |", "|---|---|---|---|---|",
                  f"| {fmt(u['gemm_peak_flops'], 1e-9, 1)} | {fmt(u['achieved_flops'], 1e-9, 1)} "
                  f"| {fmt(u['mfu'], 100, 1)} % | {100 * u['optimizer_share']:.1f} % | "
                  f"{fmt(u['mfu_vs_1024_gemm'], 100, 1)} % |", "",
                  "Where one step's CPU time goes (torch.profiler, self time): "
                  + ", ".join(f"{k} {100 * v:.1f} %" for k, v in u["time_by_op"].items())
                  + ". MFU counts the GEMMs' and attention's FLOPs only: the rest is time they "
                  "do not fill; and the GEMMs of these shapes (backward: transposed operands) "
                  "run below the square-GEMM peak.", ""]  # fmt: skip
    return "\n".join(lines).rstrip() + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--only", default="throughput,fsdp,mfu")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--no-write", action="store_true", help="print, do not write results/")
    args = parser.parse_args(argv)
    if args.worker:
        fsdp_worker(args.out, steps=4 * args.rounds)
        return 0
    torch.set_num_threads(1)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    work = Path(tempfile.mkdtemp(prefix="kubetrain-textbench-"))
    results: dict[str, Any] = {
        "machine": {"cpu": cpu_model(), "cores": os.cpu_count(), "torch": torch.__version__,
                    "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())},
        "command": "python benchmarks/text_train.py " + " ".join(argv or sys.argv[1:]),
    }  # fmt: skip
    print(f"CPU: {results['machine']['cpu']}", flush=True)
    parts = {"throughput": lambda: bench_throughput(args.rounds, work),
             "fsdp": lambda: bench_fsdp(args.rounds, work), "mfu": lambda: bench_mfu(args.rounds)}  # fmt: skip
    for name in args.only.split(","):
        started = time.perf_counter()
        results[name] = parts[name]()
        print(f"{name}: {time.perf_counter() - started:.0f} s", flush=True)
    report = render(results)
    print(report)
    if not args.no_write:
        RESULTS.mkdir(exist_ok=True)
        (RESULTS / "text_train.json").write_text(json.dumps(results, indent=2) + "\n")
        (RESULTS / "text_train.md").write_text(report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
