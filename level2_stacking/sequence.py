"""The sequence model: a small network over each series of slices in z order (the 2019 winners'
largest gain after the CNNs), trained per fold on the shared patient folds.

Per slice it reads every level-1 model's six logits, the relative position and each model's
embedding (a linear layer per model); a bidirectional GRU (or a small transformer encoder) runs
along the series; a head adds a correction to the mean of the level-1 logits, starting at zero
so that training starts at level 1. Series are padded to the longest in the batch and masked
(``pack_padded_sequence``, ``src_key_padding_mask``), so a series gives the same output alone or
in a batch. Loss: BCE with `any` weighted 2, as the metric. Training reverses each series with
probability 1/2; prediction averages the forward and reversed passes. The epochs are fixed
(nothing is tuned on the held-out fold).
"""
from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

from competition.constants import LABEL_WEIGHTS, LABELS
from competition.metric import weighted_log_loss
from level2_stacking.sequence_data import SequenceInputs

N_LABELS = len(LABELS)


@dataclass(frozen=True)
class SequenceSettings:
    arch: str = "gru"          # "gru" or "transformer"
    hidden: int = 64
    layers: int = 2
    embedding_proj: int = 32   # each model's embedding -> this many dims (the per-model linear layer)
    dropout: float = 0.2
    epochs: int = 20
    batch_series: int = 32
    lr: float = 2e-3
    weight_decay: float = 1e-2
    reverse_tta: bool = True
    device: str = "cpu"
    threads: int | None = None  # torch CPU threads (None: torch's default)
    seed: int = 0


class SeriesModel(nn.Module):
    def __init__(self, n_models: int, embedding_dims: list[int], s: SequenceSettings) -> None:
        super().__init__()
        self.n_models, self.embedding_dims, self.arch = n_models, list(embedding_dims), s.arch
        self.proj = nn.ModuleList(nn.Linear(d, s.embedding_proj) for d in embedding_dims)
        in_dim = N_LABELS * n_models + 1 + s.embedding_proj * len(embedding_dims)
        self.inp = nn.Sequential(nn.Linear(in_dim, s.hidden), nn.GELU(), nn.Dropout(s.dropout))
        if s.arch == "gru":
            self.seq = nn.GRU(s.hidden, s.hidden, num_layers=s.layers, batch_first=True, bidirectional=True,
                              dropout=s.dropout if s.layers > 1 else 0.0)
            out_dim = 2 * s.hidden
        elif s.arch == "transformer":
            layer = nn.TransformerEncoderLayer(s.hidden, nhead=4, dim_feedforward=2 * s.hidden, dropout=s.dropout,
                                               batch_first=True)
            self.seq = nn.TransformerEncoder(layer, s.layers, enable_nested_tensor=False)
            out_dim = s.hidden
        else:
            raise ValueError(f"unknown sequence architecture {s.arch!r}; use gru or transformer")
        self.head = nn.Linear(out_dim + s.hidden, N_LABELS)
        nn.init.zeros_(self.head.weight)
        nn.init.zeros_(self.head.bias)

    def forward(self, x: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        """x: (B, T, C) padded series; lengths: (B,) on the CPU. Returns logits (B, T, 6)."""
        n_logit = N_LABELS * self.n_models
        base = x[..., :n_logit].reshape(*x.shape[:2], self.n_models, N_LABELS).mean(dim=2)
        parts, at = [x[..., :n_logit + 1]], n_logit + 1
        for proj, d in zip(self.proj, self.embedding_dims):
            parts.append(proj(x[..., at:at + d]))
            at += d
        h = self.inp(torch.cat(parts, dim=-1))
        if self.arch == "gru":
            packed = pack_padded_sequence(h, lengths, batch_first=True, enforce_sorted=False)
            out, _ = pad_packed_sequence(self.seq(packed)[0], batch_first=True, total_length=x.shape[1])
        else:
            pad = torch.arange(x.shape[1], device=x.device)[None, :] >= lengths.to(x.device)[:, None]
            out = self.seq(h, src_key_padding_mask=pad)
        return base + self.head(torch.cat([out, h], dim=-1))


def _batch(data: np.ndarray, bounds: np.ndarray, series: np.ndarray, reverse: np.ndarray, device: str
           ) -> tuple[torch.Tensor, torch.Tensor, list[np.ndarray]]:
    """Padded (B, T, C) float32 tensor of the chosen series (each reversed where asked), their
    lengths and, per series, the data rows of its positions."""
    rows = []
    for s, rev in zip(series, reverse):
        r = np.arange(bounds[s], bounds[s + 1])
        rows.append(r[::-1] if rev else r)
    lengths = np.array([len(r) for r in rows])
    x = np.zeros((len(rows), lengths.max(), data.shape[1]), np.float32)
    for i, r in enumerate(rows):
        x[i, : len(r)] = data[r]  # the position column keeps each slice's true place, reversed or not
    return torch.from_numpy(x).to(device), torch.from_numpy(lengths), rows


def _loss(logit: torch.Tensor, target: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    mask = (torch.arange(logit.shape[1])[None, :] < lengths[:, None]).to(logit.device)
    weights = torch.tensor(LABEL_WEIGHTS, dtype=logit.dtype, device=logit.device)
    per = nn.functional.binary_cross_entropy_with_logits(logit, target, reduction="none") * weights
    return (per.sum(-1) * mask).sum() / (mask.sum() * weights.sum())


def predict_series(model: SeriesModel, data: np.ndarray, bounds: np.ndarray, s: SequenceSettings,
                   batch_series: int = 64) -> np.ndarray:
    """(rows, 6) probabilities of every series in ``bounds``; forward and reversed passes averaged."""
    out = np.zeros((len(data), N_LABELS))
    n_series = len(bounds) - 1
    passes = (False, True) if s.reverse_tta else (False,)
    model.eval()
    with torch.no_grad():
        for start in range(0, n_series, batch_series):
            series = np.arange(start, min(start + batch_series, n_series))
            for rev in passes:
                x, lengths, rows = _batch(data, bounds, series, np.full(len(series), rev), s.device)
                p = torch.sigmoid(model(x, lengths)).cpu().numpy()
                for i, r in enumerate(rows):
                    out[r] += p[i, : len(r)] / len(passes)
    return out


def _targets(y: np.ndarray, rows: list[np.ndarray], device: str) -> torch.Tensor:
    t = np.zeros((len(rows), max(len(r) for r in rows), N_LABELS), np.float32)
    for i, r in enumerate(rows):
        t[i, : len(r)] = y[r]
    return torch.from_numpy(t).to(device)


def fit_series_model(data: np.ndarray, y: np.ndarray, bounds: np.ndarray, series: np.ndarray, n_models: int,
                     embedding_dims: list[int], s: SequenceSettings,
                     on_epoch: Callable[[int, float, float], None] | None = None) -> SeriesModel:
    """Train on the given series (indices into ``bounds``) for ``s.epochs`` epochs."""
    torch.manual_seed(s.seed)
    rng = np.random.default_rng(s.seed)
    model = SeriesModel(n_models, embedding_dims, s).to(s.device)
    opt = torch.optim.AdamW(model.parameters(), lr=s.lr, weight_decay=s.weight_decay)
    steps = s.epochs * max(1, -(-len(series) // s.batch_series))
    warm = max(1, steps // 10)  # linear warm-up over a tenth of the steps, then a cosine decay
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda i: min(1.0, (i + 1) / warm) * 0.5 * (1 + math.cos(math.pi * min(i, steps) / steps)))
    for epoch in range(s.epochs):
        model.train()
        start, total, seen = time.perf_counter(), 0.0, 0
        order = rng.permutation(series)
        for b in range(0, len(order), s.batch_series):
            chosen = order[b:b + s.batch_series]
            reverse = rng.random(len(chosen)) < 0.5
            x, lengths, rows = _batch(data, bounds, chosen, reverse, s.device)
            loss = _loss(model(x, lengths), _targets(y, rows, s.device), lengths)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            sched.step()
            total, seen = total + loss.item() * len(chosen), seen + len(chosen)
        if on_epoch is not None:
            on_epoch(epoch, total / max(seen, 1), time.perf_counter() - start)
    return model


@dataclass(frozen=True)
class SequenceResult:
    oof: np.ndarray                 # (N, 6)
    test: np.ndarray                # (M, 6) mean over fold models
    fold_losses: dict[int, float]
    loss: float
    seconds_per_epoch: float
    models: dict[int, SeriesModel] = field(default_factory=dict)  # fold -> its trained model, for `make predict`


def cross_validate_sequence(inputs: SequenceInputs, y: np.ndarray, folds: np.ndarray, s: SequenceSettings,
                            progress: bool = True) -> SequenceResult:
    """Sequence model k trains on the other folds' series, predicts fold k's series and the test
    series read from fold model k's outputs; test predictions are averaged over k."""
    if s.threads:
        torch.set_num_threads(s.threads)
    series_fold = folds[inputs.train_series[:-1]]
    lengths = np.diff(inputs.train_series)
    if any(len(np.unique(folds[a:b])) > 1 for a, b in zip(inputs.train_series[:-1], inputs.train_series[1:])):
        raise ValueError("a series spans several folds; the folds must be grouped by patient")
    fold_ids = np.unique(folds)
    oof = np.full(y.shape, np.nan)
    n_test = len(next(iter(inputs.test.values()))) if inputs.test else 0
    test = np.zeros((n_test, N_LABELS))
    fold_losses: dict[int, float] = {}
    epoch_seconds: list[float] = []
    models: dict[int, SeriesModel] = {}
    for k in fold_ids:
        train_series = np.flatnonzero(series_fold != k)
        val_series = np.flatnonzero(series_fold == k)

        def report(epoch: int, loss: float, seconds: float, k: int = int(k)) -> None:
            epoch_seconds.append(seconds)
            if progress and (epoch + 1 == s.epochs or epoch % 5 == 0):
                print(f"sequence model fold {k}: epoch {epoch + 1}/{s.epochs} train loss {loss:.4f} ({seconds:.1f} s)",
                      flush=True)

        model = fit_series_model(inputs.train, y, inputs.train_series, train_series, inputs.n_models,
                                 inputs.embedding_dims, s, on_epoch=report)
        models[int(k)] = model
        # The held-out series are not contiguous in the table: gather them, with their own bounds.
        val_rows = np.concatenate([np.arange(a, b) for a, b in
                                   zip(inputs.train_series[val_series], inputs.train_series[val_series + 1])])
        val_bounds = np.r_[0, np.cumsum(lengths[val_series])]
        oof[val_rows] = predict_series(model, inputs.train[val_rows], val_bounds, s)
        fold_losses[int(k)] = weighted_log_loss(y[val_rows], oof[val_rows])
        if n_test:
            test += predict_series(model, inputs.test[int(k)], inputs.test_series, s) / len(fold_ids)
    return SequenceResult(oof, test, fold_losses, weighted_log_loss(y, oof), float(np.median(epoch_seconds)), models)
