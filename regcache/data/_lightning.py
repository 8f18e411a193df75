"""Import shim: ``lightning.pytorch`` when installed, else the standalone ``pytorch_lightning``.

The GPU machines only ship ``pytorch_lightning``; development machines have ``lightning``.
Use ``from regcache.data._lightning import pl``.
"""

from __future__ import annotations

try:  # pragma: no cover - depends on the environment
    import lightning.pytorch as pl
except ImportError:  # pragma: no cover
    import pytorch_lightning as pl

__all__ = ["pl"]
