"""Every builder message of issue 17, through the CLI: what, where, hint and exit code."""

from __future__ import annotations

import hashlib
import http.server
import shutil
import socket
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import ClassVar

import pytest
from click.testing import CliRunner

from fwbuild.cli import main

ROOT = Path(__file__).resolve().parents[2]
PAYLOAD = b"pinned bytes\n" * 1000
DIGEST = hashlib.sha256(PAYLOAD).hexdigest()


def _run(*args: str) -> tuple[int, str]:
    result = CliRunner().invoke(main, list(args), prog_name="fwbuild")
    assert result.exception is None or isinstance(result.exception, SystemExit), result.exception
    return result.exit_code, result.output


def _recipe(tmp_path: Path, body: str, name: str = "r.toml") -> Path:
    path = tmp_path / name
    path.write_text('[recipe]\nname = "r"\ntarget = "virtual"\n[initramfs]\n'
                    'kernel_package = "linux-image-cloud-arm64"\n' + body)
    return path


def test_set_value_is_blamed_on_set_not_on_the_file(site: Path) -> None:
    code, out = _run("build", str(site), "--set", "site.http_port=eighty")
    assert code == 2
    assert "Error: expected an integer, got 'eighty' (--set site.http_port=eighty)\n" in out
    assert f"Hint: give a whole number, e.g. 8080; the value comes from --set, not from {site}" in out
    code, out = _run("build", str(site), "--set", "site.http_host=", "--set", "site.http_port=80")
    assert code == 2
    assert "Error: HTTP host is empty (--set site.http_host=)" in out


def test_quoted_integer_says_remove_the_quotes(tmp_path: Path) -> None:
    recipe = _recipe(tmp_path, '[site]\nhttp_host = "h"\nhttp_port = "8080"\n')
    code, out = _run("build", str(recipe))
    assert code == 2
    assert f"Error: expected an integer, got '8080' ({recipe}: site.http_port)" in out
    assert "Hint: remove the quotes: `http_port = 8080` (TOML quotes make a string)" in out
    recipe = _recipe(tmp_path, '[site]\nhttp_host = "h"\n[bootimg]\ncompress_kernel = "false"\n')
    code, out = _run("build", str(recipe))
    assert code == 2
    assert "Hint: remove the quotes: `compress_kernel = false`" in out


def test_out_in_proc_says_which_option_and_why(site: Path, tmp_path: Path) -> None:
    code, out = _run("build", str(site), "--out", "/proc/x")
    assert code == 2
    assert "Error: cannot create the build output directory: no such file or directory (--out /proc/x)" in out
    assert "Hint: /proc takes no new files (a virtual file system such as /proc or /sys?)" in out
    image = tmp_path / "e.bin"
    assert _run("eeprom", "synth", str(image))[0] == 0
    code, out = _run("recovery", "archive", "--virtual", "--eeprom", str(image), "--out", "/proc/kit.tar.gz")
    assert code == 2
    assert "Error: cannot write the output: no such file or directory (--out /proc/kit.tar.gz)" in out
    assert ".tmp" not in out
    code, out = _run("sig", "create", str(image), "--out", "/proc/e.sig")
    assert code == 2
    assert "Error: cannot write the output: no such file or directory (--out /proc/e.sig)" in out


def test_no_temp_file_name_in_errors(tmp_path: Path) -> None:
    image = tmp_path / "e.bin"
    assert _run("eeprom", "synth", str(image))[0] == 0
    (tmp_path / "afile").write_text("x")
    code, out = _run("recovery", "archive", "--virtual", "--eeprom", str(image),
                     "--out", str(tmp_path / "afile/kit.tar.gz"))
    assert code == 2
    assert (f"Error: cannot write the output: {tmp_path}/afile is a file, not a directory "
            f"(--out {tmp_path}/afile/kit.tar.gz)") in out
    assert "Hint: choose another path" in out
    code, out = _run("recovery", "image", str(tmp_path / "afile/kit.img"), "--virtual", "--eeprom", str(image))
    assert code == 2
    assert f"(OUT {tmp_path}/afile/kit.img)" in out
    for leak in (".tmp", "fwbuild-tmp", ".part"):
        assert leak not in out
    code, out = _run("eeprom", "synth", str(tmp_path / "afile/e.bin"))  # any atomic_write
    assert code == 1
    assert out == f"Error: {tmp_path}/afile is a file, not a directory ({tmp_path}/afile/e.bin)\n"


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def test_fetch_errors_say_the_cause_and_list_every_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FWBUILD_CACHE", str(tmp_path / "cache"))
    port = _free_port()  # nothing listens there: connection refused
    other = hashlib.sha256(b"other").hexdigest()
    recipe = _recipe(tmp_path, f"""[site]
http_host = "h"
[eeprom]
base = "source:eeprom"
[recovery]
recovery_bin = "source:rbin"
[sources.eeprom]
url = "http://127.0.0.1:{port}/pieeprom.bin"
sha256 = "{DIGEST}"
[sources.rbin]
url = "http://127.0.0.1:{port}/recovery.bin"
sha256 = "{other}"
""")
    code, out = _run("fetch", str(recipe))
    assert code == 1
    assert "Error: 2 of 2 sources could not be fetched" in out
    assert f"  eeprom: http://127.0.0.1:{port}/pieeprom.bin  sha256 {DIGEST}\n" in out
    assert f"  rbin: http://127.0.0.1:{port}/recovery.bin  sha256 {other}\n" in out
    assert out.count("cannot fetch") == 2 and out.count(": connection refused") == 2
    assert "ConnectionError" not in out and "RECIPE" not in out
    assert f"`fwbuild fetch {recipe} --import DIR`" in out
    code, out = _run("fetch", str(recipe), "--only", "eeprom")
    assert code == 1
    assert f"Error: cannot fetch eeprom: connection refused (http://127.0.0.1:{port}/pieeprom.bin)" in out
    assert f"  eeprom: http://127.0.0.1:{port}/pieeprom.bin  sha256 {DIGEST}" in out
    assert "rbin" not in out
    assert f"Hint: check the network and the URL, or copy the file here and seed the cache with " \
           f"`fwbuild fetch {recipe} --import DIR`" in out


class _Recorder(http.server.BaseHTTPRequestHandler):
    paths: ClassVar[list[str]] = []

    def log_message(self, *args: object) -> None:
        pass

    def do_GET(self) -> None:
        self.paths.append(self.path)
        self.send_response(200)
        self.send_header("Content-Length", str(len(PAYLOAD)))
        self.end_headers()
        self.wfile.write(PAYLOAD)


@pytest.fixture
def recorder() -> Iterator[tuple[str, list[str]]]:
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Recorder)
    _Recorder.paths = []
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}", _Recorder.paths
    httpd.shutdown()
    httpd.server_close()


def test_unused_source_is_not_downloaded_and_import_fails_while_missing(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, recorder: tuple[str, list[str]]) -> None:
    monkeypatch.setenv("FWBUILD_CACHE", str(tmp_path / "cache"))
    server, paths = recorder
    recipe = _recipe(tmp_path, f"""[site]
http_host = "h"
[recovery]
recovery_bin = "source:used"
[sources.used]
url = "{server}/used.bin"
sha256 = "{DIGEST}"
[sources.spare]
url = "{server}/spare.bin"
sha256 = "{DIGEST}"
""")
    code, out = _run("fetch", str(recipe), "--only", "recovery")
    assert code == 0, out
    assert "note: source `spare` is used by no recipe key: not fetched" in out
    assert "used: " in out and "spare: " not in out.replace("source `spare`", "")
    assert paths == ["/used.bin"]


def test_fetch_import_fails_while_pins_are_missing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FWBUILD_CACHE", str(tmp_path / "cache"))
    other = hashlib.sha256(b"other").hexdigest()
    recipe = _recipe(tmp_path, f"""[site]
http_host = "h"
[eeprom]
base = "source:eeprom"
[recovery]
recovery_bin = "source:rbin"
[sources.eeprom]
url = "https://example.org/pieeprom.bin"
sha256 = "{DIGEST}"
[sources.rbin]
url = "https://example.org/recovery.bin"
sha256 = "{other}"
""")
    drop = tmp_path / "drop"
    drop.mkdir()
    (drop / "anything.bin").write_bytes(PAYLOAD)
    code, out = _run("fetch", str(recipe), "--import", str(drop))
    assert code == 1
    assert "imported: eeprom" in out
    assert f"Error: 1 pinned file(s) still missing from the cache after the import ({drop})" in out
    assert f"  rbin: https://example.org/recovery.bin  sha256 {other}" in out
    assert f"Hint: add them to {drop} and run `fwbuild fetch {recipe} --import {drop}` again" in out
    (drop / "other.bin").write_bytes(b"other")
    code, out = _run("fetch", str(recipe), "--import", str(drop))
    assert code == 0, out


def test_times_carry_their_zone(site: Path, tmp_path: Path, session_keys: Path) -> None:
    code, out = _run("build", str(site), "--only", "eeprom", "--out", "out")
    assert code == 0
    assert "SOURCE_DATE_EPOCH 1767225600 (2026-01-01 00:00:00 UTC)" in out
    data = tmp_path / "data.bin"
    data.write_bytes(b"x")
    assert _run("sig", "create", str(data), "--timestamp", "1767225600")[0] == 0
    code, out = _run("sig", "verify", str(data), f"{data}.sig")
    assert code == 0
    assert "ts 1767225600 (2026-01-01 00:00:00 UTC)" in out


def test_keys_dir_is_relative_to_the_recipe(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FWBUILD_CACHE", str(tmp_path / "cache"))
    site = tmp_path / "site"
    site.mkdir()
    shutil.copy(ROOT / "recipes/virtual.toml", site / "virtual.toml")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    code, out = _run("build", "../site/virtual.toml", "--only", "eeprom")
    assert code == 1
    assert f"Error: boot-signing key not found ({site}/keys/boot-signing.pem)" in out
    assert f"Hint: create the site keys with `fwbuild keys init {site}/keys`" in out
    code, out = _run("build", "../site/virtual.toml", "--only", "eeprom", "--init-keys")
    assert code == 0, out
    created = out.index(f"creating the site keys in {site}/keys")
    assert created < out.index("[1/3] check_inputs")
    assert (site / "keys/boot-signing.pem").is_file()
    assert not (elsewhere / "keys").exists(), "no second site key in the current directory"


def test_ambiguous_keys_dir_is_refused(tmp_path: Path, session_keys: Path,
                                       monkeypatch: pytest.MonkeyPatch) -> None:
    site = tmp_path / "site"
    site.mkdir()
    shutil.copy(ROOT / "recipes/virtual.toml", site / "virtual.toml")
    shutil.copytree(session_keys, tmp_path / "keys")  # keys made beside the cwd, as before
    monkeypatch.chdir(tmp_path)
    code, out = _run("build", "site/virtual.toml", "--only", "eeprom", "--init-keys")
    assert code == 1
    assert (f"Error: keys.dir = 'keys' is ambiguous: it means {site}/keys (relative to the recipe), "
            f"which holds no keys, but {tmp_path}/keys (relative to the current directory) does "
            "(site/virtual.toml: keys.dir)") in out
    assert f"Hint: pass --keys {tmp_path}/keys (or set keys.dir to that absolute path" in out
    assert not (site / "keys").exists(), "nothing created"


def test_keys_init_prints_the_absolute_directory(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    code, out = _run("keys", "init", "k")
    assert code == 0
    assert out.startswith(f"creating the site keys in {tmp_path}/k\n")
    assert f"boot-signing key: {tmp_path}/k/boot-signing.pem" in out
