"""Tiny backbones for fast tests: same code paths as the real ones, a few thousand parameters."""

import spot

TINY = dict(img_size=32, patch_size=8, depth=4, embed_dim=32, num_heads=2, num_classes=10)
TINY_NORMALIZATION = {"mean": [0.2, 0.2, 0.2], "std": [0.35, 0.35, 0.35]}  # not ImageNet's: must travel
TINY_LVVIT = dict(img_size=32, patch_size=8, depth=4, embed_dim=36, num_heads=3, num_classes=10)
# The tiny model as the pipeline's commands take it: model_args, and their command-line options.
TINY_PIPELINE_MODEL = {"depth": 4, "embed_dim": 32, "num_heads": 2, "patch_size": 8}
TINY_ARGS = ["--img-size", "32",
             *(a for k, v in TINY_PIPELINE_MODEL.items() for a in ("--model-arg", f"{k}={v}"))]


def tiny(name: str = "deit_s", **kwargs):
    base = TINY_LVVIT if name.startswith("lvvit") else TINY
    return spot.create_model(name, **{**base, **kwargs})
