"""Register grid search: cached strategy = naive full-forward loop; resume after interruption; batching."""

from __future__ import annotations

import copy
import json
from dataclasses import dataclass, field

import pytest
import torch
from conftest import images, make_model

from regcache.encoders import adapt
from regcache.quant import NaiveConfig
from regcache.registers import (
    EmbeddingCosine,
    Predictions,
    RegisterSearch,
    ZeroShotTop1,
    curate_candidates,
    search_grid,
)


@dataclass
class WholeModelNaive(NaiveConfig):
    """Naive, but not declared depth-causal: the search must re-calibrate it whole."""

    name = "test-naive-whole"


def _setup(family="openclip"):
    encoder = adapt(make_model(family))
    calib = [images(family, 4, seed=20), images(family, 3, seed=21)]
    ref = [images(family, 4, seed=30), images(family, 4, seed=31)]
    candidates = curate_candidates(encoder, [images(family, 4, seed=40)], layers=1, k=2, progress=False)
    return encoder, calib, ref, candidates


def _search(config=None, family="openclip", **kw):
    encoder, calib, ref, candidates = _setup(family)
    kw = {"taus": (1, 5), "delete_ks": (0, 2), "modes": ("prefix", "delete", "both"), "progress": False} | kw
    return RegisterSearch(encoder, config or NaiveConfig(6, 6), calib, ref, EmbeddingCosine(), 2, candidates, **kw)


def test_grid_modes():
    pts = search_grid(2, taus=(1, 3), delete_ks=(0, 2), l_starts=[4], modes=("prefix", "delete", "both"))
    modes = [p.mode for p in pts]
    assert modes.count("base") == 1 and modes.count("delete") == 1
    assert modes.count("prefix") == 4 and modes.count("both") == 4
    assert len({p.key for p in pts}) == len(pts)


@pytest.mark.parametrize(
    ("family", "kw"),
    [
        ("openclip", {"l_starts": [1, 2], "taus": (3,)}),
        ("siglip", {"modes": ("both",), "delete_ks": (2,), "taus": (3,)}),
    ],
)
def test_cached_search_equals_naive_loop(family, kw):
    search = _search(family=family, **kw)
    cached = search.run("cached")
    loop = search.run("naive_loop")
    assert cached.stats["tail_runs"] == len(search.points) and cached.stats["full_runs"] == 0
    assert loop.stats["full_runs"] == len(search.points)
    a, b = cached.scores(), loop.scores()
    assert a.keys() == b.keys() and len(a) == len(search.points) > 2
    for key in a:
        assert a[key] == pytest.approx(b[key], abs=1e-6), key
    assert len(set(a.values())) > len(a) // 2  # configurations really differ
    assert cached.best["key"] == loop.best["key"]


def test_whole_model_recalibration_reuses_streams_only_when_exact():
    search = _search(WholeModelNaive(6, 6), taus=(2,), delete_ks=(3,), modes=("both",))
    cached = search.run("cached")
    # calibration of blocks < l_start is unchanged (naive is in fact depth-causal): the check lets streams be reused
    assert cached.stats["tail_runs"] == len(search.points)
    loop = search.run("naive_loop")
    for key, score in cached.scores().items():
        assert score == pytest.approx(loop.scores()[key], abs=1e-6)


@pytest.mark.parametrize("save_every_s", [0.0, 3600.0])
def test_resume_after_interruption(tmp_path, save_every_s):
    """Rows recorded before an exception reach the state file even when the periodic save is far off."""
    reference = _search(modes=("prefix", "delete")).run("cached")
    state = tmp_path / "search.json"
    done = []

    def stop_after_four(row):
        done.append(row["key"])
        if len(done) == 4:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        _search(state_path=state, modes=("prefix", "delete"), save_every_s=save_every_s).run(
            "cached", callback=stop_after_four
        )
    assert len(json.loads(state.read_text())["rows"]) == 4
    resumed = _search(state_path=state, modes=("prefix", "delete")).run("cached")
    assert resumed.stats["resumed"] == 4
    assert resumed.stats["tail_runs"] == len(reference.rows) - 4
    assert resumed.rows == reference.rows
    resumed.save(tmp_path / "result.json")
    assert json.loads((tmp_path / "result.json").read_text())["best"] == reference.best
    with pytest.raises(ValueError, match="different search"):
        _search(state_path=state, modes=("prefix", "delete"), taus=(1, 2, 3)).run("cached")


def test_batched_once_equals_loop():
    search = _search(recalibrate="once", configs_per_batch=3, modes=("prefix",), taus=(1, 5, 9))
    batched = search.run("cached")
    loop = search.run("naive_loop")
    assert batched.stats["batched_runs"] > 0
    for key, score in batched.scores().items():
        assert score == pytest.approx(loop.scores()[key], abs=1e-5), key


def test_search_with_zero_shot_objective():
    encoder, calib, ref, candidates = _setup()
    classifier = torch.nn.functional.normalize(torch.randn(32, 5, generator=torch.Generator().manual_seed(0)), dim=0)
    with torch.no_grad():
        labels = (torch.nn.functional.normalize(torch.cat([encoder(x) for x in ref]), dim=-1) @ classifier).argmax(-1)
    objective = ZeroShotTop1(labels, classifier)
    search = RegisterSearch(
        encoder, NaiveConfig(8, 8), calib, ref, objective, 2, candidates, taus=(1,), delete_ks=(1,), progress=False
    )
    result = search.run()
    base = next(r for r in result.rows if r["mode"] == "base")
    assert 0.0 <= base["score"] <= 100.0
    assert result.best["score"] >= base["score"]


def test_eval_batch_size_rechunks_and_stays_exact():
    search = _search(eval_batch_size=3, taus=(2,), delete_ks=(0, 2))
    cached = search.run("cached")
    assert [h.shape[0] for h in search.streams[2]] == [3, 3, 2]  # 8 reference images, order kept
    assert [x.shape[0] for x in search.reference_chunks] == [3, 3, 2]
    loop = search.run("naive_loop")
    plain = _search(taus=(2,), delete_ks=(0, 2)).run("naive_loop")
    for key, score in cached.scores().items():
        assert score == pytest.approx(loop.scores()[key], abs=1e-6), key
        assert score == pytest.approx(plain.scores()[key], abs=1e-6), key


def test_objective_score_is_the_call_on_device():
    a, b = torch.randn(6, 8), torch.randn(6, 8)
    for objective in (EmbeddingCosine(), ZeroShotTop1(torch.arange(6) % 3, torch.randn(8, 3))):
        t = objective.score(a, b)
        assert isinstance(t, torch.Tensor) and t.ndim == 0
        assert float(t) == objective(a, b)


@pytest.mark.parametrize(("prefix_only_at", "graphs"), [(None, 1), (2, 2)])
def test_compiled_tail_compiles_one_block_graph_and_matches_eager(monkeypatch, prefix_only_at, graphs):
    """One dynamo graph, shared by every tail block, for every (register, τ, k̃, l_start) of the grid: modules
    are graph inputs, τ is a tensor, scales are buffers, and each block's deletion (the token count) runs eagerly
    before the compiled call. With l_start 1 < l_q = 2 the deletion sits inside the tail (one graph per k̃
    before). A second graph only for blocks without a prefix (prefix_only_at=2 leaves block 1 without one).
    aot_eager keeps the test fast; inductor's fused kernels round differently (see
    benchmarks/bench_register_search.py)."""
    import torch._dynamo
    from torch._dynamo.utils import counters

    compile_ = torch.compile

    def aot_eager(fn, options=None, **kw):  # the search passes inductor options; aot_eager has none
        return compile_(fn, backend="aot_eager", **kw)

    monkeypatch.setattr(torch, "compile", aot_eager)
    torch._dynamo.reset()
    counters.clear()
    kw = {"taus": (1, 5), "delete_ks": (0, 2, 3), "eval_batch_size": 8, "l_starts": [1, 2]}
    kw["prefix_only_at"] = prefix_only_at
    compiled = _search(compile_tail=True, **kw).run("cached")
    eager = _search(**kw).run("cached")
    n_prefixed = sum(r["mode"] in ("prefix", "both") for r in compiled.rows)
    assert compiled.stats["compiled_tail_runs"] == n_prefixed > 12
    assert compiled.stats["compile_s"] > 0 and "compile_s" not in eager.stats  # the first compiled call, timed
    assert counters["stats"]["unique_graphs"] == graphs
    for key, score in compiled.scores().items():
        assert score == pytest.approx(eager.scores()[key], abs=1e-5), key
    torch._dynamo.reset()


def test_tail_recalibration_keeps_weight_quantizers_and_equals_reset_and_calibrate(monkeypatch):
    """Naive's weight ranges depend on the weights alone: a tail re-calibration re-observes only the activations,
    and ends in exactly the state of reset + full calibration; an in-place weight edit brings the full path back."""
    import copy

    from regcache.quant import quantize_
    from regcache.quant.quantizers import UniformQuantizer
    from regcache.registers.deletion import install_deletion
    from regcache.registers.recalibration import Recalibrator

    encoder, calib, _, _ = _setup()
    models = []
    for _ in range(2):
        q = copy.deepcopy(encoder)
        quantize_(q, NaiveConfig(6, 6))
        models.append((q, Recalibrator(q)))
    (fast, rc), (slow, rc_slow) = models
    rc_slow._activation_only = False  # always reset + calibrate
    with torch.no_grad():
        streams = [encoder.forward_blocks(encoder.embed(x), 0, 1) for x in calib]
    weight_calibrations = []
    calibrate_ = UniformQuantizer.calibrate_
    monkeypatch.setattr(UniformQuantizer, "calibrate_", lambda q, x: weight_calibrations.append(q) or calibrate_(q, x))

    def both(k):
        for q, r in models:
            install_deletion(q, 2, k)
            r.recalibrate(streams, start=1)
        a, b = rc.state(), rc_slow.state()
        assert a.keys() == b.keys()
        assert all(torch.equal(a[key], b[key]) for key in a), [key for key in a if not torch.equal(a[key], b[key])]
        assert [q.mode for _, q, _ in rc._quantizers] == [q.mode for _, q, _ in rc_slow._quantizers]

    n_weights = sum(1 for n, _, b in rc._quantizers if n.endswith("weight_quantizer") and b >= 1)
    both(0)  # first time: the full path on both
    assert len(weight_calibrations) == 2 * n_weights
    for k in (2, 3, 0):
        weight_calibrations.clear()
        both(k)
        assert len(weight_calibrations) == n_weights  # only the always-reset copy
    with torch.no_grad():
        fast.blocks[2].mlp.fc1.weight.mul_(0.5)
        slow.blocks[2].mlp.fc1.weight.mul_(0.5)
    weight_calibrations.clear()
    both(2)
    assert len(weight_calibrations) == 2 * n_weights


@pytest.mark.parametrize(("flag", "expect"), [(None, "process"), (True, True), (False, False)])
def test_search_sets_fused_attention_for_its_run_only(flag, expect):
    """``fused_attention`` holds while the grid runs and the process setting returns after; None keeps the process's."""
    from regcache.quant import fused_attention as fa

    seen = []
    search = _search(taus=(1,), delete_ks=(0,), compile_tail=True, fused_attention=flag)
    before = fa.enabled()
    expect = before if expect == "process" else expect
    search.run("cached", callback=lambda row: seen.append(fa.enabled()))
    assert seen and set(seen) == {expect}
    assert fa.enabled() == before


def test_search_dtype_runs_the_grid_on_a_cast_copy():
    """dtype=bf16 scores what a search on a bf16 copy of the model scores (same caches); the model is untouched."""
    base = _search(taus=(2,), delete_ks=(0, 2), modes=("both",))
    before = {k: v.clone() for k, v in base.encoder.state_dict().items()}
    cast = _search(taus=(2,), delete_ks=(0, 2), modes=("both",), dtype=torch.bfloat16, caches=base.caches)
    manual_encoder = copy.deepcopy(base.encoder).to(torch.bfloat16)
    manual = RegisterSearch(
        manual_encoder, NaiveConfig(6, 6), base.calibration, base.reference, EmbeddingCosine(), 2,
        caches=base.caches, taus=(2,), delete_ks=(0, 2), modes=("both",), progress=False,
    )  # fmt: skip
    got, want = cast.run("cached").scores(), manual.run("cached").scores()
    assert got == want and len(got) == len(cast.points) > 2
    assert got != base.run("cached").scores()  # bf16 rounding shows: the cast really happened
    assert cast.spec["dtype"] == "bfloat16" and "dtype" not in base.spec
    assert cast.spec["model_fingerprint"] == base.spec["model_fingerprint"]
    for k, v in base.encoder.state_dict().items():
        assert v.dtype == before[k].dtype and torch.equal(v, before[k]), k
    with pytest.raises(ValueError, match="dtype must be"):
        _search(dtype=torch.int8)


def test_objective_to_moves_tensor_fields_only():
    labels, classifier = torch.tensor([0, 1, 1]), torch.randn(8, 2)
    moved = ZeroShotTop1(labels=labels, classifier=classifier).to("meta")
    assert moved.labels.is_meta and moved.classifier.is_meta and moved.labels.shape == labels.shape
    assert not labels.is_meta  # the original is left as it was

    def predict(e):
        return e.argmax(-1)

    kept = Predictions(labels=labels, predict=predict).to("meta")
    assert kept.predict is predict and kept.labels.is_meta
    cosine = EmbeddingCosine()
    assert cosine.to("meta") is cosine  # nothing to move


def test_search_moves_its_objective_to_the_search_device_once():
    @dataclass
    class Recording(EmbeddingCosine):
        moves: list = field(default_factory=list)

        def to(self, device):
            self.moves.append(torch.device(device))
            return super().to(device)

    encoder, calib, ref, candidates = _setup()
    objective = Recording()
    search = RegisterSearch(
        encoder, NaiveConfig(6, 6), calib, ref, objective, 2, candidates, taus=(1,), delete_ks=(0,), progress=False
    )
    search.run("cached")
    assert objective.moves == [torch.device("cpu")]


def test_compiled_tail_that_fails_to_compile_falls_back_to_eager(monkeypatch, caplog):
    """compile_tail is on by default on GPUs: a backend failure must not end the search (same scores as eager)."""

    def failing_compile(fn, **kw):
        def run(*args):
            raise RuntimeError("backend cannot compile this block")

        return run

    kw = {"taus": (2,), "delete_ks": (0, 2), "modes": ("both",)}
    eager = _search(**kw).run("cached")
    monkeypatch.setattr(torch, "compile", failing_compile)
    with caplog.at_level("WARNING", logger="regcache.registers.search"):
        fallback = _search(compile_tail=True, **kw).run("cached")
    assert fallback.scores() == eager.scores() and len(eager.scores()) > 2
    assert fallback.stats["compiled_tail_runs"] == 0
    assert "backend cannot compile this block" in fallback.stats["compile_fallback"]
    assert "running it eagerly" in caplog.text


def test_grid_timings_split_setup_configurations_and_steady_state():
    """Hand-computed: setup 2 s; rows read at 3, 4, 6, 7, 8 s; the steady state is the second half (6 → 8 s)."""
    from regcache.registers.search import _grid_timings

    t = _grid_timings(10.0, 12.0, [13.0, 14.0, 16.0, 17.0, 18.0])
    assert t == {"prepare_s": 2.0, "configurations_s": 6.0, "steady_s_per_config": 1.0}
    assert _grid_timings(0.0, 1.5, []) == {"prepare_s": 1.5}  # everything resumed: no configuration ran
    assert "steady_s_per_config" not in _grid_timings(0.0, 1.0, [2.0])  # one row: no second half to time
    result = _search(taus=(1,), delete_ks=(0,)).run("cached")
    assert result.stats["prepare_s"] > 0 and result.stats["configurations_s"] > 0


@pytest.mark.parametrize(
    ("kw", "field"),
    [
        ({"taus": (-1, -3)}, "taus"),  # all negative: was a "RegCache" result with mode base
        ({"taus": (2, -1)}, "taus"),  # one negative: was dropped silently
        ({"taus": (0,)}, "taus"),
        ({"taus": ()}, "taus"),
        ({"taus": (1.5,)}, "taus"),
        ({"delete_ks": (-2,)}, "delete_ks"),  # was a winner with k~ = -2
        ({"delete_ks": ()}, "delete_ks"),
        ({"l_starts": [-1]}, "l_starts"),
    ],
)
def test_invalid_grid_values_are_refused(kw, field):
    args = {"taus": (1, 3), "delete_ks": (0, 2), "l_starts": [1]} | kw
    with pytest.raises(ValueError, match=rf"^{field} "):
        search_grid(2, **args, modes=("prefix", "delete", "both"))
    encoder = adapt(make_model("openclip"))
    derived = []
    candidates = type("Spy", (), {"__getattr__": lambda self, name: derived.append(name)})()
    with pytest.raises(ValueError, match=rf"^{field} "):
        RegisterSearch(encoder, NaiveConfig(6, 6), [], [], EmbeddingCosine(), 1, candidates, **args, progress=False)
    assert not derived  # refused before any register cache is derived


def test_empty_modes_are_refused():
    with pytest.raises(ValueError, match="modes is empty"):
        search_grid(2, taus=(1,), delete_ks=(0,), l_starts=[1], modes=())


@pytest.mark.parametrize(
    ("kw", "field"),
    [
        ({"taus": [-1]}, "taus"),
        ({"taus": []}, "taus"),  # was the full 1..15 grid
        ({"delete_ks": [-2]}, "delete_ks"),
        ({"delete_ks": []}, "delete_ks"),
        ({"l_start_offsets": [-1]}, "l_start_offsets"),
        ({"l_start_offsets": []}, "l_start_offsets"),
    ],
)
def test_callback_refuses_invalid_grid_values(kw, field):
    from callbacks.register_search import RegisterSearch as SearchCallback

    with pytest.raises(ValueError, match=rf"^{field} "):
        SearchCallback(**kw)
    assert SearchCallback(taus=[1, 15], delete_ks=[0, 2], l_start_offsets=[0]).taus == [1, 15]
    assert SearchCallback().taus == list(range(1, 16))  # null: the default grid


def test_best_of_picks_each_modes_best_row_and_gain_follows_the_objective():
    """best_of ranks within the requested modes only, whatever the base or other modes score."""
    from regcache.registers import SearchResult

    rows = [  # the base scores highest: an ablation must still install its own mode's best
        {"key": "base", "mode": "base", "score": 0.9},
        {"key": "p1", "mode": "prefix", "score": 0.2},
        {"key": "p2", "mode": "prefix", "score": 0.4},
        {"key": "d1", "mode": "delete", "score": 0.5},
        {"key": "b1", "mode": "both", "score": 0.7},
    ]
    result = SearchResult({}, rows, greater_is_better=True)
    assert result.best["key"] == "base"
    assert result.best_of(["prefix"])["key"] == "p2"
    assert result.best_of(["delete"])["key"] == "d1"
    assert result.best_of(["prefix", "both"])["key"] == "b1"
    assert {m: r["key"] for m, r in result.best_by_mode().items()} == {
        "base": "base",
        "prefix": "p2",
        "delete": "d1",
        "both": "b1",
    }
    assert result.gain(result.best_of(["both"]), result.best_of(["base"])) == pytest.approx(0.7 - 0.9)
    lower = SearchResult({}, rows, greater_is_better=False)  # mse-like: lower is better
    assert lower.best_of(["prefix"])["key"] == "p1"
    assert lower.gain(lower.best_of(["prefix"]), lower.best_of(["base"])) == pytest.approx(0.9 - 0.2)
    with pytest.raises(ValueError, match=r"no configuration of mode \['delete'\]"):
        SearchResult({}, rows[:3], greater_is_better=True).best_of(["delete"])
    with pytest.raises(ValueError, match="unknown modes"):
        result.best_of(["prefix_only"])


def test_search_best_of_a_mode_is_that_modes_best_configuration():
    """On a real search: each mode's best row is the maximum over exactly the rows of that mode."""
    result = _search().run()
    for mode in ("prefix", "delete", "both"):
        rows = [r for r in result.rows if r["mode"] == mode]
        assert rows and result.best_of([mode])["score"] == max(r["score"] for r in rows)
        assert result.best_of([mode])["mode"] == mode
