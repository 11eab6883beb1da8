"""The staged package tree: the union of the data trees of several extracted .debs.

Nothing here looks at the host's `/`: paths are resolved inside the union with
chroot semantics (absolute symlink targets start at the staged root, `..` at
the root stays there), so `/lib -> usr/lib` style links (usr-merge) and
library symlink chains resolve exactly as on the target.
"""

from __future__ import annotations

import posixpath
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from ..errors import BuildError
from .deb import DebContents

_MAX_LINKS = 40


@dataclass(frozen=True)
class StagedNode:
    package: str
    kind: str          # f, d, l, h (hard link), c, b, p
    mode: int
    target: str = ""   # symlink target / hard-link source
    host: Path | None = None  # for regular files: where the bytes are on the host


class StagedTree:
    """Read-only view of the union; the first package to ship a path wins (sorted input)."""

    def __init__(self) -> None:
        self.nodes: dict[str, StagedNode] = {"": StagedNode("", "d", 0o755)}

    @classmethod
    def from_packages(cls, packages: Iterable[tuple[DebContents, Path]]) -> StagedTree:
        """`packages`: (contents, staged root dir) pairs, in a deterministic order."""
        tree = cls()
        for contents, root in packages:
            tree.add_package(contents, root)
        return tree

    def add_package(self, contents: DebContents, root: Path) -> None:
        name = contents.package
        for member in contents.members:
            if member.path in self.nodes and (member.kind == "d" or
                                              self.nodes[member.path].kind != "d"):
                continue
            parts = member.path.split("/")
            for depth in range(1, len(parts)):  # tar members may omit their parents
                self.nodes.setdefault("/".join(parts[:depth]), StagedNode(name, "d", 0o755))
            host = root / member.path if member.kind == "f" else None
            self.nodes[member.path] = StagedNode(name, member.kind, member.mode, member.target, host)

    def owner(self, path: str) -> str:
        node = self.nodes.get(path.strip("/"))
        return node.package if node else "?"

    def resolve(self, path: str, follow_last: bool = True) -> tuple[str, list[str]]:
        """Resolve symlinks in `path`; return (real path, symlink paths traversed).

        Raises KeyError(path) when a component does not exist.
        """
        links: list[str] = []
        pending = [part for part in path.split("/") if part not in ("", ".")]
        current: list[str] = []
        hops = 0
        while pending:
            part = pending.pop(0)
            if part == "..":
                if current:
                    current.pop()
                continue
            candidate = "/".join([*current, part])
            node = self.nodes.get(candidate)
            if node is None:
                raise KeyError(candidate)
            if node.kind == "h":
                node = self.nodes.get(node.target, node)
            if node.kind == "l" and (pending or follow_last):
                hops += 1
                if hops > _MAX_LINKS:
                    raise BuildError(f"too many levels of symbolic links in {path}")
                links.append(candidate)
                target = node.target
                if target.startswith("/"):
                    current = []
                pending = [p for p in target.split("/") if p not in ("", ".")] + pending
                continue
            current.append(part)
        return "/".join(current), links

    def lookup(self, path: str) -> StagedNode | None:
        """The node for a resolved path (hard links followed to their source)."""
        node = self.nodes.get(path.strip("/"))
        if node is not None and node.kind == "h":
            return self.nodes.get(node.target)
        return node

    def host_path(self, real: str) -> Path:
        node = self.lookup(real)
        if node is None or node.kind != "f" or node.host is None:
            raise BuildError(f"/{real} is not a regular file in the staged packages")
        return node.host

    def glob_dir(self, directory: str) -> list[str]:
        """Paths directly below `directory` (resolved), sorted."""
        real, _ = self.resolve(directory)
        prefix = f"{real}/" if real else ""
        return sorted(p for p in self.nodes
                      if p.startswith(prefix) and p and "/" not in p[len(prefix):])

    def parent(self, path: str) -> str:
        return posixpath.dirname(path.strip("/"))
