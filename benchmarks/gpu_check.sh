#!/usr/bin/env bash
# Short GPU checks on one NVIDIA GPU (≤ 5 minutes each): bf16 vs fp32/TF32 training throughput and
# MFU of a small GPT on synthetic tokens (benchmarks/results/gpu.{json,md}); then the language
# part: MFU of the built-in ~110M-parameter encoder-decoder in bf16 through kubetrain's training
# step, eager and compiled (benchmarks/results/gpu_text.{json,md}); then the vision part (below).
# Needs torch with CUDA and this package importable (pip install -e . or PYTHONPATH=src).
set -euo pipefail
cd "$(dirname "$0")/.."
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
export PYTHONPATH="${PYTHONPATH:+$PYTHONPATH:}$PWD/src"
timeout 300 python3 benchmarks/gpu_check.py "$@"
# Language part (benchmarks/text_gpu.py; --smoke: a tiny size on the CPU).
timeout 240 python3 benchmarks/text_gpu.py "$@"

# Vision (≤ 5 minutes): ResNet-50, bf16, channels_last, one GPU, fed by kubetrain's loader
# (sharded stream, decode + RandomResizedCrop + flip + normalise in DataLoader workers, pinned
# memory) through kubetrain's fit, beside a hand-written loop on the same stream; fails if
# kubetrain's data-wait share is above 5 %. Two epochs of about 60 steps (~22 000 generated JPEGs,
# 224-288 px, 10 classes); the second is measured, its loader workers' start included, as in
# every epoch (real epochs are longer). Float batches in flight live in
# /dev/shm (workers x prefetch x batch x 3 x size^2 x 4 bytes: ~3.7 GB at the defaults).
# Writes benchmarks/results/gpu_vision.{json,md}. Knobs (environment): VISION_WORKERS (default:
# cores - 2, at most 12), VISION_SIZE (crop side, 224), VISION_BATCH (256).
if python3 -c "import torch, torchvision; assert torch.cuda.is_available()" 2>/dev/null; then
  df -h /dev/shm | tail -1 || true
  cores=$(nproc)
  workers=${VISION_WORKERS:-$(( cores > 14 ? 12 : (cores > 3 ? cores - 2 : 1) ))}
  timeout 300 python3 benchmarks/vision_train.py --device cuda --model resnet50 --precision bf16 \
    --size "${VISION_SIZE:-224}" --batch "${VISION_BATCH:-256}" --steps 60 --min-px 224 \
    --max-px 288 --workers "$workers" --prefetch 2 --rounds 1 --threads 2 --tag gpu_vision \
    --max-data-wait 0.05
else
  echo "vision part skipped: no CUDA device, or torchvision not importable (pip install -e '.[vision]')"
fi

# Detection (≤ 5 minutes): a ResNet-50 FPN Faster R-CNN (v2) at 640 px, bf16, one GPU, fed by
# kubetrain's loader (sharded Fashion-MNIST scenes, box transforms in DataLoader workers) through
# kubetrain's fit, beside torchvision's reference loop on the same stream: images/s and
# data-wait. Writes benchmarks/results/gpu_detection.{json,md}.
if python3 -c "import torch, torchvision, pycocotools; assert torch.cuda.is_available()" 2>/dev/null; then
  cores=$(nproc)
  workers=${DETECTION_WORKERS:-$(( cores > 10 ? 8 : (cores > 3 ? cores - 2 : 1) ))}
  timeout 300 python3 benchmarks/detection_train.py --device cuda --precision bf16 \
    --model torchvision:fasterrcnn_resnet50_fpn_v2 \
    --model-kwargs '{"min_size": 640, "max_size": 640}' --batch "${DETECTION_BATCH:-16}" \
    --steps 40 --workers "$workers" --prefetch 2 --rounds 1 --threads 2 --tag gpu_detection
else
  echo "detection part skipped: no CUDA device, or torchvision/pycocotools not importable"
fi
