"""Bytes all-reduced per step and step time: BlockLLM(process_group) vs AdamW under DDP.

Two CPU processes (gloo) train the `tiny` Llama shape (hidden 256, 4 layers, vocab 8192, untied
head; built from a config, random tokens) for the same number of steps, each rank on its own
batch. AdamW runs under DistributedDataParallel, which all-reduces every gradient each step;
BlockLLM runs without DDP and averages what it uses: with the frozen rule (``blockllm-frozen``,
``rest="none"``) the selected gradients (every candidate on a selection step); with the default
rest rule every gradient, one tensor at a time as it lands, since every weight takes a step.
"Bytes" is the payload handed to all-reduce per rank and step (a ring all-reduce moves about
2 (W-1)/W times that over the wire, the same factor for both).

Usage:
    python benchmarks/distributed_comm.py [--steps 40] [--sparsity 0.9] [--patience 10]
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from transformers import LlamaConfig, LlamaForCausalLM

from blockllm import BlockLLM

VOCAB, BATCH, SEQ = 8192, 8, 128


def build_model() -> LlamaForCausalLM:
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=VOCAB, hidden_size=256, intermediate_size=688, num_hidden_layers=4,
        num_attention_heads=4, max_position_embeddings=SEQ, tie_word_embeddings=False,
    )  # fmt: skip
    return LlamaForCausalLM(config)


def worker(rank: int, world: int, store: str, method: str, args: dict, out: str) -> None:
    torch.set_num_threads(1)  # two processes share two cores
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    try:
        model = build_model()
        if method == "adamw-ddp":
            net = torch.nn.parallel.DistributedDataParallel(model)
            opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.0, fused=True)
            per_step_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
        else:
            net = model
            rest = {"rest": "none"} if method == "blockllm-frozen" else {}
            opt = BlockLLM(model.named_parameters(), lr=1e-3, sparsity=args["sparsity"],
                           patience=args["patience"], process_group=dist.group.WORLD,
                           **rest)  # fmt: skip
        generator = torch.Generator().manual_seed(1000 + rank)
        times, step_bytes = [], []
        for _ in range(args["steps"]):
            before = opt.communicator.bytes_communicated if isinstance(opt, BlockLLM) else 0
            tokens = torch.randint(0, VOCAB, (BATCH, SEQ), generator=generator)
            started = time.perf_counter()
            loss = net(input_ids=tokens, labels=tokens).loss
            loss.backward()
            if isinstance(opt, BlockLLM):
                opt.step(loss=loss)
            else:
                opt.step()
            opt.zero_grad(set_to_none=True)
            times.append(time.perf_counter() - started)
            if isinstance(opt, BlockLLM):
                step_bytes.append(opt.communicator.bytes_communicated - before)
        if isinstance(opt, BlockLLM):
            total_bytes = opt.communicator.bytes_communicated
            reselections = opt.num_reselections
        else:
            total_bytes = per_step_bytes * args["steps"]
            reselections = 0
            step_bytes = [per_step_bytes] * args["steps"]
        if rank == 0:
            result = {
                "method": method,
                "bytes_per_step": total_bytes / args["steps"],
                "median_bytes_per_step": statistics.median(step_bytes),
                "median_step_seconds": statistics.median(times[2:]),
                "reselections": reselections,
            }
            Path(out).write_text(json.dumps(result))
    finally:
        dist.destroy_process_group()


def run(method: str, args: dict) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        out = str(Path(tmp) / "result.json")
        mp.start_processes(
            worker, args=(2, str(Path(tmp) / "store"), method, args, out), nprocs=2,
            start_method="spawn",
        )  # fmt: skip
        return json.loads(Path(out).read_text())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--sparsity", type=float, default=0.9)
    parser.add_argument("--patience", type=int, default=10)
    parser.add_argument(
        "--output", type=Path,
        default=Path(__file__).parent / "results" / "distributed_comm.json",
    )  # fmt: skip
    args = parser.parse_args()
    settings = {"steps": args.steps, "sparsity": args.sparsity, "patience": args.patience}
    adamw = run("adamw-ddp", settings)
    rows = [run(method, settings) for method in ("blockllm", "blockllm-frozen")]
    print(f"2 processes (gloo, CPU), tiny Llama shape, {args.steps} steps, batch {BATCH}x{SEQ} "
          f"per rank, BlockLLM sparsity {args.sparsity}, patience {args.patience}")  # fmt: skip
    for row in (adamw, *rows):
        print(f"  {row['method']:<15} all-reduced {row['bytes_per_step'] / 2**20:8.2f} MiB/step on "
              f"average, {row['median_bytes_per_step'] / 2**20:8.2f} MiB on a median step, "
              f"median step {1e3 * row['median_step_seconds']:7.1f} ms, "
              f"{row['reselections']} reselections")  # fmt: skip
    for row in rows:
        print(f"  {row['method']} / AdamW: bytes {row['bytes_per_step'] / adamw['bytes_per_step']:.3f} "
              f"on average, {row['median_bytes_per_step'] / adamw['median_bytes_per_step']:.3f} "
              f"on an ordinary step; step time "
              f"{row['median_step_seconds'] / adamw['median_step_seconds']:.3f}")  # fmt: skip
    print(f"  (frozen rule: target about 1 - sparsity = {1 - args.sparsity:.2f} on an ordinary "
          "step, a selection step averages every candidate; rest rule: every gradient, each "
          "step)")  # fmt: skip
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps({"settings": settings, "results": [adamw, *rows]}, indent=2) + "\n")


if __name__ == "__main__":
    main()
