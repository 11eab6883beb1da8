"""bootconf.txt: templates per variant, validation of every value, size limit, parsing."""

from __future__ import annotations

import base64
import gzip
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fwbuild.eeprom.assemble import assemble_eeprom
from fwbuild.eeprom.bootconf import (
    VARIANTS,
    check_bootconf,
    parse_bootconf,
    render_bootconf,
    template_text,
    validate_bootconf,
)
from fwbuild.eeprom.image import parse_image
from fwbuild.eeprom.synthetic import DEFAULT_BOOTCONF, synthetic_image
from fwbuild.errors import BootconfError

EXTRA = [("WALT_VPN_MAC", "52:54:00:aa:bb:cc"), ("WALT_VPN_ENTRYPOINT", "vpn.example.org:2222"),
         ("WALT_VPN_BOOT_MODE", "enforced"), ("WALT_VPN_USER", "walt-vpn"),
         ("WALT_VPN_ROOT", "/var/lib/walt/nodes/dca632aabbcc/fs")]
NODE: dict[str, Any] = {
    "http_host": "boot.example.org",
    "http_port": 8080,
    "http_path": "walt-vpn/node/dca632aabbcc",
    "extra": EXTRA,
}
CREDS = base64.b64encode(gzip.compress(b"x" * 100, mtime=0)).decode()


def test_templates_ship_as_package_data() -> None:
    for variant in VARIANTS:
        assert "BOOT_ORDER" in template_text(variant)


@pytest.mark.parametrize("variant, order, self_update", [
    ("permissive", "0xf127", "1"), ("enforced", "0xf7", "0"),
])
def test_node_variants(variant: str, order: str, self_update: str) -> None:
    text = render_bootconf(variant, NODE)
    settings_ = validate_bootconf(text)
    assert text.startswith("[all]\n") and text.endswith("\n")
    assert settings_["BOOT_ORDER"] == order
    assert settings_["ENABLE_SELF_UPDATE"] == self_update
    assert settings_["NET_INSTALL_ENABLED"] == "0"
    assert settings_["BOOT_UART"] == "1"
    assert settings_["DHCP_REQ_TIMEOUT"] == "500"
    assert settings_["HTTP_HOST"] == "boot.example.org"
    assert settings_["HTTP_PORT"] == "8080"
    assert settings_["HTTP_PATH"] == "walt-vpn/node/dca632aabbcc"
    keys = [line.split("=")[0] for line in text.splitlines()[1:]]
    assert keys[-5:] == [k for k, _ in EXTRA]  # extra pairs appended in order


def test_recovery_variant_needs_no_host() -> None:
    text = render_bootconf("recovery", {})
    assert parse_bootconf(text) == {"BOOT_UART": "1", "BOOT_ORDER": "0xf12",
                                    "NET_INSTALL_AT_POWER_ON": "1", "DHCP_REQ_TIMEOUT": "500"}


def test_port_and_path_are_optional() -> None:
    text = render_bootconf("enforced", {"http_host": "10.0.0.1"})
    assert "HTTP_PORT" not in text and "HTTP_PATH" not in text


def test_custom_template_is_strict() -> None:
    assert render_bootconf("recovery", {"mode": "2"}, "[all]\nBOOT_ORDER=0xf{{ mode }}\n") == \
        "[all]\nBOOT_ORDER=0xf2\n"
    with pytest.raises(BootconfError, match="undefined"):
        render_bootconf("recovery", {}, "[all]\nBOOT_ORDER=0xf{{ mode }}\n")
    with pytest.raises(BootconfError, match="syntax"):
        render_bootconf("recovery", {}, "{% for %}")


@pytest.mark.parametrize("values, message", [
    ({}, "needs http_host"),
    ({"http_host": "boot.example.org", "http_hots": "x"}, "did you mean 'http_host'"),
    ({"http_host": "boot.example.org", "http_port": "80"}, "integer"),
    ({"http_host": "boot.example.org", "http_port": True}, "string or an integer"),
    ({"http_host": "a\nBOOT_ORDER=0x1"}, "several lines"),
    ({"http_host": "x", "extra": [("lower", "1")]}, "A-Z"),
    ({"http_host": "x", "extra": [("K", "a\nb")]}, "several lines"),
    ({"http_host": "x", "extra": "K=V"}, "pairs"),
    ({"http_host": "x", "extra": [("K",)]}, "pairs"),
])
def test_render_rejects_bad_values(values: dict[str, Any], message: str) -> None:
    with pytest.raises(BootconfError) as caught:
        render_bootconf("enforced", values)
    assert message in f"{caught.value} {caught.value.hint}"


def test_unknown_variant() -> None:
    with pytest.raises(BootconfError, match="variant"):
        render_bootconf("paranoid", NODE)


BAD_LINES = [
    ("BOOT_ORDER=0xf8", "unknown boot mode nibble '8'"),
    ("BOOT_ORDER=f41", "hex nibbles"),
    ("BOOT_ORDER=0x", "hex nibbles"),
    ("BOOT_ORDER=0x111111111", "hex nibbles"),
    ("HTTP_HOST=http://boot.example.org", "scheme"),
    ("HTTP_HOST=boot.example.org/x", "path"),
    ("HTTP_HOST=boot.example.org:80", "port"),
    ("HTTP_HOST=Boot.example.org", "lowercase"),
    ("HTTP_HOST=boot_example.org", "not a host name"),
    ("HTTP_HOST=-boot.org", "not a host name"),
    ("HTTP_HOST=300.1.1.1", "IPv4"),
    ("HTTP_PORT=0", "port number"),
    ("HTTP_PORT=65536", "port number"),
    ("HTTP_PORT=http", "port number"),
    ("HTTP_PATH=/walt-vpn", "start or end"),
    ("HTTP_PATH=walt-vpn/", "start or end"),
    ("HTTP_PATH=walt\\vpn", "backslash"),
    ("HTTP_PATH=walt//vpn", "bad segment"),
    ("HTTP_PATH=walt/../vpn", "bad segment"),
    ("HTTP_PATH=walt vpn", "bad segment"),
    ("HTTP_PATH=a?b=c", "bad segment"),
    ("DHCP_REQ_TIMEOUT=499", "minimum 500"),
    ("DHCP_TIMEOUT=4999", "minimum 5000"),
    ("DHCP_TIMEOUT=5s", "decimal"),
    ("NET_INSTALL_ENABLED=2", "0 or 1"),
    ("HTTP_CACERT_HASH=abc", "SHA-256"),
    ("boot_order=0xf1", "case-sensitive: did you mean BOOT_ORDER?"),
    ("BOOT_ORDR=0xf1", "did you mean BOOT_ORDER?"),
    ("BOOT ORDER=0xf1", "A-Z"),
    ("JUSTAWORD", "KEY=VALUE"),
    ("HTTP_HOST=boot.example.org ", "trailing spaces"),
    ("WALT_VPN_USER=walt ", "trailing spaces"),
    ("BOOT_ORDER= 0xf1", "leading spaces"),
    ("BOOT_ORDER =0xf1", "A-Z"),
    ("BOOT_ORDER=0xf1\r", "printable ASCII"),
    ("WALT_VPN_MAC=52:54:00:AA:BB:CC", "MAC"),
    ("WALT_VPN_MAC=01:54:00:aa:bb:cc", "locally administered"),
    ("WALT_VPN_MAC=50:54:00:aa:bb:cc", "locally administered"),
    ("WALT_VPN_ENTRYPOINT=vpn.example.org:0", "port"),
    ("WALT_VPN_ENTRYPOINT=ssh://vpn", "scheme"),
    ("WALT_VPN_BOOT_MODE=recovery", "enforced"),
    ("WALT_VPN_USER=Walt", "user name"),
    ("WALT_VPN_ROOT=relative/path", "absolute"),
    ("WALT_VPN_ROOT=/a/../b", "absolute"),
    ("WALT_VPN_CREDS=not base64!", "base64"),
    ("WALT_VPN_CREDS=" + base64.b64encode(b"plain").decode(), "gzip"),
    ("WALT_VPN_PROXY_JUMP=host", "user@host"),
    ("WALT_VPN_HTTP_PROXY=proxy.example.org", "no port"),
    ("WALT_VPN_MACC=52:54:00:aa:bb:cc", "did you mean WALT_VPN_MAC"),
    ("HTTP_HOST=h\u00e9", "printable ASCII"),
    ("[gpio8=0", "section"),
]


@pytest.mark.parametrize("line, message", BAD_LINES)
def test_validation_errors(line: str, message: str) -> None:
    with pytest.raises(BootconfError) as caught:
        validate_bootconf(f"[all]\nBOOT_UART=1\n{line}\n", "node.txt", strict=True)
    assert message in f"{caught.value} {caught.value.hint}"
    assert caught.value.where is not None and caught.value.where.startswith("node.txt:3")


GOOD_LINES = [
    "BOOT_ORDER=0xf461", "BOOT_ORDER=0xE", "HTTP_HOST=10.1.2.3", "HTTP_HOST=a-b.c9.example",
    "HTTP_PORT=65535", "HTTP_PATH=net_install", "HTTP_PATH=walt-vpn/node/dca632aabbcc",
    "DHCP_TIMEOUT=5000", "WALT_VPN_ENTRYPOINT=[::1]:22", "WALT_VPN_ENTRYPOINT=vpn.example.org",
    "WALT_VPN_PROXY_JUMP=jump@bastion.example.org:2200", "WALT_VPN_HTTP_PROXY=10.0.0.1:3128",
    f"WALT_VPN_CREDS={CREDS}", "# a comment", "", "CUSTOM_KEY_1=anything goes here",
    "MAC_ADDRESS=dc:a6:32:aa:bb:cc",
]


@pytest.mark.parametrize("line", GOOD_LINES)
def test_valid_lines(line: str) -> None:
    validate_bootconf(f"[all]\n{line}\n")


def test_unknown_keys_warn_and_strict_refuses() -> None:
    text = "[all]\nBOOT_ORDR=0xf1\nWALT_VPN_MACC=52:54:00:aa:bb:cc\nSITE_TAG=rack4\n"
    result = check_bootconf(text, "node.txt")
    assert result.settings["BOOT_ORDR"] == "0xf1"
    assert [(w.where, w.hint) for w in result.warnings] == [
        ("node.txt:2 BOOT_ORDR", "did you mean BOOT_ORDER?"),
        ("node.txt:3 WALT_VPN_MACC", "did you mean WALT_VPN_MAC?"),
        ("node.txt:4 SITE_TAG", "no documented key is close; a custom key is kept, strict validation refuses it"),
    ]
    assert "the bootloader ignores it" in result.warnings[0].what
    with pytest.raises(BootconfError) as caught:
        check_bootconf(text, "node.txt", strict=True)
    assert caught.value.where == "node.txt:2 BOOT_ORDR" and caught.value.hint == "did you mean BOOT_ORDER?"
    assert "strict" in caught.value.what


def test_sections_the_raspberry_pi_tools_accept() -> None:
    text = ("[all]\nBOOT_UART=0\nFREEZE_VERSION=1   \n[none]   \nuserdata0=0x12345789\nusercert=AAAA+/=\n"
            "[gpio8=0]\nBOOT_ORDER=0xf21\n[pi4]\nBOOT_ORDER=0xf41\n[config.txt]\ndtoverlay=vc4-kms-v3d\n")
    result = check_bootconf(text, strict=True)
    assert result.settings == {"BOOT_UART": "0", "FREEZE_VERSION": "1"} and not result.warnings
    # Values in conditional sections are still checked: the bootloader applies them.
    with pytest.raises(BootconfError, match="unknown boot mode nibble '8'"):
        check_bootconf("[all]\nBOOT_UART=0\n[gpio8=0]\nBOOT_ORDER=0xf8\n")
    with pytest.raises(BootconfError, match="not KEY=VALUE"):
        check_bootconf("[pi5]\nJUSTAWORD\n")


def test_duplicates_and_sections() -> None:
    warned = check_bootconf("[all]\nBOOT_ORDER=0xf1\nBOOT_ORDER=0xf2\n")
    assert warned.settings == {"BOOT_ORDER": "0xf2"}
    assert "set twice in [all] (lines 2 and 3)" in warned.warnings[0].what
    with pytest.raises(BootconfError, match="set twice"):
        validate_bootconf("[all]\nBOOT_ORDER=0xf1\nBOOT_ORDER=0xf2\n", strict=True)
    text = "BOOT_UART=1\n[gpio8=0]\nBOOT_ORDER=0xf1\n[all]\nBOOT_ORDER=0xf7\n"
    assert validate_bootconf(text) == {"BOOT_UART": "1", "BOOT_ORDER": "0xf7"}
    assert parse_bootconf(text) == {"BOOT_UART": "1", "BOOT_ORDER": "0xf7"}
    assert parse_bootconf("[all]\nA=1\nA=2\n  B = x \n") == {"A": "2", "B": "x"}


def test_default_config_is_valid() -> None:
    assert validate_bootconf(DEFAULT_BOOTCONF.decode())["BOOT_ORDER"] == "0xf461"


def _config_of_size(size: int) -> str:
    head = "[all]\nBOOT_UART=1\n"
    filler = "CUSTOM_A=" + "a" * 2000 + "\n"
    rest = size - len(head) - len(filler) - len("CUSTOM_B=\n")
    return head + filler + "CUSTOM_B=" + "b" * rest + "\n"


def test_size_limit_4076() -> None:
    assert len(_config_of_size(4076)) == 4076
    validate_bootconf(_config_of_size(4076))
    with pytest.raises(BootconfError) as caught:
        validate_bootconf(_config_of_size(4077))
    message = str(caught.value)
    assert "4077 bytes, 1 over the 4076-byte limit" in message
    assert "largest keys: CUSTOM_B (2049 B), CUSTOM_A (2010 B), BOOT_UART (12 B)" in message


def test_size_error_through_render() -> None:
    values = dict(NODE, extra=[("WALT_VPN_CREDS", base64.b64encode(b"\x1f\x8b" + b"x" * 3400).decode())])
    with pytest.raises(BootconfError, match=r"over the 4076-byte limit; largest keys: WALT_VPN_CREDS \(4552 B\)"):
        render_bootconf("enforced", values)


_label = st.from_regex(r"[a-z0-9]([a-z0-9-]{0,8}[a-z0-9])?", fullmatch=True)
_hosts = st.builds(lambda labels, tld: ".".join([*labels, tld]), st.lists(_label, max_size=3),
                   st.from_regex(r"[a-z]{2,6}", fullmatch=True))
_segment = st.from_regex(r"[A-Za-z0-9_~-][A-Za-z0-9._~-]{0,10}", fullmatch=True)
_paths = st.builds("/".join, st.lists(_segment, min_size=1, max_size=4))
_extra_values = st.text(st.characters(min_codepoint=0x21, max_codepoint=0x7E), max_size=60)
_extra = st.lists(st.tuples(st.from_regex(r"X_[A-Z0-9_]{1,12}", fullmatch=True), _extra_values),
                  max_size=8, unique_by=lambda kv: kv[0])


@settings(max_examples=60, deadline=None)
@given(variant=st.sampled_from(["permissive", "enforced"]), host=_hosts,
       port=st.none() | st.integers(1, 65535), path=st.none() | _paths, extra=_extra,
       layout=st.sampled_from(["ab", "non-ab"]))
def test_random_valid_configs_round_trip(variant: str, host: str, port: int | None, path: str | None,
                                         extra: list[tuple[str, str]], layout: str) -> None:
    text = render_bootconf(variant, {"http_host": host, "http_port": port, "http_path": path,
                                     "extra": extra})
    image = assemble_eeprom(BASES[layout], text, boot_key=None, timestamp=1)
    parsed = parse_image(image)
    assert parsed.read_file("bootconf.txt").decode() == text
    assert parse_bootconf(text)["HTTP_HOST"] == host
    for key, value in extra:
        assert parse_bootconf(text)[key] == value
    # Re-applying the image's own config gives the identical image.
    assert assemble_eeprom(image, text, boot_key=None, timestamp=1) == image


BASES = {layout: synthetic_image(layout) for layout in ("ab", "non-ab")}


def test_recipe_templates_are_validated_strictly() -> None:
    # A recipe's own template with a misspelt key: refused, not written into a signed image.
    with pytest.raises(BootconfError) as caught:
        render_bootconf("recovery", {}, "[all]\nBOOT_ORDR=0xf21\n")
    assert "did you mean BOOT_ORDER?" in f"{caught.value} {caught.value.hint}"
    assert caught.value.where == "bootconf.txt (recovery):2 BOOT_ORDR"
    # Non-strict rendering (an explicit choice) keeps it.
    assert "BOOT_ORDR" in render_bootconf("recovery", {}, "[all]\nBOOT_ORDR=0xf21\n", strict=False)
    # Keys the caller declares through `extra` are deliberate; WALT_VPN_* ones must exist.
    text = render_bootconf("enforced", dict(NODE, extra=[("SITE_TAG", "rack4")]))
    assert "SITE_TAG=rack4\n" in text
    with pytest.raises(BootconfError) as caught:
        render_bootconf("enforced", dict(NODE, extra=[("WALT_VPN_MACC", "52:54:00:aa:bb:cc")]))
    assert caught.value.hint == "did you mean WALT_VPN_MAC?"
    for variant in VARIANTS:  # the shipped templates pass strict validation
        check_bootconf(render_bootconf(variant, NODE), strict=True)


def test_size_error_counts_comments() -> None:
    text = "[all]\nBOOT_UART=1\n" + "# " + "c" * 4000 + "\nHDMI_DELAY=0\n" + "# more\n" * 10
    with pytest.raises(BootconfError) as caught:
        validate_bootconf(text)
    assert "largest keys: comments (4073 B), HDMI_DELAY (13 B), BOOT_UART (12 B)" in str(caught.value)


_line = st.one_of(
    st.text(st.characters(min_codepoint=0x20, max_codepoint=0x7E), max_size=40),
    st.builds(lambda k, v: f"{k}={v}", st.sampled_from(["BOOT_ORDER", "HTTP_HOST", "HTTP_PATH", "WALT_VPN_MAC",
                                                        "DHCP_TIMEOUT", "FREEZE_VERSION", "userdata0", "X"]),
              st.text(st.characters(min_codepoint=0x20, max_codepoint=0x7E), max_size=20)),
    st.sampled_from(["[all]", "[none]", "[gpio8=0]", "[config.txt]", "[pi4", "#", "   "]),
)


@settings(max_examples=300, deadline=None)
@given(lines=st.lists(_line, max_size=12), strict=st.booleans())
def test_any_text_gives_settings_or_a_config_error(lines: list[str], strict: bool) -> None:
    text = "\n".join(lines) + "\n"
    try:
        result = check_bootconf(text, strict=strict)
    except BootconfError as exc:
        assert exc.where is not None and exc.where.startswith("bootconf.txt")
        return
    assert not (strict and result.warnings)
    for key, value in result.settings.items():
        assert f"{key}={value}" in text
