"""Per-tensor gradient norms of the tiny preset at initialization: what BlockLLM ranks first.

Gradient-norm selection ranks tensors by ``||G||``. At random init the attention query and key
projections get gradients 30-100x smaller than the value/output projections, the MLPs, the
embedding and the head (attention is still nearly uniform, so the loss barely depends on them),
so they are the last to be selected. This script prints the ranking; benchmarks/README.md quotes
it.

    .venv/bin/python benchmarks/grad_norms_at_init.py            # about 10 s on 2 cores
"""

from __future__ import annotations

import argparse

import torch

from blockllm.app.models.presets import build_llama


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="tiny")
    parser.add_argument("--vocab-size", type=int, default=8192)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    torch.manual_seed(args.seed)
    model = build_llama(args.preset, vocab_size=args.vocab_size, max_seq_len=args.seq_len)
    # Uniformly random tokens: at init the model is equally clueless about any text.
    tokens = torch.randint(0, args.vocab_size, (args.batch_size, args.seq_len))
    model(input_ids=tokens, labels=tokens).loss.backward()
    rows = sorted(
        ((param.grad.norm().item(), name, param.numel()) for name, param in model.named_parameters()),
        reverse=True,
    )
    print(f"{args.preset}, vocab {args.vocab_size}, {args.batch_size}x{args.seq_len} random tokens")
    print(f"{'rank':>4}  {'||G||':>9}  {'RMS(G)':>9}  {'size':>9}  tensor")
    for rank, (norm, name, size) in enumerate(rows, start=1):
        print(f"{rank:>4}  {norm:9.4f}  {norm / size**0.5:9.2e}  {size:>9,}  {name}")


if __name__ == "__main__":
    main()
