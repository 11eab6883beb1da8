"""The build pipeline: atomic publish, killed builds, the step cache, manifest."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from fwbuild.build import build
from fwbuild.cache import Cache
from fwbuild.errors import BuildError
from fwbuild.layout import Artifact
from fwbuild.pipeline import BuildContext, Step
from fwbuild.recipe import parse_recipe

ONE = Artifact("test.one", "a/one.bin")
TWO = Artifact("test.two", "b/two.txt")
RECIPE = {"recipe": {"name": "demo", "target": "virtual", "source_date_epoch": 1767225600},
          "site": {"http_host": "127.0.0.1"}, "initramfs": {"kernel_package": "linux-image-cloud-arm64"}}


def _steps(payload: bytes, calls: list[str]) -> list[Step]:
    def make(ctx: BuildContext) -> None:
        calls.append("make")
        ctx.put(ONE, payload)
        ctx.put(TWO, b"two " + payload[:4])

    return [Step("make", make, lambda ctx: {"payload": payload.hex()}, writes=(ONE, TWO))]


def test_publish_manifest_and_step_cache(tmp_path: Path, session_keys: Path) -> None:
    recipe = parse_recipe(RECIPE)
    cache = Cache(tmp_path / "cache")
    calls: list[str] = []
    first = build(recipe, out_root=tmp_path / "out", keys_dir=session_keys, cache=cache,
                  steps=_steps(b"1234data", calls))
    assert first.out_dir == tmp_path / "out" / "demo"
    assert (first.out_dir / "a/one.bin").read_bytes() == b"1234data"
    manifest = json.loads((first.out_dir / "manifest.json").read_text())
    assert manifest["artifacts"]["a/one.bin"]["size"] == 8
    assert manifest["source_date_epoch"] == 1767225600
    assert manifest["recipe"]["name"] == "demo"
    second = build(recipe, out_root=tmp_path / "out", keys_dir=session_keys, cache=cache,
                   steps=_steps(b"1234data", calls))
    assert calls == ["make"], "the second build takes the step's outputs from the cache"
    assert second.cached_steps == ("make",)
    assert (second.out_dir / "manifest.json").read_bytes() == (tmp_path / "out/demo/manifest.json").read_bytes()
    builds = [p.name for p in (tmp_path / "out" / ".builds" / "demo").iterdir()]
    assert len(builds) == 1, builds
    assert (tmp_path / "out" / ".builds" / "demo" / builds[0]).stat().st_mode & 0o777 == 0o755


def test_failed_step_keeps_previous_output(tmp_path: Path, session_keys: Path) -> None:
    recipe = parse_recipe(RECIPE)
    cache = Cache(tmp_path / "cache")
    build(recipe, out_root=tmp_path / "out", keys_dir=session_keys, cache=cache, steps=_steps(b"good", []))

    def explode(ctx: BuildContext) -> None:
        ctx.put(ONE, b"half")
        raise BuildError("step failed")

    with pytest.raises(BuildError):
        build(recipe, out_root=tmp_path / "out", keys_dir=session_keys, cache=cache,
              steps=[Step("explode", explode, writes=(ONE,))])
    assert (tmp_path / "out/demo/a/one.bin").read_bytes() == b"good"
    leftovers = [p for p in (tmp_path / "out/.builds/demo").iterdir() if p.name.startswith(".tmp-")]
    assert leftovers == []


_KILLED_BUILD = textwrap.dedent("""
    import sys, time
    from pathlib import Path
    from fwbuild.build import build
    from fwbuild.layout import Artifact
    from fwbuild.pipeline import Step
    from fwbuild.recipe import parse_recipe
    from fwbuild.cache import Cache
    recipe = parse_recipe({"recipe": {"name": "demo", "target": "virtual"}, "site": {"http_host": "127.0.0.1"},
                           "initramfs": {"kernel_package": "linux-image-cloud-arm64"}})
    def slow(ctx):
        ctx.put(Artifact("test.one", "a/one.bin"), b"NEW-BUT-UNFINISHED")
        Path(sys.argv[3]).write_text("started")
        time.sleep(60)
    build(recipe, out_root=Path(sys.argv[1]), keys_dir=Path(sys.argv[2]), cache=Cache(Path(sys.argv[4])),
          steps=[Step("slow", slow, writes=(Artifact("test.one", "a/one.bin"),))])
""")


def test_killed_build_leaves_previous_output_intact(tmp_path: Path, session_keys: Path) -> None:
    recipe = parse_recipe(RECIPE)
    out = tmp_path / "out"
    build(recipe, out_root=out, keys_dir=session_keys, cache=Cache(tmp_path / "cache"),
          steps=_steps(b"previous", []))
    before = {p.relative_to(out / "demo"): p.read_bytes() for p in (out / "demo").rglob("*") if p.is_file()}
    flag = tmp_path / "started"
    proc = subprocess.Popen([sys.executable, "-c", _KILLED_BUILD, str(out), str(session_keys), str(flag),
                             str(tmp_path / "cache")])
    deadline = time.monotonic() + 60
    while not flag.exists():
        assert proc.poll() is None, "the build exited before it was killed"
        assert time.monotonic() < deadline
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    after = {p.relative_to(out / "demo"): p.read_bytes() for p in (out / "demo").rglob("*") if p.is_file()}
    assert after == before
    # The next build cleans the dead build's staging directory.
    build(recipe, out_root=out, keys_dir=session_keys, cache=Cache(tmp_path / "cache"), steps=_steps(b"next", []))
    assert [p for p in (out / ".builds" / "demo").iterdir() if p.name.startswith(".tmp-")] == []
    assert (out / "demo/a/one.bin").read_bytes() == b"next"


def test_builds_of_recipes_with_a_common_prefix_coexist(tmp_path: Path, session_keys: Path) -> None:
    cache = Cache(tmp_path / "cache")
    lab = parse_recipe({**RECIPE, "recipe": {**RECIPE["recipe"], "name": "demo-lab"}})
    build(lab, out_root=tmp_path / "out", keys_dir=session_keys, cache=cache, steps=_steps(b"lab!", []))
    build(parse_recipe(RECIPE), out_root=tmp_path / "out", keys_dir=session_keys, cache=cache,
          steps=_steps(b"main", []))
    assert (tmp_path / "out/demo-lab/a/one.bin").read_bytes() == b"lab!"
    assert (tmp_path / "out/demo/a/one.bin").read_bytes() == b"main"
