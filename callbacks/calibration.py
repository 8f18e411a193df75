"""Calibration before validation: rank 0 calibrates (or loads a saved state), every rank gets the same state."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from regcache._lightning import pl
from regcache.quant import calibrate_
from regcache.quant.state import apply_quant_state, quant_state, read_quant_state, write_quant_state


class Calibration(pl.Callback):
    """Calibrate the module's PTQ method on the datamodule's calibration split, once.

    The state is computed on rank 0 and broadcast (calibration data and any search randomness
    then cannot make ranks disagree), saved to ``state_path`` (default: in the run directory,
    keyed by method, bits and register configuration) and reloaded by later runs unless
    ``force``. Runs after :class:`~callbacks.register_search.RegisterSearch` in the callback
    list, so the registers are installed before calibration sees the activations.
    """

    def __init__(self, state_path: str | None = None, force: bool = False) -> None:
        self.state_path = state_path
        self.force = force
        self.loaded_from: str | None = None
        self.done = False

    def default_path(self, pl_module: pl.LightningModule) -> Path:
        """``<run_dir>/calibration/<method tag>-<hash of config + registers>.safetensors``."""
        key = json.dumps([pl_module.quant_config.to_dict(), pl_module.results.get("regcache")], sort_keys=True)
        digest = hashlib.sha256(key.encode()).hexdigest()[:10]
        return pl_module.run_dir / "calibration" / f"{pl_module.quant_config.tag}-{digest}.safetensors"

    def on_validation_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Once per run: load or compute the calibration on rank 0, broadcast it and apply it on every rank."""
        if pl_module.quant_config is None or self.done:
            return
        with pl_module.timed("calibration"):
            pl_module.attach_method()
            path = Path(self.state_path) if self.state_path else self.default_path(pl_module)
            state = None
            if trainer.is_global_zero:
                if path.is_file() and not self.force:
                    state = read_quant_state(path)
                    self.loaded_from = str(path)
                else:
                    loader = trainer.datamodule.calib_dataloader()
                    calibrate_(pl_module.encoder, loader, progress=trainer.progress_bar_callback is not None)
                    state = quant_state(pl_module.encoder)
                    write_quant_state(path, state)
            state = trainer.strategy.broadcast(state, src=0)
            apply_quant_state(pl_module.encoder, *state)
        pl_module.results["calibration"] = {"state": str(path), "loaded": self.loaded_from is not None}
        self.done = True
