"""Artifacts keyed by exactly what they depend on.

A run's reusable artifacts (the register search with its candidates and caches, the calibration
state) live in ``<root>/<kind>/<key>/`` where ``key`` is a hash of the artifact's *spec*: its real
inputs (model and weights fingerprint, method config, bits, RegCache settings, the calibration /
reference data selection, the kernel settings), never timings or output paths. The spec is
stored beside the artifact as ``spec.json``; an artifact is reused only where the stored spec
equals the requested one exactly, and a reuse is logged. Another spec gets another key and so
another folder beside the old one; ``force`` recomputes in place.

Plain Python (no Lightning): the callbacks and ``regcache demo`` use it alike.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from regcache.utils import write_json

log = logging.getLogger(__name__)

SPEC_FILE = "spec.json"


def canonical(spec: Any) -> Any:
    """``spec`` as plain JSON values (tuples as lists, paths and dtypes as strings), as stored in spec.json."""
    return json.loads(json.dumps(spec, sort_keys=True, default=str))


def artifact_key(spec: Any) -> str:
    """The 16-hex-digit key of a spec: a sha256 of its canonical JSON."""
    text = json.dumps(canonical(spec), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def spec_changes(a: Any, b: Any, prefix: str = "") -> list[tuple[str, Any, Any]]:
    """``(dotted name, value in a, value in b)`` where two specs differ (mappings key by key, equal-length lists
    item by item; a missing key reads ``"(unset)"``)."""
    if isinstance(a, dict) and isinstance(b, dict):
        out = []
        for k in sorted(set(a) | set(b), key=str):
            out += spec_changes(a.get(k, "(unset)"), b.get(k, "(unset)"), f"{prefix}.{k}" if prefix else str(k))
        return out
    if isinstance(a, list) and isinstance(b, list) and len(a) == len(b):
        return [c for i, (x, y) in enumerate(zip(a, b, strict=True)) for c in spec_changes(x, y, f"{prefix}[{i}]")]
    return [] if a == b else [(prefix, a, b)]


def spec_diff(a: dict[str, Any], b: dict[str, Any]) -> list[str]:
    """Dotted names of the fields where two specs differ (see :func:`spec_changes`)."""
    return [name for name, _, _ in spec_changes(a, b)]


@dataclass
class Artifact:
    """One keyed artifact folder: ``reused`` when a complete artifact of exactly this spec was found."""

    kind: str
    key: str
    spec: dict[str, Any]
    dir: Path
    reused: bool

    def path(self, name: str) -> Path:
        """A file of the artifact."""
        return self.dir / name

    def commit(self) -> None:
        """Write the spec beside the artifact's files (call once they are written)."""
        write_json(self.dir / SPEC_FILE, self.spec)

    def record(self) -> dict[str, Any]:
        """What the run record (metrics.json ``artifacts``) says about it."""
        return {"kind": self.kind, "key": self.key, "reused": self.reused, "dir": str(self.dir)}


class ArtifactStore:
    """Keyed artifacts under ``root`` (``<root>/<kind>/<key>/``); remembers which ones a run used or created.

    Args:
        root: the folder holding the artifacts (a run directory, or one shared by several runs:
            keys keep them apart).
        force: recompute every artifact even where one of the same spec exists.
    """

    def __init__(self, root: str | Path, force: bool = False) -> None:
        self.root = Path(root)
        self.force = force
        self.used: dict[str, Artifact] = {}

    def open(self, kind: str, spec: dict[str, Any], complete: str, force: bool = False) -> Artifact:
        """The artifact of ``spec``: ``reused`` where its folder holds ``complete`` and the same stored spec."""
        spec = canonical(spec)
        key = artifact_key(spec)
        folder = self.root / kind / key
        stored = self._stored_spec(folder)
        reused = not (self.force or force) and stored == spec and (folder / complete).is_file()
        if reused:
            log.info("reusing %s %s from %s", kind.replace("_", " "), key, folder)
        elif stored is not None and stored != spec:  # a sha256 prefix collision: never read it as ours
            raise RuntimeError(f"{folder} holds another spec under the same key; remove the folder")
        artifact = Artifact(kind, key, spec, folder, reused)
        self.used[f"{kind}/{key}"] = artifact
        return artifact

    def adopt(self, artifact: Artifact) -> Artifact:
        """Use an existing artifact found by :meth:`candidates` (logged and recorded as reused)."""
        log.info("reusing %s %s from %s", artifact.kind.replace("_", " "), artifact.key, artifact.dir)
        found = Artifact(artifact.kind, artifact.key, artifact.spec, artifact.dir, True)
        self.used[f"{found.kind}/{found.key}"] = found
        return found

    def forget(self, artifact: Artifact) -> None:
        """Drop an opened artifact from the run's record (it was superseded by one it adopts)."""
        self.used.pop(f"{artifact.kind}/{artifact.key}", None)

    def candidates(self, kind: str, complete: str, accept: Callable[[dict[str, Any]], bool]) -> Iterator[Artifact]:
        """Complete stored artifacts of ``kind`` whose spec ``accept`` takes (none when forcing)."""
        if self.force or not (self.root / kind).is_dir():
            return
        for folder in sorted((self.root / kind).iterdir()):
            spec = self._stored_spec(folder)
            if spec is not None and (folder / complete).is_file() and accept(spec):
                yield Artifact(kind, folder.name, spec, folder, True)

    def records(self) -> list[dict[str, Any]]:
        """Every artifact the run used or created, in order."""
        return [a.record() for a in self.used.values()]

    @staticmethod
    def _stored_spec(folder: Path) -> dict[str, Any] | None:
        try:
            return json.loads((folder / SPEC_FILE).read_text())
        except (OSError, ValueError):
            return None


__all__ = ["Artifact", "ArtifactStore", "artifact_key", "canonical", "spec_changes", "spec_diff"]
