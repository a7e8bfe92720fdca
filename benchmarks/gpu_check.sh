#!/usr/bin/env bash
# One short GPU check (≤ 5 minutes on one NVIDIA GPU): bf16 vs fp32/TF32 training throughput and
# MFU of a small GPT on synthetic tokens (benchmarks/results/gpu.{json,md}); then the language
# part: MFU of the built-in ~110M-parameter encoder-decoder in bf16 through kubetrain's training
# step, eager and compiled (benchmarks/results/gpu_text.{json,md}).
# Needs torch with CUDA and this package importable (pip install -e . or PYTHONPATH=src).
set -euo pipefail
cd "$(dirname "$0")/.."
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
export PYTHONPATH="${PYTHONPATH:+$PYTHONPATH:}$PWD/src"
timeout 300 python3 benchmarks/gpu_check.py "$@"
# Language part (benchmarks/text_gpu.py; --smoke: a tiny size on the CPU).
timeout 240 python3 benchmarks/text_gpu.py "$@"
