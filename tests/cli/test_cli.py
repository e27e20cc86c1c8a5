"""The `pvio` command itself: help, version, and clean errors for wrong usage."""

from __future__ import annotations

import os
import subprocess
import sys

from click.testing import CliRunner

from pvio import __version__, compiled
from pvio.cli.main import COMMANDS, cli


def test_version() -> None:
    result = CliRunner().invoke(cli, ["--version"])
    assert result.exit_code == 0
    assert __version__ in result.output


def test_version_says_which_build_runs() -> None:
    env = {k: v for k, v in os.environ.items() if k != "PVIO_PURE"}
    pure = subprocess.run([sys.executable, "-m", "pvio", "--version"], capture_output=True, text=True,
                          timeout=60, env={**env, "PVIO_PURE": "1"})
    assert pure.stdout.strip() == f"pvio {__version__}, pure Python (PVIO_PURE=1)"
    as_is = subprocess.run([sys.executable, "-m", "pvio", "--version"], capture_output=True, text=True,
                           timeout=60, env=env)
    assert as_is.stdout.strip().startswith(f"pvio {__version__}, ")
    fresh = bool(compiled.check(compiled.build_dir())[0])  # a build there, matching the sources
    assert (f"compiled ({len(compiled.MODULES)} modules, mypyc)" in as_is.stdout) == fresh, as_is.stdout


def test_help_lists_every_subcommand() -> None:
    result = CliRunner().invoke(cli, ["--help"])
    assert result.exit_code == 0
    for name in COMMANDS:
        assert name in result.output


def test_every_subcommand_loads_and_has_help() -> None:
    for name in COMMANDS:
        result = CliRunner().invoke(cli, [name, "--help"])
        assert result.exit_code == 0, (name, result.output)


def test_unknown_subcommand_is_a_usage_error() -> None:
    result = CliRunner().invoke(cli, ["no-such-command"])
    assert result.exit_code == 2
    assert "No such command" in result.output


def test_python_dash_m() -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "pvio", "--version"], capture_output=True, text=True, timeout=60
    )
    assert proc.returncode == 0, proc.stderr
    assert __version__ in proc.stdout
