"""Baseline parity on the official-output fixture: each preset and default against the official logits and float.

    python benchmarks/parity.py                       # RepQ-ViT and PTQ4ViT, presets and defaults, CPU
    python benchmarks/parity.py --device cuda --methods ptq4vit --bits W8A8

The fixture (tests/fixtures/parity, its README says how it was made) holds a timm ViT-Ti/16, 32
calibration and 32 evaluation images and the logits of the official RepQ-ViT (CPU) and PTQ4ViT
(one H200) code. Prints a Markdown table (cosine of the logits and top-1 agreement, against the
official output and against the float model; calibration seconds) with the device it ran on, and
writes the rows as JSON.
"""

from __future__ import annotations

import argparse
import functools
import json
import platform
import time
import warnings
from pathlib import Path

import torch
from safetensors.torch import load_file
from torch.nn import functional as F

FIXTURE = (
    Path(__file__).resolve().parents[1] / "tests" / "fixtures" / "parity" / "vit_tiny_official_outputs.safetensors"
)


@functools.cache
def fixture() -> dict[str, torch.Tensor]:
    """The fixture's tensors (weights fp16, images uint8, logits fp16)."""
    return load_file(str(FIXTURE))


def images(name: str, device: str = "cpu") -> torch.Tensor:
    """The fixture's model input ``(x / 255 - 0.5) / 0.5`` of ``calib_u8`` or ``eval_u8``."""
    return (fixture()[name].to(device).float() / 255 - 0.5) / 0.5


def fixture_encoder(device: str = "cpu") -> torch.nn.Module:
    """The fixture's timm ViT-Ti/16 with its weights, adapted."""
    import timm

    import regcache as rc

    model = timm.create_model("vit_tiny_patch16_224", pretrained=False)
    model.load_state_dict({k[len("weights.") :]: v.float() for k, v in fixture().items() if k.startswith("weights.")})
    return rc.adapt(model.eval()).to(device)


def agreement(a: torch.Tensor, b: torch.Tensor) -> tuple[float, float]:
    """(cosine of the flattened logits, top-1 agreement)."""
    a, b = a.float().cpu(), b.float().cpu()
    cos = F.cosine_similarity(a.flatten(), b.flatten(), dim=0).item()
    return cos, (a.argmax(1) == b.argmax(1)).float().mean().item()


def method_config(method: str, preset: str, w_bits: int, a_bits: int):
    """The ``reference()`` preset or the default config of a method."""
    from regcache.quant.methods.ptq4vit import PTQ4ViTConfig
    from regcache.quant.methods.repq_vit import RepQViTConfig

    cls = {"repq_vit": RepQViTConfig, "ptq4vit": PTQ4ViTConfig}[method]
    return cls.reference(w_bits, a_bits) if preset == "reference" else cls(w_bits, a_bits)


def run(method: str, preset: str, bits: str, device: str) -> dict:
    """Calibrate one configuration on the fixture and compare its logits with the official and the float ones."""
    import regcache as rc

    w_bits, a_bits = int(bits[1]), int(bits[3])
    encoder = fixture_encoder(device)
    evaluation = images("eval_u8", device)
    with torch.no_grad():
        float_logits = encoder(evaluation)
    rc.quantize_(encoder, method_config(method, preset, w_bits, a_bits))
    if device == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # PTQ4ViT's reference warns about its vanishing gradients
        rc.calibrate_(encoder, [images("calib_u8", device)], progress=False)
    if device == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    with torch.no_grad():
        logits = encoder(evaluation)
    official = fixture()[f"logits.{method}.{bits}"]
    return {
        "method": method,
        "preset": preset,
        "bits": bits,
        "to_official": agreement(logits, official),
        "to_float": agreement(logits, float_logits),
        "official_to_float": agreement(official, fixture()["logits.float"]),
        "calibration_s": seconds,
    }


def device_name(device: str) -> str:
    """The card or CPU the rows ran on, with torch's thread count."""
    if device == "cuda":
        return f"{torch.cuda.get_device_name()}, torch {torch.__version__}"
    cpu = platform.processor() or platform.machine()
    try:
        model = next(line for line in Path("/proc/cpuinfo").read_text().splitlines() if "model name" in line)
        cpu = model.split(":", 1)[1].strip()
    except (OSError, StopIteration):
        pass
    return f"CPU {cpu}, {torch.get_num_threads()} threads, torch {torch.__version__}"


def main() -> None:
    """Run the selected rows and print the table."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--methods", nargs="+", default=["repq_vit", "ptq4vit"], choices=["repq_vit", "ptq4vit"])
    parser.add_argument("--presets", nargs="+", default=["reference", "default"], choices=["reference", "default"])
    parser.add_argument("--bits", nargs="+", default=None, help="W8A8 W6A6 W4A4 (the fixture's; default: all)")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--out", default="bench_parity.json")
    args = parser.parse_args()
    available = {"repq_vit": ["W8A8", "W6A6", "W4A4"], "ptq4vit": ["W8A8", "W6A6"]}
    rows = []
    print(f"device: {device_name(args.device)}")
    print("| method | preset | bits | cos / top-1 to official | cos / top-1 to float | official to float | calib s |")
    print("|---|---|---|---|---|---|---|")
    for method in args.methods:
        for bits in args.bits or available[method]:
            if bits not in available[method]:
                continue
            for preset in args.presets:
                r = run(method, preset, bits, args.device)
                rows.append(r)
                cells = [f"{r[k][0]:.5f} / {r[k][1]:.2f}" for k in ("to_official", "to_float", "official_to_float")]
                print(f"| {method} | {preset} | {bits} | {' | '.join(cells)} | {r['calibration_s']:.1f} |", flush=True)
    Path(args.out).write_text(json.dumps({"device": device_name(args.device), "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
