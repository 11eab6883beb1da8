"""Command: completion (shell completion scripts)."""

from __future__ import annotations

import click

SHELLS = ("bash", "zsh", "fish")


@click.command("completion")
@click.argument("shell", type=click.Choice(SHELLS))
def completion_cmd(shell: str) -> None:
    """Print the completion script for SHELL (bash, zsh or fish) to stdout.

    \b
    bash:  fwbuild completion bash > ~/.local/share/bash-completion/completions/fwbuild
    zsh:   fwbuild completion zsh > "${fpath[1]}/_fwbuild"
    fish:  fwbuild completion fish > ~/.config/fish/completions/fwbuild.fish
    Or for the current shell only: eval "$(fwbuild completion bash)".
    """
    from click.shell_completion import get_completion_class

    from . import main

    cls = get_completion_class(shell)
    if cls is None:  # pragma: no cover - click ships all three
        raise click.UsageError(f"no completion support for {shell}")
    click.echo(cls(main, {}, "fwbuild", "_FWBUILD_COMPLETE").source())


COMMANDS = [completion_cmd]
