"""Per-node EEPROM image cost: render + sign + assemble, in-process and as processes.

Usage: python3 bench/eeprom.py [--images N] [--processes M]
Goal: <= 2 ms per image in-process (RSA-2048 signing alone is ~1 ms).
Also: the same per SoC / layout (2712 AB, 2712 non-AB, 2711 Pi 4) and the validator over
rpi-eeprom's own configurations (tests/data/rpi-eeprom, when present).
"""

from __future__ import annotations

import argparse
import base64
import gzip
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from fwbuild.eeprom.assemble import assemble_eeprom
from fwbuild.eeprom.bootconf import check_bootconf, render_bootconf
from fwbuild.eeprom.synthetic import synthetic_image
from fwbuild.keys import init_keys, load_boot_key
from fwbuild.sign import build_sig

TS = 1_760_000_000


def node_values(index: int) -> dict[str, object]:
    mac = f"dca632{index:06x}"
    creds = base64.b64encode(gzip.compress(os.urandom(1200), mtime=0)).decode()
    return {
        "http_host": "boot.example.org",
        "http_port": 8080,
        "http_path": f"walt-vpn/node/{mac}",
        "extra": [("WALT_VPN_MAC", "52:54:00:" + ":".join(mac[i:i + 2] for i in (6, 8, 10))),
                  ("WALT_VPN_ENTRYPOINT", "vpn.example.org:2222"),
                  ("WALT_VPN_BOOT_MODE", "enforced"), ("WALT_VPN_USER", "walt-vpn"),
                  ("WALT_VPN_ROOT", f"/var/lib/walt/nodes/{mac}/fs"), ("WALT_VPN_CREDS", creds)],
    }


def median_ms(samples: list[float]) -> float:
    return statistics.median(samples) * 1000


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--images", type=int, default=300)
    parser.add_argument("--processes", type=int, default=20)
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="fwbuild-bench-"))
    try:
        keys = init_keys(work / "keys")
        key = load_boot_key(keys.boot_key)
        base = synthetic_image("ab")
        values = [node_values(i) for i in range(args.images)]

        render_t: list[float] = []
        sign_t: list[float] = []
        total_t: list[float] = []
        for node in values:
            start = time.perf_counter()
            text = render_bootconf("enforced", node)
            rendered = time.perf_counter()
            assemble_eeprom(base, text, boot_key=key, timestamp=TS)
            total_t.append(time.perf_counter() - start)
            render_t.append(rendered - start)
            t0 = time.perf_counter()
            build_sig(text.encode(), TS, key=key)
            sign_t.append(time.perf_counter() - t0)
        print(f"in-process, {args.images} per-node images (AB layout, ~2.1 KB configs):")
        print(f"  render+validate      median {median_ms(render_t):7.3f} ms")
        print(f"  bootconf.sig alone   median {median_ms(sign_t):7.3f} ms (RSA-2048)")
        print(f"  render+sign+assemble median {median_ms(total_t):7.3f} ms per image (goal <= 2 ms)")
        texts = [render_bootconf("enforced", node) for node in values]
        for label, (layout, soc) in (("2712 AB", ("ab", "2712")), ("2712 non-AB", ("non-ab", "2712")),
                                     ("2711 (Pi 4)", ("non-ab", "2711"))):
            soc_base = synthetic_image(layout, soc)
            samples = []
            for text in texts:
                start = time.perf_counter()
                assemble_eeprom(soc_base, text, boot_key=key, timestamp=TS)
                samples.append(time.perf_counter() - start)
            print(f"  sign+assemble {label:12} median {median_ms(samples):7.3f} ms per image")
        configs = sorted((Path(__file__).resolve().parent.parent / "tests" / "data" / "rpi-eeprom").rglob("*.txt"))
        if configs:
            corpus = [c.read_text() for c in configs if c.name != "bootconf-4077.txt"]
            start = time.perf_counter()
            rounds = 20
            for _ in range(rounds):
                for text in corpus:
                    check_bootconf(text)
            per = (time.perf_counter() - start) / (rounds * len(corpus))
            print(f"  check_bootconf over {len(corpus)} rpi-eeprom configs: {per * 1e6:7.1f} us per config")

        (work / "base.bin").write_bytes(base)
        fwbuild = shutil.which("fwbuild")
        entry = [sys.executable, "-c", "from fwbuild.cli import main; main()"]
        commands = {"python3 -c 'from fwbuild.cli import main; main()' eeprom edit": entry}
        if fwbuild:
            commands["fwbuild eeprom edit (console script)"] = [fwbuild]
        for label, command in commands.items():
            proc_t: list[float] = []
            for index in range(args.processes):
                config = work / f"node{index}.txt"
                config.write_text(render_bootconf("enforced", values[index % len(values)]))
                start = time.perf_counter()
                subprocess.run([*command, "eeprom", "edit", str(work / "base.bin"), "--out",
                                str(work / f"node{index}.bin"), "--config", str(config), "--sign-key",
                                str(keys.boot_key), "--timestamp", str(TS)], check=True)
                proc_t.append(time.perf_counter() - start)
            print(f"one process per image, {label} ({args.processes} runs):")
            print(f"  median {median_ms(proc_t):7.1f} ms per image")
        for label, code in (("bare interpreter start", "pass"), ("import fwbuild.cli", "import fwbuild.cli")):
            samples = []
            for _ in range(5):
                start = time.perf_counter()
                subprocess.run([sys.executable, "-c", code], check=True)
                samples.append(time.perf_counter() - start)
            print(f"  for reference: {label:24} median {median_ms(samples):7.1f} ms")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
