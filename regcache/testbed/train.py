"""Train the testbed: everything but the planted weights, on CIFAR-10 train images on a canvas.

    python -m regcache.testbed.train --config train_configs/testbed_train.yaml \
        [--set epochs=200 spec.sink_query=3.0 ...] [--out runs/testbed]

Objective: zero-shot-style classification against text embeddings (a random CIFAR-10 template
per class and step, both towers trained), cross-entropy with label smoothing. The images of
the committed reference sample (``regcache/assets/data/cifar10_sample/train``) are left out.
Planted entries are restored after every optimizer step. The run ends with the acceptance
measurements (``report.json``) and writes ``testbed.safetensors`` (fp16) in the output folder.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import yaml
from torch.nn import functional as F
from tqdm.auto import tqdm

from regcache.testbed import TESTBED_NAME, CanvasTransform, create_testbed, save_testbed
from regcache.testbed.data import CIFAR10_SAMPLE, iter_shard_samples, load_split, place_on_canvas, read_lines
from regcache.testbed.model import TestbedSpec, enforce_frozen_, frozen_fraction, mask_frozen_grads_


@dataclass
class TrainConfig:
    """Training hyper-parameters (YAML keys)."""

    data: str = "../shared/data/cifar10"  # CLIP_benchmark root with train/, test/, classnames, templates
    exclude: str | None = str(CIFAR10_SAMPLE)  # a CLIP_benchmark root whose train/ keys are held out
    out: str = "runs/testbed"
    epochs: int = 150
    steps: int | None = None  # total optimizer steps (overrides epochs)
    batch_size: int = 256
    lr: float = 1e-3
    weight_decay: float = 0.05
    warmup_epochs: int = 5
    label_smoothing: float = 0.1
    seed: int = 0
    device: str = "auto"
    eval_limit: int | None = 2000  # test images for the final report (None: all)
    calib_images: int = 128  # reference images for the quantized checks of the report
    progress: bool = True
    time_budget_s: float | None = None  # shorten the schedule (measured after 50 steps) to fit this
    spec: dict = field(default_factory=dict)  # TestbedSpec overrides


def load_config(path: str | None, overrides: list[str]) -> TrainConfig:
    """YAML file + ``key=value`` overrides (``spec.<field>=value`` for the planted constants)."""
    values = yaml.safe_load(Path(path).read_text()) if path else {}
    values = values or {}
    for item in overrides:
        key, _, raw = item.partition("=")
        value = yaml.safe_load(raw)
        if key.startswith("spec."):
            values.setdefault("spec", {})[key[5:]] = value
        else:
            values[key] = value
    return TrainConfig(**values)


def _content_tensors(root: str, split: str, exclude: set[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """Normalized content squares (N, 3, s, s) and labels of a split, minus excluded keys."""
    import io

    from PIL import Image

    t = CanvasTransform()
    xs, ys = [], []
    for key, data, label in iter_shard_samples(root, split):
        if key not in exclude:
            xs.append(t.content(Image.open(io.BytesIO(data))))
            ys.append(label)
    return torch.stack(xs), torch.tensor(ys)


def _lr_at(step: int, total: int, warmup: int, base: float) -> float:
    if step < warmup:
        return base * (step + 1) / warmup
    return base * 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(total - warmup, 1)))


def train(cfg: TrainConfig) -> dict:
    """Train, measure, save; returns the report."""
    import open_clip

    device = torch.device(cfg.device if cfg.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu"))
    torch.backends.cuda.matmul.allow_tf32 = True
    spec = dataclasses.replace(TestbedSpec(), seed=cfg.seed, **cfg.spec)
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    exclude = {k for k, _, _ in iter_shard_samples(cfg.exclude, "train")} if cfg.exclude else set()
    images, labels = _content_tensors(cfg.data, "train", exclude)
    images, labels = images.to(device), labels.to(device)
    classnames = read_lines(Path(cfg.data) / "classnames.txt")
    templates = read_lines(Path(cfg.data) / "zeroshot_classification_templates.txt")
    tokenizer = open_clip.get_tokenizer(TESTBED_NAME)
    prompts = tokenizer([t.replace("{c}", c) for t in templates for c in classnames]).to(device)
    prompts = prompts.view(len(templates), len(classnames), -1)

    model, frozen = create_testbed(spec)
    model.to(device).train()
    decay = [p for n, p in model.named_parameters() if p.ndim >= 2 and "embedding" not in n]
    no_decay = [p for n, p in model.named_parameters() if not (p.ndim >= 2 and "embedding" not in n)]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}], lr=cfg.lr
    )
    steps_per_epoch = len(images) // cfg.batch_size
    total = cfg.steps or steps_per_epoch * cfg.epochs
    g = torch.Generator(device=device).manual_seed(cfg.seed)
    free = spec.canvas_size - spec.content_size
    k = len(classnames)
    start = time.time()
    bar = tqdm(range(total), disable=not cfg.progress, desc="training")
    for step in bar:
        if step == 50 and cfg.time_budget_s:
            fits = int(cfg.time_budget_s / ((time.time() - start) / step))
            if fits < total:
                print(f"time budget: {total} -> {fits} steps", flush=True)
                total = fits
        if step >= total:
            break
        idx = torch.randint(len(images), (cfg.batch_size,), device=device, generator=g)
        x = images[idx]
        flip = torch.rand(cfg.batch_size, device=device, generator=g) < 0.5
        x = torch.where(flip[:, None, None, None], x.flip(-1), x)
        offsets = torch.randint(free + 1, (cfg.batch_size, 2), device=device, generator=g)
        x = place_on_canvas(x, spec.canvas_size, offsets)
        which = torch.randint(len(templates), (k,), device=device, generator=g)
        text = prompts[which, torch.arange(k, device=device)]
        img_f = F.normalize(model.encode_image(x), dim=-1)
        txt_f = F.normalize(model.encode_text(text), dim=-1)
        logits = model.logit_scale.exp().clamp(max=100) * img_f @ txt_f.T
        loss = F.cross_entropy(logits, labels[idx], label_smoothing=cfg.label_smoothing)
        for group in opt.param_groups:
            group["lr"] = _lr_at(step, total, cfg.warmup_epochs * steps_per_epoch, cfg.lr)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        mask_frozen_grads_(model, frozen)
        opt.step()
        enforce_frozen_(model, frozen)
        if step % 100 == 0:
            bar.set_postfix(loss=f"{loss.item():.3f}")
            if not cfg.progress:
                print(f"step {step}/{total} loss {loss.item():.3f} ({time.time() - start:.0f}s)", flush=True)
    seconds = time.time() - start
    model.eval()

    info = {
        "train_config": dataclasses.asdict(cfg),
        "train_seconds": round(seconds, 1),
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "train_images": len(images),
        "train_steps": total,
        "planted_fraction_of_vision_params": frozen_fraction(model, frozen),
        "torch": torch.__version__,
    }
    _zero_unused_token_rows_(model, prompts)
    path = save_testbed(model, spec, out / "testbed.safetensors", info=info)
    report = {**info, **acceptance_report(path, cfg, device)}
    (out / "report.json").write_text(json.dumps(report, indent=2))
    save_testbed(model, spec, path, info=report)  # the numbers travel with the weights
    print(json.dumps({k: v for k, v in report.items() if k != "train_config"}, indent=2))
    return report


@torch.no_grad()
def _zero_unused_token_rows_(model: torch.nn.Module, prompts: torch.Tensor) -> None:
    """Token embeddings never seen in training carry no information: zero them (the file compresses)."""
    used = torch.zeros(model.token_embedding.weight.shape[0], dtype=torch.bool, device=prompts.device)
    used[prompts.flatten()] = True
    model.token_embedding.weight[~used.to(model.token_embedding.weight.device)] = 0.0


def acceptance_report(path: Path, cfg: TrainConfig, device: torch.device) -> dict:
    """FP / naive / RegCache-mechanism accuracies, outlier profile and sink mass of saved weights (fp16 → fp32)."""
    from regcache.encoders import adapt
    from regcache.eval import build_zeroshot_classifier
    from regcache.testbed import load_testbed, loaded_spec
    from regcache.testbed.diagnostics import outlier_profile, quantized_accuracy, sink_mass

    loaded = load_testbed(path, device=device)
    spec = loaded_spec(path)
    classnames = read_lines(Path(cfg.data) / "classnames.txt")
    templates = read_lines(Path(cfg.data) / "zeroshot_classification_templates.txt")
    classifier = build_zeroshot_classifier(loaded.model, loaded.tokenizer, classnames, templates, device)
    test_x, test_y, _ = load_split(cfg.data, "test", loaded.preprocess, limit=cfg.eval_limit)
    ref_root = cfg.exclude or cfg.data
    calib, _, _ = load_split(ref_root, "train", loaded.preprocess, limit=cfg.calib_images)
    test_x, calib = test_x.to(device), calib.to(device)
    probe = adapt(loaded.model)
    profile = outlier_profile(probe, test_x[:200])
    sinks = sink_mass(probe, test_x[:200], spec.sink_blocks, spec.sink_heads)
    loaded = load_testbed(path, device=device)
    model = loaded.model
    lq = spec.l_q
    n = len(spec.register_positions)
    acc = {
        "fp": quantized_accuracy(model, test_x, test_y, classifier, calib, None),
        "fp_delete_only": quantized_accuracy(
            model, test_x, test_y, classifier, calib, None, {"layer": lq, "prefix": False, "delete": n}
        ),
        "fp_both": quantized_accuracy(
            model, test_x, test_y, classifier, calib, None, {"layer": lq, "tau": n, "delete": n}
        ),
    }
    for bits in ((8, 8), (6, 6)):
        tag = f"W{bits[0]}A{bits[1]}"
        acc[f"naive_{tag}"] = quantized_accuracy(model, test_x, test_y, classifier, calib, bits)
        acc[f"prefix_only_{tag}"] = quantized_accuracy(
            model, test_x, test_y, classifier, calib, bits, {"layer": lq, "tau": n, "delete": 0}
        )
        acc[f"delete_only_{tag}"] = quantized_accuracy(
            model, test_x, test_y, classifier, calib, bits, {"layer": lq, "prefix": False, "delete": n}
        )
        acc[f"both_{tag}"] = quantized_accuracy(
            model, test_x, test_y, classifier, calib, bits, {"layer": lq, "tau": n, "delete": n}
        )
    return {"test_images": len(test_x), "accuracy": acc, "outlier_profile": profile, "sink_mass": sinks}


def main(argv: list[str] | None = None) -> None:
    """Entry point of ``python -m regcache.testbed.train``."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", default=None, help="YAML file of TrainConfig keys")
    p.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="overrides, e.g. epochs=10 spec.l_q=2")
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    cfg = load_config(args.config, args.set)
    if args.out:
        cfg.out = args.out
    train(cfg)


if __name__ == "__main__":
    main()
