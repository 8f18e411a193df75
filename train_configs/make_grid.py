"""Write train_configs/grid/: the paper's grid as one small file per run, composed from the pieces.

python train_configs/make_grid.py        # rewrite grid/ (tests check it is up to date)
"""

from __future__ import annotations

import itertools
from pathlib import Path

HERE = Path(__file__).parent
MODELS = {  # model piece -> (data piece, RegCache piece)
    "clip_b16_openai": ("paper", "on"),
    "openclip_b16_laion2b": ("paper", "on"),
    "siglip_b16": ("paper", "on"),
    "siglip2_b16": ("paper", "on"),
    "dinov2_b14": ("paper_image_only", "on_label_free"),
}
METHODS = ["naive", "ptq4vit", "repq_vit", "noisyquant"]
BITS = ["w8a8", "w6a6", "w4a4"]


def grid() -> dict[str, str]:
    """{file name: contents} of every run of the grid."""
    files = {}
    for model, (data, regcache) in MODELS.items():
        pieces = ["../base.yaml", f"../data/{data}.yaml", f"../models/{model}.yaml"]
        files[f"{model}_float.yaml"] = f"defaults: [{', '.join([*pieces, '../methods/float.yaml'])}]\n"
        for method, bits, rc in itertools.product(METHODS, BITS, (False, True)):
            run = [*pieces, f"../methods/{method}.yaml", f"../bits/{bits}.yaml"]
            run += [f"../regcache/{regcache}.yaml"] if rc else []
            name = f"{model}_{method}_{bits}{'_regcache' if rc else ''}.yaml"
            files[name] = f"defaults: [{', '.join(run)}]\n"
    return files


def main() -> None:
    """Rewrite grid/ from scratch."""
    out = HERE / "grid"
    out.mkdir(exist_ok=True)
    for old in out.glob("*.yaml"):
        old.unlink()
    for name, text in grid().items():
        (out / name).write_text(text)
    print(f"wrote {len(grid())} configs to {out}")


if __name__ == "__main__":
    main()
