"""PTQ4ViT calibration time on a CPU: the parity fixture's ViT-Ti/16 (32 images), cut to its first N blocks.

    taskset -c 0,1 python benchmarks/bench_ptq4vit_cpu.py --blocks 12 --threads 2 [--preset reference]

Prints one Markdown row (blocks, preset, bits, threads, seconds, CPU) and can save the calibrated
quantizer state (``--save``) to compare the choices of two code versions.
"""

from __future__ import annotations

import argparse
import sys
import time
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from parity import device_name, fixture_encoder, images, method_config

import regcache as rc
from regcache.quant.modules import quantizers


def main() -> None:
    """Calibrate once and print the row."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--blocks", type=int, default=12)
    parser.add_argument("--preset", default="default", choices=["default", "reference"])
    parser.add_argument("--bits", default="W8A8")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--save", default=None, help="write the calibrated quantizer state here (torch.save)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    encoder = fixture_encoder()
    del encoder.blocks[args.blocks :]
    rc.quantize_(encoder, method_config("ptq4vit", args.preset, int(args.bits[1]), int(args.bits[3])))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        start = time.perf_counter()
        rc.calibrate_(encoder, [images("calib_u8")], progress=False)
        seconds = time.perf_counter() - start
    if args.save:
        torch.save({f"{n}.{k}": v for n, q in quantizers(encoder) for k, v in q.state_dict().items()}, args.save)
    print("| blocks | preset | bits | threads | calibration s | device |\n|---|---|---|---|---|---|")
    print(f"| {args.blocks} | {args.preset} | {args.bits} | {args.threads} | {seconds:.1f} | {device_name('cpu')} |")


if __name__ == "__main__":
    main()
