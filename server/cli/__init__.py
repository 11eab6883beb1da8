"""The server's commands, registered into `fwbuild` by `register(main)`.

fwbuild/cli/__init__.py calls `register` once: it is the only place where the fwbuild
core's CLI names the server package (tests/core/test_structure.py holds that contract). The
commands here use the CLI plumbing of fwbuild.cli._common (output modes, errors, JSON).
"""

from __future__ import annotations

import click

from . import demo, nodes, serve, walt

COMMANDS: list[click.Command] = [*serve.COMMANDS, *nodes.COMMANDS, *walt.COMMANDS]


def register(main: click.Group) -> None:
    """Add `serve`, `entrypoint`, `nodes`, `import-walt` and `virtual-node demo` to `main`."""
    for command in COMMANDS:
        main.add_command(command)
    virtual = main.commands.get("virtual-node")
    if not isinstance(virtual, click.Group):
        raise TypeError("register the virtual-node group before the server commands")
    virtual.add_command(demo.demo_cmd)
