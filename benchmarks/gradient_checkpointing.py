"""What ``--gradient-checkpointing`` costs in speed and saves in memory, against ``blockllm estimate``.

Runs ``python -m blockllm pretrain`` on the ``tiny`` preset (the demo's setting: BPE 8192 on the
first 3M characters of the standard library, batch 16 x 128, fp32) with AdamW and BlockLLM, each
with and without ``--gradient-checkpointing``, every run in its own process so that each peak RSS
is its own, in rounds (the four runs take turns) so that a machine that gets busier or quieter
affects them alike. From each run's ``summary.json`` (the training loop's memory tracker):
``tokens_per_s`` and the training memory, peak RSS less the RSS just before the first step. Next
to it, what ``blockllm estimate`` says of the same step (its activations, with and without
checkpointing).

    .venv/bin/python benchmarks/gradient_checkpointing.py             # about 5 min on 2 cores
    .venv/bin/python benchmarks/gradient_checkpointing.py --steps 10 --rounds 1   # a quick look

Writes ``benchmarks/results/gradient_checkpointing.json``.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

from blockllm.app.planning import EstimateSettings, estimate_memory

RESULTS = Path(__file__).parent / "results" / "gradient_checkpointing.json"
METHODS = ("adamw", "blockllm")
SETTING = ["--model", "tiny", "--max-chars", "3000000", "--batch-size", "16", "--seq-len", "128",
           "--precision", "fp32", "--eval-every", "0", "--eval-batches", "1", "--save-every", "-1",
           "--no-tensorboard", "--progress", "off", "--log-level", "warning"]  # fmt: skip


def pretrain(output: Path, cache: Path, steps: int, threads: int, *extra: str) -> dict:
    command = [sys.executable, "-m", "blockllm", "pretrain", *SETTING, "--max-steps", str(steps),
               "--threads", str(threads), "--output-dir", str(output), "--cache-dir", str(cache),
               *extra]  # fmt: skip
    subprocess.run(command, check=True, stdout=subprocess.DEVNULL)
    return json.loads((output / "summary.json").read_text())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=30, help="training steps per run")
    parser.add_argument("--rounds", type=int, default=2, help="runs of each configuration")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()

    runs: dict[str, list[dict]] = {}
    with tempfile.TemporaryDirectory() as scratch:
        root, cache = Path(scratch), Path(scratch) / "cache"
        # The tokenizer is trained once here, so that no measured run pays for it.
        pretrain(root / "warmup", cache, 1, args.threads)
        for round_index in range(args.rounds):
            for method in METHODS:
                for checkpointing in (False, True):
                    label = method + (" + checkpointing" if checkpointing else "")
                    flags = ["--optimizer", method]
                    if checkpointing:
                        flags.append("--gradient-checkpointing")
                    output = root / f"round{round_index}-{label.replace(' + ', '-')}"
                    summary = pretrain(output, cache, args.steps, args.threads, *flags)
                    runs.setdefault(label, []).append(summary)
    vocab = runs["adamw"][0]["info"]["vocab_size"]

    rows = []
    for label, summaries in runs.items():
        memory = [s["memory"]["peak_rss_bytes"] - s["memory"]["baseline_rss_bytes"] for s in summaries]
        rows.append({
            "run": label,
            "tokens_per_s": statistics.median(s["tokens_per_s"] for s in summaries),
            "training_memory_bytes": min(memory),  # the least noisy: allocator slack only adds
            "peak_rss_bytes": min(s["memory"]["peak_rss_bytes"] for s in summaries),
        })  # fmt: skip
    settings = dict(batch_size=16, seq_len=128, precision="fp32")
    plan = estimate_memory("tiny", EstimateSettings(**settings), list(METHODS), vocab_size=vocab)
    estimate = {row.method: row for row in plan.rows}

    print(f"tiny (vocab {vocab}), batch 16 x 128, fp32, {args.steps} steps, {args.threads} "
          f"threads, {args.rounds} round(s); torch {torch.__version__}, {platform.machine()}")  # fmt: skip
    print(f"{'run':<28}{'tokens/s':>10}{'training memory':>18}{'estimate: activations':>24}")
    for row in rows:
        method, checkpointing = row["run"].split(" + ")[0], "checkpointing" in row["run"]
        est = estimate[method]
        activations = est.activations_checkpointed if checkpointing else est.activations
        row["estimated_activations_bytes"] = activations
        print(f"{row['run']:<28}{row['tokens_per_s']:>10,.0f}"
              f"{row['training_memory_bytes'] / 1e6:>15.1f} MB{activations / 1e6:>21.1f} MB")  # fmt: skip
    by_run = {row["run"]: row for row in rows}
    for method in METHODS:
        plain, checkpointed = by_run[method], by_run[method + " + checkpointing"]
        speed = checkpointed["tokens_per_s"] / plain["tokens_per_s"]
        saved = plain["training_memory_bytes"] - checkpointed["training_memory_bytes"]
        expected = estimate[method].activations - estimate[method].activations_checkpointed
        print(f"{method}: checkpointing runs at {speed:.2f}x the tokens/s and saves "
              f"{saved / 1e6:.1f} MB of training memory (estimate: {expected / 1e6:.1f} MB)")  # fmt: skip
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps({"steps": args.steps, "rounds": args.rounds,
                                   "threads": args.threads, "torch": torch.__version__,
                                   "rows": rows}, indent=2) + "\n")  # fmt: skip


if __name__ == "__main__":
    main()
