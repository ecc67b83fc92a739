"""Column sums of squares on this CPU: ``vector_norm(dim=0)`` against the factored rule's slices.

The factored rest rule needs, every step, the mean of ``g**2`` down each column of the
embedding and head gradients. This times torch's strided reduction against the row-slice sum
the rule uses (``blockllm.selection.rest_rules._sums_of_squares``, which takes the row sums in
the same pass, so the ratio understates the column sums' own gain), on vocabulary-shaped
matrices, one thread, median of repeats, and prints the ratio.

    .venv/bin/python benchmarks/column_sums.py [--threads 1] [--repeats 5]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from blockllm.selection.rest_rules import _sums_of_squares

# (rows, columns): tiny's head, llama-20m's and llama-350m's embedding, MiniLM's embedding.
SHAPES = ((8192, 256), (32000, 256), (32000, 1024), (30522, 384))


def median_ms(fn, repeats: int) -> float:
    fn()  # warm-up: first-touch allocation is not what is being compared
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e3


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    print(f"torch {torch.__version__}, {args.threads} thread(s), median of {args.repeats}")
    print(f"{'shape':>14}  {'vector_norm(dim=0)':>18}  {'row slices':>10}  ratio")
    for shape in SHAPES:
        matrix = torch.randn(shape)
        strided = median_ms(lambda m=matrix: torch.linalg.vector_norm(m, dim=0).square_(), args.repeats)
        sliced = median_ms(lambda m=matrix: _sums_of_squares(m), args.repeats)
        label = f"{shape[0]} x {shape[1]}"
        print(f"{label:>14}  {strided:15.1f} ms  {sliced:7.1f} ms  {strided / sliced:5.1f}x")


if __name__ == "__main__":
    main()
