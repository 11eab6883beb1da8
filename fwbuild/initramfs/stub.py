"""Stub shared libraries: a library the node never uses replaced by a tiny generated one.

bookworm's /usr/bin/ssh is linked against libgssapi_krb5.so.2 (GSSAPI authentication),
which drags in the whole Kerberos stack (libkrb5, libk5crypto, libkrb5support,
libkeyutils, libcom_err: 1.7 MB). The node authenticates with its certificate only, so
the initramfs carries a stub instead, generated from what the staged binaries import:

- the importers' undefined dynamic symbols bound to the library (through their
  symbol-version requirements, `.gnu.version_r`, naming the library's file; unversioned
  undefined symbols count when the real library defines them), with their versions;
- every function returns GSS_S_UNAVAILABLE and sets `*minor_status = 0` (the first
  argument of every GSS-API call) when the pointer is not NULL; `gss_display_status`
  also hands back an empty message and a zero message context;
- every data object is a valid `gss_OID` (a pointer to an OID descriptor; the
  well-known name types carry their real OID bytes);
- compiled with clang/lld (`-nostdlib -shared`, the version script declaring the
  version nodes ld.so checks, no build id), so two builds give the same bytes.

The compiled stub is memoised in the cache (`stubs/`) by the digest of its source, its
flags and the compiler version.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from elftools.common.exceptions import ELFError
from elftools.elf.elffile import ELFFile
from elftools.elf.gnuversions import GNUVerNeedSection, GNUVerSymSection
from elftools.elf.sections import SymbolTableSection

from ..cache import Cache
from ..errors import BuildError
from ..fsutil import atomic_write

# The libraries a stub can stand in for (the generator knows their calling convention).
STUBBABLE = ("libgssapi_krb5.so.2",)
GSS_S_UNAVAILABLE = 16 << 16   # GSS_S_UNAVAILABLE: routine error 16 (RFC 2744 §3.9.1)
CLANG_PACKAGES = "clang lld"
_TARGETS = {"EM_AARCH64": "aarch64-linux-gnu", "EM_X86_64": "x86_64-linux-gnu"}
# RFC 2744 / MIT krb5 name types (DER contents of the OID).
KNOWN_OIDS: Mapping[str, bytes] = {
    "GSS_C_NT_USER_NAME": bytes.fromhex("2a864886f71201020101"),
    "GSS_C_NT_MACHINE_UID_NAME": bytes.fromhex("2a864886f71201020102"),
    "GSS_C_NT_STRING_UID_NAME": bytes.fromhex("2a864886f71201020103"),
    "GSS_C_NT_HOSTBASED_SERVICE": bytes.fromhex("2a864886f71201020104"),
    "GSS_C_NT_ANONYMOUS": bytes.fromhex("2b0601050603"),
    "GSS_C_NT_EXPORT_NAME": bytes.fromhex("2b0601050604"),
}


@dataclass(frozen=True, order=True)
class ImportedSymbol:
    name: str
    kind: str          # "function" or "object"
    version: str       # "" when the importer does not name one
    size: int = 0      # st_size of the undefined reference (non-zero with a copy relocation)


@dataclass(frozen=True)
class StubLibrary:
    soname: str
    data: bytes
    symbols: tuple[ImportedSymbol, ...]
    importers: tuple[str, ...]     # "/usr/bin/ssh"
    compiler: str                  # `clang --version`, first line
    flags: tuple[str, ...]

    def as_record(self, replaced: str, package: str) -> dict[str, Any]:
        """The provenance record of the stub (what it replaced, from what, how)."""
        return {
            "library": self.soname,
            "replaces": replaced,
            "replaced_package": package,
            "importers": list(self.importers),
            "symbols": [{"name": s.name, "kind": s.kind, "version": s.version} for s in self.symbols],
            "compiler": self.compiler,
            "flags": list(self.flags),
            "sha256": hashlib.sha256(self.data).hexdigest(),
            "size": len(self.data),
        }


def _exported(path: Path) -> dict[str, str]:
    """Defined dynamic symbols of a library: name -> "function"/"object"."""
    out: dict[str, str] = {}
    with open(path, "rb") as handle:
        elf = ELFFile(handle)
        dynsym = elf.get_section_by_name(".dynsym")
        if isinstance(dynsym, SymbolTableSection):
            for sym in dynsym.iter_symbols():
                if sym["st_shndx"] != "SHN_UNDEF" and sym.name:
                    out[sym.name] = "object" if sym["st_info"]["type"] == "STT_OBJECT" else "function"
    return out


def imported_symbols(importer: Path, soname: str, real_library: Path | None = None
                     ) -> tuple[str, list[ImportedSymbol]]:
    """(machine, symbols `importer` takes from `soname`) read from its dynamic symbol table.

    A versioned reference belongs to `soname` when its version requirement names that file;
    an unversioned one when `real_library` (the library being replaced) defines the name.
    """
    try:
        with open(importer, "rb") as handle:
            elf = ELFFile(handle)
            required: dict[int, str] = {}   # version index -> version name, for `soname` only
            versym: GNUVerSymSection | None = None
            for section in elf.iter_sections():
                if isinstance(section, GNUVerNeedSection):
                    for verneed, auxiliaries in section.iter_versions():
                        for aux in auxiliaries:
                            if verneed.name == soname:
                                required[aux["vna_other"]] = aux.name
                elif isinstance(section, GNUVerSymSection):
                    versym = section
            exported = _exported(real_library) if real_library is not None else {}
            found: list[ImportedSymbol] = []
            dynsym = elf.get_section_by_name(".dynsym")
            if isinstance(dynsym, SymbolTableSection):
                for index, sym in enumerate(dynsym.iter_symbols()):
                    if index == 0 or sym["st_shndx"] != "SHN_UNDEF" or not sym.name:
                        continue
                    ndx = versym.get_symbol(index)["ndx"] if versym is not None else 1
                    ndx = ndx if isinstance(ndx, int) else 1   # VER_NDX_LOCAL/GLOBAL as names
                    kind = "object" if sym["st_info"]["type"] == "STT_OBJECT" else "function"
                    if (ndx & 0x7FFF) in required:
                        found.append(ImportedSymbol(sym.name, kind, required[ndx & 0x7FFF], sym["st_size"]))
                    elif ndx <= 1 and sym.name in exported:
                        found.append(ImportedSymbol(sym.name, exported[sym.name], "", sym["st_size"]))
            return str(elf["e_machine"]), found
    except (ELFError, ValueError, KeyError) as exc:
        raise BuildError(f"corrupt ELF file: {exc}", str(importer)) from None


def _c_ident(name: str) -> str:
    if not name or not all(c.isalnum() or c == "_" for c in name) or name[0].isdigit():
        raise BuildError(f"cannot stub the symbol {name!r} (not a C identifier)")
    return name


def stub_source(soname: str, symbols: Sequence[ImportedSymbol]) -> str:
    """The C source of the stub (deterministic: symbols sorted)."""
    lines = [
        f"/* Stub of {soname}, generated by fwbuild: every call fails with GSS_S_UNAVAILABLE. */",
        "typedef unsigned int OM_uint32;",
        "struct oid_desc { OM_uint32 length; const void *elements; };",
        "struct buffer_desc { unsigned long length; void *value; };",
        f"#define UNAVAILABLE {GSS_S_UNAVAILABLE}u",
        "",
    ]
    for sym in sorted(symbols):
        name = _c_ident(sym.name)
        if sym.kind == "object":
            if sym.size not in (0, 8):
                raise BuildError(f"{soname}: data object {name} is copied with size {sym.size}",
                                 hint="only gss_OID (pointer) objects can be stubbed")
            oid = KNOWN_OIDS.get(name, b"")
            elements = ", ".join(f"0x{b:02x}" for b in oid) or "0"
            lines += [f"static const unsigned char oid_{name}[] = {{{elements}}};",
                      f"static struct oid_desc desc_{name} = {{{len(oid)}, oid_{name}}};",
                      f"struct oid_desc *{name} = &desc_{name};"]
        elif name == "gss_display_status":
            lines += [f"OM_uint32 {name}(OM_uint32 *minor, OM_uint32 status, int type, const void *mech,",
                      "                  OM_uint32 *context, struct buffer_desc *message) {",
                      "    (void)status; (void)type; (void)mech;",
                      "    if (minor) *minor = 0;",
                      "    if (context) *context = 0;",
                      "    if (message) { message->length = 0; message->value = 0; }",
                      "    return UNAVAILABLE;", "}"]
        else:
            lines += [f"OM_uint32 {name}(OM_uint32 *minor) {{",
                      "    if (minor) *minor = 0;", "    return UNAVAILABLE;", "}"]
    return "\n".join(lines) + "\n"


def version_script(symbols: Sequence[ImportedSymbol]) -> str:
    """One version node per required version (ld.so refuses an importer whose node is missing)."""
    by_version: dict[str, list[str]] = {}
    for sym in sorted(symbols):
        by_version.setdefault(sym.version, []).append(sym.name)
    unversioned = by_version.pop("", [])
    if not by_version:
        return "{\n  global: " + " ".join(f"{n};" for n in unversioned) + "\n  local: *;\n};\n"
    nodes = []
    for i, (version, names) in enumerate(sorted(by_version.items())):
        names = names + (unversioned if i == 0 else [])
        local = "\n  local: *;" if i == 0 else ""
        nodes.append(f"{version} {{\n  global: " + " ".join(f"{n};" for n in sorted(names))
                     + f"{local}\n}};\n")
    return "".join(nodes)


def _tool(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        raise BuildError(f"`{name}` is not installed (needed to compile the stub libraries)",
                         "initramfs.stub_libraries",
                         f"install it (apt-get install {CLANG_PACKAGES}), or remove "
                         "initramfs.stub_libraries from the recipe")
    return path


def compiler_flags(machine: str, soname: str) -> tuple[str, ...]:
    target = _TARGETS.get(machine)
    if target is None:
        raise BuildError(f"no stub compiler target for machine {machine}", "initramfs.stub_libraries",
                         f"stubs are built for {', '.join(_TARGETS)}")
    return (f"--target={target}", "-O2", "-fPIC", "-ffreestanding", "-fno-ident", "-nostdlib",
            "-shared", "-fuse-ld=lld", "-Wl,--build-id=none", "-Wl,--hash-style=gnu",
            "-Wl,-z,now", "-Wl,-z,relro", "-Wl,--strip-all", f"-Wl,-soname,{soname}",
            "-Wl,--version-script=stub.map")


def compile_stub(soname: str, machine: str, symbols: Sequence[ImportedSymbol],
                 importers: Sequence[str], cache: Cache | None = None) -> StubLibrary:
    """Compile (or take from the cache) the stub for `symbols`."""
    clang = _tool("clang")
    _tool("ld.lld")
    try:
        compiler = subprocess.run([clang, "--version"], check=True, capture_output=True,
                                  text=True).stdout.splitlines()[0].strip()
    except (OSError, subprocess.CalledProcessError, IndexError) as exc:
        raise BuildError(f"clang does not run: {exc}", "initramfs.stub_libraries",
                         f"reinstall it (apt-get install {CLANG_PACKAGES})") from None
    flags = compiler_flags(machine, soname)
    source, script = stub_source(soname, symbols), version_script(symbols)
    key = hashlib.sha256("\0".join([compiler, *flags, source, script]).encode()).hexdigest()
    memo = cache.stub_memo(key) if cache is not None else None
    data = memo.read_bytes() if memo is not None and memo.is_file() else None
    if data is None or data[:4] != b"\x7fELF":
        with tempfile.TemporaryDirectory(prefix="fwbuild-stub-") as tmp:
            Path(tmp, "stub.c").write_text(source)
            Path(tmp, "stub.map").write_text(script)
            result = subprocess.run([clang, *flags, "-o", "stub.so", "stub.c"], cwd=tmp, check=False,
                                    capture_output=True, text=True,
                                    env={**os.environ, "LC_ALL": "C"})
            if result.returncode != 0:
                raise BuildError(f"compiling the {soname} stub failed: {result.stderr.strip()[-800:]}",
                                 "initramfs.stub_libraries",
                                 f"check the clang/lld installation (apt-get install {CLANG_PACKAGES})")
            data = Path(tmp, "stub.so").read_bytes()
        if memo is not None:
            atomic_write(memo, data)
    return StubLibrary(soname, data, tuple(sorted(symbols)), tuple(sorted(importers)), compiler, flags)


def build_stub(soname: str, importers: Mapping[str, Path], real_library: Path | None,
               cache: Cache | None = None) -> StubLibrary:
    """The stub of `soname` for `importers` ("/usr/bin/ssh" -> host path of the staged file)."""
    merged: dict[str, ImportedSymbol] = {}
    machines: set[str] = set()
    for path in sorted(importers):
        machine, symbols = imported_symbols(importers[path], soname, real_library)
        machines.add(machine)
        for sym in symbols:
            if sym.name in merged and merged[sym.name].version != sym.version:
                raise BuildError(f"{sym.name} is imported with two versions "
                                 f"({merged[sym.name].version!r}, {sym.version!r})", path)
            merged.setdefault(sym.name, sym)
    if len(machines) != 1:
        raise BuildError(f"the importers of {soname} are of several machines: {sorted(machines)}")
    return compile_stub(soname, machines.pop(), list(merged.values()), list(importers), cache)
