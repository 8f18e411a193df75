"""Sensitivity sweep: quantize one block at a time, find l_q, and profile the float token norms.

For block l, a copy of the float encoder gets the base method on block l only (``quantize_`` with
a filter selecting ``blocks.l.``), is calibrated with the method's own calibration, and its
quantized block l is kept. On each reference batch one float forward records every block's input
(the norm profile, the float embeddings, and the stream each quantized block starts from), then
block l runs quantized and the rest float: the same result as the copy's full forward, without
re-running the float blocks before l for every l.
"""

from __future__ import annotations

import copy
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from regcache.encoders.base import Block, VisionEncoder, record
from regcache.quant.api import QuantConfig, calibrate_, quantize_
from regcache.quant.calibration import iter_images
from regcache.registers._common import plain_float
from regcache.registers.objectives import Objective
from regcache.utils import write_json

PROFILE_KEYS = ("max_l2", "mean_l2", "max_linf", "mean_linf")


class NormProfile:
    """Running max / mean of per-token l2 and l-inf norms at each block input (all tokens)."""

    def __init__(self, num_blocks: int) -> None:
        self.max = {k: [0.0] * num_blocks for k in ("l2", "linf")}
        self.sum = {k: [0.0] * num_blocks for k in ("l2", "linf")}
        self.count = [0] * num_blocks

    def update(self, layer: int, x: torch.Tensor) -> None:
        """Add the tokens of one block-input tensor (B, N, C)."""
        x = x.float()
        for name, norms in (("l2", x.norm(dim=-1)), ("linf", x.abs().amax(dim=-1))):
            self.max[name][layer] = max(self.max[name][layer], float(norms.max()))
            self.sum[name][layer] += float(norms.sum())
        self.count[layer] += x.shape[0] * x.shape[1]

    def to_dict(self) -> dict[str, list[float]]:
        """``{max_l2, mean_l2, max_linf, mean_linf}`` lists indexed by block."""
        out = {}
        for name in ("l2", "linf"):
            out[f"max_{name}"] = list(self.max[name])
            out[f"mean_{name}"] = [s / max(c, 1) for s, c in zip(self.sum[name], self.count, strict=True)]
        return out


@torch.no_grad()
def token_norm_profile(encoder: VisionEncoder, batches: Iterable[Any], progress: bool = True) -> dict[str, list[float]]:
    """Per-block max / mean token l2 and l-inf norms of the residual stream at each block input."""
    profile = NormProfile(encoder.num_blocks)
    with record(encoder, ("block_input",)) as taps:
        for images in iter_images(encoder, batches, progress, desc="norm profile"):
            encoder(images)
            for layer, x in taps["block_input"].items():
                profile.update(layer, x)
    return profile.to_dict()


@dataclass
class SweepResult:
    """Per-block score with only that block quantized, and the float norm profile."""

    method: str
    objective: str
    greater_is_better: bool
    float_score: float
    blocks: list[int]
    scores: list[float]
    profile: dict[str, list[float]] = field(default_factory=dict)

    @property
    def drops(self) -> list[float]:
        """Degradation against the float model per swept block (positive = worse)."""
        sign = 1.0 if self.greater_is_better else -1.0
        return [sign * (self.float_score - s) for s in self.scores]

    @property
    def ranking(self) -> list[int]:
        """Swept blocks, most sensitive first."""
        return [b for _, b in sorted(zip(self.drops, self.blocks, strict=True), key=lambda t: -t[0])]

    @property
    def l_q(self) -> int:
        """The block whose quantization hurts most."""
        return self.ranking[0]

    def table(self) -> list[dict[str, Any]]:
        """Rows ``{block, score, drop, max_linf, max_l2}``, most sensitive first."""
        by_block = {b: (s, d) for b, s, d in zip(self.blocks, self.scores, self.drops, strict=True)}
        rows = []
        for b in self.ranking:
            row = {"block": b, "score": by_block[b][0], "drop": by_block[b][1]}
            row |= {k: self.profile[k][b] for k in PROFILE_KEYS if k in self.profile}
            rows.append(row)
        return rows

    def to_dict(self) -> dict[str, Any]:
        """JSON-able form."""
        return {
            "method": self.method,
            "objective": self.objective,
            "greater_is_better": self.greater_is_better,
            "float_score": self.float_score,
            "l_q": self.l_q,
            "table": self.table(),
            "profile": self.profile,
        }

    def save(self, directory: str | Path, stem: str = "sensitivity") -> tuple[Path, Path]:
        """Write ``<stem>.json`` and ``<stem>.png`` (drop per block beside the float max norms)."""
        directory = Path(directory)
        json_path = write_json(directory / f"{stem}.json", self.to_dict())
        return json_path, self.plot(directory / f"{stem}.png")

    def plot(self, path: str | Path) -> Path:
        """Bar plot of the drop per block with the float max l-inf / l2 token norm on a second axis."""
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(8, 4))
        ax.bar(self.blocks, self.drops, color="tab:red", alpha=0.7, label=f"drop ({self.objective})")
        ax.set_xlabel("block quantized alone")
        ax.set_ylabel(f"{self.objective} drop vs float")
        if self.profile:
            twin = ax.twinx()
            layers = list(range(len(self.profile["max_linf"])))
            twin.plot(layers, self.profile["max_linf"], "o-", color="tab:blue", label="max l-inf norm")
            twin.plot(layers, self.profile["max_l2"], "s--", color="tab:green", label="max l2 norm")
            twin.set_ylabel("float token norm at block input")
            twin.legend(loc="upper right")
        ax.legend(loc="upper left")
        ax.set_title(f"{self.method}: sensitivity per block (l_q = {self.l_q})")
        fig.tight_layout()
        fig.savefig(path, dpi=120)
        plt.close(fig)
        return Path(path)


def quantize_one_block(encoder: VisionEncoder, config: QuantConfig, layer: int, calibration: Iterable[Any]) -> Block:
    """Block ``layer`` quantized (and calibrated) by ``config`` with the rest of a copy kept float."""
    prefix = f"blocks.{layer}."

    def only_this_block(module: nn.Module, fqn: str) -> bool:
        return fqn.startswith(prefix) and config.default_filter(module, fqn)

    work = copy.deepcopy(encoder)
    quantize_(work, copy.deepcopy(config), filter_fn=only_this_block)
    calibrate_(work, calibration, progress=False)
    return work.blocks[layer]


@torch.no_grad()
def sensitivity_sweep(
    encoder: VisionEncoder,
    config: QuantConfig,
    calibration: Iterable[Any],
    reference: Iterable[Any],
    objective: Objective,
    blocks: Sequence[int] | None = None,
    progress: bool = True,
) -> SweepResult:
    """Quantize each block alone with ``config`` (the rest float), score it on ``reference``; rank."""
    if getattr(encoder, "quant_config", None) is not None:
        raise ValueError("the sweep needs the float encoder (it quantizes copies of it)")
    blocks = list(range(encoder.num_blocks)) if blocks is None else list(blocks)
    quantized = {
        l: quantize_one_block(encoder, config, l, calibration)
        for l in tqdm(blocks, desc="quantizing one block at a time", disable=not progress, leave=False)
    }
    profile = NormProfile(encoder.num_blocks)
    float_embeddings, embeddings = [], {l: [] for l in blocks}
    with plain_float(encoder), record(encoder, ("block_input",)) as taps:
        for images in iter_images(encoder, reference, progress, desc="sensitivity sweep"):
            float_embeddings.append(objective.readout(encoder, encoder.forward_blocks(encoder.embed(images))))
            inputs = dict(taps["block_input"])
            for layer, x in inputs.items():
                profile.update(layer, x)
            for layer in blocks:
                x = encoder.forward_blocks(quantized[layer](inputs[layer]), layer + 1)
                embeddings[layer].append(objective.readout(encoder, x))
    reference_embeddings = torch.cat(float_embeddings)
    scores = [objective(torch.cat(embeddings[l]), reference_embeddings) for l in blocks]
    return SweepResult(
        method=config.tag,
        objective=objective.name,
        greater_is_better=objective.greater_is_better,
        float_score=objective(reference_embeddings, reference_embeddings),
        blocks=blocks,
        scores=scores,
        profile=profile.to_dict(),
    )
