"""The method's configuration, typed end to end: keys and values checked against the method's dataclass,
the effective fields in --print_config, the methods in --help and `regcache methods`."""

from __future__ import annotations

import inspect
import re

import pytest
import yaml

from regcache.lightning_cli import ConfigError, check_args
from regcache.lightning_cli import main as validate_main
from regcache.method_listing import main as methods_main
from regcache.module import build_quant_config
from regcache.quant import METHODS, MethodConfigError, method_config
from regcache.quant.api import BITS_FIELDS, field_types
from regcache.quant.methods import NoisyQuantConfig, RepQViTConfig

DEMO = ["--config", "train_configs/demo.yaml"]


@pytest.fixture(autouse=True)
def _repo_root(monkeypatch):
    from pathlib import Path

    monkeypatch.chdir(Path(__file__).resolve().parents[1])


def _options(name: str) -> list[str]:
    return [f for f in field_types(METHODS[name]) if f not in BITS_FIELDS]


@pytest.mark.parametrize("name", sorted(METHODS))
def test_unknown_key_names_it_and_lists_the_fields(name):
    with pytest.raises(MethodConfigError) as info:
        method_config(name, 6, 6, {"not_a_field": 1})
    message = str(info.value)
    assert "'not_a_field'" in message and all(f in message for f in _options(name)), message


def test_wrong_type_unknown_method_bits_and_float_options():
    with pytest.raises(MethodConfigError, match=r"noisyquant\.seed must be int, got 'abc'"):
        method_config("noisyquant", 6, 6, {"seed": "abc"})
    with pytest.raises(MethodConfigError, match=r"repq_vit\.quantize_head must be bool"):
        method_config("repq_vit", 6, 6, {"quantize_head": 1})
    with pytest.raises(MethodConfigError, match=r"search_tokens must be int \| None"):
        NoisyQuantConfig(search_tokens=2.5)
    with pytest.raises(ValueError, match=r"w_bits must be an integer in \[2, 8\]"):
        method_config("naive", 9, 8)
    with pytest.raises(MethodConfigError, match="set with the bits"):
        method_config("naive", 8, 8, {"w_bits": 4})
    with pytest.raises(MethodConfigError, match="mixed, naive, noisyquant, ptq4vit, qdrop, repq_vit"):
        build_quant_config("nope", 8, 8)
    with pytest.raises(MethodConfigError, match="takes no options"):
        build_quant_config("float", 8, 8, {"seed": 1})
    # valid values pass, integers where floats are declared too; the options round-trip
    config = method_config("repq_vit", 4, 4, {"percentiles": [1, 0.99]})
    assert config.percentiles == (1.0, 0.99)
    assert method_config("repq_vit", 4, 4, config.options()) == config


def test_cli_rejects_unknown_key_and_bad_value_at_start_up():
    with pytest.raises(ConfigError) as info:
        check_args([*DEMO, "--model.method_options", "{bogus: 1}"])
    assert "'bogus'" in str(info.value) and "quantize_matmuls" in str(info.value)
    with pytest.raises(ConfigError, match=r"naive\.quantize_matmuls must be bool"):
        check_args([*DEMO, "--model.method_options", "{quantize_matmuls: maybe}"])
    with pytest.raises(ConfigError, match="one of: mixed, naive, noisyquant, ptq4vit, qdrop, repq_vit"):
        check_args([*DEMO, "--model.method", "nope"])


def test_print_config_shows_every_field_of_the_method(capsys):
    with pytest.raises(SystemExit) as info:
        validate_main([*DEMO, "--model.method", "noisyquant", "--model.method_options", "{seed: 3}", "--print_config"])
    assert info.value.code in (0, None)
    model = yaml.safe_load(capsys.readouterr().out)["model"]
    expected = NoisyQuantConfig(w_bits=6, a_bits=6, seed=3).options()
    assert model["method_options"] == expected and list(model["method_options"]) == _options("noisyquant")
    assert (model["w_bits"], model["a_bits"]) == (6, 6)


def test_help_lists_the_methods_and_the_listing_shows_their_fields(capsys):
    with pytest.raises(SystemExit):
        validate_main(["--help"])
    text = " ".join(capsys.readouterr().out.split())
    # the library's methods (other test modules register methods of their own when collected)
    builtin = [name for name, cls in METHODS.items() if cls.__module__.startswith("regcache.")]
    assert builtin and all(f"``{name}``" in text for name in builtin) and "regcache methods" in text
    assert methods_main([]) == 0
    listing = capsys.readouterr().out
    for name in METHODS:
        assert f"{name} ({METHODS[name].__name__})" in listing
        assert all(f"model.method_options.{f})" in listing for f in _options(name))
    assert methods_main(["nope"]) == 2


@pytest.mark.parametrize("name", sorted(METHODS))
def test_every_field_is_read_by_its_method(name):
    """A field either acts or is gone: each one is read (``self.<field>`` / ``config.<field>``) by its method's code."""
    source = inspect.getsource(inspect.getmodule(METHODS[name]))
    unread = [f for f in _options(name) if not re.search(rf"\b(self|config)\.{f}\b", source)]
    assert not unread, f"{name}: fields no code reads: {unread}"


def test_calibration_metadata_fields_are_gone():
    for cls in (NoisyQuantConfig, RepQViTConfig):
        fields = field_types(cls)
        assert "num_calibration_images" not in fields and "class_balanced_calibration" not in fields
        assert cls.reference() == cls(
            **{**cls.reference().options(), "w_bits": cls.reference().w_bits, "a_bits": cls.reference().a_bits}
        )
