"""`blockllm pretrain` through main(): outputs, --resume, and the bad-input error table."""

import json
import re
import shutil
import sys
from pathlib import Path

import pytest

from blockllm.app.cli.main import main
from tests.app.tiny import TINY_FLAGS, metrics, snapshot


def run(argv, capsys):
    code = main(argv)
    out, err = capsys.readouterr()
    return code, out, err


def test_pretrain_writes_every_output(tmp_path, cache_dir, capsys):
    out_dir = tmp_path / "run"
    code, out, _ = run(
        ["pretrain", *TINY_FLAGS, "--max-steps", "4", "--eval-every", "2", "--save-every", "2",
         "--lr", "2e-3", "--output-dir", str(out_dir), "--cache-dir", str(cache_dir)],
        capsys,
    )  # fmt: skip
    assert code == 0
    config = json.loads((out_dir / "config.json").read_text())
    assert (config["command"], config["model"], config["optimizer"], config["lr"]) == (
        "pretrain",
        "tiny",
        "blockllm",
        2e-3,
    )
    records = metrics(out_dir)
    assert [r["step"] for r in records] == [1, 2, 3, 4]
    assert all({"step", "loss", "lr", "tokens_per_s"} <= set(r) for r in records)
    assert [r["step"] for r in records if "eval_loss" in r] == [2, 4]
    assert list((out_dir / "tensorboard").glob("events.out.tfevents.*"))
    assert sorted(p.name for p in (out_dir / "checkpoints").iterdir()) == [
        "step_00000002.pt",
        "step_00000004.pt",
    ]
    assert json.loads((out_dir / "summary.json").read_text())["steps"] == 4
    assert "eval_loss" in out and "reselections" in out


def test_resume_needs_no_other_flag(finished_runs, tmp_path, cache_dir, capsys):
    out_dir = tmp_path / "run"
    shutil.copytree(finished_runs["blockllm"], out_dir)
    before = (out_dir / "metrics.jsonl").read_text()
    code, out, _ = run(["pretrain", "--output-dir", str(out_dir), "--resume", "--progress", "off",
                        "--cache-dir", str(cache_dir)], capsys)  # fmt: skip
    assert code == 0
    assert "done, 4 steps" in out
    assert (out_dir / "metrics.jsonl").read_text() == before


def test_resume_with_more_steps_trains_a_finished_run_longer(
    finished_runs, tmp_path, cache_dir, capsys
):
    from blockllm.app.training.schedule import WarmupCosine

    out_dir = tmp_path / "run"
    shutil.copytree(finished_runs["blockllm"], out_dir)
    before = metrics(out_dir)
    code, out, err = run(["pretrain", "--output-dir", str(out_dir), "--resume", "--max-steps", "7",
                          "--progress", "off", "--cache-dir", str(cache_dir)], capsys)  # fmt: skip
    assert code == 0
    assert "done, 7 steps" in out
    records = metrics(out_dir)
    assert [r["step"] for r in records] == [1, 2, 3, 4, 5, 6, 7]
    assert records[:4] == before  # the first run's lines stay as they were
    # The schedule is recomputed for 7 steps: steps 5-7 use a fresh 7-step run's learning rates
    # (warmup 10 % of 7 = 0 steps, cosine to 10 %), so after the finished decay the lr rises.
    schedule = WarmupCosine(0, 7, 0.1)
    assert [r["lr"] for r in records[4:]] == pytest.approx([1e-3 * schedule(s) for s in (4, 5, 6)])
    assert records[4]["lr"] > records[3]["lr"]
    assert "max_steps changed from 4 to 7 on resume" in err
    assert json.loads((out_dir / "config.json").read_text())["max_steps"] == 7
    # --resume alone now continues the 7-step run: it is complete.
    code, out, _ = run(["pretrain", "--output-dir", str(out_dir), "--resume", "--progress", "off",
                        "--cache-dir", str(cache_dir)], capsys)  # fmt: skip
    assert code == 0 and "done, 7 steps" in out
    assert metrics(out_dir) == records


def _copy_run(finished_runs, tmp_path):
    target = tmp_path / "run"
    shutil.copytree(finished_runs["blockllm"], target)
    return target


def _corrupt_checkpoint(finished_runs, tmp_path):
    # Every checkpoint is damaged: with an intact older one, --resume falls back to it instead
    # (tests/reliability/test_checkpoint_faults.py).
    target = _copy_run(finished_runs, tmp_path)
    for path in (target / "checkpoints").glob("step_*.pt"):
        path.write_bytes(path.read_bytes()[:2000])
    return target


def _foreign_checkpoint(finished_runs, tmp_path):
    target = _copy_run(finished_runs, tmp_path)
    shutil.copy(finished_runs["adamw"] / "checkpoints" / "step_00000004.pt", target / "checkpoints")
    return target


def _foreign_directory(finished_runs, tmp_path):
    target = tmp_path / "run"
    target.mkdir()
    (target / "thesis.tex").write_text("precious")
    return target


def _empty_run_dir(finished_runs, tmp_path):
    return tmp_path / "run"


def _empty_text(tmp_path):
    path = tmp_path / "empty.txt"
    path.write_text("\n\n  \n")
    return str(path)


# (id, how to prepare the output dir, extra argv (callable of tmp_path or list), message regex)
ERRORS = [
    ("unknown-preset", _empty_run_dir, ["--model", "llama-7b"],
     r"Invalid preset: 'llama-7b' \(choose from 'tiny', 'llama-20m', 'llama-60m', 'llama-130m', 'llama-350m', 'llama-1b'\)"),
    ("unknown-optimizer", _empty_run_dir, ["--optimizer", "sgd"], r"Invalid optimizer: 'sgd' \(choose from 'adamw', 'blockllm'"),
    ("bad-value", _empty_run_dir, ["--sparsity", "1.5"], r"Invalid sparsity: 1.5"),
    ("zero-lr", _empty_run_dir, ["--lr", "0"], r"Invalid lr: 0.0 \(must be > 0.0\)"),
    ("missing-data", _empty_run_dir, ["--data", "/nonexistent/corpus.txt"], r"'/nonexistent/corpus.txt' does not exist"),
    ("empty-data", _empty_run_dir, lambda tmp: ["--data", _empty_text(tmp)], r"empty.txt' contains no text"),
    ("corrupt-checkpoint", _corrupt_checkpoint, ["--resume"], r"step_00000004.pt is corrupt or unreadable"),
    ("foreign-checkpoint", _foreign_checkpoint, ["--resume"], r"saved by a different run \(differs in: optimizer\)"),
    ("another-run", _copy_run, ["--lr", "0.5"], r"holds a different run \(lr: 0.001 there, 0.5 now\)"),
    ("another-run-resume", _copy_run, ["--resume", "--lr", "0.5"], r"holds a different run"),
    ("same-run-without-resume", _copy_run, [], r"already holds this run's results; pass --resume"),
    ("resume-without-checkpoint", _empty_run_dir, ["--resume"], r"nothing to resume"),
    ("resume-before-checkpoint", _copy_run, ["--resume", "--max-steps", "3"],
     r"Invalid max_steps: 3 \(checkpoint .*step_00000004.pt is at step 4 already; give --max-steps 4 or more"),
    ("foreign-directory", _foreign_directory, [], r"is not empty and holds no blockllm run"),
]  # fmt: skip


@pytest.mark.parametrize(
    ("prepare", "extra", "message"), [e[1:] for e in ERRORS], ids=[e[0] for e in ERRORS]
)
def test_bad_input_is_one_line_exit_2_and_touches_nothing(
    prepare, extra, message, finished_runs, tmp_path, cache_dir, capsys
):
    out_dir = prepare(finished_runs, tmp_path)
    extra = extra(tmp_path) if callable(extra) else extra
    before = snapshot(out_dir)
    flags = [] if "--resume" in extra and "--lr" not in extra else [*TINY_FLAGS, "--max-steps", "4", "--eval-every", "2",
                                                                    "--save-every", "2", "--patience", "1"]  # fmt: skip
    code, _, err = run(
        ["pretrain", *flags, *extra, "--output-dir", str(out_dir), "--cache-dir", str(cache_dir)],
        capsys,
    )
    assert code == 2
    lines = err.strip().splitlines()
    # One error line, last; anything before it is ordinary INFO logging of the setup.
    assert [line for line in lines if line.startswith("blockllm:")] == lines[-1:], err
    assert "Traceback" not in err
    assert lines[-1].startswith("blockllm: error: ")
    assert re.search(message, lines[-1]), lines[-1]
    assert snapshot(out_dir) == before
    if not before:
        assert not out_dir.exists()


def test_missing_optional_package_names_the_pip_line(tmp_path, cache_dir, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "datasets", None)  # "not installed"
    code, _, err = run(["pretrain", *TINY_FLAGS, "--data", "some-user/some-hub-dataset",
                        "--output-dir", str(tmp_path / "run"), "--cache-dir", str(cache_dir)], capsys)  # fmt: skip
    assert code == 2
    assert err.startswith("blockllm: error: ")
    assert err.strip().splitlines()[-1] == "pip install datasets"


def test_argparse_errors_exit_2(capsys):
    assert main(["pretrain", "--output-dir", "x", "--precision", "fp8"]) == 2
    assert "invalid choice: 'fp8'" in capsys.readouterr().err


def test_bf16_pure_stores_weights_in_bf16_and_refuses_optimizers_without_masters(
    tmp_path, cache_dir, capsys
):
    common = ["pretrain", *TINY_FLAGS, "--max-steps", "3", "--precision", "bf16-pure",
              "--cache-dir", str(cache_dir), "--progress", "off"]  # fmt: skip
    fp32_dir, pure_dir = tmp_path / "fp32", tmp_path / "pure"
    code, _, _ = run([*common[:-6], "--cache-dir", str(cache_dir), "--progress", "off",
                      "--output-dir", str(fp32_dir)], capsys)  # fmt: skip
    assert code == 0
    code, _, _ = run([*common, "--rest", "sign", "--output-dir", str(pure_dir)], capsys)
    assert code == 0
    fp32, pure = metrics(fp32_dir)[-1], metrics(pure_dir)[-1]
    assert pure["peak_params_mb"] == pytest.approx(fp32["peak_params_mb"] / 2, rel=1e-3)
    # fp32 masters and moments for the selected coordinates only (a tenth at sparsity 0.9).
    assert 0 < pure["peak_master_weights_mb"] <= 0.11 * 2 * pure["peak_params_mb"]
    code, _, err = run([*common, "--optimizer", "adamw", "--output-dir", str(tmp_path / "a")],
                       capsys)  # fmt: skip
    assert code == 2 and "keeps no fp32 master copies" in err


def test_without_output_dir_a_run_folder_is_chosen_and_printed(
    tmp_path, cache_dir, capsys, monkeypatch
):
    monkeypatch.chdir(tmp_path)
    code, out, err = run(["pretrain", *TINY_FLAGS, "--max-steps", "2", "--no-tensorboard",
                          "--cache-dir", str(cache_dir)], capsys)  # fmt: skip
    assert code == 0, err
    (folder,) = (tmp_path / "runs").iterdir()
    assert re.fullmatch(r"pretrain-tiny-\d{8}-\d{6}", folder.name)
    assert out.splitlines()[0] == f"blockllm pretrain: writing the run to runs/{folder.name}"
    assert (folder / "summary.json").is_file()
    # --resume must name the run to continue: one line, no usage text.
    code, _, err = run(["pretrain", "--resume"], capsys)
    assert code == 2
    assert (
        err.strip() == "blockllm: error: --resume needs --output-dir: the run directory to continue"
    )


def test_default_output_dir_never_reuses_a_folder(tmp_path, monkeypatch):
    from blockllm.app.cli.common import default_output_dir

    monkeypatch.chdir(tmp_path)
    first = default_output_dir("finetune", str(tmp_path / "my-model"), now=0.0)
    assert first.parent == Path("runs") and first.name.startswith("finetune-my-model-")
    first.mkdir(parents=True)
    assert (
        default_output_dir("finetune", str(tmp_path / "my-model"), now=0.0).name
        == f"{first.name}-2"
    )


def test_row_gradients_are_one_short_log_line(tmp_path, cache_dir, capsys):
    # The library names the patched modules at debug level only; at info the run says how many.
    code, _, err = run(["pretrain", *TINY_FLAGS, "--max-steps", "1", "--no-tensorboard",
                        "--output-dir", str(tmp_path / "run"), "--cache-dir", str(cache_dir)],
                       capsys)  # fmt: skip
    assert code == 0
    lines = [line for line in err.splitlines() if "row gradients" in line]
    assert len(lines) == 1 and len(lines[0]) < 160, lines
    assert "model.layers.0" not in err
