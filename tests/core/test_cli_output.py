"""The builder CLI's output: progress (plain, live, -q/-v), --json results and errors,
partial builds, help summaries and shell completion."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
from pathlib import Path

import click
import pytest
from click.testing import CliRunner

from fwbuild.build import build
from fwbuild.cache import Cache
from fwbuild.cli import main, summary_of
from fwbuild.cli._common import Display
from fwbuild.layout import Artifact
from fwbuild.pipeline import BuildContext, Step
from fwbuild.progress import report_bytes
from fwbuild.recipe import parse_recipe

ROOT = Path(__file__).resolve().parents[2]


A_BIN = Artifact("test.a", "a.bin")


def _steps(calls: list[str]) -> list[Step]:
    def make(ctx: BuildContext) -> None:
        calls.append("make")
        report_bytes(ctx.progress, "download thing", 0, 3_000_000)
        report_bytes(ctx.progress, "download thing", 3_000_000, 3_000_000)
        ctx.put(A_BIN, b"payload")

    return [Step("check", lambda ctx: None, always=True),
            Step("make", make, lambda ctx: {"v": "1"}, writes=(A_BIN,))]


def test_plain_display_names_each_step_cached_or_built_with_elapsed(tmp_path: Path,
                                                                    session_keys: Path) -> None:
    recipe = parse_recipe({"recipe": {"name": "demo", "target": "virtual"}, "site": {"http_host": "h"},
                           "initramfs": {"kernel_package": "k"}})
    cache = Cache(tmp_path / "cache")
    out = io.StringIO()
    display = Display("plain", out)
    build(recipe, out_root=tmp_path / "out", keys_dir=session_keys, cache=cache, progress=display,
          steps=_steps([]))
    lines = out.getvalue().splitlines()
    assert lines[0].startswith("[1/2] check: done in ") and lines[0].endswith(" s")
    assert lines[1].startswith("  download thing: 3.0 MB in ") and "MB/s)" in lines[1]
    assert lines[2].startswith("[2/2] make: built in ")
    out.truncate(0)
    out.seek(0)
    build(recipe, out_root=tmp_path / "out", keys_dir=session_keys, cache=cache, progress=display,
          steps=_steps([]))
    assert "[2/2] make: cached in " in out.getvalue()


def test_live_display_draws_steps_and_byte_rates(tmp_path: Path, session_keys: Path) -> None:
    recipe = parse_recipe({"recipe": {"name": "demo", "target": "virtual"}, "site": {"http_host": "h"},
                           "initramfs": {"kernel_package": "k"}})
    out = io.StringIO()
    display = Display("live", out, title="build demo")
    try:
        build(recipe, out_root=tmp_path / "out", keys_dir=session_keys, cache=Cache(tmp_path / "c"),
              progress=display, steps=_steps([]))
    finally:
        display.close()
    text = out.getvalue()
    assert "✓ [1/2] check: done in" in text and "✓ [2/2] make: built in" in text
    assert "download thing: 3.0 MB in" in text and "MB/s" in text
    from fwbuild.cli._live import AmountColumn, live_progress

    progress = live_progress(io.StringIO())
    task_id = progress.add_task("write", total=68_157_440, unit="bytes")
    progress.update(task_id, completed=34_078_720)
    assert str(AmountColumn().render(progress.tasks[task_id])).startswith("34.1 MB/68.2 MB")


def test_rich_is_not_imported_without_a_terminal(site: Path, tmp_path: Path) -> None:
    code = ("import sys\nfrom click.testing import CliRunner\nfrom fwbuild.cli import main\n"
            f"r = CliRunner().invoke(main, ['build', {str(site)!r}, '--only', 'eeprom', '--out', "
            f"{str(tmp_path / 'o')!r}])\n"
            "assert r.exit_code == 0, r.output\nprint('rich' in sys.modules)\n")
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                            cwd=ROOT, env=env)
    assert result.stdout.strip() == "False"


def test_partial_build_plain_lines_manifest_and_verify(site: Path, tmp_path: Path) -> None:
    runner = CliRunner()
    result = runner.invoke(main, ["build", str(site), "--only", "recovery", "--out", "out"])
    assert result.exit_code == 0, result.output
    for line in ("[1/4] check_inputs: done in", "[2/4] fetch_sources: done in",
                 "[3/4] eeprom: built in", "[4/4] recovery: built in"):
        assert line in result.output
    assert "built virtual (steps: eeprom, recovery)" in result.output
    assert f"site keys: {site.parent / 'keys'}" in result.output
    assert not (tmp_path / "cache" / "apt").exists(), "no kernel or initramfs packages were fetched"
    manifest = json.loads((tmp_path / "out/virtual/manifest.json").read_text())
    assert manifest["steps"] == ["eeprom", "recovery"]
    assert not any(a.startswith(("bootimg/", "initramfs/")) for a in manifest["artifacts"])
    result = runner.invoke(main, ["verify", "out/virtual"])
    assert result.exit_code == 0, result.output
    assert "ok  partial set: steps eeprom, recovery (built with --only)" in result.output
    assert "verified out/virtual (partial set: eeprom, recovery)" in result.output
    result = runner.invoke(main, ["verify", "out/virtual", "--json"])
    assert result.exit_code == 0
    assert json.loads(result.output)["steps"] == ["eeprom", "recovery"]
    again = runner.invoke(main, ["-q", "build", str(site), "--only", "eeprom,recovery", "--out", "out"])
    assert again.exit_code == 0
    assert again.output == ("built virtual (steps: eeprom, recovery): out/virtual/"
                            "manifest.json (from cache: eeprom, recovery)\n")


def test_verify_rejects_a_manifest_whose_steps_lie(site: Path) -> None:
    runner = CliRunner()
    assert runner.invoke(main, ["build", str(site), "--only", "eeprom", "--out", "out"]).exit_code == 0
    target = Path("out/virtual").resolve()
    path = target / "manifest.json"
    manifest = json.loads(path.read_text())
    manifest["steps"] = ["eeprom", "bootimg"]
    path.chmod(0o644)
    path.write_text(json.dumps(manifest))
    result = runner.invoke(main, ["verify", str(target)])
    assert result.exit_code == 1
    assert "step bootimg was built but bootimg/boot.img is not in the manifest" in result.output
    del manifest["steps"]  # a set built before steps were recorded still verifies
    path.write_text(json.dumps(manifest))
    result = runner.invoke(main, ["verify", str(target), "--json"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["steps"] == ["eeprom"]


def test_only_names_unknown_step(site: Path) -> None:
    result = CliRunner().invoke(main, ["build", str(site), "--only", "eprom,recovery"])
    assert result.exit_code == 2
    assert "Error: unknown build step 'eprom' (--only)" in result.output
    assert "Hint: did you mean `eeprom`? the steps are eeprom, initramfs, bootimg, recovery" in result.output


def test_build_json_result_and_json_errors(site: Path, tmp_path: Path) -> None:
    runner = CliRunner()
    result = runner.invoke(main, ["build", str(site), "--only", "eeprom", "--out", "out", "--json"])
    assert result.exit_code == 0
    document = json.loads(result.stdout)
    assert document["steps"] == ["eeprom"] and document["recipe"] == "virtual"
    assert document["source_date_epoch"] == 1767225600
    assert set(document["artifacts"]) == {f"eeprom/{v}/pieeprom.{e}" for v in
                                          ("recovery", "permissive", "enforced") for e in ("bin", "sig")}
    missing = runner.invoke(main, ["build", str(tmp_path / "nope.toml"), "--json"])
    assert missing.exit_code == 2
    assert json.loads(missing.stdout) == {"error": "recipe file not found", "where": str(tmp_path / "nope.toml"),
                                          "hint": "see recipes/ for examples", "exit_code": 2}
    usage = runner.invoke(main, ["verify", str(tmp_path / "absent"), "--json"], prog_name="fwbuild")
    assert usage.exit_code == 2
    error = json.loads(usage.stdout)
    assert error["exit_code"] == 2 and "does not exist" in error["error"]
    assert error["where"] == "fwbuild verify" and error["hint"] == "see `fwbuild verify --help`"


def test_recovery_json(tmp_path: Path) -> None:
    runner = CliRunner()
    image = tmp_path / "e.bin"
    assert runner.invoke(main, ["eeprom", "synth", str(image)]).exit_code == 0
    archive = runner.invoke(main, ["recovery", "archive", "--virtual", "--eeprom", str(image),
                                   "--epoch", "1767225600", "--out", str(tmp_path / "kit.tar.gz"), "--json"])
    assert archive.exit_code == 0, archive.output
    document = json.loads(archive.stdout)
    assert document["kind"] == "archive" and document["epoch"] == 1767225600
    assert sorted(document["files"]) == ["README.txt", "pieeprom.bin", "pieeprom.sig", "recovery.bin"]
    refused = runner.invoke(main, ["recovery", "write", str(tmp_path / "card.img"), "--from",
                                   str(tmp_path / "kit.tar.gz"), "--json"])
    assert refused.exit_code == 2
    assert json.loads(refused.stdout)["error"] == "--json needs --yes (a prompt cannot be answered in JSON)"
    written = runner.invoke(main, ["recovery", "write", str(tmp_path / "card.img"), "--from",
                                   str(tmp_path / "kit.tar.gz"), "--yes", "--json"])
    assert written.exit_code == 0, written.output
    document = json.loads(written.stdout)
    assert document["kind"] == "write" and document["verified"] is True
    assert document["files"] == json.loads(archive.stdout)["files"]


def test_recovery_write_plain_progress_shows_bytes_and_rate(tmp_path: Path) -> None:
    runner = CliRunner()
    image = tmp_path / "e.bin"
    assert runner.invoke(main, ["eeprom", "synth", str(image)]).exit_code == 0
    result = runner.invoke(main, ["recovery", "write", str(tmp_path / "card.img"), "--virtual",
                                  "--eeprom", str(image), "--yes"])
    assert result.exit_code == 0, result.output
    assert "  write: 68.2 MB in " in result.output and "  verify: 68.2 MB in " in result.output
    assert result.output.count("MB/s)") == 2
    quiet = runner.invoke(main, ["-q", "recovery", "write", str(tmp_path / "card.img"), "--virtual",
                                 "--eeprom", str(image), "--yes"])
    assert "MB/s" not in quiet.output and "FAKE" not in quiet.output
    assert quiet.output.endswith("(see README.txt)\n")


def _all_commands(command: click.Command, path: list[str]) -> list[tuple[list[str], click.Command]]:
    found = [(path, command)]
    if isinstance(command, click.Group):
        for name, sub in sorted(command.commands.items()):
            found += _all_commands(sub, [*path, name])
    return found


def test_every_command_has_help_and_a_whole_summary() -> None:
    runner = CliRunner()
    commands = _all_commands(main, [])
    assert len(commands) > 30
    for path, command in commands:
        result = runner.invoke(main, [*path, "--help"], prog_name="fwbuild")
        assert result.exit_code == 0, (path, result.output)
        assert "Usage: fwbuild" in result.output
        if not path:
            continue
        summary = command.get_short_help_str(limit=1000)
        assert summary, path
        assert not summary.endswith(("e.g", "e.g.", "i.e.", "(", "...")), (path, summary)
        assert summary.count("(") == summary.count(")"), (path, summary)
    listing = runner.invoke(main, ["bootimg", "--help"]).output
    assert "Copy the file PATH (e.g. config.txt, overlays/x.dtbo) out of BOOT_IMG" in " ".join(listing.split())
    listing = runner.invoke(main, ["recovery", "--help"]).output
    assert "(any 2 MiB image, e.g. a node's) into a recovery .tar.gz" in " ".join(listing.split())


def test_summary_of_keeps_abbreviations_and_parentheses() -> None:
    assert summary_of("Copy PATH (e.g. a.txt, b. c) out. More.") == "Copy PATH (e.g. a.txt, b. c) out"
    assert summary_of("Do it, i.e. now.\n\nDetails.") == "Do it, i.e. now"
    assert summary_of("No period") == "No period"


@pytest.mark.parametrize("shell, marker", [("bash", "complete -o nosort -F _fwbuild_completion fwbuild"),
                                           ("zsh", "#compdef fwbuild"),
                                           ("fish", "complete --no-files --command fwbuild")])
def test_completion_scripts(shell: str, marker: str) -> None:
    result = CliRunner().invoke(main, ["completion", shell])
    assert result.exit_code == 0
    assert marker in result.output and "_FWBUILD_COMPLETE" in result.output


def test_completion_protocol_completes_a_command() -> None:
    """What the printed bash script asks fwbuild for when the user presses TAB after `reco`."""
    env = {"_FWBUILD_COMPLETE": "bash_complete", "COMP_WORDS": "fwbuild reco", "COMP_CWORD": "1",
           "PATH": "/usr/bin:/bin"}
    result = subprocess.run([sys.executable, "-c", "from fwbuild.cli import main; main(prog_name='fwbuild')"],
                            env={**env, "PYTHONPATH": str(ROOT)}, capture_output=True, text=True, check=True)
    assert "plain,recovery" in result.stdout


def test_admin_builds_eeprom_and_recovery_from_imported_firmware_without_packages(
        tmp_path: Path, session_keys: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The walt-vpn recipe with its firmware pins replaced by ours: import, then a partial
    offline build; the apt keyring (absent here) and the kernel packages are never needed."""
    import hashlib
    import re

    from fwbuild.eeprom.synthetic import synthetic_image

    monkeypatch.setenv("FWBUILD_CACHE", str(tmp_path / "cache"))
    monkeypatch.chdir(tmp_path)
    drop = tmp_path / "drop"
    drop.mkdir()
    firmware = {"pieeprom": synthetic_image("ab"), "recovery_bin": b"\x00recovery.bin stand-in" * 100}
    text = (ROOT / "recipes/walt-vpn.toml").read_text()
    for name, data in firmware.items():
        (drop / f"{name}.bin").write_bytes(data)
        text = re.sub(rf"(\[sources\.{name}\]\nurl = )\"[^\"]+\"\nsha256 = \"[0-9a-f]+\"\nsize = \d+",
                      rf'\1"https://example.org/{name}.bin"\nsha256 = "{hashlib.sha256(data).hexdigest()}"'
                      rf"\nsize = {len(data)}", text)
    recipe = tmp_path / "walt-vpn.toml"
    recipe.write_text(text)
    runner = CliRunner()
    imported = runner.invoke(main, ["fetch", str(recipe), "--import", str(drop), "--json"])
    assert imported.exit_code == 0, imported.output
    assert json.loads(imported.stdout)["imported"] == ["pieeprom", "recovery_bin"]
    result = runner.invoke(main, ["build", str(recipe), "--only", "eeprom,recovery", "--offline",
                                  "--keys", str(session_keys), "--out", "out"])
    assert result.exit_code == 0, result.output
    assert "built walt-vpn (steps: eeprom, recovery)" in result.output
    assert not (tmp_path / "cache" / "apt").exists()
    verified = runner.invoke(main, ["verify", "out/walt-vpn"])
    assert verified.exit_code == 0, verified.output
    assert "partial set: eeprom, recovery" in verified.output
    full = runner.invoke(main, ["build", str(recipe), "--offline", "--keys", str(session_keys), "--out", "out"])
    assert full.exit_code == 1
    assert "apt repository keyring not found" in full.output
