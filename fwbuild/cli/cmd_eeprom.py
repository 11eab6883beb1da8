"""`fwbuild eeprom ...`: inspect, extract, edit, verify, diff and synthesize pieeprom.bin images
(Raspberry Pi 4 / 2711, 512 KiB, and Raspberry Pi 5 / 2712, 2 MiB)."""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import click

from ..errors import FwbuildError
from ..fsutil import atomic_write, mode_for
from ._common import emit_json, existing_file, format_epoch, json_option


def _read(path: str) -> bytes:
    return Path(path).read_bytes()


@contextlib.contextmanager
def _about(path: str) -> Iterator[None]:
    """An image error without a location names the image file."""
    try:
        yield
    except FwbuildError as exc:
        if exc.where is None:
            exc.where = path
        raise


def _warn(warnings: Any) -> None:
    """Print bootconf warnings (BootconfWarning) to stderr, like errors but not fatal."""
    for warning in warnings:
        click.echo(f"Warning: {warning}", err=True)
        if warning.hint:
            click.echo(f"Hint: {warning.hint}", err=True)


def _write_or_print(data: bytes, out: str | None) -> None:
    if out is None:
        sys.stdout.buffer.write(data)
        sys.stdout.flush()
    else:
        atomic_write(out, data, mode_for(data))


@click.group("eeprom")
def eeprom() -> None:
    """Read and edit Raspberry Pi 4 (2711) and Raspberry Pi 5 (2712) EEPROM images (pieeprom.bin)."""


@eeprom.command("inspect")
@click.argument("image", type=existing_file())
@json_option
def inspect_cmd(image: str, as_json: bool) -> None:
    """Show the layout, section table, config, pubkey, signature status and timestamp."""
    from ..eeprom.assemble import inspect_image

    with _about(image):
        info = inspect_image(_read(image))
    if as_json:
        emit_json(info)
        return
    click.echo(_render_info(info))


def _render_info(info: dict[str, Any]) -> str:
    kind = "virtual (synthetic fwbuild image)" if info["virtual"] else "firmware"
    ts = info["timestamp"]
    lines = [
        f"board:        {info['board']}",
        f"layout:       {info['layout']} ({kind})",
        f"timestamp:    {format_epoch(ts) if ts is not None else 'unset'}",
        f"pubkey.bin:   {info['pubkey_sha256']}",
        f"bootconf.sig: {info['bootconf_sig']}",
        "files:",
    ]
    for name, entry in info["files"].items():
        lines.append(f"  {name:13} {entry['length']:5} B (max {entry['capacity']})")
    lines.append("sections:")
    for section in info["sections"]:
        lines.append(f"  {section['offset']:#09x} {section['magic']} {section['kind']:8} "
                     f"{section['name']:12} {section['length']}")
    lines.append("bootconf.txt:")
    config = info["config"]
    lines += [f"  {line}" for line in (config or "(absent)").splitlines()]
    return "\n".join(lines)


@eeprom.command("extract")
@click.argument("image", type=existing_file())
@click.option("--file", "name", default="bootconf.txt", show_default=True,
              help="The file to extract (bootconf.txt, bootconf.sig, pubkey.bin, cacert.der, ...).")
@click.option("--out", type=click.Path(dir_okay=False), help="Write to this file instead of stdout.")
def extract_cmd(image: str, name: str, out: str | None) -> None:
    """Print (or write) one file of the image; bootconf.txt by default."""
    from ..eeprom.image import parse_image

    _write_or_print(parse_image(_read(image)).read_file(name), out)


@eeprom.command("edit")
@click.argument("image", type=existing_file())
@click.option("--out", required=True, type=click.Path(dir_okay=False), help="The edited image.")
@click.option("--config", type=existing_file(), help="New bootconf.txt (written byte for byte).")
@click.option("--digest", type=existing_file(),
              help="An externally made bootconf.sig (rpi-eeprom-digest, an HSM) stored as is; "
                   "its hash line must match the config.")
@click.option("--pubkey", type=existing_file(), help="RSA-2048 public key PEM to store as pubkey.bin.")
@click.option("--sign-key", type=existing_file(),
              help="RSA-2048 private key PEM: writes bootconf.sig and pubkey.bin of this key.")
@click.option("--cacert", type=existing_file(), help="DER CA certificate to store as cacert.der.")
@click.option("--timestamp", type=click.IntRange(0, 0xFFFFFFFF), help="Update timestamp (also the bootconf.sig ts).")
@click.option("--strict", is_flag=True, help="Unknown keys are errors, not warnings.")
@click.option("--no-validate", is_flag=True, help="Do not check the config values (raw edit).")
def edit_cmd(image: str, out: str, config: str | None, digest: str | None, pubkey: str | None,
             sign_key: str | None, cacert: str | None, timestamp: int | None, strict: bool,
             no_validate: bool) -> None:
    """Write a new image, like `rpi-eeprom-config IMAGE --config F [--digest SIG] [--pubkey PEM] --out OUT`."""
    from ..eeprom.edit import EditRequest, NamedBytes, check_options, edit_image
    from ..keys import load_boot_key, load_public_key

    check_options(strict=strict, validate=not no_validate, pubkey=pubkey is not None,
                  sign_key=sign_key is not None, digest=digest is not None)
    request = EditRequest(
        config=NamedBytes(config, _read(config)) if config is not None else None,
        digest=NamedBytes(digest, _read(digest)) if digest is not None else None,
        pubkey=load_public_key(Path(pubkey)) if pubkey is not None else None,
        sign_key=load_boot_key(Path(sign_key)) if sign_key is not None else None,
        cacert=_read(cacert) if cacert is not None else None,
        timestamp=timestamp, strict=strict, validate=not no_validate)
    result = edit_image(_read(image), image, request)
    _warn(result.warnings)
    atomic_write(out, result.data, mode_for(result.data))


@eeprom.command("verify")
@click.argument("image", type=existing_file())
@click.option("--key", type=existing_file(), help="Also require bootconf.sig and pubkey.bin to match this key.")
@click.option("--strict", is_flag=True, help="Unknown bootconf.txt keys are errors, not warnings.")
@json_option
def verify_cmd(image: str, key: str | None, strict: bool, as_json: bool) -> None:
    """Check structure, config and bootconf.sig; exit 1 with the reason when anything is off."""
    from ..eeprom.assemble import verify_eeprom
    from ..keys import load_public_key

    public = load_public_key(Path(key)) if key is not None else None
    with _about(image):
        report = verify_eeprom(_read(image), public, strict=strict)
    if as_json:
        emit_json({"ok": True, "image": image, "soc": report.soc, "layout": report.layout,
                   "virtual": report.virtual, "signed": report.signed,
                   "pubkey_sha256": report.pubkey_sha256, "timestamp": report.timestamp,
                   "config_sha256": report.config_sha256, "settings": report.settings,
                   "warnings": [{"warning": w.what, "where": w.where, "hint": w.hint}
                                for w in report.warnings]})
        return
    _warn(report.warnings)
    signature = "signed (rsa2048)" if report.signed else "unsigned"
    virtual = ", virtual" if report.virtual else ""
    click.echo(f"OK: {image}: {report.soc} {report.layout} layout{virtual}, bootconf.txt {signature}, "
               f"pubkey.bin {report.pubkey_sha256 or 'none'}, timestamp "
               f"{format_epoch(report.timestamp) if report.timestamp is not None else 'unset'}")


@eeprom.command("diff")
@click.argument("a", type=existing_file())
@click.argument("b", type=existing_file())
@json_option
def diff_cmd(a: str, b: str, as_json: bool) -> None:
    """Show config and section differences between two images (exit 1 when they differ)."""
    from ..eeprom.assemble import diff_images

    lines = diff_images(_read(a), _read(b))
    if as_json:
        emit_json({"identical": not lines, "a": a, "b": b, "differences": lines})
        if lines:
            click.get_current_context().exit(1)
        return
    for line in lines:
        click.echo(line)
    if lines:
        click.get_current_context().exit(1)
    click.echo("identical")


@eeprom.command("synth")
@click.argument("out", type=click.Path(dir_okay=False))
@click.option("--layout", type=click.Choice(["ab", "non-ab"]), help="2712: ab (default) or non-ab; 2711: non-ab.")
@click.option("--soc", type=click.Choice(["2712", "2711"]), default="2712", show_default=True,
              help="2712 = Raspberry Pi 5 (2 MiB), 2711 = Raspberry Pi 4 (512 KiB, non-AB only).")
def synth_cmd(out: str, layout: str | None, soc: str) -> None:
    """Write a synthetic (virtual) 2712 or 2711 image."""
    from ..eeprom.synthetic import synthetic_image

    chosen = layout if layout is not None else ("ab" if soc == "2712" else "non-ab")
    atomic_write(out, synthetic_image(chosen, soc))


COMMANDS = [eeprom]
