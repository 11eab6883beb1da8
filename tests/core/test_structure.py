"""Structure contracts: the fwbuild core never imports the server; the command list is frozen.

- Import contract: `server` imports `fwbuild`, never the reverse. Every module under
  fwbuild/ is parsed (not imported) and its imports checked, wherever they sit (top level,
  inside functions, under TYPE_CHECKING). The one allowed exception is the CLI registration
  point, which adds the server's commands (server/cli/) to `fwbuild`.
- Command list: every command and subcommand path of `fwbuild`, frozen here so that a
  command cannot appear, vanish or move by accident; each one's `--help` exits 0.
"""

from __future__ import annotations

import ast
from pathlib import Path

import click
import pytest
from click.testing import CliRunner

from fwbuild.cli import main
from tests.conftest import ROOT

IMPORT_ALLOWED = {"fwbuild/cli/__init__.py"}  # the CLI registration point: `server.cli.register`

COMMANDS = """
fwbuild
fwbuild bootimg
fwbuild bootimg build
fwbuild bootimg extract
fwbuild bootimg list
fwbuild build
fwbuild completion
fwbuild eeprom
fwbuild eeprom diff
fwbuild eeprom edit
fwbuild eeprom extract
fwbuild eeprom inspect
fwbuild eeprom synth
fwbuild eeprom verify
fwbuild entrypoint
fwbuild entrypoint http
fwbuild entrypoint ssh
fwbuild fetch
fwbuild import-walt
fwbuild initramfs
fwbuild initramfs build
fwbuild initramfs list
fwbuild initramfs why
fwbuild keys
fwbuild keys init
fwbuild keys show
fwbuild nodes
fwbuild nodes forget
fwbuild nodes label
fwbuild nodes list
fwbuild nodes revoke
fwbuild nodes set-mode
fwbuild nodes show
fwbuild recovery
fwbuild recovery archive
fwbuild recovery image
fwbuild recovery write
fwbuild rootfs
fwbuild rootfs build
fwbuild rootfs prefetch
fwbuild serve
fwbuild sig
fwbuild sig create
fwbuild sig verify
fwbuild verify
fwbuild virtual-node
fwbuild virtual-node boot
fwbuild virtual-node demo
""".strip().splitlines()


def _imported_modules(tree: ast.AST) -> list[tuple[int, str]]:
    found: list[tuple[int, str]] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.append((node.lineno, node.module))
        elif (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
              and node.func.attr == "import_module" and node.args
              and isinstance(node.args[0], ast.Constant) and isinstance(node.args[0].value, str)):
            found.append((node.lineno, node.args[0].value))
    return found


def _server_imports(path: Path) -> list[str]:
    tree = ast.parse(path.read_text(), str(path))
    return [f"{path.relative_to(ROOT)}:{line}: {name}" for line, name in _imported_modules(tree)
            if name == "server" or name.startswith("server.")]


def test_fwbuild_core_never_imports_server() -> None:
    modules = sorted((ROOT / "fwbuild").rglob("*.py"))
    assert len(modules) > 50
    offenders = [hit for path in modules if str(path.relative_to(ROOT)) not in IMPORT_ALLOWED
                 for hit in _server_imports(path)]
    assert offenders == [], "fwbuild/ must not import server/ (move the code to server/):\n" \
        + "\n".join(offenders)


def test_the_allowed_import_is_the_registration_point() -> None:
    hits = _server_imports(ROOT / "fwbuild/cli/__init__.py")
    assert [hit.rsplit(": ", 1)[1] for hit in hits] == ["server.cli"]


def test_the_contract_check_sees_imports_anywhere(tmp_path: Path) -> None:
    source = ("import os\nfrom server.config import x\ndef f():\n    import server.db\n"
              "    from . import server\nimportlib.import_module('server.web')\n")
    names = [name for _, name in _imported_modules(ast.parse(source))]
    assert names == ["os", "server.config", "server.db", "server.web"]


def _command_paths(command: click.Command, path: str) -> list[str]:
    paths = [path]
    if isinstance(command, click.Group):
        for name in sorted(command.commands):
            paths += _command_paths(command.commands[name], f"{path} {name}")
    return paths


def test_command_list_is_frozen() -> None:
    assert _command_paths(main, "fwbuild") == COMMANDS, \
        "a command was added, removed or moved: update COMMANDS (and the README) on purpose"


@pytest.mark.parametrize("path", COMMANDS)
def test_every_command_has_help(path: str) -> None:
    result = CliRunner().invoke(main, [*path.split()[1:], "--help"], prog_name="fwbuild")
    assert result.exit_code == 0, result.output
    assert result.output.startswith(f"Usage: {path}"), result.output[:200]
