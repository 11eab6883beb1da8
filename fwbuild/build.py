"""`fwbuild build`: run the steps (fwbuild.steps) with the engine (fwbuild.pipeline), then publish.

Outputs go to a private staging directory `out/.builds/<recipe>/.tmp-<pid>-*`;
`manifest.json` is written last; publishing renames it to `out/.builds/<recipe>/<digest>`
and swaps the `out/<recipe>` symlink to it with one `os.replace`, so an interrupted
build never leaves a half-written `out/<recipe>`. The publish step is the only writer
of `out/.builds` (fwbuild.layout).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from . import __version__
from .cache import Cache
from .fsutil import atomic_write
from .keys import KeyPaths
from .layout import MANIFEST, STAGING_PREFIX, builds_dir, set_dir
from .pipeline import BuildContext, Step, run_steps, select_steps
from .progress import Progress
from .recipe import Recipe
from .sign import source_date_epoch
from .steps import STEPS


def manifest_bytes(ctx: BuildContext, steps: Sequence[Step] = ()) -> bytes:
    recipe = ctx.recipe
    manifest: dict[str, Any] = {
        "fwbuild_version": __version__,
        "recipe": {"name": recipe.name, "target": recipe.info.target, "sha256": recipe.digest},
        "source_date_epoch": ctx.epoch,
        "sources": {name: {"sha256": s.sha256, "url": s.url or None, "path": s.path or None}
                    for name, s in sorted(recipe.sources.items())},
        "packages": sorted(ctx.packages, key=lambda p: (p.get("name", ""), p.get("version", ""))),
        "artifacts": {artifact.rel: {"sha256": hashlib.sha256(data).hexdigest(), "size": len(data)}
                      for artifact, data in sorted(ctx.artifacts.items(), key=lambda item: item[0].rel)},
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
    for stale in builds.glob(f"{STAGING_PREFIX}*"):
        try:
            pid = int(stale.name.split("-")[1])
        except (ValueError, IndexError):
            continue
        if not _pid_alive(pid):
            shutil.rmtree(stale, ignore_errors=True)


def publish(stage: Path, out_root: Path, name: str, digest: str) -> Path:
    """Make `out_root/name` point at the staged build, atomically; drop older builds of `name`.

    Builds live in `layout.builds_dir` (`out_root/.builds/<name>/<digest>`): one folder per
    recipe, so no other recipe's builds are ever touched.
    """
    builds = stage.parent
    final = builds / digest[:16]
    if final.exists():
        shutil.rmtree(stage)
    else:
        os.rename(stage, final)
    link = set_dir(out_root, name)
    if link.is_dir() and not link.is_symlink():
        os.rename(link, builds / f"previous-{os.getpid()}")
    tmp_link = out_root / f".{name}.link-{os.getpid()}"
    tmp_link.unlink(missing_ok=True)
    os.symlink(os.path.relpath(final, out_root), tmp_link)
    os.replace(tmp_link, link)
    for old in builds.iterdir():
        if old != final and not old.name.startswith(STAGING_PREFIX) and old.is_dir():
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
    pipeline = list(steps if steps is not None else STEPS)
    if only:
        pipeline = select_steps(pipeline, only)
    cache = cache or Cache.default()
    builds = builds_dir(out_root, recipe.name)
    builds.mkdir(parents=True, exist_ok=True)
    _clean_stale(builds)
    stage = Path(tempfile.mkdtemp(prefix=f"{STAGING_PREFIX}{os.getpid()}-", dir=builds))
    os.chmod(stage, 0o755)  # published artifacts are public; a server may run as another user
    ctx = BuildContext(recipe=recipe, stage=stage, cache=cache,
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
