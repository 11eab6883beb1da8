"""The build pipeline: a flat list of named steps over one context, then an atomic publish.

Every step declares its inputs (digests) before it runs; a step whose inputs were
seen before takes its outputs from the step cache (blobs in the content-addressed
cache, an index file per input digest). Outputs go to a private staging directory;
`manifest.json` is written last; publishing swaps the `out/<recipe>` symlink to the
new complete directory with one `os.replace`, so an interrupted build never leaves a
half-written `out/<recipe>`.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from . import __version__
from .errors import BuildError, UsageError
from .fsutil import atomic_write
from .keys import KeyPaths
from .progress import Progress, step_event
from .recipe import Recipe
from .sign import source_date_epoch
from .sources import Cache

MANIFEST = "manifest.json"
BUILDS_DIR = ".builds"


@dataclass
class BuildContext:
    recipe: Recipe
    out_root: Path
    stage: Path
    cache: Cache
    keys: KeyPaths
    epoch: int
    offline: bool = False
    progress: Progress | None = None
    sources: dict[str, Path] = field(default_factory=dict)
    artifacts: dict[str, bytes] = field(default_factory=dict)
    packages: list[dict[str, str]] = field(default_factory=list)
    cached_steps: list[str] = field(default_factory=list)
    selected: tuple[str, ...] = ()
    scratch: dict[str, Any] = field(default_factory=dict)

    def add_artifact(self, relpath: str, data: bytes) -> None:
        if relpath in self.artifacts:
            raise BuildError(f"two steps produce {relpath}")
        self.artifacts[relpath] = data
        atomic_write(self.stage / relpath, data)


@dataclass(frozen=True)
class Step:
    """`inputs(ctx)` returns the digests the outputs depend on (None: never cache);
    `run(ctx)` adds artifacts (and may fill ctx.packages / ctx.scratch).
    `needs` names the steps whose artifacts it reads; `always` steps (checks, fetches)
    run in every build, partial or not, and are not listed in the manifest."""

    name: str
    run: Callable[[BuildContext], None]
    inputs: Callable[[BuildContext], Mapping[str, str] | None] = lambda ctx: None
    needs: tuple[str, ...] = ()
    always: bool = False


def select_steps(steps: Sequence[Step], only: Sequence[str]) -> list[Step]:
    """The steps of a partial build: the `only` ones, what they need, and the `always` ones."""
    by_name = {step.name: step for step in steps}
    choices = [step.name for step in steps if not step.always]
    wanted: set[str] = set()
    pending = list(only)
    while pending:
        name = pending.pop()
        if name not in choices:
            import difflib

            near = difflib.get_close_matches(name, choices, n=1)
            raise UsageError(f"unknown build step {name!r}", "--only",
                             (f"did you mean `{near[0]}`? " if near else "")
                             + f"the steps are {', '.join(choices)}")
        if name not in wanted:
            wanted.add(name)
            pending.extend(by_name[name].needs)
    return [step for step in steps if step.always or step.name in wanted]


def code_digest() -> str:
    """Digest of fwbuild's own source: a code change invalidates the step cache."""
    root = Path(__file__).parent
    digest = hashlib.sha256(__version__.encode())
    for path in sorted(root.rglob("*")):
        if path.is_file() and path.suffix in (".py", ".j2", ".txt", ".sh"):
            digest.update(str(path.relative_to(root)).encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()


def _step_key(step: Step, inputs: Mapping[str, str], code: str) -> str:
    blob = json.dumps({"step": step.name, "code": code, "inputs": dict(inputs)}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()


def _restore(ctx: BuildContext, key: str) -> bool:
    index = ctx.cache.root / "steps" / f"{key}.json"
    try:
        record = json.loads(index.read_text())
        blobs = {rel: (digest, ctx.cache.lookup(digest)) for rel, digest in record["artifacts"].items()}
        packages, scratch = list(record.get("packages", [])), dict(record.get("scratch", {}))
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return False  # a damaged index is a cache miss
    restored: dict[str, bytes] = {}
    for rel, (digest, path) in sorted(blobs.items()):
        data = path.read_bytes() if path is not None else b""
        if path is None or hashlib.sha256(data).hexdigest() != digest:
            return False  # a missing or altered blob is a cache miss
        restored[rel] = data
    for rel, data in restored.items():
        ctx.add_artifact(rel, data)
    ctx.packages.extend(packages)
    ctx.scratch.update(scratch)
    return True


def _remember(ctx: BuildContext, key: str, produced: list[str], packages_before: int,
              scratch_before: set[str]) -> None:
    record = {
        "artifacts": {rel: ctx.cache.store_bytes(ctx.artifacts[rel])[0] for rel in produced},
        "packages": ctx.packages[packages_before:],
        "scratch": {k: v for k, v in ctx.scratch.items() if k not in scratch_before and _jsonable(v)},
    }
    atomic_write(ctx.cache.root / "steps" / f"{key}.json", json.dumps(record, sort_keys=True).encode())


def _jsonable(value: Any) -> bool:
    try:
        json.dumps(value)
    except TypeError:
        return False
    return True


def run_steps(ctx: BuildContext, steps: list[Step]) -> None:
    code = code_digest()
    ctx.selected = tuple(step.name for step in steps)
    for number, step in enumerate(steps, start=1):
        started = time.monotonic()
        step_event(ctx.progress, step.name, "started", number, len(steps))
        inputs = step.inputs(ctx)
        key = _step_key(step, inputs, code) if inputs is not None else None
        if key and _restore(ctx, key):
            ctx.cached_steps.append(step.name)
            step_event(ctx.progress, step.name, "cached", number, len(steps), time.monotonic() - started)
            continue
        before = set(ctx.artifacts)
        packages_before = len(ctx.packages)
        scratch_before = set(ctx.scratch)
        step.run(ctx)
        if key:
            produced = sorted(set(ctx.artifacts) - before)
            _remember(ctx, key, produced, packages_before, scratch_before)
        step_event(ctx.progress, step.name, "done" if step.always else "built", number, len(steps),
                   time.monotonic() - started)


def manifest_bytes(ctx: BuildContext, steps: Sequence[Step] = ()) -> bytes:
    recipe = ctx.recipe
    manifest: dict[str, Any] = {
        "fwbuild_version": __version__,
        "recipe": {"name": recipe.name, "target": recipe.info.target, "sha256": recipe.digest},
        "source_date_epoch": ctx.epoch,
        "sources": {name: {"sha256": s.sha256, "url": s.url or None, "path": s.path or None}
                    for name, s in sorted(recipe.sources.items())},
        "packages": sorted(ctx.packages, key=lambda p: (p.get("name", ""), p.get("version", ""))),
        "artifacts": {rel: {"sha256": hashlib.sha256(data).hexdigest(), "size": len(data)}
                      for rel, data in sorted(ctx.artifacts.items())},
    }
    built = [step.name for step in steps if not step.always]
    if built:
        manifest["steps"] = built
    return (json.dumps(manifest, indent=2, sort_keys=True) + "\n").encode()


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _clean_stale(builds: Path) -> None:
    """Remove staging directories of builds of this recipe that were killed."""
    for stale in builds.glob(".tmp-*"):
        try:
            pid = int(stale.name.split("-")[1])
        except (ValueError, IndexError):
            continue
        if not _pid_alive(pid):
            shutil.rmtree(stale, ignore_errors=True)


def publish(stage: Path, out_root: Path, name: str, digest: str) -> Path:
    """Make `out_root/name` point at the staged build, atomically; drop older builds of `name`.

    Builds live in `out_root/.builds/<name>/<digest>`: one folder per recipe, so no other
    recipe's builds are ever touched.
    """
    builds = stage.parent
    final = builds / digest[:16]
    if final.exists():
        shutil.rmtree(stage)
    else:
        os.rename(stage, final)
    link = out_root / name
    if link.is_dir() and not link.is_symlink():
        os.rename(link, builds / f"previous-{os.getpid()}")
    tmp_link = out_root / f".{name}.link-{os.getpid()}"
    tmp_link.unlink(missing_ok=True)
    os.symlink(os.path.relpath(final, out_root), tmp_link)
    os.replace(tmp_link, link)
    for old in builds.iterdir():
        if old != final and not old.name.startswith(".tmp-") and old.is_dir():
            shutil.rmtree(old, ignore_errors=True)
    return link


@dataclass(frozen=True)
class BuildResult:
    out_dir: Path
    manifest: Mapping[str, Any]
    cached_steps: tuple[str, ...]
    steps: tuple[str, ...] = ()


def build(recipe: Recipe, *, out_root: Path, keys_dir: Path, cache: Cache | None = None,
          offline: bool = False, progress: Progress | None = None,
          steps: list[Step] | None = None, only: Sequence[str] = ()) -> BuildResult:
    """Run the pipeline for `recipe` and publish `out_root/<recipe name>`.

    `only` names the steps of a partial build (plus what they need); the manifest's
    `steps` lists the steps the set was built with.
    """
    from .steps import STEPS  # the steps import the artifact modules; keep this module light

    pipeline = list(steps if steps is not None else STEPS)
    if only:
        pipeline = select_steps(pipeline, only)
    cache = cache or Cache.default()
    builds = out_root / BUILDS_DIR / recipe.name
    builds.mkdir(parents=True, exist_ok=True)
    _clean_stale(builds)
    stage = Path(tempfile.mkdtemp(prefix=f".tmp-{os.getpid()}-", dir=builds))
    os.chmod(stage, 0o755)  # published artifacts are public; a server may run as another user
    ctx = BuildContext(recipe=recipe, out_root=out_root, stage=stage, cache=cache,
                       keys=KeyPaths(keys_dir), epoch=source_date_epoch(recipe.info.source_date_epoch),
                       offline=offline, progress=progress)
    try:
        run_steps(ctx, pipeline)
        manifest = manifest_bytes(ctx, pipeline)
        atomic_write(stage / MANIFEST, manifest)
        out_dir = publish(stage, out_root, recipe.name, hashlib.sha256(manifest).hexdigest())
    except BaseException:
        shutil.rmtree(stage, ignore_errors=True)
        raise
    return BuildResult(out_dir, json.loads(manifest), tuple(ctx.cached_steps),
                       tuple(step.name for step in pipeline if not step.always))
