"""`blockllm report DIR...`: PNGs, report.md and a comparison table."""

import re

from blockllm.app.bench.plots import selection_steps
from blockllm.app.bench.report import comparison_table, load_run
from blockllm.app.cli.main import main


def test_report_on_two_runs(finished_runs, tmp_path, capsys):
    out = tmp_path / "report"
    assert (
        main(
            [
                "report",
                str(finished_runs["adamw"]),
                str(finished_runs["blockllm"]),
                "--output-dir",
                str(out),
            ]
        )
        == 0
    )
    printed = capsys.readouterr().out
    names = sorted(p.name for p in out.iterdir())
    assert names == [
        "loss_vs_step.png",
        "loss_vs_time.png",
        "memory.png",
        "report.md",
        "selection_events.png",
    ]
    for name in names:
        if name.endswith(".png"):
            assert (out / name).read_bytes()[:4] == b"\x89PNG"
    assert "| adamw | adamw |" in printed and "| blockllm | blockllm |" in printed
    assert "×)" in printed  # ratios against AdamW
    assert "report.md" in printed


def test_report_on_one_run_defaults_to_its_directory(finished_runs, tmp_path, capsys):
    import shutil

    run = tmp_path / "blockllm"
    shutil.copytree(finished_runs["blockllm"], run)
    assert main(["report", str(run)]) == 0
    assert (run / "report" / "selection_events.png").is_file()
    capsys.readouterr()


def test_not_a_run_directory(tmp_path, capsys):
    assert main(["report", str(tmp_path)]) == 2
    assert "is not a blockllm run directory" in capsys.readouterr().err


def test_table_ratios_and_selection_events(finished_runs):
    runs = [load_run(finished_runs["adamw"]), load_run(finished_runs["blockllm"])]
    table = comparison_table(runs).splitlines()
    assert table[0].startswith(
        "| run | optimizer | steps | peak RSS | optimizer state | gradients |"
    )
    blockllm_row = table[3]
    # BlockLLM at sparsity 0.9 keeps Adam state for ~10 % of the coordinates.
    state_ratio = float(re.findall(r"\(([\d.]+)×\)", blockllm_row)[1])
    assert 0.05 < state_ratio < 0.2
    assert selection_steps(runs[1]) == sorted(selection_steps(runs[1]))
    assert selection_steps(runs[0]) == []


def test_report_on_a_folder_of_runs_reads_every_run_below_it(finished_runs, tmp_path, capsys):
    # What `blockllm demo` leaves: DIR/adamw and DIR/blockllm (bench: DIR/runs/LABEL).
    import shutil

    demo = tmp_path / "demo-20260101-120000"
    for name in ("adamw", "blockllm"):
        shutil.copytree(finished_runs[name], demo / name)
    (demo / "demo.md").write_text("the demo's own table")
    assert main(["report", str(demo)]) == 0
    printed = capsys.readouterr().out
    assert "| adamw | adamw |" in printed and "| blockllm | blockllm |" in printed
    assert (demo / "report" / "report.md").is_file()
    # The report folder holds no run, so a second report finds the same two.
    assert main(["report", str(demo)]) == 0
    assert capsys.readouterr().out.count("| adamw | adamw |") == 1


def test_report_on_several_runs_writes_under_runs_not_the_current_directory(
    finished_runs, tmp_path, capsys, monkeypatch
):
    monkeypatch.chdir(tmp_path)
    assert main(["report", str(finished_runs["adamw"]), str(finished_runs["blockllm"])]) == 0
    capsys.readouterr()
    assert [path.name for path in tmp_path.iterdir()] == ["runs"]
    (report,) = (tmp_path / "runs").iterdir()
    assert re.fullmatch(r"report-\d{8}-\d{6}", report.name)
    assert (report / "report.md").is_file()
