#!/usr/bin/env bash
# The GPU part of the benchmark issue (#4): llama-60m and llama-130m pretrained in bf16 with AdamW,
# BlockLLM, GaLore and BAdam, each method in its own process, with the peak GPU memory of each
# (torch.cuda.max_memory_allocated, `peak_gpu_bytes` in the records). Sized to finish inside 8
# minutes on one H200: 300 steps (llama-60m) and 200 steps (llama-130m) of 32 x 256 tokens.
#
# Usage: bash benchmarks/gpu.sh [OUTPUT_DIR]      (default: benchmarks/results/gpu-<date>-<time>)
#
# Environment (all optional):
#   PYTHON       a Python whose torch sees CUDA (default: .venv/bin/python when its torch does,
#                else python3)
#   SETUP=1      first create .venv with scripts/setup.sh; give TORCH_SPEC the CUDA build, e.g.
#                TORCH_SPEC="torch==2.13.0 --index-url https://download.pytorch.org/whl/cu128"
#   WHEELS=DIR   wheels to install offline first (badam, galore-torch, ... for a machine without
#                network); peers that stay missing are recorded as skipped, with their pip line
#   STEPS=N      steps per method for both models (a smoke test: STEPS=5)
#   GPU_METHODS  comma-separated entries of each suite to run (default: adamw,blockllm,galore,badam,
#                the first round's four, which took 227 s for both suites; "all" runs every entry,
#                the CPU suites' tuned points too: about twice that)
#   GPU_SUITES   the suites to run, in order (default: "gpu-60m gpu-130m"); "gpu-memory" is
#                llama-1b at 8 x 256 for 20 steps, every method with and without activation
#                checkpointing (issue 14; give it a call of its own), with `blockllm estimate`
#                of the same steps written beside the measured peaks (estimate-*.json)
#
# Before spending device time: `.venv/bin/python -m pytest -m slow
# tests/app/bench/test_gpu_suites_on_cpu.py` runs every entry of the three suites through the
# same bench on a CPU at tiny size (about 3 minutes on two cores), so a bad flag shows here.
#
# Nothing here is needed by the tests; it only reads the repository and writes OUTPUT_DIR.
set -euo pipefail
cd "$(dirname "$0")/.."

OUTPUT="${1:-benchmarks/results/gpu-$(date +%Y%m%d-%H%M%S)}"
started=$(date +%s)

if [ "${SETUP:-0}" = "1" ]; then
    EXTRAS="dev,bench" bash scripts/setup.sh
fi

has_cuda() { "$1" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)' 2>/dev/null; }
if [ -z "${PYTHON:-}" ]; then
    if [ -x .venv/bin/python ] && has_cuda .venv/bin/python; then
        PYTHON=.venv/bin/python
    else
        PYTHON=python3
    fi
fi
if ! has_cuda "$PYTHON"; then
    echo "gpu.sh: $PYTHON has no CUDA-enabled torch that sees a GPU; set PYTHON, or SETUP=1 with a CUDA TORCH_SPEC" >&2
    exit 1
fi

# blockllm from this checkout, whether or not it is installed in that Python; the bench's
# children are started with the same interpreter and inherit PYTHONPATH.
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"
if [ -n "${WHEELS:-}" ]; then
    site="$(mktemp -d)"
    "$PYTHON" -m pip install --quiet --no-index --no-deps --no-compile --target "$site" "$WHEELS"/*.whl
    export PYTHONPATH="$PYTHONPATH:$site"
fi
missing=$("$PYTHON" - <<'EOF'
import importlib.util
needed = ["transformers", "tokenizers", "safetensors", "matplotlib"]
print(" ".join(name for name in needed if importlib.util.find_spec(name) is None))
EOF
)
if [ -n "$missing" ]; then
    echo "gpu.sh: $PYTHON lacks: $missing (pip install -e \".[cli]\", or WHEELS=DIR)" >&2
    exit 1
fi

export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 PYTHONUNBUFFERED=1
"$PYTHON" -c 'import torch; print("torch", torch.__version__, "on", torch.cuda.get_device_name(0))'
mkdir -p "$OUTPUT"
status=0
SUITES_TO_RUN="${GPU_SUITES:-gpu-60m gpu-130m}"
METHODS="${GPU_METHODS:-adamw,blockllm,galore,badam}"
for suite in $SUITES_TO_RUN; do
    # One suite failing to start (a bad output dir) must not cost the other its run.
    # gpu-memory has entries of its own: it runs them all unless GPU_METHODS names some.
    methods="$METHODS"
    if [ "$methods" = "all" ] || { [ "$suite" = "gpu-memory" ] && [ -z "${GPU_METHODS:-}" ]; }; then
        methods=""
    fi
    "$PYTHON" -m blockllm bench --suite "$suite" --output-dir "$OUTPUT/$suite" \
        ${methods:+--methods "$methods"} ${STEPS:+--steps "$STEPS"} || status=1
    if [ "$suite" = "gpu-memory" ]; then
        # The planner's estimate of the same steps beside the measured peaks (seconds, no GPU
        # used), so that one lent GPU also checks `blockllm estimate` on llama-1b.
        for precision in bf16 bf16-pure; do
            for checkpointing in "" --gradient-checkpointing; do
                "$PYTHON" -m blockllm estimate --model llama-1b --batch-size 8 --seq-len 256 \
                    --precision "$precision" $checkpointing --json \
                    > "$OUTPUT/$suite/estimate-$precision${checkpointing:+-ckpt}.json" || status=1
            done
        done
    fi
done
echo "gpu.sh: finished in $(( $(date +%s) - started )) s; results in $OUTPUT/{${SUITES_TO_RUN// /,}}"
exit "$status"
