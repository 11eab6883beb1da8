"""Shell linting as a test: shellcheck on every shell file of the repository, zero findings.

A shell file is a tracked file named `*.sh` or whose first line is a shebang naming
sh, bash, dash, ash or `busybox sh`. Each is checked with `-x` (sourced files followed,
paths relative to the script: `source-path=SCRIPTDIR` directives). The inits run under
busybox ash and are checked as POSIX sh (`# shellcheck shell=sh`): no `local`, no
ash-only syntax. A finding is fixed, or disabled on the line above with its reason.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SHELLCHECK = shutil.which("shellcheck")
_SHEBANG = re.compile(rb"#!\s*(/usr)?/bin/(env\s+)?(sh|bash|dash|ash|busybox\s+sh)\b")


def tracked_files() -> list[Path]:
    out = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, check=True).stdout
    return [ROOT / name for name in out.decode().split("\0") if name]


def shell_files() -> list[Path]:
    found = []
    for path in tracked_files():
        if not path.is_file():
            continue
        if path.suffix == ".sh":
            found.append(path)
            continue
        with path.open("rb") as handle:
            if _SHEBANG.match(handle.readline(200)):
                found.append(path)
    return sorted(found)


def test_the_shell_files_are_found() -> None:
    names = {str(p.relative_to(ROOT)) for p in shell_files()}
    init = "fwbuild/initramfs/init/"
    for expected in ("scripts/setup", ".ci/run", f"{init}default/init", f"{init}vpn/init",
                     f"{init}vpn/lib/config.sh", f"{init}vpn/bin/vpn-eeprom"):
        assert expected in names
    # Binary files that merely start with "#!" are not taken for scripts.
    assert not any(name.startswith("tests/data/") for name in names)


@pytest.mark.skipif(SHELLCHECK is None, reason="shellcheck not installed (scripts/setup installs it)")
def test_shellcheck_finds_nothing() -> None:
    files = [str(p.relative_to(ROOT)) for p in shell_files()]
    assert SHELLCHECK is not None
    result = subprocess.run([SHELLCHECK, "-x", "-f", "gcc", *files], cwd=ROOT, capture_output=True,
                            text=True, timeout=600, check=False)
    assert result.returncode == 0 and not result.stdout, result.stdout + result.stderr
