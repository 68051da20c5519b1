"""The ``coral`` command: its version, its help, and each subcommand handed to its module's ``main``."""

import importlib.metadata
import sys
import types

import pytest

from ray_jobs import cli


def test_version_is_the_installed_distributions(capsys):
    with pytest.raises(SystemExit) as e:
        cli.main(["--version"])
    assert e.value.code == 0
    assert capsys.readouterr().out == f"coral {importlib.metadata.version('coral-retrieval')}\n"


def test_help_lists_every_command(capsys):
    with pytest.raises(SystemExit) as e:
        cli.main(["--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    for name in ("run", "serve", "check-cluster", "build-tiny-models", "--version"):
        assert name in out


@pytest.mark.parametrize("argv", [[], ["bogus"]], ids=["none", "unknown"])
def test_a_missing_or_unknown_command_is_a_usage_error(argv, capsys):
    with pytest.raises(SystemExit) as e:
        cli.main(argv)
    assert e.value.code == 2 and "usage: coral" in capsys.readouterr().err


def test_every_command_names_a_module_with_a_main_that_takes_prog():
    for module, _ in cli.COMMANDS.values():
        main = importlib.import_module(module).main
        assert "prog" in main.__code__.co_varnames, module


def test_a_command_gets_everything_after_it_and_its_exit_code(monkeypatch):
    calls = []
    fake = types.ModuleType("fake_command")
    fake.main = lambda argv, prog: calls.append((argv, prog)) or 3
    monkeypatch.setitem(sys.modules, "fake_command", fake)
    monkeypatch.setitem(cli.COMMANDS, "run", ("fake_command", "run"))
    argv = ["--config", "demo.yaml", "--help", "--version", "catalog.num_groups=4"]
    assert cli.main(["run", *argv]) == 3
    assert calls == [(argv, "coral run")]


def test_the_real_subcommand_help_names_coral(capsys):
    with pytest.raises(SystemExit) as e:
        cli.main(["run", "--help"])
    assert e.value.code == 0
    assert capsys.readouterr().out.startswith("usage: coral run")


def test_without_faiss_a_command_says_which_extra_to_install(monkeypatch, capsys):
    def missing(name):
        raise ModuleNotFoundError("No module named 'faiss'", name="faiss")

    monkeypatch.setattr(cli.importlib, "import_module", missing)
    assert cli.main(["run", "--config", "demo.yaml"]) == 2
    assert "coral-retrieval[cpu]" in capsys.readouterr().err
