"""`fwbuild verify OUTDIR`: re-check a published artifact set against its manifest and keys."""

from __future__ import annotations

import hashlib
import io
import json
import tarfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from .errors import FormatError, SignatureError
from .layout import (
    BOOT_IMG,
    BOOT_SIG,
    EEPROM_DIR,
    EEPROM_IMAGE,
    EEPROM_SIG,
    INITRAMFS,
    MANIFEST,
    RECOVERY_KIT,
    Artifact,
)
from .sign import parse_sig, verify_sig


@dataclass
class VerifyReport:
    checked: list[str] = field(default_factory=list)
    steps: list[str] = field(default_factory=list)  # the manifest's build steps
    partial: bool = False  # built with `fwbuild build --only`


    def ok(self, line: str) -> None:
        self.checked.append(line)


def _load_manifest(out_dir: Path) -> dict[str, Any]:
    path = out_dir / MANIFEST
    try:
        manifest = json.loads(path.read_text())
    except FileNotFoundError:
        raise FormatError("no manifest.json: not a build output", str(out_dir),
                          "give the directory `fwbuild build` published, e.g. out/virtual") from None
    except ValueError as exc:
        raise FormatError(f"manifest.json is not valid JSON: {exc}", str(path)) from None
    if not isinstance(manifest, dict) or not isinstance(manifest.get("artifacts"), dict):
        raise FormatError("manifest.json has no `artifacts` table", str(path))
    return manifest


ALL_STEPS = ("eeprom", "initramfs", "bootimg", "recovery")
# Artifacts whose presence shows a build step ran (eeprom: per variant, under EEPROM_DIR).
STEP_ARTIFACTS: dict[str, tuple[Artifact, ...]] = {
    "initramfs": (INITRAMFS,),
    "bootimg": (BOOT_IMG, BOOT_SIG),
    "recovery": (RECOVERY_KIT,),
}
_EEPROM_PREFIX = EEPROM_DIR + "/"


def _check_steps(manifest: dict[str, Any], artifacts: dict[str, Any], out_dir: Path,
                 report: VerifyReport) -> None:
    """A set lists the steps it was built with (all of them, or a partial `--only` build):
    each listed step's artifacts must be there, and no other step's."""
    steps = manifest.get("steps")
    where = str(out_dir / MANIFEST)
    if steps is None:  # sets built before steps were recorded
        report.steps = [s for s in ALL_STEPS
                        if s != "eeprom" and all(a.rel in artifacts for a in STEP_ARTIFACTS[s])
                        or s == "eeprom" and any(a.startswith(_EEPROM_PREFIX) for a in artifacts)]
        return
    if not isinstance(steps, list) or not steps or any(s not in ALL_STEPS for s in steps):
        raise FormatError(f"manifest `steps` must list build steps among {', '.join(ALL_STEPS)}, "
                          f"got {steps!r}", where)
    for step, handles in STEP_ARTIFACTS.items():
        expected = [a.rel for a in handles]
        present = [a for a in expected if a in artifacts]
        if step in steps and len(present) != len(expected):
            missing = sorted(set(expected) - set(present))
            raise FormatError(f"step {step} was built but {missing[0]} is not in the manifest", where)
        if step not in steps and present:
            raise FormatError(f"{present[0]} is in the set but step {step} is not in the manifest's steps",
                              where)
    has_eeprom = any(a.startswith(_EEPROM_PREFIX) for a in artifacts)
    if ("eeprom" in steps) != has_eeprom:
        raise FormatError("the manifest's steps and its eeprom/ artifacts disagree", where)
    report.steps = list(steps)
    report.partial = set(steps) != set(ALL_STEPS)
    if report.partial:
        report.ok(f"partial set: steps {', '.join(steps)} (built with --only)")


def _same_key(a: rsa.RSAPublicKey, b: rsa.RSAPublicKey) -> bool:
    return a.public_numbers() == b.public_numbers()


def verify_output(out_dir: Path, key: rsa.RSAPublicKey | None = None) -> VerifyReport:
    """Raise FormatError / SignatureError at the first problem; return what was checked."""
    from .eeprom.assemble import verify_eeprom
    from .eeprom.image import parse_image
    from .eeprom.pubkey import decode_pubkey_bin

    report = VerifyReport()
    manifest = _load_manifest(out_dir)
    artifacts: dict[str, Any] = manifest["artifacts"]
    on_disk = sorted(str(p.relative_to(out_dir)) for p in out_dir.rglob("*") if p.is_file())
    extra = sorted(set(on_disk) - set(artifacts) - {MANIFEST})
    if extra:
        raise FormatError(f"file not listed in the manifest: {extra[0]}", str(out_dir / extra[0]))
    data: dict[str, bytes] = {}
    for rel, entry in sorted(artifacts.items()):
        if not isinstance(entry, dict) or rel.startswith("/") or ".." in Path(rel).parts:
            raise FormatError(f"manifest entry {rel!r} is not a relative path with sha256 and size",
                              str(out_dir / MANIFEST))
        path = out_dir / rel
        try:
            blob = path.read_bytes()
        except FileNotFoundError:
            raise FormatError("artifact listed in the manifest is missing", str(path)) from None
        if len(blob) != entry.get("size") or hashlib.sha256(blob).hexdigest() != entry.get("sha256"):
            raise SignatureError("artifact does not match its manifest entry (size or sha256)", str(path),
                                 "rebuild with `fwbuild build`; never edit an artifact set by hand")
        data[rel] = blob
    report.ok(f"{len(artifacts)} artifacts match manifest.json")
    _check_steps(manifest, artifacts, out_dir, report)

    signer: rsa.RSAPublicKey | None = key
    for rel, variant in sorted((r, v) for r in data if (v := EEPROM_IMAGE.variant_of(r)) is not None):
        image = data[rel]
        sig_rel = EEPROM_SIG(variant).rel
        if sig_rel not in data:
            raise SignatureError("pieeprom.bin has no pieeprom.sig beside it", str(out_dir / rel))
        sig = parse_sig(data[sig_rel], str(out_dir / sig_rel))
        verify_sig(image, sig, where=str(out_dir / sig_rel))
        if sig.target_soc != "2712":
            raise SignatureError("pieeprom.sig lacks `target-soc: 2712`", str(out_dir / sig_rel))
        embedded = decode_pubkey_bin(parse_image(image).read_file("pubkey.bin"), f"{rel}: pubkey.bin")
        if signer is None:
            signer = embedded
        elif not _same_key(signer, embedded):
            raise SignatureError("pubkey.bin differs from the expected boot-signing key", str(out_dir / rel),
                                 "all variants must carry the site's boot-signing key")
        verify_eeprom(image, signer)
        report.ok(f"{rel}: structure, pieeprom.sig, bootconf.sig verify")

    if BOOT_IMG.rel in data:
        if signer is None:
            raise SignatureError("no EEPROM pubkey.bin and no --key to check boot.sig with", str(out_dir))
        sig_where = str(BOOT_SIG.path(out_dir))
        sig = parse_sig(data.get(BOOT_SIG.rel, b""), sig_where)
        verify_sig(data[BOOT_IMG.rel], sig, signer, require_rsa=True, where=sig_where)
        report.ok(f"{BOOT_IMG.rel}: boot.sig (sha256 + rsa2048) verifies with the EEPROM key")

    if RECOVERY_KIT.rel in data:
        _verify_recovery(data, RECOVERY_KIT.rel, out_dir, report)
    if signer is not None:
        der = signer.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
        report.ok(f"boot-signing key sha256(SubjectPublicKeyInfo) {hashlib.sha256(der).hexdigest()}")
    return report


def _verify_recovery(data: dict[str, bytes], rel: str, out_dir: Path, report: VerifyReport) -> None:
    from .recovery.archive import KIT_FILES

    where = str(out_dir / rel)
    try:
        with tarfile.open(fileobj=io.BytesIO(data[rel]), mode="r:gz") as tar:
            members = {m.name: tar.extractfile(m) for m in tar.getmembers() if m.isfile()}
            files = {name: handle.read() for name, handle in members.items() if handle is not None}
    except (tarfile.TarError, OSError, EOFError) as exc:
        raise FormatError(f"recovery archive is unreadable: {exc}", where) from None
    expected = set(KIT_FILES)
    if set(files) != expected:
        raise FormatError(f"recovery archive holds {sorted(files)}, expected {sorted(expected)}", where)
    verify_sig(files["pieeprom.bin"], parse_sig(files["pieeprom.sig"], f"{where}: pieeprom.sig"),
               where=f"{where}: pieeprom.sig")
    variants = [r for r in data if EEPROM_IMAGE.variant_of(r) is not None]
    matching = [r for r in variants if data[r] == files["pieeprom.bin"]]
    if variants and not matching:
        raise SignatureError("the archive's pieeprom.bin is none of the set's EEPROM variants", where)
    report.ok(f"{rel}: members and pieeprom.sig match ({matching[0] if matching else 'no variant in the set'})")
