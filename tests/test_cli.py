"""The `calibft` command: usage, dispatch, and user mistakes as exit code 2 with one stderr line."""

from __future__ import annotations

import subprocess
import sys
from importlib.metadata import entry_points
from pathlib import Path

import pytest

from calibft import cli

TRAIN_FLAGS = (
    "--config",
    "--preset",
    "--method",
    "--model",
    "--output",
    "--resume",
    "--seed",
    "KEY=VALUE",
)


def run_cli(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    """The real entry point in a fresh interpreter."""
    return subprocess.run(
        [sys.executable, "-m", "calibft", *args],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=cwd,
    )


def one_error_line(err: str, prefix: str) -> str:
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith(prefix), err
    assert "Traceback" not in err
    return lines[0]


def test_version_and_python_m(tmp_path):
    from calibft import __version__

    proc = run_cli("--version", cwd=tmp_path)
    assert proc.returncode == 0 and proc.stdout.strip() == f"calibft {__version__}"


def test_eval_list_in_fresh_process(tmp_path):
    proc = run_cli("eval", "--list", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    from calibft.eval import BENCHMARKS, load_benchmark

    # Read from the sources without importing them, the descriptions are the modules' own.
    listed = dict(line.split(maxsplit=1) for line in proc.stdout.splitlines())
    assert listed == {name: load_benchmark(name).DESCRIPTION for name in BENCHMARKS}


def test_benchmark_description_refuses_unknown_names_and_non_literals(monkeypatch):
    import calibft.eval as registry

    with pytest.raises(ValueError, match="unknown benchmark 'nope'; choose from structured"):
        registry.benchmark_description("nope")
    monkeypatch.setitem(registry.BENCHMARKS, "plain", "calibft.splits")  # a module without one
    with pytest.raises(ValueError, match="splits.py has no DESCRIPTION string literal"):
        registry.benchmark_description("plain")


def test_console_script_points_at_cli_main():
    (script,) = [ep for ep in entry_points(group="console_scripts") if ep.name == "calibft"]
    assert script.value == "calibft.cli:main"


# ----------------------------------------------------------------------------- usage and dispatch


def test_no_arguments_prints_usage_on_stderr_and_exits_2(tmp_path):
    proc = run_cli(cwd=tmp_path)
    assert proc.returncode == 2
    assert proc.stdout == ""
    assert proc.stderr == cli.USAGE
    # The usage names every command, in the first line and with a line of its own.
    assert proc.stderr.startswith(f"usage: calibft {{{','.join(cli.COMMANDS)}}}")
    assert all(f"\n  {name} " in proc.stderr for name in cli.COMMANDS)


@pytest.mark.parametrize("flag", ["--help", "-h"])
def test_help_prints_usage_on_stdout(capsys, flag):
    assert cli.main([flag]) == 0
    out, err = capsys.readouterr()
    assert out == cli.USAGE and err == ""
    assert "calibft train --help" in out and "calibft eval --help" in out


def test_unknown_command(capsys):
    assert cli.main(["frobnicate", "--help"]) == 2
    out, err = capsys.readouterr()
    assert out == ""
    line = one_error_line(err, "calibft: error:")
    assert "'frobnicate'" in line and line.endswith(f"choose {', '.join(cli.COMMANDS)}")


def test_train_help_lists_flags(capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["train", "--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: calibft train")
    for flag in TRAIN_FLAGS:
        assert flag in out, flag
    assert "Precedence" in out  # how presets, files, flags and overrides combine


def test_train_unknown_flag_is_an_argparse_error(capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["train", "--bogus"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.strip().splitlines()[-1] == "calibft train: error: unrecognized arguments: --bogus"


def test_commands_dispatch_with_remaining_arguments(monkeypatch):
    seen = []
    monkeypatch.setitem(cli.COMMANDS, "train", lambda argv: seen.append(("train", list(argv))) or 0)
    monkeypatch.setitem(cli.COMMANDS, "eval", lambda argv: seen.append(("eval", list(argv))) or 7)
    assert cli.main(["train", "--seed", "3", "epochs=1"]) == 0
    assert cli.main(["eval"]) == 7
    assert seen == [("train", ["--seed", "3", "epochs=1"]), ("eval", [])]


def test_keyboard_interrupt_exits_130_with_resume_hint(monkeypatch, capsys):
    def interrupted(argv):
        raise KeyboardInterrupt

    monkeypatch.setitem(cli.COMMANDS, "train", interrupted)
    assert cli.main(["train"]) == 130
    line = one_error_line(capsys.readouterr().err, "calibft train: interrupted")
    assert "--resume" in line


# ---------------------------------------------------------------------- user mistakes -> exit 2


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (
            ["--preset", "fast"],
            "unknown preset 'fast'; choose one of quick, paper-soft, paper-hard",
        ),
        (["nonsense=1"], "unknown config key 'nonsense'"),
        (["lr=-1"], "lr must be > 0, got -1.0"),
        (["epochs=two"], "config key 'epochs' expects int, got 'two'"),
        (["--method", "dpo"], "method must be one of soft, hard"),
        (["epochs"], "must look like KEY=VALUE"),
        (["--config", "missing.toml"], "config file 'missing.toml' does not exist"),
    ],
)
def test_train_config_mistakes_exit_2(capsys, monkeypatch, tmp_path, args, message):
    monkeypatch.chdir(tmp_path)
    assert cli.main(["train", *args]) == 2
    out, err = capsys.readouterr()
    line = one_error_line(err, "calibft train: error:")
    assert message in line
    assert out == ""
    assert list(tmp_path.iterdir()) == []  # nothing was written


def test_train_missing_model_exits_2(capsys, monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)
    assert cli.main(["train", "--model", str(tmp_path / "no-such-model"), "--output", "out"]) == 2
    line = one_error_line(capsys.readouterr().err, "calibft train: error: model:")
    assert "no-such-model" in line and "is not a model directory" in line
    assert list(tmp_path.iterdir()) == []


def test_train_mistake_in_fresh_process(tmp_path):
    """Through the real entry point: exit code 2, one stderr line, no traceback, nothing written."""
    proc = run_cli("train", "lr=-1", cwd=tmp_path)
    assert proc.returncode == 2
    assert (
        one_error_line(proc.stderr, "calibft train: error:")
        == "calibft train: error: lr must be > 0, got -1.0"
    )
    proc = run_cli("train", "--model", "./no-such-model", "--output", "out", cwd=tmp_path)
    assert proc.returncode == 2
    assert "is not a model directory" in one_error_line(proc.stderr, "calibft train: error: model:")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--samples", "0"], "samples must be an integer >= 1, got 0"),
        (["--samples", "-5"], "samples must be an integer >= 1, got -5"),
    ],
)
def test_eval_bad_samples_exit_2(capsys, monkeypatch, tmp_path, args, message):
    monkeypatch.chdir(tmp_path)
    assert cli.main(["eval", *args, "--output", "report"]) == 2
    line = one_error_line(capsys.readouterr().err, "calibft eval: error:")
    assert message in line
    assert list(tmp_path.iterdir()) == []  # validated before anything is loaded or written


def test_eval_bad_samples_in_fresh_process(tmp_path):
    proc = run_cli("eval", "--samples", "0", "--output", "report", cwd=tmp_path)
    assert proc.returncode == 2
    assert "samples must be an integer >= 1" in one_error_line(proc.stderr, "calibft eval: error:")
    assert list(tmp_path.iterdir()) == []
