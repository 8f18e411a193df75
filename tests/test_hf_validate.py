"""`regcache validate` on a tiny transformers CLIP tower (hf:<folder>): patch-token fidelity, both deletion modes."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml
from hf_tiny import make_hf
from test_model_families_cli import colors  # noqa: F401  (the tiny colour dataset fixture)

from regcache.lightning_cli import main as validate_main


@pytest.mark.parametrize("mode", ["drop", "keep"])
def test_validate_hf_tower_reports_patch_token_fidelity(mode, tmp_path, colors, single_thread):  # noqa: F811
    make_hf("clip_proj").save_pretrained(tmp_path / "tower")
    search = {"objective": "cosine", "search_images": 6, "sweep_images": 6, "num_candidates": 2, "l_q": 1}
    search |= {"taus": [1], "delete_ks": [1], "modes": ["both"], "delete_mode": mode}
    piece = {
        "seed_everything": 0,
        "trainer": {
            "accelerator": "cpu",
            "devices": 1,
            "enable_progress_bar": False,
            "callbacks": [{"class_path": "callbacks.register_search.RegisterSearch", "init_args": search}],
        },
        "model": {
            "model": f"hf:{tmp_path / 'tower'}",
            "method": "naive",
            "w_bits": 8,
            "a_bits": 8,
            "run_dir": str(tmp_path / "run"),
        },
        "data": {
            "root": str(colors),
            "datasets": {"colors": {"calib_split": "train", "calib_size": 6, "ref_split": "train", "ref_size": 6}},
            "calibration": "colors",
            "reference": "colors",
            "batch_size": 6,
            "num_workers": 0,
        },
    }
    path = tmp_path / "hf.yaml"
    path.write_text(yaml.safe_dump(piece))
    assert validate_main(["--config", str(Path("train_configs/base.yaml")), "--config", str(path)]) == 0
    result = json.loads((tmp_path / "run" / "metrics.json").read_text())
    metrics = result["metrics"]
    assert result["regcache"]["k_delete"] == 1 and result["regcache"]["delete_mode"] == mode
    assert 0.0 < metrics["colors/patch_token_cosine_to_float"] <= 1.0 + 1e-6
    assert metrics["colors/patch_token_min_cosine_to_float"] <= metrics["colors/patch_token_cosine_to_float"]
    assert -1.0 <= metrics["colors/patch_pooled_cosine_to_float"] <= 1.0 + 1e-6
    # 4 x 4 patches: drop leaves 15 of them in the output, keep the whole grid
    assert metrics["colors/patch_token_coverage"] == pytest.approx(15 / 16 if mode == "drop" else 1.0)
    assert 0.0 < metrics["colors/feature_cosine_to_float"] <= 1.0 + 1e-6
    assert torch.isfinite(torch.tensor(metrics["colors/knn_top1"]))
