"""Metrics against independent (hand / brute-force numpy) computations."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from regcache.eval import (
    FeatureFidelity,
    KNNAccuracy,
    OutlierStats,
    RetrievalRecallAtK,
    ZeroShotAccuracy,
    build_zeroshot_classifier,
    dedupe_by_id,
    feature_cosine_by_id,
    zeroshot_logits,
)


# ------------------------------------------------------------------------------------------ zero-shot
def test_zeroshot_topk_and_mean_per_class_recall_by_hand():
    # 4 classes, 6 samples; hand-ranked logits
    logits = torch.tensor(
        [
            [9.0, 1, 2, 3],  # label 0: rank1 -> top1 hit
            [1.0, 9, 2, 3],  # label 0: ranks 9(1),3(3),2(2),1(0) -> 0 is 4th -> miss even top-3
            [1.0, 2, 9, 3],  # label 2: hit
            [1.0, 2, 3, 9],  # label 2: second -> top1 miss, top2 hit
            [5.0, 2, 3, 9],  # label 3: hit
            [5.0, 2, 3, 9],  # label 1: last -> miss
        ]
    )
    labels = torch.tensor([0, 0, 2, 2, 3, 1])
    m = ZeroShotAccuracy(num_classes=4, top_k=(1, 2, 5))
    m.update(logits[:4], labels[:4], torch.arange(4))
    m.update(logits[4:], labels[4:], torch.arange(4, 6))
    out = m.compute()
    assert out["top1"].item() == pytest.approx(3 / 6)  # samples 0, 2, 4
    assert out["top2"].item() == pytest.approx(4 / 6)  # + sample 3
    assert math.isnan(out["top5"].item())  # k above num_classes: NaN, as CLIP_benchmark reports top-5 of < 5 classes
    # per-class top-1 recall: c0 1/2, c1 0/1, c2 1/2, c3 1/1 -> mean 0.5
    assert out["mean_per_class_recall"].item() == pytest.approx((0.5 + 0 + 0.5 + 1) / 4)
    assert out["num_samples"].item() == 6


def test_zeroshot_duplicates_count_once():
    logits = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    labels = torch.tensor([0, 0])
    m = ZeroShotAccuracy(top_k=(1,))
    m.update(logits, labels, torch.tensor([10, 11]))
    m.update(logits[1:], labels[1:], torch.tensor([11]))  # padded duplicate of sample 11 (a miss)
    out = m.compute()
    assert out["num_samples"].item() == 2 and out["top1"].item() == pytest.approx(0.5)


# ------------------------------------------------------------------------------------------ retrieval
def _brute_recall(img, txt, owner, ks):
    img = img / np.linalg.norm(img, axis=1, keepdims=True)
    txt = txt / np.linalg.norm(txt, axis=1, keepdims=True)
    s = txt @ img.T
    res = {}
    for k in ks:
        t_hit = [owner[t] in np.argsort(-s[t])[:k] for t in range(len(txt))]
        i_hit = []
        for i in range(len(img)):
            best = np.argsort(-s[:, i])[:k]
            i_hit.append(any(owner[t] == i for t in best))
        res[f"text_to_image_R@{k}"] = float(np.mean(t_hit))
        res[f"image_to_text_R@{k}"] = float(np.mean(i_hit))
    return res


def test_retrieval_recall_matches_bruteforce_numpy():
    rng = np.random.default_rng(0)
    n_img, d = 40, 8
    caps_per = rng.integers(1, 6, size=n_img)  # several (uneven) captions per image
    img = rng.normal(size=(n_img, d)).astype(np.float32)
    owner = np.repeat(np.arange(n_img), caps_per)
    txt = (img[owner] + 1.2 * rng.normal(size=(len(owner), d))).astype(np.float32)  # noisy positives
    expected = _brute_recall(img.astype(np.float64), txt.astype(np.float64), owner, (1, 5, 10))

    ids = torch.arange(n_img) * 7 + 100  # arbitrary global ids
    m = RetrievalRecallAtK(ks=(1, 5, 10), chunk=7)  # small chunk: exercise chunking
    # images arrive in shuffled batches; captions follow their image
    perm = rng.permutation(n_img)
    for b in np.array_split(perm, 5):
        tsel = np.concatenate([np.flatnonzero(owner == i) for i in b])
        m.update(torch.from_numpy(img[b]), ids[b], torch.from_numpy(txt[tsel]), ids[owner[tsel]])
    # a duplicated batch must not change anything
    b = perm[:3]
    tsel = np.concatenate([np.flatnonzero(owner == i) for i in b])
    m.update(torch.from_numpy(img[b]), ids[b], torch.from_numpy(txt[tsel]), ids[owner[tsel]])
    out = m.compute()
    assert out["num_images"].item() == n_img and out["num_texts"].item() == len(owner)
    for key, val in expected.items():
        assert out[key].item() == pytest.approx(val), key
    assert 0 < expected["text_to_image_R@1"] < 1 and 0 < expected["image_to_text_R@1"] < 1


def test_retrieval_any_positive_hit_by_hand():
    # 2 images, image 0 has captions t0, t1; image 1 has t2.  Unit vectors in 2-D.
    img = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    txt = torch.tensor([[0.0, 1.0], [1.0, 0.1], [0.1, 1.0]])  # t0 is closest to image 1 (wrong)
    m = RetrievalRecallAtK(ks=(1, 2, 3))
    m.update(img, torch.tensor([0, 1]), txt, torch.tensor([0, 0, 1]))
    out = m.compute()
    assert math.isnan(out["text_to_image_R@3"].item())  # 3 > 2 candidate images: every query would hit
    assert out["image_to_text_R@3"].item() == pytest.approx(1.0)  # 3 candidate texts: a real recall@3
    # image->text: img0 best text = t1 (its own) -> hit; img1 best = t0 (1.0) vs t2 (~0.995) -> miss@1
    assert out["image_to_text_R@1"].item() == pytest.approx(0.5)
    assert out["image_to_text_R@2"].item() == pytest.approx(1.0)
    # text->image: t0 -> img1 (miss), t1 -> img0 (hit), t2 -> img1 (hit)
    assert out["text_to_image_R@1"].item() == pytest.approx(2 / 3)


# ------------------------------------------------------------------------------------------ k-NN
def _brute_knn(q, bank, bank_lab, C, k, T):
    qn = q / np.linalg.norm(q, axis=1, keepdims=True)
    bn = bank / np.linalg.norm(bank, axis=1, keepdims=True)
    preds = []
    for row in qn @ bn.T:
        nn = np.argsort(-row)[:k]
        votes = np.zeros(C)
        for j in nn:
            votes[bank_lab[j]] += np.exp(row[j] / T)
        preds.append(np.argsort(-votes))
    return np.array(preds)


def test_knn_matches_bruteforce_numpy():
    rng = np.random.default_rng(1)
    C, d = 6, 16
    centers = rng.normal(size=(C, d))
    bank_lab = rng.integers(0, C, size=300)
    bank = centers[bank_lab] + 1.5 * rng.normal(size=(300, d))
    q_lab = rng.integers(0, C, size=80)
    q = centers[q_lab] + 1.5 * rng.normal(size=(80, d))
    preds = _brute_knn(q, bank, bank_lab, C, 20, 0.07)
    exp_top1 = float(np.mean(preds[:, 0] == q_lab))
    exp_top5 = float(np.mean([q_lab[i] in preds[i, :5] for i in range(80)]))
    m = KNNAccuracy(torch.tensor(bank, dtype=torch.float32), torch.tensor(bank_lab), num_classes=C)
    qt = torch.tensor(q, dtype=torch.float32)
    m.update(qt[:50], torch.tensor(q_lab[:50]), torch.arange(50))
    m.update(qt[50:], torch.tensor(q_lab[50:]), torch.arange(50, 80))
    out = m.compute()
    assert out["top1"].item() == pytest.approx(exp_top1)
    assert out["top5"].item() == pytest.approx(exp_top5)
    assert 0.2 < exp_top1 < 1.0


# ------------------------------------------------------------------------------------------ fidelity
def test_feature_fidelity_keyed_by_id():
    rng = np.random.default_rng(2)
    ref = rng.normal(size=(20, 5))
    quant = ref + 0.3 * rng.normal(size=(20, 5))
    cos = np.sum(ref * quant, 1) / np.linalg.norm(ref, axis=1) / np.linalg.norm(quant, axis=1)
    ids = torch.arange(20) + 1000
    r, q = torch.tensor(ref, dtype=torch.float32), torch.tensor(quant, dtype=torch.float32)
    # bank given in shuffled order; updates in another order
    perm = torch.randperm(20, generator=torch.Generator().manual_seed(0))
    m = FeatureFidelity(reference_ids=ids[perm], reference_features=r[perm])
    m.update(q[10:], ids[10:])
    m.update(q[:10], ids[:10])
    m.update(q[:2], ids[:2])  # duplicates
    out = m.compute()
    assert out["mean_cosine"].item() == pytest.approx(cos.mean(), abs=1e-6)
    assert out["num_samples"].item() == 20
    m2 = FeatureFidelity()
    m2.update(q, ids, reference=r)
    assert m2.compute()["mean_cosine"].item() == pytest.approx(cos.mean(), abs=1e-6)
    assert feature_cosine_by_id(ids[perm], q[perm], ids, r).item() == pytest.approx(cos.mean(), abs=1e-6)
    with pytest.raises(KeyError):
        m.update(q[:1], torch.tensor([5]))


def test_dedupe_by_id_keeps_first_sorted():
    ids = torch.tensor([5, 3, 5, 1])
    vals = torch.tensor([50, 30, 99, 10])
    i, v = dedupe_by_id(ids, vals)
    assert i.tolist() == [1, 3, 5] and v.tolist() == [10, 30, 50]


# ------------------------------------------------------------------------------------------ outliers
def test_outlier_stats_by_hand():
    # tokens: (3,4) l2 5 linf 4 | (1,0) 1 1 | (0,1) 1 1 | (10,0) 10 10
    x = torch.tensor([[[3.0, 4.0], [1.0, 0.0], [0.0, 1.0], [10.0, 0.0]]])
    st = OutlierStats(abs_thresholds=(2.0,), rel_thresholds=(4.0,))
    st.update(0, x)
    st.update("1", x * 3)
    out = st.compute()
    json.dumps(out)
    b0 = out["0"]
    assert b0["tokens"] == 4
    assert b0["mean_l2"] == pytest.approx(17 / 4) and b0["max_l2"] == pytest.approx(10)
    assert b0["mean_linf"] == pytest.approx(16 / 4) and b0["max_linf"] == pytest.approx(10)
    assert b0["frac_l2_above_abs"]["2"] == pytest.approx(0.5)  # 5 and 10
    # median of [5, 1, 1, 10] = 1 (lower median); > 4 * 1 -> 5 and 10
    assert b0["frac_l2_above_rel_median"]["4"] == pytest.approx(0.5)
    assert out["1"]["frac_l2_above_abs"]["2"] == pytest.approx(1.0)  # 15, 3, 3, 30 (strict >)
    # skip CLS (first token)
    st2 = OutlierStats(abs_thresholds=(2.0,), rel_thresholds=(), skip_tokens=1)
    st2.update(0, x)
    b = st2.compute()["0"]
    assert b["tokens"] == 3 and b["mean_l2"] == pytest.approx(12 / 3)
    assert b["frac_l2_above_abs"]["2"] == pytest.approx(1 / 3)
    st3 = OutlierStats(rel_thresholds=(), skip_tokens=[-1])
    st3.update(0, x)
    assert st3.compute()["0"]["max_l2"] == pytest.approx(5)


def test_outlier_stats_attach_hooks():
    blocks = torch.nn.Sequential(torch.nn.Identity(), torch.nn.Linear(2, 2, bias=False))
    with torch.no_grad():
        blocks[1].weight.copy_(torch.eye(2) * 2)
    st = OutlierStats(rel_thresholds=())
    handles = st.attach(list(blocks))
    x = torch.tensor([[[3.0, 4.0], [0.0, 1.0]]])
    blocks(x)
    for h in handles:
        h.remove()
    blocks(x)  # not counted any more
    out = st.compute()
    assert out["0"]["tokens"] == 2 and out["0"]["max_l2"] == pytest.approx(5.0)
    assert out["1"]["max_l2"] == pytest.approx(5.0)  # input of block 1 = output of Identity


# ------------------------------------------------------------------------------------------ zero-shot head
class _FakeTextModel(torch.nn.Module):
    def __init__(self):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.emb = torch.nn.Parameter(torch.randn(50, 6, generator=g))
        self.calls = 0

    def encode_text(self, tokens):
        self.calls += 1
        return self.emb[tokens].sum(1)


def _tok(texts):
    return torch.tensor([[(ord(c) * (i + 1)) % 50 for i, c in enumerate(t[:12].ljust(12))] for t in texts])


def test_build_zeroshot_classifier_by_hand_and_cache(tmp_path):
    model = _FakeTextModel()
    classes, templates = ["cat", "dog", "fish"], ["a {c}.", "photo of {c}", "{c}!"]
    W = build_zeroshot_classifier(model, _tok, classes, templates, "cpu", batch_size=4)
    assert W.shape == (6, 3)
    with torch.no_grad():
        for j, c in enumerate(classes):
            e = torch.stack([model.encode_text(_tok([t.replace("{c}", c)]))[0] for t in templates])
            e = e / e.norm(dim=1, keepdim=True)
            m = e.mean(0)
            assert torch.allclose(W[:, j], m / m.norm(), atol=1e-6)
    # cache: second call does not touch the model; other templates -> other key
    kw = {"cache_dir": tmp_path, "model_id": "fake/0"}
    W1 = build_zeroshot_classifier(model, _tok, classes, templates, "cpu", 4, **kw)
    calls = model.calls
    W2 = build_zeroshot_classifier(model, _tok, classes, templates, "cpu", 4, **kw)
    assert model.calls == calls and torch.equal(W1, W2) and torch.allclose(W1, W)
    build_zeroshot_classifier(model, _tok, classes, templates[:2], "cpu", 4, **kw)
    assert model.calls > calls and len(list(tmp_path.glob("zeroshot_*.pt"))) == 2
    f = torch.randn(4, 6)
    logits = zeroshot_logits(f, W)
    assert torch.allclose(logits, 100 * (f / f.norm(dim=1, keepdim=True)) @ W, atol=1e-4)


def _counting(model):
    """The model with ``encode_text`` counting its calls (a reused head makes none)."""
    model.calls = 0
    encode = model.encode_text

    def counted(tokens):
        model.calls += 1
        return encode(tokens)

    model.encode_text = counted
    return model


def test_zeroshot_cache_is_keyed_by_text_weights_not_model_name(tmp_path, caplog):
    import logging

    import open_clip
    from conftest import make_model

    tok = open_clip.get_tokenizer("regcache-tiny-openclip")
    classes, templates = ["cat", "dog", "fish", "bird"], ["a {c}.", "a photo of a {c}."]
    kw = {"cache_dir": tmp_path, "model_id": "regcache-tiny-openclip@random"}  # the same name for every seed
    uncached = {s: build_zeroshot_classifier(make_model("openclip", seed=s), tok, classes, templates) for s in (0, 1)}
    assert not torch.allclose(uncached[0], uncached[1], atol=1e-3)

    first = _counting(make_model("openclip", seed=0))
    assert torch.equal(build_zeroshot_classifier(first, tok, classes, templates, **kw), uncached[0])
    other_seed = _counting(make_model("openclip", seed=1))
    assert torch.equal(build_zeroshot_classifier(other_seed, tok, classes, templates, **kw), uncached[1])
    assert other_seed.calls > 0 and len(list(tmp_path.glob("zeroshot_*.pt"))) == 2

    # the same text weights in a fresh model (its vision tower changed): reused, and the reuse is logged
    same = _counting(make_model("openclip", seed=0))
    with torch.no_grad():
        for p in same.visual.parameters():
            p.add_(1.0)
    with caplog.at_level(logging.INFO, logger="regcache.eval.zeroshot"):
        reused = build_zeroshot_classifier(same, tok, classes, templates, **kw)
    assert same.calls == 0 and torch.equal(reused, uncached[0])
    assert any("reusing the zero-shot classifier" in r.getMessage() for r in caplog.records)

    # anything the head depends on differs: computed again
    changed = _counting(make_model("openclip", seed=0))
    build_zeroshot_classifier(changed, tok, classes[::-1], templates, **kw)  # class order = column order
    build_zeroshot_classifier(changed, tok, classes, ["{c}, a photo."], **kw)
    build_zeroshot_classifier(changed, tok, classes, templates, **{**kw, "model_id": "other@random"})
    calls = changed.calls
    assert calls >= 3
    half = _counting(make_model("openclip", seed=0).to(torch.bfloat16))
    build_zeroshot_classifier(half, tok, classes, templates, **kw)
    assert half.calls > 0
    assert len(list(tmp_path.glob("zeroshot_*.pt"))) == 6


def test_zeroshot_cache_reuses_only_an_exact_spec_match(tmp_path):
    model = _counting(_FakeTextModel())
    classes, templates = ["cat", "dog"], ["a {c}."]
    kw = {"cache_dir": tmp_path, "model_id": "fake/0"}
    W = build_zeroshot_classifier(model, _tok, classes, templates, "cpu", 4, **kw)
    (path,) = tmp_path.glob("zeroshot_*.pt")
    stored = torch.load(path, weights_only=True)
    torch.save({"spec": stored["spec"].replace("cat", "cow"), "classifier": torch.zeros_like(W)}, path)
    calls = model.calls
    again = build_zeroshot_classifier(model, _tok, classes, templates, "cpu", 4, **kw)
    assert model.calls > calls and torch.allclose(again, W)
