"""Level 1: a zoo of named CNN specs over timm, trained K-fold into OOF and test predictions.

    python -m level1_models list                       # the zoo
    python -m level1_models oof --model tiny_resnet --data DATA
    torchrun --nproc_per_node=4 -m level1_models oof --model efficientnet_b3 --data DATA

Outputs per model under ``WorkPaths.model_dir(name)``: oof.parquet, test.parquet, metrics.json,
config.json, fold<k>/best.pt, curves_fold<k>.csv, curves.png.
"""
from level1_models.config import TrainConfig, build_config
from level1_models.registry import ModelSpec, UnknownModelError, get_spec, list_models, register_model

__all__ = [
    "ModelSpec", "TrainConfig", "UnknownModelError", "build_config", "get_spec", "list_models", "register_model",
    "load_fold_model",
]


def load_fold_model(*args, **kwargs):  # noqa: ANN002, ANN003 - see level1_models.predict.load_fold_model
    """A fold's best model by name (lazy import keeps ``import level1_models`` light)."""
    from level1_models.predict import load_fold_model as _load

    return _load(*args, **kwargs)
