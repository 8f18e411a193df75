"""Lightning import shim: the ``lightning`` package, or ``pytorch_lightning`` where only that is installed.

Importing it also silences Lightning's noise that says nothing about a validate run: the advert
tips ("💡 Tip: ... litlogger / litmodels"), LightningCLI's warning about ``args`` given with a
command line (``regcache validate`` always rewrites its arguments into ``args``) and torch's
``LeafSpec`` deprecation warning raised inside Lightning's batch walk.
"""

import logging
import warnings

try:
    import lightning.pytorch as pl
except ImportError:  # pragma: no cover - e.g. the GPU machines ship only pytorch_lightning
    import pytorch_lightning as pl

__all__ = ["pl"]

_NOISE = (
    r"LightningCLI's args parameter is intended to run from within Python",
    r"`isinstance\(treespec, LeafSpec\)` is deprecated",
)


class _DropTips(logging.Filter):
    """Drop Lightning's advertising tips, keep everything else."""

    def filter(self, record: logging.LogRecord) -> bool:
        """False for a "💡 Tip:" record."""
        return not str(record.msg).startswith("💡 Tip:")


def _quiet() -> None:
    root = pl.__name__.split(".")[0]
    for name in (
        f"{root}.pytorch.utilities.rank_zero",
        f"{root}.fabric.utilities.rank_zero",
        f"{root}.utilities.rank_zero",
    ):
        logging.getLogger(name).addFilter(_DropTips())
    for message in _NOISE:
        warnings.filterwarnings("ignore", message=message)


_quiet()
