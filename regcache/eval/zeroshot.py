"""Zero-shot classifier (text-tower class embeddings) for CLIP-like models, with a disk cache.

Distribution policy: when torch.distributed is initialised with world size > 1, rank 0 builds (or
loads from cache) the classifier and broadcasts it; every rank must therefore call
:func:`build_zeroshot_classifier` (it is a collective). Only rank 0 reads/writes the cache.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor
from tqdm.auto import tqdm

from regcache.utils import weights_fingerprint

__all__ = [
    "build_zeroshot_classifier",
    "classifier_cache_key",
    "classifier_cache_spec",
    "fill_template",
    "zeroshot_logits",
]

log = logging.getLogger(__name__)

Template = str | Callable[[str], str]


def fill_template(template: Template, classname: str) -> str:
    """``"a photo of a {c}."`` -> filled string; callables (open_clip style) are called."""
    return template(classname) if callable(template) else template.replace("{c}", classname)


def classifier_cache_spec(
    model: torch.nn.Module,
    tokenizer: Callable,
    classnames: Sequence[str],
    templates: Sequence[Template],
    model_id: str | None = None,
) -> dict[str, Any]:
    """Everything a zero-shot head depends on: text-tower weights and dtype, model and tokenizer, classes, templates.

    The text tower is every state entry outside ``visual.`` (the vision tower, which quantization
    and registers change, does not enter the head); a model without ``visual`` is fingerprinted whole.
    """
    skip = ("visual.",) if isinstance(getattr(model, "visual", None), torch.nn.Module) else ()
    text_dtypes = sorted(
        {str(p.dtype) for n, p in model.state_dict().items() if not n.startswith(skip) and torch.is_floating_point(p)}
    )
    device_type = next((p.device.type for p in model.parameters()), "cpu")
    autocast = str(torch.get_autocast_dtype(device_type)) if torch.is_autocast_enabled(device_type) else None
    spec = {
        "model": model_id,
        "tokenizer": f"{type(tokenizer).__module__}.{type(tokenizer).__qualname__}",
        "context_length": getattr(tokenizer, "context_length", None),
        "text_weights": weights_fingerprint(model, skip_prefixes=skip),
        "dtype": text_dtypes,
        "autocast": autocast,
        "templates": [fill_template(t, "{c}") for t in templates],
        "classnames": list(classnames),
    }
    # a Hugging Face tokenizer's type says nothing of its vocabulary: key on where it was loaded from
    source = getattr(getattr(tokenizer, "tokenizer", None), "name_or_path", None)
    if source is not None:
        spec["tokenizer_source"] = str(source)
    return spec


def classifier_cache_key(spec: dict[str, Any]) -> str:
    """sha256 of a :func:`classifier_cache_spec`: the cache file's name."""
    return hashlib.sha256(_spec_json(spec).encode("utf-8")).hexdigest()


def _spec_json(spec: dict[str, Any]) -> str:
    return json.dumps(spec, ensure_ascii=False, sort_keys=True)


def _load_cached(path: Path, spec: dict[str, Any]) -> Tensor | None:
    """The cached head at ``path`` if its stored spec equals ``spec`` exactly, else None."""
    try:
        data = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # a torn or foreign file is recomputed, not trusted
        log.warning("zero-shot classifier cache %s is unreadable (%r): computing it again", path, exc)
        return None
    if not isinstance(data, dict) or data.get("spec") != _spec_json(spec):
        log.warning("zero-shot classifier cache %s was built for something else: computing it again", path)
        return None
    log.info(
        "reusing the zero-shot classifier %s: same text-tower weights (%s), model %s, dtype, %d class names and "
        "%d templates",
        path,
        spec["text_weights"],
        spec["model"],
        len(spec["classnames"]),
        len(spec["templates"]),
    )
    return data["classifier"]


def _to_device(tokens: Tensor, device: torch.device | str) -> Tensor:
    """Token ids on ``device``; to a GPU through pinned memory without blocking, so tokenizing the next batch
    (Python, on the CPU) overlaps this batch's text tower instead of waiting for the GPU to drain."""
    if torch.device(device).type == "cuda":
        return tokens.pin_memory().to(device, non_blocking=True)
    return tokens.to(device)


def _gather_batches(mine: dict[int, Tensor], sizes: list[int], world: int) -> list[Tensor]:
    """Every text batch's embeddings, in batch order, from the ranks that encoded them (batch i on rank i % world).

    One tensor ``all_gather`` of each rank's batches padded to a common shape: pickling them through
    ``all_gather_object`` (80,000 x 512 floats for ImageNet's prompts) cost as much as the encoding it shared.
    """
    first = next(iter(mine.values()))
    per_rank = -(-len(sizes) // world)
    padded = first.new_zeros(per_rank, max(sizes), first.shape[-1])
    for i, e in mine.items():
        padded[i // world, : len(e)] = e
    parts = [torch.empty_like(padded) for _ in range(world)]
    dist.all_gather(parts, padded)
    return [parts[i % world][i // world, :n] for i, n in enumerate(sizes)]


@torch.no_grad()
def _compute(
    model, tokenizer, classnames, templates, device, batch_size, rank: int = 0, world: int = 1, progress: bool = False
) -> Tensor:
    """The classifier; under ``world`` > 1 each rank encodes every world-th text batch and all gather.

    The batches are those of the single-process computation (same texts, same shapes), so the
    result does not depend on the number of ranks.
    """
    texts = [fill_template(t, c) for c in classnames for t in templates]
    starts = range(0, len(texts), batch_size)
    if len(starts) < world:  # a rank would have no batch: each encodes all (a few texts)
        rank, world = 0, 1
    mine = {}
    # disable=None: tqdm stays quiet where stderr is not a terminal (logs, CI); only rank 0 draws
    bar = tqdm(
        total=len(range(rank, len(starts), world)),
        desc=f"zero-shot head ({len(classnames)} classes x {len(templates)} templates)",
        unit="batch",
        leave=False,
        disable=None if progress and rank == 0 else True,
    )
    for i, s in enumerate(starts):
        if i % world == rank:
            tokens = tokenizer(texts[s : s + batch_size])
            if isinstance(tokens, Tensor):
                tokens = _to_device(tokens, device)
            mine[i] = F.normalize(model.encode_text(tokens).float(), dim=-1)
            bar.update()
    bar.close()
    if world > 1:
        batches = _gather_batches(mine, [len(texts[s : s + batch_size]) for s in starts], world)
    else:
        batches = [mine[i] for i in range(len(starts))]
    e = torch.cat(batches).reshape(len(classnames), len(templates), -1)
    return F.normalize(e.mean(dim=1), dim=-1).T.contiguous()  # (embed_dim, num_classes)


def build_zeroshot_classifier(
    model: torch.nn.Module,
    tokenizer: Callable,
    classnames: Sequence[str],
    templates: Sequence[Template],
    device: torch.device | str = "cpu",
    batch_size: int = 256,
    *,
    cache_dir: str | os.PathLike | None = None,
    model_id: str | None = None,
    progress: bool = True,
) -> Tensor:
    """Zero-shot classification head, shape ``(embed_dim, num_classes)``, float32 on ``device``.

    Per class: fill every template, tokenize, ``model.encode_text``, L2-normalise each, average,
    renormalise. With ``cache_dir`` it is cached as ``<cache_dir>/zeroshot_<sha256>.pt``, keyed by
    :func:`classifier_cache_spec` (text-tower weights fingerprint and dtype, ``model_id`` such as
    ``"ViT-B-16-quickgelu@openai"``, tokenizer, class names, templates) and reused (logged) only when
    the stored spec matches exactly. Collective under torch.distributed: the ranks share the text
    encoding (rank 0 loads a cached classifier and broadcasts it instead); the result does not
    depend on the number of ranks. ``progress`` draws a bar over the text batches on rank 0 where
    stderr is a terminal.
    """
    if not classnames or not templates:
        raise ValueError("need at least one class name and one template")
    distributed = dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1
    rank, world = (dist.get_rank(), dist.get_world_size()) if distributed else (0, 1)
    W: Tensor | None = None
    path = spec = None
    if cache_dir is not None and rank == 0:  # only rank 0 touches the cache
        spec = classifier_cache_spec(model, tokenizer, classnames, templates, model_id)
        path = Path(cache_dir) / f"zeroshot_{classifier_cache_key(spec)}.pt"
        if path.is_file() and (W := _load_cached(path, spec)) is not None:
            W = W.to(device=device, dtype=torch.float32)
    cached = [W is not None]
    if distributed:
        dist.broadcast_object_list(cached, src=0)
    if not cached[0]:  # every rank encodes a share of the text batches
        W = _compute(model, tokenizer, list(classnames), list(templates), device, batch_size, rank, world, progress)
        W = W.to(device=device, dtype=torch.float32)
        if rank == 0 and path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_suffix(f".tmp{os.getpid()}")
            torch.save({"spec": _spec_json(spec), "classifier": W.cpu()}, tmp)
            os.replace(tmp, path)
    elif distributed:
        shape = [tuple(W.shape) if W is not None else None]
        dist.broadcast_object_list(shape, src=0)
        if W is None:
            W = torch.empty(shape[0], dtype=torch.float32, device=device)
        dist.broadcast(W, src=0)
    return W


def zeroshot_logits(image_features: Tensor, classifier: Tensor) -> Tensor:
    """``100 * normalize(image_features) @ classifier``."""
    return 100.0 * F.normalize(image_features.float(), dim=-1) @ classifier.to(image_features.device)
