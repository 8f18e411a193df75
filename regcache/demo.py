"""``regcache demo``: RegCache on the embedded outlier testbed, on CPU, in a few minutes.

Runs float, naive W6A6, naive W6A6 + RegCache with its prefix-only / delete-only ablations, and a
stronger base method with and without RegCache, on the bundled CIFAR-10 sample (or on any
classification dataset in the CLIP_benchmark layout: ``--data``, ``--reference``); prints a
Markdown table (zero-shot top-1, max token norm after l_q, chosen l_q / τ / k̃) and writes it with
a JSON and the per-block norm profile plot into ``demo/``. The testbed is a *constructed* model
(see the README): its numbers show the mechanism at work, they are not numbers of real CLIP models.

The data follow ``regcache validate``'s rules, so ``train_configs/demo.yaml`` (the
``+ RegCache`` row through the Lightning CLI) gives the same numbers on the bundled sample: the
calibration images are ``calib_size`` drawn class-balanced with seed 0 from the reference split
(``data.calib_size``), in sample-id order; every split is read in batches of ``BATCH_SIZE``.
"""

from __future__ import annotations

import argparse
import copy
import io
import tarfile
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from regcache.data.reader import make_sample_id
from regcache.data.sampling import IndexEntry, class_balanced_sample
from regcache.data.shards import DatasetLayoutError, parse_nshards, read_dataset_info
from regcache.encoders import VisionEncoder, adapt, record
from regcache.eval import build_zeroshot_classifier
from regcache.quant import METHODS, calibrate_, quantize_
from regcache.registers import RegCacheConfig, SearchPoint, apply_regcache, calibrate_regcache, make_objective
from regcache.registers.search import REGCACHE_MODES
from regcache.testbed import CIFAR10_SAMPLE, load_testbed
from regcache.testbed.data import IMAGE_EXTENSIONS
from regcache.threads import configure_threads
from regcache.utils import write_json

DEMO_TAUS = (1, 2, 3, 4, 6, 8, 12, 15)  # a thinned 1..15 so the demo stays at a few CPU minutes
DEMO_DELETE_KS = (0, 1, 2, 3, 4)
DEMO_CANDIDATES = 4
CALIB_SIZE = 128
BATCH_SIZE = 100  # train_configs/demo.yaml's data.batch_size: the same batches through both routes
LAYOUT = (
    "CLIP_benchmark layout: ROOT/SPLIT/{0..N-1}.tar with .jpg/.png/.webp + .cls members and nshards.txt, "
    "ROOT/classnames.txt, ROOT/zeroshot_classification_templates.txt"
)


class DemoInputError(ValueError):
    """A demo option that cannot work (the message names the option and the fix)."""


def _batches(x: torch.Tensor, size: int = BATCH_SIZE) -> list[torch.Tensor]:
    return list(x.split(size))


def _shard_samples(root: Path, split: str, option: str) -> list[tuple[IndexEntry, int, bytes]]:
    """Every labelled image sample of ``root/split`` as (index entry, sample id, image bytes), in shard order."""
    split_dir = root / split
    if not (split_dir / "nshards.txt").is_file():
        raise DemoInputError(f"{option} {root}: no split {split!r} ({split_dir / 'nshards.txt'} is missing; {LAYOUT})")
    try:
        nshards = parse_nshards((split_dir / "nshards.txt").read_text(), str(split_dir / "nshards.txt"))
    except DatasetLayoutError as exc:
        raise DemoInputError(f"{option} {root}: {exc}") from exc
    out = []
    for shard in range(nshards):
        members: dict[str, dict[str, bytes]] = {}
        if not (split_dir / f"{shard}.tar").is_file():
            raise DemoInputError(
                f"{option} {root}: {split_dir / f'{shard}.tar'} is missing, though {split_dir / 'nshards.txt'} "
                f"says {nshards} shards; write the shard count of {split_dir} into it ({LAYOUT})"
            )
        with tarfile.open(split_dir / f"{shard}.tar") as tar:
            for m in tar:
                if m.isfile():
                    key, _, ext = m.name.rpartition(".")
                    members.setdefault(key, {})["." + ext.lower()] = tar.extractfile(m).read()
        for position, (key, files) in enumerate(members.items()):
            image = next((files[e] for e in IMAGE_EXTENSIONS if e in files), None)
            if image is not None and ".cls" in files:
                label = int(files[".cls"].decode().strip())
                out.append((IndexEntry(shard, key, label), make_sample_id(shard, key, position), image))
    if not out:
        raise DemoInputError(f"{option} {root}: split {split!r} holds no image with a .cls label ({LAYOUT})")
    return out


def load_images(
    root: str | Path, split: str, transform: Any, size: int | None = None, seed: int = 0, option: str = "--data"
) -> tuple[torch.Tensor, torch.Tensor]:
    """Images and labels of a split: all of them in shard order, or ``size`` drawn as ``regcache validate`` draws.

    A draw is class-balanced and seeded (the data module's ``*_size``), in sample-id order.
    """
    samples = _shard_samples(Path(root), split, option)
    if size is not None:
        picked = set(class_balanced_sample([e for e, _, _ in samples], size, seed=seed))
        samples = sorted((s for s in samples if s[0] in picked), key=lambda s: s[1])
    images = []
    for _, _, data in samples:
        with Image.open(io.BytesIO(data)) as image:
            images.append(transform(image.convert("RGB")))
    return torch.stack(images), torch.tensor([e.label for e, _, _ in samples])


def load_texts(root: str | Path, option: str = "--data") -> tuple[list[str], list[str]]:
    """Class names and zero-shot templates of a classification dataset root."""
    try:
        return read_dataset_info(Path(root)).zeroshot_texts()
    except DatasetLayoutError as exc:
        raise DemoInputError(f"{option} {root}: {exc}") from exc


@torch.no_grad()
def evaluate(
    encoder: VisionEncoder, images: torch.Tensor, labels: torch.Tensor, classifier: torch.Tensor, l_q: int
) -> tuple[float, float]:
    """Zero-shot top-1 and the max token L2 norm of the residual stream leaving block l_q."""
    correct, max_norm = 0, 0.0
    after = min(l_q + 1, encoder.num_blocks - 1)
    for x, y in zip(images.split(BATCH_SIZE), labels.split(BATCH_SIZE), strict=True):
        with record(encoder, ("block_input",), blocks=[after]) as taps:
            feats = torch.nn.functional.normalize(encoder(x), dim=-1)
        correct += int((feats @ classifier).argmax(-1).eq(y).sum())
        max_norm = max(max_norm, float(taps["block_input"][after].norm(dim=-1).max()))
    return correct / len(labels), max_norm


def _quantized(float_encoder: VisionEncoder, method: str, bits: int, calib, point: SearchPoint | None):
    """A calibrated copy of the float encoder, with a RegCache configuration installed first."""
    encoder = copy.deepcopy(float_encoder)
    if method == "float":
        return encoder
    config = METHODS[method](w_bits=bits, a_bits=bits)
    if point is not None:
        return calibrate_regcache(encoder, point, config, calib, progress=False)
    quantize_(encoder, config)
    return calibrate_(encoder, calib, progress=False)


def run_demo(
    out_dir: str | Path = "demo",
    bits: int = 6,
    strong_method: str | None = "repq_vit",
    progress: bool = True,
    taus: tuple[int, ...] = DEMO_TAUS,
    delete_ks: tuple[int, ...] = DEMO_DELETE_KS,
    num_candidates: int = DEMO_CANDIDATES,
    data: str | Path = CIFAR10_SAMPLE,
    split: str = "test",
    reference: str | Path | None = None,
    reference_split: str = "train",
    calib_size: int = CALIB_SIZE,
    reference_size: int | None = None,
) -> Path:
    """Run every row and write ``results.json``, ``results.md`` and ``norm_profile.png`` into ``out_dir``.

    ``data`` / ``split``: the evaluation images; ``reference`` / ``reference_split`` (default: the
    ``data`` root's train split): the reference images the sweep and the search score on (all, or
    ``reference_size`` drawn) and the ``calib_size`` calibration images drawn from them.
    """
    reference = data if reference is None else reference
    if Path(reference).resolve() == Path(data).resolve() and reference_split == split:
        raise DemoInputError(
            f"--reference-split {reference_split!r} is the evaluation split of the same root: the search would "
            "tune on the images it is evaluated on; give another --reference-split or --reference root"
        )
    for name, value in (("--calib-size", calib_size), ("--reference-size", reference_size)):
        if value is not None and value < 1:
            raise DemoInputError(f"{name} must be >= 1, got {value}")
    torch.manual_seed(0)
    out = Path(out_dir)
    loaded = load_testbed()
    encoder = adapt(loaded.model)
    classnames, templates = load_texts(data, "--data")
    ref_classnames, ref_templates = load_texts(reference, "--reference")
    test_x, test_y = load_images(data, split, loaded.preprocess, option="--data")
    ref_x, ref_y = load_images(reference, reference_split, loaded.preprocess, reference_size, option="--reference")
    calib_x, _ = load_images(reference, reference_split, loaded.preprocess, calib_size, option="--reference")
    calib = _batches(calib_x)
    with torch.no_grad():
        classifier = build_zeroshot_classifier(loaded.model, loaded.tokenizer, classnames, templates, progress=progress)
        ref_classifier = (
            classifier
            if (ref_classnames, ref_templates) == (classnames, templates)
            else build_zeroshot_classifier(
                loaded.model, loaded.tokenizer, ref_classnames, ref_templates, progress=progress
            )
        )
    acc_ref = make_objective("acc_ref", labels=ref_y, classifier=ref_classifier)

    start = time.perf_counter()
    ref_batches = _batches(ref_x)
    config = RegCacheConfig(
        base_config=METHODS["naive"](w_bits=bits, a_bits=bits),
        objective="acc_ref",
        # the sweep and the search score every reference image (the sweep counts whole batches)
        sweep_images=BATCH_SIZE * len(ref_batches),
        search_images=len(ref_y),
        num_candidates=num_candidates,
        taus=list(taus),
        delete_ks=list(delete_ks),
        modes=["prefix", "delete", "both"],  # one search for the RegCache row and both ablations
    )
    # the float encoder stays as it is (calibrate=False): each row installs its winner on a copy
    regcache = apply_regcache(encoder, config, calib, ref_batches, acc_ref, calibrate=False, progress=progress)
    seconds = time.perf_counter() - start
    l_q = regcache.l_q
    # "regcache": what RegisterSearch installs by default (a prefix, k̃ from delete_ks, 0 included)
    best = {"regcache": regcache.point_of(REGCACHE_MODES)}
    best |= {mode: regcache.point_of([mode]) for mode in ("prefix", "delete")}

    rows: list[dict[str, Any]] = []

    def row(name: str, method: str, point: SearchPoint | None, seconds: float | None = None) -> None:
        enc = _quantized(encoder, method, bits, calib, point)
        top1, norm = evaluate(enc, test_x, test_y, classifier, l_q)
        rc = None
        if point is not None:
            rc = {"l_q": point.l_q, "l_start": point.l_start, "tau": point.tau, "k_delete": point.delete_k}
            rc |= {"register": point.register, "mode": point.mode, "objective": "acc_ref", "search_seconds": seconds}
        rows.append(
            {
                "name": name,
                "method": method,
                "w_bits": None if method == "float" else bits,
                "a_bits": None if method == "float" else bits,
                "regcache": rc,
                "zeroshot_top1": top1,
                "max_token_norm_lq": norm,
            }
        )
        if progress:
            print(f"  {name:<36} top-1 {100 * top1:5.1f}   max token norm after l_q {norm:8.1f}", flush=True)

    row("float", "float", None)
    row(f"naive W{bits}A{bits}", "naive", None)
    row(f"naive W{bits}A{bits} + RegCache", "naive", best["regcache"], seconds)
    row(f"naive W{bits}A{bits} + prefix only", "naive", best["prefix"], seconds)
    row(f"naive W{bits}A{bits} + delete only", "naive", best["delete"], seconds)
    if strong_method:
        row(f"{strong_method} W{bits}A{bits}", strong_method, None)
        # The naive search's winner, re-calibrated with the stronger method: a second search with a
        # method that is re-calibrated whole per configuration would take the demo past a few minutes.
        row(f"{strong_method} W{bits}A{bits} + RegCache (naive's z, τ, k̃)", strong_method, best["regcache"], seconds)

    table = markdown(rows)
    print(f"\nmodel: regcache-testbed (constructed outlier testbed, not a real CLIP), l_q = {l_q}")
    print(f"evaluation: {data} ({split}, {len(test_y)} images); reference: {reference} ({reference_split}, ", end="")
    print(f"{len(ref_y)} images, {len(calib_x)} drawn for calibration)\n")
    print(table)
    settings = (bits, tuple(taus), tuple(delete_ks), num_candidates, calib_size, reference_size)
    bundled = (Path(data), split, Path(reference), reference_split) == (CIFAR10_SAMPLE, "test", CIFAR10_SAMPLE, "train")
    if bundled and settings == (6, DEMO_TAUS, DEMO_DELETE_KS, DEMO_CANDIDATES, CALIB_SIZE, None):
        print(
            "\nThe naive W6A6 + RegCache row through the Lightning CLI, with the same data, calibration images and "
            "grid: regcache validate --config train_configs/demo.yaml"
        )
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.md").write_text(table + "\n")
    regcache.sweep.save(out)
    plot_norms(encoder, test_x[:100], best["regcache"], calib, bits, out / "norm_profile.png")
    return write_json(
        out / "results.json",
        {
            "model": "regcache-testbed",
            "constructed": True,
            "data": {
                "evaluation": {"root": str(data), "split": split, "images": len(test_y)},
                "reference": {"root": str(reference), "split": reference_split, "images": len(ref_y)},
                "calibration": {"root": str(reference), "split": reference_split, "images": len(calib_x)},
            },
            "l_q": l_q,
            # float rounding follows the thread count, and the testbed's W6A6 rows move with it (README)
            "torch_threads": torch.get_num_threads(),
            "seconds": time.perf_counter() - start,
            "rows": rows,
        },
    )


def markdown(rows: list[dict[str, Any]]) -> str:
    """The demo's rows as a Markdown table."""
    lines = ["| name | zero-shot top-1 (%) | max token norm after l_q | l_q | τ | k̃ |", "|---|---|---|---|---|---|"]
    for r in rows:
        rc = r["regcache"] or {}
        cells = [r["name"], f"{100 * r['zeroshot_top1']:.1f}", f"{r['max_token_norm_lq']:.1f}"]
        cells += [str(rc.get(k, "–")) for k in ("l_q", "tau", "k_delete")]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


@torch.no_grad()
def plot_norms(
    encoder: VisionEncoder,
    images: torch.Tensor,
    point: SearchPoint,
    calib: Iterable[torch.Tensor],
    bits: int,
    path: Path,
) -> Path:
    """Per-block max token norm of the float model and of naive + RegCache (``point`` installed)."""
    from regcache.eval.outliers import plot_profile

    def profile(enc) -> dict[str, dict]:
        with record(enc, ("block_input",)) as taps:
            enc(images)
        return {
            str(i): {"max_l2": float(t.norm(dim=-1).max()), "mean_l2": float(t.norm(dim=-1).mean())}
            for i, t in sorted(taps["block_input"].items())
        }

    return plot_profile(
        {
            "float": profile(encoder),
            "naive + RegCache": profile(_quantized(encoder, "naive", bits, calib, point)),
        },
        path,
        title=f"regcache-testbed: token norms at block inputs (l_q = {point.l_q})",
    )


def _ints(text: str) -> tuple[int, ...]:
    """``"1,2,3"`` → (1, 2, 3) (argparse type of the grid options)."""
    try:
        return tuple(int(v) for v in text.split(",") if v.strip())
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from exc


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``regcache demo``."""
    parser = argparse.ArgumentParser(prog="regcache demo", description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="demo", help="output directory (default: ./demo)")
    parser.add_argument("--bits", type=int, default=6, help="W and A bits (default 6: W6A6)")
    parser.add_argument(
        "--strong-method", default="repq_vit", help="the stronger base method row (default repq_vit; none: no such row)"
    )
    data = parser.add_argument_group("data (classification datasets in the CLIP_benchmark layout)")
    data.add_argument("--data", default=str(CIFAR10_SAMPLE), help="evaluation dataset root (default: bundled sample)")
    data.add_argument("--split", default="test", help="evaluation split (default test)")
    data.add_argument("--reference", help="reference / calibration dataset root (default: --data)")
    data.add_argument("--reference-split", default="train", help="reference / calibration split (default train)")
    data.add_argument("--calib-size", type=int, default=CALIB_SIZE, help=f"calibration images (default {CALIB_SIZE})")
    data.add_argument("--reference-size", type=int, help="reference images drawn (default: the whole split)")
    grid = parser.add_argument_group("register grid")
    grid.add_argument("--taus", type=_ints, default=DEMO_TAUS, help="τ values, e.g. 1,2,4 (default: the demo's)")
    grid.add_argument("--delete-ks", type=_ints, default=DEMO_DELETE_KS, help="k̃ values (default 0,1,2,3,4)")
    grid.add_argument("--num-candidates", type=int, default=DEMO_CANDIDATES, help="registers curated (default 4)")
    parser.add_argument(
        "--threads",
        type=int,
        help="torch intra-op threads (default: OMP_NUM_THREADS if set, else the idle cores; see the README)",
    )
    parser.add_argument("--quiet", action="store_true")
    args = parser.parse_args(argv)
    if args.threads is not None and args.threads < 1:
        parser.error(f"--threads must be >= 1, got {args.threads}")
    threads, chosen_by = configure_threads(explicit=args.threads)
    if not args.quiet:
        print(f"torch threads: {threads} ({chosen_by})", flush=True)
    try:
        path = run_demo(
            args.out,
            bits=args.bits,
            strong_method=None if args.strong_method.lower() in ("", "none") else args.strong_method,
            progress=not args.quiet,
            taus=args.taus,
            delete_ks=args.delete_ks,
            num_candidates=args.num_candidates,
            data=args.data,
            split=args.split,
            reference=args.reference,
            reference_split=args.reference_split,
            calib_size=args.calib_size,
            reference_size=args.reference_size,
        )
    except DemoInputError as exc:  # bad input: the message names the option and the fix
        parser.error(str(exc))
    print(f"results: {path}")
    return 0
