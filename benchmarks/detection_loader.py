"""Detection loader throughput: kubetrain's sharded stream with box transforms against
``torchvision.datasets.CocoDetection`` + ``DataLoader`` with the same transforms.

Decoded + augmented training images (with their boxes) per second at 0/1/2 DataLoader workers,
side by side in one run (rounds interleave the loaders, rotating which goes first):

- **CocoDetection**: ``CocoDetection(images, instances.json)`` wrapped by
  ``wrap_dataset_for_transforms_v2`` (boxes as ``tv_tensors.BoundingBoxes``), transforms ToImage,
  RandomHorizontalFlip, RandomPhotometricDistort, ToDtype, SanitizeBoundingBoxes, a
  ``DataLoader(batch_size, shuffle=True, num_workers, collate_fn=lambda b: tuple(zip(*b)))``, as
  torchvision's detection reference reads COCO;
- **kubetrain, from shards**: the training split of the dataset kubetrain's preprocess wrote,
  streamed as training streams it (``StreamingDataset`` + ``BoxTransform`` of the same
  transforms behind ``StreamBatches``);
- **kubetrain, from files**: the same plus its preprocess (listing, checks, stratified split,
  shards; ``data.num_workers`` processes) charged to the epochs trained on its shards: per
  epoch ``stream seconds + preprocess seconds / E`` (E = ``--epochs``, and E = 1).

    .venv-vision/bin/python benchmarks/detection_loader.py [--rounds 3] [--images 6000]

Writes benchmarks/results/detection_loader.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path
from typing import Any

import torch
from detection_common import TMP, coco_scenes, dataset_artifact, train_specs, user_transform
from torch.utils.data import DataLoader
from vision_common import RESULTS, fmt, machine, ratios, stats

BATCH = 16


def _tuple_collate(batch):
    return tuple(zip(*batch, strict=True))


def epoch_coco(folder: Path, workers: int, epoch: int) -> tuple[int, float]:
    """One epoch of torchvision's COCO loader: (images, seconds)."""
    from torchvision.datasets import CocoDetection, wrap_dataset_for_transforms_v2

    dataset = CocoDetection(str(folder / "images"),
                            str(folder / "annotations" / "instances_all.json"),
                            transforms=user_transform())  # fmt: skip
    # As the reference does for training: images without annotations are left out (the
    # wrapper gives them no boxes or labels, which SanitizeBoundingBoxes cannot take).
    dataset.ids = [i for i in dataset.ids if dataset.coco.getAnnIds(imgIds=i)]
    dataset = wrap_dataset_for_transforms_v2(dataset, target_keys=["boxes", "labels"])
    torch.manual_seed(epoch)
    started = time.perf_counter()
    loader = DataLoader(dataset, batch_size=BATCH, shuffle=True, num_workers=workers,
                        collate_fn=_tuple_collate)  # fmt: skip
    images = sum(len(batch[0]) for batch in loader)
    return images, time.perf_counter() - started


def epoch_stream(root: Path, workers: int, epoch: int) -> tuple[int, float]:
    """One epoch of kubetrain's training loader over the shards' train split."""
    from kubetrain.data.box_transforms import BoxTransform, collate_detection
    from kubetrain.data.streaming import StreamingDataset
    from kubetrain.tasks.stream import StreamBatches

    dataset = StreamingDataset(
        str(root), "train", BATCH, rank=0, world_size=1, num_workers=workers, seed=0,
        transform=BoxTransform(train_specs(), "data.transforms.train"),
        collate=collate_detection,
    )  # fmt: skip
    batches = StreamBatches(dataset, accum=1, num_workers=workers, prefetch=4)
    started = time.perf_counter()
    batches.set_epoch(epoch)
    images = sum(len(targets) for _, targets in batches)
    return images, time.perf_counter() - started


def run(args: argparse.Namespace) -> dict[str, Any]:
    torch.set_num_threads(1)
    folder = coco_scenes(args.images)
    rates: dict[str, dict[int, list[float]]] = {
        k: {w: [] for w in args.workers} for k in ("coco", "shards", "files_1", "files_e")
    }
    prep: dict[int, list[float]] = {w: [] for w in args.workers}
    # Warm-up: the first preprocess in a process pays for imports the others do not.
    shutil.rmtree(TMP / "loader-warm-up", ignore_errors=True)
    dataset_artifact(coco_scenes(min(args.images, 50), seed=1), TMP / "loader-warm-up", 0)
    for r in range(args.rounds):
        for w in args.workers:
            shards = TMP / f"loader-shards-{args.images}-{w}"
            shutil.rmtree(shards, ignore_errors=True)
            started = time.perf_counter()
            dataset_artifact(folder, shards, num_workers=w)
            pre = time.perf_counter() - started
            prep[w].append(pre)
            order = ["coco", "shards"] if r % 2 == 0 else ["shards", "coco"]
            for which in order:
                if which == "coco":
                    n, sec = epoch_coco(folder, w, r)
                    rates["coco"][w].append(n / sec)
                else:
                    n, sec = epoch_stream(shards, w, r)
                    rates["shards"][w].append(n / sec)
                    rates["files_1"][w].append(n / (sec + pre))
                    rates["files_e"][w].append(n / (sec + pre / args.epochs))
            print(f"round {r + 1}/{args.rounds} workers {w}: CocoDetection "
                  f"{rates['coco'][w][-1]:.0f}/s, shards {rates['shards'][w][-1]:.0f}/s, "
                  f"preprocess {pre:.1f} s", flush=True)  # fmt: skip
    base = rates["coco"]
    return {
        "machine": machine(),
        "settings": {
            "images": args.images,
            "batch": BATCH,
            "rounds": args.rounds,
            "epochs_amortised": args.epochs,
        },
        "rates": {k: {w: stats(v) for w, v in d.items()} for k, d in rates.items()},
        "ratios": {
            k: {w: ratios(rates[k][w], base[w]) for w in args.workers}
            for k in ("shards", "files_1", "files_e")
        },
        "preprocess_seconds": {w: stats(v) for w, v in prep.items()},
        "command": " ".join(["python", "benchmarks/detection_loader.py", *sys.argv[1:]]),
    }


def render(res: dict[str, Any]) -> str:
    s, m = res["settings"], res["machine"]
    e = s["epochs_amortised"]
    lines = [
        "## Detection: loader throughput with box transforms",
        "",
        f"`{res['command']}` on {m['cpu']}, {m['cores']} cores (load {m['load']:.1f} at the "
        f"start), torch {m['torch']}, torchvision {m['torchvision']}, {m['date']}.",
        "",
        f"Decoded + augmented training images/s with their boxes (flip, photometric jitter, "
        f"ToDtype, SanitizeBoundingBoxes; batch {s['batch']}) of {s['images']} Fashion-MNIST "
        f"scenes (PNG, 96–128 px; CocoDetection skips the few without objects, as the reference does); median (min–max) of {s['rounds']} interleaved rounds; ratios "
        "per round against `CocoDetection` + `DataLoader`. *From files*: kubetrain's preprocess "
        f"(same worker count) charged to the training epochs, over 1 and over {e} epochs.",
        "",
        "| workers | CocoDetection | kubetrain, shards | shards / Coco | preprocess (s) "
        f"| from files, 1 epoch / Coco | from files, {e} epochs / Coco |",
        "|---|---|---|---|---|---|---|",
    ]
    for w in res["rates"]["coco"]:
        lines.append(
            f"| {w} | {fmt(res['rates']['coco'][w])} | {fmt(res['rates']['shards'][w])} "
            f"| {fmt(res['ratios']['shards'][w], 2)} | {fmt(res['preprocess_seconds'][w], 1)} "
            f"| {fmt(res['ratios']['files_1'][w], 2)} | {fmt(res['ratios']['files_e'][w], 2)} |"
        )
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--images", type=int, default=6000, help="scenes generated")
    parser.add_argument(
        "--epochs", type=int, default=10, help="epochs the preprocess amortises over"
    )
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 1, 2])
    args = parser.parse_args()
    res = run(args)
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "detection_loader.json").write_text(json.dumps(res, indent=2) + "\n")
    text = render(res)
    (RESULTS / "detection_loader.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
