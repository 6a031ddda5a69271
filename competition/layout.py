"""The Kaggle layout of a competition folder (stage_2 names, stage_1 names accepted)."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

# Tried in order: the final (stage 2) release first, then stage 1.
STAGES = ("stage_2", "stage_1")
ANSWERS_NAME = "stage_2_test_answers.csv"  # synthetic datasets only: the scorer's truth


class LayoutError(FileNotFoundError):
    """DATA is not a competition folder in the Kaggle layout."""


@dataclass(frozen=True)
class Layout:
    root: Path
    stage: str
    train_dir: Path
    test_dir: Path
    train_csv: Path
    sample_submission: Path
    answers: Path | None

    @classmethod
    def find(cls, data_dir: Path | str) -> "Layout":
        root = Path(data_dir)
        if not root.is_dir():
            raise LayoutError(
                f"DATA folder {root} does not exist; run `make data` (real competition) "
                f"or `make synthetic` (embedded demo), or set DATA=<folder in the Kaggle layout>"
            )
        for stage in STAGES:
            train_dir = root / f"{stage}_train"
            test_dir = root / f"{stage}_test"
            if train_dir.is_dir() or test_dir.is_dir():
                answers = root / ANSWERS_NAME
                return cls(
                    root=root,
                    stage=stage,
                    train_dir=train_dir,
                    test_dir=test_dir,
                    train_csv=root / f"{stage}_train.csv",
                    sample_submission=root / f"{stage}_sample_submission.csv",
                    answers=answers if answers.is_file() else None,
                )
        raise LayoutError(
            f"{root} has no stage_2_train/ or stage_2_test/ (nor stage_1_*) folder; "
            f"point DATA at the unzipped Kaggle competition folder"
        )

    def require(self, *names: str) -> None:
        """Fail with one line naming the first missing piece (e.g. "train_csv")."""
        for name in names:
            path = getattr(self, name)
            if path is None or not Path(path).exists():
                raise LayoutError(f"{self.root}: missing {name} ({path}); the Kaggle layout needs it")

    def image_dirs(self) -> dict[str, Path]:
        """Split name -> folder, for the folders that exist."""
        return {split: d for split, d in (("train", self.train_dir), ("test", self.test_dir)) if d.is_dir()}
