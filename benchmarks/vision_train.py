"""Image-classifier training throughput: kubetrain's training step path against a hand-written
loop on the same data path, and the share of step time spent waiting for data.

Both train a torchvision ResNet-18 (10 classes) at 64 px in one process on the training split
of the sharded dataset kubetrain's preprocess wrote from a generated image folder, streamed by
kubetrain's ``StreamingDataset`` (``ImageTransform``: RandomResizedCrop, flip, ToDtype,
Normalize) through a ``DataLoader`` with 0/1/2 workers, with the same optimizer and schedule
(kubetrain's AdamW and cosine schedule), seed and batch:

- **kubetrain**: a ``Trainer`` (model, optimizer, schedule, ``StreamBatches``) driven by
  kubetrain's epoch loop (``kubetrain.train.loop._train_epoch``: ``batch_generator`` +
  ``train_step`` + ``EpochMeter``, as ``fit`` runs it, without validation). While
  ``kubetrain.workloads.images`` has not landed, the ``images`` workload is the benchmark's
  stand-in (``vision_common.BenchImages``: kubetrain's model builder and stream; see there);
- **hand loop**: ``for x, y in DataLoader(stream): loss = cross_entropy(model(x), y);
  backward; step; schedule; zero_grad`` with the model built by ``torchvision.models``.

Each run is a warm-up epoch of ``--warmup`` steps and a measured epoch of ``--steps`` steps
(worker start-up included, as in every epoch); rounds interleave the two loops, rotating which
goes first. Data-wait: the time the loop waited for its next batch over the epoch's time.

    .venv-vision/bin/python benchmarks/vision_train.py [--rounds 2] [--steps 12] [--workers 0 1 2]

On a GPU (``--device cuda``) the same comparison runs with ``--model``, ``--precision`` bf16 and
channels_last (``benchmarks/gpu_check.sh`` does this with ResNet-50). Writes
benchmarks/results/vision_train.{json,md} (``--tag`` names other files).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader
from vision_common import (
    RESULTS,
    dataset_artifact,
    fmt,
    image_folder,
    images_workload_landed,
    machine,
    ratios,
    stats,
)


def config(args: argparse.Namespace, data_cfg: Any, workers: int):
    """The pipeline config both loops train with."""
    from kubetrain.config import PipelineConfig

    data = data_cfg.model_dump(mode="json")
    data["num_workers"] = workers
    data["prefetch"] = args.prefetch
    return PipelineConfig.model_validate(
        {
            "data": data,
            "model": {"name": f"torchvision:{args.model}"},
            "train": {
                "batch_size": args.batch, "nproc": 1, "num_threads": 1, "lr": 1e-3,
                "precision": args.precision, "checkpoint_every_steps": 0,
            },
        }
    )  # fmt: skip


def kubetrain_run(cfg, data, device: torch.device, warmup: int, steps: int) -> dict[str, float]:
    """A Trainer through kubetrain's epoch loop: a warm-up epoch, then the measured one."""
    from kubetrain.train.distributed import DistContext
    from kubetrain.train.loop import _train_epoch
    from kubetrain.train.trainer import Trainer

    trainer = Trainer(cfg, data, DistContext(device=device))
    available = trainer.batches.steps
    if available < max(warmup, steps):
        sys.exit(f"the train split has {available} batches; lower --steps/--warmup")
    for n in (warmup, steps):  # the epoch loop runs batches.steps steps
        trainer.batches.steps = n
        stats_ = _train_epoch(trainer)
    return {
        "samples_per_second": stats_.samples_per_second,
        "data_wait_share": stats_.data_wait_share,
    }


def hand_run(cfg, data, device: torch.device, warmup: int, steps: int) -> dict[str, float]:
    """The loop users write over the same stream, model and optimizer."""
    import torchvision

    from kubetrain.data.streaming import StreamingDataset
    from kubetrain.data.transforms import image_transforms
    from kubetrain.train.optim import build_optimizer, build_scheduler

    tc, dc = cfg.train, cfg.data
    torch.manual_seed(tc.seed)
    model = getattr(torchvision.models, cfg.model.name.split(":")[1])(num_classes=data.num_classes)
    cuda = device.type == "cuda"
    model = model.to(device, memory_format=torch.channels_last) if cuda else model
    optimizer = build_optimizer(model.parameters(), tc)
    scheduler = build_scheduler(optimizer, tc, steps)
    train, _, collate = image_transforms(dc, data.num_classes)
    dataset = StreamingDataset(
        data.root, "train", tc.batch_size, rank=0, world_size=1, num_workers=dc.num_workers,
        seed=tc.seed, transform=train, collate=collate,
    )  # fmt: skip
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(tc.precision)
    model.train()
    for epoch, n in enumerate((warmup, steps)):
        dataset.set_epoch(epoch)
        started, waited = time.perf_counter(), 0.0
        loader = DataLoader(
            dataset, batch_size=None, num_workers=dc.num_workers, pin_memory=cuda,
            prefetch_factor=max(1, dc.prefetch) if dc.num_workers else None,
        )  # fmt: skip
        batches = iter(loader)
        for _ in range(n):
            t = time.perf_counter()
            x, y = next(batches)
            if cuda:
                x = x.to(device, non_blocking=True, memory_format=torch.channels_last)
                y = y.to(device, non_blocking=True)
            waited += time.perf_counter() - t
            autocast = torch.autocast(device.type, dtype) if dtype else contextlib.nullcontext()
            with autocast:
                loss = F.cross_entropy(model(x).float(), y)
            loss.backward()
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            if cuda:
                torch.cuda.synchronize(device)
        del batches, loader
        seconds = time.perf_counter() - started
    return {"samples_per_second": n * tc.batch_size / seconds, "data_wait_share": waited / seconds}


def run(args: argparse.Namespace) -> dict[str, Any]:
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    folder = image_folder(args.images, 10, args.min_px, args.max_px)
    out = Path(tempfile.mkdtemp(prefix="kubetrain-vision-train-")) / "dataset"
    data_cfg, data = dataset_artifact(folder, out, args.size)
    loops = {"kubetrain": kubetrain_run, "hand": hand_run}
    runs: dict[str, dict[int, list[dict[str, float]]]] = {
        k: {w: [] for w in args.workers} for k in loops
    }
    for r in range(args.rounds):
        for w in args.workers:
            cfg = config(args, data_cfg, w)
            order = list(loops) if r % 2 == 0 else list(reversed(loops))
            for name in order:
                res = loops[name](cfg, data, device, args.warmup, args.steps)
                runs[name][w].append(res)
                print(
                    f"round {r + 1}/{args.rounds} workers {w} {name}: "
                    f"{res['samples_per_second']:.1f} samples/s, data-wait "
                    f"{100 * res['data_wait_share']:.1f} %",
                    flush=True,
                )

    def col(name: str, w: int, key: str) -> list[float]:
        return [x[key] for x in runs[name][w]]

    return {
        "machine": machine(),
        "settings": {
            "model": args.model,
            "size": args.size,
            "batch": args.batch,
            "steps": args.steps,
            "warmup": args.warmup,
            "rounds": args.rounds,
            "images": args.images,
            "device": args.device,
            "precision": args.precision,
            "threads": args.threads,
            "workload": "kubetrain.workloads.images"
            if images_workload_landed()
            else "vision_common.BenchImages (stand-in)",
        },
        "samples_per_second": {
            k: {w: stats(col(k, w, "samples_per_second")) for w in args.workers} for k in loops
        },
        "data_wait_share": {
            k: {w: stats(col(k, w, "data_wait_share")) for w in args.workers} for k in loops
        },
        "ratio": {
            w: ratios(
                col("kubetrain", w, "samples_per_second"), col("hand", w, "samples_per_second")
            )
            for w in args.workers
        },
        "command": " ".join(["python", "benchmarks/vision_train.py", *sys.argv[1:]]),
    }


def render(res: dict[str, Any]) -> str:
    s, m = res["settings"], res["machine"]
    where = f"{m['gpu']}" if s["device"] == "cuda" else f"{m['cpu']}, {m['cores']} cores"
    lines = [
        f"## Vision: training throughput ({s['model']}, {s['device']})",
        "",
        f"`{res['command']}` on {where} (load {m['load']:.1f} at the start), torch "
        f"{m['torch']}, {m['date']}.",
        "",
        f"torchvision {s['model']}, 10 classes, {s['size']} px, batch {s['batch']}, "
        f"{s['precision']}, 1 process ({s['threads']} torch thread(s)); samples/s of a measured "
        f"epoch of {s['steps']} steps after a warm-up epoch of {s['warmup']}; median (min–max) "
        f"of {s['rounds']} interleaved rounds. Both loops read kubetrain's sharded stream; "
        f"kubetrain runs its Trainer and epoch loop (images workload: {s['workload']}), the "
        "hand loop is forward, loss, backward, step. Data-wait: time waiting for the next "
        "batch over the epoch's time.",
        "",
        "| workers | kubetrain | hand loop | kubetrain / hand | data-wait, kubetrain "
        "| data-wait, hand |",
        "|---|---|---|---|---|---|",
    ]
    sps, wait = res["samples_per_second"], res["data_wait_share"]
    for w in res["ratio"]:
        pct = {k: {q: 100 * v for q, v in wait[k][w].items() if q != "n"} for k in wait}
        lines.append(
            f"| {w} | {fmt(sps['kubetrain'][w], 1)} | {fmt(sps['hand'][w], 1)} "
            f"| {fmt(res['ratio'][w], 3)} | {fmt(pct['kubetrain'], 1)} % "
            f"| {fmt(pct['hand'], 1)} % |"
        )
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--steps", type=int, default=12, help="measured steps per run")
    parser.add_argument("--warmup", type=int, default=3, help="steps of the warm-up epoch")
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--model", default="resnet18", help="a torchvision builder")
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--prefetch", type=int, default=4, help="data.prefetch (per worker)")
    parser.add_argument("--images", type=int, default=3000)
    parser.add_argument("--min-px", type=int, default=64)
    parser.add_argument("--max-px", type=int, default=96)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--precision", default="fp32", choices=["fp32", "bf16", "fp16"])
    parser.add_argument("--threads", type=int, default=1, help="torch threads of the process")
    parser.add_argument("--tag", default="vision_train", help="results/<tag>.{json,md}")
    parser.add_argument(
        "--max-data-wait",
        type=float,
        default=None,
        help="fail (exit 1) if kubetrain's median data-wait share exceeds this at any worker "
        "count (e.g. 0.05)",
    )
    args = parser.parse_args()
    if args.device == "cuda" and not torch.cuda.is_available():
        sys.exit("--device cuda: no CUDA device is visible to torch")
    res = run(args)
    if args.device == "cuda":
        res["machine"]["gpu"] = torch.cuda.get_device_name(0)
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"{args.tag}.json").write_text(json.dumps(res, indent=2) + "\n")
    text = render(res)
    (RESULTS / f"{args.tag}.md").write_text(text)
    print(text)
    if args.max_data_wait is not None:
        worst = max(s["median"] for s in res["data_wait_share"]["kubetrain"].values())
        verdict = "PASS" if worst <= args.max_data_wait else "FAIL"
        print(
            f"{verdict}: kubetrain's data-wait {100 * worst:.1f} % (limit {100 * args.max_data_wait:.0f} %)"
        )
        if verdict == "FAIL":
            sys.exit(1)


if __name__ == "__main__":
    main()
