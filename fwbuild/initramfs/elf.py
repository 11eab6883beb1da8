"""ELF closure with pyelftools, resolved inside the staged package tree (never the host).

For every root path: follow symlinks, read PT_INTERP and the dynamic section
(DT_NEEDED, DT_RPATH, DT_RUNPATH with `$ORIGIN`/`$LIB`/`$PLATFORM`), and look
each needed library up the way glibc's ld.so does on Debian arm64: DT_RPATH
(only when there is no DT_RUNPATH), DT_RUNPATH, then the multiarch and default
directories. Candidates of another machine or class are skipped, like ld.so
does. A library found nowhere is a `BuildError` naming the binary, the library
and every path tried. Files that are not ELF are included as they are.
"""

from __future__ import annotations

import posixpath
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import cast

from elftools.common.exceptions import ELFError
from elftools.elf.dynamic import DynamicSection
from elftools.elf.elffile import ELFFile
from elftools.elf.segments import InterpSegment

from ..errors import BuildError
from .staging import StagedTree

# /etc/ld.so.conf.d/aarch64-linux-gnu.conf, then ld.so's built-in defaults.
DEFAULT_LIBRARY_DIRS = (
    "/lib/aarch64-linux-gnu",
    "/usr/lib/aarch64-linux-gnu",
    "/lib",
    "/usr/lib",
)
ELF_MAGIC = b"\x7fELF"


@dataclass(frozen=True)
class ElfInfo:
    machine: str
    elfclass: int
    interp: str | None
    needed: tuple[str, ...]
    rpath: tuple[str, ...]
    runpath: tuple[str, ...]


@dataclass
class ElfClosure:
    """What to copy: every path (symlinks and real files) -> why it is needed.

    `reasons[path]` is a chain like ("needed by /usr/lib/.../libssl.so.3",
    "needed by /usr/bin/ssh", "requested"). `needed[obj]` lists (library name,
    path it resolved to) for each ELF object, for checks and `why`.
    """

    reasons: dict[str, tuple[str, ...]] = field(default_factory=dict)
    needed: dict[str, list[tuple[str, str]]] = field(default_factory=dict)
    symlinks: dict[str, str] = field(default_factory=dict)  # link path -> target as stored
    stubbed: dict[str, StubNeed] = field(default_factory=dict)  # soname -> where and who needs it


@dataclass
class StubNeed:
    """A library left out of the closure because a stub replaces it (fwbuild/initramfs/stub.py).

    `dest`: where the stub goes (the real library's directory + soname); `real`: the
    replaced file ("" when no staged package ships it); `importers`: real path -> reason.
    """

    dest: str
    real: str
    importers: dict[str, tuple[str, ...]] = field(default_factory=dict)


def _interp(segment: object) -> str:
    return str(cast(InterpSegment, segment).get_interp_name())


def _tag(tag: object, name: str) -> str:
    """DT_NEEDED/DT_RPATH/DT_RUNPATH string (pyelftools sets these attributes dynamically)."""
    return str(getattr(tag, name))


def read_elf_info(stream_path: str, tree: StagedTree) -> ElfInfo | None:
    """Dynamic-linking facts of one staged file, or None when it is not ELF."""
    host = tree.host_path(stream_path)
    with open(host, "rb") as handle:
        if handle.read(4) != ELF_MAGIC:
            return None
        handle.seek(0)
        try:
            elf = ELFFile(handle)
            interp = None
            for segment in elf.iter_segments():
                if segment["p_type"] == "PT_INTERP":
                    interp = _interp(segment)
            needed: list[str] = []
            rpath: list[str] = []
            runpath: list[str] = []
            for section in elf.iter_sections():
                if not isinstance(section, DynamicSection):
                    continue
                for tag in section.iter_tags():
                    if tag.entry.d_tag == "DT_NEEDED":
                        needed.append(_tag(tag, 'needed'))
                    elif tag.entry.d_tag == "DT_RPATH":
                        rpath.extend(p for p in _tag(tag, 'rpath').split(":") if p)
                    elif tag.entry.d_tag == "DT_RUNPATH":
                        runpath.extend(p for p in _tag(tag, 'runpath').split(":") if p)
            return ElfInfo(elf["e_machine"], elf.elfclass, interp, tuple(needed),
                           tuple(rpath), tuple(runpath))
        except (ELFError, ValueError, KeyError) as exc:
            raise BuildError(f"corrupt ELF file: {exc}", f"/{stream_path}") from None


def _expand(directory: str, origin: str) -> str:
    for token in ("$ORIGIN", "${ORIGIN}"):
        directory = directory.replace(token, origin)
    for token in ("$LIB", "${LIB}"):
        directory = directory.replace(token, "lib/aarch64-linux-gnu")
    for token in ("$PLATFORM", "${PLATFORM}"):
        directory = directory.replace(token, "aarch64")
    return directory


def search_dirs(info: ElfInfo, real_path: str) -> list[str]:
    origin = "/" + posixpath.dirname(real_path)
    dirs: list[str] = []
    if info.rpath and not info.runpath:
        dirs += [_expand(d, origin) for d in info.rpath]
    dirs += [_expand(d, origin) for d in info.runpath]
    dirs += DEFAULT_LIBRARY_DIRS
    return dirs


class _Resolver:
    def __init__(self, tree: StagedTree, stubs: Sequence[str] = ()) -> None:
        self.tree = tree
        self.stubs = frozenset(stubs)
        self.infos: dict[str, ElfInfo | None] = {}
        self.closure = ElfClosure()

    def info(self, real: str) -> ElfInfo | None:
        if real not in self.infos:
            node = self.tree.lookup(real)
            self.infos[real] = (read_elf_info(real, self.tree)
                                if node is not None and node.kind == "f" else None)
        return self.infos[real]

    def include(self, path: str, reason: tuple[str, ...]) -> str:
        """Add `path` with its symlink chain; return the real path."""
        real, links = self.tree.resolve(path)
        for link in links:
            if link not in self.closure.reasons:
                self.closure.reasons[link] = reason
                node = self.tree.nodes[link]
                self.closure.symlinks[link] = node.target
        if real not in self.closure.reasons:
            self.closure.reasons[real] = reason
        return real

    def find(self, name: str, owner: str, info: ElfInfo) -> tuple[str, str]:
        """(path as found, real path) of library `name` needed by `owner`."""
        if "/" in name:
            candidates = [name if name.startswith("/") else f"/{posixpath.dirname(owner)}/{name}"]
        else:
            candidates = [posixpath.join(d, name) for d in search_dirs(info, owner)]
        for candidate in candidates:
            try:
                real, _ = self.tree.resolve(candidate)
            except KeyError:
                continue
            node = self.tree.lookup(real)
            if node is None or node.kind != "f":
                continue
            lib = self.info(real)
            if lib is not None and (lib.machine, lib.elfclass) != (info.machine, info.elfclass):
                continue
            return candidate, real
        raise BuildError(
            f"/{owner} needs {name}, which is in none of the staged packages",
            f"/{owner} (from package {self.tree.owner(owner)})",
            "tried: " + ", ".join(candidates)
            + "; add the package that ships it to the initramfs package list")

    def stub(self, name: str, obj: str, info: ElfInfo, chain: tuple[str, ...]) -> None:
        """Record that `obj` needs the stubbed library `name` (the real one is not walked)."""
        if name not in self.closure.stubbed:
            try:
                _, real = self.find(name, obj, info)
                dest = posixpath.join(posixpath.dirname(real), name)
            except BuildError:
                real, dest = "", posixpath.join(DEFAULT_LIBRARY_DIRS[1].strip("/"), name)
            self.closure.stubbed[name] = StubNeed(dest, real)
        self.closure.needed[obj].append((name, self.closure.stubbed[name].dest))
        self.closure.stubbed[name].importers.setdefault(obj, chain)

    def walk(self, root: str, reason: tuple[str, ...]) -> None:
        try:
            real = self.include(root, reason)
        except KeyError as exc:
            raise BuildError(f"{root} is not in the staged packages (missing /{exc.args[0]})",
                             hint="check the binary path and the package list") from None
        queue = [(real, self.closure.reasons[real])]
        while queue:
            obj, why = queue.pop(0)
            if obj in self.closure.needed:
                continue
            self.closure.needed[obj] = []
            info = self.info(obj)
            if info is None:
                continue
            chain = (f"needed by /{obj}", *why)
            deps: list[str] = []
            if info.interp:
                deps.append(info.interp)
            for name in info.needed:
                if name in self.stubs:
                    self.stub(name, obj, info, chain)
                    continue
                found, lib_real = self.find(name, obj, info)
                self.closure.needed[obj].append((name, lib_real))
                deps.append(found)
            for dep in deps:
                try:
                    dep_real = self.include(dep, chain)
                except KeyError:
                    raise BuildError(f"/{obj} needs the interpreter {dep}, not in the staged packages",
                                     f"/{obj}", "add libc6 to the package list") from None
                queue.append((dep_real, self.closure.reasons[dep_real]))


def resolve_elf_closure(tree: StagedTree, roots: Sequence[tuple[str, tuple[str, ...]]],
                        stubs: Sequence[str] = ()) -> ElfClosure:
    """Closure of `roots` ((path, reason chain) pairs) inside `tree`.

    A library named in `stubs` is not followed: `closure.stubbed` says who needs it.
    """
    resolver = _Resolver(tree, stubs)
    for path, reason in roots:
        resolver.walk(path, reason)
    return resolver.closure


def elf_needed(data: bytes) -> tuple[str | None, list[str]] | None:
    """(PT_INTERP, DT_NEEDED) of an ELF image held in memory; None when not ELF.

    Used to check a finished archive: every needed library must be in it.
    """
    import io

    if data[:4] != ELF_MAGIC:
        return None
    try:
        elf = ELFFile(io.BytesIO(data))
        interp = None
        for segment in elf.iter_segments():
            if segment["p_type"] == "PT_INTERP":
                interp = _interp(segment)
        needed = [_tag(tag, 'needed') for section in elf.iter_sections() if isinstance(section, DynamicSection)
                  for tag in section.iter_tags() if tag.entry.d_tag == "DT_NEEDED"]
        return interp, needed
    except (ELFError, ValueError, KeyError) as exc:
        raise BuildError(f"corrupt ELF file: {exc}") from None
