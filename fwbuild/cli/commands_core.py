"""Commands: keys, sig."""

from __future__ import annotations

import json
import os
from pathlib import Path

import click

from .. import keys as keys_mod
from .. import sign
from ..fsutil import atomic_write
from ..layout import MANIFEST
from ._common import (
    emit_json,
    existing_file,
    format_epoch,
    json_option,
    note,
    progress_display,
    recipe_in_hints,
    state,
    write_failure,
)


@click.group("keys")
def keys_group() -> None:
    """Create and describe the boot-signing key and the SSH CA key."""


@keys_group.command("init")
@click.argument("directory", type=click.Path(file_okay=False, path_type=Path))
@click.option("--force", is_flag=True, help="Replace existing keys (old signatures stop verifying).")
def keys_init(directory: Path, force: bool) -> None:
    """Create boot-signing.pem (RSA-2048) and ssh-ca (ed25519) in DIRECTORY, mode 0600."""
    directory = directory.resolve()
    note(f"creating the site keys in {directory}")
    paths = keys_mod.init_keys(directory, force=force)
    click.echo(f"boot-signing key: {paths.boot_key} (public: {paths.boot_pub})")
    click.echo(f"SSH CA key:       {paths.ssh_ca} (public: {paths.ssh_ca_pub})")


@keys_group.command("show")
@click.argument("directory", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def keys_show(directory: Path, as_json: bool) -> None:
    """Print the fingerprints of the keys in DIRECTORY and the pubkey.bin digest."""
    summary = keys_mod.describe_keys(directory)
    if as_json:
        click.echo(json.dumps(summary.__dict__, indent=2, sort_keys=True))
        return
    click.echo(f"boot-signing key  sha256(SubjectPublicKeyInfo) {summary.boot_key_sha256}")
    click.echo(f"pubkey.bin        sha256 {summary.pubkey_bin_sha256}  (the OTP key hash)")
    click.echo(f"SSH CA            {summary.ssh_ca_fingerprint}")


@click.group("sig")
def sig_group() -> None:
    """Create and verify Raspberry Pi `.sig` files (sha256, ts, rsa2048)."""


@sig_group.command("create")
@click.argument("file", type=existing_file())
@click.option("--key", "key_path", type=click.Path(path_type=Path),
              help="RSA-2048 private PEM: adds the rsa2048 line.")
@click.option("--target-soc", help="Add a `target-soc:` line (e.g. 2712).")
@click.option("--timestamp", type=click.IntRange(0, 0xFFFFFFFF), help="ts value (default: SOURCE_DATE_EPOCH, else now).")
@click.option("--out", "out", type=click.Path(dir_okay=False, path_type=Path),
              help="Output file (default: FILE.sig, '-' for stdout).")
def sig_create(file: str, key_path: Path | None, target_soc: str | None,
               timestamp: int | None, out: Path | None) -> None:
    """Write the .sig file of FILE."""
    data = Path(file).read_bytes()
    key = keys_mod.load_boot_key(key_path) if key_path else None
    ts = timestamp if timestamp is not None else sign.source_date_epoch()
    text = sign.build_sig(data, ts, target_soc=target_soc, key=key)
    if out is not None and str(out) == "-":
        click.echo(text.decode(), nl=False)
        return
    target = out or Path(f"{file}.sig")
    try:
        atomic_write(target, text)
    except OSError as exc:
        raise write_failure(exc, "--out" if out else "FILE.sig", target) from None
    click.echo(f"wrote {target}")


@sig_group.command("verify")
@click.argument("file", type=existing_file())
@click.argument("sigfile", type=existing_file())
@click.option("--key", "key_path", type=click.Path(path_type=Path),
              help="RSA public (or private) PEM to check the rsa2048 line with.")
def sig_verify(file: str, sigfile: str, key_path: Path | None) -> None:
    """Check FILE against SIGFILE; exit 1 with the reason when it does not match."""
    parsed = sign.parse_sig(Path(sigfile).read_bytes(), sigfile)
    key = keys_mod.load_public_key(key_path) if key_path else None
    sign.verify_sig(Path(file).read_bytes(), parsed, key, where=sigfile)
    checked = "sha256 and rsa2048" if key else "sha256 (no --key: rsa2048 not checked)"
    click.echo(f"OK: {file} matches {sigfile} ({checked}, ts {format_epoch(parsed.ts)})")



_set_option = click.option(
    "--set", "overrides", multiple=True, metavar="KEY=VALUE",
    help="Override a recipe value, e.g. --set site.http_host=boot.example.org (repeatable; later wins).")


def _split_only(values: tuple[str, ...]) -> list[str]:
    return [name.strip() for value in values for name in value.split(",") if name.strip()]


def _prepare_out_root(out_root: Path) -> None:
    try:
        out_root.mkdir(parents=True, exist_ok=True)
        probe = out_root / f".fwbuild-write-test-{os.getpid()}"
        probe.touch()
        probe.unlink()
    except OSError as exc:
        raise write_failure(exc, "--out", out_root, what="cannot create the build output directory") from None


@click.command("build")
@click.argument("recipe", type=click.Path(dir_okay=False, path_type=Path))
@_set_option
@click.option("--out", "out_root", type=click.Path(file_okay=False, path_type=Path), default=Path("out"),
              show_default=True, help="Output root: the build is published as OUT/<recipe name>.")
@click.option("--keys", "keys_dir", type=click.Path(file_okay=False, path_type=Path),
              help="Key directory (default: the recipe's keys.dir, relative to the recipe file).")
@click.option("--offline", is_flag=True, help="Use only the cache; fail naming every missing file.")
@click.option("--init-keys", is_flag=True,
              help="Create the key directory first when it holds no keys yet (never replaces keys).")
@click.option("--only", "only", multiple=True, metavar="STEP[,STEP]",
              help="Build only these steps and what they need (eeprom, initramfs, bootimg, recovery), "
                   "e.g. --only eeprom,recovery: no kernel packages are fetched.")
@json_option
def build_cmd(recipe: Path, overrides: tuple[str, ...], out_root: Path, keys_dir: Path | None,
              offline: bool, init_keys: bool, only: tuple[str, ...], as_json: bool) -> None:
    """Build RECIPE into a signed, reproducible artifact set under OUT/<name>/."""
    from ..build import build as run_build
    from ..recipe import load_recipe
    from ..sources import unused_sources

    parsed = load_recipe(recipe, overrides)
    steps = _split_only(only)
    if keys_dir is not None:
        keys_dir = keys_dir.resolve()
    else:
        keys_dir = keys_mod.recipe_keys_dir(parsed.directory, parsed.keys.dir, str(recipe))
    if init_keys and not keys_mod.KeyPaths(keys_dir).boot_key.exists():
        note(f"creating the site keys in {keys_dir} (keep them: nodes trust this boot-signing key)")
        keys_mod.init_keys(keys_dir)
    note(f"site keys: {keys_dir}")
    for name in unused_sources(parsed):
        note(f"note: source `{name}` is used by no recipe key: not fetched")
    _prepare_out_root(out_root)
    with progress_display(f"build {parsed.name}") as display, recipe_in_hints(recipe):
        result = run_build(parsed, out_root=out_root, keys_dir=keys_dir, offline=offline,
                           progress=display, only=steps)
    manifest = result.manifest
    if as_json:
        emit_json({"recipe": parsed.name, "out_dir": str(result.out_dir),
                   "manifest": str(result.out_dir / MANIFEST), "steps": list(result.steps),
                   "cached_steps": list(result.cached_steps), "keys_dir": str(keys_dir),
                   "source_date_epoch": manifest["source_date_epoch"],
                   "artifacts": manifest["artifacts"]})
        return
    if not state().quiet:
        for rel, entry in sorted(manifest["artifacts"].items()):
            click.echo(f"{entry['size']:>10}  {entry['sha256'][:16]}  {result.out_dir / rel}")
    partial = f" (steps: {', '.join(result.steps)})" if steps else ""
    cached = f" (from cache: {', '.join(result.cached_steps)})" if result.cached_steps else ""
    click.echo(f"built {parsed.name}{partial}: {result.out_dir}/manifest.json{cached}")
    note(f"SOURCE_DATE_EPOCH {format_epoch(manifest['source_date_epoch'])}")


@click.command("fetch")
@click.argument("recipe", type=click.Path(dir_okay=False, path_type=Path), required=False)
@_set_option
@click.option("--import", "import_dir", type=click.Path(file_okay=False, path_type=Path),
              help="Seed the cache from the files in this directory (matched by sha256).")
@click.option("--offline", is_flag=True, help="Check the cache only; fail naming every missing file.")
@click.option("--refresh-apt", is_flag=True,
              help="Also refresh the arm64 package lists of the recipe's repositories "
                   "(the next build resolves packages anew; the manifest records the new pins).")
@click.option("--only", "only", multiple=True, metavar="STEP[,STEP]",
              help="Fetch only what these build steps read, e.g. --only eeprom,recovery "
                   "(no kernel or initramfs packages).")
@json_option
def fetch_cmd(recipe: Path | None, overrides: tuple[str, ...], import_dir: Path | None, offline: bool,
              refresh_apt: bool, only: tuple[str, ...], as_json: bool) -> None:
    """Download (or import) RECIPE's pinned sources into the cache."""
    from ..cache import Cache
    from ..pipeline import select_steps
    from ..recipe import load_recipe
    from ..sources import (
        MissingSourcesError,
        describe_source,
        fetch_all,
        import_directory,
        recipe_argument,
        unused_sources,
    )
    from ..steps import STEPS

    cache = Cache.default()
    parsed = load_recipe(recipe, overrides) if recipe else None
    steps = [s.name for s in select_steps(STEPS, _split_only(only)) if not s.always] if only else []
    if import_dir is not None:
        with progress_display("import") as display:
            result = import_directory(cache, import_dir, parsed, progress=display)
        if as_json:
            emit_json({"imported": list(result.imported), "ignored": list(result.ignored),
                       "missing": list(result.missing), "cache": str(cache.root)})
        else:
            click.echo(f"imported: {', '.join(result.imported) or 'nothing'}")
            if result.ignored:
                click.echo(f"ignored (no matching pin): {', '.join(result.ignored)}")
        if result.missing and parsed is not None:
            raise MissingSourcesError(
                f"{len(result.missing)} pinned file(s) still missing from the cache after the import",
                str(import_dir),
                f"add them to {import_dir} and run `fwbuild fetch {recipe_argument(parsed)} "
                f"--import {import_dir}` again",
                [describe_source(name, parsed.sources[name]) for name in result.missing])
        return
    if parsed is None or recipe is None:
        raise click.UsageError("give a RECIPE to fetch, or --import DIR")
    for name in unused_sources(parsed):
        note(f"note: source `{name}` is used by no recipe key: not fetched")
    packages = None
    with progress_display(f"fetch {parsed.name}") as display, recipe_in_hints(recipe):
        paths = fetch_all(cache, parsed, offline=offline, progress=display, steps=steps)
        if not offline and (not steps or {"initramfs", "bootimg"} & set(steps)):
            from ..initramfs.builder import prefetch_packages

            packages = prefetch_packages(parsed, cache, display)
        if refresh_apt:
            from ..initramfs.apt import AptSession
            from ..recipe import resolved_repositories

            AptSession(cache, resolved_repositories(parsed)).update(force=True, progress=display)
    if as_json:
        emit_json({"recipe": parsed.name, "cache": str(cache.root),
                   "sources": {name: {"path": str(path), "sha256": parsed.sources[name].sha256,
                                      "url": parsed.sources[name].url or None}
                               for name, path in paths.items()},
                   "unused_sources": unused_sources(parsed), "packages": packages,
                   "apt_refreshed": refresh_apt})
        return
    for name, path in paths.items():
        click.echo(f"{name}: {path}")
    if packages is not None:
        click.echo(f"{packages} arm64 package(s) in the cache")
    if refresh_apt:
        click.echo("apt package lists refreshed")
    click.echo(f"{len(paths)} source(s) of {parsed.name} in {cache.root}")


@click.command("verify")
@click.argument("out_dir", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("--key", "key_path", type=click.Path(path_type=Path),
              help="Expected boot-signing public key (PEM): every signature must be by it.")
@json_option
def verify_cmd(out_dir: Path, key_path: Path | None, as_json: bool) -> None:
    """Re-check an artifact set (OUT_DIR) against its manifest.json and its signatures."""
    from ..verify import verify_output

    key = keys_mod.load_public_key(key_path) if key_path else None
    report = verify_output(out_dir, key)
    if as_json:
        emit_json({"out_dir": str(out_dir), "verified": True, "steps": report.steps,
                   "checked": report.checked})
        return
    if not state().quiet:
        for line in report.checked:
            click.echo(f"ok  {line}")
    partial = f" (partial set: {', '.join(report.steps)})" if report.partial else ""
    click.echo(f"verified {out_dir}{partial}")


COMMANDS = [build_cmd, verify_cmd, fetch_cmd, keys_group, sig_group]
