"""Detector training throughput: kubetrain's ``fit`` against a hand-written loop in the style of
torchvision's ``references/detection`` (``train_one_epoch``), on the same data and model.

Both train the same detector (default ``kubetrain.models.detection:small_fasterrcnn``; any
``--model`` kubetrain builds, e.g. ``torchvision:fasterrcnn_mobilenet_v3_large_320_fpn``) in one
process on the training split of the dataset kubetrain's preprocess wrote from Fashion-MNIST
scenes (``kubetrain.data.scenes``), streamed by kubetrain's ``StreamingDataset`` with the box
transforms (flip, photometric jitter, ToDtype, SanitizeBoundingBoxes) through a ``DataLoader``
with 0/1/2 workers, with the same optimizer and schedule, seed and batch:

- **kubetrain**: ``kubetrain.train.loop.fit`` (Trainer, the detection task, its validation
  with COCO mAP after each epoch, which is not timed), two epochs;
- **hand loop**: ``for images, targets in loader: loss_dict = model(images, targets); losses =
  sum(loss_dict.values()); optimizer.zero_grad(); losses.backward(); optimizer.step();
  lr_scheduler.step()`` (``references/detection/engine.py``), two epochs of the same batches.

The second epoch is measured (the first warms up); rounds interleave the two loops, rotating
which goes first. On a GPU (``--device cuda``: ``benchmarks/gpu_check.sh``) with bf16 autocast.

    .venv-vision/bin/python benchmarks/detection_train.py [--rounds 3] [--steps 8] [--workers 0 1 2]

Writes benchmarks/results/detection_train.{json,md} (``--tag`` names other files).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import sys
import time
from typing import Any

import torch
from detection_common import TMP, coco_scenes, dataset_artifact
from torch.utils.data import DataLoader
from vision_common import RESULTS, fmt, machine, ratios, stats


def config(args: argparse.Namespace, data_cfg: Any, workers: int):
    from kubetrain.pipeline.config import PipelineConfig

    data = data_cfg.model_dump(mode="json")
    data.update(num_workers=workers, prefetch=args.prefetch)
    return PipelineConfig.model_validate(
        {
            "data": data,
            "model": {"name": args.model, "kwargs": json.loads(args.model_kwargs)},
            "train": {
                "epochs": 2, "batch_size": args.batch, "nproc": 1, "num_threads": args.threads,
                "lr": 1e-3, "optimizer": "adamw", "precision": args.precision,
                "checkpoint_every_steps": 0,
            },
        }
    )  # fmt: skip


def kubetrain_run(cfg, data, device: torch.device) -> dict[str, float]:
    from kubetrain.core.distributed import DistContext
    from kubetrain.tasks import open_task
    from kubetrain.train.loop import fit

    last = fit(cfg, open_task(cfg, data), DistContext(device=device)).history[-1]
    return {"samples_per_second": last.samples_per_second, "data_wait_share": last.data_wait_share}


def hand_run(cfg, data, device: torch.device) -> dict[str, float]:
    """torchvision's reference loop over the same stream, model and optimizer."""
    from kubetrain.core.distributed import DistContext
    from kubetrain.tasks import open_task
    from kubetrain.train.optim import build_optimizer, build_scheduler

    tc, dc = cfg.train, cfg.data
    task = open_task(cfg, data)
    dataset = task.train_batches(tc, DistContext()).dataset
    torch.manual_seed(tc.seed)
    model = task.build_model(cfg.model).to(device)
    cuda = device.type == "cuda"
    steps = dataset.min_batches()
    optimizer = build_optimizer([p for p in model.parameters() if p.requires_grad], tc)
    lr_scheduler = build_scheduler(optimizer, tc, steps)
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
            images, targets = next(batches)
            samples += len(images)
            if cuda:
                images = [i.to(device, non_blocking=True) for i in images]
                targets = [{k: v.to(device) if torch.is_tensor(v) else v for k, v in t.items()}
                           for t in targets]  # fmt: skip
            waited += time.perf_counter() - t
            autocast = torch.autocast(device.type, dtype) if dtype else contextlib.nullcontext()
            with autocast:
                loss_dict = model(images, targets)
            losses = sum(loss for loss in loss_dict.values())
            optimizer.zero_grad()
            losses.backward()
            optimizer.step()
            lr_scheduler.step()
            if cuda:
                torch.cuda.synchronize(device)
        del batches, loader
        seconds = time.perf_counter() - started
    return {"samples_per_second": samples / seconds, "data_wait_share": waited / seconds}


def run(args: argparse.Namespace) -> dict[str, Any]:
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    images = args.images or max(100, math.ceil(args.steps * args.batch / 0.7) + 10)
    folder = coco_scenes(images)
    out = TMP / f"dataset-train-{images}"
    data_cfg, data = dataset_artifact(folder, out, max(2, *args.workers))
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
                print(f"round {r + 1}/{args.rounds} workers {w} {name}: "
                      f"{res['samples_per_second']:.1f} images/s, data-wait "
                      f"{100 * res['data_wait_share']:.1f} %", flush=True)  # fmt: skip

    def col(name: str, w: int, key: str) -> list[float]:
        return [x[key] for x in runs[name][w]]

    return {
        "machine": machine(),
        "settings": {
            "model": args.model, "kwargs": args.model_kwargs, "batch": args.batch,
            "steps": args.steps, "rounds": args.rounds, "images": images,
            "train_images": data.meta.sizes["train"], "device": args.device,
            "precision": args.precision, "threads": args.threads,
        },
        "samples_per_second": {
            k: {w: stats(col(k, w, "samples_per_second")) for w in args.workers} for k in loops
        },
        "data_wait_share": {
            k: {w: stats(col(k, w, "data_wait_share")) for w in args.workers} for k in loops
        },
        "ratio": {
            w: ratios(col("kubetrain", w, "samples_per_second"),
                      col("hand", w, "samples_per_second"))
            for w in args.workers
        },
        "command": " ".join(["python", "benchmarks/detection_train.py", *sys.argv[1:]]),
    }  # fmt: skip


def render(res: dict[str, Any]) -> str:
    s, m = res["settings"], res["machine"]
    where = m.get("gpu") if s["device"] == "cuda" else f"{m['cpu']}, {m['cores']} cores"
    lines = [
        f"## Detection: training throughput ({s['model']}, {s['device']})",
        "",
        f"`{res['command']}` on {where} (load {m['load']:.1f} at the start), torch "
        f"{m['torch']}, {m['date']}.",
        "",
        f"{s['model']} (kwargs {s['kwargs']}), Fashion-MNIST scenes (96-128 px, 10 classes), "
        f"batch {s['batch']}, {s['precision']}, 1 process ({s['threads']} torch thread(s)), "
        f"{s['train_images']} training images; images/s of the second epoch; median (min–max) "
        f"of {s['rounds']} interleaved rounds. Both loops read kubetrain's sharded stream with "
        "the box transforms; kubetrain is `kubetrain.train.loop.fit` (detection task), the "
        "hand loop is torchvision's reference `train_one_epoch` (loss dict, sum, backward, "
        "step). Data-wait: time waiting for the next batch over the epoch's time.",
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
    parser.add_argument("--model", default="kubetrain.models.detection:small_fasterrcnn")
    parser.add_argument("--model-kwargs", default="{}", help="model.kwargs as JSON")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--prefetch", type=int, default=4)
    parser.add_argument("--images", type=int, default=0, help="default: from --steps, --batch")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--precision", default="fp32", choices=["fp32", "bf16", "fp16"])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--tag", default="detection_train", help="results/<tag>.{json,md}")
    parser.add_argument("--max-data-wait", type=float, default=None,
                        help="fail (exit 1) if kubetrain's median data-wait share exceeds this")  # fmt: skip
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
        print(f"{verdict}: kubetrain's data-wait {100 * worst:.1f} % "
              f"(limit {100 * args.max_data_wait:.0f} %)")  # fmt: skip
        if verdict == "FAIL":
            sys.exit(1)


if __name__ == "__main__":
    main()
