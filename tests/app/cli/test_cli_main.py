import subprocess
import sys

from blockllm import __version__
from blockllm.app.cli.main import main


def test_help_lists_the_commands(capsys):
    assert main(["--help"]) == 0
    out = capsys.readouterr().out
    for command in ("demo", "pretrain", "finetune", "report"):
        assert command in out


def test_version(capsys):
    assert main(["--version"]) == 0
    assert __version__ in capsys.readouterr().out


def test_no_command_is_a_usage_error(capsys):
    assert main([]) == 2
    assert "required" in capsys.readouterr().err


def test_subcommand_help_shows_defaults(capsys):
    assert main(["pretrain", "--help"]) == 0
    out = capsys.readouterr().out
    assert "--sparsity" in out and "(default: 0.9)" in out
    assert main(["finetune", "--help"]) == 0
    assert "(default: 0.95)" in capsys.readouterr().out


def test_python_dash_m_runs_the_cli():
    result = subprocess.run(
        [sys.executable, "-m", "blockllm", "--version"], capture_output=True, text=True
    )
    assert result.returncode == 0
    assert __version__ in result.stdout


def test_progress_bar_shows_step_loss_speed_memory_and_reselections(capsys):
    from blockllm.app.cli.progress_bar import TqdmProgress, make_progress

    assert isinstance(make_progress("bar", "tiny/blockllm"), TqdmProgress)
    bar = make_progress("bar", "tiny/blockllm")
    bar.start(total=4, initial=1)
    for step in (2, 3, 4):
        bar.update({"step": step, "loss": 5.4321, "tokens_per_s": 4100.0, "peak_rss_mb": 912.0,
                    "num_reselections": 2})  # fmt: skip
    bar.close()
    err = capsys.readouterr().err
    assert "4/4" in err and "loss 5.4321" in err and "4,100 tok/s" in err
    assert "rss 912 MB" in err and "resel 2" in err


def test_help_loads_no_heavy_package():
    # `blockllm --help` took 3.5 s when it imported torch (and more) to build the parser.
    code = (
        "import contextlib, io, sys\n"
        "from blockllm.app.cli.main import main\n"
        "with contextlib.redirect_stdout(io.StringIO()):\n"
        "    for argv in (['--help'], ['pretrain', '--help'], ['finetune', '--help'],\n"
        "                 ['demo', '--help'], ['report', '--help'], ['bench', '--help']):\n"
        "        assert main(argv) == 0, argv\n"
        "heavy = ('torch', 'transformers', 'matplotlib', 'tokenizers', 'numpy', 'tqdm')\n"
        "print(sorted(name for name in heavy if name in sys.modules))\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"


def test_optimizer_help_lists_every_name(capsys):
    from blockllm.app.methods import OPTIMIZERS

    assert main(["pretrain", "--help"]) == 0
    out = " ".join(capsys.readouterr().out.split())
    assert "see blockllm.app.methods" not in out
    assert f"one of {', '.join(OPTIMIZERS)};" in out
