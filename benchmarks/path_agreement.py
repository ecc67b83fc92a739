"""Does the same training come out the same down BlockLLM's different code paths?

The rest step can run in the gradient hooks or in ``step()`` (``rest_in_backward=False``, held
gradients, FSDP2's partly selected tensors), and a step's gradient can arrive in one backward
or in several (``hold_gradients()``). Each pair below should train alike up to rounding; this
prints how far apart they end, on the tests' tiny Llama (``tests/optim/test_llama.py``):

* the rest in the hooks against in ``step()``, clipped at 0.5, 12 steps with a reselection;
* two micro-batches against one big batch, float64, ``sparsity=0.5``, 10 steps: held for the
  last backward, or stepped in ``step()`` (and ``rest="none"``, which ranks a selection on the
  first micro-batch by design);
* a second ``clip_grad_norm_(0.1)`` before a step: it should read 0.1;
* with ``--fsdp2``, two gloo ranks under FSDP2 against one process, float64, clipped at 0.5;
* a hash of the final weights of four clipped one-process runs (default, ``max_grad_norm``,
  ``rest="none"``, sign), to compare two versions' outputs bit for bit.

Run it from the repository root against any checkout's library to compare versions:

    .venv/bin/python benchmarks/path_agreement.py [--fsdp2]
    PYTHONPATH=/path/to/other/checkout/src .venv/bin/python benchmarks/path_agreement.py --fsdp2
"""

from __future__ import annotations

import argparse
import functools
import hashlib
import sys
import tempfile
from pathlib import Path

import torch

# The model, batches and training loop are the tests' own, so that these figures are the ones
# the tests' bounds were set against.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import blockllm  # noqa: E402
from tests.optim.test_llama import patterned_batches, tiny_llama  # noqa: E402
from tests.optim.test_rest import differing_fraction, max_difference, train  # noqa: E402


def hooks_against_step() -> None:
    print("rest in the hooks vs in step(), clip 0.5, 12 steps:")
    for rule in ("auto", "sign", "colnorm"):
        in_hooks, optimizer, norms_hooks = train(steps=12, clip=0.5, rest=rule)
        in_step, _, norms_step = train(steps=12, clip=0.5, rest=rule, rest_in_backward=False)
        norm_gap = max(abs(a - b) / a for a, b in zip(norms_hooks, norms_step))
        apart = differing_fraction(in_hooks, in_step, 1e-5)
        print(f"  {rule:8s} weights {max_difference(in_hooks, in_step):.1e} apart ({apart:.1%} of "
              f"the entries by more than 1e-5), clip norms {norm_gap:.1e} apart (relative), "
              f"{optimizer.num_reselections} reselection(s)")  # fmt: skip


def accumulation_against_one_batch() -> None:
    print("two micro-batches vs one big batch, float64, sparsity 0.5, 10 steps:")
    paths = {
        "held for the last backward": dict(hold=True),
        "stepped in step()": dict(hold=False, rest_in_backward=False),
        'rest="none", held': dict(hold=True, rest="none"),
    }
    for label, options in paths.items():
        rest = {"rest": options.pop("rest")} if "rest" in options else {}
        big, big_optimizer, _ = train(steps=10, sparsity=0.5, model=tiny_llama().double(), **rest)
        micro, micro_optimizer, _ = train(steps=10, sparsity=0.5, model=tiny_llama().double(),
                                          accumulate=2, **rest, **options)  # fmt: skip
        same = big_optimizer.selected == micro_optimizer.selected
        print(f"  {label:28s} weights {max_difference(big, micro):.1e} apart, "
              f"{'the same' if same else 'another'} selection at the end")


def second_clip() -> None:
    print("a second clip_grad_norm_(0.1) before the step (S: a selection step); should read 0.1:")
    for rest in ("auto", "none"):
        model = tiny_llama()
        optimizer = blockllm.BlockLLM(model.named_parameters(), lr=3e-3, sparsity=0.9, rest=rest,
                                      trigger="interval", patience=3)  # fmt: skip
        readings = []
        for tokens in patterned_batches(6):
            model(input_ids=tokens, labels=tokens).loss.backward()
            selecting = optimizer.selection_pending
            optimizer.clip_grad_norm_(0.1)
            readings.append(f"{'S' if selecting else ''}{float(optimizer.clip_grad_norm_(0.1)):.3f}")
            optimizer.step(loss=1.0)
            optimizer.zero_grad(set_to_none=True)
        print(f"  rest={rest:5s} " + " ".join(readings))


def fsdp2_against_one_process() -> None:
    from tests.distributed.fsdp_workers import fsdp_options_worker, single_process_reference
    from tests.distributed.spawn import run_workers

    print("FSDP2 (2 gloo ranks) vs one process, float64, clip 0.5 (max_grad_norm):")
    for rest in ("auto", "sign"):
        options = {"rest": rest, "max_grad_norm": 0.5}
        with tempfile.TemporaryDirectory() as tmp:
            worker = functools.partial(fsdp_options_worker, options=options, dtype=torch.float64)
            run_workers(worker, Path(tmp))
            sharded = torch.load(Path(tmp) / "options0.pt", weights_only=True)["params"]
        torch.set_num_threads(1)
        reference = single_process_reference(options, dtype=torch.float64)["params"]
        gaps = {name: (sharded[name] - value).abs() for name, value in reference.items()}
        worst = max(gaps, key=lambda name: gaps[name].max().item())
        print(f"  rest={rest:5s} weights {gaps[worst].max().item():.1e} apart, in {worst}; entries "
              f"over 1e-6: {sum(int((g > 1e-6).sum()) for g in gaps.values())}, over 1e-7: "
              f"{sum(int((g > 1e-7).sum()) for g in gaps.values())} of "
              f"{sum(g.numel() for g in gaps.values())}")  # fmt: skip


def weight_hashes() -> None:
    print("final weights of clipped one-process runs (20 steps), sha256 of their bytes:")
    configurations = {
        "default, clip_grad_norm_(0.5)": {}, "default, max_grad_norm=0.5": {"max_grad_norm": 0.5},
        'rest="none", clip_grad_norm_(0.5)': {"rest": "none"},
        'rest="sign", clip_grad_norm_(0.5)': {"rest": "sign"},
    }  # fmt: skip
    for label, options in configurations.items():
        model = tiny_llama()
        optimizer = blockllm.BlockLLM(model.named_parameters(), lr=3e-3, sparsity=0.9,
                                      trigger="interval", patience=4, **options)  # fmt: skip
        for tokens in patterned_batches(20):
            loss = model(input_ids=tokens, labels=tokens).loss
            loss.backward()
            if "max_grad_norm" not in options:
                optimizer.clip_grad_norm_(0.5)
            optimizer.step(loss=loss)
            optimizer.zero_grad(set_to_none=True)
        digest = hashlib.sha256()
        for value in model.state_dict().values():
            digest.update(value.detach().contiguous().numpy().tobytes())
        print(f"  {label:36s} {digest.hexdigest()[:16]}")


def _cpu_name() -> str:
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        return "unknown"
    names = [line.split(":", 1)[1].strip() for line in lines if line.startswith("model name")]
    return names[0] if names else "unknown"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--fsdp2", action="store_true", help="also FSDP2 against one process")
    args = parser.parse_args()
    torch.set_num_threads(1)
    # The CPU's kernels decide which near-zero gradient entries flip sign (the sign rule's gap).
    print(f"blockllm {blockllm.__version__}, torch {torch.__version__}, CPU {_cpu_name()} "
          f"({torch.backends.cpu.get_cpu_capability()})")  # fmt: skip
    hooks_against_step()
    accumulation_against_one_batch()
    second_clip()
    weight_hashes()
    if args.fsdp2:
        fsdp2_against_one_process()


if __name__ == "__main__":
    main()
