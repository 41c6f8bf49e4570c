#!/usr/bin/env bash
# GPU check: a few bfloat16 training steps of T5 v1.1 small and Llama-style small with each attention
# kernel (xla, dot_product_attention, cudnn); prints step time, tokens/s and MFU per configuration.
#   bash bench/gpu_check.sh [--steps 10] [--batch 32] [--lengths 512,128] [--only llama,cudnn] [--tiny]
# Needs jax (with CUDA), flax, optax, orbax-checkpoint, gin-config, numpy; no TensorFlow, no seqio.
# PYTHON picks the interpreter (default: python3).
set -euo pipefail
cd "$(dirname "$0")/.."
if command -v nvidia-smi >/dev/null; then
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
fi
exec "${PYTHON:-python3}" bench/gpu_check.py "$@"
