"""The run directory's identity: which configuration made its results, and refusing another one's folder.

``run.json`` in a run directory holds the *identity* of the configuration that wrote it: the
resolved configuration without what cannot change a number (the output folders, loader workers,
progress bars, loggers, ``force``) and its key. A run whose identity differs from the one a
folder holds is refused before anything is written there (:func:`claim_run_dir`), with both
configurations named.

Plain Python (no Lightning).
"""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

from regcache.artifacts import artifact_key, canonical, spec_changes
from regcache.utils import write_json

RUN_FILE = "run.json"
RESULTS_FILE = "metrics.json"
# keys that never change a result, wherever they appear in the configuration
IGNORED_KEYS = frozenset(
    {"num_workers", "prefetch_depth", "pin_memory", "multiprocessing_context", "save_every_s", "force"}
)
# dotted paths that never change a result
IGNORED_PATHS = frozenset(
    {
        "config",
        "model.run_dir",
        "model.artifacts_dir",
        "trainer.logger",
        "trainer.default_root_dir",
        "trainer.enable_progress_bar",
        "trainer.enable_model_summary",
    }
)


class RunDirConflict(ValueError):
    """The run directory holds the results of another configuration."""


def run_identity(config: dict[str, Any]) -> dict[str, Any]:
    """The configuration without the fields that cannot change a result (IGNORED_KEYS, IGNORED_PATHS)."""

    def strip(node: Any, path: str) -> Any:
        if isinstance(node, dict):
            out = {}
            for k, v in node.items():
                dotted = f"{path}.{k}" if path else str(k)
                if k in IGNORED_KEYS or dotted in IGNORED_PATHS:
                    continue
                out[k] = strip(v, dotted)
            return out
        if isinstance(node, list):
            return [strip(v, path) for v in node]
        return node

    return canonical(strip(copy.deepcopy(config), ""))


def claim_run_dir(run_dir: str | Path, identity: dict[str, Any]) -> str:
    """Check that ``run_dir`` is free or holds this configuration's results; return the configuration's key.

    Raises :class:`RunDirConflict` naming both configurations (their keys and the fields that differ)
    where it holds another's results (``metrics.json`` beside a ``run.json`` of another key). Writes nothing.
    """
    key = artifact_key(identity)
    path = Path(run_dir) / RUN_FILE
    # a run that stopped before its results leaves nothing to protect (its artifacts are keyed)
    if not path.is_file() or not (Path(run_dir) / RESULTS_FILE).is_file():
        return key
    stored = json.loads(path.read_text())
    if stored.get("key") == key:
        return key
    changes = spec_changes(stored.get("identity", {}), identity)
    shown = "; ".join(f"{f}: {json.dumps(there)} there, {json.dumps(here)} here" for f, there, here in changes[:8])
    more = f" (and {len(changes) - 8} more)" if len(changes) > 8 else ""
    raise RunDirConflict(
        f"run directory {run_dir} holds the results of configuration {stored.get('key')}, this run is "
        f"configuration {key}; they differ in {shown}{more}. Give this run its own --model.run_dir (several "
        "runs can share keyed artifacts with --model.artifacts_dir), or remove that folder to reuse it"
    )


def write_run_identity(run_dir: str | Path, identity: dict[str, Any]) -> Path:
    """Record which configuration the run directory's results belong to (``run.json``)."""
    return write_json(Path(run_dir) / RUN_FILE, {"key": artifact_key(identity), "identity": identity})


__all__ = ["RUN_FILE", "RunDirConflict", "claim_run_dir", "run_identity", "write_run_identity"]
