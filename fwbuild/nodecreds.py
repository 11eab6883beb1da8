"""`WALT_VPN_CREDS`: a node's SSH files as one bootconf value. Pure: bytes in, text out.

The value is base64 (one line, no newline) of a reproducible gzip'ed ustar archive
(mtime 0, uid/gid 0, owner `root`) holding, in this order, `id_ed25519` (the node's
OpenSSH private key, 0600; absent when the node keeps its own key),
`id_ed25519-cert.pub` (its user certificate) and `known_hosts` (the pinned entrypoint
host keys). The server writes it into the node's EEPROM; the initramfs init unpacks it.
"""

from __future__ import annotations

import base64
import binascii
import gzip
import io
import tarfile
from collections.abc import Mapping

from .errors import FormatError

PRIVATE_KEY = "id_ed25519"
CERTIFICATE = "id_ed25519-cert.pub"
KNOWN_HOSTS = "known_hosts"
CREDENTIAL_FILES = (PRIVATE_KEY, CERTIFICATE, KNOWN_HOSTS)


def pack_credential_files(files: Mapping[str, bytes]) -> str:
    """The WALT_VPN_CREDS value for `files` (names from CREDENTIAL_FILES; the key is optional)."""
    unknown = sorted(set(files) - set(CREDENTIAL_FILES))
    if unknown:
        raise FormatError(f"not a credential file: {unknown[0]}", "WALT_VPN_CREDS")
    for required in (CERTIFICATE, KNOWN_HOSTS):
        if required not in files:
            raise FormatError(f"node credentials need {required}", "WALT_VPN_CREDS")
    raw = io.BytesIO()
    with tarfile.open(fileobj=raw, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        for name in CREDENTIAL_FILES:
            if name not in files:
                continue
            info = tarfile.TarInfo(name)
            info.size = len(files[name])
            info.mode = 0o600 if name == PRIVATE_KEY else 0o644
            info.mtime = 0
            info.uid = info.gid = 0
            info.uname = info.gname = "root"
            tar.addfile(info, io.BytesIO(files[name]))
    return base64.b64encode(gzip.compress(raw.getvalue(), compresslevel=9, mtime=0)).decode("ascii")


def unpack_credential_files(text: str, where: str = "WALT_VPN_CREDS") -> dict[str, bytes]:
    """The files of a WALT_VPN_CREDS value; FormatError when it is not one."""
    try:
        raw = gzip.decompress(base64.b64decode(text.strip(), validate=True))
        files: dict[str, bytes] = {}
        with tarfile.open(fileobj=io.BytesIO(raw), mode="r:") as tar:
            for member in tar.getmembers():
                handle = tar.extractfile(member) if member.isfile() else None
                if handle is not None:
                    files[member.name] = handle.read()
    except (binascii.Error, OSError, EOFError, tarfile.TarError, ValueError):
        raise FormatError("not a base64 tar.gz of node credentials", where,
                          "regenerate the node's EEPROM config") from None
    unknown = sorted(set(files) - set(CREDENTIAL_FILES))
    if unknown:
        raise FormatError(f"unexpected file in node credentials: {unknown[0]}", where)
    return files
