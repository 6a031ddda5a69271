"""Prediction with test-time augmentation, sharded over processes; loading a fold's best model.

TTA ``hflip`` averages the probabilities of the image and its left-right mirror (heads are
roughly symmetric, haemorrhages are not tied to a side). ``load_fold_model`` is the entry point
for later tools (explanations, error analysis) that need a trained fold by model name.
"""
from __future__ import annotations

import contextlib
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Subset

from competition.paths import WorkPaths
from features.dataset import unit_float
from level1_models.checkpoint import load_checkpoint, load_weights
from level1_models.config import TrainConfig
from level1_models.distributed import DistEnv, gather_predictions, gather_rows_to_main, shard
from level1_models.modeling import create_network

AMP_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "off": None}


def autocast(device: torch.device, amp: str) -> contextlib.AbstractContextManager:
    dtype = AMP_DTYPES[amp]
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


def model_input(x: torch.Tensor, device: torch.device, channels_last: bool) -> torch.Tensor:
    """A loader batch as the network takes it: on the device, [0, 1] floats, in its memory format."""
    x = unit_float(x.to(device, non_blocking=True))
    return x.contiguous(memory_format=torch.channels_last) if channels_last else x


def tta_views(x: torch.Tensor, tta: str) -> list[torch.Tensor]:
    return [x, x.flip(-1)] if tta == "hflip" else [x]


def loader_options(workers: int, device: torch.device, persistent: bool, prefetch: int) -> dict:
    """DataLoader options: pinned memory on a GPU; with workers, their prefetch and whether they
    stay alive for the next pass."""
    options: dict = {"num_workers": workers, "pin_memory": device.type == "cuda"}
    if workers:
        options.update(persistent_workers=persistent, prefetch_factor=prefetch)
    return options


def eval_loader(dataset: Dataset, indices: Sequence[int] | np.ndarray, *, batch_size: int, device: torch.device,
                workers: int = 0, persistent: bool = False, prefetch: int = 4) -> DataLoader:
    """In-order batches of ``dataset[indices]``; ``persistent`` keeps the workers for the next pass
    (validation every epoch)."""
    options = loader_options(workers, device, persistent, prefetch)
    return DataLoader(Subset(dataset, np.asarray(indices, dtype=np.int64).tolist()), batch_size=batch_size,
                      shuffle=False, **options)


def pooled_and_logits(model: torch.nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """timm's pooled features before the classifier (the embedding) and the logits, in one pass."""
    core = getattr(model, "_orig_mod", model)  # under torch.compile
    features = core.forward_features(x)
    return core.forward_head(features, pre_logits=True), core.forward_head(features)


def embedding_width(model: torch.nn.Module, channels: int, size: int, device: torch.device) -> int:
    was_training = model.training
    model.eval()
    with torch.no_grad():
        width = pooled_and_logits(model, torch.zeros(1, channels, size, size, device=device))[0].shape[1]
    model.train(was_training)
    return int(width)


@torch.no_grad()
def predict_probabilities(
    model: torch.nn.Module,
    dataset: Dataset,
    indices: Sequence[int] | np.ndarray,
    *,
    batch_size: int,
    device: torch.device,
    amp: str = "off",
    channels_last: bool = False,
    tta: str = "hflip",
    workers: int = 0,
    loader: DataLoader | None = None,
    embeddings: np.ndarray | None = None,
) -> np.ndarray:
    """Sigmoid probabilities (len(indices) x 6, float64) of ``dataset[indices]``, TTA-averaged.

    ``loader``: a prebuilt ``eval_loader`` over the same indices (else one is built).
    ``embeddings``: a (len(indices), D) array (a memmap, say) that receives each image's pooled
    features, averaged over the TTA views like the probabilities."""
    indices = np.asarray(indices, dtype=np.int64)
    out = np.empty((len(indices), 6), dtype=np.float64)
    if len(indices) == 0:
        return out
    was_training = model.training
    model.eval()
    if loader is None:
        loader = eval_loader(dataset, indices, batch_size=batch_size, device=device, workers=workers)
    start = 0
    for x, _ in loader:
        x = model_input(x, device, channels_last)
        probs = torch.zeros(x.shape[0], 6, dtype=torch.float64, device=device)
        pooled = None
        views = tta_views(x, tta)
        for view in views:
            with autocast(device, amp):
                if embeddings is None:
                    logits = model(view)
                else:
                    emb, logits = pooled_and_logits(model, view)
                    pooled = emb.float() if pooled is None else pooled + emb.float()
            probs += torch.sigmoid(logits.double())
        out[start : start + len(x)] = (probs / len(views)).cpu().numpy()
        if embeddings is not None:
            embeddings[start : start + len(x)] = (pooled / len(views)).cpu().numpy().astype(embeddings.dtype)
        start += len(x)
    if start != len(indices):
        raise RuntimeError(f"the loader gave {start} images for {len(indices)} indices")
    model.train(was_training)
    return out


def predict_sharded(model: torch.nn.Module, dataset: Dataset, env: DistEnv, *, embeddings: np.ndarray | None = None,
                    embedding_dim: int | None = None, **kwargs) -> np.ndarray:
    """Every process predicts its share of ``dataset`` (each image exactly once over all of them);
    every process gets all rows back, in order. With ``embedding_dim`` (or ``embeddings``) every
    process also pools its rows' features and rank 0's ``embeddings`` (len(dataset) x D, float16, a
    memmap say; None on the other ranks) receives all of them through the process group."""
    n = len(dataset)
    mine = shard(np.arange(n), env)
    dim = embedding_dim if embedding_dim is not None else None if embeddings is None else embeddings.shape[1]
    local_emb = None
    if dim is not None:
        local_emb = embeddings if not env.enabled else np.zeros((len(mine), dim), np.float16)
    local = predict_probabilities(model, dataset, mine, embeddings=local_emb, **kwargs)
    if env.enabled and dim is not None:
        gather_rows_to_main(mine, local_emb, embeddings, env)
    return gather_predictions(mine, local, n, env)


def load_fold_model(
    model_name: str,
    fold: int,
    *,
    data_dir: Path | str | None = None,
    work_dir: Path | str | None = None,
    model_dir: Path | str | None = None,
    device: str | torch.device = "cpu",
) -> tuple[torch.nn.Module, TrainConfig]:
    """A fold's best model (eval mode) and the config it was trained with.

    Give ``model_dir`` directly, or ``data_dir`` (and optionally ``work_dir``) to find
    ``WorkPaths.model_dir(model_name)``.
    """
    if model_dir is None:
        if data_dir is None and work_dir is None:
            raise ValueError("load_fold_model needs model_dir, or data_dir / work_dir to find it")
        model_dir = WorkPaths.for_data(data_dir or ".", work_dir).model_dir(model_name)
    path = Path(model_dir) / f"fold{fold}" / "best.pt"
    state = load_checkpoint(path)
    if state.get("model_name") != model_name:
        raise ValueError(f"{path} belongs to model {state.get('model_name')!r}, not {model_name!r}")
    cfg = TrainConfig.from_dict(state["config"])
    model = create_network(cfg)
    load_weights(model, state, cfg, path)
    return model.to(device).eval(), cfg
