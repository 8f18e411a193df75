"""RegCache: sensitivity sweep, register curation, KV cache, prefix attention, token deletion, grid search.

sweep = sensitivity_sweep(encoder, NaiveConfig(8, 8), calib, ref, objective)   # → sweep.l_q
candidates = curate_candidates(encoder, pool, layers=sweep.l_q, k=20)
cache = derive_cache(encoder, candidates, l_start=sweep.l_q)                    # "propagate"
search = RegisterSearch(encoder, NaiveConfig(8, 8), calib, ref, objective, sweep.l_q, candidates)
result = search.run()                                                            # result.best

or the whole pipeline as a config over the base method (sweep → curation → caches → search → install):

result = apply_regcache(encoder, RegCacheConfig(base_config=NaiveConfig(6, 6)), calib, ref, objective)
result.point                                                                     # the winner: .install(encoder)
"""

from regcache.registers._common import plain_float
from regcache.registers.cache import DERIVATIONS, RegisterCache, derive_cache, register_derivation
from regcache.registers.curation import Candidates, curate_candidates
from regcache.registers.deletion import TokenDeletion, install_deletion, kept_positions, remove_deletion
from regcache.registers.objectives import (
    OBJECTIVES,
    EmbeddingCosine,
    EmbeddingMSE,
    Objective,
    PatchTokenCosine,
    Predictions,
    ZeroShotTop1,
    make_objective,
)
from regcache.registers.overhead import block_flops, regcache_flops
from regcache.registers.pipeline import (
    RegCacheConfig,
    RegCachePrep,
    RegCacheResult,
    apply_regcache,
    calibrate_regcache,
    choose,
    compare_with_base,
    prepare_regcache,
    regcache_summary,
    search_regcache,
)
from regcache.registers.prefix import install_batched_prefix, install_prefix, remove_prefix
from regcache.registers.recalibration import TAIL_CALIBRATION, Recalibrator, TailView, tail_calibration_input
from regcache.registers.search import RegisterSearch, SearchPoint, SearchResult, search_grid
from regcache.registers.sweep import SweepResult, sensitivity_sweep, token_norm_profile

__all__ = [
    "DERIVATIONS",
    "OBJECTIVES",
    "TAIL_CALIBRATION",
    "Candidates",
    "EmbeddingCosine",
    "EmbeddingMSE",
    "Objective",
    "PatchTokenCosine",
    "Predictions",
    "Recalibrator",
    "RegCacheConfig",
    "RegCachePrep",
    "RegCacheResult",
    "RegisterCache",
    "RegisterSearch",
    "SearchPoint",
    "SearchResult",
    "SweepResult",
    "TailView",
    "TokenDeletion",
    "ZeroShotTop1",
    "apply_regcache",
    "block_flops",
    "calibrate_regcache",
    "choose",
    "compare_with_base",
    "curate_candidates",
    "derive_cache",
    "install_batched_prefix",
    "install_deletion",
    "install_prefix",
    "kept_positions",
    "make_objective",
    "plain_float",
    "prepare_regcache",
    "regcache_flops",
    "regcache_summary",
    "register_derivation",
    "remove_deletion",
    "remove_prefix",
    "search_grid",
    "search_regcache",
    "sensitivity_sweep",
    "tail_calibration_input",
    "token_norm_profile",
]
