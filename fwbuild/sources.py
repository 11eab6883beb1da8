"""Pinned inputs: URL fetches checked against sha256 into the cache (fwbuild.cache), offline import."""

from __future__ import annotations

import hashlib
import os
import re
import shlex
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from .cache import Cache
from .errors import SourceError
from .fsutil import sha256_file
from .progress import Progress, report, report_bytes
from .recipe import Recipe, Source, resolve_path

if TYPE_CHECKING:
    import requests

_CHUNK = 1 << 16
FETCH_TIMEOUT = (10, 60)  # connect, read (seconds)


_ERRNO_TEXT = re.compile(r"\[Errno -?\d+\] ([^'\")]+)")


def request_error_cause(exc: BaseException) -> str:
    """What went wrong in a `requests` failure, in words ("connection refused"), not a class name."""
    import requests

    if isinstance(exc, requests.ConnectTimeout):
        return f"no connection within {FETCH_TIMEOUT[0]} s (connect timeout)"
    if isinstance(exc, requests.ReadTimeout):
        return f"the server sent nothing for {FETCH_TIMEOUT[1]} s (read timeout)"
    text = str(exc)
    found = _ERRNO_TEXT.search(text)
    if found:
        cause = found.group(1).strip().rstrip(".")
        cause = cause[0].lower() + cause[1:]
        if "Name or service not known" in text or "Temporary failure in name resolution" in text:
            return f"the host name does not resolve ({cause})"
        return cause
    if isinstance(exc, requests.exceptions.SSLError):
        return f"TLS failure: {text.rsplit(': ', 1)[-1].strip(')')}"
    if isinstance(exc, requests.exceptions.ChunkedEncodingError):
        return "the connection broke during the transfer"
    return text.rsplit(": ", 1)[-1].strip("()'\"") or type(exc).__name__


def fetch_url(cache: Cache, url: str, sha256: str, *, size: int = 0, progress: Progress | None = None,
              label: str | None = None, session: requests.Session | None = None) -> Path:
    """The cached blob for `sha256`, downloading `url` into the cache when missing."""
    import requests  # imported here: most commands never download, and it is slow to import

    hit = cache.lookup(sha256)
    if hit:
        return hit
    label = label or url.rsplit("/", 1)[-1]
    fd, name = tempfile.mkstemp(dir=cache.tmpdir(), suffix=".part")
    tmp = Path(name)
    try:
        getter = session or requests
        try:
            # identity: Content-Length then counts the bytes we hash (no transparent gzip)
            response = getter.get(url, stream=True, timeout=FETCH_TIMEOUT,
                                  headers={"Accept-Encoding": "identity"})
        except requests.RequestException as exc:
            raise SourceError(f"cannot fetch {label}: {request_error_cause(exc)}", url,
                              "check the network and the URL, or copy the file here and seed the "
                              "cache with `fwbuild fetch RECIPE --import DIR`") from None
        with response, os.fdopen(fd, "wb") as handle:
            if response.status_code != 200:
                raise SourceError(f"cannot fetch {label}: the server answered HTTP {response.status_code} "
                                  f"{response.reason or ''}".rstrip(), url,
                                  "check the URL in the recipe (the file may have moved upstream)")
            total = int(response.headers.get("Content-Length") or size or 0) or None
            digest = hashlib.sha256()
            done = 0
            report_bytes(progress, label, 0, total)  # the rate counts from the first request
            try:
                for block in response.iter_content(_CHUNK):
                    digest.update(block)
                    handle.write(block)
                    done += len(block)
                    report_bytes(progress, label, done, total)
            except requests.RequestException as exc:
                raise SourceError(f"download of {label} interrupted after {done} bytes: "
                                  f"{request_error_cause(exc)}", url,
                                  "try again; nothing was cached") from None
        if total is not None and done != total:
            raise SourceError(f"download truncated: got {done} of {total} bytes", url, "try again; nothing was cached")
        actual = digest.hexdigest()
        if actual != sha256:
            raise SourceError(f"sha256 mismatch: expected {sha256}, got {actual}", url,
                              "the server sent other bytes than the pinned ones; nothing was cached")
        return cache.commit(tmp, sha256)
    finally:
        tmp.unlink(missing_ok=True)


def source_path(cache: Cache, recipe: Recipe, name: str, *, offline: bool = False,
                progress: Progress | None = None) -> Path:
    """The verified local file for the recipe's source `name`."""
    source = recipe.sources[name]
    if source.path:
        local = resolve_path(recipe, source.path)
        if not local.is_file():
            raise SourceError("local source file not found", f"sources.{name}.path = {local}")
        return cache.store_file(local, source.sha256)[1]
    hit = cache.lookup(source.sha256)
    if hit:
        return hit
    if offline:
        raise SourceError(f"source `{name}` is not in the cache", source.url, _import_hint(recipe))
    try:
        return fetch_url(cache, source.url, source.sha256, size=source.size, progress=progress, label=name)
    except SourceError as exc:
        hint = exc.hint.replace("RECIPE", recipe_argument(recipe)) if exc.hint else exc.hint
        raise SourceError(exc.what, exc.where, hint) from None


# The recipe keys that name a source, and the build step that reads it.
SOURCE_REFS = (("eeprom.base", "eeprom"), ("recovery.recovery_bin", "recovery"), ("bootimg.kernel", "bootimg"))


def source_uses(recipe: Recipe) -> dict[str, list[tuple[str, str]]]:
    """source name -> [(recipe key, step)] for every key that refers to it (`source:<name>`)."""
    values = {"eeprom.base": recipe.eeprom.base, "recovery.recovery_bin": recipe.recovery.recovery_bin,
              "bootimg.kernel": recipe.bootimg.kernel}
    uses: dict[str, list[tuple[str, str]]] = {name: [] for name in recipe.sources}
    for key, step in SOURCE_REFS:
        ref = values[key]
        if ref.kind == "source" and ref.name in uses:
            uses[ref.name].append((key, step))
    return uses


def unused_sources(recipe: Recipe) -> list[str]:
    """Sources no recipe key refers to: never downloaded (the CLI says so)."""
    return sorted(name for name, uses in source_uses(recipe).items() if not uses)


def needed_sources(recipe: Recipe, steps: Sequence[str] = ()) -> list[str]:
    """The sources the build steps `steps` read (all steps when empty), sorted."""
    return sorted(name for name, uses in source_uses(recipe).items()
                  if any(not steps or step in steps for _key, step in uses))


def recipe_argument(recipe: Recipe) -> str:
    """How to name the recipe on a command line (its file, as it was given)."""
    return shlex.quote(recipe.path) if recipe.path else f"<the {recipe.name} recipe file>"


def _import_hint(recipe: Recipe) -> str:
    return (f"download the files (URLs above) on a connected machine, copy them to a directory "
            f"here and run `fwbuild fetch {recipe_argument(recipe)} --import DIR`")


class MissingSourcesError(SourceError):
    """Several pinned files are missing or failed: `details` has one line per file."""

    def __init__(self, what: str, where: str | None, hint: str | None, details: Sequence[str]) -> None:
        super().__init__(what, where, hint)
        self.details = list(details)


def describe_source(name: str, source: Source) -> str:
    """One line naming a pinned file fully: name, URL and the whole sha256."""
    return f"{name}: {source.url or source.path}  sha256 {source.sha256}"


def missing_sources(cache: Cache, recipe: Recipe, names: Sequence[str] | None = None) -> list[tuple[str, Source]]:
    wanted = recipe.sources if names is None else {n: recipe.sources[n] for n in names}
    return [(name, s) for name, s in sorted(wanted.items())
            if not s.path and cache.lookup(s.sha256) is None]


def check_offline(cache: Cache, recipe: Recipe, names: Sequence[str] | None = None) -> None:
    """Raise one error naming every pinned file (of `names`, default all) missing from the cache."""
    missing = missing_sources(cache, recipe, names)
    if missing:
        raise MissingSourcesError(f"offline and {len(missing)} pinned file(s) missing from the cache",
                                  str(cache.root), _import_hint(recipe),
                                  [describe_source(name, s) for name, s in missing])


def fetch_all(cache: Cache, recipe: Recipe, *, offline: bool = False,
              progress: Progress | None = None, steps: Sequence[str] = ()) -> Mapping[str, Path]:
    """The sources the build steps `steps` (default: all) read; every failure is reported."""
    names = needed_sources(recipe, steps)
    if offline:
        check_offline(cache, recipe, names)
    paths: dict[str, Path] = {}
    failures: list[tuple[str, SourceError]] = []
    for name in names:
        try:
            paths[name] = source_path(cache, recipe, name, offline=offline, progress=progress)
        except SourceError as exc:
            failures.append((name, exc))
    if failures:
        first = failures[0][1]
        single = len(failures) == 1
        raise MissingSourcesError(
            first.what if single else f"{len(failures)} of {len(names)} sources could not be fetched",
            first.where if single else str(cache.root), first.hint if single else _import_hint(recipe),
            [describe_source(name, recipe.sources[name]) + ("" if single else f"\n    {exc.what}")
             for name, exc in failures])
    return paths


@dataclass(frozen=True)
class ImportReport:
    imported: tuple[str, ...]   # source names (or file names when no recipe) now in the cache
    ignored: tuple[str, ...]    # files whose digest matches no pin
    missing: tuple[str, ...]    # pins still missing


def import_directory(cache: Cache, directory: Path, recipe: Recipe | None = None,
                     progress: Progress | None = None) -> ImportReport:
    """Seed the cache from local files matched by hash (against the recipe's pins when given)."""
    if not directory.is_dir():
        raise SourceError("import directory not found", str(directory))
    wanted = {s.sha256: name for name, s in (recipe.sources.items() if recipe else [])}
    imported: list[str] = []
    ignored: list[str] = []
    files = sorted(p for p in directory.rglob("*") if p.is_file())
    for index, path in enumerate(files, start=1):
        digest = sha256_file(path)
        if recipe is None:
            cache.store_file(path, digest)
            imported.append(path.name)
        elif digest in wanted:
            cache.store_file(path, digest)
            imported.append(wanted[digest])
        else:
            ignored.append(str(path.relative_to(directory)))
        report(progress, "import", index, len(files))
    missing = tuple(name for name, _ in missing_sources(cache, recipe, needed_sources(recipe))) if recipe else ()
    return ImportReport(tuple(sorted(set(imported))), tuple(ignored), missing)

