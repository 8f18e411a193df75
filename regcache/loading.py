"""Load encoders by name: open_clip names + pretrained tags, ``hf-hub:`` ids, local checkpoints, timm names.

    load_model("ViT-B-16-quickgelu", "openai")            # open_clip name + tag
    load_model("ViT-B-16", "/ckpt/open_clip_model.safetensors")   # open_clip name + local file
    load_model("hf-hub:timm/ViT-B-16-SigLIP2")             # open_clip config + weights from the hub
    load_model("timm:vit_base_patch14_dinov2", "lvd142m")  # timm name + tag (or a local file)
    load_model("hf:openai/clip-vit-large-patch14-336")     # transformers vision tower (hub id or folder)
    load_model("ViT-B-16")                                  # random weights

Weights come from the local Hugging Face cache first. When they are not cached and the hub
cannot be reached, :class:`WeightsUnavailableError` is raised within seconds (instead of a
minute of retries) with the way to pass a local file. Hugging Face tokenizers (SigLIP, SigLIP2)
resolve the same way, whatever the weights: ``tokenizer=`` (a local folder), the folder of a local
checkpoint when it holds the tokenizer files, the Hugging Face cache, then the hub.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import torch
from torch import nn

import regcache.models  # noqa: F401  (registers the bundled open_clip configs: regcache-tiny-vit, ...)

HF_HUB_PREFIX = "hf-hub:"
TIMM_PREFIX = "timm:"


class WeightsUnavailableError(RuntimeError):
    """Pretrained weights are neither cached nor downloadable."""


class CheckpointMismatchError(ValueError):
    """A local checkpoint whose tensors do not fit the named architecture; the message names the file and the fix."""


def _is_mismatch(exc: BaseException) -> bool:
    # open_clip asserts on resized position embeddings; torch names missing / unexpected / resized tensors
    return isinstance(exc, (AssertionError, KeyError)) or (
        isinstance(exc, RuntimeError) and ("state_dict" in str(exc) or "size mismatch" in str(exc))
    )


def _mismatch(checkpoint: str, name: str, exc: BaseException, fix: str) -> CheckpointMismatchError:
    # torch's first line only says "Error(s) in loading state_dict"; the second names the tensor
    detail = " ".join(line.strip() for line in str(exc).strip().splitlines()[:2])[:300]
    return CheckpointMismatchError(
        f"checkpoint {checkpoint} does not fit the architecture {name!r} ({type(exc).__name__}: {detail}); {fix}"
    )


@dataclass
class LoadedModel:
    """A model with what it needs to be evaluated: preprocessing and (for CLIP-like models) a tokenizer."""

    model: nn.Module
    preprocess: Callable[[Any], torch.Tensor]
    tokenizer: Callable[..., torch.Tensor] | None
    name: str
    pretrained: str | None
    checkpoint: str | None = None  # the weights file read (None: random weights), for the run record

    @property
    def has_text_tower(self) -> bool:
        """True for CLIP-style models (zero-shot / retrieval), False for image-only encoders (k-NN)."""
        return hasattr(self.model, "encode_text")

    @property
    def identity(self) -> str:
        """A string naming model and weights (used to key caches)."""
        return f"{self.name}@{self.pretrained or 'random'}"


def _hub_endpoint() -> str:
    return os.environ.get("HF_ENDPOINT", "https://huggingface.co")


def hub_reachable(timeout: float = 3.0) -> bool:
    """Whether the Hugging Face hub answers a TCP connection within ``timeout`` seconds."""
    if os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes"):
        return False
    url = urlparse(_hub_endpoint())
    port = url.port or (443 if url.scheme == "https" else 80)
    try:
        with socket.create_connection((url.hostname, port), timeout=timeout):
            return True
    except OSError:
        return False


def _unavailable(what: str, hint: str) -> WeightsUnavailableError:
    return WeightsUnavailableError(
        f"could not fetch pretrained weights for {what}: they are not in the local cache and the hub "
        f"({_hub_endpoint()}) cannot be reached. Download the checkpoint on a machine with network "
        f"access and pass its local path instead, e.g. {hint}"
    )


def _hf_file(repo_id: str, filenames: list[str], what: str, hint: str) -> str:
    """Path of the first of ``filenames`` in ``repo_id``: cache first, then download if the hub answers."""
    from huggingface_hub import hf_hub_download

    for local_only in (True, False):
        if not local_only and not hub_reachable():
            raise _unavailable(what, hint)
        for filename in filenames:
            with contextlib.suppress(Exception):  # not there: try the next candidate file
                return hf_hub_download(repo_id, filename, local_files_only=local_only)
    raise WeightsUnavailableError(f"none of {filenames} found in hub repo {repo_id} (for {what})")


def _is_local_file(pretrained: str | None) -> bool:
    return pretrained is not None and (Path(pretrained).expanduser().is_file() or os.sep in pretrained)


def _open_clip_checkpoint(cfg: dict, what: str, name: str) -> str:
    """Local path of a pretrained tag's weights (hub cache first, then download)."""
    import open_clip

    hint = f"load_model({name!r}, '/path/to/open_clip_model.safetensors')"
    hub = cfg.get("hf_hub", "")
    if hub:  # 'org/repo/' (default file names) or 'org/repo/file.bin'
        repo_id, _, filename = hub.rpartition("/") if not hub.endswith("/") else (hub.rstrip("/"), "", "")
        candidates = [filename] if filename else ["open_clip_model.safetensors", "open_clip_pytorch_model.bin"]
        return _hf_file(repo_id, candidates, what, hint)
    if not hub_reachable():
        raise _unavailable(what, hint)
    return open_clip.download_pretrained(cfg)


TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "spiece.model", "tokenizer.model")


def _has_tokenizer_files(folder: Path) -> bool:
    return folder.is_dir() and any((folder / f).is_file() for f in TOKENIZER_FILES)


def _cached_snapshot(repo_id: str) -> Path | None:
    """The Hugging Face cache's snapshot folder of ``repo_id`` (None where it is not cached)."""
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(repo_id, local_files_only=True))
    except Exception:  # not cached, or not a repo id: the caller falls back to the hub
        return None


def _hf_tokenizer(source: str | Path, text_cfg: dict, **kwargs: Any) -> Callable[..., torch.Tensor]:
    """open_clip's HFTokenizer over ``source`` (a folder or hub id) with the model config's settings."""
    try:
        from open_clip.tokenizer import HFTokenizer
    except ImportError as e:  # pragma: no cover - transformers is a dependency
        raise ImportError(f"{e}: Hugging Face tokenizers (SigLIP, SigLIP2) need `pip install transformers`") from e
    return HFTokenizer(
        str(source),
        context_length=text_cfg.get("context_length", 77),
        tokenizer_mode=text_cfg.get("tokenizer_mode"),
        **{**text_cfg.get("tokenizer_kwargs", {}), **kwargs},
    )


def resolve_tokenizer(
    name: str, text_cfg: dict, tokenizer: str | None = None, local_dirs: tuple[Path, ...] = ()
) -> Callable[..., torch.Tensor] | None:
    """The Hugging Face tokenizer a model config names, found locally first; None if it names none.

    Order: ``tokenizer`` (a local folder, or a hub id), the first of ``local_dirs`` holding tokenizer
    files (a local checkpoint's folder), the Hugging Face cache, the hub. Raises
    :class:`WeightsUnavailableError` naming the fix where none of them has it.
    """
    source = tokenizer or text_cfg.get("hf_tokenizer_name")
    if not source:
        return None
    if tokenizer and (Path(tokenizer).expanduser().exists() or os.sep in tokenizer):
        folder = Path(tokenizer).expanduser()
        if not _has_tokenizer_files(folder):
            raise FileNotFoundError(
                f"tokenizer folder {folder} holds none of {list(TOKENIZER_FILES)}: pass the folder a Hugging Face "
                f"tokenizer was saved to (tokenizer.save_pretrained(folder), or a download of the hub repo {source})"
            )
        return _hf_tokenizer(folder, text_cfg)
    for folder in local_dirs:
        if _has_tokenizer_files(folder):
            return _hf_tokenizer(folder, text_cfg)
    cached = _cached_snapshot(source)
    if cached is not None and _has_tokenizer_files(cached):
        # loaded as a folder: as a hub id transformers would look for a model config.json the repo may lack
        return _hf_tokenizer(cached, text_cfg)
    if not hub_reachable():
        raise WeightsUnavailableError(
            f"could not load the tokenizer of {name} ({source}): it is not in the local Hugging Face cache and "
            f"the hub ({_hub_endpoint()}) cannot be reached. On a machine with network access run "
            f"`hf download {source}` (or tokenizer.save_pretrained(folder) with transformers) and pass the folder: "
            f"load_model({name!r}, ..., tokenizer='/path/to/tokenizer') (config: model.tokenizer), put its files "
            "next to your local checkpoint, or copy the Hugging Face cache (HF_HOME) over"
        )
    return _hf_tokenizer(source, text_cfg)


def _open_clip_tokenizer(
    name: str, tokenizer: str | None, local_dirs: tuple[Path, ...] = (), text_cfg: dict | None = None
) -> Callable[..., torch.Tensor]:
    """The model's tokenizer: a Hugging Face one resolved locally first, else open_clip's bundled one."""
    import open_clip

    if text_cfg is None:
        text_cfg = (open_clip.get_model_config(name) or {}).get("text_cfg", {})
    resolved = resolve_tokenizer(name, text_cfg, tokenizer, local_dirs)
    return resolved if resolved is not None else open_clip.get_tokenizer(name)


def _open_clip(
    name: str, pretrained: str | None, device: str, image_size: int | None, tokenizer: str | None = None
) -> LoadedModel:
    import open_clip

    if name.startswith(HF_HUB_PREFIX):
        repo = name[len(HF_HUB_PREFIX) :]
        hint = f"load_model('<open_clip arch name>', '/path/to/{repo.split('/')[-1]}.safetensors')"
        config = _hf_file(repo, ["open_clip_config.json"], name, hint)
        weights = _hf_file(repo, ["open_clip_model.safetensors", "open_clip_pytorch_model.bin"], name, hint)
        model_dir = Path(config).parent
        if Path(weights).parent != model_dir:  # pragma: no cover - hub cache keeps one snapshot dir
            raise WeightsUnavailableError(f"config and weights of {name} resolved to different snapshots")
        text_cfg = json.loads(Path(config).read_text()).get("model_cfg", {}).get("text_cfg", {})
        if text_cfg.get("hf_tokenizer_name") or tokenizer:
            tok = _open_clip_tokenizer(name, tokenizer, (model_dir,), text_cfg)
        else:
            tok = open_clip.get_tokenizer(f"local-dir:{model_dir}")
        model, _, preprocess = open_clip.create_model_and_transforms(
            f"local-dir:{model_dir}", device=device, force_image_size=image_size
        )
        return LoadedModel(model.eval(), preprocess, tok, name, pretrained, weights)

    if name not in open_clip.list_models():
        raise ValueError(
            f"unknown open_clip model {name!r}; see open_clip.list_models() "
            "(use 'hf-hub:org/repo' for hub models or 'timm:<name>' for timm encoders)"
        )
    checkpoint, kwargs = None, {}
    if pretrained and _is_local_file(pretrained):
        checkpoint = str(Path(pretrained).expanduser())
        if not Path(checkpoint).is_file():
            raise FileNotFoundError(f"checkpoint file {checkpoint} does not exist")
    elif pretrained:
        cfg = open_clip.get_pretrained_cfg(name, pretrained)
        if not cfg:
            tags = open_clip.list_pretrained_tags_by_model(name)
            raise ValueError(f"unknown pretrained tag {pretrained!r} for {name}; available: {tags}")
        if cfg.get("quick_gelu") and "quickgelu" not in name:
            raise ValueError(f"{name} / {pretrained} was trained with QuickGELU: use the model name '{name}-quickgelu'")
        checkpoint = _open_clip_checkpoint(cfg, f"{name} ({pretrained})", name)
        # open_clip applies a tag's preprocessing only when given the tag: pass it with the file
        kwargs = {
            "image_mean": cfg.get("mean"),
            "image_std": cfg.get("std"),
            "image_interpolation": cfg.get("interpolation"),
            "image_resize_mode": cfg.get("resize_mode"),
        }
    # the tokenizer first: a missing one fails before minutes of building a large model
    local_dirs = (Path(checkpoint).parent,) if checkpoint else ()  # a hub snapshot or the user's own folder
    tok = _open_clip_tokenizer(name, tokenizer, local_dirs)
    try:
        model, _, preprocess = open_clip.create_model_and_transforms(
            name,
            pretrained=checkpoint,
            device=device,
            force_image_size=image_size,
            **{k: v for k, v in kwargs.items() if v is not None},
        )
    except Exception as exc:
        if checkpoint is None or not _is_mismatch(exc):
            raise
        fix = (
            "pass the open_clip model name the checkpoint was trained as (open_clip.list_models(); e.g. "
            "'ViT-B-16' for a ViT-B/16, '-quickgelu' for OpenAI weights), or a checkpoint of this architecture"
        )
        raise _mismatch(checkpoint, name, exc, fix) from exc
    return LoadedModel(model.eval(), preprocess, tok, name, pretrained, checkpoint)


def _timm(name: str, pretrained: str | None, device: str, image_size: int | None) -> LoadedModel:
    import timm

    arch = name[len(TIMM_PREFIX) :]
    if "." in arch:
        arch, _, tag = arch.partition(".")
        if pretrained and not _is_local_file(pretrained) and pretrained != tag:
            raise ValueError(f"timm name {name!r} names tag {tag!r} but pretrained={pretrained!r}")
        pretrained = pretrained or tag
    if not timm.is_model(arch):
        raise ValueError(f"unknown timm model {arch!r}; see timm.list_models()")
    kwargs: dict[str, Any] = {"num_classes": 0}
    if image_size:
        kwargs["img_size"] = image_size
    checkpoint = None
    if pretrained and _is_local_file(pretrained):
        checkpoint = str(Path(pretrained).expanduser())
        kwargs["pretrained_cfg_overlay"] = {"file": checkpoint}
        try:
            model = timm.create_model(arch, pretrained=True, **kwargs)
        except Exception as exc:
            if not _is_mismatch(exc):
                raise
            fix = "pass the timm model name the checkpoint was trained as ('timm:<name>', timm.list_models())"
            raise _mismatch(checkpoint, name, exc, fix) from exc
    elif pretrained:
        full = f"{arch}.{pretrained}"
        pcfg = timm.models.get_pretrained_cfg(full)
        if pcfg is None:
            raise ValueError(f"unknown pretrained tag {pretrained!r} for timm model {arch}")
        hint = f"load_model('timm:{arch}', '/path/to/model.safetensors')"
        repo = pcfg.hf_hub_id or f"timm/{full}"
        checkpoint = _hf_file(repo, ["model.safetensors", "pytorch_model.bin"], f"timm:{full}", hint)
        model = timm.create_model(full, pretrained=True, pretrained_cfg_overlay={"file": checkpoint}, **kwargs)
    else:
        model = timm.create_model(arch, pretrained=False, **kwargs)
    data_cfg = timm.data.resolve_data_config({}, model=model)
    # the pretrained config's input size is the checkpoint's (518 for DINOv2), not the model's after img_size
    size = getattr(getattr(model, "patch_embed", None), "img_size", None) or (image_size and (image_size, image_size))
    if size:
        data_cfg["input_size"] = (data_cfg["input_size"][0], *size)
    preprocess = timm.data.create_transform(**data_cfg)
    return LoadedModel(model.to(device).eval(), preprocess, None, name, pretrained, checkpoint)


def load_model(
    name: str,
    pretrained: str | None = None,
    device: str | torch.device = "cpu",
    image_size: int | None = None,
    tokenizer: str | None = None,
    feature_layer: int | None = None,
) -> LoadedModel:
    """Create a model by name with weights from a tag, a hub id or a local file (``None``: random init).

    ``image_size`` overrides the input resolution (e.g. 224 for DINOv2, whose default is 518).
    ``tokenizer`` is a local folder (or hub id) with the Hugging Face tokenizer to use instead of the
    one the model config names (SigLIP, SigLIP2); see :func:`resolve_tokenizer`.
    ``feature_layer`` (``hf:`` models only): the tower ends at ``hidden_states[feature_layer]``
    (-2: LLaVA's penultimate-layer features), see :mod:`regcache.encoders.hf_vit`.
    """
    device = str(device)
    if name.startswith("hf:"):  # transformers vision towers (regcache.loading_hf)
        from regcache.loading_hf import load_hf

        if tokenizer is not None:
            raise ValueError(f"{name} loads a transformers vision tower only: it has no tokenizer (leave it unset)")
        return load_hf(name, pretrained, device, image_size, feature_layer)
    if feature_layer is not None:
        raise ValueError(
            f"feature_layer (model.feature_layer in a config) applies to transformers towers ('hf:<id or folder>') "
            f"only, not {name!r}: leave it unset (null) for this model"
        )
    if name == "regcache-testbed":  # the embedded testbed: committed weights and its own preprocessing
        from regcache.testbed import load_testbed

        if tokenizer is not None:
            raise ValueError("regcache-testbed uses its own bundled tokenizer (leave tokenizer unset)")
        return load_testbed(pretrained, device)
    if name.startswith(TIMM_PREFIX):
        if tokenizer is not None:
            raise ValueError(f"{name} is an image-only timm encoder: it has no tokenizer (leave tokenizer unset)")
        return _timm(name, pretrained, device, image_size)
    return _open_clip(name, pretrained, device, image_size, tokenizer)
