"""The model zoo: every registered spec builds (timm's test_models habit), the small ones train a
step on a CPU, the big ones run a tiny forward pass (slow), and lookups fail helpfully."""
from __future__ import annotations

import subprocess
import sys

import pytest
import timm
import torch

from features.windows import list_combinations, n_channels
from level1_models.config import build_config
from level1_models.modeling import NUM_OUTPUTS, create_network
from level1_models.registry import ModelSpec, UnknownModelError, get_spec, list_models, register_model

torch.set_num_threads(1)

ALL = list_models()
SMALL = [n for n in ALL if get_spec(n).cpu_friendly]
BIG = [n for n in ALL if not get_spec(n).cpu_friendly]
REQUIRED = ["vgg16", "resnet50", "inceptionv3", "dilated_resnet50", *(f"efficientnet_b{i}" for i in range(8))]


def first_conv(model: torch.nn.Module) -> torch.nn.Conv2d:
    return model.get_submodule(model.pretrained_cfg["first_conv"])


def test_the_zoo_has_the_required_models_and_cpu_ones():
    assert set(REQUIRED) <= set(ALL)
    assert len(SMALL) >= 3
    # The small specs differ in architecture AND window combination.
    assert len({get_spec(n).arch for n in SMALL}) == len(SMALL)
    assert len({get_spec(n).combination for n in SMALL}) == len(SMALL)
    assert all(get_spec(n).img_size <= 128 for n in SMALL)


@pytest.mark.parametrize("name", ALL)
def test_spec_is_well_formed_and_builds(name):
    spec = get_spec(name)
    assert spec.name == name and timm.is_model(spec.arch), spec.arch
    assert spec.combination in list_combinations()
    with torch.device("meta"):  # construction without allocating or initialising weights
        model = create_network(build_config(name))
    assert first_conv(model).in_channels == n_channels(spec.combination)
    assert model.get_classifier().out_features == NUM_OUTPUTS


@pytest.mark.parametrize("name", SMALL)
def test_small_spec_trains_a_step_at_a_tiny_input(name):
    torch.manual_seed(0)
    model = create_network(build_config(name)).train()
    x = torch.rand(4, n_channels(get_spec(name).combination), 32, 32)
    y = model(x)
    assert y.shape == (4, NUM_OUTPUTS) and torch.isfinite(y).all()
    y.sum().backward()
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)


@pytest.mark.slow
@pytest.mark.parametrize("name", BIG)
def test_big_spec_forward_at_a_tiny_input(name):
    spec = get_spec(name)
    model = create_network(build_config(name)).eval()
    size = 75 if spec.arch == "inception_v3" else 32  # Inception-v3's stem needs >= 75 px
    with torch.no_grad():
        y = model(torch.rand(2, n_channels(spec.combination), size, size))
    assert y.shape == (2, NUM_OUTPUTS) and torch.isfinite(y).all()
    with torch.device("meta"):  # and the spec's own input size goes through (shapes only)
        assert model.to("meta")(torch.empty(2, n_channels(spec.combination), spec.img_size, spec.img_size)).shape == (2, 6)


def test_dilated_resnet_keeps_a_finer_feature_map():
    with torch.device("meta"):
        plain = create_network(build_config("resnet50"))
        dilated = create_network(build_config("dilated_resnet50"))
        x = torch.empty(1, 3, 256, 256)
        assert plain.forward_features(x).shape[-2:] == (8, 8)  # stride 32
        assert dilated.forward_features(x).shape[-2:] == (16, 16)  # stride 16: the last stage dilates
    assert get_spec("dilated_resnet50").output_stride == 16
    assert build_config("resnet50", {"output_stride": 8}).output_stride == 8


def test_unknown_name_lists_known_and_close_names():
    with pytest.raises(UnknownModelError) as err:
        get_spec("efficientnet_b9")
    text = str(err.value)
    assert "Did you mean: efficientnet_b" in text and "vgg16" in text and "tiny_resnet" in text
    with pytest.raises(UnknownModelError, match="resnet50"):
        get_spec("resnet_50")


def test_list_matches_like_timm():
    assert list_models("efficientnet_b*") == [f"efficientnet_b{i}" for i in range(8)]
    assert list_models("*resnet*") == ["dilated_resnet50", "resnet50", "tiny_resnet"]
    assert list_models("nothing*") == []


def test_cli_list_and_unknown_model(capsys):
    from competition.cli import run_main
    from level1_models.__main__ import main

    out = subprocess.run([sys.executable, "-m", "level1_models", "list", "tiny_*"], capture_output=True, text=True)
    assert out.returncode == 0 and "tiny_resnet" in out.stdout and "vgg16" not in out.stdout
    assert run_main(main, ["oof", "--model", "vgg61", "--data", "nowhere"], prog="level1_models") == 2
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert last.startswith("level1_models: error: unknown model 'vgg61'. Did you mean: vgg16")
    assert run_main(main, ["oof", "--model", "vgg16", "--data", "nowhere", "--set", "epoch=2"], prog="level1_models") == 2
    assert "unknown config field 'epoch'. Did you mean: epochs" in capsys.readouterr().err


def test_registering_twice_or_a_bad_spec_fails():
    def vgg16() -> ModelSpec:  # the same name as a zoo entry
        return get_spec("resnet50")

    with pytest.raises(ValueError, match="registered twice"):
        register_model(vgg16)
    with pytest.raises(ValueError, match="optimizer"):
        ModelSpec(name="x", arch="resnet18", combination="bsb", img_size=64, batch_size=8, epochs=1, optimizer="lion")
    with pytest.raises(ValueError, match="output_stride"):
        ModelSpec(name="x", arch="resnet18", combination="bsb", img_size=64, batch_size=8, epochs=1, output_stride=4)
