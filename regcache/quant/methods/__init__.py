"""PTQ methods; importing this package registers each of them in ``regcache.quant.METHODS``."""

from regcache.quant.methods.naive import NaiveConfig
from regcache.quant.methods.ptq4vit import PTQ4ViTConfig

__all__ = ["NaiveConfig", "PTQ4ViTConfig"]
