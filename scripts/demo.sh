#!/usr/bin/env bash
# One command: set up, then run the main job on the embedded SmolLM2-135M-Instruct — layer pairs 20:24 (30 -> 28
# layers), exported to ONNX with an explicit KV cache and validated against PyTorch. Output: out/smollm2-135m-lp20-24.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
. .venv/bin/activate
layerpair-export smollm2-135m --pairs 20:24 -o out/smollm2-135m-lp20-24 --force "$@"
