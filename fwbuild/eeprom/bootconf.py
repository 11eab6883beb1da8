"""`bootconf.txt`: render per-variant templates, validate, parse (pi5-boot-facts §3).

The bootloader silently ignores values it cannot use (a bad HTTP_HOST just disables
HTTP boot on a board far away), so everything is checked before an image is written.
"""

from __future__ import annotations

import base64
import binascii
import difflib
import functools
import importlib.resources
import ipaddress
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import jinja2

from ..errors import BootconfError
from .image import MAX_FILE_CONTENT

VARIANTS = ("recovery", "permissive", "enforced")
VALUE_KEYS = ("http_host", "http_port", "http_path", "extra")
HOST_REQUIRED = ("permissive", "enforced")

BOOT_MODES = {"1": "SD/eMMC", "2": "network", "3": "RPIBOOT", "4": "USB-MSD", "6": "NVMe",
              "7": "HTTP", "e": "STOP", "f": "RESTART"}
_KEY = re.compile(r"[A-Z0-9_]+")
_SECTION = re.compile(r"\[[^\[\]=\s]+(=[^\[\]\s]+)?\]")
_LABEL = r"[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?"
_HOSTNAME = re.compile(rf"{_LABEL}(?:\.{_LABEL})*")
_PATH_SEGMENT = re.compile(r"[A-Za-z0-9._~-]+")
_DECIMAL = re.compile(r"[0-9]{1,9}")
_MAC = re.compile(r"[0-9a-f]{2}(?::[0-9a-f]{2}){5}")
_USER = re.compile(r"[a-z_][a-z0-9_-]{0,31}")
_ROOT = re.compile(r"/[A-Za-z0-9._/-]*")
_BASE64 = re.compile(r"[A-Za-z0-9+/]+={0,2}")
_NOT_PRINTABLE = re.compile(r"[^\x20-\x7e\n]")


def _fail(what: str, where: str, hint: str | None = None) -> BootconfError:
    return BootconfError(what, where, hint)


# ---- value checks: each returns None or raises BootconfError(where) ----

def _check_boot_order(value: str, where: str) -> None:
    if not re.fullmatch(r"0x[0-9a-fA-F]{1,8}", value):
        raise _fail(f"BOOT_ORDER {value!r} is not 0x followed by 1-8 hex nibbles", where,
                    "e.g. BOOT_ORDER=0xf127 (tried from the rightmost nibble)")
    for nibble in value[2:].lower():
        if nibble not in BOOT_MODES:
            known = ", ".join(f"{k}={v}" for k, v in BOOT_MODES.items())
            raise _fail(f"BOOT_ORDER {value!r} has unknown boot mode nibble {nibble!r}", where,
                        f"known modes: {known}")


def _is_ipv4(value: str) -> bool:
    try:
        ipaddress.IPv4Address(value)
    except ValueError:
        return False
    return True


def _check_host(value: str, where: str, what: str = "HTTP_HOST") -> None:
    if "://" in value:
        raise _fail(f"{what} {value!r} has a URL scheme", where, "give the bare host name, e.g. boot.example.org")
    if "/" in value:
        raise _fail(f"{what} {value!r} has a path", where, "put the path in HTTP_PATH")
    if ":" in value:
        raise _fail(f"{what} {value!r} has a port", where, "put the port in HTTP_PORT")
    if value != value.lower():
        raise _fail(f"{what} {value!r} is not lowercase", where, f"use {value.lower()!r}")
    if re.fullmatch(r"[0-9.]+", value):
        if not _is_ipv4(value):
            raise _fail(f"{what} {value!r} is not a valid IPv4 address", where)
        return
    if len(value) > 253 or not _HOSTNAME.fullmatch(value):
        raise _fail(f"{what} {value!r} is not a host name (lowercase letters, digits, `-`, `.`)",
                    where, "the bootloader ignores invalid hosts, so HTTP boot would silently not happen")


def _check_port(value: str, where: str, what: str = "HTTP_PORT") -> None:
    if not _DECIMAL.fullmatch(value) or not 1 <= int(value) <= 65535:
        raise _fail(f"{what} {value!r} is not a port number (1-65535)", where)


def _check_http_path(value: str, where: str) -> None:
    if value.startswith("/") or value.endswith("/"):
        raise _fail(f"HTTP_PATH {value!r} must not start or end with `/`", where,
                    "the bootloader fetches http://HOST:PORT/<HTTP_PATH>/boot.sig")
    if "\\" in value:
        raise _fail(f"HTTP_PATH {value!r} uses backslashes", where, "use forward slashes")
    for segment in value.split("/"):
        if segment in ("", ".", "..") or not _PATH_SEGMENT.fullmatch(segment):
            raise _fail(f"HTTP_PATH {value!r} has a bad segment {segment!r}", where,
                        "segments use letters, digits, `.`, `_`, `~`, `-`; no empty, `.` or `..` segments")


def _min_int(minimum: int) -> Callable[[str, str], None]:
    def check(value: str, where: str) -> None:
        if not _DECIMAL.fullmatch(value):
            raise _fail(f"{value!r} is not a decimal number", where)
        if int(value) < minimum:
            raise _fail(f"{value} is below the bootloader minimum {minimum}", where,
                        f"use at least {minimum}")
    return check


def _check_bool(value: str, where: str) -> None:
    if value not in ("0", "1"):
        raise _fail(f"{value!r} is not 0 or 1", where)


def _check_sha256(value: str, where: str) -> None:
    if not re.fullmatch(r"[0-9a-f]{64}", value):
        raise _fail(f"{value!r} is not 64 lowercase hex digits (a SHA-256)", where)


def _check_mac(value: str, where: str) -> None:
    if not _MAC.fullmatch(value):
        raise _fail(f"{value!r} is not a lowercase colon-separated MAC address", where,
                    "e.g. 52:54:00:12:34:56")


def _check_vpn_mac(value: str, where: str) -> None:
    _check_mac(value, where)
    first = int(value[:2], 16)
    if not first & 0x02 or first & 0x01:
        raise _fail(f"WALT_VPN_MAC {value!r} is not a locally administered unicast address", where,
                    "use the 52:54:00:xx:xx:xx range")


def _split_host_port(value: str, where: str, what: str, port_required: bool) -> None:
    if "://" in value:
        raise _fail(f"{what} {value!r} has a URL scheme", where, "use host[:port]")
    host, sep, port = value.rpartition(":") if ":" in value else (value, "", "")
    if host.startswith("[") and host.endswith("]"):
        try:
            ipaddress.IPv6Address(host[1:-1])
        except ValueError:
            raise _fail(f"{what} {value!r} has a bad IPv6 address", where) from None
    else:
        _check_host(host, where, what)
    if sep:
        _check_port(port, where, what)
    elif port_required:
        raise _fail(f"{what} {value!r} has no port", where, "use host:port")


def _check_entrypoint(value: str, where: str) -> None:
    _split_host_port(value, where, "WALT_VPN_ENTRYPOINT", port_required=False)


def _check_http_proxy(value: str, where: str) -> None:
    _split_host_port(value, where, "WALT_VPN_HTTP_PROXY", port_required=True)


def _check_proxy_jump(value: str, where: str) -> None:
    user, at, rest = value.partition("@")
    if not at or not _USER.fullmatch(user):
        raise _fail(f"WALT_VPN_PROXY_JUMP {value!r} is not user@host[:port]", where)
    _split_host_port(rest, where, "WALT_VPN_PROXY_JUMP", port_required=False)


def _check_boot_mode(value: str, where: str) -> None:
    if value not in ("enforced", "permissive"):
        raise _fail(f"WALT_VPN_BOOT_MODE {value!r} is not `enforced` or `permissive`", where)


def _check_user(value: str, where: str) -> None:
    if not _USER.fullmatch(value):
        raise _fail(f"WALT_VPN_USER {value!r} is not a user name", where, "e.g. walt-vpn")


def _check_root(value: str, where: str) -> None:
    if not _ROOT.fullmatch(value) or any(p in ("..", ".") for p in value.split("/")):
        raise _fail(f"WALT_VPN_ROOT {value!r} is not a clean absolute path", where,
                    "letters, digits, `.`, `_`, `-` and `/`, starting with `/`, no `..`")


def _check_creds(value: str, where: str) -> None:
    if len(value) % 4 or not _BASE64.fullmatch(value):
        raise _fail("WALT_VPN_CREDS is not single-line base64", where)
    try:
        raw = base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError):
        raise _fail("WALT_VPN_CREDS is not valid base64", where) from None
    if raw[:2] != b"\x1f\x8b":
        raise _fail("WALT_VPN_CREDS does not hold a gzip'ed tar", where)


CHECKS: dict[str, Callable[[str, str], None]] = {
    "BOOT_ORDER": _check_boot_order,
    "HTTP_HOST": _check_host,
    "HTTP_PORT": _check_port,
    "HTTP_PATH": _check_http_path,
    "HTTP_CACERT_HASH": _check_sha256,
    "DHCP_REQ_TIMEOUT": _min_int(500),
    "DHCP_TIMEOUT": _min_int(5000),
    "TFTP_FILE_TIMEOUT": _min_int(0),
    "MAC_ADDRESS": _check_mac,
    **{key: _check_bool for key in ("BOOT_UART", "NET_INSTALL_ENABLED", "NET_INSTALL_AT_POWER_ON",
                                    "ENABLE_SELF_UPDATE", "FREEZE_VERSION", "SIGNED_BOOT")},
    "WALT_VPN_MAC": _check_vpn_mac,
    "WALT_VPN_ENTRYPOINT": _check_entrypoint,
    "WALT_VPN_BOOT_MODE": _check_boot_mode,
    "WALT_VPN_USER": _check_user,
    "WALT_VPN_ROOT": _check_root,
    "WALT_VPN_CREDS": _check_creds,
    "WALT_VPN_PROXY_JUMP": _check_proxy_jump,
    "WALT_VPN_HTTP_PROXY": _check_http_proxy,
}
WALT_KEYS = tuple(k for k in CHECKS if k.startswith("WALT_VPN_"))


# Documented bootloader properties (raspberrypi/documentation, eeprom-bootloader.adoc;
# USB_MSD_BOOT_MAX_RETRIES and SIGNED_BOOT from rpi-eeprom's test configs and secure-boot
# docs). An unknown key is only a warning: the bootloader ignores it, and custom keys are
# legitimate (WalT's own WALT_VPN_* keys are checked above).
BOOTLOADER_KEYS = (
    "BOOT_UART", "UART_BAUD", "WAKE_ON_GPIO", "POWER_OFF_ON_HALT", "WAIT_FOR_POWER_BUTTON",
    "BOOT_ORDER", "BOOT_WATCHDOG_TIMEOUT", "BOOT_WATCHDOG_PARTITION", "MAX_RESTARTS",
    "REBOOT_ON_FATAL_ERROR", "SD_BOOT_MAX_RETRIES", "SD_OVERCURRENT_CHECK", "SD_QUIRKS",
    "NET_BOOT_MAX_RETRIES", "USB_MSD_BOOT_MAX_RETRIES", "DHCP_TIMEOUT", "DHCP_REQ_TIMEOUT",
    "TFTP_FILE_TIMEOUT", "TFTP_IP", "TFTP_PREFIX", "TFTP_PREFIX_STR", "PXE_OPTION43",
    "DHCP_OPTION97", "MAC_ADDRESS", "MAC_ADDRESS_OTP", "CLIENT_IP", "SUBNET", "GATEWAY",
    "DISABLE_HDMI", "HDMI_DELAY", "ENABLE_SELF_UPDATE", "FREEZE_VERSION", "HTTP_HOST",
    "HTTP_PORT", "HTTP_PATH", "HTTP_CACERT_HASH", "IMAGER_REPO_URL", "NET_INSTALL_ENABLED",
    "NET_INSTALL_AT_POWER_ON", "NET_INSTALL_KEYBOARD_WAIT", "NETCONSOLE", "PARTITION",
    "PARTITION_WALK", "BOOTVAR0", "PCIE_PROBE", "PSU_MAX_CURRENT", "USB_MSD_EXCLUDE_VID_PID",
    "USB_MSD_DISCOVER_TIMEOUT", "USB_MSD_LUN_TIMEOUT", "USB_MSD_PWR_OFF_TIME",
    "USB_MSD_STARTUP_DELAY", "VL805", "XHCI_DEBUG", "SDRAM_BANKLOW", "SIGNED_BOOT",
)
KNOWN_KEYS = tuple(dict.fromkeys((*BOOTLOADER_KEYS, *CHECKS)))
# Keys whose value the bootloader reads as a number: it stops at the first space, so
# trailing spaces (`FREEZE_VERSION=1   ` in Raspberry Pi's own 2019 configs) are harmless.
# String values (hosts, paths, MACs, WALT_VPN_*) would keep them: refused there.
TEXT_KEYS = frozenset({"TFTP_IP", "TFTP_PREFIX_STR", "PXE_OPTION43", "MAC_ADDRESS", "MAC_ADDRESS_OTP",
                       "CLIENT_IP", "SUBNET", "GATEWAY", "HTTP_HOST", "HTTP_PATH", "HTTP_CACERT_HASH",
                       "IMAGER_REPO_URL", "NETCONSOLE", "USB_MSD_EXCLUDE_VID_PID", *WALT_KEYS})
# Sections whose lines are never bootloader settings: `[none]` never matches, and from
# `[config.txt]` on, lines are config.txt properties for the firmware (lowercase keys).
INACTIVE_SECTIONS = ("none", "config.txt")
_ANY_KEY = re.compile(r"[A-Za-z0-9_]+")


@dataclass(frozen=True)
class BootconfWarning:
    """Something the bootloader accepts but probably was not meant (an unknown key)."""

    what: str
    where: str
    hint: str | None = None

    def __str__(self) -> str:
        return f"{self.what} ({self.where})"


@dataclass(frozen=True)
class BootconfCheck:
    """The settings of [all] (last value wins) and the warnings."""

    settings: dict[str, str]
    warnings: tuple[BootconfWarning, ...] = ()


def _size_error(text: str, size: int, where: str) -> BootconfError:
    sizes: dict[str, int] = {}
    for line in text.splitlines(keepends=True):
        key, sep, _ = line.partition("=")
        if line.lstrip(" ").startswith("#"):
            key, sep = "comments", "#"
        if sep:
            sizes[key.strip()] = sizes.get(key.strip(), 0) + len(line.encode("utf-8"))
    largest = sorted(sizes.items(), key=lambda kv: (-kv[1], kv[0]))[:3]
    listing = ", ".join(f"{key} ({n} B)" for key, n in largest)
    return _fail(f"bootconf.txt is {size} bytes, {size - MAX_FILE_CONTENT} over the "
                 f"{MAX_FILE_CONTENT}-byte limit; largest keys: {listing}", where,
                 "shorten the largest values (<= 4072 B keeps it in one 4 KiB sector)")


def _unknown_key(key: str, at: str) -> BootconfWarning:
    if key.startswith("WALT_VPN_"):
        candidates: Sequence[str] = WALT_KEYS
        what = f"unknown key {key}: not a WALT_VPN_* key the VPN init reads"
    else:
        candidates = KNOWN_KEYS
        what = f"unknown key {key}: the bootloader ignores it"
    if key.upper() in KNOWN_KEYS:
        return BootconfWarning(what, at, f"keys are case-sensitive: did you mean {key.upper()}?")
    close = difflib.get_close_matches(key.upper(), candidates, n=1, cutoff=0.75)
    hint = f"did you mean {close[0]}?" if close else "no documented key is close; a custom key is kept, strict validation refuses it"
    return BootconfWarning(what, at, hint)


def _check_line(key: str, raw_value: str, at: str) -> None:
    """A key=value line of an active section: syntax, spaces, the value of known keys."""
    if not _ANY_KEY.fullmatch(key):
        raise _fail(f"key {key[:40]!r} is not made of A-Z, 0-9 and _", at,
                    "no spaces around `=`: the bootloader does not ignore them")
    value = raw_value.rstrip(" ")
    if value != raw_value and key in TEXT_KEYS:
        raise _fail(f"{key} value has trailing spaces, which the bootloader would keep in the value", at,
                    "remove them")
    if value.startswith(" "):
        raise _fail(f"{key} value has leading spaces", at, "no spaces around `=`: the bootloader does not ignore them")
    check = CHECKS.get(key)
    if check is not None:
        check(value, at)


def check_bootconf(text: str, where: str = "bootconf.txt", *, strict: bool = False,
                   declared: Sequence[str] = ()) -> BootconfCheck:
    """Check every line and value the way the bootloader reads them (facts §3).

    Accepts what Raspberry Pi's tools and bootloader accept: conditional sections
    (`[gpio8=0]`, `[pi4]`, ...), `[none]` and `[config.txt]` sections with any keys,
    trailing spaces after numeric values. Refuses what the bootloader would silently
    ignore or what breaks booting (bad HTTP_HOST, BOOT_ORDER, timeouts, over 4076 bytes).
    Unknown keys (and a key set twice in one section) are warnings, with a did-you-mean
    against the documented bootloader keys and WALT_VPN_*; `strict` makes them errors.
    `declared` names custom keys the caller adds on purpose (never warned about).
    """
    settings: dict[str, str] = {}
    warnings: list[BootconfWarning] = []
    seen: dict[tuple[str, str], int] = {}
    section = "all"
    bad = _NOT_PRINTABLE.search(text)
    if bad is not None:
        raise _fail("line is not printable ASCII", f"{where}:{text.count(chr(10), 0, bad.start()) + 1}",
                    "LF line endings, no tabs or control characters")
    for number, line in enumerate(text.split("\n"), start=1):
        at = f"{where}:{number}"
        stripped = line.strip(" ")
        if not stripped or stripped.startswith("#"):
            continue
        if stripped.startswith("["):
            if not _SECTION.fullmatch(stripped):
                raise _fail(f"bad section header {stripped!r}", at, "e.g. [all]")
            section = stripped[1:-1]
            continue
        if section in INACTIVE_SECTIONS:
            continue
        key, sep, raw_value = line.partition("=")
        if not sep:
            raise _fail(f"line {line[:40]!r} is not KEY=VALUE", at)
        at = f"{at} {key}"
        _check_line(key, raw_value, at)
        value = raw_value.rstrip(" ")
        if key not in KNOWN_KEYS and not (key in declared and not key.startswith("WALT_VPN_")):
            warnings.append(_unknown_key(key, at))
        if (section, key) in seen:
            warnings.append(BootconfWarning(
                f"{key} is set twice in [{section}] (lines {seen[section, key]} and {number})", at,
                "the bootloader keeps the last value; remove the other line"))
        seen[section, key] = number
        if section == "all":
            settings[key] = value
    size = len(text.encode("ascii"))
    if size > MAX_FILE_CONTENT:
        raise _size_error(text, size, where)
    if strict and warnings:
        first = warnings[0]
        raise BootconfError(f"{first.what} (refused in strict mode)", first.where, first.hint)
    return BootconfCheck(settings, tuple(warnings))


def validate_bootconf(text: str, where: str = "bootconf.txt", *, strict: bool = False) -> dict[str, str]:
    """`check_bootconf`'s settings (warnings dropped unless `strict`). Raises BootconfError."""
    return check_bootconf(text, where, strict=strict).settings


def parse_bootconf(text: str) -> dict[str, str]:
    """The settings that apply on every board: the [all] section (and lines before any
    section); conditional sections are skipped. Last value wins. Never raises."""
    settings: dict[str, str] = {}
    section = "all"
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if line.startswith("[") and line.endswith("]"):
            section = line[1:-1].strip()
            continue
        key, sep, value = line.partition("=")
        if sep and section == "all":
            settings[key.strip()] = value.strip()
    return settings


@functools.lru_cache(maxsize=1)
def _environment() -> jinja2.Environment:
    return jinja2.Environment(undefined=jinja2.StrictUndefined, trim_blocks=True,
                              lstrip_blocks=True, keep_trailing_newline=True, autoescape=False)


def template_text(variant: str) -> str:
    """The shipped template of a variant."""
    if variant not in VARIANTS:
        raise _fail(f"unknown bootconf variant {variant!r}", "variant", f"use one of {', '.join(VARIANTS)}")
    resource = importlib.resources.files(__package__ or "fwbuild.eeprom") / "templates" / f"bootconf-{variant}.j2"
    return resource.read_text(encoding="utf-8")


@functools.lru_cache(maxsize=16)
def _compile(text: str) -> jinja2.Template:
    try:
        return _environment().from_string(text)
    except jinja2.TemplateSyntaxError as exc:
        raise _fail(f"bootconf template syntax error: {exc.message}", f"template:{exc.lineno}") from None


def _single_line(value: object, where: str) -> str:
    if isinstance(value, bool) or not isinstance(value, (str, int)):
        raise _fail(f"value must be a string or an integer, not {type(value).__name__}", where)
    text = str(value)
    if "\n" in text or "\r" in text:
        raise _fail("value spans several lines", where, "bootconf values are single-line ASCII")
    return text


def _normalise(variant: str, values: Mapping[str, Any], custom: bool) -> dict[str, Any]:
    unknown = [k for k in values if k not in VALUE_KEYS]
    if unknown and not custom:
        close = difflib.get_close_matches(unknown[0], VALUE_KEYS, n=1)
        raise _fail(f"unknown bootconf value {unknown[0]!r}", unknown[0],
                    f"did you mean {close[0]!r}?" if close else f"known: {', '.join(VALUE_KEYS)}")
    context: dict[str, Any] = {k: v for k, v in values.items() if k not in VALUE_KEYS}
    for key in ("http_host", "http_port", "http_path"):
        value = values.get(key)
        context[key] = None if value is None else _single_line(value, key)
    if context["http_host"] is None and variant in HOST_REQUIRED:
        raise _fail(f"the {variant} variant needs http_host", "http_host",
                    "the server's host name as the Pi reaches it")
    if context["http_port"] is not None and not isinstance(values["http_port"], int):
        raise _fail("http_port must be an integer", "http_port")
    extra: list[tuple[str, str]] = []
    pairs: Sequence[Any] = values.get("extra") or ()
    if isinstance(pairs, (str, bytes, Mapping)):
        raise _fail("extra must be a sequence of (KEY, value) pairs", "extra")
    for index, pair in enumerate(pairs):
        if not isinstance(pair, (tuple, list)) or len(pair) != 2:
            raise _fail("extra items must be (KEY, value) pairs", f"extra[{index}]")
        key = pair[0]
        if not isinstance(key, str) or not _KEY.fullmatch(key):
            raise _fail(f"custom key {key!r} is not made of A-Z, 0-9 and _", f"extra[{index}]")
        extra.append((key, _single_line(pair[1], key)))
    context["extra"] = extra
    return context


def render_bootconf(variant: str, values: Mapping[str, Any], template_text: str | None = None,
                    *, strict: bool = True) -> str:
    """Render the variant's template with per-node values, then validate the result.

    Strict by default: a key the template (shipped or the recipe's own) sets that is no
    documented bootloader key nor WALT_VPN_* is an error, not a warning. Custom keys the
    caller passes in `extra` are declared, so they are accepted (WALT_VPN_* ones must exist).
    """
    if variant not in VARIANTS:
        raise _fail(f"unknown bootconf variant {variant!r}", "variant", f"use one of {', '.join(VARIANTS)}")
    text = template_text if template_text is not None else _shipped(variant)
    context = _normalise(variant, values, custom=template_text is not None)
    where = f"bootconf-{variant}.j2" if template_text is None else f"custom {variant} template"
    template = _compile(text)
    try:
        rendered = template.render(context)
    except jinja2.UndefinedError as exc:
        raise _fail(f"bootconf template uses an undefined value: {exc.message}", where) from None
    except jinja2.TemplateError as exc:
        raise _fail(f"bootconf template error: {exc}", where) from None
    except Exception as exc:  # noqa: BLE001 - a template's own expression failed (e.g. 1/0)
        raise _fail(f"bootconf template failed: {type(exc).__name__}: {exc}", where) from None
    check_bootconf(rendered, f"bootconf.txt ({variant})", strict=strict,
                   declared=[key for key, _ in context["extra"]])
    return rendered


@functools.lru_cache(maxsize=len(VARIANTS))
def _shipped(variant: str) -> str:
    return template_text(variant)
