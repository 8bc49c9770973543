#!/usr/bin/env bash
# The test command of the README: installs the test oracles (transformers, peft, bitsandbytes) into .venv,
# then runs every CPU test tier. GPU tests are skipped without CUDA.
set -euo pipefail
cd "$(dirname "$0")/.."
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_DATASETS_OFFLINE=1
.venv/bin/pip install -q -r requirements-dev.txt
exec .venv/bin/python -m pytest -q -p no:cacheprovider "$@"
