"""Calibration before validation: rank 0 calibrates (or loads a saved state), every rank gets the same state."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from regcache._lightning import pl
from regcache.artifacts import Artifact, canonical, spec_diff
from regcache.quant import calibrate_
from regcache.quant.state import apply_quant_state, quant_state, read_quant_state, write_quant_state

log = logging.getLogger(__name__)

STATE_FILE = "state.safetensors"
# the installed RegCache configuration, as far as the calibration depends on it (the key's field names)
REGCACHE_POINT = ("l_q", "l_start", "tau", "k_delete", "register", "mode", "prefix_only_at_lq", "search_key")


def point_spec(point: Any, search_key: str | None) -> dict[str, Any]:
    """The installed :class:`~regcache.registers.SearchPoint` as the calibration key sees it, and its search's key."""
    values = (point.l_q, point.l_start, point.tau, point.delete_k, point.register, point.mode)
    return dict(zip(REGCACHE_POINT, (*values, point.prefix_only_at is not None, search_key), strict=True))


class Calibration(pl.Callback):
    """Calibrate the module's PTQ method on the datamodule's calibration split, once.

    The state is computed on rank 0 and broadcast (calibration data and any search randomness
    then cannot make ranks disagree), saved as an artifact keyed by what it depends on
    (:meth:`spec`: model and weights fingerprint, method config and bits, the installed RegCache
    configuration and its search's key, the calibration selection) in
    ``<artifacts_dir>/calibration/<key>/state.safetensors``, and reloaded by later runs of the same
    key unless ``force``. ``state_path`` names the file instead; its spec is kept beside it
    (``<state_path>.spec.json``) and a file of another spec is an error. Runs after
    :class:`~callbacks.register_search.RegisterSearch` in the callback list, so the registers are
    installed before calibration sees the activations.
    """

    def __init__(self, state_path: str | None = None, force: bool = False) -> None:
        self.state_path = state_path
        self.force = force
        self.loaded_from: str | None = None
        self.done = False

    def spec(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> dict[str, Any]:
        """Everything the calibrated state depends on (the artifact key's input)."""
        point = getattr(pl_module, "regcache_point", None)
        search_key = (pl_module.results.get("regcache") or {}).get("search_key")
        datamodule = trainer.datamodule
        return {
            "model": pl_module.model_spec(),
            "method": pl_module.quant_config.to_dict(),
            "regcache": None if point is None else point_spec(point, search_key),
            "calibration": datamodule.calib_selection() if hasattr(datamodule, "calib_selection") else None,
        }

    def _artifact(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> Artifact:
        spec = self.spec(trainer, pl_module)
        if self.state_path is None:
            return pl_module.artifacts.open("calibration", spec, complete=STATE_FILE, force=self.force)
        path = Path(self.state_path)
        sidecar = path.with_name(path.name + ".spec.json")
        spec = canonical(spec)
        reused = False
        if path.is_file() and not (self.force or pl_module.artifacts.force):
            stored = json.loads(sidecar.read_text()) if sidecar.is_file() else None
            if stored != spec:
                differ = "no spec beside it" if stored is None else "differs in " + ", ".join(spec_diff(stored, spec))
                raise ValueError(
                    f"calibration state_path {path} was calibrated for another configuration ({differ}): "
                    "name another state_path, leave it unset (keyed artifacts), or set force: true to recalibrate"
                )
            reused = True
            log.info("reusing calibration %s", path)
        artifact = Artifact("calibration", path.stem, spec, path.parent, reused)
        pl_module.artifacts.used[f"calibration/{path}"] = artifact
        return artifact

    def on_validation_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Once per run: load or compute the calibration on rank 0, broadcast it and apply it on every rank."""
        if pl_module.quant_config is None or self.done:
            return
        with pl_module.timed("calibration"):
            pl_module.attach_method()
            artifact = self._artifact(trainer, pl_module)
            path = Path(self.state_path) if self.state_path else artifact.path(STATE_FILE)
            state = None
            if trainer.is_global_zero:
                if artifact.reused:
                    state = read_quant_state(path)
                    self.loaded_from = str(path)
                else:
                    loader = trainer.datamodule.calib_dataloader()
                    calibrate_(pl_module.encoder, loader, progress=trainer.progress_bar_callback is not None)
                    state = quant_state(pl_module.encoder)
                    write_quant_state(path, state)
                    if self.state_path:
                        Path(str(path) + ".spec.json").write_text(json.dumps(artifact.spec, indent=2) + "\n")
                    else:
                        artifact.commit()
            state = trainer.strategy.broadcast(state, src=0)
            apply_quant_state(pl_module.encoder, *state)
        pl_module.results["calibration"] = {
            "state": str(path),
            "loaded": self.loaded_from is not None,
            "key": artifact.key,
            # what the method reports of its calibration (the mixed-precision plan: kept blocks, FLOP share)
            "summary": getattr(pl_module.encoder, "calibration_summary", None),
        }
        self.done = True
        if hasattr(pl_module, "deploy_encoder"):  # model.deploy: integer kernels from here on (before later callbacks)
            pl_module.deploy_encoder()
