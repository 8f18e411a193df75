"""Model configs that ship with regcache, registered with open_clip when this module is imported."""

from __future__ import annotations

from pathlib import Path

MODEL_CONFIG_DIR = Path(__file__).parent / "model_configs"


def register_model_configs() -> None:
    """Make the bundled open_clip JSON configs loadable by name (e.g. ``regcache-tiny-vit``)."""
    import open_clip

    open_clip.add_model_config(MODEL_CONFIG_DIR)


register_model_configs()  # loading and the testbed import this module before they name a bundled model
