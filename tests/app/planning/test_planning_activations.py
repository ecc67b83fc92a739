"""The activation count against what autograd saves (hooks) and what torch's tracker sees."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import transformers

from blockllm.app.planning.activation_memory import PRECISIONS, activation_memory
from blockllm.app.planning.model_shapes import shape_of_config

BATCH, SEQ_LEN = 3, 40


def micro_config(kv_heads: int = 4, **changes) -> transformers.LlamaConfig:
    values = dict(vocab_size=1000, hidden_size=128, intermediate_size=344, num_hidden_layers=3,
                  num_attention_heads=4, num_key_value_heads=kv_heads, max_position_embeddings=64,
                  tie_word_embeddings=False, attn_implementation="sdpa")  # fmt: skip
    return transformers.LlamaConfig(**{**values, **changes})


def saved_bytes(config, precision: str) -> tuple[int, int]:
    """Bytes saved by one forward and loss (each storage once, no parameters), and 0-d ones."""
    model = transformers.AutoModelForCausalLM.from_config(config)
    if precision == "bf16-pure":
        model = model.to(torch.bfloat16)
    parameters = {p.untyped_storage().data_ptr() for p in model.parameters()}
    saved: dict[int, tuple[int, int]] = {}

    def pack(tensor):
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in parameters:
            saved[storage.data_ptr()] = (storage.nbytes(), tensor.dim())
        return tensor

    ids = torch.randint(0, config.vocab_size, (BATCH, SEQ_LEN))
    targets = torch.randint(0, config.vocab_size, (BATCH * SEQ_LEN,))
    autocast = torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16")
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor), autocast:
        logits = model(input_ids=ids).logits
        F.cross_entropy(logits.flatten(0, 1), targets)
    return sum(size for size, _ in saved.values()), sum(s for s, dim in saved.values() if dim == 0)


@pytest.mark.parametrize("precision", PRECISIONS)
@pytest.mark.parametrize("kv_heads", [4, 2], ids=["mha", "gqa"])
def test_saved_activations_are_counted_exactly(precision, kv_heads):
    config = micro_config(kv_heads)
    measured, scalars = saved_bytes(config, precision)
    estimate = activation_memory(shape_of_config(config, name="micro"), BATCH, SEQ_LEN, precision)
    assert estimate.saved == measured - scalars
    assert scalars <= 8  # the loss's total weight: what the count leaves out


def test_tied_embeddings_and_head_dim_are_read_from_the_config():
    config = micro_config(tie_word_embeddings=True, head_dim=48)
    shape = shape_of_config(config, name="micro")
    assert shape.tied and shape.head_dim == 48
    assert sum(1 for t in shape.tensors if t.embedding) == 1  # the head shares the tensor
    measured, scalars = saved_bytes(config, "fp32")
    assert activation_memory(shape, BATCH, SEQ_LEN, "fp32").saved == measured - scalars


TRACKED = dict(vocab_size=4096, num_hidden_layers=4, hidden_size=256, intermediate_size=688,
               max_position_embeddings=128)  # fmt: skip
TRACKED_BATCH, TRACKED_SEQ_LEN = 4, 128
CASES = [
    (precision, checkpointing) for precision in ("fp32", "bf16") for checkpointing in (False, True)
]


def tracker_peaks() -> list[dict[str, int]]:
    """torch's ``MemTracker`` at the peak of a training step, by category, for each of CASES.

    Runs in a child process (see below): ``MemTracker`` leaves per-step Python objects behind in
    the process that used it, which other tests that count objects would see.
    """
    import warnings

    from torch.distributed._tools.mem_tracker import MemTracker

    warnings.filterwarnings("ignore", message="The module hierarchy tracking")
    torch.set_num_threads(1)
    peaks = []
    for precision, checkpointing in CASES:
        torch.manual_seed(0)
        config = micro_config(**TRACKED)
        model = transformers.AutoModelForCausalLM.from_config(config)
        model.config.use_cache = False
        if checkpointing:
            model.activation_checkpointing_enable({"use_reentrant": False})
            model.disable_input_require_grads()
        opt = torch.optim.SGD(model.parameters(), lr=0.0)
        ids = torch.randint(0, config.vocab_size, (TRACKED_BATCH, TRACKED_SEQ_LEN + 1))
        tracker = MemTracker()
        tracker.track_external(model, opt)
        with tracker:
            for step in range(2):
                with torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16"):
                    logits = model(input_ids=ids[:, :-1].contiguous()).logits
                    loss = F.cross_entropy(logits.flatten(0, 1), ids[:, 1:].flatten())
                del logits
                loss.backward()
                opt.step()
                opt.zero_grad(set_to_none=True)
                if step == 0:
                    tracker.reset_mod_stats()
        peak = tracker.get_tracker_snapshot("peak")[torch.device("cpu")]
        peaks.append({getattr(key, "name", str(key)): int(value) for key, value in peak.items()})
    return peaks


@pytest.fixture(scope="module")
def peaks():
    pytest.importorskip("torch.distributed._tools.mem_tracker")
    code = (
        "import json; from tests.app.planning.test_planning_activations import tracker_peaks; "
        "print(json.dumps(tracker_peaks()))"
    )
    root = Path(__file__).resolve().parents[3]
    done = subprocess.run(
        [sys.executable, "-c", code], cwd=root, capture_output=True, text=True, check=True
    )
    return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize(
    "case", range(len(CASES)), ids=[f"{p}-{'ckpt' if c else 'full'}" for p, c in CASES]
)
def test_peak_activations_match_torch_memory_tracker(case, peaks):
    """The activations' peak, loss gradients and checkpointing included, as torch tracks it.

    ``MemTracker`` follows every tensor's storage by category; with SGD at lr 0 (no optimizer
    state) and gradients set to None, the step's peak is the activations' (gradients are still
    absent at the loss's backward or the end of the forward, where the peak falls for these
    shapes).
    """
    precision, checkpointing = CASES[case]
    by_name = peaks[case]
    assert by_name["GRAD"] == 0
    measured = by_name["ACT"] + by_name["TEMP"]
    shape = shape_of_config(micro_config(**TRACKED), name="micro")
    estimate = activation_memory(shape, TRACKED_BATCH, TRACKED_SEQ_LEN, precision)
    expected = estimate.checkpointed if checkpointing else estimate.total
    # 0-d scalars and the rotary tables' allocator rounding are all that may differ.
    assert abs(expected - measured) <= 0.001 * measured
