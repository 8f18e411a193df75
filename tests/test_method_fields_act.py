"""Every field of every method acts: the walk over each QuantConfig dataclass's fields sets a non-default valid value
and checks the calibrated tiny encoder's output changes; a field that by design only trades speed or memory
(chunk sizes, batching, staging) is listed in SAME_NUMBERS and must leave the output as it was instead, and a field
whose effect the tiny model cannot show in its output is listed in OWN_TEST with the test of this file that shows it."""

from __future__ import annotations

import copy
import dataclasses
import functools

import pytest
import torch
from conftest import images, make_model

from regcache.encoders import adapt
from regcache.quant import METHODS, calibrate_, quantize_

# small searches so a calibration of the tiny model takes a fraction of a second (the walk varies these too)
BASE_OPTIONS: dict[str, dict] = {
    "noisyquant": {"clip_candidates": 20, "mean_candidates": 10, "amplitude_candidates": 20},
    "ptq4vit": {"eq_n": 10, "search_rounds": 1, "softmax_splits": 4},
    "qdrop": {"iterations": 4, "init_images": 4, "batch_size": 4},
}

# a non-default valid value per field where flipping a bool or scaling a number would not do
VALUES: dict[tuple[str, str], object] = {
    ("noisyquant", "seed"): 1,
    ("noisyquant", "clip_candidates"): 5,
    ("noisyquant", "mean_candidates"): 3,
    ("noisyquant", "amplitude_candidates"): 5,
    ("noisyquant", "search_tokens"): 16,
    ("noisyquant", "search_precision"): "bf16",  # auto = fp32 on a CPU
    ("ptq4vit", "search_rounds"): 2,
    ("ptq4vit", "eq_alpha"): 0.2,
    ("ptq4vit", "eq_beta"): 1.6,
    ("ptq4vit", "eq_n"): 4,
    ("ptq4vit", "softmax_splits"): 2,
    ("ptq4vit", "hessian_grad"): "kl",
    ("ptq4vit", "prediction"): "logits",  # auto = embedding for a CLIP tower
    ("ptq4vit", "logit_scale"): 1000.0,
    ("ptq4vit", "seed"): 1,
    ("ptq4vit", "zero_shot_classifier"): torch.nn.functional.normalize(
        torch.randn(32, 5, generator=torch.Generator().manual_seed(0)), dim=0
    ),
    ("repq_vit", "patch_embed_input_bits"): 4,
    ("repq_vit", "percentiles"): (0.9, 0.99),
    ("qdrop", "iterations"): 8,
    ("qdrop", "batch_size"): 2,
    ("qdrop", "init_method"): "rtn",
    ("qdrop", "init_images"): 2,
    ("qdrop", "objective_on"): "embedding",
    ("qdrop", "b_range"): (10.0, 1.0),
    ("qdrop", "drop_prob"): 1.0,
    ("qdrop", "seed"): 1,
    ("mixed", "base"): "repq_vit",
    ("mixed", "base_options"): {"quantize_matmuls": False},
    ("mixed", "keep"): 0,
    ("mixed", "keep_bits"): 8,
    ("mixed", "blocks"): (0,),
}

# settings both calibrations of a field's check share, where the default ones hide the field's effect
CONTEXT: dict[tuple[str, str], dict] = {
    # the tiny model's softmax probabilities sit far above 2^-(2^6 / 2): a 6-bit code book never uses the last code
    ("repq_vit", "reserve_zero_code"): {"a_bits": 2},
}

# fields whose effect is on a search's inputs, not visible in the tiny model's output: the test showing it
OWN_TEST: dict[tuple[str, str], str] = {
    ("ptq4vit", "softmax_search_float_v_quirk"): "test_ptq4vit_float_v_quirk_scores_the_split_against_float_v",
}

# speed / memory knobs: another value, the same numbers (to float rounding), and the test that shows it
SAME_NUMBERS: dict[tuple[str, str], tuple[object, str]] = {
    ("noisyquant", "search_chunk_elements"): (1 << 12, "candidates per chunk; test_noisyquant.py chunking tests"),
    ("noisyquant", "staged_blocks"): (False, "staged block walk = full forwards; test_noisyquant.py staged tests"),
    ("ptq4vit", "grad_batch_size"): (2, "images per backward pass; gradients summed the same"),
    ("ptq4vit", "candidate_batch_bytes"): (1 << 14, "candidates evaluated at once; the same grid"),
    ("qdrop", "amp"): (False, "bf16 autocast of the reconstruction on CUDA only: float32 on a CPU either way"),
}


def _cases() -> list[tuple[str, str]]:
    return [(name, f.name) for name in sorted(METHODS) for f in dataclasses.fields(METHODS[name])]


@functools.cache
def _setup() -> tuple[torch.nn.Module, list[torch.Tensor], torch.Tensor]:
    encoder = adapt(make_model("openclip"))
    with torch.no_grad():  # peaked attention, as trained models have (a random one's is near uniform)
        for block in encoder.blocks:
            dim = block.attn.qkv.in_features
            block.attn.qkv.weight[: 2 * dim] *= 4  # queries and keys: logits x 16
    return encoder, [images("openclip", 4, seed=1)], images("openclip", 3, seed=2)


def _output(name: str, **options) -> torch.Tensor:
    """The tiny encoder calibrated with method ``name`` at W6A6 (plus the small-search options), on fixed images."""
    encoder, calib, x = _setup()
    encoder = copy.deepcopy(encoder)
    torch.manual_seed(12345)  # unseeded draws repeat; not the methods' own default seed 0
    quantize_(encoder, METHODS[name](**({"w_bits": 6, "a_bits": 6} | BASE_OPTIONS.get(name, {}) | options)))
    calibrate_(encoder, calib, progress=False)
    with torch.no_grad():
        return encoder(x)


@functools.cache
def _baseline(name: str, context: tuple = ()) -> torch.Tensor:
    return _output(name, **dict(context))


def _other_value(name: str, field: dataclasses.Field) -> object:
    """The value the walk sets: the table's, else the bool flipped / the bits lowered / the base option scaled."""
    if (name, field.name) in VALUES:
        return VALUES[(name, field.name)]
    default = BASE_OPTIONS.get(name, {}).get(field.name, field.default)
    if field.name in ("w_bits", "a_bits"):
        return 4
    if isinstance(default, bool):
        return not default
    if isinstance(default, float):
        return default * 4
    pytest.fail(
        f"{name}.{field.name} (default {default!r}): give it a non-default valid value in VALUES of "
        f"{__file__}, or list it in SAME_NUMBERS with the test showing it changes no number"
    )


def test_the_tables_name_only_real_fields():
    fields = set(_cases())
    named = set(VALUES) | set(SAME_NUMBERS) | set(CONTEXT) | set(OWN_TEST)
    named |= {(m, f) for m, o in BASE_OPTIONS.items() for f in o}
    stale = sorted(case for case in named - fields if case[0] in METHODS)
    assert not stale, f"fields no method has: {stale}"
    missing = [test for test in OWN_TEST.values() if not callable(globals().get(test))]
    assert not missing, f"OWN_TEST names tests this file lacks: {missing}"


@pytest.mark.parametrize(("name", "field_name"), _cases())
def test_each_field_changes_the_calibrated_model(name, field_name, single_thread):
    field = next(f for f in dataclasses.fields(METHODS[name]) if f.name == field_name)
    if (name, field_name) in OWN_TEST:
        pytest.skip(f"shown by {OWN_TEST[(name, field_name)]}")
    context = CONTEXT.get((name, field_name), {})
    baseline = _baseline(name, tuple(sorted(context.items())))
    if (name, field_name) in SAME_NUMBERS:
        value, why = SAME_NUMBERS[(name, field_name)]
        out = _output(name, **context, **{field_name: value})
        torch.testing.assert_close(out, baseline, rtol=1e-4, atol=1e-5, msg=f"{name}.{field_name}: {why}")
        return
    value = _other_value(name, field)
    out = _output(name, **context, **{field_name: value})
    assert not torch.equal(out, baseline), f"{name}.{field_name}={value!r} left the calibrated output as it was"


def test_ptq4vit_float_v_quirk_scores_the_split_against_float_v(monkeypatch, single_thread):
    """The quirk's effect is on the softmax split's search: its error is measured with float V, not quantized V
    (the tiny model picks the same split either way, so the output cannot show it)."""
    from regcache.quant.methods import ptq4vit

    seen: list[bool] = []
    original = ptq4vit._attention_output

    def recording(probs_q, v, d, r):
        seen.append(torch.equal(v, d["v"][r]))  # is the V the split is scored against the float V?
        return original(probs_q, v, d, r)

    monkeypatch.setattr(ptq4vit, "_attention_output", recording)
    for quirk in (False, True):
        seen.clear()
        _output("ptq4vit", softmax_search_float_v_quirk=quirk)
        assert seen and all(s == quirk for s in seen), (quirk, seen)
