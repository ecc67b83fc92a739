"""What `BlockLLM(model.named_parameters(), sparsity=0.9)` holds, with nothing else set.

A library user gets the memory the README promises only if the defaults deliver it: gradients
and Adam state for about a tenth of the coordinates, coordinate lists as row ids, and a selection
step that never holds the dense gradients of the vocabulary matrices together.
"""

import torch

from blockllm import BlockLLM
from tests.optim.helpers import expected_state_bytes


def llama_25m():
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=32000, hidden_size=320, intermediate_size=864, num_hidden_layers=4,
        num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=64,
        tie_word_embeddings=False,
    )  # fmt: skip
    torch.manual_seed(0)
    return LlamaForCausalLM(config)


def test_library_defaults_hold_a_tenth_of_adamw_and_a_lean_selection_step():
    model = llama_25m()
    total = sum(p.numel() for p in model.parameters())
    assert 24e6 < total < 27e6
    opt = BlockLLM(model.named_parameters(), sparsity=0.9, trigger="interval", patience=4)
    generator = torch.Generator().manual_seed(0)
    grads, states = [], []
    for _ in range(9):  # three selections
        tokens = torch.randint(0, 32000, (2, 32), generator=generator)
        model(input_ids=tokens, labels=tokens).loss.backward()
        opt.step(loss=1.0)
        report = opt.memory_report()
        # After the step: the selected coordinates' gradients, compacted, and nothing else.
        assert report["grads"] == 4 * opt.num_selected
        assert report["optimizer_state"] == expected_state_bytes(opt)
        grads.append(report["grads"])
        states.append(report["optimizer_state"])
        opt.zero_grad(set_to_none=True)
    assert opt.num_reselections == 2
    adamw_grads, adamw_state = 4 * total, 8 * total
    assert max(grads) <= 0.11 * adamw_grads
    assert max(states) <= 0.105 * adamw_state
    # The selection steps held no dense vocabulary gradient until step(): at most one large
    # gradient's worth in all (shortlists, and the plan's whole tensors).
    largest = max(p.numel() * 4 for p in model.parameters())
    assert 0 < opt.peak_selection_grad_bytes <= largest
