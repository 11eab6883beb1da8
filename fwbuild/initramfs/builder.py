"""Build an initramfs: packages -> staged tree -> ELF + module closures -> cpio.

`build_initramfs(spec, cache)` is the one entry point the build pipeline calls;
`stage_kernel(...)` fetches and stages a kernel package for the boot image and
the virtual node. Everything is pinned (apt version + sha256), staged once per
package digest in the cache (`$FWBUILD_CACHE/staged/<sha256>/`) and assembled
in a `Tree`, so two builds with the same inputs give the same bytes.
"""

from __future__ import annotations

import difflib
import hashlib
import json
import posixpath
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import jinja2

from ..cache import Cache
from ..errors import BuildError, FormatError, FwbuildError, UsageError
from ..fsutil import atomic_write
from ..progress import Progress, report
from ..recipe import AptRepository, Recipe, resolve_path, resolved_repositories
from .apt import AptSession, PinnedPackage, dependency_chains
from .cpio import COMPRESSIONS, GZIP_LEVEL, XZ_LEVEL, ZSTD_LEVEL, compress, decompress, write_cpio
from .deb import DebContents, stage_deb
from .elf import StubNeed, resolve_elf_closure
from .init import init_files
from .init.settings import InitSettings
from .modules import ModuleSelection, kernel_image, select_modules
from .staging import StagedTree
from .stub import STUBBABLE, build_stub
from .tree import Bytes, Device, Dir, HostFile, Symlink, Tree, normalize_dest

BASE_DIRS = ("bin", "dev", "etc", "mnt", "proc", "root", "run", "sbin", "sys", "tmp",
             "usr/bin", "usr/sbin")
BASE_FILES = {
    "etc/passwd": b"root:x:0:0:root:/root:/bin/sh\n",
    "etc/group": b"root:x:0:\n",
}


@dataclass(frozen=True)
class InitramfsSpec:
    """What goes into the initramfs.

    `paths`: staged paths (binaries, files or whole directories) to copy with
    their ELF closure. `init`: "builtin:<name>" (a plain-sh init shipped in
    fwbuild/initramfs/init/<name>/, configured by `variables` through
    `InitSettings`), a path to a jinja2 template (rendered with `variables`), or,
    with `init_text`, the template text itself. `files`: dest -> host path.
    """

    packages: tuple[str, ...] = ("busybox-static",)
    paths: tuple[str, ...] = ("/bin/busybox",)
    kernel_package: str = ""
    modules: tuple[str, ...] = ()
    files: Mapping[str, str] = field(default_factory=dict)
    init: str = "builtin:default"
    init_text: str | None = None
    variables: Mapping[str, Any] = field(default_factory=dict)
    compression: str = "zstd"
    epoch: int = 0
    repositories: tuple[AptRepository, ...] = ()
    base_files: bool = True
    stub_libraries: tuple[str, ...] = ()


@dataclass(frozen=True)
class InitramfsEntry:
    path: str      # "/usr/bin/ssh"
    kind: str      # ls -l letter
    mode: int
    size: int
    target: str = ""


@dataclass(frozen=True)
class InitramfsResult:
    data: bytes                              # the (compressed) archive
    uncompressed_size: int
    entries: tuple[InitramfsEntry, ...]
    packages: tuple[PinnedPackage, ...]      # everything downloaded (the pinned closure)
    provenance: Mapping[str, list[str]]      # "/path" -> reason chain
    kernel_version: str = ""
    builtin_modules: tuple[str, ...] = ()
    stubs: tuple[Mapping[str, Any], ...] = ()   # StubLibrary.as_record() of each stub

    def provenance_document(self) -> dict[str, Any]:
        """The sidecar `<initramfs>.provenance.json` (what `fwbuild initramfs why` reads)."""
        return {
            "format": "fwbuild-initramfs-provenance/1",
            "packages": [p.as_record() for p in self.packages],
            "kernel_version": self.kernel_version,
            "builtin_modules": list(self.builtin_modules),
            "stubs": [dict(stub) for stub in self.stubs],
            "paths": dict(self.provenance),
        }


@dataclass(frozen=True)
class StagedKernel:
    version: str
    image: Path                 # host path of the kernel image (vmlinuz) in the cache
    modules_dir: Path           # host path of lib/modules/<version> in the cache
    tree: StagedTree
    packages: tuple[PinnedPackage, ...]


def stage_packages(session: AptSession, cache: Cache, packages: Sequence[str],
                   progress: Progress | None = None,
                   keep: Sequence[str] | None = None) -> tuple[StagedTree, list[PinnedPackage]]:
    """Resolve, download and stage (the `keep` subset of) the closure of `packages`."""
    pins = session.resolve(packages)
    if keep is not None:
        pins = [p for p in pins if p.name in keep or any(p.name.startswith(k) for k in keep)]
    paths = session.download(pins, progress)
    staged: list[tuple[DebContents, Path]] = []
    for index, pin in enumerate(pins):
        report(progress, "stage packages", index, len(pins))
        dest = cache.staged_dir(pin.sha256)
        staged.append((stage_deb(paths[pin.name], dest), dest / "root"))
    report(progress, "stage packages", len(pins), len(pins))
    return StagedTree.from_packages(staged), pins


def stage_kernel(kernel_package: str, cache: Cache, *, repositories: Sequence[AptRepository] = (),
                 progress: Progress | None = None, offline: bool = False) -> StagedKernel:
    """Fetch and stage a `linux-image-*` package (and the image it depends on), not its tools."""
    session = AptSession(cache, repositories, offline=offline)
    tree, pins = stage_packages(session, cache, [kernel_package], progress, keep=["linux-image-"])
    from .modules import find_modules_dir

    moddir = find_modules_dir(tree)
    version = posixpath.basename(moddir)
    image = tree.host_path(kernel_image(tree, version))
    # The image and the modules come from the same package, staged under one root.
    return StagedKernel(version, image, image.parent.parent / moddir, tree, tuple(pins))


def prefetch_packages(recipe: Recipe, cache: Cache, progress: Progress | None = None) -> int:
    """Download (and stage) what a build of `recipe` takes from apt; return the package count.

    The same calls as the build, so a cache filled here serves an `--offline` build.
    """
    repositories = resolved_repositories(recipe)
    section = recipe.initramfs
    _, pins = stage_packages(AptSession(cache, repositories), cache,
                             section.packages or InitramfsSpec.packages, progress)
    count = len(pins)
    if section.kernel_package:
        count += len(stage_kernel(section.kernel_package, cache, repositories=repositories,
                                  progress=progress).packages)
    return count


def init_tree_files(spec: InitramfsSpec, modules: ModuleSelection | None
                    ) -> dict[str, tuple[bytes, int]]:
    """The init's own files: a built-in init with its settings file, or a rendered template."""
    if spec.init_text is None and spec.init.startswith("builtin:"):
        return init_files(spec.init[len("builtin:"):], InitSettings.from_variables(spec.variables),
                          modules=list(modules.load_order) if modules else [],
                          builtin_modules=list(modules.builtin) if modules else [],
                          kernel_version=modules.kernel_version if modules else "")
    return {"init": (render_template_init(spec, modules), 0o755)}


def render_template_init(spec: InitramfsSpec, modules: ModuleSelection | None) -> bytes:
    """A user's jinja2 init template, with `modules`, `builtin_modules`, `kernel_version`."""
    if spec.init_text is not None:
        text, where = spec.init_text, "init template"
    else:
        try:
            text, where = Path(spec.init).read_text(), spec.init
        except OSError as exc:
            raise BuildError(f"cannot read init template: {exc.strerror}", spec.init) from None
    env = jinja2.Environment(undefined=jinja2.StrictUndefined, keep_trailing_newline=True,
                             autoescape=False)
    values = {
        "modules": list(modules.load_order) if modules else [],
        "builtin_modules": list(modules.builtin) if modules else [],
        "kernel_version": modules.kernel_version if modules else "",
        **spec.variables,
    }
    try:
        return env.from_string(text).render(values).encode()
    except jinja2.TemplateError as exc:
        raise BuildError(f"init template error: {exc}", where,
                         "pass the missing value as a template variable") from None


def _package_reason(pin_chain: tuple[str, ...]) -> str:
    return "package " + pin_chain[0] + (
        f" (dependency chain: {' -> '.join(reversed(pin_chain))})" if len(pin_chain) > 1 else "")


def _add_paths(tree: Tree, staged: StagedTree, spec: InitramfsSpec,
               chains: Mapping[str, tuple[str, ...]], cache: Cache) -> list[dict[str, Any]]:
    """Add the requested paths with their ELF closure (and the stubs); return the stub records."""
    roots: list[tuple[str, tuple[str, ...]]] = []
    for path in spec.paths:
        try:
            real, _ = staged.resolve(path)
        except KeyError:
            raise BuildError(f"{path} is not in the staged packages",
                             "initramfs.binaries", "check the path and the package list "
                             f"({', '.join(spec.packages)})") from None
        node = staged.lookup(real)
        if node is not None and node.kind == "d":
            prefix = real + "/"
            for sub in sorted(p for p in staged.nodes if p.startswith(prefix)):
                if staged.nodes[sub].kind != "d":
                    roots.append((sub, (f"below {path} (requested)",)))
        else:
            roots.append((path, (f"{path} (requested)",)))
    closure = resolve_elf_closure(staged, roots, spec.stub_libraries)
    stubs = [_add_stub(tree, staged, closure.stubbed, soname, chains, cache)
             for soname in spec.stub_libraries]
    for path in sorted(closure.reasons):
        node = staged.nodes[path]
        package = _package_reason(chains.get(node.package, (node.package,)))
        reason = (*closure.reasons[path], package)
        if path in closure.symlinks:
            tree.add(path, Symlink(closure.symlinks[path]), reason)
        else:
            real_node = staged.lookup(path)
            assert real_node is not None
            tree.add(path, HostFile(staged.host_path(path), real_node.mode), reason)
    return stubs


def _add_stub(tree: Tree, staged: StagedTree, stubbed: Mapping[str, StubNeed], soname: str,
              chains: Mapping[str, tuple[str, ...]], cache: Cache) -> dict[str, Any]:
    need = stubbed.get(soname)
    if need is None:
        raise BuildError(f"stub library {soname} is needed by none of the staged binaries",
                         "initramfs.stub_libraries",
                         "remove it from the list (`fwbuild initramfs why` shows who needs a library)")
    importers = {f"/{path}": staged.host_path(path) for path in need.importers}
    stub = build_stub(soname, importers, staged.host_path(need.real) if need.real else None, cache)
    package = ""
    if need.real:
        owner = staged.owner(need.real)
        package = _package_reason(chains.get(owner, (owner,)))
    first = min(need.importers)
    replaced = f"/{need.real}" if need.real else "(not staged)"
    tree.add(need.dest, Bytes(stub.data, 0o644),
             ((f"stub of {soname} replacing {replaced} ({package or 'no package'}): "
               f"{len(stub.symbols)} symbols, every call returns GSS_S_UNAVAILABLE"),
              *need.importers[first]))
    return stub.as_record(replaced, package)


def build_initramfs(spec: InitramfsSpec, cache: Cache, progress: Progress | None = None, *,
                    offline: bool = False) -> InitramfsResult:
    """Build the archive described by `spec` (downloads through `cache` when needed)."""
    if spec.compression not in COMPRESSIONS:
        raise BuildError(f"unknown compression {spec.compression!r}", "initramfs.compression",
                         f"use one of {', '.join(COMPRESSIONS)}")
    for soname in spec.stub_libraries:
        if soname not in STUBBABLE:
            raise BuildError(f"no stub is known for {soname!r}", "initramfs.stub_libraries",
                             f"stubs exist for {', '.join(STUBBABLE)}")
    session = AptSession(cache, spec.repositories, offline=offline)
    staged, pins = stage_packages(session, cache, spec.packages, progress)
    chains = dependency_chains(pins, spec.packages)
    tree = Tree()
    for directory in BASE_DIRS:
        tree.add(directory, Dir(), ("base layout",))
    tree.add("dev/console", Device("c", 5, 1, 0o600), ("base layout (the kernel opens it for init)",))
    tree.add("dev/null", Device("c", 1, 3, 0o666), ("base layout",))
    if spec.base_files:
        for dest, content in BASE_FILES.items():
            if dest not in {f.strip("/") for f in spec.files}:
                tree.add(dest, Bytes(content), ("base files (ssh needs a passwd entry)",))
    stubs = _add_paths(tree, staged, spec, chains, cache)
    modules: ModuleSelection | None = None
    kernel_pins: tuple[PinnedPackage, ...] = ()
    if spec.modules:
        if not spec.kernel_package:
            raise BuildError("kernel modules requested but no kernel package",
                             "initramfs.kernel_package", "set it, e.g. linux-image-cloud-arm64")
        kernel = stage_kernel(spec.kernel_package, cache, repositories=spec.repositories,
                              progress=progress, offline=offline)
        kernel_pins = kernel.packages
        modules = select_modules(kernel.tree, spec.modules, kernel.version)
        for dest, data in sorted(modules.files.items()):
            tree.add(dest, Bytes(data), (*modules.reasons[dest], f"kernel package {kernel.tree.owner(dest)}"))
    for dest, host in sorted(spec.files.items()):
        source = Path(host)
        if not source.is_file():
            raise BuildError("initramfs extra file not found", f"initramfs.files.{dest}: {host}")
        tree.add(dest, HostFile(source), (f"extra file from {host}",))
    for dest, (data, mode) in sorted(init_tree_files(spec, modules).items()):
        tree.add(dest, Bytes(data, mode), (f"init {spec.init}",))
    report(progress, "write cpio", 0, 1)
    entries = tree.to_entries(spec.epoch)
    raw = write_cpio(entries)
    data = compress_cached(raw, spec.compression, cache)
    report(progress, "write cpio", 1, 1)
    listing = tuple(InitramfsEntry("/" + e.name, e.kind, e.mode & 0o7777, len(e.data), e.link_target)
                    for e in entries)
    all_pins = tuple(sorted({p.name: p for p in (*pins, *kernel_pins)}.values(), key=lambda p: p.name))
    return InitramfsResult(
        data=data, uncompressed_size=len(raw), entries=listing, packages=all_pins,
        provenance=tree.provenance(),
        kernel_version=modules.kernel_version if modules else "",
        builtin_modules=tuple(modules.builtin) if modules else (),
        stubs=tuple(stubs),
    )


def compress_cached(raw: bytes, method: str, cache: Cache) -> bytes:
    """`compress`, memoised in the cache by the digest of the uncompressed archive.

    zstd at level 19 takes seconds; the memo makes an unchanged rebuild instant.
    The memo is keyed by method and level, and a damaged entry is recomputed.
    """
    if method == "none":
        return raw
    level = {"zstd": ZSTD_LEVEL, "xz": XZ_LEVEL}.get(method, GZIP_LEVEL)
    memo = cache.compressed(method, level, hashlib.sha256(raw).hexdigest())
    try:
        data = memo.read_bytes()
        if decompress(data) == raw:
            return data
    except (OSError, FwbuildError):
        pass
    data = compress(raw, method)
    atomic_write(memo, data)
    return data


def spec_from_recipe(recipe: Recipe, *, epoch: int,
                     variables: Mapping[str, Any] | None = None) -> InitramfsSpec:
    """The recipe's `[initramfs]` section as a spec (paths resolved against the recipe directory).

    Init variables: the recipe's `initramfs.variables`, then `variables` (for a
    built-in init they are `InitSettings`, checked when the init is built).
    """
    section = recipe.initramfs
    init = str(section.init) if section.init.kind == "builtin" else str(resolve_path(recipe, section.init.name))
    repositories = resolved_repositories(recipe)
    return InitramfsSpec(
        packages=section.packages or InitramfsSpec.packages,
        paths=section.binaries or InitramfsSpec.paths,
        kernel_package=section.kernel_package,
        modules=section.modules,
        files={dest: str(resolve_path(recipe, src)) for dest, src in section.files.items()},
        init=init,
        variables={**section.variables, **(variables or {})},
        compression=section.compression,
        epoch=epoch,
        repositories=repositories,
        stub_libraries=section.stub_libraries,
    )


def write_initramfs(result: InitramfsResult, out: Path) -> Path:
    """Write the archive and its sidecar `<out>.provenance.json` (both atomically)."""
    atomic_write(out, result.data)
    sidecar = provenance_path(out)
    atomic_write(sidecar, (json.dumps(result.provenance_document(), indent=1, sort_keys=True)
                           + "\n").encode())
    return sidecar


def provenance_path(archive: Path) -> Path:
    return archive.with_name(archive.name + ".provenance.json")


def why(archive: Path, path: str) -> list[str]:
    """The reason chain of `path` in `archive`, from its provenance sidecar."""
    sidecar = provenance_path(archive)
    try:
        doc = json.loads(sidecar.read_text())
        paths = doc["paths"]
    except FileNotFoundError:
        raise BuildError("no provenance sidecar next to the archive", str(sidecar),
                         "it is written by `fwbuild initramfs build` / `fwbuild build`") from None
    except (OSError, ValueError, KeyError) as exc:
        raise FormatError(f"unreadable provenance sidecar: {exc}", str(sidecar)) from None
    key = "/" + normalize_dest(path)
    if key not in paths:
        close = difflib.get_close_matches(key, list(paths), n=3)
        raise UsageError(f"{key} is not in the initramfs", str(archive),
                         f"did you mean {', '.join(close)}?" if close else
                         "list the archive with `fwbuild initramfs list`")
    return [str(item) for item in paths[key]]
