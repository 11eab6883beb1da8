"""The pipeline engine: build context, step, step cache and runner. It knows no step.

A `Step` declares the artifacts it reads and writes by typed handles (fwbuild.layout:
`Artifact`, or a `Family` with one file per EEPROM variant), never by string keys. The
runner enforces the declaration: a step can only `ctx.put` what it writes and `ctx.get`
what it reads (or wrote itself); the dependencies of a partial build follow from it.

A step's `inputs(ctx)` returns the digests its outputs depend on (None: never cached);
a step whose inputs were seen before takes its outputs from the step cache: an index per
key (`Cache.step_index`) naming content-addressed blobs, checked when restored.
The steps themselves are in fwbuild.steps; fwbuild.build runs them and publishes.
"""

from __future__ import annotations

import difflib
import hashlib
import json
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from . import __version__
from .cache import Cache
from .errors import BuildError, UsageError
from .fsutil import atomic_write
from .keys import KeyPaths
from .layout import Artifact, Handle, kind_of
from .progress import Progress, step_event
from .recipe import Recipe


@dataclass
class BuildContext:
    """What the steps of one build share: the recipe, where to stage, the cache, the keys,
    the fetched sources, the packages pinned so far and the artifacts made so far."""

    recipe: Recipe
    stage: Path
    cache: Cache
    keys: KeyPaths
    epoch: int
    offline: bool = False
    progress: Progress | None = None
    sources: dict[str, Path] = field(default_factory=dict)
    packages: list[dict[str, str]] = field(default_factory=list)
    cached_steps: list[str] = field(default_factory=list)
    selected: tuple[str, ...] = ()
    _artifacts: dict[Artifact, bytes] = field(default_factory=dict)
    _step: Step | None = None

    @property
    def artifacts(self) -> Mapping[Artifact, bytes]:
        """Every artifact made so far (read-only: steps `put` and `get`)."""
        return dict(self._artifacts)

    def put(self, artifact: Artifact, data: bytes) -> None:
        """Add `artifact` to the set being staged (the running step must declare it written)."""
        step = self._step
        if step is not None and artifact.kind not in step.write_kinds:
            raise BuildError(f"step {step.name} writes {artifact.rel}, which it does not declare",
                             hint="add its handle to the step's `writes`")
        if artifact in self._artifacts or any(a.rel == artifact.rel for a in self._artifacts):
            raise BuildError(f"two steps produce {artifact.rel}")
        self._artifacts[artifact] = data
        atomic_write(artifact.path(self.stage), data)

    def get(self, artifact: Artifact) -> bytes:
        """An artifact an earlier step made (the running step must declare it read)."""
        step = self._step
        if step is not None and artifact.kind not in step.read_kinds | step.write_kinds:
            raise BuildError(f"step {step.name} reads {artifact.rel}, which it does not declare",
                             hint="add its handle to the step's `reads`")
        try:
            return self._artifacts[artifact]
        except KeyError:
            raise BuildError(f"{artifact.rel} was not built before step "
                             f"{step.name if step else '?'} needed it") from None


def _never(ctx: BuildContext) -> Mapping[str, str] | None:
    return None


@dataclass(frozen=True)
class Step:
    """`run(ctx)` puts the artifacts of `writes` (and may add to ctx.packages);
    `inputs(ctx)` names what they depend on (None: not cached); `reads` are the handles of
    the earlier artifacts it uses. `always` steps (checks, fetches) run in every build,
    partial or not, write nothing and are not listed in the manifest."""

    name: str
    run: Callable[[BuildContext], None]
    inputs: Callable[[BuildContext], Mapping[str, str] | None] = _never
    reads: tuple[Handle, ...] = ()
    writes: tuple[Handle, ...] = ()
    always: bool = False

    @property
    def read_kinds(self) -> frozenset[str]:
        return frozenset(kind_of(h) for h in self.reads)

    @property
    def write_kinds(self) -> frozenset[str]:
        return frozenset(kind_of(h) for h in self.writes)


def needs(step: Step, steps: Sequence[Step]) -> list[str]:
    """The steps that write what `step` reads."""
    return [other.name for other in steps if other is not step and other.write_kinds & step.read_kinds]


def select_steps(steps: Sequence[Step], only: Sequence[str]) -> list[Step]:
    """The steps of a partial build: the `only` ones, those they read from, and the `always` ones."""
    by_name = {step.name: step for step in steps}
    choices = [step.name for step in steps if not step.always]
    wanted: set[str] = set()
    pending = list(only)
    while pending:
        name = pending.pop()
        if name not in choices:
            near = difflib.get_close_matches(name, choices, n=1)
            raise UsageError(f"unknown build step {name!r}", "--only",
                             (f"did you mean `{near[0]}`? " if near else "")
                             + f"the steps are {', '.join(choices)}")
        if name not in wanted:
            wanted.add(name)
            pending.extend(needs(by_name[name], steps))
    return [step for step in steps if step.always or step.name in wanted]


def code_digest() -> str:
    """Digest of fwbuild's own source: a code change invalidates the step cache."""
    root = Path(__file__).parent
    digest = hashlib.sha256(__version__.encode())
    for path in sorted(root.rglob("*")):
        if path.is_file() and path.suffix in (".py", ".j2", ".txt", ".sh"):
            digest.update(str(path.relative_to(root)).encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()


class StepCache:
    """A step's outputs by key: `Cache.step_index(key)` lists {path: blob digest} and packages."""

    def __init__(self, cache: Cache, code: str) -> None:
        self.cache = cache
        self.code = code

    def key(self, step: Step, inputs: Mapping[str, str]) -> str:
        blob = json.dumps({"step": step.name, "code": self.code, "inputs": dict(inputs)}, sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()

    def restore(self, ctx: BuildContext, step: Step, key: str) -> bool:
        """Put the outputs recorded under `key`; False (a miss) when any part is gone or altered."""
        try:
            record = json.loads(self.cache.step_index(key).read_text())
            entries = [(Artifact(str(kind), str(rel)), str(digest))
                       for kind, rel, digest in record["artifacts"]]
            packages = [{str(k): str(v) for k, v in p.items()} for p in record.get("packages", [])]
        except (OSError, ValueError, KeyError, TypeError, AttributeError):
            return False  # a damaged or old-format index is a cache miss
        if any(artifact.kind not in step.write_kinds for artifact, _ in entries):
            return False  # recorded by a step that wrote other kinds: not this step's outputs
        restored: list[tuple[Artifact, bytes]] = []
        for artifact, digest in sorted(entries):
            path = self.cache.lookup(digest)
            data = path.read_bytes() if path is not None else b""
            if path is None or hashlib.sha256(data).hexdigest() != digest:
                return False  # a missing or altered blob is a cache miss
            restored.append((artifact, data))
        for artifact, data in restored:
            ctx.put(artifact, data)
        ctx.packages.extend(packages)
        return True

    def remember(self, ctx: BuildContext, key: str, produced: Sequence[Artifact],
                 packages: Sequence[dict[str, str]]) -> None:
        record = {
            "artifacts": [[a.kind, a.rel, self.cache.store_bytes(ctx.get(a))[0]] for a in produced],
            "packages": list(packages),
        }
        atomic_write(self.cache.step_index(key), json.dumps(record, sort_keys=True).encode())


def run_steps(ctx: BuildContext, steps: Sequence[Step]) -> None:
    """Run `steps` in order, each from the step cache when its inputs were seen before."""
    step_cache = StepCache(ctx.cache, code_digest())
    ctx.selected = tuple(step.name for step in steps)
    for number, step in enumerate(steps, start=1):
        started = time.monotonic()
        step_event(ctx.progress, step.name, "started", number, len(steps))
        ctx._step = step
        try:
            inputs = step.inputs(ctx)
            key = step_cache.key(step, inputs) if inputs is not None else None
            if key and step_cache.restore(ctx, step, key):
                ctx.cached_steps.append(step.name)
                step_event(ctx.progress, step.name, "cached", number, len(steps), time.monotonic() - started)
                continue
            before = set(ctx._artifacts)
            packages_before = len(ctx.packages)
            step.run(ctx)
            if key:
                produced = sorted(set(ctx._artifacts) - before)
                step_cache.remember(ctx, key, produced, ctx.packages[packages_before:])
        finally:
            ctx._step = None
        step_event(ctx.progress, step.name, "done" if step.always else "built", number, len(steps),
                   time.monotonic() - started)
