"""Distributed-safe evaluation metrics (torchmetrics ``Metric`` subclasses, usable without Lightning).

All metrics keep per-sample states together with the GLOBAL ``sample_id`` of each sample. At
``compute()`` the states are all-gathered across ranks (uneven sizes and empty ranks are fine), then
deduplicated by sample id, so a sample that reached the metric twice (e.g. padding) counts once.
Update them every step, compute once at epoch end: no per-step collectives.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor
from torchmetrics import Metric

from .distributed import all_gather_uneven, dedupe_by_id, first_occurrence, is_dist

__all__ = [
    "FeatureFidelity",
    "KNNAccuracy",
    "RetrievalRecallAtK",
    "ZeroShotAccuracy",
    "feature_cosine_by_id",
    "knn_votes",
    "retrieval_recall_at_k",
    "topk_accuracy",
]


class _GatherMetric(Metric):
    """List states (``dist_reduce_fx="cat"``) gathered with an uneven all-gather that tolerates ranks
    without data (torchmetrics' default would substitute a 1-D float tensor of the wrong shape)."""

    full_state_update = False
    is_differentiable = False
    higher_is_better = True

    def _sync_dist(self, dist_sync_fn=None, process_group=None) -> None:
        if not is_dist():
            return
        group = process_group or self.process_group
        for attr in sorted(self._reductions):
            val = getattr(self, attr)
            local = torch.cat(val) if isinstance(val, list) and val else (None if isinstance(val, list) else val)
            gathered = all_gather_uneven(local, group=group, device=self.device)
            setattr(self, attr, [torch.cat(gathered)] if gathered else [])

    def _cat(self, attr: str) -> Tensor | None:
        val = getattr(self, attr)
        if isinstance(val, Tensor):
            return val
        return torch.cat(val) if val else None


def _ids_or_none(ids: Tensor | None, n: int, device) -> Tensor:
    if ids is None:
        raise ValueError("sample_ids are required (global ids, used to dedupe across ranks)")
    ids = torch.as_tensor(ids, device=device).long().flatten()
    if ids.numel() != n:
        raise ValueError(f"{ids.numel()} sample ids for {n} samples")
    return ids


# ---------------------------------------------------------------------------------------- zero-shot
def _hit_rate(hit: Tensor, k: int, num_classes: int) -> Tensor:
    """Fraction of rows with a hit among their first k predictions; NaN where k exceeds the classes."""
    if k > num_classes:  # every sample would be a hit: CLIP_benchmark's top-5 of < 5 classes is NaN
        return torch.tensor(math.nan, device=hit.device)
    return hit[:, :k].any(1).float().mean()


def topk_accuracy(logits: Tensor, labels: Tensor, ks: Sequence[int] = (1, 5)) -> dict[int, float]:
    """Micro top-k accuracy (fraction of samples whose label is among the k highest logits); NaN for k > classes.

    With fewer classes than k every sample would count as a hit: CLIP_benchmark reports top-5 as NaN there.
    """
    kmax = min(max(ks), logits.shape[1])
    top = logits.topk(kmax, dim=1).indices
    hit = top == labels[:, None]
    return {k: hit[:, :k].any(1).float().mean().item() if k <= kmax else math.nan for k in ks}


class ZeroShotAccuracy(_GatherMetric):
    """Top-1 / top-5 (micro) and mean per-class recall from classification logits.

    ``update(logits (B, K), labels (B,), sample_ids (B,))``; ``compute()`` returns
    ``{"top1", "top5", "mean_per_class_recall", "num_samples"}`` (tensors). Mean per-class recall
    averages the top-1 recall of the classes that occur in the labels (sklearn's balanced accuracy, as
    CLIP_benchmark computes it). A top-k with k above the number of classes (``num_classes``, else the
    logits' width) is NaN: every sample would be a hit, and CLIP_benchmark reports top-5 of a dataset
    with fewer than 5 classes as NaN.
    """

    def __init__(self, num_classes: int | None = None, top_k: tuple[int, ...] = (1, 5), **kwargs) -> None:
        super().__init__(**kwargs)
        self.num_classes = num_classes
        self.top_k = tuple(top_k)
        self.add_state("ids", default=[], dist_reduce_fx="cat")
        self.add_state("labels", default=[], dist_reduce_fx="cat")
        self.add_state("preds", default=[], dist_reduce_fx="cat")

    def update(self, logits: Tensor, labels: Tensor, sample_ids: Tensor) -> None:
        """Keep the top-k class predictions of these logits with their labels and sample ids."""
        k = min(max(self.top_k), logits.shape[1])
        self._width = logits.shape[1]
        self.preds.append(logits.detach().topk(k, dim=1).indices)
        self.labels.append(labels.detach().long().flatten())
        self.ids.append(_ids_or_none(sample_ids, logits.shape[0], logits.device))

    def compute(self) -> dict[str, Tensor]:
        """Top-k accuracies and mean per-class recall over the gathered samples, each sample id counted once."""
        ids, labels, preds = self._cat("ids"), self._cat("labels"), self._cat("preds")
        if ids is None:
            raise RuntimeError("ZeroShotAccuracy.compute() called before any update()")
        ids, labels, preds = dedupe_by_id(ids, labels, preds)
        hit = preds == labels[:, None]
        classes = self.num_classes if self.num_classes is not None else getattr(self, "_width", preds.shape[1])
        out = {f"top{k}": _hit_rate(hit, k, classes) for k in self.top_k}
        correct = hit[:, 0].float()
        classes = labels.unique()
        per_class = torch.stack([correct[labels == c].mean() for c in classes])
        out["mean_per_class_recall"] = per_class.mean()
        out["num_samples"] = torch.tensor(ids.numel())
        return out


# ---------------------------------------------------------------------------------------- retrieval
@torch.no_grad()
def retrieval_recall_at_k(
    image_features: Tensor,
    text_features: Tensor,
    text_to_image: Tensor,
    ks: Sequence[int] = (1, 5, 10),
    chunk: int = 1024,
) -> dict[str, Tensor]:
    """Recall@k in both directions, any-positive-hit convention (CLIP_benchmark).

    ``text_to_image[t]`` is the index (row of ``image_features``) of the image caption ``t`` describes.
    Features are L2-normalised here; scores = text @ image.T.
    image->text: hit at k if ANY of the image's captions is among its k best texts.
    text->image: hit at k if the caption's image is among its k best images.
    A recall@k with k above the number of candidates (images for text queries, texts for image queries)
    is NaN: every query would be a hit (CLIP_benchmark fails there; its top-5 of fewer than 5 classes is NaN).
    """
    img = F.normalize(image_features.float(), dim=-1)
    txt = F.normalize(text_features.float(), dim=-1)
    t2i = text_to_image.long().to(img.device)
    n_img, n_txt = img.shape[0], txt.shape[0]
    out: dict[str, Tensor] = {}
    t_hits = {k: torch.zeros(n_txt, dtype=torch.bool, device=img.device) for k in ks}
    for s in range(0, n_txt, chunk):
        sc = txt[s : s + chunk] @ img.T
        top = sc.topk(min(max(ks), n_img), dim=1).indices
        for k in ks:
            t_hits[k][s : s + chunk] = (top[:, :k] == t2i[s : s + chunk, None]).any(1)
    i_hits = {k: torch.zeros(n_img, dtype=torch.bool, device=img.device) for k in ks}
    for s in range(0, n_img, chunk):
        sc = img[s : s + chunk] @ txt.T
        top = sc.topk(min(max(ks), n_txt), dim=1).indices  # (b, kmax) text indices
        owner = t2i[top]
        rows = torch.arange(s, min(s + chunk, n_img), device=img.device)
        for k in ks:
            i_hits[k][s : s + chunk] = (owner[:, :k] == rows[:, None]).any(1)
    nan = torch.tensor(math.nan, device=img.device)
    for k in ks:
        out[f"image_to_text_R@{k}"] = i_hits[k].float().mean() if k <= n_txt else nan
        out[f"text_to_image_R@{k}"] = t_hits[k].float().mean() if k <= n_img else nan
    return out


class RetrievalRecallAtK(_GatherMetric):
    """Image<->text Recall@k from embeddings + global ids, computed once at ``compute()``.

    ``update(image_features (B, D), image_ids (B,), text_features (T, D), text_image_ids (T,),
    text_index (T,) | None)``: ``text_image_ids[t]`` is the sample id of the image caption ``t``
    belongs to; ``text_index`` numbers captions within their image (default: order of appearance of
    the image id within this update). Images are deduped by id and captions by (image id, index).
    Not torchmetrics' RetrievalRecall (true recall, stores every score).
    """

    def __init__(self, ks: tuple[int, ...] = (1, 5, 10), chunk: int = 1024, **kwargs) -> None:
        super().__init__(**kwargs)
        self.ks, self.chunk = tuple(ks), chunk
        for name in ("img_feats", "img_ids", "txt_feats", "txt_img_ids", "txt_index"):
            self.add_state(name, default=[], dist_reduce_fx="cat")

    def update(
        self,
        image_features: Tensor,
        image_ids: Tensor,
        text_features: Tensor,
        text_image_ids: Tensor,
        text_index: Tensor | None = None,
    ) -> None:
        """Keep image and caption features with their ids, numbering captions per image when no index is given."""
        dev = image_features.device
        self.img_feats.append(image_features.detach().float())
        self.img_ids.append(_ids_or_none(image_ids, image_features.shape[0], dev))
        tids = _ids_or_none(text_image_ids, text_features.shape[0], dev)
        if text_index is None:
            text_index = torch.zeros_like(tids)
            seen: dict[int, int] = {}
            for j, i in enumerate(tids.tolist()):
                text_index[j] = seen.get(i, 0)
                seen[i] = seen.get(i, 0) + 1
        self.txt_feats.append(text_features.detach().float())
        self.txt_img_ids.append(tids)
        self.txt_index.append(torch.as_tensor(text_index, device=dev).long().flatten())

    def compute(self) -> dict[str, Tensor]:
        """Recall@k both ways over the gathered images and captions, deduped by id, plus their counts."""
        img_ids = self._cat("img_ids")
        if img_ids is None:
            raise RuntimeError("RetrievalRecallAtK.compute() called before any update()")
        img_ids, img = dedupe_by_id(img_ids, self._cat("img_feats"))  # sorted by id
        t_img, t_idx, txt = self._cat("txt_img_ids"), self._cat("txt_index"), self._cat("txt_feats")
        keep = first_occurrence(torch.stack([t_img, t_idx], 1))
        t_img, txt = t_img[keep], txt[keep]
        pos = torch.searchsorted(img_ids, t_img).clamp(max=img_ids.numel() - 1)
        if not bool((img_ids[pos] == t_img).all()):
            raise ValueError("some captions belong to image ids that were never updated")
        out = retrieval_recall_at_k(img, txt, pos, self.ks, self.chunk)
        out["num_images"] = torch.tensor(img_ids.numel())
        out["num_texts"] = torch.tensor(t_img.numel())
        return out


# ---------------------------------------------------------------------------------------- k-NN
@torch.no_grad()
def knn_votes(
    features: Tensor,
    bank_features: Tensor,
    bank_labels: Tensor,
    num_classes: int,
    k: int = 20,
    temperature: float = 0.07,
) -> Tensor:
    """DINO weighted k-NN class votes (B, num_classes): cosine similarity, the k nearest bank
    entries vote for their label with weight ``exp(sim / T)``."""
    q = F.normalize(features.float(), dim=-1)
    b = F.normalize(bank_features.float().to(q.device), dim=-1)
    sims, idx = (q @ b.T).topk(min(k, b.shape[0]), dim=1)
    labels = bank_labels.to(q.device).long()[idx]
    votes = torch.zeros(q.shape[0], num_classes, device=q.device)
    return votes.scatter_add_(1, labels, (sims / temperature).exp())


class KNNAccuracy(_GatherMetric):
    """k-NN classification accuracy (cosine, ``k=20``, ``T=0.07``, DINO weighting) against a labelled
    feature bank (e.g. train-split features gathered with :func:`regcache.eval.gather_by_id`).

    ``update(features (B, D), labels (B,), sample_ids (B,))``; ``compute()`` ->
    ``{"top1", "top5", "num_samples"}`` (top-k NaN for k above the classes). Predictions are made at update
    time (the bank is the same on every rank), only (id, label, top-5 prediction) are kept.
    """

    def __init__(
        self,
        bank_features: Tensor,
        bank_labels: Tensor,
        num_classes: int | None = None,
        k: int = 20,
        temperature: float = 0.07,
        top_k: tuple[int, ...] = (1, 5),
        **kwargs,
    ) -> None:
        super().__init__(**kwargs)
        self.register_buffer("bank_features", F.normalize(bank_features.detach().float(), dim=-1), persistent=False)
        self.register_buffer("bank_labels", bank_labels.detach().long(), persistent=False)
        self.num_classes = int(num_classes if num_classes is not None else int(bank_labels.max()) + 1)
        self.k, self.temperature, self.top_k = k, temperature, tuple(top_k)
        self.add_state("ids", default=[], dist_reduce_fx="cat")
        self.add_state("labels", default=[], dist_reduce_fx="cat")
        self.add_state("preds", default=[], dist_reduce_fx="cat")

    def update(self, features: Tensor, labels: Tensor, sample_ids: Tensor) -> None:
        """Vote these features' classes against the bank now, keeping only the top-k predictions, labels and ids."""
        votes = knn_votes(features, self.bank_features, self.bank_labels, self.num_classes, self.k, self.temperature)
        self.preds.append(votes.topk(min(max(self.top_k), self.num_classes), dim=1).indices)
        self.labels.append(labels.detach().long().flatten().to(votes.device))
        self.ids.append(_ids_or_none(sample_ids, features.shape[0], votes.device))

    def compute(self) -> dict[str, Tensor]:
        """k-NN top-k accuracies over the gathered predictions, each sample id counted once."""
        ids = self._cat("ids")
        if ids is None:
            raise RuntimeError("KNNAccuracy.compute() called before any update()")
        ids, labels, preds = dedupe_by_id(ids, self._cat("labels"), self._cat("preds"))
        hit = preds == labels[:, None]
        out = {f"top{k}": _hit_rate(hit, k, self.num_classes) for k in self.top_k}
        out["num_samples"] = torch.tensor(ids.numel())
        return out


# ---------------------------------------------------------------------------------------- fidelity
def feature_cosine_by_id(ids_a: Tensor, feats_a: Tensor, ids_b: Tensor, feats_b: Tensor) -> Tensor:
    """Mean cosine similarity between two embedding sets over their common sample ids."""
    ids_a, feats_a = dedupe_by_id(ids_a, feats_a)
    ids_b, feats_b = dedupe_by_id(ids_b, feats_b)
    pos = torch.searchsorted(ids_b, ids_a).clamp(max=max(ids_b.numel() - 1, 0))
    match = ids_b[pos] == ids_a
    if not bool(match.any()):
        raise ValueError("the two embedding sets share no sample id")
    cos = F.cosine_similarity(feats_a[match].float(), feats_b[pos[match]].float(), dim=-1)
    return cos.mean()


class FeatureFidelity(_GatherMetric):
    """Mean cosine similarity between (quantized) features and float-model reference features.

    Either pass the reference per batch, ``update(features, sample_ids, reference=ref_features)``, or
    give a reference bank once (``reference_ids``, ``reference_features``; e.g. float features saved
    earlier and gathered with :func:`regcache.eval.gather_by_id`) and call
    ``update(features, sample_ids)``: reference rows are looked up by sample id.
    ``compute()`` -> ``{"mean_cosine", "min_cosine", "num_samples"}``.
    """

    higher_is_better = True

    def __init__(self, reference_ids: Tensor | None = None, reference_features: Tensor | None = None, **kwargs) -> None:
        super().__init__(**kwargs)
        if (reference_ids is None) != (reference_features is None):
            raise ValueError("give both reference_ids and reference_features, or neither")
        if reference_ids is not None:
            rid, rf = dedupe_by_id(reference_ids.long().flatten(), reference_features.detach().float())
            self.register_buffer("ref_ids", rid, persistent=False)
            self.register_buffer("ref_feats", rf, persistent=False)
        else:
            self.ref_ids = self.ref_feats = None
        self.add_state("ids", default=[], dist_reduce_fx="cat")
        self.add_state("cos", default=[], dist_reduce_fx="cat")

    def update(self, features: Tensor, sample_ids: Tensor, reference: Tensor | None = None) -> None:
        """Keep the cosine of each feature to its reference (given, or looked up in the bank by sample id)."""
        ids = _ids_or_none(sample_ids, features.shape[0], features.device)
        if reference is None:
            if self.ref_ids is None:
                raise ValueError("no reference: pass reference= or build the metric with a reference bank")
            pos = torch.searchsorted(self.ref_ids, ids).clamp(max=self.ref_ids.numel() - 1)
            if not bool((self.ref_ids[pos] == ids).all()):
                raise KeyError("some sample ids are missing from the reference bank")
            reference = self.ref_feats[pos]
        cos = F.cosine_similarity(features.detach().float(), reference.detach().float().to(features.device), dim=-1)
        self.ids.append(ids)
        self.cos.append(cos)

    def compute(self) -> dict[str, Tensor]:
        """Mean and minimum cosine to the reference over the gathered samples, each sample id counted once."""
        ids = self._cat("ids")
        if ids is None:
            raise RuntimeError("FeatureFidelity.compute() called before any update()")
        ids, cos = dedupe_by_id(ids, self._cat("cos"))
        return {"mean_cosine": cos.mean(), "min_cosine": cos.min(), "num_samples": torch.tensor(ids.numel())}
