"""Load ``transformers`` vision towers: ``load_model("hf:<model id>")`` or ``load_model("hf:/local/folder")``.

The folder (a hub snapshot or ``save_pretrained`` output) needs ``config.json`` and the weights;
its ``preprocessor_config.json`` gives the preprocessing. The class comes from the config's
``model_type``: a CLIP checkpoint loads as ``CLIPVisionModelWithProjection`` (its vision tower and
projection; LLaVA-style users read the patch tokens, which the projection does not touch), a
``clip_vision_model`` one as ``CLIPVisionModel``, SigLIP / SigLIP2 as their ``VisionModel``,
DINOv2 as ``Dinov2Model`` / ``Dinov2WithRegistersModel``. The text towers are not loaded.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

HF_PREFIX = "hf:"

# config model_type -> transformers class loaded for it
MODEL_TYPES = {
    "clip": "CLIPVisionModelWithProjection",
    "clip_vision_model": "CLIPVisionModel",
    "siglip": "SiglipVisionModel",
    "siglip_vision_model": "SiglipVisionModel",
    "siglip2": "Siglip2VisionModel",
    "siglip2_vision_model": "Siglip2VisionModel",
    "dinov2": "Dinov2Model",
    "dinov2_with_registers": "Dinov2WithRegistersModel",
}
# preprocessing where a folder has no preprocessor_config.json: each family's published normalization
_DEFAULT_MEAN_STD = {
    "CLIP": ((0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)),
    "Siglip": ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5)),
    "Dinov2": ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
}
_RESAMPLE = {0: "nearest", 2: "bilinear", 3: "bicubic"}  # PIL codes the image processors store


def _snapshot(repo_id: str, what: str) -> Path:
    """The local folder of hub repo ``repo_id``: the Hugging Face cache first, then a download if the hub answers."""
    from huggingface_hub import snapshot_download

    from regcache.loading import _cached_snapshot, _hub_endpoint, hub_reachable

    cached = _cached_snapshot(repo_id)
    if cached is not None and (cached / "config.json").is_file():
        return cached
    if not hub_reachable():
        from regcache.loading import WeightsUnavailableError

        raise WeightsUnavailableError(
            f"could not fetch {what}: {repo_id} is not in the local Hugging Face cache and the hub "
            f"({_hub_endpoint()}) cannot be reached. On a machine with network access run `hf download {repo_id}` "
            f"(or model.save_pretrained(folder) with transformers) and pass the folder: "
            f"load_model('hf:/path/to/folder') (config: model.model: hf:/path/to/folder), or copy the Hugging Face "
            "cache (HF_HOME) over"
        )
    patterns = ["*.json", "*.safetensors", "*.bin", "*.txt", "*.model"]
    return Path(snapshot_download(repo_id, allow_patterns=patterns))


def _folder(name: str, pretrained: str | None) -> Path:
    """The model folder named by ``hf:<id or folder>`` (``pretrained``: a local folder overriding the id's files)."""
    target = name[len(HF_PREFIX) :]
    if not target:
        raise ValueError("'hf:' needs a model id or a folder, e.g. 'hf:openai/clip-vit-large-patch14-336'")
    if pretrained is not None:
        folder = Path(pretrained).expanduser()
        if not folder.is_dir():
            raise FileNotFoundError(
                f"pretrained={pretrained!r} for {name}: pass a folder holding config.json and the weights "
                "(save_pretrained output or a hub download), or leave pretrained unset to use the hub id"
            )
        return folder
    local = Path(target).expanduser()
    if local.is_dir():
        return local
    if target.startswith((".", "/", "~")) or target.count("/") > 1:
        raise FileNotFoundError(f"{name}: folder {local} does not exist (or pass a hub id 'org/name')")
    return _snapshot(target, name)


def _preprocess(folder: Path, model: torch.nn.Module, image_size: int | None) -> Any:
    """Resize / center crop / normalize as the folder's image processor does (square crop at ``image_size``)."""
    from torchvision import transforms as T

    cfg_path = folder / "preprocessor_config.json"
    cfg = json.loads(cfg_path.read_text()) if cfg_path.is_file() else {}
    family = next((k for k in _DEFAULT_MEAN_STD if type(model).__name__.startswith(k)), "CLIP")
    mean = cfg.get("image_mean", _DEFAULT_MEAN_STD[family][0])
    std = cfg.get("image_std", _DEFAULT_MEAN_STD[family][1])
    vision = getattr(model.config, "vision_config", model.config)
    native = getattr(vision, "image_size", None) or int(vision.num_patches**0.5) * vision.patch_size
    crop = cfg.get("crop_size") if cfg.get("do_center_crop", False) else None
    crop_size = image_size or (crop and (crop.get("height") or crop.get("shortest_edge"))) or native
    size = cfg.get("size") or {}
    if image_size is not None:
        resize: int | tuple[int, int] = image_size if "shortest_edge" in size else (image_size, image_size)
    elif "shortest_edge" in size:
        resize = size["shortest_edge"]
    elif "height" in size:
        resize = (size["height"], size["width"])
    else:
        resize = (native, native)
    interpolation = T.InterpolationMode(_RESAMPLE.get(cfg.get("resample", 3), "bicubic"))
    return T.Compose(
        [
            T.Resize(resize, interpolation=interpolation),
            T.CenterCrop(crop_size),
            _convert_to_rgb,
            T.ToTensor(),
            T.Normalize(mean, std),
        ]
    )


def _convert_to_rgb(image: Any) -> Any:
    """PIL image → RGB (grayscale / RGBA inputs)."""
    return image.convert("RGB")


def load_hf(
    name: str, pretrained: str | None, device: str, image_size: int | None, feature_layer: int | None = None
) -> Any:
    """A :class:`~regcache.loading.LoadedModel` of a transformers vision tower (no tokenizer: image-only)."""
    import transformers

    from regcache.loading import LoadedModel

    folder = _folder(name, pretrained)
    config_path = folder / "config.json"
    if not config_path.is_file():
        raise FileNotFoundError(f"{folder} holds no config.json: pass a transformers model folder (save_pretrained)")
    model_type = json.loads(config_path.read_text()).get("model_type")
    cls_name = MODEL_TYPES.get(model_type)
    if cls_name is None:
        raise ValueError(
            f"{name}: model_type {model_type!r} has no vision-tower adapter; supported: {sorted(MODEL_TYPES)}"
        )
    kwargs: dict[str, Any] = {}
    if model_type == "clip":  # the tower of a full CLIP checkpoint: its projection size is the top-level one
        full = transformers.CLIPConfig.from_pretrained(str(folder))
        vision = full.vision_config
        vision.projection_dim = full.projection_dim
        kwargs["config"] = vision
    model = getattr(transformers, cls_name).from_pretrained(str(folder), **kwargs).to(device).eval()
    if feature_layer is not None:
        model.regcache_feature_layer = feature_layer  # read by the adapter (hidden_states[feature_layer])
    return LoadedModel(model, _preprocess(folder, model, image_size), None, name, pretrained)
