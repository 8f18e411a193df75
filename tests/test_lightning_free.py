"""The library works without Lightning: only the LightningModule / CLI modules import it, callbacks or datamodules."""

from __future__ import annotations

import ast
import subprocess
import sys
import textwrap
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# the Lightning layer inside the package: the LightningModule, the CLIs (`regcache submit` parses a configuration
# as `regcache validate` does) and the import shim they share
LIGHTNING_MODULES = {"regcache.module", "regcache.lightning_cli", "regcache.slurm", "regcache._lightning"}
ORCHESTRATION = ("lightning", "pytorch_lightning", "callbacks", "datamodules")


def _library_modules() -> list[str]:
    names = []
    for path in sorted((ROOT / "regcache").rglob("*.py")):
        parts = path.relative_to(ROOT).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        if name not in LIGHTNING_MODULES and not name.startswith("regcache.assets"):
            names.append(name)
    return names


def test_no_library_module_imports_lightning_callbacks_or_datamodules_anywhere_in_its_source():
    """Every import statement, lazy ones inside functions included (an import test alone cannot see those)."""
    offenders = []
    for name in _library_modules():
        path = ROOT / Path(*name.split("."))
        path = path / "__init__.py" if path.is_dir() else path.with_suffix(".py")
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                targets = [node.module]
            else:
                continue
            offenders += [f"{name}: {t}" for t in targets if t.split(".")[0] in ORCHESTRATION]
            if isinstance(node, ast.ImportFrom) and node.module == "regcache":
                offenders += [
                    f"{name}: regcache.{a.name}" for a in node.names if f"regcache.{a.name}" in LIGHTNING_MODULES
                ]
            offenders += [f"{name}: {t}" for t in targets if t in LIGHTNING_MODULES]
    assert not offenders, offenders


def test_the_library_imports_and_quantizes_with_lightning_unimportable():
    script = textwrap.dedent(
        f"""
        import importlib, sys

        class Block:
            def find_spec(self, name, path=None, target=None):
                if name.split(".")[0] in {ORCHESTRATION!r}:
                    raise ImportError(f"{{name}} is blocked: the library must not need it")
                return None

        sys.meta_path.insert(0, Block())
        for name in {_library_modules()!r}:
            importlib.import_module(name)
        import torch
        import regcache as rc
        encoder = rc.adapt(rc.load_model("regcache-tiny-vit").model)
        rc.quantize_(encoder, rc.NaiveConfig(6, 6))
        rc.calibrate_(encoder, [torch.randn(2, 3, 64, 64)], progress=False)
        assert encoder(torch.randn(1, 3, 64, 64)).isfinite().all()
        assert not any(m.split(".")[0] in {ORCHESTRATION!r} for m in sys.modules), "imported anyway"
        print("ok")
        """
    )
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert proc.returncode == 0 and proc.stdout.strip().endswith("ok"), proc.stderr[-3000:]
