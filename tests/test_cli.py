"""The command table: every command is built, and a command whose module is broken fails loudly."""
import argparse

import pytest

from fdtrain import cli


def _subparser(parser: argparse.ArgumentParser, name: str) -> argparse.ArgumentParser:
    action = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return action.choices[name]


def test_every_command_is_wired_to_its_run_function():
    parser = cli.build_parser()
    for path, spec, _ in cli.COMMANDS:
        p = parser
        for name in path:
            p = _subparser(p, name)
        assert p.get_default("_cmd") == " ".join(path)
        assert p.get_default("_run").__name__ == "run_" + spec.split(":")[1], path
        assert "not built" not in p.format_help()


def test_a_missing_command_module_is_an_error_not_a_placeholder(monkeypatch):
    monkeypatch.setattr(cli, "COMMANDS", [*cli.COMMANDS, (("ghost",), "fdtrain.no_such_module:ghost", "gone")])
    with pytest.raises(ModuleNotFoundError, match="fdtrain.no_such_module"):
        cli.build_parser()
    monkeypatch.setattr(cli, "COMMANDS", [(("ghost",), "fdtrain.engine.commands:ghost", "no such function")])
    with pytest.raises(AttributeError, match="add_ghost_arguments"):
        cli.build_parser()
