"""Shared pieces for the Hugging Face / accelerate integration tests.

Everything is built offline: a tiny Llama from a config (random init) and a learnable synthetic
language (arithmetic progressions mod the vocabulary), so a few dozen steps visibly lower the loss.
"""

import os

import pytest
import torch

# Before transformers is imported anywhere: never touch the hub.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

try:
    import transformers
except ImportError:  # the test modules that need it skip themselves
    transformers = None

VOCAB = 256
SEQ_LEN = 32


def tiny_llama_config(num_layers=2):
    return transformers.LlamaConfig(
        hidden_size=64,
        num_hidden_layers=num_layers,
        num_attention_heads=4,
        num_key_value_heads=4,
        intermediate_size=128,
        vocab_size=VOCAB,
        max_position_embeddings=SEQ_LEN * 2,
        use_cache=False,
    )


class ProgressionDataset(torch.utils.data.Dataset):
    """Sequences ``x_t = (start + step * t) mod VOCAB``: learnable in-context, random start."""

    def __init__(self, n=64, seq_len=SEQ_LEN, seed=0):
        generator = torch.Generator().manual_seed(seed)
        start = torch.randint(0, VOCAB, (n, 1), generator=generator)
        step = torch.randint(1, 5, (n, 1), generator=generator)
        self.ids = (start + step * torch.arange(seq_len)) % VOCAB

    def __len__(self):
        return len(self.ids)

    def __getitem__(self, index):
        return {"input_ids": self.ids[index], "labels": self.ids[index]}


@pytest.fixture
def make_llama():
    """Factory: the same tiny Llama for the same seed, in train mode."""

    pytest.importorskip("transformers")

    def make(num_layers=2, seed=0):
        torch.manual_seed(seed)
        model = transformers.LlamaForCausalLM(tiny_llama_config(num_layers))
        model.train()
        return model

    return make


@pytest.fixture
def dataset():
    return ProgressionDataset()


@pytest.fixture
def make_args(tmp_path):
    """Factory: quiet CPU TrainingArguments writing under tmp_path; keywords override."""
    pytest.importorskip("transformers")

    def make(**overrides):
        options = dict(
            output_dir=str(tmp_path / "run"),
            per_device_train_batch_size=8,
            learning_rate=3e-3,
            lr_scheduler_type="constant",
            max_steps=40,
            logging_steps=5,
            save_strategy="no",
            report_to=[],
            disable_tqdm=True,
            use_cpu=True,
            seed=0,
            dataloader_num_workers=0,
        )
        options.update(overrides)
        return transformers.TrainingArguments(**options)

    return make


@pytest.fixture
def trainable_candidates():
    """Function: the optimizer's candidate names whose tensors have requires_grad=True."""

    def trainable(optimizer):
        candidates = set(optimizer.candidate_names)
        return {
            name
            for group in optimizer.param_groups
            for name, param in zip(group["param_names"], group["params"], strict=True)
            if name in candidates and param.requires_grad
        }

    return trainable
