"""Level 2 in prediction: the stack `make stack` saved (``stack/fitted/``, level2_stacking.fitted),
used when it was fit on exactly the level-1 models and folds being predicted with; otherwise the
level-1 mean, with one line saying why."""
from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

from competition.paths import WorkPaths
from level2_stacking.fitted import MANIFEST, fitted_dir


def why_not_stacked(root: Path, members: Sequence) -> str | None:
    """None when the saved level 2 under ``root`` fits ``members`` (same models, same folds), else
    one line saying why it is not applied and how to get it."""
    path = fitted_dir(WorkPaths(Path(root)).stack) / MANIFEST  # a work folder or an unpacked bundle
    if not path.is_file():
        return f"no fitted level 2 in {path.parent} (run `make stack` to fit and save it)"
    try:
        manifest = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        return f"{path} is unreadable ({exc}); run `make stack` again"
    names = sorted(m.name for m in members)
    if sorted(manifest.get("models", [])) != names:
        return (f"the stack was fit on models {sorted(manifest.get('models', []))}, not {names} "
                f"(predict with MODELS={','.join(manifest.get('models', []))}, or `make stack MODELS=...`)")
    folds = sorted(int(k) for k in manifest.get("folds", []))
    lacking = [m.name for m in members if sorted(m.folds) != folds]
    if lacking:
        return f"the stack was fit on folds {folds}; {', '.join(lacking)} have other finished folds: run `make stack` again"
    return None

