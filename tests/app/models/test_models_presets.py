"""build_llama / PRESETS / count_parameters."""

import pytest
import torch

from blockllm.app.models import PRESETS, build_llama, count_parameters

# (hidden, intermediate, layers, heads): the GaLore / BlockLLM paper sizes.
EXPECTED_SHAPES = {
    "tiny": (256, 688, 4, 4),
    "llama-20m": (256, 688, 4, 4),
    "llama-60m": (512, 1376, 8, 8),
    "llama-130m": (768, 2048, 12, 12),
    "llama-350m": (1024, 2736, 24, 16),
    "llama-1b": (2048, 5461, 24, 32),
}


def test_preset_names_and_shapes():
    assert list(PRESETS) == list(EXPECTED_SHAPES)
    for name, (hidden, inter, layers, heads) in EXPECTED_SHAPES.items():
        p = PRESETS[name]
        assert (
            p["hidden_size"],
            p["intermediate_size"],
            p["num_hidden_layers"],
            p["num_attention_heads"],
        ) == (
            hidden,
            inter,
            layers,
            heads,
        )
        assert "vocab_size" not in p


@pytest.fixture(scope="module")
def tiny():
    return build_llama("tiny", 8192, max_seq_len=128)


def test_tiny_has_about_7m_untied_parameters(tiny):
    n = count_parameters(tiny)
    # 2 x 8192 x 256 (embedding + untied head) + 4 layers x 791,040 + final norm.
    assert n == 2 * 8192 * 256 + 4 * (4 * 256 * 256 + 3 * 256 * 688 + 2 * 256) + 256 == 7_358_720
    assert tiny.config.tie_word_embeddings is False
    assert tiny.lm_head.weight.data_ptr() != tiny.model.embed_tokens.weight.data_ptr()
    assert tiny.config.max_position_embeddings == 128
    assert tiny.config._attn_implementation == "sdpa"
    assert tiny.dtype == torch.float32 and tiny.training


def test_tiny_forward_and_loss(tiny):
    ids = torch.randint(0, 8192, (2, 16), generator=torch.Generator().manual_seed(0))
    out = tiny(input_ids=ids, labels=ids)
    assert out.logits.shape == (2, 16, 8192)
    # Random init predicts roughly uniformly: loss near ln(8192) = 9.01.
    assert 8.5 < out.loss.item() < 9.6


def test_init_is_seeded_and_leaves_global_rng_alone(tiny):
    torch.manual_seed(123)
    before = torch.get_rng_state()
    again = build_llama("tiny", 8192, max_seq_len=128)
    assert torch.equal(torch.get_rng_state(), before)
    assert all(
        torch.equal(a, b) for a, b in zip(tiny.parameters(), again.parameters(), strict=True)
    )
    other = build_llama("tiny", 8192, max_seq_len=128, seed=1)
    assert not torch.equal(
        other.model.layers[0].mlp.up_proj.weight, tiny.model.layers[0].mlp.up_proj.weight
    )


def test_dtype_is_applied():
    model = build_llama("tiny", 512, dtype=torch.bfloat16)
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}


def test_llama_60m_matches_galore_size():
    # GaLore reports 58.07M for its 60M config at a 32k vocabulary.
    assert count_parameters(build_llama("llama-60m", 32000)) == 58_073_600


def test_count_parameters_counts_shared_tensors_once():
    lin = torch.nn.Linear(4, 4, bias=False)
    model = torch.nn.Sequential(lin, lin)
    assert count_parameters(model) == 16


def test_unknown_preset_lists_valid_names():
    with pytest.raises(ValueError) as info:
        build_llama("llama-7b", 8192)
    message = str(info.value)
    assert "'llama-7b'" in message
    for name in PRESETS:
        assert repr(name) in message


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"vocab_size": 0}, ValueError, "vocab_size: 0"),
        ({"vocab_size": 100, "max_seq_len": 0}, ValueError, "max_seq_len: 0"),
        ({"vocab_size": 100, "dtype": torch.int8}, TypeError, "dtype"),
        ({"vocab_size": 100, "dtype": "bf16"}, TypeError, "dtype"),
    ],
)
def test_bad_arguments(kwargs, error, match):
    with pytest.raises(error, match=match):
        build_llama("tiny", **kwargs)
