"""QDQ ONNX export in ONNX Runtime against the project's own output, and ``regcache validate`` / ``export`` deployed.

Tolerance of the ONNX Runtime comparison: the graph holds the simulation's codes and scales, so ONNX
Runtime computes the same function in float32 with its own kernels (its QDQ fusions run integer
GEMMs on the codes, other ops a different summation order). Per image the embeddings then differ by
float32 rounding (median relative L2 difference <= 2e-6, ~10 ulps accumulated through the blocks) except
where such a rounding moves an activation across a quantization boundary (one code, one step), as
between the simulation and the integer path (tests/test_deploy.py); the max is bounded loosely for that.
"""

from __future__ import annotations

import copy
import json

import pytest
import torch
from conftest import DEMO_CONFIG, DEMO_SMALL, images, install_random_prefix, make_model

from regcache.deploy import DeployConfig, DeployError, deploy_
from regcache.encoders import adapt
from regcache.quant import METHODS, calibrate_, quantize_
from regcache.quant.modules import QuantConv2d, QuantLinear, quantizers
from regcache.registers import install_deletion

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")
pytestmark = pytest.mark.usefixtures("single_thread")


def _calibrated(method: str, bits: int, regcache: bool):
    encoder = adapt(make_model("clip"))
    if regcache:
        install_random_prefix(encoder)
        install_deletion(encoder, 1, 2)
    quantize_(encoder, METHODS[method](w_bits=bits, a_bits=bits))
    calibrate_(encoder, [images("clip", n=8, seed=100 + i) for i in range(2)], progress=False)
    return encoder


def _run(path, x: torch.Tensor, optimized: bool) -> torch.Tensor:
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    if not optimized:  # the graph as written: constant folding and redundant nodes only, no fused integer kernels
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    return torch.from_numpy(session.run(None, {"images": x.numpy()})[0])


@pytest.mark.parametrize(
    ("method", "bits", "attention", "regcache", "optimized"),
    [
        ("naive", 8, "float", True, True),
        ("naive", 8, "int8", True, True),
        # RepQ-ViT's asymmetric per-channel weights: ONNX Runtime's extended (fused integer) optimizations
        # give ~1e-2 relative differences on them (onnxruntime 1.32); the graph as written matches
        ("repq_vit", 6, "float", False, False),
        ("repq_vit", 8, "float", True, False),
    ],
)
def test_qdq_graph_in_onnxruntime_matches_the_project(tmp_path, method, bits, attention, regcache, optimized):
    from regcache.deploy.export import export_onnx, reference_output

    encoder = _calibrated(method, bits, regcache)
    config = DeployConfig(attention, "reference")
    x = images("clip", n=16, seed=5)
    summary = export_onnx(encoder, tmp_path / "model.onnx", x[:2], config)
    model = onnx.load(str(tmp_path / "model.onnx"))
    onnx.checker.check_model(model)
    assert [i.name for i in model.graph.input] == ["images"]  # registers and codes are constants, not inputs
    linears = [m for m in encoder.modules() if isinstance(m, (QuantLinear, QuantConv2d))]
    activations = [
        name
        for name, q in quantizers(encoder)
        if not name.endswith("weight_quantizer") and (attention == "int8" or ".matmul_" not in name)
    ]

    # a quantizer without an exact 8-bit pair (fewer levels; a zero point outside the storage type, uint8 for
    # [0, 255], int8 for [-128, 127]: RepQ-ViT's mean of per-channel zero points can leave it) is its formula
    def outside_storage(q) -> bool:
        lo, hi = (0, 255) if q.qmax > 127 else (-128, 127)
        return (q.qmin, q.qmax) != (lo, hi) or not lo <= float(q.zero_point) <= hi

    outside = [n for n in activations if outside_storage(encoder.get_submodule(n))]
    assert sorted(summary["formula_quantizers"]) == sorted(outside)
    qdq = len(activations) - len(outside)
    assert summary["quantize_linear"] == qdq  # one QDQ pair per active activation quantizer
    assert summary["int8_weight_initializers"] == len(linears)
    assert summary["dequantize_linear"] == qdq + len(linears)  # + one per-axis DQ per weight
    got, want = _run(tmp_path / "model.onnx", x, optimized), reference_output(encoder, x, config)
    rel = (got - want).norm(dim=-1) / want.norm(dim=-1)
    assert float(rel.median()) <= 2e-6
    assert float(rel.max()) <= 5e-2
    if regcache:  # the register K/V are in the graph: the model without them is far from it
        bare = copy.deepcopy(encoder)
        for b in bare.blocks:
            b.attn.prefix = None
        assert float(((got - reference_output(bare, x, config)).norm(dim=-1) / want.norm(dim=-1)).median()) > 1e-3


def test_export_refuses_a_deployed_encoder_and_keep_mode(tmp_path):
    from regcache.deploy.export import export_onnx

    encoder = _calibrated("naive", 8, False)
    deployed = copy.deepcopy(encoder)
    deploy_(deployed, DeployConfig(backend="reference"))
    with pytest.raises(DeployError, match="fake-quant encoder"):
        export_onnx(deployed, tmp_path / "m.onnx", images("clip", n=1))
    install_deletion(encoder, 1, 2, mode="keep")
    with pytest.raises(DeployError, match="mode='keep'"):
        export_onnx(encoder, tmp_path / "m.onnx", images("clip", n=1))


def test_validate_deployed_gives_the_simulations_zero_shot_and_export_writes_onnx(tmp_path):
    """The small demo config: simulation, then ``regcache export`` of the same run deployed (int8 attention, as
    the naive method's simulation quantizes Q.K^T / P.V); the same artifacts, so the same registers and state."""
    from regcache.cli import main as cli_main

    def demo_args(run_dir):
        return ["--config", str(DEMO_CONFIG), f"--model.run_dir={run_dir}", *DEMO_SMALL]

    shared = [f"--model.artifacts_dir={tmp_path / 'artifacts'}"]
    sim_dir, dep_dir = tmp_path / "sim", tmp_path / "dep"
    assert cli_main(["validate", *demo_args(sim_dir), *shared]) == 0
    deploy = ["--model.deploy.attention=int8", "--model.deploy.backend=reference", "--output", str(tmp_path / "m.onnx")]
    assert cli_main(["export", *demo_args(dep_dir), *shared, *deploy]) == 0
    sim = json.loads((sim_dir / "metrics.json").read_text())
    dep = json.loads((dep_dir / "metrics.json").read_text())
    assert dep["metrics"] == sim["metrics"]  # zero-shot top-1 / top-5 / recall identical
    assert sim["run_record"]["deploy"] == {"path": "simulation"}
    assert dep["run_record"]["deploy"] == {"path": "integer", "backend": "reference", "attention": "int8"}
    assert dep["deploy"]["int8_attention"] and dep["deploy"]["fused_norms"]
    assert dep["regcache"]["tau"] == sim["regcache"]["tau"] and dep["calibration"]["key"] == sim["calibration"]["key"]
    check = dep["export"]["check"]
    assert (tmp_path / "m.onnx").is_file() and check["images"] == 8 and check["median_rel_diff"] <= 2e-6


def test_readme_deploy_snippet_runs(tmp_path, monkeypatch):
    import re
    from pathlib import Path

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    section = readme.split("## Deploy", 1)[1]
    snippet = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    monkeypatch.chdir(tmp_path)
    namespace: dict = {}
    exec(compile(snippet, "README.md (Deploy)", "exec"), namespace)
    assert (tmp_path / "encoder.onnx").is_file()
    assert namespace["report"].backend == "reference" and namespace["report"].linears
