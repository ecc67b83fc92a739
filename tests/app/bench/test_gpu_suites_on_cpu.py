"""Every entry of the GPU suites runs end to end on this CPU at tiny size (`-m slow`, ~3 min).

A lent GPU comes with minutes of device time: a flag that fails in `benchmarks/gpu.sh` wastes
them. This runs each entry of `gpu-memory`, `gpu-60m` and `gpu-130m` through `blockllm bench`
with the tiny model, `--device cpu`, a small batch and three steps; everything else (the
methods, their flags, precision, checkpointing, the records) is the suite's own. The CUDA paths
themselves are what it cannot check.

    .venv/bin/python -m pytest -m slow tests/app/bench/test_gpu_suites_on_cpu.py
"""

import dataclasses
import json

import pytest

import blockllm.app.bench.runner as bench
from blockllm.app.bench.suites import SUITES
from blockllm.app.cli.main import main

GPU_SUITES = ("gpu-memory", "gpu-60m", "gpu-130m")


def _on_this_cpu(name: str):
    suite = SUITES[name]
    flags = list(suite.flags)
    for flag, value in (("--device", "cpu"), ("--batch-size", "2"), ("--seq-len", "32")):
        flags[flags.index(flag) + 1] = value
    return dataclasses.replace(
        suite, model="tiny", steps=3, eval_every=3, flags=tuple(flags), corpus=(200_000, 2048)
    )


@pytest.mark.slow
@pytest.mark.parametrize("name", GPU_SUITES)
def test_every_entry_of_a_gpu_suite_runs_on_this_cpu(name, tmp_path, cache_dir, monkeypatch):
    assert "--device" in SUITES[name].flags  # the suite is one gpu.sh runs
    monkeypatch.setitem(bench.SUITES, name, _on_this_cpu(name))
    out = tmp_path / name
    code = main([
        "bench", "--suite", name, "--output-dir", str(out), "--threads", "1",
        "--cache-dir", str(cache_dir), "--progress", "off",
    ])  # fmt: skip
    records = json.loads((out / f"{name}.json").read_text())
    assert code == 0
    assert [r["method"] for r in records] == [e.label for e in SUITES[name].methods]
    failed = {r["method"]: r.get("error") for r in records if r["status"] != "ok"}
    assert not failed, failed
