"""Fixed facts of the RSNA Intracranial Hemorrhage Detection competition."""
from __future__ import annotations

import numpy as np

COMPETITION = "rsna-intracranial-hemorrhage-detection"

# Label order everywhere in the project (tables, model outputs, submissions).
LABELS: tuple[str, ...] = (
    "epidural",
    "intraparenchymal",
    "intraventricular",
    "subarachnoid",
    "subdural",
    "any",
)
SUBTYPES: tuple[str, ...] = LABELS[:-1]

# The official metric weights `any` twice as much as each subtype.
LABEL_WEIGHTS = np.array([1.0, 1.0, 1.0, 1.0, 1.0, 2.0])
