"""QDrop W4A4 + RegCache on the testbed, the register grid scored with naive W4A4 (the cheap approximation).

Re-calibrating QDrop at every grid configuration repeats a whole block reconstruction per
configuration (the testbed's grid: ~170 of them), so the search scores with the naive method
(``RegCacheConfig(search_config=NaiveConfig)``) and QDrop is calibrated once, at the winner. The data,
grid and evaluation are `regcache validate --config train_configs/demo.yaml`'s (the demo's helpers:
300 train images as reference, 128 class-balanced calibration images, the 500-image test split), the
QDrop options train_configs/testbed/qdrop.yaml's. Writes ``<run_dir>/metrics.json`` in the fields
`regcache report` reads (``source`` names this script):

    python benchmarks/testbed_qdrop_regcache.py [--run-dir runs/w4a4/qdrop_regcache]
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch
import yaml

from regcache.demo import (
    BATCH_SIZE,
    CALIB_SIZE,
    DEMO_CANDIDATES,
    DEMO_DELETE_KS,
    DEMO_TAUS,
    _batches,
    evaluate,
    load_images,
    load_texts,
)
from regcache.encoders import adapt
from regcache.eval import build_zeroshot_classifier
from regcache.quant.methods.naive import NaiveConfig
from regcache.quant.methods.qdrop import QDropConfig
from regcache.registers import RegCacheConfig, apply_regcache, calibrate_regcache, make_objective
from regcache.testbed import CIFAR10_SAMPLE, load_testbed
from regcache.utils import write_json

QDROP_OPTIONS = Path(__file__).resolve().parents[1] / "train_configs" / "testbed" / "qdrop.yaml"


def main() -> None:
    """Search with naive W4A4, calibrate QDrop W4A4 at the winner, evaluate, write metrics.json."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--run-dir", default="runs/w4a4/qdrop_regcache")
    args = ap.parse_args()
    torch.manual_seed(0)
    options = yaml.safe_load(QDROP_OPTIONS.read_text())["model"]["method_options"]
    loaded = load_testbed()
    encoder = adapt(loaded.model)
    classnames, templates = load_texts(CIFAR10_SAMPLE)
    test_x, test_y = load_images(CIFAR10_SAMPLE, "test", loaded.preprocess)
    ref_x, ref_y = load_images(CIFAR10_SAMPLE, "train", loaded.preprocess)
    calib_x, _ = load_images(CIFAR10_SAMPLE, "train", loaded.preprocess, CALIB_SIZE)
    with torch.no_grad():
        classifier = build_zeroshot_classifier(loaded.model, loaded.tokenizer, classnames, templates, progress=False)
    objective = make_objective("acc_ref", labels=ref_y, classifier=classifier)
    ref_batches = _batches(ref_x)
    config = RegCacheConfig(
        base_config=QDropConfig(w_bits=4, a_bits=4, **options),
        search_config=NaiveConfig(w_bits=4, a_bits=4),
        objective="acc_ref",
        sweep_images=BATCH_SIZE * len(ref_batches),
        search_images=len(ref_y),
        num_candidates=DEMO_CANDIDATES,
        taus=list(DEMO_TAUS),
        delete_ks=list(DEMO_DELETE_KS),
        modes=["prefix", "both"],
    )
    start = time.perf_counter()
    result = apply_regcache(encoder, config, _batches(calib_x), ref_batches, objective, calibrate=False, progress=False)
    search_s = time.perf_counter() - start
    start = time.perf_counter()
    calibrate_regcache(encoder, result.point, config.base_config, _batches(calib_x), progress=False)
    calibration_s = time.perf_counter() - start
    top1, norm = evaluate(encoder, test_x, test_y, classifier, result.l_q)
    p = result.point
    metrics = {
        "source": "benchmarks/testbed_qdrop_regcache.py",
        "model": "regcache-testbed",
        "pretrained": None,
        "method": "qdrop",
        "w_bits": 4,
        "a_bits": 4,
        "method_options": config.base_config.to_dict(),
        "search_method": config.search_config.to_dict(),
        "regcache": {"l_q": p.l_q, "l_start": p.l_start, "tau": p.tau, "k_delete": p.delete_k, "mode": p.mode},
        "metrics": {"cifar10_sample/zeroshot_top1": top1},
        "max_token_norm_lq": norm,
        "timings_s": {"register_search": search_s, "calibration": calibration_s},
    }
    path = write_json(Path(args.run_dir) / "metrics.json", metrics)
    print(
        f"qdrop W4A4 + RegCache (searched with naive): top-1 {100 * top1:.1f}, l_q {p.l_q}, τ {p.tau}, k̃ {p.delete_k}"
    )
    print(f"search {search_s:.1f} s, QDrop calibration at the winner {calibration_s:.1f} s")
    print(f"results: {path}")


if __name__ == "__main__":
    main()
