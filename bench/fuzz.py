#!/usr/bin/env python3
"""Fuzz the parsers that read untrusted bytes: EEPROM image, .sig, cpio, recipe, server config.

Mutational and deterministic (seeded): valid seeds are mutated (bit flips, byte and token
insertions, deletions, duplications, truncations, splices; for the TOML documents also
structure-aware replacement of values with hostile ones: NUL, /dev/zero, huge, negative,
deeply nested, wrong types). A parser may only answer with a typed error (FwbuildError);
any other exception is a crash, and the slowest input is reported (hangs show there).

    python3 bench/fuzz.py [--count 100000] [--seed 1] [--only sig,cpio,...]
Exit status 1 when any crash was found.
"""

from __future__ import annotations

import argparse
import copy
import math
import os
import random
import signal
import sys
import tempfile
import time
import tomllib
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from fwbuild.errors import FwbuildError

ROOT = Path(__file__).resolve().parent.parent
TOKENS = [b"\x00", b"\xff", b"-1", b"-", b"+", b"0x", b" ", b"\n", b"\r\n", b"\"", b"'", b"[",
          b"]", b"{", b"}", b"=", b"#", b"\\", b"%", b"..", b"/", b"\xc0\xae", b"1e999",
          b"99999999999999999999", b"_", b"ts: ", b"rsa2048: ", b"target-soc: ", b"070701",
          b"TRAILER!!!", b"[[", b"]]", b"\"\"\"", b"inf", b"nan", b"\t"]
HOSTILE: list[Any] = [
    "", "\x00", "/dev/zero", "/proc/self/mem", "/", "..", "a" * 5000, -1, 0, 2**63, -2**63,
    1.5e308, float("nan"), True, False, [], [[[[[[[[[[]]]]]]]]]], {}, {"a": {"b": {}}},
    "ssh-ed25519 AAAA", "127.0.0.1", "::1", "0.0.0.0/0", "dc:a6:32:00:00:01", "\u202e", "é",
    "{mac12}", "{other}", "x" * 300, ["\x00"], [1, 2], 65536, -80,
]


def mutate(data: bytes, rng: random.Random, rounds: int = 0) -> bytes:
    buf = bytearray(data)
    for _ in range(rounds or rng.randint(1, 6)):
        op = rng.randrange(8)
        pos = rng.randrange(len(buf) + 1) if buf else 0
        if op == 0 and buf:  # bit flip
            index = min(pos, len(buf) - 1)
            buf[index] ^= 1 << rng.randrange(8)
        elif op == 1 and buf:  # random byte
            buf[min(pos, len(buf) - 1)] = rng.randrange(256)
        elif op == 2:  # insert a token
            buf[pos:pos] = rng.choice(TOKENS)
        elif op == 3 and buf:  # delete a span
            del buf[pos:pos + rng.randint(1, 64)]
        elif op == 4 and buf:  # duplicate a span
            end = min(len(buf), pos + rng.randint(1, 256))
            buf[pos:pos] = buf[pos:end]
        elif op == 5:  # truncate
            del buf[pos:]
        elif op == 6 and buf:  # overwrite with a token
            token = rng.choice(TOKENS)
            buf[pos:pos + len(token)] = token
        elif op == 7 and buf:  # interesting little-endian / hex numbers
            value = rng.choice([0, 1, 0xFFFFFFFF, 0x7FFFFFFF, 0x80000000, len(buf), 8, 4096])
            if rng.random() < 0.5:
                buf[pos:pos + 4] = value.to_bytes(4, "little")
            else:
                buf[pos:pos + 8] = f"{value:08x}".encode()[:8]
    return bytes(buf)


def mutate_tree(tree: Any, rng: random.Random) -> Any:
    """Replace, delete or add one value somewhere in a TOML mapping."""
    tree = copy.deepcopy(tree)
    tables = [tree]
    stack = [tree]
    while stack:
        node = stack.pop()
        for value in (node.values() if isinstance(node, dict) else node):
            if isinstance(value, (dict, list)):
                tables.append(value)
                stack.append(value)
    target = rng.choice(tables)
    if isinstance(target, dict):
        keys = list(target)
        choice = rng.random()
        if keys and choice < 0.6:
            target[rng.choice(keys)] = copy.deepcopy(rng.choice(HOSTILE))
        elif keys and choice < 0.8:
            del target[rng.choice(keys)]
        else:
            target[rng.choice(["x", "name", "port", "listen", "artifacts", "node_addresses",
                               "ssh_host_keys_file", "state_dir"])] = copy.deepcopy(
                rng.choice(HOSTILE))
    elif target:
        target[rng.randrange(len(target))] = copy.deepcopy(rng.choice(HOSTILE))
    else:
        target.append(copy.deepcopy(rng.choice(HOSTILE)))
    return tree


def _toml(value: Any) -> str:
    """A tiny TOML writer for the mutated mappings (strings escaped as JSON-compatible)."""
    import json

    def scalar(v: Any) -> str:
        if isinstance(v, bool):
            return "true" if v else "false"
        if isinstance(v, (int, float)):
            return repr(v) if math.isfinite(v) else "nan"
        if isinstance(v, str):
            return json.dumps(v)
        if isinstance(v, list):
            return "[" + ", ".join(scalar(x) for x in v) + "]"
        if isinstance(v, dict):
            return "{" + ", ".join(f"{json.dumps(k)} = {scalar(x)}" for k, x in v.items()) + "}"
        raise TypeError(type(v))

    lines = [f"{json.dumps(k)} = {scalar(v)}" for k, v in value.items() if not isinstance(v, dict)]
    for name, table in value.items():
        if isinstance(table, dict):
            lines.append(f"[{json.dumps(name)}]")
            lines += [f"{json.dumps(k)} = {scalar(v)}" for k, v in table.items()]
    return "\n".join(lines) + "\n"


# -- targets: (seed inputs, function taking one input) ---------------------------------------

def target_sig() -> tuple[list[bytes], Callable[[bytes], None]]:
    from cryptography.hazmat.primitives.asymmetric import rsa

    from fwbuild.sign import build_sig, parse_sig

    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    seeds = [build_sig(b"x", 1700000000), build_sig(b"y", 0, target_soc="2712"),
             build_sig(b"z", 4294967295, target_soc="2712", key=key)]

    def run(data: bytes) -> None:
        sig = parse_sig(data)
        rebuilt = build_sig(b"", sig.ts, target_soc=sig.target_soc)
        assert rebuilt.split(b"\n")[1] == data.split(b"\n")[1], "parse/build disagree on ts"
    return seeds, run


def target_cpio() -> tuple[list[bytes], Callable[[bytes], None]]:
    from fwbuild.initramfs.cpio import CpioEntry, make_reproducible, read_cpio, write_cpio

    seeds = [write_cpio([CpioEntry(name="bin", mode=0o40755, nlink=2),
                         CpioEntry(name="bin/sh", mode=0o100755, data=b"#!/bin/sh\necho hi\n"),
                         CpioEntry(name="dev/console", mode=0o20600, rdevmajor=5,
                                   rdevminor=1)])]
    data_dir = ROOT / "tests" / "data" / "cpio"
    if data_dir.is_dir():
        seeds += [p.read_bytes() for p in sorted(data_dir.iterdir())
                  if p.is_file() and p.stat().st_size < 1 << 20][:4]

    def run(data: bytes) -> None:
        entries = read_cpio(data)
        write_cpio(make_reproducible(entries, 1700000000))  # what the builder does next
    return seeds, run


CPIO_FIELDS = [b"-0000001", b"+0000010", b" 0x00001", b"0000_010", b"ffffffff", b"7fffffff",
               b"80000000", b"-7ffffff", b"00000000", b"0000000g", b"\x000000001"[:8]]


def _mutate_cpio(data: bytes, rng: random.Random) -> bytes:
    """Overwrite one header field (13 x 8 hex digits after each 070701) with a hostile one."""
    starts = [i for i in range(len(data)) if data.startswith(b"070701", i)]
    if not starts or rng.random() < 0.4:
        return mutate(data, rng)
    buf = bytearray(data)
    at = rng.choice(starts) + 6 + 8 * rng.randrange(13)
    buf[at:at + 8] = rng.choice(CPIO_FIELDS)
    return bytes(buf)


def target_eeprom() -> tuple[list[bytes], Callable[[bytes], None]]:
    from fwbuild.eeprom.image import parse_image
    from fwbuild.eeprom.synthetic import synthetic_image

    seeds = [synthetic_image("ab"), synthetic_image("non-ab")]

    def run(data: bytes) -> None:
        image = parse_image(data)
        for section in image.files():
            image.read_file(section.name)
    return seeds, run


def _mutate_eeprom(data: bytes, rng: random.Random) -> bytes:
    """Mutations near the section headers (the interesting part of a 2 MiB image)."""
    buf = bytearray(data)
    for _ in range(rng.randint(1, 4)):
        if rng.random() < 0.7:
            pos = rng.randrange(0, min(len(buf), 0x20000)) if buf else 0
        else:
            pos = rng.randrange(len(buf) + 1) if buf else 0
        span = mutate(bytes(buf[pos:pos + 64]), rng, 1)
        buf[pos:pos + 64] = span
    if rng.random() < 0.05:
        del buf[rng.randrange(len(buf) + 1):]
    return bytes(buf)


def _toml_target(seed_files: list[Path], parse: Callable[[Path], object],
                 tmp: Path) -> tuple[list[bytes], Callable[[bytes], None]]:
    seeds = [p.read_bytes() for p in seed_files]
    counter = [0]

    def run(data: bytes) -> None:
        counter[0] += 1
        path = tmp / f"input{counter[0] % 4}.toml"
        path.write_bytes(data)
        parse(path)
    return seeds, run


def _server_config_seed(tmp: Path) -> Path:
    (tmp / "hosts.keys").write_text("ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIOMqqnkVzrm0SdG6UOoqKLsa"
                                    "bgH5C9okWi0dh2l9GKJl\n")
    (tmp / "nodes.txt").write_text("# nodes\ndc:a6:32:00:00:01 192.168.152.10\n")
    (tmp / "seed.toml").write_text((ROOT / "server" / "server.example.toml").read_text()
                                   .replace('# ssh_host_keys_file = "entrypoint.keys"',
                                            'ssh_host_keys_file = "hosts.keys"')
                                   .replace("cert_validity_days = 3650",
                                            'cert_validity_days = 3650\nnode_addresses = '
                                            '"nodes.txt"'))
    return tmp / "seed.toml"


HANG_SECONDS = 10


class Hang(Exception):
    """An input that took longer than HANG_SECONDS."""


def _on_alarm(signum: int, frame: object) -> None:
    raise Hang(f"no answer within {HANG_SECONDS} s")


def fuzz(name: str, seeds: list[bytes], run: Callable[[bytes], None], count: int,
         rng: random.Random, structured: bool = False) -> dict[str, Any]:
    crashes: dict[str, str] = {}
    typed = accepted = 0
    slowest = (0.0, b"")
    trees = []
    if structured:
        for seed in seeds:
            try:
                trees.append(tomllib.loads(seed.decode()))
            except (tomllib.TOMLDecodeError, UnicodeDecodeError):
                pass
    t_start = time.monotonic()
    for i in range(count):
        seed = seeds[i % len(seeds)]
        if trees and rng.random() < 0.5:
            data = _toml(mutate_tree(rng.choice(trees), rng)).encode()
            if rng.random() < 0.2:
                data = mutate(data, rng, 1)
        elif name == "eeprom":
            data = _mutate_eeprom(seed, rng)
        elif name == "cpio":
            data = _mutate_cpio(seed, rng)
        else:
            data = mutate(seed, rng)
        t0 = time.monotonic()
        signal.alarm(HANG_SECONDS)  # a hang is a crash too
        try:
            run(data)
            accepted += 1
        except FwbuildError:
            typed += 1
        except Exception as exc:  # noqa: BLE001 - that is what we are looking for
            key = f"{type(exc).__name__}: {str(exc)[:80]}"
            if key not in crashes:
                crashes[key] = traceback.format_exc(limit=4) + f"input: {data[:200]!r}\n"
        finally:
            signal.alarm(0)
        elapsed = time.monotonic() - t0
        if elapsed > slowest[0]:
            slowest = (elapsed, data[:80])
    return {"name": name, "inputs": count, "accepted": accepted, "typed_errors": typed,
            "crashes": crashes, "slowest_ms": slowest[0] * 1000,
            "seconds": time.monotonic() - t_start}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--count", type=int, default=100_000, help="inputs per parser")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--only", default="eeprom,sig,cpio,recipe,server-config")
    args = parser.parse_args(argv)
    rng = random.Random(args.seed)
    signal.signal(signal.SIGALRM, _on_alarm)
    from fwbuild.recipe import load_recipe
    from server.config import load_config

    results = []
    with tempfile.TemporaryDirectory(prefix="fwbuild-fuzz-", dir="/dev/shm"
                                     if os.path.isdir("/dev/shm") else None) as tmp_text:
        tmp = Path(tmp_text)
        targets: dict[str, Callable[[], tuple[list[bytes], Callable[[bytes], None]]]] = {
            "eeprom": target_eeprom,
            "sig": target_sig,
            "cpio": target_cpio,
            "recipe": lambda: _toml_target(
                [ROOT / "recipes" / "walt-vpn.toml", ROOT / "recipes" / "virtual.toml"],
                lambda p: load_recipe(p), tmp),
            "server-config": lambda: _toml_target([_server_config_seed(tmp)], load_config, tmp),
        }
        for name in args.only.split(","):
            seeds, run = targets[name]()
            result = fuzz(name, seeds, run, args.count, rng,
                          structured=name in ("recipe", "server-config"))
            results.append(result)
            print(f"{name:14} {result['inputs']:>7} inputs  {result['accepted']:>7} accepted  "
                  f"{result['typed_errors']:>7} typed errors  {len(result['crashes'])} crashes  "
                  f"slowest {result['slowest_ms']:.1f} ms  ({result['seconds']:.0f} s)",
                  flush=True)
            for trace in result["crashes"].values():
                print(trace, file=sys.stderr)
    return 1 if any(r["crashes"] for r in results) else 0


if __name__ == "__main__":
    sys.exit(main())
