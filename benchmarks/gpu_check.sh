#!/usr/bin/env bash
# One short GPU check (≤ 5 minutes on one NVIDIA GPU): bf16 vs fp32/TF32 training throughput and
# MFU of a small GPT on synthetic tokens. Writes benchmarks/results/gpu.{json,md}.
# Needs torch with CUDA and this package importable (pip install -e . or PYTHONPATH=src).
set -euo pipefail
cd "$(dirname "$0")/.."
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
export PYTHONPATH="${PYTHONPATH:+$PYTHONPATH:}$PWD/src"
timeout 300 python3 benchmarks/gpu_check.py "$@"
