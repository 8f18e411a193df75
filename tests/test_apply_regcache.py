"""RegCache as a config over a base method: ``apply_regcache`` from plain Python against ``regcache validate`` on
the demo config, ``RegCacheConfig`` validation, the typed winner (``SearchPoint``: round trip, install against a
hand-installed prefix and deletion), and ``search_config`` (the winner of a cheaper method, the base calibrated)."""

from __future__ import annotations

import copy
import dataclasses
import json
from pathlib import Path

import pytest
import torch
import yaml
from conftest import DEMO_CONFIG, DEMO_SMALL, demo_validate, images, make_model

from regcache.encoders import adapt
from regcache.quant import NaiveConfig, calibrate_, quantize_
from regcache.quant.modules import MatMul
from regcache.registers import (
    EmbeddingCosine,
    RegCacheConfig,
    SearchPoint,
    apply_regcache,
    install_deletion,
    install_prefix,
    make_objective,
)

# ----------------------------------------------------------------------------- plain Python = regcache validate


def _demo_settings() -> dict:
    """The search callback's init_args of the demo config with DEMO_SMALL's overrides, as RegCacheConfig fields."""
    config = yaml.safe_load(DEMO_CONFIG.read_text())
    args = dict(config["trainer"]["callbacks"][0]["init_args"])
    prefix = "--trainer.callbacks.init_args."
    args |= {
        k.removeprefix(prefix): yaml.safe_load(v)
        for k, v in (a.split("=", 1) for a in DEMO_SMALL)
        if k.startswith(prefix)
    }
    return args


@pytest.fixture(scope="module")
def both_routes(tmp_path_factory):
    """``regcache validate`` on the small demo config, and apply_regcache on the same data in plain Python."""
    from regcache.demo import BATCH_SIZE, load_images, load_texts
    from regcache.eval import build_zeroshot_classifier
    from regcache.testbed import CIFAR10_SAMPLE, load_testbed

    run_dir = tmp_path_factory.mktemp("apply") / "validate"
    metrics = demo_validate(run_dir)
    saved = json.loads(Path(metrics["regcache"]["result"]).read_text())

    config = yaml.safe_load(DEMO_CONFIG.read_text())
    data = config["data"]["datasets"]["cifar10_sample"]
    loaded = load_testbed()
    encoder = adapt(loaded.model)
    # the data module's selection: the whole reference split, calib_size drawn class-balanced with the seed
    ref_x, ref_y = load_images(CIFAR10_SAMPLE, data["ref_split"], loaded.preprocess)
    calib_x, _ = load_images(
        CIFAR10_SAMPLE, data["calib_split"], loaded.preprocess, data["calib_size"], seed=config["data"]["seed"]
    )
    assert config["data"]["batch_size"] == BATCH_SIZE
    classnames, templates = load_texts(CIFAR10_SAMPLE)
    with torch.no_grad():
        classifier = build_zeroshot_classifier(loaded.model, loaded.tokenizer, classnames, templates, progress=False)
    settings = _demo_settings()
    model = config["model"]
    cfg = RegCacheConfig(
        base_config=NaiveConfig(w_bits=model["w_bits"], a_bits=model["a_bits"]),
        objective=settings.pop("objective"),
        **settings,
    )
    objective = make_objective("acc_ref", labels=ref_y, classifier=classifier)
    batch = config["data"]["batch_size"]
    result = apply_regcache(
        encoder, cfg, list(calib_x.split(batch)), list(ref_x.split(batch)), objective, progress=False
    )
    test_x, test_y = load_images(CIFAR10_SAMPLE, "test", loaded.preprocess)
    return metrics, saved, result, (test_x, test_y, classifier)


def test_apply_regcache_gives_validates_winner_and_metrics(both_routes):
    metrics, saved, result, _ = both_routes
    rc = metrics["regcache"]
    point = result.point
    assert point == SearchPoint.from_dict(saved["installed"])  # the same (register, τ, k̃, l_start)
    assert (point.l_q, point.l_start, point.tau, point.delete_k, point.register, point.mode) == (
        rc["l_q"],
        rc["l_start"],
        rc["tau"],
        rc["k_delete"],
        rc["register"],
        rc["mode"],
    )
    # every configuration's score, the base's, the gain and each mode's best: the same numbers
    assert {r["key"]: r["score"] for r in result.search.rows} == pytest.approx(
        {r["key"]: r["score"] for r in saved["table"]}, abs=1e-9
    )
    assert len(result.search.rows) == len(saved["table"]) == 1 + 2 * 2 + 2 * 2  # base, prefix, both (k̃ = 3)
    summary = result.summary()
    for key in ("objective_score", "base_score", "gain_over_base"):
        assert summary[key] == pytest.approx(rc[key], abs=1e-9), key
    assert summary["best_by_mode"] == rc["best_by_mode"]
    assert summary["modes"] == rc["modes"] and summary["objective"] == rc["objective"] == "acc_ref"
    assert result.sweep.l_q == rc["l_q"]  # the sweep ran (no l_q given) and chose the same block


def test_apply_regcache_installed_model_gives_validates_zero_shot_top1(both_routes):
    """validate evaluated the first test batch (limit_val_batches=1): the plain-Python model scores the same."""
    from regcache.demo import BATCH_SIZE, evaluate

    metrics, _, result, (test_x, test_y, classifier) = both_routes
    assert result.calibrated and result.encoder.quant_config == NaiveConfig(6, 6)
    top1, _ = evaluate(result.encoder, test_x[:BATCH_SIZE], test_y[:BATCH_SIZE], classifier, result.l_q)
    assert top1 == pytest.approx(metrics["metrics"]["cifar10_sample/zeroshot_top1"], abs=1e-6)


# ----------------------------------------------------------------------------- RegCacheConfig validation


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("taus", [0, 1]),
        ("taus", []),
        ("delete_ks", [-1]),
        ("l_start_offsets", [-2]),
        ("modes", ["prefix_only"]),
        ("sweep_bits", 9),
        ("num_candidates", 0),
        ("sweep_images", 0),
        ("search_images", 0),
        ("curation_layers_before", -1),
        ("l_q", -1),
        ("objective", "top5"),
        ("derivation", "average"),
        ("recalibrate", "never"),
        ("eval_batch_size", 0),
        ("search_dtype", "bf16"),
        ("save_every_s", -1.0),
        ("delete_mode", "shrink"),
        ("refill", "zeros"),
        ("prefix_only_at_lq", "yes"),
        ("compile_tail", 1),
    ],
)
def test_regcache_config_rejects_bad_values_naming_the_field(field, value):
    with pytest.raises(ValueError, match=rf"^{field} "):
        RegCacheConfig(base_config=NaiveConfig(6, 6), **{field: value})


def test_regcache_config_checks_its_method_configs_and_modes_against_the_grid():
    with pytest.raises(TypeError, match=r"^base_config must be a QuantConfig"):
        RegCacheConfig(base_config="naive")
    with pytest.raises(TypeError, match=r"^search_config must be a QuantConfig"):
        RegCacheConfig(base_config=NaiveConfig(6, 6), search_config={"method": "naive"})
    with pytest.raises(ValueError, match="delete_ks must hold a k̃ > 0"):
        RegCacheConfig(base_config=NaiveConfig(6, 6), modes=["delete"], delete_ks=[0])
    cfg = RegCacheConfig(base_config=NaiveConfig(6, 6), taus=range(1, 4), delete_ks=(0, 2))
    assert (cfg.taus, cfg.delete_ks, cfg.modes) == ([1, 2, 3], [0, 2], ["prefix", "both"])
    assert cfg.scoring_config is cfg.base_config


def test_objective_must_agree_with_the_config():
    encoder = adapt(make_model("openclip"))
    calib, ref = [images("openclip", 4, seed=1)], [images("openclip", 4, seed=2)]
    cfg = RegCacheConfig(
        base_config=NaiveConfig(6, 6), objective="mse", l_q=1, taus=[1], delete_ks=[0], modes=["prefix"]
    )
    with pytest.raises(ValueError, match=r"objective passed is 'cosine' but RegCacheConfig\.objective is 'mse'"):
        apply_regcache(encoder, cfg, calib, ref, EmbeddingCosine(), progress=False)
    with pytest.raises(ValueError, match="objective 'acc_ref' needs labels"):
        apply_regcache(encoder, dataclasses.replace(cfg, objective="acc_ref"), calib, ref, progress=False)


# ----------------------------------------------------------------------------- the typed winner


def _tiny(**kw):
    torch.manual_seed(0)
    encoder = adapt(make_model("openclip"))
    calib = [images("openclip", 4, seed=20), images("openclip", 3, seed=21)]
    ref = [images("openclip", 4, seed=30), images("openclip", 4, seed=31)]
    settings = {
        "objective": "cosine",
        "l_q": 1,
        "num_candidates": 2,
        "taus": [1, 3],
        "delete_ks": [1],
        "modes": ["both"],
    }
    return encoder, calib, ref, RegCacheConfig(**(settings | kw))


def _embed(encoder, x):
    with torch.no_grad():
        return encoder(x)


def test_search_point_round_trip_and_install_equal_a_hand_installed_prefix(single_thread):
    encoder, calib, ref, cfg = _tiny(base_config=NaiveConfig(6, 6))
    float_encoder = copy.deepcopy(encoder)
    result = apply_regcache(encoder, cfg, calib, ref, progress=False)
    point = result.point
    assert point.mode == "both" and point.cache is not None and point.l_q == 1

    again = SearchPoint.from_dict(json.loads(json.dumps(point.to_dict())), cache=point.cache)
    assert again == point
    assert dataclasses.astuple(dataclasses.replace(again, cache=None)) == dataclasses.astuple(
        dataclasses.replace(point, cache=None)
    )  # the install context too (l_q, prefix_only_at, deletion mode, score)
    with pytest.raises(ValueError, match="carries no register cache"):
        SearchPoint.from_dict(point.to_dict()).install(copy.deepcopy(float_encoder))

    # by hand: the cache entry's prefix in blocks >= l_start, k̃ deleted at l_q, then the method calibrated
    by_hand = copy.deepcopy(float_encoder)
    install_prefix(by_hand, result.caches[point.l_start].entry(point.register), point.tau)
    install_deletion(by_hand, 1, point.delete_k)
    x = images("openclip", 3, seed=5)
    installed = copy.deepcopy(float_encoder)
    point.install(installed)
    assert torch.equal(_embed(installed, x), _embed(by_hand, x))  # float, registers in place
    quantize_(by_hand, NaiveConfig(6, 6))
    calibrate_(by_hand, calib, progress=False)
    assert torch.equal(_embed(result.encoder, x), _embed(by_hand, x))  # apply_regcache's installed, calibrated model
    # the winner's score is the objective of that model on the reference (cosine to the float embeddings)
    ref_x = torch.cat(ref)
    cosine = torch.nn.functional.cosine_similarity(_embed(by_hand, ref_x), _embed(float_encoder, ref_x), dim=-1)
    assert point.score == pytest.approx(float(cosine.mean()), abs=1e-5)
    # installing again replaces, it does not stack: a base point leaves the plain model
    point.install(installed)
    SearchPoint(None, 0, 0, 1).install(installed)
    assert torch.equal(_embed(installed, x), _embed(float_encoder, x))


def test_search_config_finds_the_winner_the_base_config_is_calibrated(single_thread):
    """search_config scores the grid (and the sweep); only the final calibration is base_config's."""
    cheap = NaiveConfig(6, 6, quantize_matmuls=False)  # fewer quantizers: a cheaper, different method
    base = NaiveConfig(6, 6)
    encoder, calib, ref, cfg = _tiny(base_config=base, search_config=cheap, l_q=None, modes=["prefix", "both"])
    float_encoder = copy.deepcopy(encoder)
    result = apply_regcache(encoder, cfg, calib, ref, progress=False)
    assert result.search.spec["method"] == cheap.to_dict() != base.to_dict()
    assert result.sweep.method == dataclasses.replace(cheap, w_bits=8, a_bits=8).tag
    # the winner is the cheap method's own: its search alone (as the base) gives the same table
    alone = apply_regcache(
        copy.deepcopy(float_encoder),
        dataclasses.replace(cfg, base_config=cheap, search_config=None),
        calib,
        ref,
        calibrate=False,
        progress=False,
    )
    assert alone.point == result.point and alone.search.scores() == result.search.scores()
    # the installed model is base_config's: its matmul quantizers, and the hand-calibrated outputs
    assert result.encoder.quant_config == base
    assert any(m.a_quantizer is not None for m in result.encoder.modules() if isinstance(m, MatMul))
    by_hand = copy.deepcopy(float_encoder)
    result.point.install(by_hand)
    quantize_(by_hand, base)
    calibrate_(by_hand, calib, progress=False)
    x = images("openclip", 3, seed=6)
    assert torch.equal(_embed(result.encoder, x), _embed(by_hand, x))


def test_the_callback_searches_with_its_search_method_and_keys_it():
    """validate's route to search_config: the callback's search_method at the module's bits, in the search key."""
    from types import SimpleNamespace

    from callbacks.register_search import RegisterSearch
    from regcache.quant import MethodConfigError

    module = SimpleNamespace(quant_config=NaiveConfig(6, 6), device=torch.device("cpu"))
    plain = RegisterSearch(taus=[1], delete_ks=[0, 2])
    cheap = RegisterSearch(
        taus=[1], delete_ks=[0, 2], search_method="naive", search_method_options={"quantize_matmuls": False}
    )
    assert plain.regcache_config(module).search_config is None
    cfg = cheap.regcache_config(module)
    assert cfg.base_config == NaiveConfig(6, 6) and cfg.search_config == NaiveConfig(6, 6, quantize_matmuls=False)
    assert (cfg.taus, cfg.delete_ks, cfg.compile_tail) == ([1], [0, 2], False)
    assert "search_method" not in plain.settings()  # keys of runs without it stay as they were
    assert cheap.settings()["search_method_options"] == {"quantize_matmuls": False}
    with pytest.raises(MethodConfigError, match="unknown quantization method 'cheap'"):
        RegisterSearch(search_method="cheap")
    with pytest.raises(MethodConfigError, match="unknown option 'matmuls' of method 'naive'"):
        RegisterSearch(search_method="naive", search_method_options={"matmuls": False})
    with pytest.raises(ValueError, match="search_method_options is set but search_method is not"):
        RegisterSearch(search_method_options={"quantize_matmuls": False})
