"""The pipeline engine (fwbuild.pipeline), the artifact layout (fwbuild.layout) and the rule
that nothing but the publish step writes a published set."""

from __future__ import annotations

import ast
import hashlib
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from fwbuild import layout
from fwbuild.build import build
from fwbuild.cache import Cache
from fwbuild.cli import main
from fwbuild.errors import BuildError, UsageError
from fwbuild.fsutil import atomic_write
from fwbuild.layout import Artifact
from fwbuild.pipeline import BuildContext, Step, select_steps
from fwbuild.recipe import parse_recipe
from fwbuild.steps import STEPS
from tests.conftest import VirtualSet

ROOT = Path(__file__).resolve().parents[2]
RECIPE = {"recipe": {"name": "demo", "target": "virtual", "source_date_epoch": 1767225600},
          "site": {"http_host": "127.0.0.1"}, "initramfs": {"kernel_package": "linux-image-cloud-arm64"}}
ONE = Artifact("test.one", "a/one.bin")
TWO = Artifact("test.two", "b/two.txt")


def _imports_of(module: str) -> list[str]:
    code = (f"import sys; import {module}; "
            "print('\\n'.join(sorted(m for m in sys.modules if m.startswith('fwbuild'))))")
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, env=env)
    return result.stdout.split()


def test_engine_imports_no_step_and_steps_do_not_import_the_build() -> None:
    engine = _imports_of("fwbuild.pipeline")
    assert "fwbuild.steps" not in engine and "fwbuild.build" not in engine, engine
    formats = [m for m in engine if m.split(".")[1:2] in (["eeprom"], ["initramfs"], ["bootimg"], ["recovery"])]
    assert set(formats) <= {"fwbuild.eeprom", "fwbuild.eeprom.pubkey"}, formats  # (keys.py reads pubkeys)
    steps = _imports_of("fwbuild.steps")
    assert "fwbuild.build" not in steps, "steps must not import the build (no cycle)"


def test_no_import_cycle_between_build_steps_and_engine() -> None:
    """The import graph of the three modules (top level and function level) has no cycle."""
    graph: dict[str, set[str]] = {}
    for name in ("build", "steps", "pipeline", "layout", "cache"):
        tree = ast.parse((ROOT / "fwbuild" / f"{name}.py").read_text())
        found = set()
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.level == 1 and node.module:
                found.add(node.module.split(".")[0])
        graph[name] = found & {"build", "steps", "pipeline", "layout", "cache"}
    assert graph["pipeline"] <= {"layout", "cache"}
    assert graph["steps"] <= {"pipeline", "layout"}
    assert "build" not in graph["steps"] | graph["pipeline"] | graph["layout"] | graph["cache"]
    assert not graph["layout"] and not graph["cache"]


def test_dependencies_follow_declared_artifacts() -> None:
    def names(only: list[str]) -> list[str]:
        return [s.name for s in select_steps(STEPS, only) if not s.always]

    assert names(["recovery"]) == ["eeprom", "recovery"]
    assert names(["bootimg"]) == ["initramfs", "bootimg"]
    assert names(["eeprom"]) == ["eeprom"]
    with pytest.raises(UsageError, match="unknown build step"):
        select_steps(STEPS, ["eeprom", "bootim"])


def test_steps_declare_every_artifact_kind_of_the_layout() -> None:
    written = {layout.kind_of(h) for step in STEPS for h in step.writes}
    assert written == {"eeprom.image", "eeprom.sig", "initramfs", "initramfs.provenance",
                       "bootimg.image", "bootimg.sig", "recovery.kit"}
    assert not any(step.writes for step in STEPS if step.always)


def test_a_step_cannot_write_or_read_what_it_does_not_declare(tmp_path: Path, session_keys: Path) -> None:
    recipe = parse_recipe(RECIPE)

    def sneaky(ctx: BuildContext) -> None:
        ctx.put(TWO, b"undeclared")

    with pytest.raises(BuildError, match="does not declare"):
        build(recipe, out_root=tmp_path / "out", keys_dir=session_keys, cache=Cache(tmp_path / "cache"),
              steps=[Step("sneaky", sneaky, writes=(ONE,))])

    def reader(ctx: BuildContext) -> None:
        ctx.get(ONE)

    steps = [Step("make", lambda ctx: ctx.put(ONE, b"1"), writes=(ONE,)), Step("read", reader)]
    with pytest.raises(BuildError, match="reads a/one.bin, which it does not declare"):
        build(recipe, out_root=tmp_path / "out", keys_dir=session_keys, cache=Cache(tmp_path / "cache"),
              steps=steps)
    assert not (tmp_path / "out" / "demo").exists(), "a refused build publishes nothing"


def test_step_cache_index_lives_where_the_cache_layout_says(tmp_path: Path, session_keys: Path) -> None:
    cache = Cache(tmp_path / "cache")
    calls: list[str] = []

    def make(ctx: BuildContext) -> None:
        calls.append("make")
        ctx.put(ONE, b"payload")
        ctx.packages.append({"name": "pkg", "version": "1"})

    steps = [Step("make", make, lambda ctx: {"v": "1"}, writes=(ONE,))]
    first = build(parse_recipe(RECIPE), out_root=tmp_path / "out", keys_dir=session_keys, cache=cache,
                  steps=steps)
    indexes = sorted((cache.root / "steps").iterdir())
    assert len(indexes) == 1
    record = json.loads(indexes[0].read_text())
    digest = hashlib.sha256(b"payload").hexdigest()
    assert record == {"artifacts": [["test.one", "a/one.bin", digest]],
                      "packages": [{"name": "pkg", "version": "1"}]}
    assert cache.step_index(indexes[0].stem) == indexes[0]
    second = build(parse_recipe(RECIPE), out_root=tmp_path / "out", keys_dir=session_keys, cache=cache,
                   steps=steps)
    assert calls == ["make"] and second.cached_steps == ("make",)
    assert second.manifest == first.manifest
    # An index naming a kind the step does not write is a miss, not a foreign artifact.
    indexes[0].write_text(json.dumps({"artifacts": [["test.two", "b/two.txt", digest]], "packages": []}))
    build(parse_recipe(RECIPE), out_root=tmp_path / "out", keys_dir=session_keys, cache=cache, steps=steps)
    assert calls == ["make", "make"]


def test_layout_paths_and_families() -> None:
    assert layout.EEPROM_IMAGE("recovery").rel == "eeprom/recovery/pieeprom.bin"
    assert layout.EEPROM_SIG("enforced").rel == "eeprom/enforced/pieeprom.sig"
    assert layout.EEPROM_IMAGE.variant_of("eeprom/permissive/pieeprom.bin") == "permissive"
    assert layout.EEPROM_IMAGE.variant_of("eeprom/a/b/pieeprom.bin") is None
    assert layout.EEPROM_IMAGE.variant_of("bootimg/boot.img") is None
    assert layout.BOOT_IMG.path(Path("/x")) == Path("/x/bootimg/boot.img")
    assert layout.parts_dir(Path("out"), "virtual") == Path("out/virtual.parts")


def _published(tmp_path: Path, session_keys: Path) -> tuple[Path, dict[str, bytes]]:
    def make(ctx: BuildContext) -> None:
        ctx.put(ONE, b"one")
        ctx.put(TWO, b"two")

    steps = [Step("make", make, writes=(ONE, TWO))]
    result = build(parse_recipe(RECIPE), out_root=tmp_path / "out", keys_dir=session_keys,
                   cache=Cache(tmp_path / "cache"), steps=steps)
    files = {str(p.relative_to(result.out_dir)): p.read_bytes()
             for p in sorted(result.out_dir.rglob("*")) if p.is_file()}
    return result.out_dir, files


def _snapshot(directory: Path) -> dict[str, bytes]:
    return {str(p.relative_to(directory)): p.read_bytes() for p in sorted(directory.rglob("*")) if p.is_file()}


def test_nothing_writes_into_a_published_set(tmp_path: Path, session_keys: Path) -> None:
    out_dir, before = _published(tmp_path, session_keys)
    assert set(before) == {"a/one.bin", "b/two.txt", "manifest.json"}
    real = out_dir.resolve()
    for target in (out_dir / "a/one.bin", out_dir / "new.bin", real / "manifest.json", real / "a" / "x"):
        with pytest.raises(UsageError, match="published artifact set"):
            atomic_write(target, b"overwritten")
    runner = CliRunner()
    result = runner.invoke(main, ["eeprom", "synth", str(out_dir / "a" / "one.bin")])
    assert result.exit_code == 2, result.output
    assert "refusing to write into a published artifact set" in result.output
    assert "Traceback" not in result.output
    assert _snapshot(out_dir) == before
    # Next to the set, and in the set's staging directories, writing is fine.
    atomic_write(layout.parts_dir(tmp_path / "out", "demo") / "a" / "one.bin", b"part")
    assert _snapshot(out_dir) == before


@pytest.mark.slow
def test_initramfs_build_recipe_leaves_the_published_set_alone(virtual_set: VirtualSet,
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    """`fwbuild initramfs build RECIPE` (default --out) next to a published `out/virtual`:
    the set's files and manifest stay byte-identical and still verify."""
    out_dir = virtual_set.out
    monkeypatch.chdir(out_dir.parent.parent)  # so that out/virtual is the published set
    assert Path("out/virtual").resolve() == out_dir.resolve()
    before = _snapshot(out_dir)
    runner = CliRunner()
    result = runner.invoke(main, ["initramfs", "build", str(ROOT / "recipes" / "virtual.toml")])
    assert result.exit_code == 0, result.output
    made = Path("out/virtual.parts/initramfs/initramfs_2712")
    assert made.is_file() and Path(str(made) + ".provenance.json").is_file()
    assert _snapshot(out_dir) == before
    refused = runner.invoke(main, ["initramfs", "build", str(ROOT / "recipes" / "virtual.toml"),
                                   "--out", "out/virtual/initramfs/initramfs_2712"])
    assert refused.exit_code == 2, refused.output
    assert "refusing to write into a published artifact set" in refused.output
    assert _snapshot(out_dir) == before
    checked = runner.invoke(main, ["verify", str(out_dir)])
    assert checked.exit_code == 0, checked.output


_SET_PATH = re.compile(r"(^|[^\w.])(eeprom/(\{|[a-z])|initramfs/initramfs_2712|bootimg/boot\.|recovery/rpi-5-sd-recovery)")


def _string_literals(path: Path) -> list[tuple[int, str]]:
    """The string constants of a module, docstrings left out."""
    tree = ast.parse(path.read_text())
    docs = {id(node.body[0].value) for node in ast.walk(tree)
            if isinstance(node, ast.Module | ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef)
            and node.body and isinstance(node.body[0], ast.Expr) and isinstance(node.body[0].value, ast.Constant)}
    return [(node.lineno, node.value) for node in ast.walk(tree)
            if isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in docs]


def test_only_the_layout_module_spells_the_paths_of_a_published_set() -> None:
    spelled = [f"{path.relative_to(ROOT)}:{line}: {text[:60]!r}"
               for base in ("fwbuild", "server", "bench") for path in sorted((ROOT / base).rglob("*.py"))
               if path.name != "layout.py"
               for line, text in _string_literals(path)
               if _SET_PATH.search(text) or text == layout.MANIFEST]
    assert spelled == [], "use fwbuild.layout: " + "; ".join(spelled)


def test_only_the_cache_module_lays_out_the_cache() -> None:
    from fwbuild import cache as cache_module

    doc = cache_module.__doc__ or ""
    for area in cache_module.AREAS:
        assert re.search(rf"^  {area}/", doc, re.MULTILINE), f"cache area {area}/ is not documented"
    joins = [f"{path.relative_to(ROOT)}:{number}" for base in ("fwbuild", "server", "bench")
             for path in sorted((ROOT / base).rglob("*.py")) if path.name != "cache.py"
             for number, line in enumerate(path.read_text().splitlines(), start=1)
             if re.search(r"cache\.root\s*/", line)]
    assert joins == [], "ask fwbuild.cache.Cache for the path: " + ", ".join(joins)
