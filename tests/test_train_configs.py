"""The paper's grid in train_configs/: generated from the pieces, up to date, and parseable by the CLI."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import yaml

from regcache.lightning_cli import compose
from regcache.lightning_cli import main as validate_main

CONFIGS = Path(__file__).resolve().parents[1] / "train_configs"


def _grid() -> dict[str, str]:
    spec = importlib.util.spec_from_file_location("make_grid", CONFIGS / "make_grid.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.grid()


def test_grid_is_up_to_date():
    expected = _grid()
    on_disk = {p.name: p.read_text() for p in (CONFIGS / "grid").glob("*.yaml")}
    assert on_disk == expected, "run `python train_configs/make_grid.py`"
    # 5 models × (float + 4 methods × 3 bit widths × with/without RegCache)
    assert len(expected) == 5 * (1 + 4 * 3 * 2)


@pytest.mark.parametrize("name", sorted(_grid()))
def test_every_grid_config_composes(name):
    config = compose(CONFIGS / "grid" / name)
    model = config["model"]
    assert model["model"] and ("pretrained" in model)
    assert model["method"] in ("float", "naive", "ptq4vit", "repq_vit", "noisyquant")
    assert ("RegisterSearch" in str(config["trainer"].get("callbacks"))) == name.endswith("_regcache.yaml")
    assert config["data"]["root"] == "data/clip_benchmark"


def test_print_config_of_a_grid_entry(capsys):
    with pytest.raises(SystemExit) as exit_info:
        validate_main(
            [
                "--config",
                str(CONFIGS / "grid" / "siglip2_b16_naive_w6a6_regcache.yaml"),
                "--data.root=/datasets",
                "--print_config",
            ]
        )
    assert exit_info.value.code in (0, None)
    out = capsys.readouterr().out
    assert "model: ViT-B-16-SigLIP2" in out and "root: /datasets" in out and "w_bits: 6" in out
    assert "callbacks.register_search.RegisterSearch" in out


@pytest.mark.parametrize(("given", "expected"), [("1", 1), ("3", 3), ("0.25", 0.25), ("1.0", 1.0)])
def test_limit_val_batches_int_is_batches_float_is_fraction(capsys, given, expected):
    with pytest.raises(SystemExit) as exit_info:
        validate_main(
            [
                "--config",
                str(CONFIGS / "grid" / "siglip2_b16_naive_w6a6.yaml"),
                f"--trainer.limit_val_batches={given}",
                "--trainer.limit_test_batches",
                given,
                "--print_config",
            ]
        )
    assert exit_info.value.code in (0, None)
    trainer = yaml.safe_load(capsys.readouterr().out)["trainer"]
    for key in ("limit_val_batches", "limit_test_batches"):
        assert trainer[key] == expected and type(trainer[key]) is type(expected), (key, trainer[key])
