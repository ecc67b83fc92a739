"""BlockLLM in a plain accelerate loop: prepare, accelerator.backward, bf16 autocast on the CPU."""

import pytest
import torch

accelerate = pytest.importorskip("accelerate")
pytest.importorskip("transformers")

from accelerate.state import AcceleratorState, GradientState  # noqa: E402

from blockllm import BlockLLM  # noqa: E402
from blockllm.integrations import unwrap_blockllm  # noqa: E402


@pytest.fixture
def fresh_accelerate_state():
    # AcceleratorState is a process-wide singleton that refuses a second mixed_precision setting
    # (Trainer tests create one with "no"). Reset it around the test, as accelerate's own
    # AccelerateTestCase does.
    AcceleratorState._reset_state(True)
    GradientState._reset_state()
    yield
    AcceleratorState._reset_state(True)
    GradientState._reset_state()


def test_prepare_backward_and_step_with_loss_in_bf16(fresh_accelerate_state, make_llama, dataset):
    # bf16 autocast works on any x86 CPU (natively with AVX512-BF16/AMX, emulated otherwise).
    accelerator = accelerate.Accelerator(cpu=True, mixed_precision="bf16")
    model = make_llama()
    # rest="none": what is trainable is then exactly the selection, checked below.
    optimizer = BlockLLM(model.named_parameters(), lr=3e-3, sparsity=0.8, patience=4, rest="none")
    loader = torch.utils.data.DataLoader(
        dataset, batch_size=8, shuffle=True, generator=torch.Generator().manual_seed(0)
    )
    model, prepared, loader = accelerator.prepare(model, optimizer, loader)
    assert unwrap_blockllm(prepared) is optimizer
    with pytest.raises(TypeError, match="step"):
        prepared.step(loss=1.0)  # why the loss goes to the BlockLLM itself, or to record_loss

    compute_dtypes = set()
    model.get_submodule("model.layers.0.mlp.down_proj").register_forward_hook(
        lambda module, inputs, output: compute_dtypes.add(output.dtype)
    )
    losses = []
    for _ in range(4):
        for batch in loader:
            loss = model(**batch).loss
            accelerator.backward(loss)
            optimizer.step(loss=loss)  # no accumulation: the optimizer can be stepped directly
            prepared.zero_grad()
            losses.append(loss.item())

    assert compute_dtypes == {torch.bfloat16}
    assert len(losses) == optimizer.num_steps == 32
    assert sum(losses[-5:]) / 5 < sum(losses[:5]) / 5 - 0.3
    assert optimizer.num_reselections >= 1
    # fp32 weights under autocast: no master copies; only the selection is trainable.
    assert optimizer.memory_report()["master_weights"] == 0
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    expected = optimizer.candidate_names if optimizer.selection_pending else optimizer.selected
    assert trainable == set(expected)
    assert 0 < optimizer.num_selected <= optimizer.budget
