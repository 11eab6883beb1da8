"""EEPROM images against Raspberry Pi's own material (tests/data/rpi-eeprom, see its README):
real 2711 and 2712 images, the configurations rpi-eeprom tests with, and its
`rpi-eeprom-config` as the byte-for-byte oracle of the update algorithm (run in-process
for the many small cases, as a program for the command-line ones)."""

from __future__ import annotations

import functools
import gzip
import hashlib
import importlib.util
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import pytest
from click.testing import CliRunner
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from fwbuild.cli import main
from fwbuild.eeprom.assemble import verify_eeprom
from fwbuild.eeprom.bootconf import check_bootconf
from fwbuild.eeprom.image import MODIFIABLE_FILES, parse_image, read_timestamp, replace_files
from fwbuild.eeprom.synthetic import synthetic_image
from fwbuild.errors import BootconfError, FormatError
from fwbuild.sign import build_sig

DATA = Path(__file__).resolve().parents[1] / "data" / "rpi-eeprom"
TOOL = DATA / "rpi-eeprom-config"
CONFIGS = sorted((DATA / "configs").glob("*.txt"))
TEST_CONFIGS = sorted(p for p in (DATA / "test").glob("*.txt") if p.name != "bootconf-4077.txt")

AB_2712 = "firmware-2712_default_pieeprom-2026-05-26.bin"
NON_AB_2712 = "firmware-2712_old_latest_pieeprom-2026-05-11.bin"
PI4_LATEST = "firmware-2711_latest_pieeprom-2026-08-04.bin"
PI4_2019 = "firmware-2711_old_beta_pieeprom-2019-07-15.bin"
PI4_2019_FREEZE = "test_pieeprom-2019-07-15-freeze.bin"
PI4_SIGNED = "test_pieeprom-signed.bin"
# The images edits are tried on: real ones (2712 AB, 2712 non-AB, two 2711) and synthetic ones.
REAL = (AB_2712, NON_AB_2712, PI4_LATEST, PI4_2019)
SYNTHETIC = {"synthetic-2712-ab": ("ab", "2712"), "synthetic-2712-non-ab": ("non-ab", "2712"),
             "synthetic-2711": ("non-ab", "2711")}
ALL_IMAGES = (*REAL, *SYNTHETIC)


@functools.cache
def _expected_sha256() -> dict[str, str]:
    lines = (DATA / "SHA256SUMS").read_text().splitlines()
    return {name: digest for digest, name in (line.split() for line in lines)}


@functools.cache
def image(name: str) -> bytes:
    """A vendored image (checked against the upstream sha256) or a synthetic one."""
    if name in SYNTHETIC:
        return synthetic_image(*SYNTHETIC[name])
    data = gzip.decompress((DATA / "images" / f"{name}.gz").read_bytes())
    assert hashlib.sha256(data).hexdigest() == _expected_sha256()[name], f"{name} is not the upstream file"
    return data


@functools.cache
def _reference() -> ModuleType:
    spec = importlib.util.spec_from_file_location("rpi_eeprom_config", TOOL,
                                                  loader=importlib.machinery.SourceFileLoader(
                                                      "rpi_eeprom_config", str(TOOL)))
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def oracle(data: bytes, updates: dict[str, bytes], tmp: Path, timestamp: int | None = None) -> bytes:
    """What rpi-eeprom-config's BootloaderImage makes of the same edits."""
    source, out = tmp / "oracle-in.bin", tmp / "oracle-out.bin"
    source.write_bytes(data)
    reference = _reference().BootloaderImage(str(source), str(out))
    if timestamp is not None:
        reference.set_timestamp(timestamp)
    for name, content in updates.items():
        reference.update(content, name)
    reference.write()
    return out.read_bytes()


def run_tool(*args: str | Path) -> subprocess.CompletedProcess[bytes]:
    """The reference tool as a program (no Raspberry Pi needed for image edits)."""
    return subprocess.run([sys.executable, str(TOOL), *map(str, args)], capture_output=True, timeout=120,
                          check=False)


def fwbuild(*args: str | Path) -> tuple[int, bytes, str]:
    result = CliRunner().invoke(main, ["eeprom", *map(str, args)])
    assert "Traceback" not in result.output
    return result.exit_code, result.stdout_bytes, result.stderr


# --- the fixtures ----------------------------------------------------------------------------

def test_vendored_images_are_the_upstream_files() -> None:
    layouts = {name: (parse_image(image(name)).soc, parse_image(image(name)).layout)
               for name in (*REAL, PI4_2019_FREEZE, PI4_SIGNED)}
    assert layouts == {AB_2712: ("2712", "ab"), NON_AB_2712: ("2712", "non-ab"),
                       PI4_LATEST: ("2711", "non-ab"), PI4_2019: ("2711", "non-ab"),
                       PI4_2019_FREEZE: ("2711", "non-ab"), PI4_SIGNED: ("2711", "non-ab")}
    assert (DATA / "LICENSE").read_text().count("Redistribution") >= 2
    assert len(CONFIGS) == 73 and len(TEST_CONFIGS) == 5


# --- every configuration Raspberry Pi ships is accepted, written byte-identically ------------

@pytest.mark.parametrize("config", CONFIGS + TEST_CONFIGS, ids=lambda p: p.name)
def test_every_rpi_eeprom_config_is_accepted(config: Path, tmp_path: Path) -> None:
    text = config.read_text()
    check_bootconf(text, config.name)  # no BootconfError
    out = tmp_path / "out.bin"
    source = tmp_path / "in.bin"
    source.write_bytes(image(PI4_LATEST))
    code, _, err = fwbuild("edit", source, "--config", config, "--out", out)  # no --no-validate
    assert code == 0, err
    assert out.read_bytes() == oracle(image(PI4_LATEST), {"bootconf.txt": config.read_bytes()}, tmp_path)
    code, printed, _ = fwbuild("extract", out)
    assert code == 0 and printed == config.read_bytes()


def test_stock_2019_configs_validate_with_their_trailing_spaces() -> None:
    freeze = (DATA / "test" / "bootconf-2019-07-15-freeze.txt").read_text()
    assert "FREEZE_VERSION=1 " in freeze
    assert check_bootconf(freeze).settings["FREEZE_VERSION"] == "1"
    big = (DATA / "test" / "bootconf-4076.txt").read_text()
    assert "[none]" in big and "userdata0=" in big
    assert check_bootconf(big, strict=True).warnings == ()


# --- the update algorithm, byte for byte -----------------------------------------------------

@pytest.mark.parametrize("name", ALL_IMAGES)
def test_round_trip_every_file(name: str, tmp_path: Path) -> None:
    data = image(name)
    parsed = parse_image(data)
    own = {f: parsed.read_file(f) for f in MODIFIABLE_FILES if parsed.has_file(f)}
    assert own, name
    assert replace_files(data, own) == data
    assert oracle(data, own, tmp_path) == data


@pytest.mark.parametrize("name", ALL_IMAGES)
def test_grow_then_shrink_back(name: str, tmp_path: Path) -> None:
    data = image(name)
    original = parse_image(data).read_file("bootconf.txt")
    grown_config = original + b"# Add some random text to the config file\n" * 20
    grown = replace_files(data, {"bootconf.txt": grown_config})
    assert grown != data and grown == oracle(data, {"bootconf.txt": grown_config}, tmp_path)
    assert parse_image(grown).read_file("bootconf.txt") == grown_config
    shrunk = replace_files(grown, {"bootconf.txt": original})
    assert shrunk == data
    assert oracle(grown, {"bootconf.txt": original}, tmp_path) == data
    smaller = replace_files(grown, {"bootconf.txt": b"[all]\n"})
    assert smaller == oracle(grown, {"bootconf.txt": b"[all]\n"}, tmp_path)
    section = parse_image(smaller).find_file("bootconf.txt")
    end = section.offset + 24 + len(b"[all]\n")
    old_end = section.offset + 24 + len(grown_config)
    leftovers = smaller[end:old_end]
    assert leftovers.count(0xFF) >= len(leftovers) - 8  # erased, except a PAD header


@pytest.mark.parametrize("name", ALL_IMAGES)
def test_every_file_and_size_matches_the_reference(name: str, tmp_path: Path) -> None:
    data = image(name)
    parsed = parse_image(data)
    cases = 0
    for file in MODIFIABLE_FILES:
        if not parsed.has_file(file):
            continue
        capacity = parsed.file_capacity(file)
        for size in sorted({0, 1, 7, 8, 9, 264, 736, capacity - 8, capacity} & set(range(capacity + 1))):
            content = bytes((i * 31 + size) % 251 for i in range(size))
            assert replace_files(data, {file: content}) == oracle(data, {file: content}, tmp_path), (file, size)
            cases += 1
    both = {"bootconf.txt": b"[all]\nBOOT_ORDER=0xf41\n"}
    if parsed.has_file("pubkey.bin"):
        both["pubkey.bin"] = bytes(range(256)) + bytes(8)
    assert replace_files(data, both, timestamp=1_700_000_000) == \
        oracle(data, both, tmp_path, timestamp=1_700_000_000)
    assert read_timestamp(replace_files(data, {}, timestamp=1_700_000_000)) == 1_700_000_000
    assert cases >= 9


def test_reference_overflow_is_refused_not_written(tmp_path: Path) -> None:
    """The reference counts a 20-byte header: on the real AB image it writes a 2284-byte
    cacert.der over the next section's header. fwbuild refuses it (2280 is the real maximum)."""
    data = image(AB_2712)
    assert parse_image(data).file_capacity("cacert.der") == 2280
    with pytest.raises(BootconfError, match="2284 bytes, 4 over its 2280-byte slot"):
        replace_files(data, {"cacert.der": b"\x30" * 2284})
    broken = oracle(data, {"cacert.der": b"\x30" * 2284}, tmp_path)
    with pytest.raises(FormatError):
        parse_image(broken).read_file("bootconf.sig")


def test_raspberry_pi_published_update_result(tmp_path: Path) -> None:
    """rpi-eeprom's check_update: 2019-07-15 + the freeze config gives its published image."""
    config = tmp_path / "freeze.txt"
    config.write_bytes((DATA / "test" / "bootconf-2019-07-15-freeze.txt").read_bytes())
    source = tmp_path / "in.bin"
    source.write_bytes(image(PI4_2019))
    out = tmp_path / "out.bin"
    code, _, err = fwbuild("edit", source, "--config", config, "--out", out)
    assert code == 0, err
    assert out.read_bytes() == image(PI4_2019_FREEZE)


# --- 4076 accepted, 4077 refused, on every image ---------------------------------------------

@pytest.mark.parametrize("name", ALL_IMAGES)
def test_4076_accepted_4077_refused(name: str, tmp_path: Path) -> None:
    source = tmp_path / "in.bin"
    source.write_bytes(image(name))
    big, too_big = DATA / "test" / "bootconf-4076.txt", DATA / "test" / "bootconf-4077.txt"
    assert len(big.read_bytes()) == 4076 and len(too_big.read_bytes()) == 4077
    out = tmp_path / "ok.bin"
    code, _, err = fwbuild("edit", source, "--config", big, "--out", out)
    assert code == 0, err
    code, printed, _ = fwbuild("extract", out)
    assert printed == big.read_bytes()
    reference_out = tmp_path / "reference.bin"
    assert run_tool(source, "--config", big, "--out", reference_out).returncode == 0
    assert out.read_bytes() == reference_out.read_bytes()
    assert run_tool(out).stdout == big.read_bytes()  # the reference reads our image back
    refused = tmp_path / "refused.bin"
    code, _, err = fwbuild("edit", source, "--config", too_big, "--out", refused)
    assert code != 0 and "4077 bytes, 1 over the 4076-byte limit" in err and not refused.exists()
    code, _, err = fwbuild("edit", source, "--config", too_big, "--no-validate", "--out", refused)
    assert code != 0 and "4077 bytes, 1 over its 4076-byte slot" in err and not refused.exists()
    assert run_tool(source, "--config", too_big, "--out", tmp_path / "r2.bin").returncode != 0


# --- external signatures (--digest) ----------------------------------------------------------

def test_digest_round_trip_on_the_signed_image(tmp_path: Path) -> None:
    source = tmp_path / "signed.bin"
    source.write_bytes(image(PI4_SIGNED))
    test = DATA / "test"
    out = tmp_path / "out.bin"
    code, _, err = fwbuild("edit", source, "--config", test / "bootconf.txt", "--digest", test / "bootconf.sig",
                           "--pubkey", test / "public.pem", "--out", out)
    assert code == 0, err
    assert out.read_bytes() == image(PI4_SIGNED)  # image unchanged
    report = verify_eeprom(out.read_bytes())
    assert report.signed and report.soc == "2711"
    # The reference (without --pubkey, which needs pycryptodomex) agrees byte for byte.
    reference_out = tmp_path / "reference.bin"
    result = run_tool(source, "--config", test / "bootconf.txt", "--digest", test / "bootconf.sig",
                      "--out", reference_out)
    assert result.returncode == 0, result.stderr
    assert reference_out.read_bytes() == image(PI4_SIGNED)


def test_digest_whose_hash_does_not_match_is_refused(tmp_path: Path) -> None:
    source = tmp_path / "signed.bin"
    source.write_bytes(image(PI4_SIGNED))
    config = tmp_path / "changed.txt"
    config.write_bytes((DATA / "test" / "bootconf.txt").read_bytes() + b"BOOT_ORDER=0xf41\n")
    out = tmp_path / "out.bin"
    code, _, err = fwbuild("edit", source, "--config", config, "--digest", DATA / "test" / "bootconf.sig",
                           "--out", out)
    assert code != 0 and "hash line does not match the config" in err and not out.exists()
    assert "Traceback" not in err


def _pem(key: rsa.RSAPrivateKey, path: Path) -> Path:
    path.write_bytes(key.public_key().public_bytes(serialization.Encoding.PEM,
                                                   serialization.PublicFormat.SubjectPublicKeyInfo))
    return path


@pytest.mark.parametrize("name", [AB_2712, PI4_LATEST, "synthetic-2711"])
def test_external_digest_signed_elsewhere(name: str, tmp_path: Path) -> None:
    """A digest made elsewhere (an HSM): stored as is, verified against the stored key;
    a digest by another key than --pubkey is refused."""
    hsm = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    other = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    config = tmp_path / "bootconf.txt"
    config.write_bytes(b"[all]\nBOOT_UART=1\nBOOT_ORDER=0xf7\nHTTP_HOST=boot.example.org\nSIGNED_BOOT=1\n")
    digest = tmp_path / "bootconf.sig"
    digest.write_bytes(build_sig(config.read_bytes(), 1_700_000_000, key=hsm))
    source = tmp_path / "in.bin"
    source.write_bytes(image(name))
    out = tmp_path / "out.bin"
    code, _, err = fwbuild("edit", source, "--config", config, "--digest", digest,
                           "--pubkey", _pem(hsm, tmp_path / "hsm.pem"), "--out", out)
    assert code == 0, err
    edited = parse_image(out.read_bytes())
    assert edited.read_file("bootconf.sig") == digest.read_bytes()
    assert verify_eeprom(out.read_bytes()).signed
    # Re-applying its own config, digest and key leaves the image unchanged.
    again = tmp_path / "again.bin"
    code, _, _ = fwbuild("edit", out, "--config", config, "--digest", digest,
                         "--pubkey", tmp_path / "hsm.pem", "--out", again)
    assert code == 0 and again.read_bytes() == out.read_bytes()
    refused = tmp_path / "refused.bin"
    code, _, err = fwbuild("edit", source, "--config", config, "--digest", digest,
                           "--pubkey", _pem(other, tmp_path / "other.pem"), "--out", refused)
    assert code != 0 and "bootconf.sig" in err and not refused.exists()
    code, _, err = fwbuild("edit", source, "--config", config, "--digest", digest, "--out", refused)
    if parse_image(image(name)).read_file("pubkey.bin").strip(b"\0\xff"):
        assert code != 0
    else:
        assert code != 0 and "--pubkey" in err
    assert not refused.exists()


@pytest.mark.parametrize("name", [NON_AB_2712, "synthetic-2712-non-ab"])
def test_non_ab_edits_stay_in_the_reference_window(name: str, tmp_path: Path) -> None:
    """On a non-AB 2 MiB image the reference only rewrites up to 0x107000 after the last
    file: bytes beyond (not erased here on purpose) are left alone by both."""
    data = bytearray(image(name))
    data[0x150000:0x150004] = b"KEEP"
    marked = bytes(data)
    config = {"bootconf.txt": b"[all]\nBOOT_ORDER=0xf41\n"}
    edited = replace_files(marked, config)
    assert edited[0x150000:0x150004] == b"KEEP"
    assert edited == oracle(marked, config, tmp_path)


@pytest.mark.parametrize("name", [*REAL, PI4_SIGNED])
def test_inspect_verify_real_images(name: str, tmp_path: Path) -> None:
    import json

    source = tmp_path / "in.bin"
    source.write_bytes(image(name))
    code, printed, err = fwbuild("inspect", source, "--json")
    assert code == 0, err
    info = json.loads(printed)
    soc = "2711" if "2711" in name or name.startswith("test_") else "2712"
    assert info["soc"] == soc and info["virtual"] is False
    assert info["board"] == {"2711": "Raspberry Pi 4 (2711)", "2712": "Raspberry Pi 5 (2712)"}[soc]
    assert info["files"]["bootconf.txt"]["capacity"] == 4076
    assert info["config"].encode() == parse_image(image(name)).read_file("bootconf.txt")
    code, printed, err = fwbuild("verify", source, "--strict")
    assert code == 0 and err == "" and printed.decode().startswith(f"OK: {source}: {soc} ")


def test_diff_of_real_2711_images(tmp_path: Path) -> None:
    a, b = tmp_path / "a.bin", tmp_path / "b.bin"
    a.write_bytes(image(PI4_2019))
    b.write_bytes(image(PI4_2019_FREEZE))
    code, printed, _ = fwbuild("diff", a, b)
    assert code == 1 and "  +FREEZE_VERSION=1" in printed.decode()
    code, printed, _ = fwbuild("diff", a, a)
    assert code == 0 and printed.decode().strip() == "identical"


def test_missing_file_names_what_the_image_has(tmp_path: Path) -> None:
    source = tmp_path / "2019.bin"
    source.write_bytes(image(PI4_2019))
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    out = tmp_path / "out.bin"
    code, _, err = fwbuild("edit", source, "--pubkey", _pem(key, tmp_path / "k.pem"), "--out", out)
    assert code == 1 and not out.exists()
    assert err.splitlines() == [
        "Error: no `pubkey.bin` file in the EEPROM image (pubkey.bin)",
        "Hint: this Raspberry Pi 4 (2711) non-ab image has: bootconf.txt (older images lack the signed-boot files)"]
