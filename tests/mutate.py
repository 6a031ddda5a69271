"""`make mutate`: mutmut 3 on the core modules, each against only its fast relevant tests.

Each module runs in its own scratch copy of the working tree (mutmut writes a `mutants/` folder and
reads its configuration from setup.cfg, so one copy per module keeps them apart), under a wall-clock
budget; mutants not reached within it are reported as not run, never as killed. Prints one line per
module: `mutate <module>: killed/total (score %)`, where total counts the mutants that ran.

    python tests/mutate.py [--modules metric,folds] [--budget 300] [--jobs 2] [--keep DIR]
"""
from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("competition", "features", "level1_models", "level2_stacking", "prediction", "reports", "submissions")


@dataclass(frozen=True)
class Target:
    path: str  # the file to mutate
    tests: tuple[str, ...]  # its fast relevant tests
    only: str = ""  # mutmut mutant-name glob: just these functions ("" = the whole file)


TARGETS: dict[str, Target] = {
    "metric": Target("competition/metric.py", ("tests/test_metric.py",)),
    "dicom": Target("competition/dicom.py", ("tests/test_dicom.py",)),
    "folds": Target("competition/folds.py", ("tests/test_folds.py",)),
    "tabular": Target("features/tabular.py", ("tests/test_tabular_features.py",)),
    "bundle": Target("prediction/bundle.py", ("tests/test_bundle_safety.py",)),
    # the fold split of level 1: FoldData.build decides each fold's training and validation ids
    "fold_split": Target("level1_models/train.py", ("tests/test_train.py::test_fold_data_trains_only_on_other_folds",
                                                    "tests/test_train.py::test_no_fold_model_sees_its_validation_labels",
                                                    "tests/test_level1_runs.py::test_unreadable_images_are_not_trained_on_and_get_the_prior"),
                         "*FoldData*build*"),
    "blend": Target("level2_stacking/blend.py", ("tests/test_stacker.py::test_blend_weights_and_the_any_rule",
                                                "tests/test_blend_weights.py")),
}

DETECTED = {"killed", "timeout", "segfault", "caught by type check"}


def setup_cfg(t: Target) -> str:
    def block(key: str, values: list[str]) -> str:
        return f"{key} =\n" + "".join(f"    {v}\n" for v in values)
    return ("[mutmut]\n" + f"source_paths = {t.path.split('/')[0]}\nonly_mutate = {t.path}\n"
            + block("also_copy", [*PACKAGES, "conftest.py"])
            + block("pytest_add_cli_args_test_selection", list(t.tests))
            + block("pytest_add_cli_args", ["-m", "not slow", "-p", "no:cacheprovider", "-x", "-q"])
            + "use_git_change_detection = false\n")


def scratch_copy(dest: Path) -> None:
    """The working tree's tracked and unignored files (uncommitted edits included), venv linked."""
    listed = subprocess.run(["git", "ls-files", "-co", "--exclude-standard", "-z"], cwd=ROOT, check=True,
                            capture_output=True).stdout.decode().split("\0")
    for rel in filter(None, listed):
        src = ROOT / rel
        if src.is_file() and not src.is_symlink() and rel.split("/")[0] in PACKAGES + ("tests",) or rel in (
                "pyproject.toml", "conftest.py"):
            (dest / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / rel)
    (dest / ".venv").symlink_to((ROOT / ".venv").resolve())


def statuses(workdir: Path, mutmut: str) -> dict[str, str]:
    out = subprocess.run([mutmut, "results", "--all", "true"], cwd=workdir, capture_output=True, text=True)
    found = {}
    for line in out.stdout.splitlines():
        name, sep, status = line.strip().rpartition(": ")
        if sep and "__mutmut_" in name:
            found[name] = status.strip()
    return found


def run_target(name: str, t: Target, budget: int, jobs: int, keep: Path | None) -> tuple[int, int, int, list[str]]:
    workdir = (keep / name) if keep else Path(tempfile.mkdtemp(prefix=f"mutate-{name}-"))
    if keep and workdir.exists():
        shutil.rmtree(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    scratch_copy(workdir)
    (workdir / "setup.cfg").write_text(setup_cfg(t))
    mutmut = str(ROOT / ".venv" / "bin" / "mutmut")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONDONTWRITEBYTECODE": "1"}
    cmd = [mutmut, "run", "--max-children", str(jobs)] + ([t.only] if t.only else [])
    try:
        subprocess.run(cmd, cwd=workdir, env=env, timeout=budget, stdout=subprocess.DEVNULL,
                       stderr=subprocess.DEVNULL)
    except subprocess.TimeoutExpired:
        pass  # the budget is spent: count what finished
    found = statuses(workdir, mutmut)
    if t.only:  # mutmut lists every mutant of the file; keep the chosen functions'
        import fnmatch
        found = {k: v for k, v in found.items() if fnmatch.fnmatch(k, t.only)}
    ran = {k: v for k, v in found.items() if v not in ("not checked", "skipped")}
    killed = sum(v in DETECTED for v in ran.values())
    survivors = sorted(k for k, v in ran.items() if v not in DETECTED and v != "no tests")
    untested = sum(v == "no tests" for v in ran.values())
    if not keep:
        shutil.rmtree(workdir, ignore_errors=True)
    return killed, len(ran), len(found) - len(ran), untested, survivors


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--modules", default=",".join(TARGETS), help=f"comma list of {', '.join(TARGETS)}")
    ap.add_argument("--budget", type=int, default=600, help="seconds per module (wall clock)")
    ap.add_argument("--jobs", type=int, default=os.cpu_count() or 1, help="mutants tested at once")
    ap.add_argument("--keep", type=Path, help="keep each module's scratch copy here (mutmut show <name>)")
    args = ap.parse_args(argv)
    names = [m for m in args.modules.replace(",", " ").split() if m]
    unknown = [m for m in names if m not in TARGETS]
    if unknown:
        ap.error(f"unknown module(s) {', '.join(unknown)}; choose from {', '.join(TARGETS)}")
    for name in names:
        killed, total, not_run, untested, survivors = run_target(name, TARGETS[name], args.budget, args.jobs, args.keep)
        score = 100.0 * killed / total if total else 0.0
        extra = f", {untested} in code its tests never reach" if untested else ""
        extra += f", {not_run} not run within {args.budget} s" if not_run else ""
        print(f"mutate {name}: {killed}/{total} ({score:.0f} %){extra}", flush=True)
        by_function: dict[str, list[str]] = {}
        for s in survivors:
            function, _, number = s.rpartition("__mutmut_")
            by_function.setdefault(function, []).append(number)
        for function, numbers in by_function.items():
            print(f"  survived in {function}: {', '.join(numbers)}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
