"""Train a causal LM with BlockLLM under the Hugging Face Trainer, and resume it from a checkpoint.

The only BlockLLM lines are marked ``# BlockLLM``; the rest is an ordinary Trainer script.

    python examples/hf_trainer.py --max-steps 60 --output-dir /tmp/blockllm-hf
    python examples/hf_trainer.py --max-steps 90 --output-dir /tmp/blockllm-hf --resume

It runs offline on a CPU in seconds: a small Llama built from a config (random init) learns a
synthetic language of arithmetic progressions mod 256. Swap in your own model and dataset.
"""

import argparse
import json
import logging
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # this example never downloads anything

import torch
from transformers import LlamaConfig, LlamaForCausalLM, Trainer, TrainingArguments

from blockllm.integrations import (
    BlockLLMCallback,
    create_blockllm_optimizer,
    prepare_model_for_blockllm,
)

parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
parser.add_argument("--output-dir", default="blockllm-hf-example")
parser.add_argument("--max-steps", type=int, default=60)
parser.add_argument("--save-steps", type=int, default=20)
parser.add_argument("--sparsity", type=float, default=0.8, help="fraction of coordinates frozen")
parser.add_argument("--patience", type=int, default=5, help="losses seen before a reselection")
parser.add_argument("--lr", type=float, default=3e-3)
parser.add_argument("--gradient-checkpointing", action="store_true")
parser.add_argument("--resume", action="store_true", help="continue from the last checkpoint")
args = parser.parse_args()

logging.basicConfig(level=logging.WARNING, format="%(name)s: %(message)s")
logging.getLogger("blockllm").setLevel(logging.INFO)  # selections and plateaus


class Progressions(torch.utils.data.Dataset):
    """x_t = (start + step * t) mod 256: a toy language a small model learns in a few dozen steps."""

    def __init__(self, n=256, seq_len=32, seed=0):
        g = torch.Generator().manual_seed(seed)
        start = torch.randint(0, 256, (n, 1), generator=g)
        step = torch.randint(1, 5, (n, 1), generator=g)
        self.ids = (start + step * torch.arange(seq_len)) % 256

    def __len__(self):
        return len(self.ids)

    def __getitem__(self, i):
        return {"input_ids": self.ids[i], "labels": self.ids[i]}


torch.manual_seed(0)
config = LlamaConfig(
    hidden_size=64, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=4,
    intermediate_size=128, vocab_size=256, max_position_embeddings=64, use_cache=False,
)  # fmt: skip
model = LlamaForCausalLM(config)
if args.gradient_checkpointing:
    prepare_model_for_blockllm(model)  # BlockLLM: non-reentrant checkpointing, early-stop backward

training_args = TrainingArguments(
    output_dir=args.output_dir,
    max_steps=args.max_steps,
    per_device_train_batch_size=8,
    learning_rate=args.lr,
    lr_scheduler_type="constant",
    logging_steps=10,
    save_strategy="steps",
    save_steps=args.save_steps,
    report_to=[],
    disable_tqdm=True,
    use_cpu=not torch.cuda.is_available(),
    seed=0,
)
optimizer = create_blockllm_optimizer(  # BlockLLM
    model, training_args, sparsity=args.sparsity, patience=args.patience
)
trainer = Trainer(
    model=model,
    args=training_args,
    train_dataset=Progressions(),
    optimizers=(optimizer, None),  # BlockLLM; None: Trainer builds the lr scheduler
    callbacks=[BlockLLMCallback(optimizer)],  # BlockLLM: loss feed, logs, resume check
)
trainer.train(resume_from_checkpoint=True if args.resume else None)

losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
summary = {
    "global_step": trainer.state.global_step,
    "first_loss": losses[0] if losses else None,
    "last_loss": losses[-1] if losses else None,
    "num_reselections": optimizer.num_reselections,
    "trainable_fraction": optimizer.trainable_fraction,
    "selected": optimizer.selected,
    "memory_report": optimizer.memory_report(),
}
print(json.dumps(summary))
