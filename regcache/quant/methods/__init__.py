"""PTQ methods; importing this package registers each of them in ``regcache.quant.METHODS``."""

from regcache.quant.methods.mixed import MixedPrecisionConfig
from regcache.quant.methods.naive import NaiveConfig
from regcache.quant.methods.noisyquant import NoisyQuantConfig
from regcache.quant.methods.ptq4vit import PTQ4ViTConfig
from regcache.quant.methods.qdrop import QDropConfig
from regcache.quant.methods.repq_vit import RepQViTConfig

__all__ = ["MixedPrecisionConfig", "NaiveConfig", "NoisyQuantConfig", "PTQ4ViTConfig", "QDropConfig", "RepQViTConfig"]
