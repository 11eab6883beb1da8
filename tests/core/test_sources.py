"""Pinned sources against a real HTTP server on loopback: the cache never holds a bad or partial file."""

from __future__ import annotations

import hashlib
import http.server
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from click.testing import CliRunner

from fwbuild.cache import Cache
from fwbuild.cli import main
from fwbuild.errors import SourceError
from fwbuild.recipe import load_recipe, parse_recipe
from fwbuild.sources import (
    MissingSourcesError,
    check_offline,
    fetch_all,
    fetch_url,
    import_directory,
)

PAYLOAD = bytes(range(256)) * 4096  # 1 MiB
DIGEST = hashlib.sha256(PAYLOAD).hexdigest()


class _Handler(http.server.BaseHTTPRequestHandler):
    def log_message(self, *args: object) -> None:
        pass

    def do_GET(self) -> None:
        if self.path == "/good.bin" or self.path == "/other.bin":
            body = PAYLOAD if self.path == "/good.bin" else PAYLOAD[::-1]
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)
        elif self.path == "/cut.bin":
            # Announces the whole file, sends a third of it, then drops the connection.
            self.send_response(200)
            self.send_header("Content-Length", str(len(PAYLOAD)))
            self.end_headers()
            self.wfile.write(PAYLOAD[: len(PAYLOAD) // 3])
            self.wfile.flush()
            self.close_connection = True
        else:
            self.send_error(404)


@pytest.fixture(scope="module")
def server() -> Iterator[str]:
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()


@pytest.fixture
def cache(tmp_path: Path) -> Cache:
    return Cache(tmp_path / "cache")


def _blobs(cache: Cache) -> list[Path]:
    return sorted(p for p in (cache.root / "sha256").rglob("*") if p.is_file()) \
        if (cache.root / "sha256").exists() else []


def _leftovers(cache: Cache) -> list[Path]:
    return list((cache.root / "tmp").glob("*")) if (cache.root / "tmp").exists() else []


def test_good_file_is_cached_by_digest(server: str, cache: Cache) -> None:
    seen: list[tuple[str, int, int | None]] = []
    path = fetch_url(cache, f"{server}/good.bin", DIGEST, progress=lambda *a: seen.append(a))
    assert path.read_bytes() == PAYLOAD
    assert path == cache.blob_path(DIGEST)
    assert seen[-1] == ("good.bin", len(PAYLOAD), len(PAYLOAD))
    assert not _leftovers(cache)


def test_wrong_hash_is_fatal_and_caches_nothing(server: str, cache: Cache) -> None:
    with pytest.raises(SourceError) as info:
        fetch_url(cache, f"{server}/other.bin", DIGEST)
    assert "sha256 mismatch" in info.value.what
    assert _blobs(cache) == [] and not _leftovers(cache)


def test_cut_transfer_caches_nothing(server: str, cache: Cache) -> None:
    with pytest.raises(SourceError) as info:
        fetch_url(cache, f"{server}/cut.bin", DIGEST)
    assert "nothing was cached" in (info.value.hint or "")
    assert _blobs(cache) == [] and not _leftovers(cache)


def test_http_error_is_reported(server: str, cache: Cache) -> None:
    with pytest.raises(SourceError) as info:
        fetch_url(cache, f"{server}/missing.bin", DIGEST)
    assert "HTTP 404" in info.value.what


def test_unreachable_server_is_reported(cache: Cache) -> None:
    # Port 9 on loopback: nothing listens there.
    with pytest.raises(SourceError) as info:
        fetch_url(cache, "http://127.0.0.1:9/x.bin", DIGEST)
    assert "cannot fetch" in info.value.what
    assert "--import" in (info.value.hint or "")


def _recipe(server: str) -> dict[str, object]:
    # Both sources are used (an unused source is never fetched).
    return {"recipe": {"name": "t", "target": "virtual"}, "site": {"http_host": "127.0.0.1"},
            "initramfs": {"kernel_package": "linux-image-cloud-arm64"},
            "eeprom": {"base": "source:blob"}, "recovery": {"recovery_bin": "source:second"},
            "sources": {"blob": {"url": f"{server}/good.bin", "sha256": DIGEST},
                        "second": {"url": f"{server}/other.bin",
                                   "sha256": hashlib.sha256(PAYLOAD[::-1]).hexdigest()}}}


def test_offline_cache_hit_needs_no_server(server: str, cache: Cache) -> None:
    recipe = parse_recipe(_recipe(server))
    fetch_all(cache, recipe)
    offline = parse_recipe(_recipe("http://127.0.0.1:9"))  # same pins, dead server
    paths = fetch_all(cache, offline, offline=True)
    assert paths["blob"].read_bytes() == PAYLOAD


def test_offline_miss_names_every_missing_file(cache: Cache) -> None:
    recipe = parse_recipe(_recipe("http://127.0.0.1:9"), path="site/t.toml")
    with pytest.raises(MissingSourcesError) as info:
        check_offline(cache, recipe)
    assert "2 pinned file(s) missing" in info.value.what
    second = hashlib.sha256(PAYLOAD[::-1]).hexdigest()
    assert info.value.details == [f"blob: http://127.0.0.1:9/good.bin  sha256 {DIGEST}",
                                  f"second: http://127.0.0.1:9/other.bin  sha256 {second}"]
    assert "fwbuild fetch site/t.toml --import DIR" in (info.value.hint or "")


def test_import_seeds_the_cache_by_hash(tmp_path: Path, cache: Cache) -> None:
    recipe = parse_recipe(_recipe("http://127.0.0.1:9"))
    drop = tmp_path / "drop"
    drop.mkdir()
    (drop / "renamed-anything.bin").write_bytes(PAYLOAD)
    (drop / "unrelated.txt").write_text("hello")
    report = import_directory(cache, drop, recipe)
    assert report.imported == ("blob",)
    assert report.ignored == ("unrelated.txt",)
    assert report.missing == ("second",)
    assert cache.lookup(DIGEST) is not None


def test_fetch_cli_offline_and_import(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FWBUILD_CACHE", str(tmp_path / "cache"))
    recipe = Path(__file__).resolve().parents[2] / "recipes" / "walt-vpn.toml"
    parsed = load_recipe(recipe)
    runner = CliRunner()
    result = runner.invoke(main, ["fetch", str(recipe), "--offline"])
    assert result.exit_code == 1
    assert "2 pinned file(s) missing" in result.output
    for name in ("pieeprom", "recovery_bin"):  # every file, with its URL and whole sha256
        source = parsed.sources[name]
        assert f"  {name}: {source.url}  sha256 {source.sha256}" in result.output
    assert "Hint: download the files (URLs above)" in result.output
    assert f"fwbuild fetch {recipe} --import DIR" in result.output and "RECIPE" not in result.output
    empty = tmp_path / "empty"
    empty.mkdir()
    result = runner.invoke(main, ["fetch", str(recipe), "--import", str(empty)])
    assert result.exit_code == 1, "files are still missing: not a success"
    assert "imported: nothing" in result.output
    assert "2 pinned file(s) still missing from the cache after the import" in result.output
    assert f"sha256 {parsed.sources['pieeprom'].sha256}" in result.output
