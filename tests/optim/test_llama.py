"""A real (tiny) transformers Llama learns with 10% of its coordinates trainable at a time."""

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from blockllm import BlockLLM
from tests.optim.helpers import expected_state_bytes


def tiny_llama(vocab: int = 128) -> LlamaForCausalLM:
    config = LlamaConfig(
        vocab_size=vocab, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=64,
        tie_word_embeddings=False,
    )  # fmt: skip
    torch.manual_seed(0)
    return LlamaForCausalLM(config)


def patterned_batches(count: int, vocab: int = 128, batch: int = 8, seq: int = 32):
    # Each sequence counts upward by a random stride: predictable from context, not memorised.
    generator = torch.Generator().manual_seed(0)
    for _ in range(count):
        start = torch.randint(0, vocab, (batch, 1), generator=generator)
        stride = torch.randint(1, 4, (batch, 1), generator=generator)
        yield (start + stride * torch.arange(seq)) % vocab


def test_tiny_llama_reaches_a_clearly_lower_loss_at_sparsity_0_9():
    model = tiny_llama()
    opt = BlockLLM(model.named_parameters(), lr=3e-3, sparsity=0.9, patience=10)
    assert opt.num_candidates == len(list(model.parameters()))
    losses = []
    for tokens in patterned_batches(150):
        loss = model(input_ids=tokens, labels=tokens).loss
        loss.backward()
        opt.step(loss=loss)
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
        assert opt.num_selected <= opt.budget
    start, end = sum(losses[:10]) / 10, sum(losses[-10:]) / 10
    assert end < start - 1.5, (start, end)
    assert opt.num_reselections >= 1
    report = opt.memory_report()
    # Exactly the budget's moments, step counters and row ids (no bound to sit on the edge of),
    # which at sparsity 0.9 is about a tenth of AdamW's 2 x params.
    assert report["optimizer_state"] == expected_state_bytes(opt)
    assert opt.num_selected <= opt.budget
    assert report["optimizer_state"] <= 8 * opt.budget + 4 * opt.num_candidates + 4 * opt.budget
