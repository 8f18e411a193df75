"""QDrop block reconstruction and the sweep-based mixed-precision plan on a tiny CLIP tower (CPU)."""

from __future__ import annotations

import functools

import pytest
import torch
from conftest import calib_batches, images, install_random_prefix, make_model, reloaded

from regcache.encoders import adapt
from regcache.quant import NaiveConfig, QuantLinear, calibrate_, quant_mode, quantize_, quantizers
from regcache.quant.methods.mixed import MixedPrecisionConfig
from regcache.quant.methods.qdrop import LinearTempDecay, QDropConfig, mse_calibrate_
from regcache.quant.quantizers import UniformQuantizer
from regcache.registers.objectives import EmbeddingCosine
from regcache.registers.sweep import sensitivity_sweep

FAMILY = "clip"
ITERS = 300


@pytest.fixture(autouse=True)
def _one_thread(single_thread):
    yield


def qdrop(**options) -> QDropConfig:
    # AdaRound moves V by about weight_lr per step: a short schedule needs a larger rate than the recipe's 1e-3
    defaults = {"w_bits": 4, "a_bits": 4, "iterations": ITERS, "batch_size": 8, "init_method": "rtn", "weight_lr": 1e-2}
    return QDropConfig(**defaults | options)


@functools.cache
def reconstructed(prefix: bool = False):
    """The default test reconstruction (read-only: shared by the tests that only measure it)."""
    return calibrated(qdrop(), prefix=prefix)


def calibrated(config, prefix: bool = False, batches=None):
    encoder = adapt(make_model(FAMILY))
    if prefix:
        install_random_prefix(encoder)
    quantize_(encoder, config)
    calibrate_(encoder, batches or calib_batches(FAMILY), progress=False)
    return encoder


def block0_output_mse(encoder, x: torch.Tensor) -> float:
    """Block 0 quantized (the rest irrelevant) against the float block 0, both on the float block input."""
    with torch.no_grad():
        with quant_mode(encoder, "float"):
            tokens = encoder.embed(x)
            target = encoder.blocks[0](tokens)
        return float((encoder.blocks[0](tokens) - target).pow(2).mean())


def test_zero_iterations_with_rtn_init_is_the_naive_method():
    x = images(FAMILY, n=4, seed=9)
    a, b = calibrated(qdrop(iterations=0)), calibrated(NaiveConfig(w_bits=4, a_bits=4))
    with torch.no_grad():
        assert torch.equal(a(x), b(x))


def test_reconstruction_lowers_the_block_output_error_against_round_to_nearest():
    x = torch.cat(calib_batches(FAMILY))  # the reconstruction's own objective, on its calibration images
    rtn, rec = calibrated(qdrop(iterations=0)), reconstructed()
    before, after = block0_output_mse(rtn, x), block0_output_mse(rec, x)
    assert after < 0.9 * before, (before, after)
    held_out = images(FAMILY, n=8, seed=50)
    assert block0_output_mse(rec, held_out) < block0_output_mse(rtn, held_out)


def test_learned_rounding_stays_within_one_step_of_round_to_nearest_and_on_the_grid():
    encoder, float_model = reconstructed(), adapt(make_model(FAMILY))
    float_linears = dict(float_model.named_modules())
    flipped = 0
    for name, layer in encoder.named_modules():
        if not isinstance(layer, QuantLinear) or layer.weight_quantizer is None:
            continue
        q = layer.weight_quantizer
        scale = q.scale.reshape(-1, 1)
        w_float = float_linears[name].weight.detach()
        w_rtn = q.plain_fake_quant(w_float)
        assert torch.all((layer.weight - w_rtn).abs() <= scale * (1 + 1e-5)), name
        assert torch.equal(q.plain_fake_quant(layer.weight), layer.weight), name  # baked: the grid maps it to itself
        flipped += int((layer.weight != w_rtn).sum())
    assert flipped > 0  # the rounding learned something


def test_same_seed_same_state_other_seed_another():
    def state(seed: int) -> dict[str, torch.Tensor]:
        return {k: v.clone() for k, v in calibrated(qdrop(iterations=40, seed=seed)).state_dict().items()}

    a, b, c = state(3), state(3), state(4)
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert any(not torch.equal(a[k], c[k]) for k in a)


@pytest.mark.parametrize("init_method", ["mse", "repq"])
def test_state_round_trip_reproduces_outputs_exactly(tmp_path, init_method):
    encoder = calibrated(qdrop(iterations=30, init_method=init_method))
    fresh = reloaded(encoder, FAMILY, tmp_path / "state.safetensors")
    x = images(FAMILY, n=4, seed=11)
    with torch.no_grad():
        assert torch.equal(fresh(x), encoder(x))


def test_reconstruction_sees_the_register_prefix(tmp_path):
    x = torch.cat(calib_batches(FAMILY))
    float_with_prefix = adapt(make_model(FAMILY))
    install_random_prefix(float_with_prefix)
    with torch.no_grad():
        reference = float_with_prefix(x)
    rtn, rec = calibrated(qdrop(iterations=0), prefix=True), reconstructed(prefix=True)
    without = reconstructed()
    with torch.no_grad():
        err_rtn, err_rec = (rtn(x) - reference).pow(2).mean(), (rec(x) - reference).pow(2).mean()
        assert err_rec < err_rtn
        # the prefix changed what was learned (block 1 on attends to it)
        assert not torch.equal(rec.blocks[2].attn.qkv.weight, without.blocks[2].attn.qkv.weight)
    fresh = reloaded(rec, FAMILY, tmp_path / "state.safetensors", with_prefix=True)
    with torch.no_grad():
        assert torch.equal(fresh(x), rec(x))


def test_embedding_objective_changes_only_the_last_block():
    block, emb = calibrated(qdrop(iterations=30)), calibrated(qdrop(iterations=30, objective_on="embedding"))
    last = block.num_blocks - 1
    for i in range(last):
        assert torch.equal(block.blocks[i].mlp.fc2.weight, emb.blocks[i].mlp.fc2.weight)
    assert not torch.equal(block.blocks[last].attn.qkv.weight, emb.blocks[last].attn.qkv.weight)


def test_rounding_exponent_schedule_and_mse_init_by_hand():
    b = LinearTempDecay(100, 0.2, 20.0, 2.0)
    assert b(1) == b(19) == 20.0 and b(20) == 20.0 and b(60) == pytest.approx(11.0) and b(100) == 2.0
    x = torch.tensor([0.0, 1.0, 2.0, 3.0, 100.0])  # an outlier: the least-Lp range clips it
    q = mse_calibrate_(UniformQuantizer(2, symmetric=False), x)
    scores = {}
    for i in range(1, 101):
        scale = 100.0 * i / 100 / 3
        codes = torch.clamp(torch.round(x / scale), 0, 3)
        scores[i] = float((codes * scale - x).abs().pow(2.4).mean())
    best = min(scores, key=lambda i: (scores[i], i))
    assert float(q.scale) == pytest.approx(100.0 * best / 100 / 3, rel=1e-6)


def test_bad_options_name_the_field():
    with pytest.raises(ValueError, match="init_method"):
        QDropConfig(init_method="gptq")
    with pytest.raises(ValueError, match="drop_prob"):
        QDropConfig(drop_prob=0.0)
    with pytest.raises(ValueError, match="objective_on"):
        QDropConfig(objective_on="logits")


def block_flops_by_hand(width: int, tokens: int, mlp: int) -> int:
    linears = width * 3 * width + width * width + 2 * width * mlp
    return 2 * tokens * linears + 2 * 2 * tokens * tokens * width


@pytest.mark.parametrize("keep_bits", [None, 8])
def test_mixed_precision_keeps_the_most_sensitive_blocks(tmp_path, keep_bits):
    batches = calib_batches(FAMILY)
    config = MixedPrecisionConfig(w_bits=4, a_bits=4, base="naive", keep=1, keep_bits=keep_bits)
    encoder = calibrated(config, batches=batches)
    sweep = sensitivity_sweep(
        adapt(make_model(FAMILY)), NaiveConfig(w_bits=4, a_bits=4), batches, batches, EmbeddingCosine(), progress=False
    )
    assert config.blocks == (sweep.ranking[0],)
    kept = config.blocks[0]
    for i, block in enumerate(encoder.blocks):
        bits = {q.bits for _, q in quantizers(block)}
        if i == kept:
            assert bits == (set() if keep_bits is None else {8})
        else:
            assert bits == {4}
    summary = encoder.calibration_summary
    tokens = summary["num_tokens"]
    per_block = block_flops_by_hand(64, tokens, 4 * 64)
    assert tokens == 17 and summary["flop_share"] == pytest.approx(per_block / (3 * per_block))
    assert summary["blocks"] == [kept] and summary["sweep_ranking"] == sweep.ranking
    fresh = reloaded(encoder, FAMILY, tmp_path / "state.safetensors")
    x = images(FAMILY, n=4, seed=12)
    with torch.no_grad():
        assert torch.equal(fresh(x), encoder(x))
    assert fresh.calibration_summary == summary and fresh.quant_config.blocks == config.blocks


def test_mixed_precision_with_named_blocks_skips_the_sweep_and_reconstructs_the_rest():
    config = MixedPrecisionConfig(
        w_bits=4, a_bits=4, base="qdrop", base_options={"iterations": 20, "batch_size": 8}, blocks=(0, 2)
    )
    encoder = calibrated(config)
    assert "sweep_drops" not in encoder.calibration_summary
    assert not any(True for _ in quantizers(encoder.blocks[0])) and not any(True for _ in quantizers(encoder.blocks[2]))
    assert {q.bits for _, q in quantizers(encoder.blocks[1])} == {4}
    assert encoder.calibration_summary["flop_share"] == pytest.approx(2 / 3)


def test_state_loads_onto_quantizers_made_in_inference_mode(tmp_path):
    """validate attaches the method inside inference mode: empty buffers made there still take a saved state."""
    from regcache.quant import load_quant_state, save_quant_state

    encoder = calibrated(qdrop(iterations=5, init_method="mse"))
    path = save_quant_state(encoder, tmp_path / "state.safetensors")
    fresh = adapt(make_model(FAMILY))
    with torch.inference_mode():
        quantize_(fresh, qdrop(iterations=5, init_method="mse"))
    load_quant_state(fresh, path)
    x = images(FAMILY, n=2, seed=13)
    with torch.no_grad():
        assert torch.equal(fresh(x), encoder(x))


def test_report_names_the_mixed_plan():
    from regcache.report import table

    run = {
        "model": "m",
        "method": "mixed",
        "w_bits": 4,
        "a_bits": 4,
        "method_options": {"base": "naive"},
        "calibration": {"summary": {"blocks": [2], "keep_bits": None, "flop_share": 1 / 6}},
        "metrics": {"d/zeroshot_top1": 0.42},
    }
    assert "| mixed (naive; blocks 2 float, 17 % of FLOPs) |" in table([run]) and "| 42.00 |" in table([run])


def test_validate_reports_the_plan_and_reuses_its_calibration(tmp_path):
    """Through `regcache validate`: the chosen block and FLOP share in metrics.json, also from a reused state."""
    from conftest import demo_validate

    extra = ["--trainer.callbacks.init_args.enabled=false", "--model.method=mixed", "--model.w_bits=4"]
    extra += ["--model.a_bits=4", f"--model.artifacts_dir={tmp_path / 'artifacts'}"]
    first = demo_validate(tmp_path / "a", *extra)
    second = demo_validate(tmp_path / "b", *extra)
    summary = first["calibration"]["summary"]
    assert summary["blocks"] == [summary["sweep_ranking"][0]] and summary["flop_share"] == pytest.approx(1 / 6)
    assert second["calibration"]["loaded"] and second["calibration"]["summary"] == summary
    assert first["method_options"]["blocks"] == second["method_options"]["blocks"] == summary["blocks"]
    assert first["metrics"] == second["metrics"]


def _state_of(config, monkeypatch, fast: bool, compile_step: bool = False):
    from regcache.quant.methods import qdrop as qdrop_module

    monkeypatch.setattr(qdrop_module, "FAST_STEP_DEVICES", ("cpu",) if fast else ())
    monkeypatch.setattr(qdrop_module, "COMPILE_STEP", compile_step)
    encoder = calibrated(config)
    return encoder, {k: v.clone() for k, v in encoder.state_dict().items()}


def test_fast_step_loop_is_the_eager_loop(monkeypatch):
    # The CUDA loop (masks drawn outside the graph and fed to the hooks, b as a tensor, foreach step clamps),
    # run eagerly on CPU: the same random draws in the same order, so the same state up to float rounding.
    config = qdrop(iterations=40, init_method="mse")
    eager, a = _state_of(config, monkeypatch, fast=False)
    fast, b = _state_of(config, monkeypatch, fast=True)
    assert a.keys() == b.keys()
    for k in a:
        assert torch.allclose(a[k].float(), b[k].float(), rtol=1e-4, atol=1e-6), k
    rows = fast.calibration_summary["reconstruction"]["blocks"]
    assert {row["step"] for row in rows.values()} == {"uncompiled"}  # the loop under test ran
    assert {row["step"] for row in eager.calibration_summary["reconstruction"]["blocks"].values()} == {"eager"}
    ref = eager.calibration_summary["reconstruction"]["blocks"]
    for k, row in rows.items():
        assert row["final_loss"] == pytest.approx(ref[k]["final_loss"], rel=1e-4)


def test_failed_compile_falls_back_to_the_eager_step_with_a_warning(monkeypatch):
    def broken_compile(fn, *args, **kwargs):
        def run(*a, **k):
            raise RuntimeError("inductor unavailable")

        return run

    monkeypatch.setattr(torch, "compile", broken_compile)
    config = qdrop(iterations=20)
    _, a = _state_of(config, monkeypatch, fast=True, compile_step=False)
    with pytest.warns(UserWarning, match="inductor unavailable"):
        encoder, b = _state_of(config, monkeypatch, fast=True, compile_step=True)
    assert all(torch.equal(a[k], b[k]) for k in a)  # the failed step reran eagerly on the same draws
    rows = encoder.calibration_summary["reconstruction"]["blocks"].values()
    assert all(row["step"] == "eager (compile failed)" and "inductor" in row["compile_warning"] for row in rows)
