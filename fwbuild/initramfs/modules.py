"""Kernel modules from the staged kernel package: name lookup, dependency closure.

Module names match with `-` and `_` as equivalent (like modprobe). The
dependency closure comes from `modules.dep` when the package ships one, else
from each module's `.modinfo` `depends=` field (Debian's packages leave
`modules.dep` to depmod at install time). Compressed modules (`.ko.xz`,
`.ko.zst`, `.ko.gz`) are stored decompressed, and `modules.dep` is rewritten
for the selected set so busybox `modprobe` loads them. A requested module that
the kernel has built in (`modules.builtin`) is reported, not an error.
"""

from __future__ import annotations

import gzip
import io
import lzma
import posixpath
from collections.abc import Sequence
from dataclasses import dataclass, field

from elftools.common.exceptions import ELFError
from elftools.elf.elffile import ELFFile

from ..errors import BuildError
from .staging import StagedTree

_SUFFIXES = (".ko", ".ko.xz", ".ko.zst", ".ko.gz")


def module_name(path: str) -> str:
    base = posixpath.basename(path)
    for suffix in _SUFFIXES:
        if base.endswith(suffix):
            base = base[: -len(suffix)]
            break
    return base.replace("-", "_")


def decompress_module(data: bytes, path: str) -> bytes:
    import zstandard

    try:
        if path.endswith(".xz"):
            return lzma.decompress(data)
        if path.endswith(".zst"):
            return zstandard.ZstdDecompressor().decompressobj().decompress(data)
        if path.endswith(".gz"):
            return gzip.decompress(data)
    except (lzma.LZMAError, zstandard.ZstdError, OSError, EOFError) as exc:
        raise BuildError(f"cannot decompress kernel module: {exc}", f"/{path}") from None
    return data


def modinfo(data: bytes, where: str) -> dict[str, list[str]]:
    """The `.modinfo` key=value strings of an (uncompressed) module."""
    try:
        elf = ELFFile(io.BytesIO(data))
        section = elf.get_section_by_name(".modinfo")
    except (ELFError, ValueError) as exc:
        raise BuildError(f"not a kernel module: {exc}", where) from None
    info: dict[str, list[str]] = {}
    if section is None:
        return info
    for item in section.data().split(b"\0"):
        key, sep, value = item.decode("utf-8", "replace").partition("=")
        if sep:
            info.setdefault(key, []).append(value)
    return info


@dataclass
class ModuleSelection:
    kernel_version: str
    modules_dir: str                       # "lib/modules/<version>" (inside the staged tree)
    files: dict[str, bytes] = field(default_factory=dict)           # dest -> bytes (decompressed)
    reasons: dict[str, tuple[str, ...]] = field(default_factory=dict)
    builtin: list[str] = field(default_factory=list)                 # requested but built in
    load_order: list[str] = field(default_factory=list)              # dependencies first


def find_modules_dir(tree: StagedTree, kernel_version: str | None = None) -> str:
    for base in ("lib/modules", "usr/lib/modules"):
        try:
            real, _ = tree.resolve(base)
        except KeyError:
            continue
        versions = [posixpath.basename(p) for p in tree.glob_dir(real)
                    if tree.nodes[p].kind == "d"]
        if kernel_version:
            versions = [v for v in versions if v == kernel_version]
        if len(versions) == 1:
            return f"{real}/{versions[0]}"
        if len(versions) > 1:
            raise BuildError(f"several kernels in the staged packages: {', '.join(sorted(versions))}",
                             hint="request one kernel package only")
    raise BuildError("no /lib/modules/<version> in the kernel package",
                     hint="set the initramfs kernel package to a linux-image-* package")


def select_modules(tree: StagedTree, requested: Sequence[str],
                   kernel_version: str | None = None) -> ModuleSelection:
    moddir = find_modules_dir(tree, kernel_version)
    selection = ModuleSelection(posixpath.basename(moddir), moddir)
    prefix = moddir + "/"
    index: dict[str, str] = {}
    for path in sorted(tree.nodes):
        if path.startswith(prefix) and path.endswith(_SUFFIXES) and tree.nodes[path].kind == "f":
            index.setdefault(module_name(path), path)
    builtin: set[str] = set()
    builtin_text = b""
    if f"{moddir}/modules.builtin" in tree.nodes:
        builtin_text = tree.host_path(f"{moddir}/modules.builtin").read_bytes()
        builtin = {module_name(line) for line in builtin_text.decode().split()}
    shipped_dep = _read_modules_dep(tree, moddir)
    cache: dict[str, bytes] = {}

    def load(name: str) -> bytes:
        if name not in cache:
            path = index[name]
            cache[name] = decompress_module(tree.host_path(path).read_bytes(), path)
        return cache[name]

    def depends(name: str) -> list[str]:
        if shipped_dep is not None:
            rel = index[name][len(prefix):]
            return [module_name(d) for d in shipped_dep.get(rel, [])]
        deps = modinfo(load(name), f"/{index[name]}").get("depends", [""])[0]
        return [module_name(d) for d in deps.split(",") if d]

    deps_of: dict[str, list[str]] = {}
    order: list[str] = []

    def visit(name: str, chain: tuple[str, ...], stack: tuple[str, ...]) -> None:
        if name in deps_of:
            return
        if name in stack:
            raise BuildError(f"module dependency cycle: {' -> '.join((*stack, name))}")
        if name not in index:
            if name in builtin:
                return
            raise BuildError(f"kernel module {name} is needed by {chain[0]} but missing",
                             f"/{moddir}")
        deps = depends(name)
        for dep in deps:
            visit(dep, (f"module {name}", *chain), (*stack, name))
        deps_of[name] = [d for d in deps if d in index]
        order.append(name)
        dest = _dest_path(index[name])
        selection.reasons[dest] = chain

    for raw in requested:
        name = module_name(raw)
        if name in index:
            visit(name, (f"module {name} (requested)",), ())
        elif name in builtin:
            selection.builtin.append(name)
        else:
            close = sorted(n for n in index if name in n)[:5]
            raise BuildError(f"kernel module {raw} is neither a module nor built in",
                             f"/{moddir}",
                             f"close names: {', '.join(close)}" if close else
                             "check the name with `modinfo` on a machine running this kernel")
    selection.load_order = order
    lines = []
    for name in order:
        selection.files[_dest_path(index[name])] = load(name)
        rel = _dest_path(index[name])[len(prefix):]
        closure = _dep_closure(name, deps_of)
        lines.append(f"{rel}: " + " ".join(_dest_path(index[d])[len(prefix):] for d in closure))
    dep_text = "".join(line.rstrip() + "\n" for line in sorted(lines))
    selection.files[f"{moddir}/modules.dep"] = dep_text.encode()
    selection.reasons[f"{moddir}/modules.dep"] = ("module index",)
    if builtin_text:
        selection.files[f"{moddir}/modules.builtin"] = builtin_text
        selection.reasons[f"{moddir}/modules.builtin"] = ("module index",)
    return selection


def _dest_path(path: str) -> str:
    for suffix in (".xz", ".zst", ".gz"):
        if path.endswith(".ko" + suffix):
            return path[: -len(suffix)]
    return path


def _dep_closure(name: str, deps_of: dict[str, list[str]]) -> list[str]:
    """All dependencies of `name`, nearest first (the modules.dep convention)."""
    out: list[str] = []
    queue = list(deps_of[name])
    while queue:
        dep = queue.pop(0)
        if dep not in out:
            out.append(dep)
            queue.extend(deps_of.get(dep, []))
    return out


def _read_modules_dep(tree: StagedTree, moddir: str) -> dict[str, list[str]] | None:
    path = f"{moddir}/modules.dep"
    if path not in tree.nodes:
        return None
    deps: dict[str, list[str]] = {}
    for line in tree.host_path(path).read_text().splitlines():
        module, sep, rest = line.partition(":")
        if sep:
            deps[module.strip()] = rest.split()
    return deps


def kernel_image(tree: StagedTree, kernel_version: str) -> str:
    """The staged path of the kernel image (`boot/vmlinuz-<version>`)."""
    for candidate in (f"boot/vmlinuz-{kernel_version}", f"boot/vmlinux-{kernel_version}",
                      f"boot/Image-{kernel_version}"):
        if candidate in tree.nodes:
            return candidate
    raise BuildError(f"no kernel image for {kernel_version} in the kernel package",
                     hint="expected /boot/vmlinuz-<version>")
