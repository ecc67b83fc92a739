#!/usr/bin/env bash
# Install (scripts/setup.sh), then run the test suite offline. Slow benchmark tests are behind
# the `slow` marker and not part of this run: `.venv/bin/python -m pytest -m slow` runs them.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
exec .venv/bin/python -m pytest "$@"
