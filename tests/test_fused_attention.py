"""The fused quantized attention (regcache.quant.fused_attention) against the explicit Attention path.

The kernel runs on CPU under Triton's interpreter (TRITON_INTERPRET=1, in a subprocess: the flag is
read at import). It is not bit-identical to the explicit path (fused softmax): a probability on a
quantization boundary may take the neighbouring code. The tests bound the fraction of probability
codes that differ, check that each differs by at most one level, and bound the output difference
in quantization steps (flips per row x step x max |v|) plus the dtype's rounding.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]

# Shared by the interpreter run (CPU) and the CUDA run: builds attention layers with realistic
# quantizers, runs the explicit and the fused path on the same q / k / v and measures the difference.
_NUMERICS = """
import json, math, sys, torch
from torch import nn
from regcache.encoders.base import Attention, AttentionPrefix
from regcache.quant import UniformQuantizer, fused_attention as fa
from regcache.quant.log_quantizers import LogSqrt2Quantizer
from regcache.quant.twin_uniform import TwinSoftmaxQuantizer

DEVICE, B, H, N, D = {device!r}, {batch}, {heads}, {tokens}, {head_dim}
from regcache import kernels
EXACT = {exact}  # eager rounding op for op, or the fast float32 kernel
# several key tiles per row (the two-pass softmax is exercised); the unquantized case runs the kernel
# (float mode), not SDPA
kernels.set_kernel_config(fused_attention_tile=tuple({tile}), fused_attention_exact=EXACT, float_sdpa=False)
# max flipped-code fraction, and output rounding tolerance relative to max |out|, per dtype
FLIP_BOUND = {{torch.float32: 1e-3, torch.bfloat16: 2e-3}}
OUT_RTOL = {{torch.float32: 1e-5, torch.bfloat16: 2.0**-7}}
g = torch.Generator().manual_seed(0)


def qkv(dtype):
    # ViT-like: a shared direction makes rows peaky; token 0 is a sink key every query attends to
    mean = torch.randn(D, generator=g)
    q = torch.randn(B, H, N, D, generator=g) * 1.2 + mean
    k = torch.randn(B, H, N, D, generator=g) * 1.2
    k[:, :, 0] += 2.0 * mean
    v = torch.randn(B, H, N, D, generator=g)
    return (t.to(DEVICE, dtype) for t in (q, k, v))


def prefixes(dtype):
    shared = AttentionPrefix(torch.randn(1, H, 1, D, generator=g) * 2, torch.randn(1, H, 1, D, generator=g),
                             torch.full((1, 1, 1, 1), math.log(4.0)))
    lm = torch.log(torch.tensor([1.0, 3.0])).view(1, 1, 1, 2) + torch.arange(B).view(B, 1, 1, 1) * math.log(2)
    per_sample = AttentionPrefix(torch.randn(B, H, 2, D, generator=g) * 2, torch.randn(B, H, 2, D, generator=g), lm)
    no_tau = AttentionPrefix(torch.randn(1, H, 1, D, generator=g) * 2, torch.randn(1, H, 1, D, generator=g))
    return {{"none": None, "1 entry, tau 4": shared, "2 per sample": per_sample, "1 entry, no tau": no_tau}}


def quantizer(name, probs):
    if name == "float":
        return None, 0.0
    if name == "uniform8":  # naive's min-max asymmetric per tensor
        q = UniformQuantizer(8, symmetric=False).calibrate_(probs)
        step = float(q.scale)
    elif name == "uniform6_head":  # PTQ4ViT without twin softmax: one symmetric step per head
        q = UniformQuantizer(6, symmetric=True, granularity="channel", axis=1).calibrate_(probs)
        step = float(q.scale.max())
    elif name.startswith("log"):  # RepQ-ViT's log-sqrt2, percentile search
        q = LogSqrt2Quantizer(int(name[3:])).calibrate_(probs)
        step = None
    else:  # PTQ4ViT twin uniform, split 2^-4
        q = TwinSoftmaxQuantizer(6, additive_quirk=name == "twin6_additive")
        q.set_split(2.0**-4)
        step = 1 / (2**5 - 1)  # the coarse range's step
    q.set_mode("quant")
    return q.to(DEVICE), step


def one_level(pf, pe, name, step, tau):
    # how far (in levels) a differing probability moved: at most one level of its range
    d = (pf.float() - pe.float()).abs()
    if name.startswith("log"):  # adjacent log-sqrt2 levels differ by a factor sqrt(2) (or lowest level <-> 0)
        hi = torch.maximum(pf.float(), pe.float())
        return bool((d <= hi * (1 - 2**-0.5) * 1.02 + 1e-7).all())
    return bool((d <= step * tau * 1.02 + 1e-7).all())


results = []
for dtype in (torch.float32, torch.bfloat16):
    q, k, v = qkv(dtype)
    ref_probs = ((q.float() @ k.float().transpose(-2, -1)) * D**-0.5).softmax(-1)
    for qname in ("float", "uniform8", "uniform6_head", "log4", "log8", "twin6", "twin6_additive"):
        pq, step = quantizer(qname, ref_probs)
        attn = Attention(nn.Linear(H * D, 3 * H * D), nn.Linear(H * D, H * D), H).to(DEVICE)
        attn.matmul_pv.a_quantizer = pq
        if qname == "uniform8":  # naive also quantizes Q, K and V (outside the kernel, as the explicit path)
            for mm, a, b in ((attn.matmul_qk, q, k.transpose(-2, -1)), (attn.matmul_pv, None, v)):
                if a is not None:
                    mm.a_quantizer = UniformQuantizer(8, symmetric=False).to(DEVICE).calibrate_(a)
                    mm.a_quantizer.set_mode("quant")
                mm.b_quantizer = UniformQuantizer(8, symmetric=False).to(DEVICE).calibrate_(b)
                mm.b_quantizer.set_mode("quant")
        for pname, prefix in prefixes(dtype).items():
            prefix = None if prefix is None else prefix.to(DEVICE)
            attn.prefix = prefix
            lm = None if prefix is None else prefix.log_multiplicity
            tau = 1.0 if lm is None else float(lm.exp().max())
            with torch.no_grad():
                fa.set_enabled(False)
                qq = attn.matmul_qk.quantize_a(q)
                kq = attn.matmul_qk.quantize_b(k.transpose(-2, -1)).transpose(-2, -1)
                vq = attn.matmul_pv.quantize_b(v)
                if EXACT:  # reference: the eager path itself, op for op in the activation dtype
                    ref, ref_in = attn, (q, k, v)
                else:  # reference: the explicit path in float32 on the kernel's (already quantized) inputs
                    ref = Attention(nn.Linear(H * D, 3 * H * D), nn.Linear(H * D, H * D), H).to(DEVICE)
                    ref.matmul_pv.a_quantizer = pq
                    ref_in = (qq.float(), kq.float(), vq.float())
                    if prefix is not None:
                        ref.prefix = AttentionPrefix(prefix.keys.to(dtype).float(), prefix.values.to(dtype).float(),
                                                     prefix.log_multiplicity)
                seen = {{}}
                hooks = [ref.tap_probs.register_forward_hook(lambda m, i, o: seen.update(raw=o))]
                if pq is not None:
                    hooks.append(pq.register_forward_hook(lambda m, i, o: seen.update(p=o)))
                explicit = ref.attend(*ref_in)
                for h in hooks:
                    h.remove()
                pe = seen.get("p", seen["raw"])
                if pq is not None and prefix is not None and prefix.log_multiplicity is not None:
                    lm = prefix.log_multiplicity.reshape(-1, 1, 1, prefix.num_entries)
                    ones = torch.ones(*lm.shape[:3], N, device=DEVICE, dtype=pe.dtype)
                    pe = pe * torch.cat([lm.exp().to(pe.dtype), ones], -1)  # as the explicit path's `* factor`
                pe = pe.to(dtype)  # the kernel stores its probabilities in the activation dtype
                fa.set_enabled(True)
                fused = attn.attend(q, k, v)
                assert fused is not None and fused.shape == explicit.shape and fused.dtype == dtype
                operands = (attn.matmul_qk.a_quantizer, attn.matmul_qk.b_quantizer, attn.matmul_pv.b_quantizer)
                fold = fa.operand_fold(attn, operands, q.device)
                if qname == "uniform8":  # naive's per-tensor Q / K / V quantizers run inside the kernel
                    assert fold is not None and fold[1] == 7, fold
                ins, kw = (qq, kq, vq), {{}}
                if fold is not None:
                    ins, kw = (q, k, v), dict(operand_params=fold[0], operand_mask=fold[1])
                (pk, pv, bias, fac, qp), c = fa.prepare(q, attn.scale, pq, prefix)
                again, pf = fa.launch(*ins, pk, pv, bias, fac, qp, **c, **kw, store_probs=True)
                assert torch.equal(again, fused)  # the Attention wiring ran this very kernel
            flips = (pf != pe)
            out_diff = (fused.float() - explicit.float()).abs().max().item()
            vmax = vq.float().abs().max().item()
            if prefix is not None:
                vmax = max(vmax, prefix.values.float().abs().max().item())
            row_flips = int(flips.sum(-1).max())
            rtol = OUT_RTOL[dtype] * explicit.float().abs().max().item()
            row = {{"dtype": str(dtype)[6:], "quantizer": qname, "prefix": pname,
                    "flip_fraction": flips.float().mean().item(), "max_flips_per_row": row_flips,
                    "out_max_abs_diff": out_diff, "prob_max_abs_diff": (pf.float() - pe.float()).abs().max().item()}}
            if pq is not None:  # the comparison is not vacuous: quantization moved most token probabilities
                npre = 0 if prefix is None else prefix.num_entries
                assert (pe[..., npre:] != seen["raw"][..., npre:]).float().mean() > 0.5
            else:
                row["flip_fraction"] = row["max_flips_per_row"] = None  # no codes to flip
            if pq is None:  # no codes: the probabilities themselves agree to the dtype's rounding
                assert row["prob_max_abs_diff"] <= 4 * OUT_RTOL[dtype], row
                assert out_diff <= 4 * rtol + 1e-6, row
            else:
                assert row["flip_fraction"] <= FLIP_BOUND[dtype], row
                assert one_level(pf[flips], pe[flips], qname, step, tau), row
                level = step if step is not None else float(pq.scale) * (1 - 2**-0.5)
                row["out_diff_in_steps"] = out_diff / (level * tau * vmax)
                assert out_diff <= row_flips * level * tau * vmax * 1.02 + 2 * rtol + 1e-6, row
            results.append(row)
            print(json.dumps(row), file=sys.stderr, flush=True)  # progress, for runs cut short
print("ok", json.dumps(results))
"""


def _run_interpreted(script: str) -> str:
    path = os.pathsep.join(p for p in (str(ROOT), str(ROOT / "tests"), os.environ.get("PYTHONPATH", "")) if p)
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": path}
    res = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, cwd=ROOT)
    assert res.returncode == 0, res.stderr[-4000:]
    assert res.stdout.startswith("ok"), res.stdout[-2000:]
    return res.stdout


@pytest.mark.parametrize("exact", [True, False], ids=["exact", "fast"])
def test_fused_attention_matches_explicit_under_triton_interpreter(exact):
    """Every probability quantizer x prefix x dtype, on CPU through the interpreter, against the explicit path.

    Exact kernel against Attention.attend op for op; fast kernel against the explicit path computed
    in float32 on the same inputs. Two passes over 32-key tiles (45 keys: a partial last tile).
    """
    pytest.importorskip("triton")
    script = _NUMERICS.format(device="cpu", batch=2, heads=2, tokens=45, head_dim=64, tile=[32, 32], exact=exact)
    rows = json.loads(_run_interpreted(textwrap.dedent(script))[3:])
    assert len(rows) == 2 * 7 * 4


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("exact", [True, False], ids=["exact", "fast"])
def test_fused_attention_matches_explicit_cuda(exact):
    """The same bounds on the GPU, at ViT-B/16 shapes (197 tokens, head dim 64)."""
    pytest.importorskip("triton")
    script = _NUMERICS.format(device="cuda", batch=4, heads=12, tokens=197, head_dim=64, tile=[64, 16], exact=exact)
    path = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH", "")) if p)
    env = {**os.environ, "PYTHONPATH": path}
    res = subprocess.run([sys.executable, "-c", textwrap.dedent(script)], env=env, capture_output=True, text=True)
    assert res.returncode == 0, res.stderr[-4000:]
    for row in json.loads(res.stdout[3:]):
        print(row)


_WIRING = """
import torch
from conftest import images, install_random_prefix, make_model
from regcache.encoders import adapt, record
from regcache.quant import NaiveConfig, calibrate_, quantize_, fused_attention as fa
from regcache.quant.methods.repq_vit import RepQViTConfig

launches = [0]
real_launch = fa.launch
def counting_launch(*args, **kwargs):
    launches[0] += 1
    return real_launch(*args, **kwargs)
fa.launch = counting_launch


def build(config):
    enc = adapt(make_model("dinov2")).eval()
    install_random_prefix(enc)
    quantize_(enc, config)
    calibrate_(enc, [images("dinov2", 4, seed=3)], progress=False)
    return enc


x = images("dinov2", 3)
for config in (NaiveConfig(8, 8), RepQViTConfig(w_bits=8, a_bits=4)):
    fa.set_enabled(True)
    launches[0] = 0
    enc = build(config)
    assert launches[0] == 0, "calibration (observers) must keep the explicit attention"
    fa.set_enabled(False)
    ref = build(config)
    assert all(torch.equal(a, b) for a, b in zip(enc.state_dict().values(), ref.state_dict().values()))
    with torch.no_grad():
        explicit = enc(x)
        assert launches[0] == 0  # switch off
        fa.set_enabled(True)
        fused = enc(x)
        assert launches[0] == enc.num_blocks, launches
        cos = torch.nn.functional.cosine_similarity(fused, explicit, dim=-1).min().item()
        assert cos > 0.999, cos
        launches[0] = 0
        with record(enc, ("attn_probs",)) as rec:
            recorded = enc(x)
        assert launches[0] == 0 and len(rec["attn_probs"]) == enc.num_blocks  # record() needs the probabilities
        assert torch.equal(recorded, explicit)
    with torch.enable_grad():
        enc(x.clone().requires_grad_(True)).sum().backward()  # autograd: explicit path, no launch
    assert launches[0] == 0
    with torch.no_grad():
        explanation = torch._dynamo.explain(enc)(x)
        assert explanation.graph_break_count == 0, explanation.break_reasons
        assert launches[0] > 0  # the custom op ran inside the traced graph
        torch._dynamo.reset()
        compiled = torch.compile(enc, backend="aot_eager", fullgraph=True)(x)
        assert (compiled - fused).abs().max() <= 1e-5, (compiled - fused).abs().max()
    fa.set_enabled(False)
print("ok")
"""


_EPILOGUE = """
import torch
from torch import nn
from regcache import kernels
from regcache.encoders.base import Attention
from regcache.quant import QuantLinear, UniformQuantizer, fused_attention as fa

torch.manual_seed(0)
H, D, N = 2, 64, 40
attn = Attention(nn.Linear(H * D, 3 * H * D), nn.Linear(H * D, H * D), H)
attn.proj = QuantLinear.from_linear(attn.proj)
x = torch.randn(2, N, H * D)
for slot, owner in (("a_quantizer", attn.matmul_qk), ("b_quantizer", attn.matmul_qk), ("b_quantizer", attn.matmul_pv)):
    setattr(owner, slot, UniformQuantizer(8, symmetric=False).calibrate_(torch.randn(1000) * 2))
attn.matmul_pv.a_quantizer = UniformQuantizer(8, symmetric=False).calibrate_(torch.rand(100))
attn.proj.input_quantizer = UniformQuantizer(8, symmetric=False).calibrate_(torch.randn(1000) * 0.5)
attn.proj.weight_quantizer = UniformQuantizer(8, granularity="channel").calibrate_(attn.proj.weight.detach())
for q in attn.modules():
    if isinstance(q, UniformQuantizer):
        q.set_mode("quant")
seen, quantized_by_proj = [], []
real, real_quant = attn.proj.forward_prequantized, attn.proj.input_quantizer.forward
attn.proj.forward_prequantized = lambda t: seen.append(t) or real(t)
attn.proj.input_quantizer.forward = lambda t: quantized_by_proj.append(t) or real_quant(t)
fa.set_enabled(True)
with torch.no_grad():
    for exact in (True, False):
        kernels.set_kernel_config(fused_attention_exact=exact)
        seen.clear()
        out = attn(x)
        assert len(seen) == 1 and not quantized_by_proj, "proj's input quantizer should run in the kernel's epilogue"
        plain = attn.attend(*attn.project_qkv(x)).transpose(1, 2).reshape(2, N, H * D)  # same kernel, no epilogue
        expected = attn.proj.input_quantizer.plain_fake_quant(plain)
        step = attn.proj.input_quantizer.scale.item()
        diff = (seen[0] - expected).abs()
        if exact:  # the epilogue is plain_fake_quant, op for op
            assert torch.equal(seen[0], expected), diff.max()
        else:  # fast numerics multiply by 1/scale: a code may move by one step, rarely
            assert (diff > 0).float().mean() <= 1e-3 and diff.max() <= step * 1.001, (diff.max(), step)
        assert torch.equal(out, real(seen[0]))
        assert (seen[0] != plain).float().mean() > 0.5  # not vacuous: the quantizer moved most outputs
    seen.clear()
    handle = attn.proj.register_forward_pre_hook(lambda m, a: None)
    attn(x)  # a hook on proj must see its unquantized input: proj runs whole, no epilogue
    assert len(quantized_by_proj) == 1 and torch.equal(seen[0], real_quant(quantized_by_proj[0]))
    handle.remove()
print("ok")
"""


def test_output_projection_quantizer_in_the_kernel_epilogue():
    """proj's per-tensor input quantizer applied to the fused output equals the quantizer applied after it."""
    pytest.importorskip("triton")
    _run_interpreted(textwrap.dedent(_EPILOGUE))


def test_attention_wiring_under_triton_interpreter():
    """The switch: fused forward on quantized models, explicit for calibration, record(), autograd; compiles."""
    pytest.importorskip("triton")
    _run_interpreted(textwrap.dedent(_WIRING))


def test_fused_attention_on_by_default_and_cpu_falls_back():
    """On unless REGCACHE_FUSED_ATTENTION=0, but only where it applies: CPU tensors keep the explicit path."""
    from regcache.quant import UniformQuantizer, fused_attention

    if "REGCACHE_FUSED_ATTENTION" not in os.environ:
        assert fused_attention.enabled()
    q = torch.randn(1, 2, 8, 64)
    assert not fused_attention.supports(q, None, None)  # CPU without the interpreter
    assert fused_attention.quantized_attention(q, q, q, 0.125) is None
    observing = UniformQuantizer(8)
    observing.set_mode("observe")
    assert fused_attention.prob_quantizer_spec(observing, torch.float32) is None
    per_token = UniformQuantizer(8, granularity="channel", axis=2)
    per_token.set_scale(torch.ones(8))
    per_token.set_mode("quant")
    assert fused_attention.prob_quantizer_spec(per_token, torch.float32) is None


def test_bench_attention_tiny_runs(tmp_path):
    """benchmarks/bench_attention.py --tiny (interpreter) writes its JSON; fused matches explicit there."""
    pytest.importorskip("triton")
    bench = ROOT / "benchmarks" / "bench_attention.py"
    env = {**os.environ, "OUT": str(tmp_path), "PYTHONPATH": str(ROOT)}
    args = [sys.executable, str(bench), "--tiny", "--quantizers", "float", "repq log4", "ptq4vit twin8"]
    res = subprocess.run(args, env=env, capture_output=True, text=True, cwd=tmp_path)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "| batch | quantizer |" in res.stdout.splitlines()[-8]
    rows = json.loads((tmp_path / "bench_attention.json").read_text())["rows"]
    assert [(r["quantizer"], r["prefix"]) for r in rows] == [
        (q, p) for q in ("float", "repq log4", "ptq4vit twin8") for p in ("none", "1 entry, tau 4")
    ]
    assert all(r["max_rel_diff"] <= 2.0**-6 for r in rows)


def _compile_for_sm90(constants: dict) -> dict[str, str | bytes]:
    """Compile the attention kernel for sm_90 here (no GPU needed): catches what the interpreter lets pass."""
    import inspect

    triton = pytest.importorskip("triton")
    from triton.backends.compiler import GPUTarget

    from regcache.quant import _triton_attention as kmod

    fn = kmod.quantized_attention_kernel
    names = list(inspect.signature(fn.fn).parameters)
    act = {0: "*fp32", 1: "*bf16", 2: "*fp16"}[constants["DT"]]
    sig = {}
    for n in names:
        if n in constants:
            sig[n] = "constexpr"
        elif n.endswith("_ptr"):
            sig[n] = act if n in ("q_ptr", "k_ptr", "v_ptr", "pk_ptr", "pv_ptr", "out_ptr", "p_ptr") else "*fp32"
        else:
            sig[n] = "fp32" if n in ("sm_scale", "c0", "c1") else "i64"
    src = triton.compiler.ASTSource(
        fn=fn, signature=sig, constexprs={(names.index(n),): v for n, v in constants.items()}
    )
    return dict(triton.compile(src, target=GPUTarget("cuda", 90, 32)).asm)  # stage -> code (ptx, cubin, ...)


@pytest.mark.parametrize(
    "qkind, additive, prefix, bias, dt, store, exact, qmask",
    [(0, False, False, False, 1, False, True, 0), (1, False, True, True, 1, True, True, 7),
     (2, False, True, True, 1, False, True, 0), (3, True, True, False, 1, False, True, 0),
     (3, False, False, False, 0, True, True, 5), (1, False, True, True, 1, False, False, 7),
     (2, False, True, True, 1, True, False, 2), (3, True, False, False, 1, False, False, 0),
     (3, False, True, True, 0, False, False, 7), (1, False, True, True, 1, False, False, 9),
     (2, False, False, False, 1, False, True, 15)],
)  # fmt: skip
def test_kernel_compiles_for_sm90(qkind, additive, prefix, bias, dt, store, exact, qmask):
    """Each quantizer kind / prefix / dtype / numerics / folded-operand variant builds down to a cubin.

    Triton's type checks included.

    The token tiles (32 keys) and the prefix tile (16) differ in shape, as in the default launch.
    """
    if os.environ.get("TRITON_INTERPRET") == "1":
        pytest.skip("the interpreter replaces the kernel's device helpers")
    constants = dict(D=64, BLOCK_M=64, BLOCK_N=32, BLOCK_P=16, QKIND=qkind, ADDITIVE=additive, HAS_PREFIX=prefix)
    constants.update(HAS_BIAS=bias, STORE_P=store, DT=dt, IEEE=dt == 0, EXACT=exact, QMASK=qmask)
    assert "cubin" in _compile_for_sm90(constants)


def test_float32_products_follow_torchs_tf32_setting():
    """Float32 activations: full-float32 products (FMA on CUDA cores) unless torch allows TF32 for its own
    matmuls, then TF32 tensor-core products in the kernel too; the compiled PTX says which."""
    from regcache.quant.fused_attention import full_float32_products

    saved = torch.backends.cuda.matmul.allow_tf32
    try:
        torch.backends.cuda.matmul.allow_tf32 = False
        assert full_float32_products(torch.float32) and not full_float32_products(torch.bfloat16)
        torch.set_float32_matmul_precision("high")  # what QuantizedEncoder sets by default
        assert not full_float32_products(torch.float32)
    finally:
        torch.backends.cuda.matmul.allow_tf32 = saved
    if os.environ.get("TRITON_INTERPRET") == "1":
        pytest.skip("the interpreter replaces the kernel's device helpers")
    constants = dict(D=64, BLOCK_M=64, BLOCK_N=32, BLOCK_P=16, QKIND=1, ADDITIVE=False, HAS_PREFIX=True)
    constants.update(HAS_BIAS=True, STORE_P=False, DT=0, EXACT=False, QMASK=0)
    ptx = {ieee: _compile_for_sm90({**constants, "IEEE": ieee})["ptx"] for ieee in (True, False)}
    assert ".tf32" in ptx[False] and ".tf32" not in ptx[True]


def test_operand_fold_parameters_follow_the_quantizers():
    """operand_fold: [scale, zero point, qmin, qmax] rows and mask; cached until a quantizer changes; unfit rows out."""
    from torch import nn

    from regcache.quant import UniformQuantizer
    from regcache.quant import fused_attention as fa

    owner = nn.Module()
    qa = UniformQuantizer(8, symmetric=False).calibrate_(torch.linspace(-1.0, 3.0, 50))
    kb = UniformQuantizer(6, symmetric=True).calibrate_(torch.linspace(-2.0, 2.0, 50))
    for q in (qa, kb):
        q.set_mode("quant")
    params, mask = fa.operand_fold(owner, (qa, kb, None), torch.device("cpu"))
    assert mask == 0b011  # Q and K quantized, V absent
    # by hand: asymmetric 8 bits on [-1, 3]: step 4/255, zero point round(1 / step) = 64; symmetric 6 bits, ±2: 2/31
    expected = [4 / 255, 64.0, 0.0, 255.0, 2 / 31, 0.0, -32.0, 31.0]  # signed codes -32..31
    assert params[:2].flatten().tolist() == pytest.approx(expected, rel=1e-6)
    assert fa.operand_fold(owner, (qa, kb, None), torch.device("cpu"))[0] is params  # cached
    with torch.no_grad():
        qa.scale.mul_(2)  # recalibrated in place: rebuilt
    again, _ = fa.operand_fold(owner, (qa, kb, None), torch.device("cpu"))
    assert again is not params and again[0, 0].item() == pytest.approx(2 * 4 / 255, rel=1e-6)
    kb.set_mode("float")  # a float-mode quantizer is a pass-through: its bit clears
    assert fa.operand_fold(owner, (qa, kb, None), torch.device("cpu"))[1] == 0b001
    per_channel = UniformQuantizer(8, granularity="channel", axis=1)
    per_channel.set_scale(torch.ones(4))
    per_channel.set_mode("quant")
    # each row on its own: a per-channel V is left to the caller beside a folded Q; a hooked one too
    assert fa.operand_fold(owner, (qa, None, per_channel), torch.device("cpu"))[1] == 0b001
    hooked = UniformQuantizer(8).calibrate_(torch.randn(20))
    hooked.set_mode("quant")
    hooked.register_forward_hook(lambda *a: None)
    assert fa.operand_fold(owner, (hooked, None, per_channel), torch.device("cpu")) is None  # nothing folds
    # a fourth quantizer (proj's input) is row 3; rows limits what is considered (the caller applies the
    # rest); under torch.compile the parameters are built in the graph, not cached
    assert fa.operand_fold(owner, (qa, kb, None, qa), torch.device("cpu"))[1] == 0b1001
    only_q, mask = fa.operand_fold(owner, (qa, None, per_channel, kb), torch.device("cpu"), rows=(0,))
    assert mask == 0b001 and only_q[1:].abs().sum() == 0
    assert only_q[0].tolist() == pytest.approx([4 / 255 * 2, 64.0, 0.0, 255.0], rel=1e-6)
    fresh = nn.Module()
    traced = torch.compile(lambda: fa.operand_fold(fresh, (qa, kb, None), torch.device("cpu"), rows=(0,)))()
    assert traced[1] == 0b001 and torch.equal(traced[0], only_q)
    assert not hasattr(fresh, "_operand_fold_cache")


def test_tile_from_environment():
    """REGCACHE_FUSED_ATTENTION_TILE sets the default tile; malformed values name the expected form."""
    from regcache.kernels import KernelConfig

    assert KernelConfig.from_env({}).fused_attention_tile == (64, 16)
    assert KernelConfig.from_env({"REGCACHE_FUSED_ATTENTION_TILE": " 128,32 "}).fused_attention_tile == (128, 32)
    for bad in ("128", "128,24", "8,16", "a,b", "64,16,4"):
        with pytest.raises(ValueError, match="two powers of two"):
            KernelConfig.from_env({"REGCACHE_FUSED_ATTENTION_TILE": bad})
