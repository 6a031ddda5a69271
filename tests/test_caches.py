"""Which image cache a model reads, which caches MODELS need, and `make cache MODELS=...`."""
from __future__ import annotations

import os
import subprocess

import pytest

from features.cache import available_sizes, build_cache, expected_cache_bytes
from level1_models.caches import (cache_bytes, cache_size_for, larger_cache_note, needed_cache_sizes, shares,
                                  slowdown)
from conftest import REPO, prepare_tiny_competition


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """The tiny competition prepared with caches at 64 and 128 px."""
    import pandas as pd

    data, paths = prepare_tiny_competition(tmp_path_factory.mktemp("caches"), cache_size=64)
    build_cache(data, pd.read_parquet(paths.metadata), paths.cache, size=128, workers=1, progress=False)
    return data, paths


def test_needed_cache_sizes_of_zoo_specs():
    assert needed_cache_sizes(["tiny_resnet", "small_mobilenet"]) == {128: ["small_mobilenet"], 64: ["tiny_resnet"]}
    # resnet50 at 256 from the 512 px cache would cost each loader worker ~3.5x: it gets its own.
    assert needed_cache_sizes(["resnet50", "efficientnet_b5", "efficientnet_b6"]) == {
        512: ["efficientnet_b6", "efficientnet_b5"], 256: ["resnet50"]}
    # efficientnet_b4 (380 px) shares the 512 px cache built anyway; inceptionv3 (299 px) does not.
    assert needed_cache_sizes(["inceptionv3", "efficientnet_b4", "efficientnet_b6"]) == {
        512: ["efficientnet_b6", "efficientnet_b4"], 299: ["inceptionv3"]}
    assert needed_cache_sizes(["efficientnet_b4"]) == {380: ["efficientnet_b4"]}  # alone: its own size
    assert needed_cache_sizes(["resnet50", "resnet50", "vgg16"]) == {256: ["resnet50", "vgg16"]}


def test_an_unknown_model_names_the_close_ones():
    with pytest.raises(KeyError, match="Did you mean: resnet50"):
        needed_cache_sizes(["resnt50"])


def test_cache_size_for_reads_the_exact_size_else_the_nearest_larger():
    assert cache_size_for(256, [256, 512]) == 256
    assert cache_size_for(380, [256, 512]) == 512
    assert cache_size_for(380, [512, 256, 400]) == 400
    assert cache_size_for(600, [256, 512]) == 512  # too small: CacheDatasets refuses it
    with pytest.raises(FileNotFoundError, match="make prepare"):
        cache_size_for(256, [])


def test_the_rule_follows_the_measured_slowdowns():
    assert slowdown(256, 256) == 1.0
    assert 3.0 < slowdown(256, 512) < 3.7 and 1.6 < slowdown(480, 512) < 2.0  # the bench's figures
    assert not shares(256, 512) and shares(480, 512) and shares(456, 512) and shares(380, 512)
    assert not shares(512, 256)


def test_cache_bytes_is_the_cache_builds_own_estimate():
    assert cache_bytes(256, 1000) == expected_cache_bytes(1000, 256)
    assert 50e9 < cache_bytes(256) < cache_bytes(512) < 300e9  # the real competition


def test_a_run_reading_a_larger_cache_says_what_it_costs(tiny):
    import pandas as pd

    from level1_models.data import CacheDatasets

    data, paths = tiny
    meta, labels = pd.read_parquet(paths.metadata), pd.read_parquet(paths.labels)
    assert CacheDatasets(meta, labels, paths.cache, "brain3", 64, model="tiny_efficientnet").note is None
    shrunk = CacheDatasets(meta, labels, paths.cache, "brain3", 96, model="tiny_efficientnet")
    assert shrunk.cache.size == 128
    assert shrunk.note == larger_cache_note("tiny_efficientnet", 96, 128)
    assert shrunk.note.startswith("tiny_efficientnet reads 96 px inputs from the 128 px cache")
    assert "not measured below 256 px" in shrunk.note and "make cache CACHE_SIZE=96" in shrunk.note
    measured = larger_cache_note("rsna2nd_resnext101_wsl", 384, 512)  # measured there: 189 against 99 items/s
    assert "about 1.9x the loader's time per image" in measured and "make cache CACHE_SIZE=384" in measured


def make(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    return subprocess.run(["make", "-s", *args], cwd=REPO, capture_output=True, text=True, env=env)


def test_make_cache_models_builds_the_sizes_they_read(tiny, tmp_path):
    data, _ = tiny
    work = tmp_path / "work"
    done = make("cache", f"DATA={data}", f"WORK={work}", "WORKERS=1", "MODELS=tiny_resnet, small_mobilenet")
    assert done.returncode == 0, done.stderr
    assert available_sizes(work / "cache") == [64, 128]
    assert "cache 128 px (about 19 GB for the real 874,035 slices): small_mobilenet" in done.stderr


def test_make_cache_with_an_unknown_model_fails_before_any_work(tiny, tmp_path):
    data, _ = tiny
    work = tmp_path / "work"
    failed = make("cache", f"DATA={data}", f"WORK={work}", "MODELS=tiny_resnet,resnt50")
    assert failed.returncode != 0
    errors = [line for line in failed.stderr.splitlines() if "error" in line]
    assert errors[0].startswith("level1_models: error: unknown model 'resnt50'. Did you mean: resnet50")
    assert not work.exists()


def test_cache_sizes_command_exits_2_on_an_unknown_model(capsys):
    from competition.cli import run_main
    from level1_models.__main__ import main

    assert run_main(main, ["cache-sizes", "tiny_resnet,small_mobilenet"], prog="level1_models") == 0
    assert capsys.readouterr().out.strip() == "64 128"
    assert run_main(main, ["cache-sizes", "resnt50"], prog="level1_models") == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "Did you mean: resnet50" in err[0]


def test_make_prepare_and_cache_keep_cache_size_without_models():
    dry = subprocess.run(["make", "-n", "-s", "prepare", "DATA=x", "CACHE_SIZE=384"], cwd=REPO,
                         capture_output=True, text=True, env={k: v for k, v in os.environ.items() if k != "MODELS"})
    assert 'sizes="384"' in dry.stdout and "competition prepare --data x" in dry.stdout
