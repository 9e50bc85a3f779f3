"""The ``squeeze`` command dispatches to its subcommands."""

from __future__ import annotations

import pytest

from squeeze import cli


def test_help_lists_commands(capsys):
    assert cli.main([]) == 0
    assert "squeeze eval longbench" in capsys.readouterr().out


def test_unknown_command_is_refused(capsys):
    with pytest.raises(SystemExit) as err:
        cli.main(["frobnicate"])
    assert err.value.code == 2
    assert "unknown command" in capsys.readouterr().err


def test_eval_longbench_dispatches(capsys):
    pytest.importorskip("transformers")
    with pytest.raises(SystemExit) as err:  # argparse's --help exits 0 after printing
        cli.main(["eval", "longbench", "--help"])
    assert err.value.code == 0
    assert "LongBench" in capsys.readouterr().out
