#!/usr/bin/env bash
# Sets up .venv (scripts/setup.sh) and runs the whole test suite, the slow end-to-end tier included.
# Extra arguments go to pytest, e.g. `bash scripts/test.sh -m "not slow"` for the fast tier alone.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
exec .venv/bin/python -m pytest -q -p no:cacheprovider "$@"
