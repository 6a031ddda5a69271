"""The competition as data and rules: layout, labels, DICOM -> HU, metadata, folds, metric."""
from competition.constants import COMPETITION, LABEL_WEIGHTS, LABELS

__all__ = ["COMPETITION", "LABELS", "LABEL_WEIGHTS"]
