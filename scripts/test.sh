#!/usr/bin/env bash
# One command: set up with the test extras, then lint, type-check and run the whole test suite.
set -euo pipefail
cd "$(dirname "$0")/.."
EXTRAS=dev,trt-rtx scripts/setup.sh
. .venv/bin/activate
ruff check layerpair tests benchmarks
ruff format --check layerpair tests benchmarks
mypy layerpair
python -m pytest -q -rs "$@"
