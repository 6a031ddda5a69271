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

from level2_stacking.embeddings import FoldEmbeddings, LinearMap, open_embeddings, shared_space_maps
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


def _write_level1(out: np.ndarray, probabilities: Sequence[np.ndarray], position: np.ndarray) -> int:
    """Each model's six logits, then the relative position, into ``out``'s first columns (float16,
    rounded as ``astype`` rounds); returns the first column after them."""
    for i, p in enumerate(probabilities):
        out[:, 6 * i:6 * i + 6] = logits(p)  # one (rows, 6) float64 temporary at a time
    at = 6 * len(probabilities)
    out[:, at] = position
    return at + 1


def slice_inputs(probabilities: Sequence[np.ndarray], position: np.ndarray, embeddings: Sequence[np.ndarray]
                 ) -> np.ndarray:
    """(rows, C) float16: each model's six logits, the relative position, each mapped embedding;
    assembled in place (a concatenation would promote the float16 embeddings to float64)."""
    width = 6 * len(probabilities) + 1 + sum(e.shape[1] for e in embeddings)
    out = np.empty((len(position), width), np.float16)
    at = _write_level1(out, probabilities, position)
    for e in embeddings:
        out[:, at:at + e.shape[1]] = e
        at += e.shape[1]
    return out


@dataclass(frozen=True)
class _Embedded:
    """One model's fold embeddings and their maps into the shared space."""
    folds: dict[int, FoldEmbeddings]
    maps: dict[int, LinearMap]

    @property
    def width(self) -> int:
        return next(iter(self.maps.values())).weight.shape[1]


def _fold_rows(frame: StackFrame, model: str, k: int, oof_ids: np.ndarray) -> np.ndarray:
    """Frame rows of fold model k's embedded OOF images, which must be exactly fold k's rows."""
    rows = pd.Index(frame.train_ids).get_indexer(oof_ids)
    if (rows < 0).any():
        raise ValueError(f"{model}/fold{k}: embedded images that are not train rows of the folds table")
    expected = np.flatnonzero(frame.folds == k)
    if len(rows) != len(expected) or not np.array_equal(np.sort(rows), expected):
        wrong = len(np.setdiff1d(rows, expected)) + len(np.setdiff1d(expected, rows))
        raise ValueError(f"{model}/fold{k}: the embedded OOF images are not exactly fold {k}'s rows of the folds "
                         f"table ({wrong} differ or repeat); rerun that fold's prediction (`make oof`)")
    return rows


def _test_rows(frame: StackFrame, model: str, k: int, test_ids: np.ndarray) -> np.ndarray:
    """Frame rows of fold model k's embedded test images (fold tables have their own order)."""
    rows = pd.Index(frame.test_ids).get_indexer(test_ids)
    if len(rows) != len(frame.test_ids) or (rows < 0).any() or len(np.unique(rows)) != len(rows):
        raise ValueError(f"{model}/fold{k}: the embedded test images are not the stack's test images")
    return rows


def _embedded(frame: StackFrame, fold_ids: Sequence[int], dim: int) -> dict[str, _Embedded]:
    """Model -> its fold embeddings (memory maps) and shared-space maps, for the models that have them."""
    out = {}
    for m in frame.models:
        folds = open_embeddings(frame.model_dirs[m], fold_ids)
        if folds is not None:
            out[m] = _Embedded(folds, shared_space_maps(folds, dim))
    return out


def _inputs_array(frame: StackFrame, embedded: dict[str, _Embedded], probabilities: Sequence[np.ndarray],
                  position: np.ndarray, fold: int | None) -> np.ndarray:
    """(rows, C) float16, preallocated and written block by block: the train rows (``fold`` None,
    each embedding from the fold model that held the row out) or the test rows as fold model
    ``fold`` embeds them. Peak: the array plus a few chunks (level2_stacking.embeddings)."""
    width = 6 * len(probabilities) + 1 + sum(e.width for e in embedded.values())
    out = np.empty((len(position), width), np.float16)
    at = _write_level1(out, probabilities, position)
    for m, e in embedded.items():
        block = out[:, at:at + e.width]  # a view: the maps write straight into these columns
        if fold is None:
            for k, emb in e.folds.items():
                e.maps[k].apply(emb.oof, block, _fold_rows(frame, m, k, emb.oof_ids))
        else:
            emb = e.folds[fold]
            e.maps[fold].apply(emb.test, block, _test_rows(frame, m, fold, emb.test_ids))
        at += e.width
    return out


def build_sequence_inputs(frame: StackFrame, metadata: pd.DataFrame, embedding_dim: int = 256,
                          use_embeddings: bool = True) -> SequenceInputs:
    fold_ids = sorted(int(k) for k in np.unique(frame.folds))
    train_series, train_pos = series_bounds(frame.train_ids, metadata)
    test_series, test_pos = series_bounds(frame.test_ids, metadata)
    embedded = _embedded(frame, fold_ids, embedding_dim) if use_embeddings else {}
    train = _inputs_array(frame, embedded, [frame.level1_oof[m] for m in frame.models], train_pos, None)
    test = {}
    for k in fold_ids:
        probs = [frame.level1_fold_test[m][k] if frame.test_per_fold else frame.level1_test[m] for m in frame.models]
        test[k] = _inputs_array(frame, embedded, probs, test_pos, k)
    with_emb = list(embedded)
    widths = [e.width for e in embedded.values()]
    if not use_embeddings:
        note = "sequence model: embeddings switched off; it runs on the level-1 probabilities alone"
    elif not with_emb:
        note = ("sequence model: no level-1 embeddings (fold<k>/embeddings_*.npy; models trained before level 1 "
                "wrote them): it runs on the level-1 probabilities alone")
    else:
        lacking = [m for m in frame.models if m not in with_emb]
        note = (f"sequence model: embeddings of {', '.join(with_emb)} ({widths[0]} dims each in the shared "
                f"space)" + (f"; {', '.join(lacking)} without (probabilities only)" if lacking else ""))
    return SequenceInputs(train, test, train_series, test_series, len(frame.models), widths, note,
                          {m: e.maps for m, e in embedded.items()})
