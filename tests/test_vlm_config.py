"""The LLaVA-1.5 tower config (train_configs/vlm/): patch_cosine by hand, its readout under both deletion
modes, the config's settings through `regcache validate` on a tiny transformers CLIP, and the shipped file parsing."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml
from hf_tiny import hf_images, make_hf
from test_model_families_cli import colors  # noqa: F401  (the tiny colour dataset fixture)

from regcache.encoders import adapt
from regcache.eval.patch_tokens import encode_patch_tokens
from regcache.lightning_cli import compose
from regcache.lightning_cli import main as validate_main
from regcache.registers import install_deletion, make_objective

ROOT = Path(__file__).resolve().parents[1]
VLM_CONFIG = ROOT / "train_configs/vlm/llava15_clip_l14_336.yaml"


def test_patch_cosine_is_the_mean_per_token_cosine_of_the_present_tokens():
    nan = float("nan")
    # image 0: three tokens, all present; image 1: the middle position is absent (a dropped token)
    tokens = torch.tensor([[[1.0, 0.0], [1.0, 1.0], [0.0, 2.0]], [[3.0, 4.0], [nan, nan], [-1.0, 0.0]]])
    floats = torch.tensor([[[1.0, 0.0], [1.0, 0.0], [0.0, -1.0]], [[4.0, 3.0], [5.0, 5.0], [1.0, 0.0]]])
    image0 = (1.0 + 2**-0.5 + -1.0) / 3  # cos 0, 45 and 180 degrees
    image1 = (24.0 / 25.0 + -1.0) / 2  # (3,4).(4,3) / 25, then opposite; the absent token does not count
    objective = make_objective("patch_cosine")
    assert objective(tokens, floats) == pytest.approx((image0 + image1) / 2, abs=1e-6)
    assert objective.greater_is_better
    with pytest.raises(ValueError, match="patch-token grids"):
        objective(tokens[:, :2], floats)


@pytest.mark.parametrize("mode", ["drop", "keep"])
def test_patch_cosine_readout_is_the_grid_with_dropped_positions_absent(mode, single_thread):
    encoder = adapt(make_hf("clip", num_layers=3))
    install_deletion(encoder, 1, 2, mode)
    x = hf_images(3)
    _, tokens, positions = encode_patch_tokens(encoder, x)
    objective = make_objective("patch_cosine")
    with torch.no_grad():
        grid = objective.readout(encoder, encoder.forward_blocks(encoder.embed(x)))
    assert grid.shape == (3, 16, 32)
    if mode == "keep":  # the whole grid, as patch-token fidelity reads it
        assert positions is None and torch.equal(grid, tokens)
    else:  # the kept tokens at their grid positions, the two dropped ones NaN
        assert positions.shape == (3, 14)
        absent = grid.isnan().all(dim=-1)
        assert absent.sum(dim=1).tolist() == [2, 2, 2] and not grid[~absent].isnan().any()
        assert torch.equal(grid.gather(1, positions.unsqueeze(-1).expand(3, 14, 32)), tokens)
    assert objective(grid, grid.nan_to_num(0.0)) == pytest.approx(1.0, abs=1e-6)  # the float-vs-self score


def _tiny_vlm_run(tower: Path, run_dir: Path, root: Path) -> dict:
    """The shipped VLM config with its model path, data and search sizes brought down to the tiny tower."""
    config = compose(VLM_CONFIG)
    (search,) = config["trainer"]["callbacks"]
    args = search["init_args"]
    assert (args["objective"], args["delete_mode"], config["model"]["feature_layer"]) == ("patch_cosine", "keep", -2)
    args |= {"search_images": 6, "sweep_images": 6, "num_candidates": 2, "l_q": 1, "taus": [1], "delete_ks": [1]}
    args |= {"modes": ["both"], "eval_batch_size": None}
    config["trainer"] |= {"accelerator": "cpu", "enable_progress_bar": False}
    config["model"] |= {"model": f"hf:{tower}", "run_dir": str(run_dir)}
    config["data"] = {
        "root": str(root),
        "datasets": {"colors": {"calib_split": "train", "calib_size": 6, "ref_split": "train", "ref_size": 6}},
        "calibration": "colors",
        "reference": "colors",
        "batch_size": 6,
        "num_workers": 0,
    }
    return config


def test_vlm_config_settings_validate_a_tiny_hf_clip(tmp_path, colors, single_thread):  # noqa: F811
    make_hf("clip_proj", num_layers=3).save_pretrained(tmp_path / "tower")
    config = _tiny_vlm_run(tmp_path / "tower", tmp_path / "run", colors)
    path = tmp_path / "vlm_tiny.yaml"
    path.write_text(yaml.safe_dump(config))
    assert validate_main(["--config", str(path)]) == 0
    result = json.loads((tmp_path / "run" / "metrics.json").read_text())
    metrics, rc = result["metrics"], result["regcache"]
    assert (rc["objective"], rc["delete_mode"], rc["k_delete"]) == ("patch_cosine", "keep", 1)
    assert 0.0 < rc["objective_score"] <= 1.0 + 1e-6 and result["feature_layer"] == -2
    assert metrics["colors/patch_token_coverage"] == pytest.approx(1.0)  # keep: the whole 4 x 4 grid
    assert 0.0 < metrics["colors/patch_token_cosine_to_float"] <= 1.0 + 1e-6
    assert metrics["colors/patch_token_min_cosine_to_float"] <= metrics["colors/patch_token_cosine_to_float"]
    (spec,) = (tmp_path / "run" / "register_search").glob("*/spec.json")
    assert json.loads(spec.read_text())["model"]["feature_layer"] == -2  # in the search's artifact key


def test_feature_layer_from_config_refuses_other_families():
    from regcache.module import QuantizedEncoder

    with pytest.raises(ValueError, match=r"model\.feature_layer.*transformers towers"):
        QuantizedEncoder(model="regcache-tiny-vit", feature_layer=-2)


def test_shipped_vlm_config_parses_with_a_local_tower(tmp_path, capsys, monkeypatch):
    make_hf("clip_proj").save_pretrained(tmp_path / "tower")
    monkeypatch.chdir(ROOT)
    with pytest.raises(SystemExit) as exc:
        validate_main(["--config", str(VLM_CONFIG), "--model.model", f"hf:{tmp_path / 'tower'}", "--print_config"])
    assert exc.value.code in (0, None)
    parsed = yaml.safe_load(capsys.readouterr().out)
    assert parsed["model"]["model"] == f"hf:{tmp_path / 'tower'}" and parsed["model"]["feature_layer"] == -2
    (search,) = parsed["trainer"]["callbacks"]
    assert search["init_args"]["objective"] == "patch_cosine" and search["init_args"]["delete_mode"] == "keep"
