"""Lightning import shim: the ``lightning`` package, or ``pytorch_lightning`` where only that is installed."""

try:
    import lightning.pytorch as pl
except ImportError:  # pragma: no cover - e.g. the GPU machines ship only pytorch_lightning
    import pytorch_lightning as pl

__all__ = ["pl"]
