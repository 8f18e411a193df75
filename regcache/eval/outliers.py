"""Residual-stream outlier statistics per transformer block (plain class, reduced across ranks)."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from pathlib import Path

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

__all__ = ["OutlierStats", "plot_profile"]

_SUM_FIELDS = ("tokens", "sum_l2", "sum_linf")


def _block_sort_key(name: str):
    return (0, int(name), "") if name.lstrip("-").isdigit() else (1, 0, name)


class OutlierStats:
    """Accumulate, per block, token norms of the residual stream ``x`` (B, N, C) at block input.

    Per block: number of tokens, mean and max token L2 norm, mean and max token L-inf norm, and the
    fraction of tokens whose L2 norm is above each absolute threshold (``abs_thresholds``) and above
    ``t * median`` of the L2 norms of the same image (``rel_thresholds``).

    Args:
        abs_thresholds: absolute L2 thresholds (may be empty).
        rel_thresholds: multiples of the per-image median token L2 norm.
        skip_tokens: ``None`` (keep all, default), an int ``n`` (drop the first n tokens, e.g. 1 for
            CLS, 1 + registers), or a sequence of token indices to drop.

    ``compute()`` returns a JSON-able ``{block: {...}}`` dict; with ``sync=True`` (default) and an
    initialised process group the sums / maxima are reduced over ranks first (collective: call on
    every rank; every rank must have seen the same block names or at least call it).
    """

    def __init__(
        self,
        abs_thresholds: Sequence[float] = (),
        rel_thresholds: Sequence[float] = (5.0, 10.0),
        skip_tokens: int | Sequence[int] | None = None,
    ) -> None:
        self.abs_thresholds = tuple(float(t) for t in abs_thresholds)
        self.rel_thresholds = tuple(float(t) for t in rel_thresholds)
        self.skip_tokens = skip_tokens
        self.reset()

    def reset(self) -> None:
        """Forget every block's accumulated sums and maxima (start a new measurement)."""
        # per block: float64 vector [tokens, sum_l2, sum_linf, n_abs..., n_rel...] and [max_l2, max_linf]
        self._sums: dict[str, Tensor] = {}
        self._maxs: dict[str, Tensor] = {}

    @property
    def _n_sums(self) -> int:
        return len(_SUM_FIELDS) + len(self.abs_thresholds) + len(self.rel_thresholds)

    def _keep(self, x: Tensor) -> Tensor:
        if self.skip_tokens is None:
            return x
        if isinstance(self.skip_tokens, int):
            return x[:, self.skip_tokens :]
        n = x.shape[1]
        drop = {i % n for i in self.skip_tokens}
        keep = torch.tensor([i for i in range(n) if i not in drop], dtype=torch.long, device=x.device)
        return x.index_select(1, keep)

    @torch.no_grad()
    def update(self, block: int | str, x: Tensor) -> None:
        """Feed the block-input residual stream ``x`` of shape (B, N, C) (or (N, C))."""
        if x.dim() == 2:
            x = x[None]
        x = self._keep(x.detach()).float()
        if x.shape[1] == 0:
            return
        l2 = x.norm(dim=-1)  # (B, N)
        linf = x.abs().amax(dim=-1)
        sums = [float(l2.numel()), l2.double().sum().item(), linf.double().sum().item()]
        sums += [(l2 > t).sum().item() for t in self.abs_thresholds]
        if self.rel_thresholds:
            med = l2.median(dim=1, keepdim=True).values
            sums += [(l2 > t * med).sum().item() for t in self.rel_thresholds]
        name = str(block)
        s = torch.tensor(sums, dtype=torch.float64)
        m = torch.tensor([l2.max().item(), linf.max().item()], dtype=torch.float64)
        if name in self._sums:
            self._sums[name] += s
            self._maxs[name] = torch.maximum(self._maxs[name], m)
        else:
            self._sums[name], self._maxs[name] = s, m

    def attach(
        self, blocks: Iterable[nn.Module], names: Sequence[str] | None = None, batch_first: bool = True
    ) -> list[RemovableHandle]:
        """Register forward pre-hooks feeding each block's first input (the residual stream) to
        :meth:`update`. ``blocks``: a sequence of modules (e.g. ``visual.transformer.resblocks`` or
        timm ``blocks``); ``batch_first=False`` for (N, B, C) inputs. Returns the hook handles
        (call ``.remove()`` on each when done)."""
        handles = []
        for i, blk in enumerate(blocks):
            name = names[i] if names is not None else str(i)

            def hook(_module, args, _name=name):
                x = args[0]
                self.update(_name, x if batch_first else x.transpose(0, 1))

            handles.append(blk.register_forward_pre_hook(hook))
        return handles

    def _reduced(self, device=None) -> tuple[list[str], Tensor, Tensor]:
        names = sorted(self._sums, key=_block_sort_key)
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            all_names: list = [None] * dist.get_world_size()
            dist.all_gather_object(all_names, names)
            names = sorted({n for ns in all_names for n in ns}, key=_block_sort_key)
            if device is None:
                device = "cuda" if dist.get_backend() == "nccl" else "cpu"
        zs, zm = (
            torch.zeros(self._n_sums, dtype=torch.float64),
            torch.full((2,), -float("inf"), dtype=torch.float64),
        )
        sums = torch.stack([self._sums.get(n, zs) for n in names]) if names else zs[None, :0].repeat(0, 1)
        maxs = torch.stack([self._maxs.get(n, zm) for n in names]) if names else zm[None, :0].repeat(0, 1)
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1 and names:
            sums, maxs = sums.to(device), maxs.to(device)
            dist.all_reduce(sums, op=dist.ReduceOp.SUM)
            dist.all_reduce(maxs, op=dist.ReduceOp.MAX)
            sums, maxs = sums.cpu(), maxs.cpu()
        return names, sums, maxs

    def compute(self, sync: bool = True, device: torch.device | str | None = None) -> dict[str, dict]:
        """Per-block norm statistics and outlier fractions, reduced over ranks first when ``sync`` (collective)."""
        if sync:
            names, sums, maxs = self._reduced(device)
        else:
            names = sorted(self._sums, key=_block_sort_key)
            sums = torch.stack([self._sums[n] for n in names]) if names else None
            maxs = torch.stack([self._maxs[n] for n in names]) if names else None
        out: dict[str, dict] = {}
        na = len(self.abs_thresholds)
        for i, name in enumerate(names):
            s, m = sums[i].tolist(), maxs[i].tolist()
            n = max(s[0], 1.0)
            rec = {
                "tokens": int(s[0]),
                "mean_l2": s[1] / n,
                "max_l2": m[0],
                "mean_linf": s[2] / n,
                "max_linf": m[1],
                "frac_l2_above_abs": {f"{t:g}": s[3 + j] / n for j, t in enumerate(self.abs_thresholds)},
                "frac_l2_above_rel_median": {f"{t:g}": s[3 + na + j] / n for j, t in enumerate(self.rel_thresholds)},
            }
            out[name] = rec
        return out


def plot_profile(profiles: dict[str, dict[str, dict]], path: Path, title: str = "") -> Path:
    """Max and mean token L2 norm per block, one line per profile; saved as PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 3.5))
    for label, blocks in profiles.items():
        names = list(blocks)
        ax.plot(range(len(names)), [blocks[n]["max_l2"] for n in names], marker="o", label=f"{label}: max")
        ax.plot(range(len(names)), [blocks[n]["mean_l2"] for n in names], ls="--", label=f"{label}: mean")
    ax.set_xlabel("block (input residual stream)")
    ax.set_ylabel("token L2 norm")
    ax.set_yscale("log")
    ax.set_title(title)
    ax.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
