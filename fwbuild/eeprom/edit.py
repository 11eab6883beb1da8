"""`eeprom edit`'s policy: which option combinations make sense and what the new image holds.

`edit_image(data, request)` is the whole edit (the CLI only reads the named files, loads
the keys and writes the result): the config is checked unless `validate` is off, a
signing key writes bootconf.sig and pubkey.bin, an external digest must sign the new
config, and a new config is refused when it would leave the image's old signature
stale. Errors name the option at fault (`--strict`, `--pubkey`, `--digest`) or the file.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from cryptography.hazmat.primitives.asymmetric import rsa

from ..errors import UsageError
from .bootconf import BootconfWarning


@dataclass(frozen=True)
class NamedBytes:
    """A file's bytes with the name the user gave it (for messages)."""

    name: str
    data: bytes


@dataclass(frozen=True)
class EditRequest:
    """What `fwbuild eeprom edit` was asked to change (None: keep)."""

    config: NamedBytes | None = None
    digest: NamedBytes | None = None
    pubkey: rsa.RSAPublicKey | None = None
    sign_key: rsa.RSAPrivateKey | None = None
    cacert: bytes | None = None
    timestamp: int | None = None
    strict: bool = False
    validate: bool = True


@dataclass(frozen=True)
class EditResult:
    data: bytes
    warnings: list[BootconfWarning] = field(default_factory=list)


def check_options(*, strict: bool, validate: bool, pubkey: bool, sign_key: bool, digest: bool) -> None:
    """Option combinations that contradict each other (checked before any file is read)."""
    if strict and not validate:
        raise UsageError("--strict and --no-validate contradict each other", "--strict")
    if sign_key and (pubkey or digest):
        option = "--pubkey" if pubkey else "--digest"
        raise UsageError(f"{option} and --sign-key both set the signature files", option,
                         "--sign-key already writes bootconf.sig and the public half of the key")


def edit_image(data: bytes, image_name: str, request: EditRequest) -> EditResult:
    """The edited image (validated and re-signed as asked) and the config's warnings."""
    from pathlib import PurePath

    from ..sign import build_sig, source_date_epoch
    from .assemble import check_external_digest
    from .bootconf import check_bootconf
    from .image import parse_image, replace_files
    from .pubkey import encode_pubkey_bin

    check_options(strict=request.strict, validate=request.validate, pubkey=request.pubkey is not None,
                  sign_key=request.sign_key is not None, digest=request.digest is not None)
    parsed = parse_image(data)
    updates: dict[str, bytes] = {}
    warnings: list[BootconfWarning] = []
    config = request.config
    config_bytes = config.data if config is not None else parsed.read_file("bootconf.txt")
    if config is not None:
        if request.validate:
            try:
                text = config.data.decode("ascii")
            except UnicodeDecodeError:
                raise UsageError("the config is not ASCII text", config.name) from None
            warnings = list(check_bootconf(text, PurePath(config.name).name,
                                           strict=request.strict).warnings)
        updates["bootconf.txt"] = config.data
    if request.pubkey is not None:
        updates["pubkey.bin"] = encode_pubkey_bin(request.pubkey)
    if request.sign_key is not None:
        ts = request.timestamp if request.timestamp is not None else source_date_epoch()
        updates["bootconf.sig"] = build_sig(config_bytes, ts, key=request.sign_key)
        updates["pubkey.bin"] = encode_pubkey_bin(request.sign_key.public_key())
    if request.digest is not None:
        updates["bootconf.sig"] = check_external_digest(parsed, request.digest.data, config_bytes,
                                                        updates.get("pubkey.bin"), request.digest.name)
    if request.cacert is not None:
        updates["cacert.der"] = request.cacert
    if config is not None and request.sign_key is None and request.digest is None \
            and parsed.has_file("bootconf.sig") and parsed.read_file("bootconf.sig").strip(b"\x00\xff"):
        raise UsageError("the image's bootconf.sig signs its current config; the new config would "
                         "be left with a stale signature", image_name,
                         "re-sign with --sign-key PEM (the site's boot-signing key) or give --digest SIG")
    edited = replace_files(parsed.data, updates, timestamp=request.timestamp, image=parsed)
    return EditResult(edited, warnings)
