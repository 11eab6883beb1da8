"""Debian arm64 packages through `apt-get` with a private state directory.

No system-wide change: apt runs with its own lists, cache, (empty) dpkg status,
preferences and sources (the host's sources plus the recipe's repositories with
their `Signed-By` keyrings) under `$FWBUILD_CACHE/apt/<digest of the sources>`,
without locking, without `dpkg --add-architecture` and installs nothing.

`resolve()` asks apt for the Depends closure of the requested packages
(`apt-get install --print-uris` from an empty status) and pins each package by
the version and the SHA256 of the signed Packages index (`apt-cache show`).
`download()` fetches the `.deb` files into the content-addressed cache (by
sha256), with progress callbacks.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shlex
import shutil
import subprocess
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from urllib.parse import unquote

from ..cache import Cache
from ..errors import SourceError, ToolError
from ..fsutil import atomic_write
from ..progress import Progress, report, report_bytes
from ..recipe import AptRepository
from ..sources import fetch_url
from .deb import parse_control

ARCH = "arm64"
HOST_SOURCES = (Path("/etc/apt/sources.list"), Path("/etc/apt/sources.list.d"))
_DEP_SPLIT = re.compile(r"\s*,\s*")


@dataclass(frozen=True)
class PinnedPackage:
    name: str
    version: str
    sha256: str
    filename: str  # the .deb file name (as apt names it)
    size: int
    url: str
    depends: tuple[str, ...] = ()  # package names of the closure this one depends on

    def as_record(self) -> dict[str, object]:
        return {"name": self.name, "version": self.version, "sha256": self.sha256,
                "filename": self.filename, "size": self.size}


OFFLINE_HINT = ("on a connected machine run `fwbuild fetch RECIPE` (it also fetches the arm64 "
                "packages), then copy its FWBUILD_CACHE directory to this one")


def host_sources_text(paths: Sequence[Path] = HOST_SOURCES) -> list[tuple[str, str]]:
    """(file name, text) of the host's apt source files, sorted (one-line `.list` and deb822 `.sources`)."""
    found: list[tuple[str, str]] = []
    for path in paths:
        if path.is_file():
            found.append(("host-" + path.name, path.read_text()))
        elif path.is_dir():
            for item in sorted(path.iterdir()):
                if item.suffix in (".list", ".sources") and item.is_file():
                    found.append(("host-" + item.name, item.read_text()))
    return found


def repository_stanza(repo: AptRepository) -> str:
    keyring = Path(repo.keyring).resolve()
    return (f"Types: deb\nURIs: {repo.uri}\nSuites: {repo.suite}\n"
            f"Components: {' '.join(repo.components)}\nArchitectures: {ARCH}\n"
            f"Signed-By: {keyring}\n")


class AptSession:
    """One private apt universe (arm64) keyed by the digest of its sources."""

    def __init__(self, cache: Cache, repositories: Sequence[AptRepository] = (),
                 host_sources: Sequence[tuple[str, str]] | None = None, *, offline: bool = False) -> None:
        self.cache = cache
        self.offline = offline
        sources = list(host_sources_text() if host_sources is None else host_sources)
        for index, repo in enumerate(repositories):
            if not Path(repo.keyring).is_file():
                raise SourceError("apt repository keyring not found", f"{repo.uri}: {repo.keyring}",
                                  "give the repository's keyring file (Signed-By) in the recipe")
            sources.append((f"recipe-{index:02d}.sources", repository_stanza(repo)))
        if not sources:
            raise SourceError("no apt sources: the host has none and the recipe adds none",
                              "/etc/apt/sources.list.d", "add a repository to the recipe")
        self.sources = sources
        digest = hashlib.sha256()
        for name, text in sources:
            digest.update(f"{name}\0{text}\0".encode())
        self.root = cache.apt_dir(digest.hexdigest())

    def _prepare(self) -> None:
        for sub in ("lists/partial", "cache/archives/partial", "etc/sources.list.d",
                    "etc/preferences.d", "state"):
            (self.root / sub).mkdir(parents=True, exist_ok=True)
        status = self.root / "state" / "status"
        if not status.exists():
            status.write_text("")
        parts = self.root / "etc" / "sources.list.d"
        wanted = {name for name, _ in self.sources}
        for item in parts.iterdir():
            if item.name not in wanted:
                item.unlink()
        for name, text in self.sources:
            target = parts / name
            if not target.is_file() or target.read_text() != text:
                target.write_text(text)

    def options(self) -> list[str]:
        root = self.root
        settings = {
            "APT::Architecture": ARCH,
            "APT::Architectures": ARCH,
            "APT::Install-Recommends": "false",
            "APT::Install-Suggests": "false",
            "Acquire::Languages": "none",
            "Dir::State": str(root / "state"),
            "Dir::State::Lists": str(root / "lists"),
            "Dir::State::status": str(root / "state" / "status"),
            "Dir::Cache": str(root / "cache"),
            "Dir::Etc::SourceList": "/dev/null",
            "Dir::Etc::SourceParts": str(root / "etc" / "sources.list.d"),
            "Dir::Etc::Preferences": "/dev/null",
            "Dir::Etc::PreferencesParts": str(root / "etc" / "preferences.d"),
            "Debug::NoLocking": "1",
            "APT::Sandbox::User": "root" if os.geteuid() == 0 else "",
        }
        out: list[str] = []
        for key, value in settings.items():
            if value:
                out += ["-o", f"{key}={value}"]
        return out

    def _run(self, tool: str, args: Sequence[str]) -> str:
        return self._run_full(tool, args).stdout

    def _run_full(self, tool: str, args: Sequence[str]) -> subprocess.CompletedProcess[str]:
        exe = shutil.which(tool)
        if exe is None:
            raise ToolError(f"{tool} not found", hint="fwbuild needs apt (a Debian or Ubuntu host)")
        command = [exe, *self.options(), *args]
        proc = subprocess.run(command, capture_output=True, text=True, check=False,
                              env={**os.environ, "LC_ALL": "C.UTF-8"})
        if proc.returncode != 0:
            detail = (proc.stderr.strip() or proc.stdout.strip()).splitlines()
            raise ToolError(f"{tool} {args[0] if args else ''} failed: "
                            + " / ".join(detail[-4:]),
                            shlex.join(command[:1] + list(args)),
                            "check the package names and the apt sources (see the message)")
        return proc

    def update(self, *, force: bool = False, progress: Progress | None = None) -> None:
        """Fetch the package lists unless this universe already has all of them.

        `apt-get update` exits 0 when some repository could not be fetched (it only
        warns); that is an error here, naming the repository, and the lists are not
        marked complete, so the next run tries again instead of resolving against a
        partial universe.
        """
        self._prepare()
        complete = self.root / "lists.complete"
        if not force and complete.is_file():
            return
        if self.offline:
            raise SourceError("offline and the cache holds no apt package lists for these repositories",
                              str(self.root), OFFLINE_HINT)
        complete.unlink(missing_ok=True)
        report(progress, "apt update", 0, 1)
        proc = self._run_full("apt-get", ["-q", "update"])
        # "Err:3 http://archive.raspberrypi.com/debian bookworm InRelease" -> the repository part.
        failed = sorted({line.split(None, 1)[1] for line in (proc.stdout + proc.stderr).splitlines()
                         if line.startswith("Err:") and " " in line})
        if failed:
            raise SourceError(f"apt could not fetch the package lists: {failed[0]}"
                              + (f" (and {len(failed) - 1} more)" if len(failed) > 1 else ""),
                              "apt-get update",
                              "the repository is unreachable from this machine; build where it can be "
                              "reached (the pins in manifest.json tell what to expect)")
        atomic_write(complete, b"")
        report(progress, "apt update", 1, 1)

    def resolve(self, packages: Sequence[str]) -> list[PinnedPackage]:
        """The Depends closure of `packages` ("name" or "name=version"), pinned, sorted by name."""
        if not packages:
            return []
        self.update()
        key = hashlib.sha256("\0".join([*packages, self._lists_digest()]).encode()).hexdigest()
        memo = self.cache.resolved_memo(self.root, key)
        if memo.is_file():
            try:
                return [PinnedPackage(**{**item, "depends": tuple(item["depends"])})
                        for item in json.loads(memo.read_text())]
            except (ValueError, TypeError, KeyError):
                pass  # a damaged memo: resolve again
        pins = self._resolve(packages)
        atomic_write(memo, json.dumps([asdict(p) for p in pins], sort_keys=True).encode())
        return pins

    def _lists_digest(self) -> str:
        """Changes whenever `apt update` brought new indexes (their signed Release files)."""
        digest = hashlib.sha256()
        for path in sorted((self.root / "lists").glob("*Release")):
            digest.update(path.name.encode() + b"\0" + path.read_bytes())
        return digest.hexdigest()

    def _resolve(self, packages: Sequence[str]) -> list[PinnedPackage]:
        out = self._run("apt-get", ["install", "--print-uris", "-qq", "--no-install-recommends",
                                    *packages])
        uris: dict[tuple[str, str], tuple[str, str, int]] = {}
        for line in out.splitlines():
            fields = shlex.split(line)
            if len(fields) < 3 or not fields[0].startswith(("http:", "https:", "file:", "ftp:")):
                continue
            url, filename, size = fields[0], fields[1], int(fields[2])
            match = re.fullmatch(r"([^_]+)_([^_]+)_([^_]+)\.deb", filename)
            if not match:
                raise SourceError(f"unexpected file name from apt: {filename}")
            name, version = match.group(1), unquote(match.group(2))
            uris[(name, version)] = (url, unquote(filename), size)
        if not uris:
            raise SourceError(f"apt resolved nothing to download for {' '.join(packages)}",
                              hint="are these real arm64 packages?")
        stanzas = self._show([f"{n}={v}" for n, v in sorted(uris)])
        provides: dict[str, str] = {}
        for (name, _version) in sorted(uris):
            provides.setdefault(name, name)
            for item in _split_deps(stanzas[name].get("Provides", "")):
                provides.setdefault(item, name)
        pins: list[PinnedPackage] = []
        for (name, version), (url, filename, size) in sorted(uris.items()):
            stanza = stanzas[name]
            if stanza.get("Version") != version or not stanza.get("SHA256"):
                raise SourceError(f"apt has no SHA256 for {name}={version}", hint="run apt update again")
            deps = {provides[d] for key in ("Pre-Depends", "Depends")
                    for d in _split_deps(stanza.get(key, "")) if d in provides}
            deps.discard(name)
            pins.append(PinnedPackage(name, version, stanza["SHA256"], filename, size, url,
                                      tuple(sorted(deps))))
        return pins

    def _show(self, specs: Sequence[str]) -> dict[str, dict[str, str]]:
        out = self._run("apt-cache", ["show", "--no-all-versions", *specs])
        stanzas: dict[str, dict[str, str]] = {}
        for block in out.split("\n\n"):
            fields = parse_control(block)
            if "Package" in fields:
                stanzas.setdefault(fields["Package"], fields)
        return stanzas

    def download(self, pins: Sequence[PinnedPackage], progress: Progress | None = None) -> dict[str, Path]:
        """name -> cached .deb path, downloading the missing ones (checked against the pin)."""
        paths: dict[str, Path] = {}
        missing = [p for p in pins if self.cache.lookup(p.sha256) is None]
        if missing and self.offline:
            names = ", ".join(p.filename for p in missing[:5]) + (f" and {len(missing) - 5} more"
                                                                  if len(missing) > 5 else "")
            raise SourceError(f"offline and {len(missing)} package(s) missing from the cache: {names}",
                              str(self.cache.root), OFFLINE_HINT)
        total = sum(p.size for p in missing)
        done = 0
        for pin in pins:
            hit = self.cache.lookup(pin.sha256)
            if hit is None:
                base = done

                def step(label: str, got: int, _total: int | None, base: int = base) -> None:
                    report_bytes(progress, "download packages", base + got, total)

                hit = fetch_url(self.cache, pin.url, pin.sha256, size=pin.size, progress=step,
                                label=pin.filename)
                done += pin.size
                report_bytes(progress, "download packages", done, total)
            paths[pin.name] = hit
        return paths


def _split_deps(text: str) -> list[str]:
    """Package names of a Depends-like field (all alternatives, no versions or arch qualifiers)."""
    names: list[str] = []
    for group in _DEP_SPLIT.split(text.strip()):
        for alternative in group.split("|"):
            name = alternative.strip().split(" ")[0].split("(")[0].split(":")[0]
            if name:
                names.append(name)
    return names


def dependency_chains(pins: Sequence[PinnedPackage], requested: Sequence[str]) -> dict[str, tuple[str, ...]]:
    """For each pinned package: the shortest chain from a requested package, e.g.
    ("libssl3", "openssh-client") means openssh-client depends on libssl3."""
    by_name = {p.name: p for p in pins}
    chains: dict[str, tuple[str, ...]] = {}
    queue: list[str] = []
    for spec in requested:
        name = spec.split("=")[0]
        if name in by_name and name not in chains:
            chains[name] = (name,)
            queue.append(name)
    while queue:
        current = queue.pop(0)
        for dep in by_name[current].depends:
            if dep not in chains:
                chains[dep] = (dep, *chains[current])
                queue.append(dep)
    for pin in pins:
        chains.setdefault(pin.name, (pin.name,))
    return chains
