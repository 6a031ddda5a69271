"""The rehearsal: every stage of the pipeline, with the real code, on a competition of SCALE x the
real counts, each stage measured in its own child process.

Each stage prints ``rehearsal <stage>: <seconds> s, peak <MiB> MiB, <rows> rows, <MiB> MiB
written`` and keeps its figures in <dir>/stages/<stage>.json: a rerun skips a finished stage and
prints its line again (as `make demo`). <dir>/rehearsal.json holds every line's figures and two
extrapolations, by the rules in RULES.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import pyarrow.parquet as pq

from competition.paths import WorkPaths
from rehearsal.level1 import WIDTHS
from rehearsal.shape import counts

CNN = "tiny_resnet"
EFFICIENCY = 0.6  # parallel efficiency from here to 16 cores (level2_stacking.bench assumes the same)
RULES = {
    "cores_16": f"parallel stages (generate, metadata, cache, level1_cnn, level2): seconds x cores used here / "
                f"(16 x {EFFICIENCY}); the others are serial and keep their time",
    "scale_1": "start-up + (time - start-up) / SCALE, linear in rows above a fixed start-up of one baseline "
               "process per command; peak = baseline + (peak - baseline) / SCALE; the baseline is a process that "
               "only imports numpy, pandas and pyarrow (its time and peak are in baseline): stages that import "
               "torch or lightgbm as well are over-estimated by their import's cost / SCALE (on the safe side)",
}
# Level 2 in the rehearsal: the real code with fewer boosting rounds and sequence epochs than
# make stack's defaults (early stopping with patience 100 over up to 5,000 rounds, then a refit on
# every training fold; 20 sequence epochs, work for a GPU), so that the whole rehearsal fits a session
# on 2 cores. Without early stopping each fold trains once (with it, at 100 rounds: about 15 min a
# fold at SCALE=1 on 2 cores). Memory depends on neither. The summary gives LightGBM's seconds per
# 100 rounds (where early stopping ends is the data's to say) and scales the sequence model's time to
# the default epochs (level2_defaults).
STACK_OPTS = "--rounds 100 --early-stopping 0 --seq-epochs 2"
# Disk per image: a 64 px DICOM (8.8 kB, 12 KiB on disk) and its cache slice (7.4 KiB measured),
# plus the five fabricated models' float16 embeddings (see warn).
DISK_PER_IMAGE_KIB = 12 + 8
# The time estimate, from the 2-core machine (2026-12-05) with the default STACK_OPTS: SCALE=1 took
# 3,162 s for 874,035 images (3.6 s per 1,000); SCALE=0.01 took 119-135 s in clean-clone CI runs
# (4 min 15 s on a loaded machine), nearly all of it fixed costs (imports, process start-ups,
# torch's first batches): 180 s of them is on the safe side.
STARTUP_SECONDS = 180.0
SECONDS_PER_1000_IMAGES = 3.6


@dataclass
class Stage:
    name: str
    commands: list[list[str]]
    rows: callable
    parallel: bool = False
    before: callable = field(default=lambda: None)


def _rows(path: Path) -> int:
    return pq.read_metadata(path).num_rows if path.is_file() else 0


def _size_mib(*paths: Path) -> float:
    total = 0
    for root in paths:
        if root.is_file():
            total += root.stat().st_size
        for d, _, files in os.walk(root):
            total += sum(os.stat(os.path.join(d, f)).st_blocks * 512 for f in files)
    return total / 2**20


@dataclass
class Rehearsal:
    root: Path
    scale: float
    workers: int
    limit: int
    stack_opts: list[str]
    size: int = 64

    @property
    def data(self) -> Path:
        return self.root / "data"

    @property
    def paths(self) -> WorkPaths:
        return WorkPaths(self.root / "work")

    def _py(self, *args: str) -> list[str]:
        return [sys.executable, *args]

    def _dw(self) -> list[str]:
        return ["--data", str(self.data), "--work", str(self.paths.root)]

    def _submission(self) -> Path:
        return self.root / "submissions" / f"{self.data.name}-stack.csv.gz"

    def _study(self) -> Path:
        return self.root / "study"

    def _copy_study(self) -> None:
        """One test series' files into <dir>/study (the folder a user hands `make predict`)."""
        import pandas as pd

        meta = pd.read_parquet(self.paths.metadata, columns=["image_id", "split", "series_id"])
        test = meta[meta["split"] == "test"]
        series = sorted(test["series_id"].unique())[0]
        shutil.rmtree(self._study(), ignore_errors=True)
        self._study().mkdir(parents=True)
        for image_id in test.loc[test["series_id"] == series, "image_id"]:
            shutil.copy(self.data / "stage_2_test" / f"{image_id}.dcm", self._study())

    def stages(self) -> list[Stage]:
        p, w, dw = self.paths, str(self.workers), self._dw()
        models = ",".join(WIDTHS)
        cnn = p.model_dir(CNN) / "fold0"
        return [
            Stage("generate", [self._py("-m", "rehearsal", "generate", "--out", str(self.data), "--scale",
                                        str(self.scale), "--size", str(self.size), "--workers", w)],
                  lambda: json.loads((self.data / "REHEARSAL_OK").read_text())["files"], parallel=True),
            Stage("metadata", [self._py("-m", "competition", "metadata", *dw, "--workers", w)],
                  lambda: _rows(p.metadata), parallel=True),
            Stage("labels", [self._py("-m", "competition", "labels", *dw)], lambda: _rows(p.labels)),
            Stage("folds", [self._py("-m", "competition", "folds", *dw)], lambda: _rows(p.folds)),
            Stage("cache", [self._py("-m", "features", "cache", *dw, "--size", str(self.size), "--workers", w,
                                     "--no-progress")], lambda: _rows(p.metadata), parallel=True),
            Stage("level1_fabricated", [self._py("-m", "rehearsal", "fabricate", *dw)],
                  lambda: sum(_rows(p.model_dir(m) / f"fold{k}" / t) for m in WIDTHS for k in range(5)
                              for t in ("oof.parquet", "test.parquet"))),
            Stage("level1_cnn", [self._py("-m", "level1_models", "oof", "--model", CNN, *dw, "--folds", "0",
                                          "--epochs", "1", "--limit", str(self.limit), "--device", "cpu",
                                          "--workers", w),
                                 self._py("-m", "reports.plots", *dw, "--model", CNN, "--skip-missing")],
                  lambda: _rows(cnn / "oof.parquet") + _rows(cnn / "test.parquet"), parallel=True),
            Stage("level2", [self._py("-m", "level2_stacking", *dw, "--models", models, "--no-progress",
                                      *self.stack_opts)],
                  lambda: _rows(p.stack / "oof.parquet") + _rows(p.stack / "test.parquet"), parallel=True),
            Stage("submission", [self._py("-m", "submissions", "write", *dw, "--stack", "--out-dir",
                                          str(self._submission().parent)),
                                 self._py("-m", "submissions", "validate", str(self._submission()),
                                          "--data", str(self.data))],
                  lambda: _csv_rows(self._submission())),
            Stage("predict", [self._py("-m", "prediction", "predict", "--study", str(self._study()), *dw,
                                       "--models", CNN, "--out", str(self.root / "predict"), "--device", "cpu")],
                  lambda: len(list(self._study().glob("*.dcm"))), before=self._copy_study),
            Stage("report", [self._py("-m", "reports.plots", *dw, "--stack"),
                             self._py("-m", "reports.html_report", *dw)],
                  lambda: _rows(p.stack / "oof.parquet")),
        ]


def _csv_rows(path: Path) -> int:
    import pandas as pd

    return len(pd.read_csv(path, usecols=["ID"])) if path.is_file() else 0


def line(stage: str, r: dict) -> str:
    return (f"rehearsal {stage}: {r['seconds']:.1f} s, peak {r['peak_mib']:.0f} MiB, {r['rows']} rows, "
            f"{r['written_mib']:.1f} MiB written")


def _measure(commands: list[list[str]], result: Path) -> dict:
    proc = subprocess.run([sys.executable, "-m", "rehearsal.measure", str(result), json.dumps(commands)])
    return json.loads(result.read_text()) | {"returncode": proc.returncode}


def baseline(root: Path) -> dict:
    """Time and peak memory of a process that imports numpy, pandas and pyarrow, nothing else."""
    probe = [sys.executable, "-c", "import numpy, pandas, pyarrow"]
    return _measure([probe], root / "stages" / ".baseline.json")


def warn(scale: float, root: Path) -> str:
    n_train, n_test = counts(scale)
    n = n_train + n_test
    embeddings = (n_train + 5 * n_test) * sum(WIDTHS.values()) * 2  # OOF once, test once per fold model
    disk_gib = (n * DISK_PER_IMAGE_KIB * 2**10 + embeddings) / 2**30
    hours = (STARTUP_SECONDS + n / 1000 * SECONDS_PER_1000_IMAGES) / 3600
    where = next(p for p in (root, *root.absolute().parents) if p.exists())
    free_gib = shutil.disk_usage(where).free / 2**30
    return (f"rehearsal at SCALE={scale:g}: {n:,} images; needs about {disk_gib:.0f} GiB of disk ({free_gib:.0f} GiB "
            f"free here) and about {hours:.1f} h on a 2-core machine (estimate; see rehearsal.run)")


def run(root: Path, scale: float, *, workers: int, limit: int, stack_opts: list[str]) -> dict:
    reh = Rehearsal(root, scale, workers, limit, stack_opts)
    (root / "stages").mkdir(parents=True, exist_ok=True)
    print(warn(scale, root), flush=True)
    results: dict[str, dict] = {}
    for stage in reh.stages():
        done = root / "stages" / f"{stage.name}.json"
        if done.is_file():
            results[stage.name] = json.loads(done.read_text())
            print(line(stage.name, results[stage.name]) + " (done before)", flush=True)
            continue
        measured_dirs = [reh.data] if stage.name == "generate" else [reh.paths.root, root / "submissions",
                                                                      root / "predict"]
        stage.before()
        size0 = _size_mib(*measured_dirs)
        r = _measure(stage.commands, root / "stages" / f".{stage.name}.run.json")
        if r["returncode"]:
            raise SystemExit(f"rehearsal: stage '{stage.name}' failed (exit {r['returncode']}, see above); "
                             f"fix it and run again: finished stages are kept")
        r |= {"rows": int(stage.rows()), "written_mib": _size_mib(*measured_dirs) - size0,
              "parallel": stage.parallel, "cores": min(workers, os.cpu_count() or 1),
              "commands": len(stage.commands)}
        if stage.name == "level2":
            r["stack_opts"] = stack_opts
        done.write_text(json.dumps(r, indent=1))
        results[stage.name] = r
        print(line(stage.name, r), flush=True)
    return summarize(root, scale, results)


def level2_defaults(metrics_path: Path, stack_opts: list[str]) -> dict:
    """Level 2's LightGBM seconds per 100 rounds (one training per label and fold: x2 with the
    defaults' early-stopping pair and refit) and the sequence model's time scaled linearly to the
    default epochs."""
    from level2_stacking.__main__ import parse_args

    if not metrics_path.is_file():
        return {}
    metrics = json.loads(metrics_path.read_text())
    used, default = parse_args(["--data", ".", *stack_opts]), parse_args(["--data", "."])
    lgbm, seq = metrics.get("lgbm_seconds", 0.0), metrics.get("sequence_seconds", 0.0)
    trainings = 2 if used.early_stopping else 1  # early stopping trains a pair, then refits
    return {"rounds": used.rounds, "seq_epochs": used.seq_epochs, "lgbm_seconds": lgbm, "sequence_seconds": seq,
            "lgbm_seconds_per_100_rounds": lgbm / trainings * 100 / used.rounds,
            "default_seq_epochs": default.seq_epochs,
            "sequence_seconds_at_default_epochs": seq * default.seq_epochs / used.seq_epochs,
            "rule": "LightGBM: seconds / trainings per fold (2 with early stopping) x 100 / rounds run; sequence: "
                    "seconds x default epochs / epochs run"}


def summarize(root: Path, scale: float, results: dict[str, dict]) -> dict:
    base = baseline(root)
    for r in results.values():
        start = min(r["seconds"], base["seconds"] * r.get("commands", 1))
        speedup = r["cores"] / (16 * EFFICIENCY) if r["parallel"] else 1.0
        r["seconds_16_cores"] = r["seconds"] * speedup
        r["seconds_scale_1"] = start + (r["seconds"] - start) / scale
        r["seconds_scale_1_16_cores"] = r["seconds_scale_1"] * speedup
        r["peak_mib_scale_1"] = base["peak_mib"] + max(0.0, r["peak_mib"] - base["peak_mib"]) / scale
    if "generate" in results:
        g = results["generate"]
        g["files_per_s"] = g["rows"] / g["seconds"]
        g["kib_per_file"] = g["written_mib"] * 1024 / max(1, g["rows"])
    total = {k: sum(r[k] for r in results.values()) for k in ("seconds", "seconds_16_cores", "seconds_scale_1",
                                                                "seconds_scale_1_16_cores")}
    summary = {"scale": scale, "images": sum(counts(scale)), "baseline": base, "rules": RULES,
               "stages": results, "total": total,
               "lines": [line(name, r) for name, r in results.items()]}
    if "level2" in results:
        summary["level2_defaults"] = level2_defaults(WorkPaths(root / "work").stack / "metrics.json",
                                                     results["level2"].get("stack_opts", []))
    (root / "rehearsal.json").write_text(json.dumps(summary, indent=1))
    print(f"rehearsal total: {total['seconds']:.0f} s here; at SCALE=1 about {total['seconds_scale_1'] / 3600:.1f} h "
          f"here, {total['seconds_scale_1_16_cores'] / 3600:.1f} h on 16 cores (rules in {root / 'rehearsal.json'})")
    if summary.get("level2_defaults"):
        d = summary["level2_defaults"]
        print(f"rehearsal level2 ran {d['rounds']} rounds and {d['seq_epochs']} sequence epochs: LightGBM "
              f"{d['lgbm_seconds_per_100_rounds']:.0f} s per 100 rounds (x2 with early stopping and refit), the "
              f"sequence model {d['sequence_seconds']:.0f} s ({d['sequence_seconds_at_default_epochs'] / 3600:.1f} h "
              f"at the default {d['default_seq_epochs']} epochs here)", flush=True)
    return summary
