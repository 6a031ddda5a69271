"""What a written submission file came from: its source, the models and settings behind it, its OOF score.

``make stack`` / ``make submission`` record these facts in the work folder of DATA
(``<WORK>/submissions.json``, keyed by the file's sha256) when they write a file, read from the
outputs they used (``stack/metrics.json`` and its input stamp, ``models/<name>/metrics.json``).
``make submit`` looks the file up there by content, so a file edited or rewritten since is never
credited with another run's score.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from competition.atomic import write_json
from competition.paths import WorkPaths
from competition.stamp import file_sha256

RECORD_FILE = "submissions.json"
METRICS_FILE = "metrics.json"
STACK_STAMP = ".inputs.json"  # level2_stacking.pipeline.STAMP_FILE: the settings the stack was fit with
# Stack settings that do not change the predictions (or are listed elsewhere in the row).
NOT_SETTINGS = {"data", "models", "num_threads", "storage", "progress"}
UNKNOWN = {"source": "unknown", "models": "", "level2": "", "oof_weighted_log_loss": None}


def _read_json(path: Path) -> dict[str, Any]:
    try:
        value = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return value if isinstance(value, dict) else {}


def stack_facts(paths: WorkPaths) -> dict[str, Any]:
    """The stack's level-1 models, level-2 settings and OOF weighted log loss."""
    metrics = _read_json(paths.stack / METRICS_FILE)
    options = _read_json(paths.stack / STACK_STAMP).get("options", {})
    settings = {k: v for k, v in options.items() if k not in NOT_SETTINGS}
    settings.update(stacker=metrics.get("stacker", settings.get("stacker")),
                    params_source=metrics.get("params_source"),
                    any_rule=(metrics.get("any_rule") or {}).get("applied"))
    return {"source": "stack", "models": " ".join(metrics.get("models", [])),
            "level2": json.dumps(settings, sort_keys=True, separators=(",", ":")),
            "oof_weighted_log_loss": metrics.get("oof_weighted_log_loss")}


def model_facts(paths: WorkPaths, model: str) -> dict[str, Any]:
    """One level-1 model straight to a submission: no level 2; its pooled OOF weighted log loss."""
    metrics = _read_json(paths.model_dir(model) / METRICS_FILE)
    return {"source": model, "models": model, "level2": "",
            "oof_weighted_log_loss": (metrics.get("pooled") or {}).get("weighted_log_loss")}


def record_written(paths: WorkPaths, file: Path, model: str | None) -> dict[str, Any]:
    """Remember what ``file`` (just written) came from, under its sha256; returns the facts."""
    facts = model_facts(paths, model) if model else stack_facts(paths)
    record = _read_json(paths.root / RECORD_FILE)
    record[file_sha256(file)] = {**facts, "file": str(file)}
    write_json(paths.root / RECORD_FILE, record)
    return facts


def facts_for(paths: WorkPaths | None, sha256: str) -> dict[str, Any]:
    """The recorded facts of the file with this content, or UNKNOWN (written elsewhere, or edited)."""
    if paths is None:
        return dict(UNKNOWN)
    found = _read_json(paths.root / RECORD_FILE).get(sha256)
    return {k: found.get(k, v) for k, v in UNKNOWN.items()} if isinstance(found, dict) else dict(UNKNOWN)
