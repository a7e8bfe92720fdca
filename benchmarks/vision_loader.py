"""Image loader throughput: kubetrain's sharded stream against the loader users write.

Decoded + augmented training images per second at 0/1/2 DataLoader workers, measured side by
side in one run (rounds interleave the loaders, rotating which goes first):

- **ImageFolder**: ``torchvision.datasets.ImageFolder`` + ``DataLoader(batch_size, shuffle=True,
  num_workers)`` with RandomResizedCrop, horizontal flip, ToDtype and Normalize (PIL decode,
  ``ToImage`` first, as torchvision's v2 guide writes it);
- **kubetrain, from shards**: the training split of the sharded dataset that kubetrain's
  preprocess wrote (``build_image_dataset``), streamed as training streams it: a
  ``StreamingDataset`` with ``ImageTransform``/``BatchCollate`` of the same transforms, behind
  ``StreamBatches`` (the trainer's loader: ``data.prefetch`` 4);
- **kubetrain, from the image folder**: the same plus what the preprocess (listing,
  decode-check, stratified split, shards; ``data.num_workers`` processes, the same knob as the
  loader's workers) costs, amortised over the epochs trained on its shards: per epoch,
  ``stream seconds + preprocess seconds / E``. The preprocess also writes the validation and
  test splits and is charged to the training epochs in full. It runs once per dataset version
  (a re-run on unchanged images is a cache hit), so E = ``--epochs`` (default 10) is a short
  training run; E = 1 (preprocess and one epoch) is shown too.

Every loader's epoch starts its worker processes (none is persistent), as a user's does.
One torch thread in the main process (the machine has 2 cores); DataLoader workers use one each.

    .venv-vision/bin/python benchmarks/vision_loader.py [--rounds 3] [--images 12000] [--size 64]

Writes benchmarks/results/vision_loader.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader
from vision_common import (
    RESULTS,
    build_shards,
    fmt,
    image_folder,
    machine,
    ratios,
    stats,
    train_specs,
    user_transform,
)

BATCH = 64


def epoch_imagefolder(folder: Path, workers: int, size: int, epoch: int) -> tuple[int, float]:
    """One epoch of the user's loader: (images, seconds)."""
    from torchvision.datasets import ImageFolder

    dataset = ImageFolder(str(folder), transform=user_transform(size))
    torch.manual_seed(epoch)
    started = time.perf_counter()
    loader = DataLoader(dataset, batch_size=BATCH, shuffle=True, num_workers=workers)
    images = sum(len(y) for _, y in loader)
    return images, time.perf_counter() - started


def epoch_stream(root: Path, workers: int, size: int, epoch: int) -> tuple[int, float]:
    """One epoch of kubetrain's training loader over the shards' train split."""
    from kubetrain.data.streaming import StreamingDataset
    from kubetrain.data.transforms import BatchCollate, ImageTransform
    from kubetrain.tasks.stream import StreamBatches

    dataset = StreamingDataset(
        str(root), "train", BATCH, rank=0, world_size=1, num_workers=workers, seed=0,
        transform=ImageTransform(train_specs(size), "RGB", "data.transforms.train"),
        collate=BatchCollate([], num_classes=10),
    )  # fmt: skip
    batches = StreamBatches(dataset, accum=1, num_workers=workers, prefetch=4)
    started = time.perf_counter()
    batches.set_epoch(epoch)
    images = sum(len(y) for (_,), y in batches)
    return images, time.perf_counter() - started


def run(args: argparse.Namespace) -> dict[str, Any]:
    torch.set_num_threads(1)
    folder = image_folder(args.images, 10, args.min_px, args.max_px)
    work = Path(tempfile.mkdtemp(prefix="kubetrain-vision-loader-"))
    rates: dict[str, dict[int, list[float]]] = {
        k: {w: [] for w in args.workers} for k in ("imagefolder", "shards", "folder_1", "folder_e")
    }
    prep_seconds: dict[int, list[float]] = {w: [] for w in args.workers}
    for r in range(args.rounds):
        for w in args.workers:
            shards = work / f"shards-{w}"
            pre = build_shards(folder, shards, num_workers=w)
            prep_seconds[w].append(pre)
            order = ["imagefolder", "shards"]
            if r % 2:
                order.reverse()
            for which in order:
                if which == "imagefolder":
                    n, sec = epoch_imagefolder(folder, w, args.size, r)
                    rates["imagefolder"][w].append(n / sec)
                else:
                    n, sec = epoch_stream(shards, w, args.size, r)
                    rates["shards"][w].append(n / sec)
                    rates["folder_1"][w].append(n / (sec + pre))
                    rates["folder_e"][w].append(n / (sec + pre / args.epochs))
            print(
                f"round {r + 1}/{args.rounds} workers {w}: ImageFolder "
                f"{rates['imagefolder'][w][-1]:.0f}/s, shards {rates['shards'][w][-1]:.0f}/s, "
                f"preprocess {pre:.1f} s",
                flush=True,
            )
    base = rates["imagefolder"]
    return {
        "machine": machine(),
        "settings": {
            "images": args.images,
            "px": [args.min_px, args.max_px],
            "size": args.size,
            "batch": BATCH,
            "rounds": args.rounds,
            "epochs_amortised": args.epochs,
        },
        "rates": {k: {w: stats(v) for w, v in d.items()} for k, d in rates.items()},
        "ratios": {
            k: {w: ratios(rates[k][w], base[w]) for w in args.workers}
            for k in ("shards", "folder_1", "folder_e")
        },
        "preprocess_seconds": {w: stats(v) for w, v in prep_seconds.items()},
        "command": " ".join(["python", "benchmarks/vision_loader.py", *sys.argv[1:]]),
    }


def render(res: dict[str, Any]) -> str:
    s, m = res["settings"], res["machine"]
    e = s["epochs_amortised"]
    lines = [
        "## Vision: image loader throughput",
        "",
        f"`{res['command']}` on {m['cpu']}, {m['cores']} cores (load {m['load']:.1f} at the "
        f"start), torch {m['torch']}, torchvision {m['torchvision']}, {m['date']}.",
        "",
        f"Decoded + augmented training images/s (RandomResizedCrop {s['size']} px, flip, "
        f"ToDtype, Normalize; batch {s['batch']}) of {s['images']} generated JPEGs "
        f"({s['px'][0]}–{s['px'][1]} px, 10 classes); median (min–max) of {s['rounds']} "
        "interleaved rounds; ratios are per round against ImageFolder. *From the folder*: "
        f"kubetrain's preprocess (same worker count) charged to the training epochs, over 1 "
        f"and over {e} epochs (see `benchmarks/vision_loader.py`).",
        "",
        "| workers | ImageFolder | kubetrain, shards | shards / ImageFolder | preprocess (s) "
        f"| from folder, 1 epoch / ImageFolder | from folder, {e} epochs / ImageFolder |",
        "|---|---|---|---|---|---|---|",
    ]
    for w in res["rates"]["imagefolder"]:
        lines.append(
            f"| {w} | {fmt(res['rates']['imagefolder'][w])} | {fmt(res['rates']['shards'][w])} "
            f"| {fmt(res['ratios']['shards'][w], 2)} | {fmt(res['preprocess_seconds'][w], 1)} "
            f"| {fmt(res['ratios']['folder_1'][w], 2)} | {fmt(res['ratios']['folder_e'][w], 2)} |"
        )
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument(
        "--images",
        type=int,
        default=12000,
        help="JPEGs generated (3000 made an epoch ~1 s on idle cores: worker start-up dominated)",
    )
    parser.add_argument("--min-px", type=int, default=64)
    parser.add_argument("--max-px", type=int, default=96)
    parser.add_argument("--size", type=int, default=64, help="RandomResizedCrop output side")
    parser.add_argument(
        "--epochs", type=int, default=10, help="epochs the preprocess amortises over"
    )
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 1, 2])
    args = parser.parse_args()
    res = run(args)
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "vision_loader.json").write_text(json.dumps(res, indent=2) + "\n")
    text = render(res)
    (RESULTS / "vision_loader.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
