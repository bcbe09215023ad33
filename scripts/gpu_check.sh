#!/usr/bin/env bash
# The first-GPU check (docs/scaling.md, "First GPU check"): one PASS/FAIL line per check, exit status 1 on any FAIL.
#
#   bash scripts/gpu_check.sh --prepare       here, once (online, herl's .venv): build/gpu-check (~10 MB): pydantic
#                                             wheels for CPython 3.10-3.14 and the SmolLM2 tokenizer files
#   bash scripts/gpu_check.sh                 on the GPU machine (its own python, torch, transformers; no install)
#   bash scripts/gpu_check.sh --device cpu    the same checks on a CPU
#
# Python: $PYTHON, else .venv/bin/python when present, else python3. Other options: python -m benchmarks.gpu_check -h
set -euo pipefail
cd "$(dirname "$0")/.."
if [ -n "${PYTHON:-}" ]; then PY=$PYTHON
elif [ -x .venv/bin/python ]; then PY=.venv/bin/python
else PY=$(command -v python3 || command -v python); fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
exec "$PY" -m benchmarks.gpu_check "$@"
