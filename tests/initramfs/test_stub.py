"""The generated stub library (fwbuild/initramfs/stub.py) and what it does to the VPN initramfs.

The generator tests compile a small library and an importer with clang (no network); the
slow tests build recipes/virtual.toml's initramfs from real Debian arm64 packages, and run
its arm64 ssh (qemu-aarch64) against a real sshd that offers GSSAPI authentication.
"""

from __future__ import annotations

import os
import shutil
import socket
import stat
import subprocess
from dataclasses import replace
from pathlib import Path

import pytest
from elftools.elf.dynamic import DynamicSection
from elftools.elf.elffile import ELFFile
from elftools.elf.gnuversions import GNUVerDefSection

from fwbuild.cache import Cache
from fwbuild.errors import BuildError, ConfigError
from fwbuild.initramfs.builder import (
    InitramfsResult,
    InitramfsSpec,
    build_initramfs,
    spec_from_recipe,
)
from fwbuild.initramfs.cpio import CpioEntry, decompress, read_cpio
from fwbuild.initramfs.stub import build_stub, imported_symbols
from fwbuild.recipe import load_recipe
from tests.server_support import wait_listening, write_ca_sshd_config

ROOT = Path(__file__).resolve().parents[2]
SONAME = "libgssapi_krb5.so.2"
KERBEROS = ("libkrb5.so", "libk5crypto.so", "libkrb5support.so", "libkeyutils.so", "libcom_err.so",
            "libgssapi_krb5.so.2.2")
FOUR_MIB = 4 * 1024 * 1024
needs_clang = pytest.mark.skipif(shutil.which("clang") is None or shutil.which("ld.lld") is None,
                                 reason="clang/lld not installed (scripts/apt-packages.txt)")

LIBRARY_C = """
struct oid { unsigned length; const void *elements; };
static struct oid user = {0, 0};
struct oid *GSS_C_NT_USER_NAME = &user;
unsigned gss_import_name(unsigned *minor) { *minor = 7; return 0; }
unsigned gss_release_name(unsigned *minor) { *minor = 7; return 0; }
unsigned gss_not_imported(unsigned *minor) { *minor = 7; return 0; }
"""
IMPORTER_C = """
struct oid;
extern struct oid *GSS_C_NT_USER_NAME;
unsigned gss_import_name(unsigned *minor);
unsigned gss_release_name(unsigned *minor);
void *use(void) { unsigned m; gss_import_name(&m); gss_release_name(&m); return GSS_C_NT_USER_NAME; }
"""


def _clang(directory: Path, out: str, source: str, *extra: str) -> Path:
    (directory / f"{out}.c").write_text(source)
    subprocess.run(["clang", "--target=aarch64-linux-gnu", "-nostdlib", "-shared", "-fPIC",
                    "-fuse-ld=lld", "-o", out, f"{out}.c", *extra], cwd=directory, check=True)
    return directory / out


@pytest.fixture
def importer(tmp_path: Path) -> tuple[Path, Path]:
    """(importer, real library): the library has a version node, the importer links against it."""
    (tmp_path / "lib.map").write_text("gssapi_krb5_2_MIT { global: *; };\n")
    library = _clang(tmp_path, SONAME, LIBRARY_C, f"-Wl,-soname,{SONAME}", "-Wl,--version-script=lib.map")
    user = _clang(tmp_path, "libuser.so", IMPORTER_C, f"./{SONAME}")
    return user, library


@needs_clang
def test_stub_is_generated_from_the_imports(importer: tuple[Path, Path], tmp_path: Path) -> None:
    user, library = importer
    machine, symbols = imported_symbols(user, SONAME, library)
    assert machine == "EM_AARCH64"
    assert {(s.name, s.kind, s.version) for s in symbols} == {
        ("GSS_C_NT_USER_NAME", "object", "gssapi_krb5_2_MIT"),
        ("gss_import_name", "function", "gssapi_krb5_2_MIT"),
        ("gss_release_name", "function", "gssapi_krb5_2_MIT")}
    stub = build_stub(SONAME, {"/usr/lib/libuser.so": user}, library)
    again = build_stub(SONAME, {"/usr/lib/libuser.so": user}, library)
    assert stub.data == again.data            # compiled twice, no cache: the same bytes
    (tmp_path / "stub.so").write_bytes(stub.data)
    with open(tmp_path / "stub.so", "rb") as handle:
        elf = ELFFile(handle)
        assert elf["e_machine"] == "EM_AARCH64" and elf["e_type"] == "ET_DYN"
        dynamic = next(s for s in elf.iter_sections() if isinstance(s, DynamicSection))
        tags = {t.entry.d_tag: t for t in dynamic.iter_tags()}
        assert tags["DT_SONAME"].soname == SONAME
        assert "DT_NEEDED" not in tags      # nothing else is pulled in
        verdef = next(s for s in elf.iter_sections() if isinstance(s, GNUVerDefSection))
        assert "gssapi_krb5_2_MIT" in {aux.name for _v, auxiliaries in verdef.iter_versions()
                                      for aux in auxiliaries}
        exported = {s.name: s for s in elf.get_section_by_name(".dynsym").iter_symbols()
                    if s["st_shndx"] != "SHN_UNDEF"}
        assert set(exported) == {"GSS_C_NT_USER_NAME", "gss_import_name", "gss_release_name"}
        assert exported["GSS_C_NT_USER_NAME"]["st_info"]["type"] == "STT_OBJECT"
        assert exported["GSS_C_NT_USER_NAME"]["st_size"] == 8
        assert not any(s.name == ".note.gnu.build-id" for s in elf.iter_sections())
    record = stub.as_record("/usr/lib/libgssapi_krb5.so.2.2", "libgssapi-krb5-2")
    assert record["compiler"].lower().startswith(("clang", "debian clang"))
    assert [s["name"] for s in record["symbols"]] == ["GSS_C_NT_USER_NAME", "gss_import_name",
                                                      "gss_release_name"]


@needs_clang
def test_stub_is_memoised_in_the_cache(importer: tuple[Path, Path], tmp_path: Path) -> None:
    user, library = importer
    cache = Cache(tmp_path / "cache")
    first = build_stub(SONAME, {"/usr/lib/libuser.so": user}, library, cache)
    memos = list((cache.root / "stubs").iterdir())
    assert len(memos) == 1 and memos[0].read_bytes() == first.data
    memos[0].write_bytes(b"damaged")         # a damaged memo is recompiled
    assert build_stub(SONAME, {"/usr/lib/libuser.so": user}, library, cache).data == first.data


def test_missing_clang_is_one_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PATH", "/nonexistent")
    with pytest.raises(BuildError) as info:
        build_stub(SONAME, {"/usr/bin/ssh": Path(os.path.realpath("/bin/sh"))}, None)
    assert "`clang` is not installed" in info.value.what
    assert info.value.hint is not None and "apt-get install clang lld" in info.value.hint


def test_recipe_switch_is_validated(tmp_path: Path) -> None:
    text = (ROOT / "recipes" / "virtual.toml").read_text()
    (tmp_path / "r.toml").write_text(text)
    recipe = load_recipe(tmp_path / "r.toml")
    assert recipe.initramfs.stub_libraries == (SONAME,)
    with pytest.raises(ConfigError) as info:
        load_recipe(tmp_path / "r.toml", ["initramfs.stub_libraries=[\"libgssapi_krb5.so\"]"])
    error = info.value
    assert "no stub is known for 'libgssapi_krb5.so'" in error.what
    assert error.where is not None and error.where.startswith("--set initramfs.stub_libraries")
    assert error.hint is not None and f"did you mean `{SONAME}`?" in error.hint
    off = load_recipe(tmp_path / "r.toml", ["initramfs.stub_libraries=[]"])
    assert spec_from_recipe(off, epoch=0).stub_libraries == ()


def test_stub_option_is_checked_before_any_download(tmp_path: Path) -> None:
    from click.testing import CliRunner

    from fwbuild.cli import main

    result = CliRunner().invoke(main, ["initramfs", "build", "--stub-library", "libcrypto.so.3",
                                       "--out", str(tmp_path / "i")])
    assert result.exit_code == 1, result.output
    assert "no stub is known for 'libcrypto.so.3' (initramfs.stub_libraries)" in result.output
    assert "Hint: stubs exist for libgssapi_krb5.so.2" in result.output
    assert not (tmp_path / "i").exists()


# --- the real initramfs (Debian arm64 packages; slow) ---------------------------------------

def _files(result: InitramfsResult) -> dict[str, CpioEntry]:
    return {"/" + e.name: e for e in read_cpio(decompress(result.data))}


@pytest.fixture(scope="module")
def cache(tmp_path_factory: pytest.TempPathFactory) -> Cache:
    return Cache(tmp_path_factory.getbasetemp() / "fwbuild-cache")  # the conftest's session cache


@pytest.fixture(scope="module")
def virtual_spec() -> InitramfsSpec:
    return spec_from_recipe(load_recipe(ROOT / "recipes" / "virtual.toml"), epoch=1700000000)


@pytest.fixture(scope="module")
def stubbed(cache: Cache, virtual_spec: InitramfsSpec) -> InitramfsResult:
    return build_initramfs(virtual_spec, cache)


@pytest.mark.slow
@needs_clang
def test_virtual_initramfs_has_no_kerberos_and_fits(stubbed: InitramfsResult, cache: Cache,
                                                    virtual_spec: InitramfsSpec) -> None:
    files = _files(stubbed)
    assert not [p for p in files if any(k in p for k in KERBEROS)]
    stub = files[f"/usr/lib/aarch64-linux-gnu/{SONAME}"]
    assert stub.kind == "-" and stub.data[:4] == b"\x7fELF" and len(stub.data) < 8192
    assert len(stubbed.data) < FOUR_MIB, f"{len(stubbed.data)} B (xz) is over 4 MiB"
    doc = stubbed.provenance_document()
    [record] = doc["stubs"]
    assert record["library"] == SONAME and record["importers"] == ["/usr/bin/ssh"]
    assert record["replaces"] == "/usr/lib/aarch64-linux-gnu/libgssapi_krb5.so.2.2"
    assert len(record["symbols"]) == 18 and {s["version"] for s in record["symbols"]} == {
        "gssapi_krb5_2_MIT"}
    assert doc["paths"][f"/usr/lib/aarch64-linux-gnu/{SONAME}"][0].startswith(f"stub of {SONAME}")
    # built again (stub from its memo): the same bytes
    assert build_initramfs(virtual_spec, cache).data == stubbed.data
    # without the stub: the same entries, plus the Kerberos stack instead of the stub
    plain = _files(build_initramfs(replace(virtual_spec, stub_libraries=()), cache))
    removed = {p for p in plain if p not in files}
    assert {p for p in files if p not in plain} == set()
    assert removed and all(any(k in p for k in KERBEROS) for p in removed)
    def facts(entry: CpioEntry) -> tuple[object, ...]:
        return entry.mode, entry.data, entry.mtime, entry.uid, entry.gid, entry.nlink

    changed = [p for p in files if p in plain and facts(files[p]) != facts(plain[p])]
    assert changed == [f"/usr/lib/aarch64-linux-gnu/{SONAME}"]   # was the symlink to .so.2.2


@pytest.mark.slow
@needs_clang
def test_stub_nobody_needs_is_an_error(cache: Cache) -> None:
    spec = InitramfsSpec(packages=("busybox-static",), paths=("/bin/busybox",),
                         stub_libraries=(SONAME,))
    with pytest.raises(BuildError) as info:
        build_initramfs(spec, cache)
    assert info.value.what == f"stub library {SONAME} is needed by none of the staged binaries"
    assert info.value.where == "initramfs.stub_libraries"
    assert info.value.hint is not None and "remove it" in info.value.hint


def _extract(files: dict[str, CpioEntry], root: Path) -> None:
    for path, entry in sorted(files.items()):
        target = root / path.lstrip("/")
        if entry.kind == "d":
            target.mkdir(parents=True, exist_ok=True)
        elif entry.kind == "l":
            target.parent.mkdir(parents=True, exist_ok=True)
            target.symlink_to(entry.link_target)
        elif entry.kind == "-":
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(entry.data)
            target.chmod(stat.S_IMODE(entry.mode))


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.mark.slow
@needs_clang
@pytest.mark.skipif(shutil.which("qemu-aarch64") is None, reason="qemu-user not installed")
@pytest.mark.skipif(os.geteuid() != 0, reason="the test sshd needs root")
def test_arm64_ssh_with_the_stub_falls_back_from_gssapi_to_the_certificate(
        stubbed: InitramfsResult, tmp_path: Path) -> None:
    root = tmp_path / "root"
    _extract(_files(stubbed), root)
    keys = tmp_path / "keys"
    keys.mkdir()
    for name in ("ca", "node", "host"):
        subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(keys / name)], check=True)
    subprocess.run(["ssh-keygen", "-q", "-s", str(keys / "ca"), "-I", "node", "-n", "walt-vpn",
                    str(keys / "node.pub")], check=True)
    port = _free_port()
    (keys / "known_hosts").write_text(f"[127.0.0.1]:{port} {(keys / 'host.pub').read_text()}")
    (keys / "revoked").write_text("")
    config = write_ca_sshd_config(keys, port=port, hostkey=keys / "host", ca_pub=keys / "ca.pub",
                                  revoked_keys=keys / "revoked", extra="GSSAPIAuthentication yes\n")
    Path("/run/sshd").mkdir(exist_ok=True)
    sshd = subprocess.Popen(["/usr/sbin/sshd", "-D", "-e", "-f", str(config)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        wait_listening(port, sshd, "sshd")
        result = subprocess.run(
            ["qemu-aarch64", "-L", str(root), str(root / "usr/bin/ssh"), "-v", "-F", "/dev/null",
             "-i", str(keys / "node"), "-o", f"CertificateFile={keys / 'node-cert.pub'}",
             "-o", "IdentitiesOnly=yes", "-o", "BatchMode=yes",
             "-o", f"UserKnownHostsFile={keys / 'known_hosts'}", "-o", "GlobalKnownHostsFile=/dev/null",
             "-o", "StrictHostKeyChecking=yes", "-o", "GSSAPIAuthentication=yes",
             "-p", str(port), "root@127.0.0.1", "echo", "certificate-login"],
            capture_output=True, text=True, timeout=300, check=False)
    finally:
        sshd.terminate()
        sshd.wait(timeout=60)
    assert result.returncode == 0, result.stderr
    assert result.stdout == "certificate-login\n"
    assert "Next authentication method: gssapi-with-mic" in result.stderr   # tried, failed cleanly
    assert 'Authenticated to 127.0.0.1 ([127.0.0.1]:' in result.stderr
    assert 'using "publickey"' in result.stderr
