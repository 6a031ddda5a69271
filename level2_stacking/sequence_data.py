"""The sequence model's per-slice inputs, in the stack frame's series order.

Per slice: each level-1 model's six logits, the slice's relative position in its series, and
each model's embedding mapped into the shared space (level2_stacking.embeddings). Train rows
carry what the fold model that held them out produced (OOF probabilities and embeddings); test
rows come once per fold model, so that sequence model k reads fold model k's test outputs.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from level2_stacking.embeddings import LinearMap, open_embeddings, shared_space_maps
from level2_stacking.frame import StackFrame

LOGIT_CLIP = 8.0  # |logit| of a level-1 probability, so 0 and 1 stay finite


@dataclass(frozen=True)
class SequenceInputs:
    train: np.ndarray               # (N, C) float16, rows as frame.train_ids
    test: dict[int, np.ndarray]     # fold -> (M, C) float16, rows as frame.test_ids
    train_series: np.ndarray        # (S + 1,) start row of each train series, then N
    test_series: np.ndarray         # (T + 1,)
    n_models: int                   # the first 6 * n_models columns are logits, then 1 position column
    embedding_dims: list[int]       # then one block of this width per model with embeddings
    note: str                       # one line: which models gave embeddings
    maps: dict[str, dict[int, LinearMap]] = field(default_factory=dict)  # model -> fold -> into the shared space


def logits(p: np.ndarray) -> np.ndarray:
    p = np.clip(p, 1 / (1 + np.exp(LOGIT_CLIP)), 1 / (1 + np.exp(-LOGIT_CLIP)))
    return np.log(p) - np.log1p(-p)


def series_bounds(ids: np.ndarray, metadata: pd.DataFrame) -> tuple[np.ndarray, np.ndarray]:
    """Start rows of each series (rows must hold each series contiguously, in slice order) and
    each row's relative position in its series (0 first, 1 last)."""
    meta = metadata.set_index("image_id").loc[ids, ["series_id", "slice_index"]]
    codes, _ = pd.factorize(meta["series_id"], sort=False)
    starts = np.flatnonzero(np.r_[True, codes[1:] != codes[:-1]]) if len(codes) else np.zeros(0, np.int64)
    if len(starts) != len(np.unique(codes)):
        raise ValueError("rows do not hold each series contiguously; build them with the stack frame (series order)")
    bounds = np.r_[starts, len(ids)].astype(np.int64)
    lengths = np.diff(bounds)
    pos = np.arange(len(ids)) - np.repeat(bounds[:-1], lengths)
    rel = np.where(np.repeat(lengths, lengths) > 1, pos / np.maximum(np.repeat(lengths, lengths) - 1, 1), 0.5)
    return bounds, rel


def mapped(array: np.ndarray, linear: LinearMap) -> np.ndarray:
    """(rows, r) float16: ``array``'s rows in the shared space."""
    out = np.empty((len(array), linear.weight.shape[1]), np.float16)
    linear.apply(array, out)
    return out


def slice_inputs(probabilities: Sequence[np.ndarray], position: np.ndarray, embeddings: Sequence[np.ndarray]
                 ) -> np.ndarray:
    """(rows, C) float16: each model's six logits, the relative position, each mapped embedding."""
    return np.concatenate([*(logits(p) for p in probabilities), position[:, None], *embeddings],
                          axis=1).astype(np.float16)


def _embedding_blocks(frame: StackFrame, fold_ids: Sequence[int], dim: int
                      ) -> tuple[list[np.ndarray], list[dict[int, np.ndarray]], dict[str, dict[int, LinearMap]]]:
    """Per model with embeddings: train block (N, r), per-fold test blocks (M, r), float16, and the maps."""
    train_blocks, test_blocks, all_maps = [], [], {}
    train_at = pd.Index(frame.train_ids)
    test_at = pd.Index(frame.test_ids)
    for m in frame.models:
        folds = open_embeddings(frame.model_dirs[m], fold_ids)
        if folds is None:
            continue
        maps = shared_space_maps(folds, dim)
        r = next(iter(maps.values())).weight.shape[1]
        train = np.zeros((len(frame.train_ids), r), np.float16)
        tests: dict[int, np.ndarray] = {}
        for k, emb in folds.items():
            block = mapped(emb.oof, maps[k])
            rows = train_at.get_indexer(emb.oof_ids)
            if (rows < 0).any():
                raise ValueError(f"{m}/fold{k}: embedded images that are not train rows of the folds table")
            train[rows] = block
            test = mapped(emb.test, maps[k])
            # Row i of the frame is the embedded row showing frame.test_ids[i] (fold tables have their own order).
            at = pd.Index(emb.test_ids).get_indexer(test_at)
            if (at < 0).any():
                raise ValueError(f"{m}/fold{k}: the embedded test images are not the stack's test images")
            tests[k] = test[at]
        train_blocks.append(train)
        test_blocks.append(tests)
        all_maps[m] = maps
    return train_blocks, test_blocks, all_maps


def build_sequence_inputs(frame: StackFrame, metadata: pd.DataFrame, embedding_dim: int = 256,
                          use_embeddings: bool = True) -> SequenceInputs:
    fold_ids = sorted(int(k) for k in np.unique(frame.folds))
    train_series, train_pos = series_bounds(frame.train_ids, metadata)
    test_series, test_pos = series_bounds(frame.test_ids, metadata)
    emb_train, emb_test, maps = (_embedding_blocks(frame, fold_ids, embedding_dim) if use_embeddings
                                 else ([], [], {}))
    with_emb = list(maps)
    train = slice_inputs([frame.level1_oof[m] for m in frame.models], train_pos, emb_train)
    test = {}
    for k in fold_ids:
        probs = [frame.level1_fold_test[m][k] if frame.test_per_fold else frame.level1_test[m] for m in frame.models]
        test[k] = slice_inputs(probs, test_pos, [t[k] for t in emb_test])
    if not use_embeddings:
        note = "sequence model: embeddings switched off; it runs on the level-1 probabilities alone"
    elif not with_emb:
        note = ("sequence model: no level-1 embeddings (fold<k>/embeddings_*.npy; models trained before level 1 "
                "wrote them): it runs on the level-1 probabilities alone")
    else:
        lacking = [m for m in frame.models if m not in with_emb]
        note = (f"sequence model: embeddings of {', '.join(with_emb)} ({emb_train[0].shape[1]} dims each in the shared "
                f"space)" + (f"; {', '.join(lacking)} without (probabilities only)" if lacking else ""))
    return SequenceInputs(train, test, train_series, test_series, len(frame.models),
                          [b.shape[1] for b in emb_train], note, maps)
