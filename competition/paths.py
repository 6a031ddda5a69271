"""Fixed, predictable locations of everything derived from one dataset folder.

Everything derived from ``DATA`` lives under one work folder (``work/<basename of DATA>`` by
default), never inside ``DATA``, so the synthetic demo and the real competition never mix.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path


def default_work_dir(data_dir: Path | str) -> Path:
    return Path("work") / Path(data_dir).resolve().name


@dataclass(frozen=True)
class WorkPaths:
    root: Path

    @classmethod
    def for_data(cls, data_dir: Path | str, work_dir: Path | str | None = None) -> "WorkPaths":
        return cls(Path(work_dir) if work_dir else default_work_dir(data_dir))

    @property
    def metadata(self) -> Path:
        return self.root / "metadata.parquet"

    @property
    def labels(self) -> Path:
        return self.root / "labels.parquet"

    @property
    def folds(self) -> Path:
        return self.root / "folds.parquet"

    @property
    def bad_files(self) -> Path:
        return self.root / "bad_files.csv"

    @property
    def cache(self) -> Path:
        return self.root / "cache"

    @property
    def models(self) -> Path:
        return self.root / "models"

    def model_dir(self, name: str) -> Path:
        return self.models / name

    @property
    def stack(self) -> Path:
        return self.root / "stack"

    @property
    def reports(self) -> Path:
        return self.root / "reports"

    def ensure(self) -> "WorkPaths":
        self.root.mkdir(parents=True, exist_ok=True)
        return self
