"""BlockLLM in a plain PyTorch loop, side by side with AdamW, on a tiny Llama built from a config.

Runs offline in about a minute on two CPU cores:

    python examples/quickstart.py

The data is a synthetic counting task (each sequence counts upward by a random stride), so the
loss has somewhere to go without any download. `blockllm demo` (the CLI) does the same on real
text with the embedded corpus.
"""

from __future__ import annotations

import time

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from blockllm import BlockLLM

VOCAB, STEPS, BATCH, SEQ = 256, 150, 16, 48


def build_model() -> LlamaForCausalLM:
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=VOCAB, hidden_size=96, intermediate_size=256, num_hidden_layers=3,
        num_attention_heads=4, max_position_embeddings=SEQ, tie_word_embeddings=False,
    )  # fmt: skip
    return LlamaForCausalLM(config)


def batches(seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    for _ in range(STEPS):
        start = torch.randint(0, VOCAB, (BATCH, 1), generator=generator)
        stride = torch.randint(1, 8, (BATCH, 1), generator=generator)
        yield (start + stride * torch.arange(SEQ)) % VOCAB


def train(name: str) -> dict:
    model = build_model()
    if name == "adamw":
        optimizer = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=0.0, fused=True)
    else:
        optimizer = BlockLLM(model.named_parameters(), lr=2e-3, sparsity=0.9, patience=20)
    peak_state = peak_grads = 0
    losses = []
    started = time.perf_counter()
    for tokens in batches():
        loss = model(input_ids=tokens, labels=tokens).loss
        loss.backward()
        grads = sum(p.grad.numel() * 4 for p in model.parameters() if p.grad is not None)
        if isinstance(optimizer, BlockLLM):
            optimizer.step(loss=loss)
        else:
            optimizer.step()
        state = sum(
            t.numel() * t.element_size()
            for s in optimizer.state.values()
            for t in s.values()
            if isinstance(t, torch.Tensor)
        )
        peak_state, peak_grads = max(peak_state, state), max(peak_grads, grads)
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
    seconds = time.perf_counter() - started
    return {
        "method": name,
        "final loss (mean of last 20)": sum(losses[-20:]) / 20,
        "optimizer state MiB": peak_state / 2**20,
        "gradient MiB (peak)": peak_grads / 2**20,
        "tokens/s": STEPS * BATCH * SEQ / seconds,
        "reselections": getattr(optimizer, "num_reselections", 0),
    }


def main() -> None:
    rows = [train("adamw"), train("blockllm")]
    keys = list(rows[0])
    print(" | ".join(f"{k:>28}" for k in keys))
    for row in rows:
        print(
            " | ".join(
                f"{v:>28.3f}" if isinstance(v, float) else f"{v!s:>28}" for v in row.values()
            )
        )


if __name__ == "__main__":
    main()
