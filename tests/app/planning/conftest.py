"""The small Llama the planner's method tests read by hand, shared by their modules."""

import pytest
import transformers

from blockllm.app.planning.model_shapes import shape_of_config


@pytest.fixture(scope="module")
def micro_config():
    """A 4-layer Llama small enough to count every category by hand (untied head)."""
    return transformers.LlamaConfig(
        vocab_size=1000, hidden_size=64, intermediate_size=176, num_hidden_layers=4,
        num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False,
    )  # fmt: skip


@pytest.fixture(scope="module")
def shape(micro_config):
    return shape_of_config(micro_config, name="micro")
