"""MAC addresses: node identifiers in URLs and the VPN MACs the server allocates."""

from __future__ import annotations

import re

from fwbuild.errors import UsageError

_FORMS = (
    re.compile(r"^[0-9a-f]{12}$"),
    re.compile(r"^[0-9a-f]{2}(:[0-9a-f]{2}){5}$"),
    re.compile(r"^[0-9a-f]{2}(-[0-9a-f]{2}){5}$"),
)
VPN_MAC_PREFIX = 0x525400  # QEMU/WalT prefix: 0x52 has the locally-administered bit, unicast


def normalise_mac(text: str, where: str = "mac") -> str:
    """The 12-lowercase-hex form of a node MAC (`dca632aabbcc`); colon and dash forms accepted.

    Multicast and all-zero addresses are rejected: they cannot identify a node.
    """
    lowered = text.strip().lower() if len(text) <= 32 else text
    if not any(form.match(lowered) for form in _FORMS):
        raise UsageError(f"not a MAC address: {text[:40]!r}", where,
                         "use 12 hex digits, optionally separated by : or -")
    mac12 = lowered.replace(":", "").replace("-", "")
    if int(mac12[:2], 16) & 1:
        raise UsageError(f"{colon_mac(mac12)} is a multicast address", where, "use the node's MAC")
    if mac12 == "000000000000":
        raise UsageError("the all-zero MAC cannot identify a node", where)
    return mac12


def colon_mac(mac12: str) -> str:
    return ":".join(mac12[i:i + 2] for i in range(0, 12, 2))


def vpn_mac(index: int) -> str:
    """The `index`-th VPN MAC (1-based): 52:54:00:00:00:01, ... (locally administered unicast)."""
    if not 1 <= index < 1 << 24:
        raise UsageError("VPN MAC space exhausted", "vpn_mac", "forget unused nodes")
    value = (VPN_MAC_PREFIX << 24) | index
    return colon_mac(f"{value:012x}")
