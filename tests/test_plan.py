"""make plan: the FLOP count against a count made another way, the plan's arithmetic against a hand
computation, the packing of folds onto GPUs, and the command line."""
from __future__ import annotations

import json

import pytest
import torch

from competition.cli import run_main
from features.cache import expected_cache_bytes
from level1_models.__main__ import main
from level1_models.config import build_config
from level1_models.modeling import create_network
from level1_models.plan import Calibration, Counts, count_network, make_plan, split_names, wall_hours


def hook_flops(model: torch.nn.Module, x: torch.Tensor) -> int:
    """2 x multiply-adds of every Conv2d and Linear, from the shapes their forward hooks see."""
    total = 0

    def conv(module: torch.nn.Conv2d, _inputs, out: torch.Tensor) -> None:
        nonlocal total
        kh, kw = module.kernel_size
        total += 2 * (module.in_channels // module.groups) * kh * kw * module.out_channels * out.shape[-2] * out.shape[-1]

    def linear(module: torch.nn.Linear, _inputs, out: torch.Tensor) -> None:
        nonlocal total
        total += 2 * module.in_features * module.out_features * (out.numel() // module.out_features)

    for module in model.modules():
        if isinstance(module, torch.nn.Conv2d):
            module.register_forward_hook(conv)
        elif isinstance(module, torch.nn.Linear):
            module.register_forward_hook(linear)
    with torch.no_grad():
        model.eval()(x)
    return total


def test_resnet50_flops_agree_with_an_independent_count():
    cfg = build_config("resnet50", {"img_size": 224, "pretrained": False})
    counted = count_network(cfg)
    independent = hook_flops(create_network(cfg), torch.zeros(1, 3, 224, 224))  # on the CPU, with hooks
    assert counted.flops == pytest.approx(independent, rel=0.01)
    assert 8.0e9 < counted.flops < 8.4e9  # the well-known 4.1 GMACs of ResNet-50 at 224 px
    assert counted.width == 2048


def test_plan_arithmetic_by_hand():
    # resnet50 at the measured 256 px is its own reference: the rates are the measured ones.
    cal = Calibration(date="2000-01-01", gpu="test GPU", setup="", img_size=256, batch=128,
                      references={"resnet50": {"train_loader": 100.0, "infer_loader": 400.0}})
    counts = Counts(train_images=1000, test_images=200, n_folds=5)
    plan = make_plan(["resnet50"], {"epochs": 2, "img_size": 256, "val_tta": "hflip", "tta": "hflip"}, counts, gpus=2,
                     calibration=cal)
    (row,) = plan.rows
    assert row.train_rate == pytest.approx(100.0) and row.infer_rate == pytest.approx(400.0)
    assert row.images_per_epoch == 800
    # 2 epochs x (800 / 100 s training + 200 x 2 views / 400 s validation) + (200 OOF + 200 test) x 2 / 400
    assert row.fold_hours * 3600 == pytest.approx(2 * (8 + 1) + 2)
    assert row.hours * 3600 == pytest.approx(5 * 20)
    assert row.wall_hours * 3600 == pytest.approx(3 * 20)  # 5 folds on 2 GPUs: 3 rounds
    assert row.embedding_bytes == 2 * 2048 * (1000 + 5 * 200)  # float16: OOF once, test per fold
    assert plan.caches == {256: expected_cache_bytes(1200, 256)}

    limited = make_plan(["resnet50"], {"epochs": 2, "img_size": 256, "val_tta": "none", "tta": "none", "limit": 500},
                        counts, calibration=cal).rows[0]
    assert limited.images_per_epoch == 500
    assert limited.fold_hours * 3600 == pytest.approx(2 * (5 + 0.5) + 1)
    # Short epochs: a quarter of the 800 images per epoch; validation without TTA, the final pass with hflip.
    short = make_plan(["resnet50"], {"epochs": 4, "img_size": 256, "val_tta": "none", "tta": "hflip",
                                     "epoch_fraction": 0.25}, counts, calibration=cal).rows[0]
    assert short.images_per_epoch == 200
    assert short.fold_hours * 3600 == pytest.approx(4 * (2 + 0.5) + 2)

    tiny = make_plan(["tiny_resnet"], {}, counts, calibration=cal).rows[0]  # far fewer FLOPs than resnet50
    assert tiny.capped and tiny.train_rate == 100.0 and tiny.infer_rate == 400.0  # never above a measured rate


def test_wall_time_packs_folds_onto_gpus():
    assert wall_hours([1.0] * 5, 8) == 1.0
    assert wall_hours([1.0] * 5, 2) == 3.0
    assert wall_hours([4.0, 1.0, 1.0, 1.0, 1.0], 2) == 4.0  # the long job alone, the short ones beside it


def test_model_names_split_on_commas_and_spaces():
    assert split_names("a b,c ,, d a") == ["a", "b", "c", "d"]
    assert split_names(None) == split_names("  ") and len(split_names(None)) >= 3


def test_unknown_model_fails_in_one_line_naming_close_matches(capsys):
    assert run_main(main, ["plan", "--models", "resnet50,vgg61"], prog="level1_models") == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "unknown model 'vgg61'. Did you mean: vgg16" in err[0]


def test_cli_prints_a_row_per_model(capsys, tmp_path):
    out_json = tmp_path / "plan.json"
    argv = ["plan", "--models", "tiny_resnet tiny_efficientnet,resnet50", "--gpus", "8", "--json", str(out_json)]
    assert run_main(main, argv, prog="level1_models") == 0
    lines = capsys.readouterr().out.splitlines()
    for name, ref in (("tiny_resnet", "resnet50 (cap)"), ("tiny_efficientnet", "efficientnet_b0 (cap)"),
                      ("resnet50", "resnet50 ")):
        (row,) = [line for line in lines if line.startswith(name + " ")]
        assert f" {ref}" in row
    assert any(line.startswith("total (3)") for line in lines)
    assert "+-2x" in "\n".join(lines)
    saved = json.loads(out_json.read_text())
    assert [r["name"] for r in saved["rows"]] == ["tiny_resnet", "tiny_efficientnet", "resnet50"]
    assert saved["counts"] == {"train_images": 752_803, "test_images": 121_232, "n_folds": 5}


def test_counts_from_a_prepared_work_folder(tmp_path, capsys):
    import pandas as pd

    from level1_models.plan import counts_from_work

    work = tmp_path / "work"
    work.mkdir()
    pd.DataFrame({"image_id": [f"ID_{i}" for i in range(12)], "fold": [i % 3 for i in range(12)]}).to_parquet(
        work / "folds.parquet")
    pd.DataFrame({"split": ["train"] * 12 + ["test"] * 4}).to_parquet(work / "metadata.parquet")
    assert counts_from_work(tmp_path / "data", work) == Counts(train_images=12, test_images=4, n_folds=3)
    argv = ["plan", "--models", "tiny_resnet", "--data", str(tmp_path / "data"), "--work", str(work), "--n-folds", "5"]
    assert run_main(main, argv, prog="level1_models") == 2
    assert "prepared with 3 folds, not N_FOLDS=5" in capsys.readouterr().err
    assert run_main(main, ["plan", "--models", "tiny_resnet", "--data", str(tmp_path / "nowhere")],
                    prog="level1_models") == 2
    assert "run make prepare" in capsys.readouterr().err


def test_caches_follow_the_shared_rule():
    from level1_models.caches import cache_bytes, needed_cache_sizes

    names = ["inceptionv3", "efficientnet_b3", "resnet50"]  # 299 px reads the 300 px cache
    plan = make_plan(names, counts=Counts(train_images=1000, test_images=200, n_folds=5))
    needed = needed_cache_sizes(names)
    assert plan.caches == {size: cache_bytes(size, 1200) for size in needed}
    assert {r.name: r.cache_size for r in plan.rows} == {n: size for size, ns in needed.items() for n in ns}
