"""boot.img / boot.sig: contents, FAT checks with the stock tools, signature with stock OpenSSL."""

from __future__ import annotations

import hashlib
import subprocess
from pathlib import Path

import pytest
from click.testing import CliRunner
from cryptography.hazmat.primitives import serialization

from fwbuild.bootimg.bootimg import (
    BOOT_IMG_MAX_BYTES,
    boot_files,
    build_boot_image,
    overlays_named,
    sign_boot_image,
)
from fwbuild.bootimg.fat import read_fat
from fwbuild.cli import main
from fwbuild.eeprom.pubkey import decode_pubkey_bin, encode_pubkey_bin
from fwbuild.errors import BuildError
from fwbuild.keys import KeyPaths, load_boot_key
from fwbuild.sign import parse_sig, verify_sig

EPOCH = 1_700_000_000
DTBS = {"bcm2712-rpi-5-b.dtb": b"\xd0\x0d\xfe\xed" + b"a" * 5000,
        "bcm2712d0-rpi-5-b.dtb": b"\xd0\x0d\xfe\xed" + b"b" * 5000,
        "bcm2712-rpi-cm5-cm5io.dtb": b"\xd0\x0d\xfe\xed" + b"c" * 5000}
OVERLAYS = {"vc4-kms-v3d-pi5.dtbo": b"ov1", "disable-bt.dtbo": b"ov2", "unused": b"ov3",
            "overlay_map.dtb": b"map"}


def _kernel() -> bytes:
    return hashlib.sha256(b"k").digest() * 40_000  # 1.28 MB


def _files(**kwargs: object) -> dict[str, bytes]:
    args: dict[str, object] = {
        "kernel": _kernel(), "initramfs": b"\x1f\x8b" + b"i" * 300_000, "dtbs": DTBS,
        "cmdline": "console=ttyAMA10,115200 rdinit=/init",
        "config_extra": ["dtoverlay=vc4-kms-v3d-pi5,cma-256", "dtparam=uart0=on",
                         "dtoverlay=disable-bt"],
        "overlays": OVERLAYS,
    }
    args.update(kwargs)
    return boot_files(**args)  # type: ignore[arg-type]


def test_boot_files_contents() -> None:
    files = _files()
    assert sorted(files) == sorted([
        "config.txt", "cmdline.txt", "kernel_2712.img", "initramfs_2712", *DTBS,
        "overlays/vc4-kms-v3d-pi5.dtbo", "overlays/disable-bt.dtbo", "overlays/overlay_map.dtb"])
    config = files["config.txt"].decode()
    assert "kernel=" not in config
    assert config.splitlines()[1:] == ["initramfs initramfs_2712 followkernel",
                                       "dtoverlay=vc4-kms-v3d-pi5,cma-256", "dtparam=uart0=on",
                                       "dtoverlay=disable-bt"]
    assert files["cmdline.txt"] == b"console=ttyAMA10,115200 rdinit=/init\n"
    assert files["overlays/disable-bt.dtbo"] == b"ov2"


def test_custom_kernel_name_and_no_overlays() -> None:
    files = _files(kernel_name="Image", config_extra=[], overlays={})
    assert "kernel=Image\n" in files["config.txt"].decode()
    assert "Image" in files and not any(p.startswith("overlays/") for p in files)
    assert overlays_named(["dtoverlay=a:x=1", " dtoverlay = b,c", "dtoverlay=", "dtoverlay=a"]) \
        == ["a", "b"]


@pytest.mark.parametrize("kwargs, message", [
    ({"config_extra": ["dtoverlay=missing"]}, "names overlay 'missing'"),
    ({"config_extra": ["kernel=other.img"]}, "override the kernel"),
    ({"config_extra": ["two\nlines"]}, "one line"),
    ({"cmdline": "a\nb"}, "one non-empty line"),
    ({"cmdline": "  "}, "one non-empty line"),
    ({"kernel": b""}, "kernel is empty"),
    ({"initramfs": b""}, "initramfs is empty"),
    ({"dtbs": {}}, "no device tree"),
    ({"dtbs": {"x.dtbo": b"1"}}, "does not end in .dtb"),
    ({"kernel_name": "../k"}, "invalid kernel file name"),
])
def test_boot_files_errors(kwargs: dict[str, object], message: str) -> None:
    with pytest.raises(BuildError, match=message):
        _files(**kwargs)


def test_virtual_target_needs_no_dtb() -> None:
    files = _files(dtbs={}, require_dtbs=False)
    assert not any(p.endswith(".dtb") and "/" not in p for p in files)


def test_boot_image_is_clean_and_tools_extract_identical_files(tmp_path: Path) -> None:
    files = _files()
    image = build_boot_image(files, EPOCH)
    path = tmp_path / "boot.img"
    path.write_bytes(image)
    fsck = subprocess.run(["fsck.fat", "-n", str(path)], check=False, capture_output=True, text=True)
    assert fsck.returncode == 0, fsck.stdout
    listing = subprocess.run(["mdir", "-i", str(path), "-/", "-b", "::"], capture_output=True,
                             text=True, check=True).stdout.split()
    assert sorted(listing) == sorted([f"::/{p}" for p in files] + ["::/overlays/"])
    volume = read_fat(image)
    assert volume.boot.label == "BOOT" and volume.boot.num_fats == 1
    for name, data in files.items():
        extracted = subprocess.run(["mcopy", "-n", "-i", str(path), f"::{name}", "-"],
                                   capture_output=True, check=True).stdout
        assert extracted == data == volume.read(name), name


def test_two_builds_are_byte_identical(session_keys: Path) -> None:
    key = load_boot_key(KeyPaths(session_keys).boot_key)
    first = build_boot_image(_files(), EPOCH)
    second = build_boot_image(_files(), EPOCH)
    assert first == second
    assert sign_boot_image(first, key, EPOCH) == sign_boot_image(second, key, EPOCH)


def test_boot_sig_verifies_with_stock_openssl_from_pubkey_bin(tmp_path: Path,
                                                             session_keys: Path) -> None:
    key = load_boot_key(KeyPaths(session_keys).boot_key)
    image = build_boot_image(_files(), EPOCH)
    sig_text = sign_boot_image(image, key, EPOCH)
    sig = parse_sig(sig_text)
    assert sig.sha256 == hashlib.sha256(image).hexdigest() and sig.ts == EPOCH
    assert sig.rsa2048 is not None and sig.target_soc is None
    # The public key as the bootloader holds it: the EEPROM's pubkey.bin, back to a PEM.
    pubkey_bin = encode_pubkey_bin(key.public_key())
    public = decode_pubkey_bin(pubkey_bin)
    verify_sig(image, sig, public)
    (tmp_path / "pub.pem").write_bytes(public.public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo))
    (tmp_path / "raw.bin").write_bytes(sig.rsa2048)
    (tmp_path / "boot.img").write_bytes(image)

    def openssl() -> subprocess.CompletedProcess[str]:
        return subprocess.run(["openssl", "dgst", "-sha256", "-verify", "pub.pem", "-signature",
                               "raw.bin", "boot.img"], check=False, cwd=tmp_path, capture_output=True,
                              text=True)

    good = openssl()
    assert good.returncode == 0 and "Verified OK" in good.stdout
    tampered = bytearray(image)
    tampered[len(image) // 2] ^= 0x01
    (tmp_path / "boot.img").write_bytes(bytes(tampered))
    bad = openssl()
    assert bad.returncode != 0 and "Verification failure" in bad.stdout


def test_over_96_mb_lists_the_largest_files() -> None:
    files = _files(initramfs=b"\0" * 90_000_000, kernel=b"\1" * 7_000_000)
    with pytest.raises(BuildError, match=f"over the {BOOT_IMG_MAX_BYTES} bytes") as info:
        build_boot_image(files, EPOCH)
    assert info.value.hint is not None
    assert info.value.hint.startswith("largest files: initramfs_2712 (90.0 MB), "
                                      "kernel_2712.img (7.0 MB)")


# --------------------------------------------------------------------------- CLI


def _inputs(tmp_path: Path) -> list[str]:
    (tmp_path / "Image").write_bytes(_kernel())
    (tmp_path / "initrd").write_bytes(b"initrd" * 1000)
    args = ["--kernel", str(tmp_path / "Image"), "--initramfs", str(tmp_path / "initrd"),
            "--cmdline", "console=ttyAMA10"]
    for name, data in DTBS.items():
        (tmp_path / name).write_bytes(data)
        args += ["--dtb", str(tmp_path / name)]
    return args


def test_cli_build_list_extract(tmp_path: Path, session_keys: Path) -> None:
    runner = CliRunner()
    out = tmp_path / "out"
    (tmp_path / "disable-bt.dtbo").write_bytes(b"ov")
    result = runner.invoke(main, ["bootimg", "build", *_inputs(tmp_path), "--config-line",
                                  "dtoverlay=disable-bt", "--overlay",
                                  str(tmp_path / "disable-bt.dtbo"), "--key",
                                  str(KeyPaths(session_keys).boot_key), "--epoch", str(EPOCH),
                                  "--out", str(out)])
    assert result.exit_code == 0, result.output
    image = (out / "boot.img").read_bytes()
    verify_sig(image, parse_sig((out / "boot.sig").read_bytes()),
               load_boot_key(KeyPaths(session_keys).boot_key).public_key())

    listing = runner.invoke(main, ["bootimg", "list", str(out / "boot.img")])
    assert listing.exit_code == 0, listing.output
    lines = listing.output.splitlines()
    assert lines[0].startswith("FAT16 (") and "too few for FAT32" in lines[0]
    assert any(line.endswith("  kernel_2712.img") and "2023-11-14 22:13:20" in line
               for line in lines)
    assert any(line.endswith("overlays/disable-bt.dtbo") for line in lines)

    extracted = runner.invoke(main, ["bootimg", "extract", str(out / "boot.img"), "config.txt"])
    assert extracted.exit_code == 0
    assert "dtoverlay=disable-bt" in extracted.output
    target = tmp_path / "k.img"
    result = runner.invoke(main, ["bootimg", "extract", str(out / "boot.img"),
                                  "KERNEL_2712.IMG", "--out", str(target)])
    assert result.exit_code == 0 and target.read_bytes() == _kernel()


@pytest.mark.parametrize("case", ["missing-overlay", "not-fat", "no-such-path"])
def test_cli_errors_are_one_line(tmp_path: Path, session_keys: Path, case: str) -> None:
    runner = CliRunner()
    if case == "missing-overlay":
        args = ["bootimg", "build", *_inputs(tmp_path), "--config-line", "dtoverlay=nope",
                "--key", str(KeyPaths(session_keys).boot_key), "--out", str(tmp_path / "o")]
    elif case == "not-fat":
        (tmp_path / "x.img").write_bytes(b"\0" * 2048)
        args = ["bootimg", "list", str(tmp_path / "x.img")]
    else:
        (tmp_path / "b.img").write_bytes(build_boot_image(_files(), EPOCH))
        args = ["bootimg", "extract", str(tmp_path / "b.img"), "nothing.txt"]
    result = runner.invoke(main, args)
    assert result.exit_code == 1
    assert "Traceback" not in result.output
    assert sum(line.startswith("Error:") for line in result.output.splitlines()) == 1
    assert not (tmp_path / "o" / "boot.img").exists()
