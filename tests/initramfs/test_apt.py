"""Private apt universe: sources generation (fast) and real arm64 resolution/downloads (slow)."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import pytest

from fwbuild.cache import Cache
from fwbuild.errors import SourceError, ToolError
from fwbuild.initramfs.apt import AptSession, dependency_chains, repository_stanza
from fwbuild.recipe import AptRepository

HOST = [("host-debian.sources",
         ("Types: deb\nURIs: http://deb.debian.org/debian\nSuites: bookworm\n"
          "Components: main\nSigned-By: /usr/share/keyrings/debian-archive-keyring.gpg\n"))]


def test_options_point_everything_at_the_private_dir(tmp_path: Path) -> None:
    session = AptSession(Cache(tmp_path), host_sources=HOST)
    options = session.options()
    joined = " ".join(options)
    for key in ("APT::Architecture=arm64", "APT::Architectures=arm64", "Debug::NoLocking=1",
                "Dir::Etc::SourceList=/dev/null", f"Dir::State::Lists={session.root}/lists",
                f"Dir::State::status={session.root}/state/status", f"Dir::Cache={session.root}/cache",
                f"Dir::Etc::SourceParts={session.root}/etc/sources.list.d"):
        assert key in joined
    assert str(session.root).startswith(str(tmp_path / "apt"))


def test_recipe_repositories_change_the_universe_and_carry_their_keyring(tmp_path: Path) -> None:
    keyring = tmp_path / "vendor.gpg"
    keyring.write_bytes(b"key")
    repo = AptRepository(uri="http://example.invalid/debian", suite="stable", keyring=str(keyring),
                         components=("main", "extra"))
    plain = AptSession(Cache(tmp_path), host_sources=HOST)
    extended = AptSession(Cache(tmp_path), [repo], host_sources=HOST)
    assert plain.root != extended.root
    stanza = repository_stanza(repo)
    assert f"Signed-By: {keyring}" in stanza and "Components: main extra" in stanza
    assert "Architectures: arm64" in stanza
    extended._prepare()
    written = sorted(p.name for p in (extended.root / "etc" / "sources.list.d").iterdir())
    assert written == ["host-debian.sources", "recipe-00.sources"]
    assert (extended.root / "state" / "status").read_text() == ""


def test_missing_keyring_is_a_source_error(tmp_path: Path) -> None:
    repo = AptRepository(uri="http://example.invalid/debian", suite="stable",
                         keyring=str(tmp_path / "nope.gpg"))
    with pytest.raises(SourceError, match="keyring not found"):
        AptSession(Cache(tmp_path), [repo], host_sources=HOST)


def test_no_sources_at_all(tmp_path: Path) -> None:
    with pytest.raises(SourceError, match="no apt sources"):
        AptSession(Cache(tmp_path), host_sources=[])


@pytest.mark.slow
def test_resolve_and_download_real_arm64_packages(tmp_path: Path) -> None:
    cache = Cache(tmp_path / "cache")  # its own cache: the downloads below must really happen
    dpkg_arch = Path("/var/lib/dpkg/arch")
    before = dpkg_arch.read_bytes() if dpkg_arch.exists() else None
    session = AptSession(cache)
    pins = session.resolve(["busybox-static", "openssh-client", "sshfs"])
    names = [p.name for p in pins]
    assert names == sorted(names)
    assert {"busybox-static", "openssh-client", "sshfs", "libc6", "libssl3", "libfuse3-3"} <= set(names)
    for pin in pins:
        assert len(pin.sha256) == 64 and int(pin.sha256, 16) >= 0
        assert pin.version and pin.filename.endswith((".deb",)) and pin.size > 0
        assert pin.url.startswith("http://deb.debian.org/")
        assert pin.filename.endswith(("_arm64.deb", "_all.deb"))
    chains = dependency_chains(pins, ["busybox-static", "openssh-client", "sshfs"])
    assert chains["libssl3"] == ("libssl3", "openssh-client")
    assert chains["busybox-static"] == ("busybox-static",)
    # resolution is memoised: same answer without asking apt
    assert session.resolve(["busybox-static", "openssh-client", "sshfs"]) == pins
    small = [p for p in pins if p.name in ("busybox-static", "libfuse3-3")]
    seen: list[tuple[str, int, int | None]] = []
    paths = session.download(small, progress=lambda label, done, total: seen.append((label, done, total)))
    for pin in small:
        data = paths[pin.name].read_bytes()
        assert hashlib.sha256(data).hexdigest() == pin.sha256 and len(data) == pin.size
        assert paths[pin.name] == cache.blob_path(pin.sha256)
    assert seen and seen[-1][1] == seen[-1][2]
    seen.clear()
    assert session.download(small, progress=lambda *a: seen.append(a)) == paths  # cached
    assert seen == []
    # nothing changed on the host
    assert (dpkg_arch.read_bytes() if dpkg_arch.exists() else None) == before
    assert os.path.exists(session.root / "lists")


@pytest.mark.slow
def test_unknown_package_is_a_tool_error() -> None:
    session = AptSession(Cache.default())
    with pytest.raises(ToolError) as info:
        session.resolve(["no-such-package-fwbuild"])
    assert "no-such-package-fwbuild" in str(info.value)


@pytest.mark.slow  # apt-get waits on its own retries (about 15 s)
def test_unreachable_repository_is_an_error_not_an_empty_universe(tmp_path: Path) -> None:
    """apt-get update only warns when a repository fails; fwbuild names it and retries next time."""
    from fwbuild.cache import Cache
    from fwbuild.errors import SourceError
    from fwbuild.initramfs.apt import AptSession
    from fwbuild.recipe import AptRepository

    keyring = Path(__file__).resolve().parents[2] / "recipes" / "keyrings" / "raspberrypi-archive-stable.gpg"
    repo = AptRepository(uri="http://127.0.0.1:9/debian/", suite="bookworm", keyring=str(keyring))
    session = AptSession(Cache(tmp_path / "cache"), [repo], host_sources=[])
    with pytest.raises(SourceError) as info:
        session.update()
    assert "http://127.0.0.1:9/debian bookworm" in info.value.what
    assert not (session.root / "lists.complete").exists()
    with pytest.raises(SourceError):
        session.update()  # tried again, not skipped


def test_offline_session_never_fetches(tmp_path: Path) -> None:
    from fwbuild.cache import Cache
    from fwbuild.errors import SourceError
    from fwbuild.initramfs.apt import AptSession
    from fwbuild.recipe import AptRepository

    keyring = Path(__file__).resolve().parents[2] / "recipes" / "keyrings" / "raspberrypi-archive-stable.gpg"
    repo = AptRepository(uri="http://127.0.0.1:9/debian/", suite="bookworm", keyring=str(keyring))
    session = AptSession(Cache(tmp_path / "cache"), [repo], host_sources=[], offline=True)
    with pytest.raises(SourceError) as info:
        session.update()  # port 9 would refuse: the point is that nothing is even tried
    assert "offline" in info.value.what and "fwbuild fetch" in (info.value.hint or "")
