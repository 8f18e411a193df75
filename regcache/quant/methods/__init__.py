"""PTQ methods; importing this package registers each of them in ``regcache.quant.METHODS``."""

from regcache.quant.methods.naive import NaiveConfig

__all__ = ["NaiveConfig"]
