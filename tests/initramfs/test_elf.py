"""ELF and kernel-module closures on synthetic staged trees (hand-made ELF files, no network)."""

from __future__ import annotations

import lzma
import struct
from pathlib import Path

import pytest
import zstandard

from fwbuild.errors import BuildError
from fwbuild.initramfs.deb import DebContents, DebMember
from fwbuild.initramfs.elf import resolve_elf_closure
from fwbuild.initramfs.modules import module_name, select_modules
from fwbuild.initramfs.staging import StagedTree

EM_AARCH64, EM_X86_64 = 183, 62


def make_elf(*, interp: str | None = None, needed: tuple[str, ...] = (), runpath: str | None = None,
             rpath: str | None = None, machine: int = EM_AARCH64, modinfo: bytes | None = None) -> bytes:
    """A minimal little-endian ELF64: .interp/.dynstr/.dynamic (+ PT_INTERP/PT_DYNAMIC) or .modinfo."""
    dynstr = b"\0"
    tags: list[tuple[int, int]] = []

    def string(text: str) -> int:
        nonlocal dynstr
        offset = len(dynstr)
        dynstr += text.encode() + b"\0"
        return offset

    for name in needed:
        tags.append((1, string(name)))             # DT_NEEDED
    if rpath is not None:
        tags.append((15, string(rpath)))           # DT_RPATH
    if runpath is not None:
        tags.append((29, string(runpath)))         # DT_RUNPATH
    tags.append((0, 0))                            # DT_NULL
    sections: list[tuple[str, int, bytes, int, int]] = []  # name, type, data, link, entsize
    if modinfo is not None:
        sections.append((".modinfo", 1, modinfo, 0, 0))
    else:
        if interp is not None:
            sections.append((".interp", 1, interp.encode() + b"\0", 0, 0))
        sections.append((".dynstr", 3, dynstr, 0, 0))
        dynstr_index = len(sections)  # section 0 is the null section
        sections.append((".dynamic", 6, b"".join(struct.pack("<qQ", t, v) for t, v in tags),
                         dynstr_index, 16))
    shstr = b"\0"
    names = []
    for name, *_ in sections:
        names.append(len(shstr))
        shstr += name.encode() + b"\0"
    shstr_name = len(shstr)
    shstr += b".shstrtab\0"
    phnum = 0 if modinfo is not None else (2 if interp is not None else 1)
    offset = 64 + 56 * phnum
    blobs, offsets = b"", []
    for _, _, data, _, _ in sections:
        offsets.append(offset + len(blobs))
        blobs += data
    shstr_offset = offset + len(blobs)
    blobs += shstr
    shoff = offset + len(blobs)
    shoff += (8 - shoff % 8) % 8
    phdrs = b""
    by_name = {s[0]: i for i, s in enumerate(sections)}
    if interp is not None and modinfo is None:
        i = by_name[".interp"]
        phdrs += struct.pack("<IIQQQQQQ", 3, 4, offsets[i], 0, 0, len(sections[i][2]), len(sections[i][2]), 1)
    if modinfo is None:
        i = by_name[".dynamic"]
        phdrs += struct.pack("<IIQQQQQQ", 2, 6, offsets[i], 0, 0, len(sections[i][2]), len(sections[i][2]), 8)
    header = b"\x7fELF" + bytes([2, 1, 1, 0]) + b"\0" * 8 + struct.pack(
        "<HHIQQQIHHHHHH", 1 if modinfo is not None else 3, machine, 1, 0, 64 if phnum else 0, shoff,
        0, 64, 56, phnum, 64, len(sections) + 2, len(sections) + 1)
    body = header + phdrs + blobs
    body += b"\0" * (shoff - len(body))
    shdrs = b"\0" * 64
    for (_, kind, data, link, entsize), name_off, data_off in zip(sections, names, offsets):
        shdrs += struct.pack("<IIQQQQIIQQ", name_off, kind, 0, 0, data_off, len(data), link, 0, 1, entsize)
    shdrs += struct.pack("<IIQQQQIIQQ", shstr_name, 3, 0, 0, shstr_offset, len(shstr), 0, 0, 1, 0)
    return body + shdrs


def staged(tmp_path: Path, files: dict[str, bytes], links: dict[str, str] | None = None,
           package: str = "demo") -> StagedTree:
    root = tmp_path / package
    members = []
    for path, data in files.items():
        (root / path).parent.mkdir(parents=True, exist_ok=True)
        (root / path).write_bytes(data)
        members.append(DebMember(path, "f", 0o755))
    for path, target in (links or {}).items():
        members.append(DebMember(path, "l", 0o777, target))
    contents = DebContents({"Package": package}, tuple(members))
    return StagedTree.from_packages([(contents, root)])


LD = "/lib/ld-linux-aarch64.so.1"


def base_files() -> tuple[dict[str, bytes], dict[str, str]]:
    files = {
        "lib/aarch64-linux-gnu/ld-linux-aarch64.so.1": make_elf(),
        "lib/aarch64-linux-gnu/libc.so.6": make_elf(),
        "usr/lib/aarch64-linux-gnu/libz.so.1.2.13": make_elf(needed=("libc.so.6",)),
        "usr/bin/tool": make_elf(interp=LD, needed=("libz.so.1", "libc.so.6", "libplug.so")),
        "opt/tool/lib/libplug.so": make_elf(needed=("libc.so.6",)),
        "usr/share/doc/tool/README": b"not an ELF",
    }
    links = {
        "lib/ld-linux-aarch64.so.1": "aarch64-linux-gnu/ld-linux-aarch64.so.1",
        "usr/lib/aarch64-linux-gnu/libz.so.1": "libz.so.1.2.13",
    }
    return files, links


def test_closure_follows_interp_needed_runpath_and_symlinks(tmp_path: Path) -> None:
    files, links = base_files()
    files["usr/bin/tool"] = make_elf(interp=LD, needed=("libz.so.1", "libc.so.6", "libplug.so"),
                                     runpath="$ORIGIN/../../opt/tool/lib")
    tree = staged(tmp_path, files, links)
    closure = resolve_elf_closure(tree, [("/usr/bin/tool", ("requested",)),
                                         ("/usr/share/doc/tool/README", ("requested",))])
    assert sorted(closure.reasons) == [
        "lib/aarch64-linux-gnu/ld-linux-aarch64.so.1", "lib/aarch64-linux-gnu/libc.so.6",
        "lib/ld-linux-aarch64.so.1", "opt/tool/lib/libplug.so", "usr/bin/tool",
        "usr/lib/aarch64-linux-gnu/libz.so.1", "usr/lib/aarch64-linux-gnu/libz.so.1.2.13",
        "usr/share/doc/tool/README"]
    assert closure.symlinks == {"lib/ld-linux-aarch64.so.1": "aarch64-linux-gnu/ld-linux-aarch64.so.1",
                                "usr/lib/aarch64-linux-gnu/libz.so.1": "libz.so.1.2.13"}
    assert closure.reasons["lib/aarch64-linux-gnu/libc.so.6"] == ("needed by /usr/bin/tool", "requested")
    assert closure.reasons["usr/lib/aarch64-linux-gnu/libz.so.1.2.13"][0] == "needed by /usr/bin/tool"
    assert ("libplug.so", "opt/tool/lib/libplug.so") in closure.needed["usr/bin/tool"]


def test_rpath_is_ignored_when_runpath_is_present(tmp_path: Path) -> None:
    files, links = base_files()
    files["usr/bin/tool"] = make_elf(interp=LD, needed=("libplug.so",), rpath="/opt/tool/lib",
                                     runpath="/nowhere")
    with pytest.raises(BuildError, match="libplug.so"):
        resolve_elf_closure(staged(tmp_path, files, links), [("/usr/bin/tool", ())])
    files["usr/bin/tool"] = make_elf(interp=LD, needed=("libplug.so",), rpath="/opt/tool/lib")
    closure = resolve_elf_closure(staged(tmp_path, files, links), [("/usr/bin/tool", ())])
    assert "opt/tool/lib/libplug.so" in closure.reasons


def test_missing_library_names_binary_library_and_paths_tried(tmp_path: Path) -> None:
    files, links = base_files()
    del files["usr/lib/aarch64-linux-gnu/libz.so.1.2.13"]
    del links["usr/lib/aarch64-linux-gnu/libz.so.1"]
    files["usr/bin/tool"] = make_elf(interp=LD, needed=("libz.so.1",))
    with pytest.raises(BuildError) as info:
        resolve_elf_closure(staged(tmp_path, files, links), [("/usr/bin/tool", ())])
    error = info.value
    assert "/usr/bin/tool needs libz.so.1" in error.what
    assert error.hint is not None
    for tried in ("/lib/aarch64-linux-gnu/libz.so.1", "/usr/lib/aarch64-linux-gnu/libz.so.1",
                  "/lib/libz.so.1", "/usr/lib/libz.so.1"):
        assert tried in error.hint


def test_wrong_machine_candidates_are_skipped(tmp_path: Path) -> None:
    files, links = base_files()
    files["usr/bin/tool"] = make_elf(interp=LD, needed=("libc.so.6",))
    files["lib/libc.so.6"] = make_elf(machine=EM_X86_64)  # earlier in no path, later would be fine
    files["lib/aarch64-linux-gnu/libc.so.6"] = make_elf(machine=EM_X86_64)
    with pytest.raises(BuildError, match="libc.so.6"):
        resolve_elf_closure(staged(tmp_path, files, links), [("/usr/bin/tool", ())])
    files["usr/lib/libc.so.6"] = make_elf()
    closure = resolve_elf_closure(staged(tmp_path, files, links), [("/usr/bin/tool", ())])
    assert "usr/lib/libc.so.6" in closure.reasons


def test_usr_merge_directory_symlink(tmp_path: Path) -> None:
    files = {"usr/lib/aarch64-linux-gnu/ld-linux-aarch64.so.1": make_elf(),
             "usr/lib/aarch64-linux-gnu/libc.so.6": make_elf(),
             "usr/bin/tool": make_elf(interp="/lib/aarch64-linux-gnu/ld-linux-aarch64.so.1",
                                      needed=("libc.so.6",))}
    tree = staged(tmp_path, files, {"lib": "usr/lib"})
    closure = resolve_elf_closure(tree, [("/usr/bin/tool", ())])
    assert closure.symlinks == {"lib": "usr/lib"}
    assert "usr/lib/aarch64-linux-gnu/libc.so.6" in closure.reasons


def test_missing_root_is_reported(tmp_path: Path) -> None:
    files, links = base_files()
    with pytest.raises(BuildError, match="/usr/bin/nothere is not in the staged packages"):
        resolve_elf_closure(staged(tmp_path, files, links), [("/usr/bin/nothere", ())])


# --- kernel modules ----------------------------------------------------------------

def ko(name: str, depends: str = "") -> bytes:
    return make_elf(modinfo=f"license=GPL\0name={name}\0depends={depends}\0vermagic=6.1.0-test\0".encode())


def kernel_tree(tmp_path: Path) -> StagedTree:
    base = "lib/modules/6.1.0-test"
    files = {
        f"{base}/kernel/drivers/net/virtio_net.ko": ko("virtio_net", "net_failover,virtio"),
        f"{base}/kernel/drivers/net/net_failover.ko.xz": lzma.compress(ko("net_failover", "failover"),
                                                                       check=lzma.CHECK_CRC32),
        f"{base}/kernel/net/core/failover.ko.zst": zstandard.ZstdCompressor().compress(ko("failover")),
        f"{base}/kernel/drivers/virtio/virtio.ko": ko("virtio"),
        f"{base}/kernel/drivers/firmware/qemu_fw_cfg.ko": ko("qemu_fw_cfg"),
        f"{base}/modules.builtin": b"kernel/net/packet/af_packet.ko\nkernel/fs/ext4/ext4.ko\n",
        "boot/vmlinuz-6.1.0-test": b"kernel",
    }
    return staged(tmp_path, files, package="linux-image-6.1.0-test")


def test_module_closure_decompresses_and_rewrites_modules_dep(tmp_path: Path) -> None:
    selection = select_modules(kernel_tree(tmp_path), ["virtio-net", "af_packet", "qemu_fw_cfg"])
    base = "lib/modules/6.1.0-test"
    assert selection.kernel_version == "6.1.0-test"
    assert selection.builtin == ["af_packet"]
    assert selection.load_order == ["failover", "net_failover", "virtio", "virtio_net", "qemu_fw_cfg"]
    assert selection.files[f"{base}/kernel/drivers/net/net_failover.ko"] == ko("net_failover", "failover")
    assert selection.files[f"{base}/kernel/net/core/failover.ko"] == ko("failover")
    assert not any(path.endswith((".xz", ".zst")) for path in selection.files)
    dep = selection.files[f"{base}/modules.dep"].decode().splitlines()
    assert "kernel/drivers/net/virtio_net.ko: kernel/drivers/net/net_failover.ko "\
           "kernel/drivers/virtio/virtio.ko kernel/net/core/failover.ko" in dep
    assert "kernel/net/core/failover.ko:" in dep
    assert len(dep) == 5
    assert selection.reasons[f"{base}/kernel/net/core/failover.ko"] == (
        "module net_failover", "module virtio_net", "module virtio_net (requested)")


def test_unknown_module_is_an_error_with_close_names(tmp_path: Path) -> None:
    with pytest.raises(BuildError) as info:
        select_modules(kernel_tree(tmp_path), ["virtio"[:-1] + "x_net"])
    assert "neither a module nor built in" in info.value.what
    with pytest.raises(BuildError) as info:
        select_modules(kernel_tree(tmp_path), ["fw_cfg"])
    assert info.value.hint is not None and "qemu_fw_cfg" in info.value.hint


def test_module_name_normalisation() -> None:
    assert module_name("kernel/a/virtio-net.ko.zst") == "virtio_net"
    assert module_name("fuse") == "fuse"
