"""The run record: which configuration, code, weights, kernels and data made a run's numbers.

``run.json`` in a run directory holds the *identity* of the configuration that wrote it: the
resolved configuration without what cannot change a number (the output folders, loader workers,
progress bars, loggers, ``force``) and its key. A run whose identity differs from the one a
folder holds is refused before anything is written there (:func:`claim_run_dir`), with both
configurations named.

:func:`environment_record`, :func:`checkpoint_record` and :func:`device_name` give the rest of the
record metrics.json keeps under ``run_record`` (package versions and git commit, the checkpoint's
sha256, devices).

Plain Python (no Lightning).
"""

from __future__ import annotations

import copy
import functools
import hashlib
import importlib.metadata
import json
import platform
import subprocess
import sys
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


# distributions whose versions decide the numbers (import name → distribution)
PACKAGES = {
    "torch": "torch",
    "open_clip": "open_clip_torch",
    "timm": "timm",
    "lightning": "lightning",
    "regcache": "regcache",
}


def package_versions() -> dict[str, str | None]:
    """Installed versions of torch, open_clip, timm, lightning, regcache (None where not installed) and Python."""
    out: dict[str, str | None] = {}
    for name, dist in PACKAGES.items():
        version = getattr(sys.modules.get(name), "__version__", None)  # torch's carries its CUDA build (+cu130)
        if version is None:
            try:
                version = importlib.metadata.version(dist)
            except importlib.metadata.PackageNotFoundError:
                version = None
        out[name] = None if version is None else str(version)
    out["python"] = platform.python_version()
    return out


@functools.cache
def git_commit() -> dict[str, Any] | None:
    """The commit of regcache's source checkout and whether it had uncommitted changes (None outside git)."""
    root = Path(__file__).resolve().parents[1]
    try:
        commit = subprocess.run(
            ["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10, check=True
        ).stdout.strip()
        status = subprocess.run(
            ["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"],
            capture_output=True,
            text=True,
            timeout=10,
            check=True,
        ).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    return {"commit": commit, "dirty": bool(status.strip())}


@functools.cache
def file_sha256(path: str) -> str:
    """sha256 of a file's bytes (read in 1 MiB blocks)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def checkpoint_record(path: str | None) -> dict[str, Any] | None:
    """The weights file: path, size and sha256 (None for random weights)."""
    if path is None or not Path(path).is_file():
        return None
    return {"path": str(path), "bytes": Path(path).stat().st_size, "sha256": file_sha256(str(path))}


def device_name(device: Any) -> str:
    """A readable name of a torch device: the GPU's model, else the CPU's."""
    import torch

    if getattr(device, "type", None) == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu ({platform.processor() or platform.machine()})"


def environment_record() -> dict[str, Any]:
    """Versions, the source commit and the command line (the part of the run record that is the process's)."""
    return {"versions": package_versions(), "git": git_commit(), "argv": list(sys.argv)}


__all__ = [
    "PACKAGES",
    "RUN_FILE",
    "RunDirConflict",
    "checkpoint_record",
    "claim_run_dir",
    "device_name",
    "environment_record",
    "file_sha256",
    "git_commit",
    "package_versions",
    "run_identity",
    "write_run_identity",
]
