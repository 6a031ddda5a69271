"""The fitted level 2, saved beside the stack's outputs, and applied to slices it has never seen.

`make stack` keeps what produced its test predictions under ``stack/fitted/``: LightGBM booster k
for each label (LightGBM's own text format), sequence model k (a weights-only state dict), each
model's fold-k map into the shared embedding space, the blend weights over the candidates
(level2_stacking.choices) and whether the `any` rule was kept.
``FittedStack.predict`` repeats for a new study exactly what the pipeline did for a test image:
booster k reads the features built from fold model k's own probabilities, sequence model k reads
fold model k's probabilities and embeddings, both are averaged over k; each level-1 model is the
mean of its fold models, and the level-1 mean theirs; these candidates are blended and the `any`
rule applied; the study probability is the max of the result's `any` over the study's slices. So
`make predict` on a competition test image gives the stacked submission's row and the stack's study call
(tests/test_prediction.py, tests/test_blend_parity.py).
"""
from __future__ import annotations

import json
import os
import shutil
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from pathlib import Path

import lightgbm as lgb
import numpy as np
import pandas as pd
import torch

from competition.atomic import write_json
from competition.constants import LABELS
from competition.safe_names import path_inside
from features.tabular import TabularFeatureConfig, build_tabular_features
from level2_stacking.blend import any_at_least_subtypes, mix
from level2_stacking.choices import candidate_names
from level2_stacking.report import LGBM_ROW, MEAN_ROW, SEQ_ROW
from level2_stacking.embeddings import LinearMap
from level2_stacking.sequence import SequenceSettings, SeriesModel, predict_series
from level2_stacking.sequence_data import mapped, series_bounds, slice_inputs
from level2_stacking.study_model import POOLING, study_max

FITTED_DIR = "fitted"
MANIFEST = "manifest.json"
FORMAT = 3  # bump when a folder written before cannot be read the same way


class FittedStackError(ValueError):
    """The saved level 2 cannot be used as asked; the message says why and what to run."""


@dataclass
class FittedStack:
    models: list[str]                      # the level-1 models stacked, in feature order
    folds: list[int]
    stacker: str                           # lgbm, seq or blend
    feature_config: TabularFeatureConfig
    feature_names: list[str]
    boosters: dict[int, list[tuple[lgb.Booster, int]]]  # fold -> per label (booster, rounds); {} without LightGBM
    sequence: dict[int, SeriesModel]       # fold -> model; {} without the sequence model
    sequence_settings: SequenceSettings
    maps: dict[str, dict[int, LinearMap]]  # model -> fold -> its map into the shared space (models with embeddings)
    blend_names: list[str]                 # the candidates the slice blend mixes (level2_stacking.choices)
    blend_weights: np.ndarray              # (len(blend_names), 6) simplex weights per label
    any_rule: bool

    # -- prediction -------------------------------------------------------------------------

    def check_inputs(self, per_fold: Mapping[str, Mapping[int, np.ndarray]]) -> None:
        if sorted(per_fold) != sorted(self.models):
            raise FittedStackError(f"the stack was fit on models {self.models}, given {sorted(per_fold)}; "
                                   f"predict with MODELS={','.join(self.models)} or run `make stack` again")
        for m in self.models:
            if sorted(per_fold[m]) != sorted(self.folds):
                raise FittedStackError(f"{m}: the stack was fit on folds {self.folds}, the model has folds "
                                       f"{sorted(per_fold[m])}; run `make stack` again")

    def predict(self, per_fold: Mapping[str, Mapping[int, np.ndarray]], metadata: pd.DataFrame,
                embeddings: Mapping[str, Mapping[int, np.ndarray]] | None = None) -> np.ndarray:
        """(rows, 6) stacked probabilities of the slices of ``metadata`` (in its row order).

        ``per_fold[model][k]``: (rows, 6) probabilities of fold model k; ``embeddings[model][k]``:
        (rows, D) its pooled features (float16, as level 1 saves them); ``metadata`` needs
        image_id, study_id, series_id, slice_index, n_slices."""
        return self.predict_with_studies(per_fold, metadata, embeddings)[0]

    def predict_with_studies(self, per_fold: Mapping[str, Mapping[int, np.ndarray]], metadata: pd.DataFrame,
                             embeddings: Mapping[str, Mapping[int, np.ndarray]] | None = None,
                             ) -> tuple[np.ndarray, pd.DataFrame]:
        """(the slices' stacked probabilities as ``predict``, the stack's study probability (the
        max of their `any` over each study's slices): a table of study_id and probability, sorted by
        study_id)."""
        candidates = self.candidates(per_fold, metadata, embeddings)
        p = mix(np.stack([candidates[n] for n in self.blend_names]), self.blend_weights)
        p = any_at_least_subtypes(p) if self.any_rule else p
        studies, probability = study_max(p[:, LABELS.index("any")], metadata["study_id"].to_numpy())
        return p, pd.DataFrame({"study_id": studies, "probability": probability})

    def candidates(self, per_fold: Mapping[str, Mapping[int, np.ndarray]], metadata: pd.DataFrame,
                   embeddings: Mapping[str, Mapping[int, np.ndarray]] | None = None) -> dict[str, np.ndarray]:
        """name -> (rows, 6): the stackers, each level-1 model (mean of its folds) and the level-1 mean."""
        self.check_inputs(per_fold)
        out = {}
        if self.boosters:
            out[LGBM_ROW] = self._boosters(per_fold, metadata)
        if self.sequence:
            out[SEQ_ROW] = self._sequence(per_fold, metadata, embeddings or {})
        level1 = {m: np.mean([np.asarray(per_fold[m][k], np.float64) for k in self.folds], axis=0) for m in self.models}
        out = {**out, **level1, MEAN_ROW: np.mean([level1[m] for m in self.models], axis=0)}
        assert list(out) == candidate_names(list(out), self.models)  # the pipeline's order
        return out

    def _boosters(self, per_fold, metadata: pd.DataFrame) -> np.ndarray:
        ids = metadata["image_id"].to_numpy()
        out = np.zeros((len(ids), len(LABELS)))
        for k in self.folds:
            tables = {m: pd.DataFrame(per_fold[m][k], columns=list(LABELS)).assign(image_id=ids) for m in self.models}
            features = build_tabular_features(tables, metadata, self.feature_config, row_order="input")
            lacking = [c for c in self.feature_names if c not in features.columns]
            if lacking:
                raise FittedStackError(f"features {lacking[:3]} of the fitted stack were not built; "
                                       f"this code builds them differently: run `make stack` again")
            x = features[self.feature_names].to_numpy(np.float32)
            for j, (booster, rounds) in enumerate(self.boosters[k]):
                out[:, j] += booster.predict(x, num_iteration=rounds) / len(self.folds)
        return out

    def _sequence(self, per_fold, metadata: pd.DataFrame, embeddings) -> np.ndarray:
        lacking = [m for m in self.maps if m not in embeddings]
        if lacking:
            raise FittedStackError(f"the sequence model reads the embeddings of {lacking}, none were given")
        order = np.lexsort((metadata["slice_index"].to_numpy(), pd.factorize(metadata["series_id"])[0]))
        ids = metadata["image_id"].to_numpy()[order]
        bounds, position = series_bounds(ids, metadata)
        settings = self.sequence_settings
        out = np.zeros((len(ids), len(LABELS)))
        for k in self.folds:
            x = slice_inputs([np.asarray(per_fold[m][k])[order] for m in self.models], position,
                             [mapped(np.asarray(embeddings[m][k])[order], self.maps[m][k]) for m in self.maps])
            out[order] += predict_series(self.sequence[k], x, bounds, settings) / len(self.folds)
        return out

    # -- saving and loading -----------------------------------------------------------------

    def save(self, stack_dir: Path) -> Path:
        """Write ``stack_dir/fitted`` whole or not at all (a new folder swapped in at the end)."""
        final = Path(stack_dir) / FITTED_DIR
        tmp = Path(stack_dir) / f".{FITTED_DIR}.{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        manifest = {
            "format": FORMAT, "models": self.models, "folds": self.folds, "stacker": self.stacker,
            "feature_config": asdict(self.feature_config), "feature_names": self.feature_names,
            "labels": list(LABELS), "any_rule": self.any_rule,
            "blend": {"names": self.blend_names, "weights": np.asarray(self.blend_weights).tolist()},
            "study_model": {"pooling": POOLING},
            "lightgbm": {}, "sequence": {}, "maps": {},
            "sequence_settings": asdict(self.sequence_settings),
        }
        for k, boosters in self.boosters.items():
            rows = []
            for label, (booster, rounds) in zip(LABELS, boosters):
                name = f"lightgbm/fold{k}_{label}.txt"
                (tmp / name).parent.mkdir(exist_ok=True)
                booster.save_model(tmp / name, num_iteration=rounds)
                rows.append({"file": name, "rounds": int(rounds)})
            manifest["lightgbm"][str(k)] = rows
        for k, model in self.sequence.items():
            name = f"sequence/fold{k}.pt"
            (tmp / name).parent.mkdir(exist_ok=True)
            torch.save({key: v.detach().cpu() for key, v in model.state_dict().items()}, tmp / name)
            manifest["sequence"][str(k)] = {"file": name, "n_models": model.n_models,
                                            "embedding_dims": model.embedding_dims}
        for m, maps in self.maps.items():
            manifest["maps"][m] = {}
            for k, linear in maps.items():
                name = f"maps/{m}_fold{k}.npz"
                (tmp / name).parent.mkdir(exist_ok=True)
                np.savez(tmp / name, mean=linear.mean, weight=linear.weight)
                manifest["maps"][m][str(k)] = name
        write_json(tmp / MANIFEST, manifest)
        old = Path(stack_dir) / f".{FITTED_DIR}.old.{os.getpid()}"
        if final.exists():
            final.rename(old)
        tmp.rename(final)
        shutil.rmtree(old, ignore_errors=True)
        return final


def fitted_dir(stack_dir: Path) -> Path:
    return Path(stack_dir) / FITTED_DIR


def referenced_files(manifest: Mapping) -> list[object]:
    """Every file name a fitted manifest reads (as written; not yet checked): a bundle checks them
    against its hashed members, ``load_fitted`` against the folder."""
    names: list[object] = [row.get("file") for rows in manifest.get("lightgbm", {}).values() for row in rows]
    names += [entry.get("file") for entry in manifest.get("sequence", {}).values()]
    names += [name for files in manifest.get("maps", {}).values() for name in files.values()]
    return names


def inside(root: Path, name: object) -> Path:
    """``root / name`` for a plain relative name that stays in ``root`` (competition.safe_names); anything
    else is refused, so a manifest cannot make level 2 read a file elsewhere."""
    target = path_inside(root, name)
    if target is None:
        raise FittedStackError(f"refusing file name {name!r} of {root / MANIFEST}: the fitted level 2 reads only "
                               f"files inside its own folder; it was not written by `make stack`, fit it again")
    return target


def load_fitted(stack_dir: Path, device: str = "cpu") -> FittedStack:
    """The level 2 that `make stack` saved under ``stack_dir``; a clear error when absent or foreign."""
    root = fitted_dir(stack_dir)
    path = root / MANIFEST
    if not path.is_file():
        raise FittedStackError(f"no fitted level 2 in {root} (stacks fit before it was saved have none); "
                               f"run `make stack` to fit and save it")
    try:
        manifest = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise FittedStackError(f"{path} is unreadable ({exc}); run `make stack` again") from None
    if manifest.get("format") != FORMAT or manifest.get("labels") != list(LABELS):
        raise FittedStackError(f"{root} was written by another version (format {manifest.get('format')}, "
                               f"this code reads {FORMAT}); run `make stack` again")
    for name in referenced_files(manifest):
        inside(root, name)
    feature_config = TabularFeatureConfig(**{k: tuple(v) if isinstance(v, list) else v
                                             for k, v in manifest["feature_config"].items()})
    settings = SequenceSettings(**{**manifest["sequence_settings"], "device": device})
    boosters = {int(k): [(lgb.Booster(model_file=str(root / row["file"])), int(row["rounds"])) for row in rows]
                for k, rows in manifest["lightgbm"].items()}
    sequence = {}
    for k, entry in manifest["sequence"].items():
        model = SeriesModel(entry["n_models"], entry["embedding_dims"], settings)
        model.load_state_dict(torch.load(root / entry["file"], map_location="cpu", weights_only=True))
        sequence[int(k)] = model.to(device).eval()
    maps = {}
    for m, files in manifest["maps"].items():
        maps[m] = {}
        for k, name in files.items():
            with np.load(root / name) as arrays:
                maps[m][int(k)] = LinearMap(arrays["mean"], arrays["weight"])
    blend = manifest["blend"]
    return FittedStack(manifest["models"], [int(k) for k in manifest["folds"]], manifest["stacker"], feature_config,
                       manifest["feature_names"], boosters, sequence, settings, maps, list(blend["names"]),
                       np.asarray(blend["weights"], np.float64), bool(manifest["any_rule"]))
