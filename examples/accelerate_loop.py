"""Train with BlockLLM in a plain accelerate loop: bf16 autocast and gradient accumulation.

    python examples/accelerate_loop.py --epochs 3 --grad-accum 2
    accelerate launch examples/accelerate_loop.py      # same script, any accelerate config

The only BlockLLM lines are marked ``# BlockLLM``. ``accelerator.prepare`` wraps the optimizer in
an ``AcceleratedOptimizer``, whose ``step()`` takes no loss; the loss reaches BlockLLM's
reselection trigger through ``record_loss`` (averaged over the micro-batches of each step).
"""

import argparse
import contextlib
import json
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # this example never downloads anything

import torch
from accelerate import Accelerator
from transformers import LlamaConfig, LlamaForCausalLM

from blockllm import BlockLLM
from blockllm.integrations import unwrap_blockllm

parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
parser.add_argument("--epochs", type=int, default=3)
parser.add_argument("--grad-accum", type=int, default=2)
parser.add_argument("--mixed-precision", default="bf16", choices=["no", "bf16", "fp16"])
parser.add_argument("--cpu", action="store_true", help="stay on the CPU even with a GPU")
parser.add_argument("--sparsity", type=float, default=0.8)
parser.add_argument("--patience", type=int, default=4)
parser.add_argument("--lr", type=float, default=3e-3)
args = parser.parse_args()

accelerator = Accelerator(
    cpu=args.cpu,
    mixed_precision=args.mixed_precision,
    gradient_accumulation_steps=args.grad_accum,
)

# Data: x_t = (start + step * t) mod 256, a toy language a small model learns quickly.
g = torch.Generator().manual_seed(0)
start = torch.randint(0, 256, (128, 1), generator=g)
step = torch.randint(1, 5, (128, 1), generator=g)
ids = (start + step * torch.arange(32)) % 256
loader = torch.utils.data.DataLoader(
    [{"input_ids": row, "labels": row} for row in ids],
    batch_size=4,
    shuffle=True,
    generator=torch.Generator().manual_seed(0),
)

torch.manual_seed(0)
config = LlamaConfig(
    hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4,
    intermediate_size=128, vocab_size=256, max_position_embeddings=64, use_cache=False,
)  # fmt: skip
model = LlamaForCausalLM(config)
optimizer = BlockLLM(  # BlockLLM
    model.named_parameters(), lr=args.lr, sparsity=args.sparsity, patience=args.patience
)
model, optimizer, loader = accelerator.prepare(model, optimizer, loader)
blockllm = unwrap_blockllm(optimizer)  # BlockLLM: the instance inside AcceleratedOptimizer

# Which dtype the matmuls really run in (autocast), seen from inside the first linear layer.
compute_dtypes = set()
probe = model.get_submodule("model.layers.0.mlp.down_proj")
probe.register_forward_hook(lambda module, inputs, output: compute_dtypes.add(str(output.dtype)))

model.train()
step_losses, micro_losses = [], []
for _ in range(args.epochs):
    for batch in loader:
        with accelerator.accumulate(model):
            loss = model(**batch).loss
            # BlockLLM: the rest of the weights step as their gradients land, so every backward
            # but the window's last one is held (its gradients wait for the last).
            last = accelerator.sync_gradients
            with contextlib.nullcontext() if last else blockllm.hold_gradients():
                accelerator.backward(loss)
            blockllm.record_loss(loss)  # BlockLLM: feeds the trigger at the next real step
            micro_losses.append(loss.item())
            optimizer.step()  # a no-op until the accumulation window is complete
            optimizer.zero_grad()
        if accelerator.sync_gradients:
            step_losses.append(sum(micro_losses) / len(micro_losses))
            micro_losses.clear()

trainable = {
    name
    for name, param in accelerator.unwrap_model(model).named_parameters()
    if param.requires_grad
}
head = sum(step_losses[:5]) / 5
tail = sum(step_losses[-5:]) / 5
summary = {
    "mixed_precision": accelerator.mixed_precision,
    "compute_dtypes": sorted(compute_dtypes),
    "optimizer_steps": blockllm.num_steps,
    "logged_steps": len(step_losses),
    "first_losses_mean": head,
    "last_losses_mean": tail,
    "num_reselections": blockllm.num_reselections,
    "trigger_window": blockllm.state_dict()["blockllm"]["trigger"]["window"],
    "step_losses": step_losses,
    # Every weight moves every step (Adam on the selection, the rest rule on the others).
    "every_candidate_trainable": trainable == set(blockllm.candidate_names),
    "num_selected": blockllm.num_selected,
    "budget": blockllm.budget,
}
accelerator.print(json.dumps(summary))
