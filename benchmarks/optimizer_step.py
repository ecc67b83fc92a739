"""BlockLLM vs fused AdamW on llama_60m-shaped tensors, side by side in one process.

Prints three things (and writes them to benchmarks/results/optimizer_step.json):

1. Optimizer-step time on the same selected subset: BlockLLM's ``step()`` after a selection,
   against fused ``torch.optim.AdamW`` over the same whole tensors plus one flat tensor holding as
   many coordinates as BlockLLM's partly selected tensor (so both update exactly the same number
   of coordinates). Target: ratio <= 1.2.
2. Optimizer-state bytes for the whole model: BlockLLM at the given sparsity against AdamW over
   every tensor. Target: about 1 - sparsity.
3. Selection cost: the time the gradient hooks and the packer take on a selection step, and the
   most gradient bytes held while selecting, against a full gradient.

Gradients are random tensors produced by a real autograd backward (loss = sum(p * r)), so the
selection hooks fire exactly as in training, without the cost of a transformer forward.

Usage:
    python benchmarks/optimizer_step.py [--sparsity 0.9] [--repeats 20] [--threads 2]
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import subprocess
import time
from pathlib import Path

import torch

from blockllm import BlockLLM

# GaLore's llama_60m: hidden 512, ffn 1376, 8 layers, vocab 32000, untied head.
HIDDEN, FFN, LAYERS, VOCAB = 512, 1376, 8, 32000


def llama_60m_shapes() -> list[tuple[str, tuple[int, ...]]]:
    shapes = [("model.embed_tokens.weight", (VOCAB, HIDDEN))]
    for layer in range(LAYERS):
        prefix = f"model.layers.{layer}"
        for name in ("q_proj", "k_proj", "v_proj", "o_proj"):
            shapes.append((f"{prefix}.self_attn.{name}.weight", (HIDDEN, HIDDEN)))
        shapes.append((f"{prefix}.mlp.gate_proj.weight", (FFN, HIDDEN)))
        shapes.append((f"{prefix}.mlp.up_proj.weight", (FFN, HIDDEN)))
        shapes.append((f"{prefix}.mlp.down_proj.weight", (HIDDEN, FFN)))
        shapes.append((f"{prefix}.input_layernorm.weight", (HIDDEN,)))
        shapes.append((f"{prefix}.post_attention_layernorm.weight", (HIDDEN,)))
    shapes.append(("model.norm.weight", (HIDDEN,)))
    shapes.append(("lm_head.weight", (VOCAB, HIDDEN)))
    return shapes


def make_params(seed: int) -> dict[str, torch.nn.Parameter]:
    generator = torch.Generator().manual_seed(seed)
    return {
        name: torch.nn.Parameter(torch.randn(shape, generator=generator) * 0.02)
        for name, shape in llama_60m_shapes()
    }


def backward_random_grads(params: dict[str, torch.nn.Parameter], seed: int) -> None:
    """One autograd backward whose gradients are fixed random tensors, one per trainable tensor."""
    generator = torch.Generator().manual_seed(seed)
    loss = torch.zeros(())
    for param in params.values():
        direction = torch.randn(param.shape, generator=generator)
        # Scale tensors differently so the ranking is not a coin toss.
        direction *= 1.0 + 4.0 * torch.rand((), generator=generator)
        if param.requires_grad:
            loss = loss + (param * direction).sum()
    loss.backward()


def state_bytes(optimizer: torch.optim.Optimizer) -> int:
    return sum(
        value.numel() * value.element_size()
        for state in optimizer.state.values()
        for value in state.values()
        if isinstance(value, torch.Tensor)
    )


def timed(fn, repeats: int) -> list[float]:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return times


def git_commit() -> str:
    try:
        return subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=True
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


CANDIDATE_SETS = {
    "all tensors": None,
    "blocks only (embedding and head excluded)": ["model.embed_tokens.weight", "lm_head.weight"],
}


def run(sparsity: float, repeats: int, candidates: str) -> dict:
    # --- BlockLLM: select once from real (random) gradients, then time plain steps.
    params = make_params(seed=0)
    blockllm = BlockLLM(list(params.items()), lr=1e-3, sparsity=sparsity, patience=10**9,
                        exclude=CANDIDATE_SETS[candidates])  # fmt: skip
    started = time.perf_counter()
    backward_random_grads(params, seed=1)
    backward_seconds_selecting = time.perf_counter() - started
    selection_seconds_in_backward = blockllm.selection_seconds
    blockllm.step(loss=1.0)
    selection_seconds = blockllm.selection_seconds
    peak_selection_grad_bytes = blockllm.peak_selection_grad_bytes
    full_grad_bytes = blockllm.num_coordinates * 4
    selected = blockllm.selected
    partial = {n: blockllm.coordinates(n) for n in selected if blockllm.coordinates(n) is not None}
    partial_coords = sum(c.numel() for c in partial.values())

    backward_random_grads(params, seed=2)  # gradients for the selected tensors only
    blockllm_state = state_bytes(blockllm) + sum(c.numel() * c.element_size() for c in partial.values())

    # --- fused AdamW on the same subset: the whole selected tensors, plus one flat tensor with
    # as many coordinates as BlockLLM updates inside its partly selected tensor.
    subset = [
        torch.nn.Parameter(params[n].detach().clone()) for n in selected if n not in partial
    ]
    if partial_coords:
        subset.append(torch.nn.Parameter(torch.zeros(partial_coords)))
    for tensor in subset:
        tensor.grad = torch.randn_like(tensor)
    adamw_subset = torch.optim.AdamW(subset, lr=1e-3, weight_decay=0.0, fused=True)
    adamw_subset.step()  # allocate state outside the timing
    # Interleave the two so that whatever else the machine does hits both alike.
    blockllm_times, adamw_times = [], []
    for _ in range(repeats):
        blockllm_times += timed(lambda: blockllm.step(loss=1.0), 1)
        adamw_times += timed(adamw_subset.step, 1)
    del adamw_subset

    # --- the same, whole tensors only: the partly selected tensor sits the step out (no grad)
    # on both sides, which isolates the per-step overhead from the coordinate gather/scatter.
    whole_subset = subset[:-1] if partial_coords else subset
    whole_blockllm, whole_adamw, unguarded_blockllm, unguarded_adamw = [], [], [], []
    if whole_subset:
        adamw_whole = torch.optim.AdamW(whole_subset, lr=1e-3, weight_decay=0.0, fused=True)
        adamw_whole.step()
        partial_grads = {n: params[n].grad for n in partial}
        for name in partial:
            params[name].grad = None
        for _ in range(repeats):
            whole_blockllm += timed(lambda: blockllm.step(loss=1.0), 1)
            whole_adamw += timed(adamw_whole.step, 1)
        # The NaN/inf guard reads every selected gradient once more; measure without it too.
        blockllm.config = blockllm.config.replace(skip_nonfinite=False)
        for _ in range(repeats):
            unguarded_blockllm += timed(lambda: blockllm.step(loss=1.0), 1)
            unguarded_adamw += timed(adamw_whole.step, 1)
        blockllm.config = blockllm.config.replace(skip_nonfinite=True)
        for name, grad in partial_grads.items():
            params[name].grad = grad
        del adamw_whole
    del subset

    # --- fused AdamW over the whole model: state bytes and a full step for scale.
    full = make_params(seed=0)
    for name in CANDIDATE_SETS[candidates] or []:
        full.pop(name)  # AdamW over the same candidate set
    for tensor in full.values():
        tensor.grad = torch.randn_like(tensor)
    adamw_full = torch.optim.AdamW(full.values(), lr=1e-3, weight_decay=0.0, fused=True)
    adamw_full.step()
    adamw_full_times = timed(adamw_full.step, max(3, repeats // 4))
    adamw_full_state = state_bytes(adamw_full)

    total = blockllm.num_coordinates
    blockllm_median = statistics.median(blockllm_times)
    adamw_median = statistics.median(adamw_times)
    return {
        "shapes": "llama_60m (h512, ffn1376, 8 layers, vocab 32000, untied head)",
        "sparsity": sparsity,
        "candidates": candidates,
        "total_coordinates": total,
        "budget": blockllm.budget,
        "num_selected": blockllm.num_selected,
        "selected_tensors": len(selected),
        "partly_selected": {n: int(c.numel()) for n, c in partial.items()},
        "step_seconds_blockllm": blockllm_median,
        "step_seconds_adamw_same_subset": adamw_median,
        "step_time_ratio": blockllm_median / adamw_median,
        "step_seconds_adamw_full_model": statistics.median(adamw_full_times),
        "whole_tensors_step_time_ratio_without_nonfinite_guard": (
            statistics.median(unguarded_blockllm) / statistics.median(unguarded_adamw)
            if unguarded_blockllm
            else None
        ),
        "whole_tensors_step_time_ratio": (
            statistics.median(whole_blockllm) / statistics.median(whole_adamw)
            if whole_blockllm
            else None
        ),
        "state_bytes_blockllm": blockllm_state,
        "state_bytes_adamw_full_model": adamw_full_state,
        "state_bytes_ratio": blockllm_state / adamw_full_state,
        "selection_seconds": selection_seconds,
        "selection_seconds_in_backward_hooks": selection_seconds_in_backward,
        "backward_seconds_on_selection_step": backward_seconds_selecting,
        "peak_selection_grad_bytes": peak_selection_grad_bytes,
        "full_gradient_bytes": full_grad_bytes,
        "environment": {
            "torch": torch.__version__,
            "threads": torch.get_num_threads(),
            "cpu": platform.processor() or platform.machine(),
            "python": platform.python_version(),
            "git_commit": git_commit(),
            "repeats": repeats,
        },
    }


def print_table(result: dict) -> None:
    mib = 1024**2
    rows = [
        ("coordinates (N) / budget (k)", f"{result['total_coordinates']:,} / {result['budget']:,}"),
        ("selected tensors (partly selected)",
         f"{result['selected_tensors']} ({', '.join(result['partly_selected']) or 'none'})"),
        ("step time, BlockLLM (ms)", f"{1e3 * result['step_seconds_blockllm']:.2f}"),
        ("step time, fused AdamW on the same subset (ms)",
         f"{1e3 * result['step_seconds_adamw_same_subset']:.2f}"),
        ("step time ratio BlockLLM / AdamW (target <= 1.2)", f"{result['step_time_ratio']:.3f}"),
        ("same, whole tensors only (partly selected one sits out)",
         "n/a" if result["whole_tensors_step_time_ratio"] is None
         else f"{result['whole_tensors_step_time_ratio']:.3f}"),
        ("same, without the NaN/inf guard (skip_nonfinite=False)",
         "n/a" if result["whole_tensors_step_time_ratio_without_nonfinite_guard"] is None
         else f"{result['whole_tensors_step_time_ratio_without_nonfinite_guard']:.3f}"),
        ("step time, fused AdamW on all candidates (ms)",
         f"{1e3 * result['step_seconds_adamw_full_model']:.2f}"),
        ("optimizer state, BlockLLM (MiB)", f"{result['state_bytes_blockllm'] / mib:.1f}"),
        ("optimizer state, AdamW same candidates (MiB)", f"{result['state_bytes_adamw_full_model'] / mib:.1f}"),
        ("state bytes ratio (target about 1 - sparsity)", f"{result['state_bytes_ratio']:.4f}"),
        ("selection time (ms)", f"{1e3 * result['selection_seconds']:.2f}"),
        ("selection time / full AdamW step",
         f"{result['selection_seconds'] / result['step_seconds_adamw_full_model']:.3f}"),
        ("peak gradient held while selecting (MiB)", f"{result['peak_selection_grad_bytes'] / mib:.1f}"),
        ("full gradient of the candidates, never held (MiB)", f"{result['full_gradient_bytes'] / mib:.1f}"),
    ]  # fmt: skip
    width = max(len(label) for label, _ in rows)
    print(f"BlockLLM vs fused AdamW, {result['shapes']}, sparsity {result['sparsity']}, "
          f"candidates: {result['candidates']}")  # fmt: skip
    print(f"torch {result['environment']['torch']}, {result['environment']['threads']} threads, "
          f"commit {result['environment']['git_commit']}")  # fmt: skip
    for label, value in rows:
        print(f"  {label:<{width}}  {value}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sparsity", type=float, default=0.9)
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument(
        "--output", type=Path, default=Path(__file__).parent / "results" / "optimizer_step.json"
    )
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    results = [
        run(sparsity, args.repeats, candidates)
        for candidates in CANDIDATE_SETS
        for sparsity in sorted({args.sparsity, 0.95})
    ]
    for result in results:
        print_table(result)
        print()
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(results, indent=2) + "\n")
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
