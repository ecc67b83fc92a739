import subprocess
import sys

from blockllm import __version__
from blockllm.cli.main import main


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
    result = subprocess.run([sys.executable, "-m", "blockllm", "--version"], capture_output=True, text=True)
    assert result.returncode == 0
    assert __version__ in result.stdout
