"""`fwbuild virtual-node demo`: a virtual node's whole life against this server."""

from __future__ import annotations

from pathlib import Path

import click


@click.command("demo")
@click.option("--recipe", type=click.Path(dir_okay=False, path_type=Path),
              default=Path("recipes/virtual.toml"), show_default=True, help="The virtual recipe.")
@click.option("--out", "out_root", type=click.Path(file_okay=False, path_type=Path), default=Path("out"),
              show_default=True, help="Output root of the build.")
@click.option("--keys", "keys_dir", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Site keys, created when missing [default: the recipe's keys.dir, beside it].")
@click.option("--work", type=click.Path(file_okay=False, path_type=Path), default=Path("out/demo"),
              show_default=True, help="Server state, sshd files, node flash, console logs.")
@click.option("--mac", default="dc:a6:32:00:00:01", show_default=True, help="The virtual node's Ethernet MAC.")
@click.option("--timeout", type=float, default=400.0, show_default=True,
              help="Seconds for each power-on of the node.")
@click.option("--json", "as_json", is_flag=True,
              help="End with one JSON object: who enrolled the node, its flashes and its boots.")
def demo_cmd(recipe: Path, out_root: Path, keys_dir: Path | None, work: Path, mac: str, timeout: float,
             as_json: bool) -> None:
    """A node's whole life on this machine, with nothing done by the harness.

    Builds and verifies the virtual artifact set, starts the server and an OpenSSH
    entrypoint on 127.0.0.1 (needs root, for sshd), then: the recovery card resets a
    virtual Pi 5's EEPROM; its first boot on the virtual walt-net runs the VPN initramfs,
    which enrolls the node and flashes its own EEPROM; it boots through the SSH
    entrypoint; `fwbuild nodes set-mode` switches it to permissive; at its next boot the
    node re-flashes itself and boots in the new mode.
    """
    import json

    from fwbuild.keys import recipe_keys_dir
    from fwbuild.recipe import load_recipe

    from ..virtual_demo import run_demo

    if keys_dir is None:  # the same keys `fwbuild build RECIPE` uses
        parsed = load_recipe(recipe)
        keys_dir = recipe_keys_dir(parsed.directory, parsed.keys.dir, str(recipe))

    def say(line: str) -> None:
        click.echo(f"[demo] {line}", err=as_json)

    report = run_demo(recipe, out_root=out_root, keys_dir=keys_dir, work=work, mac=mac,
                      timeout=timeout, log=say)
    summary = report.life.summary()
    def echo(line: str) -> None:
        click.echo(line, err=as_json)

    echo("")
    echo(f"artifact set   {report.out_dir}  (manifest.json lists every file)")
    echo(f"node flash     {report.node_eeprom}  (0600: holds the node's credentials)")
    echo(f"server config  {report.config}")
    echo(f"console log    {report.console_log}")
    for event in report.events:
        echo(f"server event   {event['artifact']:<14} {event['result']:<12} from {event['client']}")
    for flash in summary["flashes"]:
        echo(f"flash          reason {flash['reason']}, mode {flash['mode']}")
    for boot in summary["boots"]:
        echo(f"boot           via {boot['via']}, mode {boot['mode']}, root reached")
    if as_json:
        click.echo(json.dumps(summary))
    if not report.ok:
        last = report.life.results[-1].reason if report.life.results else "no power-on"
        click.echo(f"Error: the node's life stopped early: {last} ({report.console_log})", err=True)
        raise SystemExit(1)
    if not as_json:
        click.echo("OK: the node enrolled itself, flashed itself twice and booted in both modes")
