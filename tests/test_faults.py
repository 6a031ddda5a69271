"""Faults of a run of days: each known failure is one line, a non-zero exit, and finished work kept.

Read-only and full disks use a small tmpfs where this test may mount one (root), else a chmod or a
mocked ENOSPC; concurrent runs, killed parents and dead workers are real processes.
"""
from __future__ import annotations

import contextlib
import errno
import os
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path

import pandas as pd
import pytest

from competition.__main__ import main as competition_main
from competition.cli import run_main
from competition.locks import LockHeldError, stage_lock
from conftest import REPO
from dicom_factory import write_mini_competition


def cli(*args: str, cwd: Path = REPO) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "competition", *args], cwd=cwd, capture_output=True, text=True,
                          env={**os.environ, "RSNA_DEBUG": ""})


def one_line_error(stderr: str) -> str:
    lines = [line for line in stderr.splitlines() if line.strip() and "it/s]" not in line and "file/s]" not in line]
    assert len(lines) == 1, stderr
    assert "Traceback" not in stderr
    return lines[0]


def in_process(main, argv: list[str], capsys) -> tuple[int, str]:
    code = run_main(main, argv, prog="competition")
    return code, capsys.readouterr().err


@contextlib.contextmanager
def tmpfs(path: Path, size: str) -> Iterator[None]:
    """A small tmpfs at ``path`` (skips the test where mounting is not allowed)."""
    path.mkdir(parents=True, exist_ok=True)
    if os.geteuid() != 0 or subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)],
                                           capture_output=True).returncode != 0:
        pytest.skip("cannot mount a tmpfs here (needs root)")
    try:
        yield
    finally:
        subprocess.run(["umount", "-l", str(path)], check=False)


def snapshot(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in folder.glob("*.parquet")}


# --- read-only folder --------------------------------------------------------------------------
def test_read_only_work_folder_is_one_line_and_keeps_finished_work(tmp_path):
    data = write_mini_competition(tmp_path / "mini")
    work = tmp_path / "work"
    with tmpfs(work, "4m"):
        assert cli("prepare", "--data", str(data), "--work", str(work), "--workers", "1", "--n-folds", "3").returncode == 0
        before = snapshot(work)
        subprocess.run(["mount", "-o", "remount,ro", str(work)], check=True)
        result = cli("prepare", "--data", str(data), "--work", str(work), "--workers", "1", "--n-folds", "3", "--force")
        assert result.returncode == 2
        line = one_line_error(result.stderr)
        assert "read-only file system" in line and str(work) in line and "WORK=" in line
        assert snapshot(work) == before and set(before) == {"metadata.parquet", "labels.parquet", "folds.parquet"}


def test_permission_denied_names_the_file_and_the_fix(tmp_path, capsys):
    def main(argv):
        raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(tmp_path / "cache" / "hu.int16"))

    code, err = in_process(main, [], capsys)
    line = one_line_error(err)
    assert code == 2 and "permission denied" in line and "hu.int16" in line and "WORK=" in line


# --- full disk ---------------------------------------------------------------------------------
def test_enospc_mid_metadata_keeps_finished_parts_and_resumes(tmp_path, capsys, monkeypatch):
    import competition.metadata as metadata
    data = write_mini_competition(tmp_path / "mini", patients=6, slices=4)
    work = tmp_path / "work"
    monkeypatch.setattr(metadata, "CHUNK", 5)  # 25 files -> 5 parts
    real_to_parquet = pd.DataFrame.to_parquet

    def disk_fills_at_part_2(frame, path, *args, **kwargs):
        if ".part-000002.parquet.tmp-" in str(path):
            Path(path).write_bytes(b"PAR1 half a part")
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real_to_parquet(frame, path, *args, **kwargs)

    monkeypatch.setattr(pd.DataFrame, "to_parquet", disk_fills_at_part_2)
    argv = ["metadata", "--data", str(data), "--work", str(work), "--workers", "1"]
    code, err = in_process(competition_main, argv, capsys)
    line = one_line_error(err)
    assert code == 2 and "no space left on the device" in line and "part-000002.parquet" in line, line
    assert "free" in line and "finished work is kept" in line
    parts = work / "metadata.parquet.parts"
    assert sorted(p.name for p in parts.iterdir()) == ["part-000000.parquet", "part-000001.parquet"]  # no half file

    monkeypatch.setattr(pd.DataFrame, "to_parquet", real_to_parquet)
    read: list[int] = []
    real_read = metadata.read_headers
    monkeypatch.setattr(metadata, "read_headers", lambda root, files: read.append(len(files)) or real_read(root, files))
    code, err = in_process(competition_main, argv, capsys)
    assert code == 0, err
    assert sum(read) == 25 - 10  # only what was not finished is read again
    resumed = pd.read_parquet(work / "metadata.parquet")
    fresh = metadata.build_metadata(data, tmp_path / "fresh" / "metadata.parquet", workers=1, progress=False)
    pd.testing.assert_frame_equal(resumed, fresh)
    assert not parts.exists()


def test_full_tmpfs_is_one_line_then_resumes_when_space_is_freed(tmp_path):
    data = write_mini_competition(tmp_path / "mini", broken=True)
    work = tmp_path / "work"
    args = ["prepare", "--data", str(data), "--work", str(work), "--workers", "1", "--n-folds", "3"]
    with tmpfs(work, "1m"):
        filler = work / "filler"
        with open(filler, "wb", buffering=0) as f:  # fill the disk, then leave a few KiB: the tables do not fit
            with contextlib.suppress(OSError):
                while True:
                    f.write(b"\0" * 4096)
        os.truncate(filler, filler.stat().st_size - 8192)
        result = cli(*args)
        assert result.returncode == 2
        line = one_line_error(result.stderr)
        assert "no space left on the device" in line and str(work) in line, line
        filler.unlink()
        result = cli(*args)
        assert result.returncode == 0, result.stderr
        folds = pd.read_parquet(work / "folds.parquet")
        assert len(folds) == 18 and folds["fold"].nunique() == 3
        assert "ID_eeeeeeeee" in (work / "bad_files.csv").read_text()
        assert not list(work.rglob(".*.tmp-*"))


def test_free_space_check_names_needed_free_folder_and_fix(tmp_path):
    from competition.diskspace import NotEnoughSpaceError, check_free_space

    free = check_free_space(tmp_path, 1)
    with pytest.raises(NotEnoughSpaceError) as info:
        check_free_space(tmp_path / "not" / "yet", free * 2, "the 256 px cache")
    message = str(info.value)
    assert message.startswith("the 256 px cache needs") and f"in {tmp_path} " in message
    assert "free" in message and "WORK=" in message and "\n" not in message


# --- concurrent runs ---------------------------------------------------------------------------
def test_second_run_reports_the_lock_holder(tmp_path):
    data = write_mini_competition(tmp_path / "mini")
    work = tmp_path / "work"
    with stage_lock(work, "prepare"):
        result = cli("prepare", "--data", str(data), "--work", str(work), "--workers", "1", "--n-folds", "3")
    assert result.returncode == 2
    line = one_line_error(result.stderr)
    assert f"another run holds {work / '.locks' / 'prepare.lock'}, started at " in line
    assert f"pid {os.getpid()} on " in line
    assert not (work / "metadata.parquet").exists()


@contextlib.contextmanager
def held_elsewhere(work: Path, stage: str) -> Iterator[subprocess.Popen]:
    """Another process holding ``stage``'s lock of ``work`` until the block ends."""
    script = f"from competition.locks import stage_lock\nimport time\nwith stage_lock({str(work)!r}, {stage!r}):\n" \
             f"    print('held', flush=True); time.sleep(60)\n"
    holder = subprocess.Popen([sys.executable, "-c", script], cwd=REPO, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        yield holder
    finally:
        holder.kill()
        holder.wait()


@pytest.mark.parametrize("stage, package, argv", [
    ("oof-tiny_resnet-fold0", "level1_models", ["oof", "--model", "tiny_resnet", "--folds", "0"]),
    ("stack", "level2_stacking", []),
])
def test_model_and_stack_runs_take_their_lock(tmp_path, capsys, stage, package, argv):
    import importlib

    main = importlib.import_module(f"{package}.__main__").main
    data = write_mini_competition(tmp_path / "mini", patients=2, slices=1)
    work = tmp_path / "work"
    with held_elsewhere(work, stage) as holder:
        code = run_main(main, [*argv, "--data", str(data), "--work", str(work)], prog=package)
    line = one_line_error(capsys.readouterr().err)
    assert code == 2 and f"another run holds {work / '.locks' / stage}.lock" in line and f"pid {holder.pid} " in line


def test_a_killed_holder_does_not_leave_the_lock_stuck(tmp_path):
    with held_elsewhere(tmp_path, "stack") as holder:
        with pytest.raises(LockHeldError, match=f"pid {holder.pid} on "):
            with stage_lock(tmp_path, "stack"):
                pass
    with stage_lock(tmp_path, "stack"):  # the kernel released it with the process
        with stage_lock(tmp_path, "stack"):  # re-entrant within one process
            pass


def test_concurrent_prepare_one_finishes_other_reports_lock_or_both_correct(tmp_path):
    data = write_mini_competition(tmp_path / "mini", patients=9, slices=6, broken=True)
    work = tmp_path / "work"
    args = [sys.executable, "-m", "competition", "prepare", "--data", str(data), "--work", str(work),
            "--workers", "2", "--n-folds", "3"]
    runs = [subprocess.Popen(args, cwd=REPO, stderr=subprocess.PIPE, stdout=subprocess.PIPE, text=True) for _ in range(2)]
    results = [(r.wait(), r.stderr.read()) for r in runs]
    assert 0 in [code for code, _ in results], results
    for code, err in results:
        if code:
            assert code == 2 and "another run holds" in one_line_error(err)
    metadata = pd.read_parquet(work / "metadata.parquet")
    assert len(metadata) == 9 * 6 + 1 and metadata["image_id"].is_unique
    assert len(pd.read_parquet(work / "folds.parquet")) == 9 * 6
    assert "ID_eeeeeeeee" in (work / "bad_files.csv").read_text()
    assert not (work / "metadata.parquet.parts").exists() and not list(work.rglob(".*.tmp-*"))


def test_bad_files_list_keeps_every_stage_under_concurrent_writers(tmp_path):
    csv = tmp_path / "bad_files.csv"
    start = time.time() + 4  # after every interpreter has started: the writers overlap
    script = textwrap.dedent(f"""
        import sys, time
        from competition.badfiles import record_bad_files
        name = sys.argv[1]
        time.sleep(max(0.0, {start} - time.time()))
        for i in range(15):  # a stage of its own per write: every entry must survive
            record_bad_files({str(csv)!r}, [{{"image_id": f"ID_{{name}}{{i}}", "path": "p", "reason": "r"}}], f"{{name}}{{i}}")
    """)
    writers = [subprocess.Popen([sys.executable, "-c", script, s], cwd=REPO) for s in ("a", "b", "c")]
    assert [w.wait() for w in writers] == [0, 0, 0]
    assert len(pd.read_csv(csv)) == 3 * 15  # none lost to a read-modify-write race


# --- worker pools and a killed parent ----------------------------------------------------------
PARENT = """
import os, sys, time
from concurrent.futures import ProcessPoolExecutor
from competition.pools import worker_pool

def work(folder):
    open(os.path.join(folder, str(os.getpid())), "w").close()
    time.sleep(60)

if __name__ == "__main__":
    pool = worker_pool(2) if sys.argv[2] == "worker_pool" else ProcessPoolExecutor(2)
    for _ in range(2):
        pool.submit(work, sys.argv[1])
    time.sleep(60)
"""


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError):
        return False
    return state not in ("Z", "X")


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="needs /proc")
@pytest.mark.parametrize("pool, survive", [("worker_pool", False), ("ProcessPoolExecutor", True)])
def test_workers_do_not_outlive_a_killed_parent(tmp_path, pool, survive):
    script = tmp_path / "parent.py"
    script.write_text(PARENT)
    pids = tmp_path / "pids"
    pids.mkdir()
    parent = subprocess.Popen([sys.executable, str(script), str(pids), pool], cwd=REPO,
                              env={**os.environ, "PYTHONPATH": str(REPO)})
    workers: list[int] = []
    try:
        deadline = time.monotonic() + 30
        while len(workers) < 2 and time.monotonic() < deadline:
            workers = [int(p.name) for p in pids.iterdir()]
            time.sleep(0.05)
        assert len(workers) == 2 and all(alive(w) for w in workers)
        parent.send_signal(signal.SIGKILL)
        parent.wait()
        deadline = time.monotonic() + 5
        while any(alive(w) for w in workers) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert any(alive(w) for w in workers) == survive  # plain pools leave orphans: the guard matters
    finally:
        for w in workers:
            with contextlib.suppress(ProcessLookupError):
                os.kill(w, signal.SIGKILL)


def _kill_myself(_: int) -> None:
    os.kill(os.getpid(), signal.SIGKILL)


def test_dead_pool_worker_is_one_line(capsys):
    from competition.pools import worker_pool

    def main(argv):
        with worker_pool(1) as pool:
            pool.submit(_kill_myself, 0).result()

    code, err = in_process(main, [], capsys)
    line = one_line_error(err)
    assert code == 2 and "worker process died" in line and "WORKERS=" in line


class _DyingDataset:
    def __len__(self) -> int:
        return 4

    def __getitem__(self, i: int) -> int:
        os.kill(os.getpid(), signal.SIGKILL)
        return i


def test_dead_dataloader_worker_is_one_line(capsys):
    torch = pytest.importorskip("torch")

    def main(argv):
        list(torch.utils.data.DataLoader(_DyingDataset(), num_workers=1, timeout=30))

    code, err = in_process(main, [], capsys)
    line = one_line_error(err)
    assert code == 2 and "DataLoader worker died" in line and "BATCH" in line


# --- corrupt checkpoints -----------------------------------------------------------------------
class _Evil:
    def __reduce__(self):
        return (os.system, ("echo owned",))


@pytest.mark.parametrize("kind", ["garbage", "truncated", "malicious", "empty"])
def test_corrupt_checkpoint_is_one_line_naming_the_file(tmp_path, capsys, kind):
    torch = pytest.importorskip("torch")
    good = tmp_path / "fold0" / "best.pt"
    good.parent.mkdir()
    torch.save({"model": {"w": torch.arange(1000.0)}, "epoch": 3}, good)
    bad = tmp_path / "fold1" / "last.pt"
    bad.parent.mkdir()
    content = {"garbage": b"\x80\x04not a checkpoint" * 50, "truncated": good.read_bytes()[: good.stat().st_size // 2],
               "empty": b""}
    if kind == "malicious":
        torch.save({"model": _Evil()}, bad)
    else:
        bad.write_bytes(content[kind])
    good_bytes = good.read_bytes()

    def main(argv):
        torch.load(bad, map_location="cpu", weights_only=True)

    code, err = in_process(main, [], capsys)
    line = one_line_error(err)
    assert code == 2 and f"{bad} is not a readable checkpoint" in line and "delete it" in line
    cause = {"garbage": "Unsupported operand", "truncated": "failed finding central directory",
             "malicious": "GLOBAL posix.system", "empty": "ends early"}[kind]
    assert f"({cause}" in line or cause in line.split("(", 1)[1], line
    assert good.read_bytes() == good_bytes and torch.load(good, weights_only=True)["epoch"] == 3


# --- the wrapper itself ------------------------------------------------------------------------
def test_debug_flag_or_variable_shows_the_traceback(capsys, monkeypatch):
    seen: list[list[str]] = []

    def main(argv):
        seen.append(argv)
        raise OSError(errno.EROFS, os.strerror(errno.EROFS), "/somewhere/x.parquet")

    assert run_main(main, ["--n", "1"], prog="x") == 2
    with pytest.raises(OSError):
        run_main(main, ["--debug", "--n", "1"], prog="x")
    assert seen[-1] == ["--n", "1"]  # the flag is the wrapper's, not the command's
    monkeypatch.setenv("RSNA_DEBUG", "1")
    with pytest.raises(OSError):
        run_main(main, [], prog="x")


def test_unknown_errors_keep_their_traceback():
    def main(argv):
        return 1 // 0

    with pytest.raises(ZeroDivisionError):
        run_main(main, [], prog="x")


def test_every_package_entry_point_uses_the_wrapper():
    for package in ("competition", "features", "level1_models", "level2_stacking", "submissions"):
        source = (REPO / package / "__main__.py").read_text()
        assert "run_main(" in source, package


# --- small edges -------------------------------------------------------------------------------
def test_failed_input_check_leaves_no_empty_work_folder(tmp_path):
    result = cli("prepare", "--data", str(tmp_path / "absent"), "--work", str(tmp_path / "w"))
    assert result.returncode == 2 and "does not exist" in one_line_error(result.stderr)
    assert not (tmp_path / "w").exists()


def test_img_size_below_the_backbones_minimum_is_refused():
    from level1_models.config import build_config
    from level1_models.registry import MIN_IMG_SIZE

    with pytest.raises(ValueError, match=f"img_size must be >= {MIN_IMG_SIZE} px"):
        build_config("tiny_resnet", {"img_size": 7})
    assert build_config("tiny_resnet", {"img_size": MIN_IMG_SIZE}).img_size == MIN_IMG_SIZE


def test_benchmark_skips_unreadable_files_and_says_so(tmp_path, capsys):
    from features.bench import readable_only

    data = write_mini_competition(tmp_path / "mini", patients=1, slices=3)
    victim = data / "stage_2_train" / "ID_000000001.dcm"
    victim.write_bytes(victim.read_bytes()[:-10])  # truncated pixel data, as the demo's own file
    sample = pd.DataFrame({"path": sorted(p.relative_to(data).as_posix() for p in (data / "stage_2_train").iterdir())})
    kept = readable_only(sample, data)
    assert len(kept) == 2 and "ID_000000001" not in " ".join(kept["path"])
    assert "bench_skipped: 1 unreadable files (first: stage_2_train/ID_000000001.dcm" in capsys.readouterr().out


def test_make_synthetic_honours_data():
    dry = subprocess.run(["make", "-n", "-s", "synthetic", "DATA=elsewhere/x", "PRESET=tiny"], cwd=REPO,
                         capture_output=True, text=True)
    assert "--out elsewhere/x --preset tiny" in dry.stdout
    default = subprocess.run(["make", "-n", "-s", "synthetic"], cwd=REPO, capture_output=True, text=True,
                             env={k: v for k, v in os.environ.items() if k != "DATA"})
    assert "--out data/synthetic " in default.stdout


@pytest.mark.slow
def test_tiny_preset_prepares_as_the_readme_says(tmp_path):
    data, work = tmp_path / "tiny", tmp_path / "work"
    common = [f"DATA={data}", f"WORK={work}", "WORKERS=1"]
    make = lambda *a: subprocess.run(["make", "-s", *a, *common], cwd=REPO, capture_output=True, text=True)  # noqa: E731
    assert make("synthetic", "PRESET=tiny").returncode == 0
    first = make("prepare", "CACHE_SIZE=64")
    assert first.returncode != 0
    assert "--n-folds 2; make prepare N_FOLDS=2" in first.stderr
    second = make("prepare", "N_FOLDS=2", "CACHE_SIZE=64")
    assert second.returncode == 0, second.stderr
    assert pd.read_parquet(work / "folds.parquet")["fold"].nunique() == 2


@pytest.mark.parametrize("name", ["metadata.parquet", "metrics.json"])
def test_damaged_table_or_json_names_the_file(tmp_path, capsys, name):
    import json

    damaged = tmp_path / name
    damaged.write_bytes(b"PAR1 half a file")

    def main(argv):
        path = damaged
        return pd.read_parquet(path) if name.endswith(".parquet") else json.loads(path.read_text())

    code, err = in_process(main, [], capsys)
    line = one_line_error(err)
    assert code == 2 and f"{damaged} is damaged" in line and "delete it" in line


def test_cache_build_checks_free_space_first_and_takes_its_lock(tmp_path, capsys, monkeypatch):
    from collections import namedtuple

    import competition.diskspace as diskspace
    from competition.metadata import build_metadata
    from features.__main__ import main as features_main

    data = write_mini_competition(tmp_path / "mini")
    work = tmp_path / "work"
    argv = ["cache", "--data", str(data), "--work", str(work), "--workers", "1", "--size", "64", "--no-progress"]
    build_metadata(data, work / "metadata.parquet", workers=1, progress=False)
    Usage = namedtuple("Usage", "total used free")
    monkeypatch.setattr(diskspace.shutil, "disk_usage", lambda p: Usage(2**40, 2**40 - 2**23, 2**23))
    code = run_main(features_main, argv, prog="features")
    line = one_line_error(capsys.readouterr().err)
    assert code == 2 and "the 64 px cache (19 slices) needs" in line and "8.0 MiB is free" in line, line
    assert str(work / "cache" / "64px") in line and "WORK=" in line
    assert pd.read_parquet(work / "metadata.parquet")["image_id"].nunique() == 19  # the finished table is kept
    monkeypatch.undo()
    with held_elsewhere(work, "cache-64px") as holder:
        code = run_main(features_main, argv, prog="features")
    assert code == 2 and f"pid {holder.pid} " in one_line_error(capsys.readouterr().err)
    assert run_main(features_main, argv, prog="features") == 0


def test_cache_write_on_a_full_disk_is_one_line_and_resumes(tmp_path, capsys, monkeypatch):
    import features.cache as cache
    from competition.metadata import build_metadata
    from features.__main__ import main as features_main

    data = write_mini_competition(tmp_path / "mini", patients=6, slices=3)
    work = tmp_path / "work"
    argv = ["cache", "--data", str(data), "--work", str(work), "--workers", "1", "--size", "64", "--no-progress"]
    monkeypatch.setattr(cache, "CHUNK", 3)  # a task per series: some finish before the disk is full
    monkeypatch.setattr(cache, "check_free_space", lambda *a, **k: 0)  # let the writes meet the full disk
    with tmpfs(work, "1m"):
        build_metadata(data, work / "metadata.parquet", workers=1, progress=False)
        filler = work / "filler"
        with open(filler, "wb", buffering=0) as f:
            with contextlib.suppress(OSError):
                while True:
                    f.write(b"\0" * 4096)
        os.truncate(filler, filler.stat().st_size - 16 * 4096)  # a few slices and their row files, not 19
        code = run_main(features_main, argv, prog="features")
        line = one_line_error(capsys.readouterr().err)
        assert code == 2 and "no space left on the device" in line, line
        done = len(cache.ImageCache(work / "cache", 64))
        assert 0 < done < 19  # what finished before the disk filled is kept
        filler.unlink()
        assert run_main(features_main, argv, prog="features") == 0
        resumed = cache.ImageCache(work / "cache", 64)
        assert len(resumed) == 19
        fresh_dir = tmp_path / "fresh"
        cache.build_cache(data, pd.read_parquet(work / "metadata.parquet"), fresh_dir, size=64, workers=1, progress=False)
        fresh = cache.ImageCache(fresh_dir, 64)
        for image_id in fresh.ids:
            assert (resumed.read_hu(image_id) == fresh.read_hu(image_id)).all()
