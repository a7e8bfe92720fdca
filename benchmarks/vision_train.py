"""Image-classifier training throughput: kubetrain's training path against a hand-written loop
on the same data path, and the share of step time spent waiting for data.

Both train a torchvision ResNet-18 (10 classes) at 64 px in one process on the training split
of the dataset kubetrain's preprocess (the ``images`` task) wrote from a generated image
folder, streamed by kubetrain's ``StreamingDataset`` (``ImageTransform``: RandomResizedCrop,
flip, ToDtype, Normalize) through a ``DataLoader`` with 0/1/2 workers, with the same optimizer
and schedule (kubetrain's AdamW and cosine schedule), seed and batch:

- **kubetrain**: ``kubetrain.train.loop.fit`` (Trainer, ``ImageTask``, ``StreamBatches``,
  ``train_step``, the epoch's meter and validation), two epochs;
- **hand loop**: ``for x, y in DataLoader(stream): loss = cross_entropy(model(x), y);
  backward; step; schedule; zero_grad`` with the model built by ``torchvision.models``, two
  epochs of the same batches.

The image folder is sized so that an epoch is about ``--steps`` steps; the second epoch is the
one measured (the first warms up), worker start-up included as in every epoch; rounds
interleave the two loops, rotating which goes first. Samples/s and data-wait (the time the loop
waited for its next batch over the epoch's time) are kubetrain's own epoch figures for it, and
measured the same way in the hand loop.

    .venv-vision/bin/python benchmarks/vision_train.py [--rounds 3] [--steps 8] [--workers 0 1 2]

On a GPU (``--device cuda``) the same comparison runs with ``--model``, ``--precision`` bf16 and
channels_last (``benchmarks/gpu_check.sh`` does this with ResNet-50). Writes
benchmarks/results/vision_train.{json,md} (``--tag`` names other files).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
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
    machine,
    ratios,
    stats,
)


def config(args: argparse.Namespace, data_cfg: Any, workers: int):
    """The pipeline config both loops train with."""
    from kubetrain.pipeline.config import PipelineConfig

    data = data_cfg.model_dump(mode="json")
    data["num_workers"] = workers
    data["prefetch"] = args.prefetch
    return PipelineConfig.model_validate(
        {
            "data": data,
            "model": {"name": f"torchvision:{args.model}"},
            "train": {
                "epochs": 2, "batch_size": args.batch, "nproc": 1, "num_threads": 1, "lr": 1e-3,
                "precision": args.precision, "checkpoint_every_steps": 0,
            },
        }
    )  # fmt: skip


def kubetrain_run(cfg, data, device: torch.device) -> dict[str, float]:
    """``fit``: two epochs; the second one's figures."""
    from kubetrain.core.distributed import DistContext
    from kubetrain.tasks import open_task
    from kubetrain.train.loop import fit

    last = fit(cfg, open_task(cfg, data), DistContext(device=device)).history[-1]
    return {"samples_per_second": last.samples_per_second, "data_wait_share": last.data_wait_share}


def hand_run(cfg, data, device: torch.device) -> dict[str, float]:
    """The loop users write over the same stream, model and optimizer: two epochs of as many
    batches as kubetrain's ``StreamBatches`` takes; the second one's figures."""
    import torchvision

    from kubetrain.core.distributed import DistContext
    from kubetrain.tasks import open_task
    from kubetrain.train.optim import build_optimizer, build_scheduler

    tc, dc = cfg.train, cfg.data
    # kubetrain's stream of the training split, exactly as fit gets it (transforms, collate).
    dataset = open_task(cfg, data).train_batches(tc, DistContext()).dataset
    torch.manual_seed(tc.seed)
    model = getattr(torchvision.models, cfg.model.name.split(":")[1])(num_classes=data.num_classes)
    cuda = device.type == "cuda"
    model = model.to(device, memory_format=torch.channels_last) if cuda else model
    steps = dataset.min_batches()  # what StreamBatches takes (the same in every epoch)
    optimizer = build_optimizer(model.parameters(), tc)
    scheduler = build_scheduler(optimizer, tc, steps)
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(tc.precision)
    model.train()
    for epoch in range(tc.epochs):
        dataset.set_epoch(epoch)
        started, waited, samples = time.perf_counter(), 0.0, 0
        loader = DataLoader(
            dataset, batch_size=None, num_workers=dc.num_workers, pin_memory=cuda,
            prefetch_factor=max(1, dc.prefetch) if dc.num_workers else None,
        )  # fmt: skip
        batches = iter(loader)
        for _ in range(steps):
            t = time.perf_counter()
            x, y = next(batches)
            samples += len(y)
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
    return {"samples_per_second": samples / seconds, "data_wait_share": waited / seconds}


def run(args: argparse.Namespace) -> dict[str, Any]:
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    # An epoch of about --steps batches: the train split is 70 % of the images (val, test 15 %).
    # (At least 20 a class: the stratified split needs a few of each in every split.)
    images = args.images or max(200, math.ceil(args.steps * args.batch / 0.7) + 10)
    folder = image_folder(images, 10, args.min_px, args.max_px)
    out = Path(tempfile.mkdtemp(prefix="kubetrain-vision-train-")) / "dataset"
    data_cfg, data = dataset_artifact(folder, out, args.size, max(2, *args.workers))
    loops = {"kubetrain": kubetrain_run, "hand": hand_run}
    runs: dict[str, dict[int, list[dict[str, float]]]] = {
        k: {w: [] for w in args.workers} for k in loops
    }
    for r in range(args.rounds):
        for w in args.workers:
            cfg = config(args, data_cfg, w)
            order = list(loops) if r % 2 == 0 else list(reversed(loops))
            for name in order:
                res = loops[name](cfg, data, device)
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
            "rounds": args.rounds,
            "images": images,
            "train_images": data.meta["sizes"]["train"],
            "device": args.device,
            "precision": args.precision,
            "threads": args.threads,
            "prefetch": args.prefetch,
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
        f"{s['precision']}, 1 process ({s['threads']} torch thread(s)), {s['train_images']} "
        f"training images (about {s['steps']} steps an epoch); samples/s of the second epoch; "
        f"median (min–max) of {s['rounds']} interleaved rounds. Both loops read kubetrain's "
        "sharded stream; kubetrain is `kubetrain.train.loop.fit` (images task), the hand "
        "loop is forward, loss, backward, step. Data-wait: time waiting for the next batch "
        "over the epoch's time.",
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
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=8, help="steps per epoch (sizes the data)")
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--model", default="resnet18", help="a torchvision builder")
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--prefetch", type=int, default=4, help="data.prefetch (per worker)")
    parser.add_argument("--images", type=int, default=0, help="default: from --steps, --batch")
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
