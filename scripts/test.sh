#!/usr/bin/env bash
# One command: set up with the test extras, then lint, type-check and run the whole test suite.
set -euo pipefail
cd "$(dirname "$0")/.."
EXTRAS=dev,trt-rtx,triton,bench,eval scripts/setup.sh
. .venv/bin/activate
# A real Triton server for the end-to-end serving test (python backend only). Kept out of the venv: its
# metadata pins numpy<2, which the project does not use; the test only runs its tritonserver binary.
if [ ! -x .cache/pytriton/pytriton/tritonserver/bin/tritonserver ]; then
  python -m pip install -q --no-deps --target .cache/pytriton nvidia-pytriton==0.7.0 2> >(grep -v "^WARNING: Location" >&2)
fi
export LAYERPAIR_TRITONSERVER_DIR="$PWD/.cache/pytriton/pytriton/tritonserver"
# lm-evaluation-harness API modules for the adapter test (its task dependencies are not needed there, and the
# project does not depend on it): also kept out of the venv.
if [ ! -d .cache/lm_eval/lm_eval ]; then
  python -m pip install -q --no-deps --target .cache/lm_eval lm_eval==0.4.13 2> >(grep -v "^WARNING: Location" >&2)
fi
export LAYERPAIR_LM_EVAL_DIR="$PWD/.cache/lm_eval"
ruff check layerpair tests benchmarks
ruff format --check layerpair tests benchmarks
mypy layerpair
python -m pytest -q -rs -n 2 --dist loadgroup "$@"
