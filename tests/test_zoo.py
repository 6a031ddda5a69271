"""The model zoo: every registered spec builds (timm's test_models habit), the small ones train a
step on a CPU, the big ones run a tiny forward pass (slow), and lookups fail helpfully."""
from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
import timm
import torch

from features.windows import list_combinations, n_channels
from level1_models.config import build_config
from level1_models.modeling import NUM_OUTPUTS, create_network, first_layer, input_stats
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


def test_every_full_size_spec_has_imagenet_weights_in_timm_and_fits_the_512_cache():
    pretrained = set(timm.list_pretrained())
    for name in BIG:
        arch = get_spec(name).arch
        base, tag = timm.models.split_model_name_tag(arch)
        tag = tag or timm.models.get_pretrained_cfg(arch).tag  # an untagged arch loads its default tag
        assert f"{base}.{tag}" in pretrained, f"{name}: timm has no ImageNet weights for {arch}"
    assert max(get_spec(n).img_size for n in ALL) <= 512
    assert "512 px" in get_spec("efficientnet_b7").description


@pytest.mark.parametrize("name", ALL)
def test_first_layer_gets_the_raw_input_and_normalises_it_as_pretrained(name):
    spec = get_spec(name)
    channels = n_channels(spec.combination)
    with torch.device("meta"):
        model = create_network(build_config(name))
    seen = []
    layer = first_layer(model)
    layer.register_forward_pre_hook(lambda _m, args: seen.append(args[0]), prepend=True)
    x = torch.empty(2, channels, 80, 80, device="meta")
    model(x)
    assert len(seen) == 1 and seen[0] is x  # no module touches the input before the normalisation
    assert layer.input_mean.shape == layer.input_std.shape == (1, channels, 1, 1)
    # The statistics are those of the arch's pretrained config (its tag's, for a tagged arch).
    registered = timm.models.get_pretrained_cfg(spec.arch).to_dict()
    assert input_stats(model.pretrained_cfg, channels) == input_stats(registered, channels)


def test_input_stats_follow_the_pretrained_config():
    imagenet = {"mean": (0.485, 0.456, 0.406), "std": (0.229, 0.224, 0.225)}
    assert input_stats(imagenet, 3) == ([0.485, 0.456, 0.406], [0.229, 0.224, 0.225])
    mean, std = input_stats(imagenet, 9)  # other channel counts: the colours' average on every channel
    assert mean == pytest.approx([0.449] * 9) and std == pytest.approx([0.226] * 9)
    inception = timm.models.get_pretrained_cfg(get_spec("inceptionv3").arch).to_dict()
    assert input_stats(inception, 1) == ([0.5], [0.5])  # [0, 1] -> [-1, 1]


def test_normalisation_is_applied_and_travels_in_the_checkpoint():
    torch.manual_seed(0)
    cfg = build_config("tiny_resnet")
    model = create_network(cfg).eval()
    layer = first_layer(model)
    x = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        by_hand = torch.nn.functional.conv2d((x - 0.5) / 0.5, layer.weight, layer.bias, layer.stride, layer.padding)
        assert torch.allclose(layer(x), by_hand, atol=1e-6)
    state = model.state_dict()
    assert {"conv1.0.input_mean", "conv1.0.input_std"} <= set(state)
    twin = create_network(cfg)
    twin.load_state_dict(state)
    assert torch.equal(first_layer(twin).input_std, layer.input_std)
    # A checkpoint from before the normalisation loads as trained: with the identity.
    old = {k: v for k, v in state.items() if "input_" not in k}
    twin.load_state_dict(old)
    assert first_layer(twin).input_mean.abs().max() == 0 and (first_layer(twin).input_std == 1).all()


@pytest.mark.parametrize("name", SMALL)
def test_small_spec_trains_a_step_at_a_tiny_input(name):
    """Forward, backward, and optimiser steps that move every trainable weight and lower the loss
    on the same batch (the same dropout masks each time: the seed is reset before each pass)."""
    torch.manual_seed(0)
    model = create_network(build_config(name)).train()
    x = torch.rand(4, n_channels(get_spec(name).combination), 32, 32)
    target = (torch.rand(4, NUM_OUTPUTS) < 0.3).float()
    before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    optimiser = torch.optim.Adam(model.parameters(), lr=1e-3)

    def loss_on_the_batch() -> torch.Tensor:
        torch.manual_seed(1)
        y = model(x)
        assert y.shape == (4, NUM_OUTPUTS) and torch.isfinite(y).all()
        return torch.nn.functional.binary_cross_entropy_with_logits(y, target)

    first = None
    for _ in range(3):
        optimiser.zero_grad()
        loss = loss_on_the_batch()
        first = loss.item() if first is None else first
        loss.backward()
        assert all(p.grad is not None for p in model.parameters() if p.requires_grad)
        optimiser.step()
    still = [n for n, p in model.named_parameters() if p.requires_grad and torch.equal(p.detach(), before[n])]
    assert not still, f"weights that no step moved: {still[:5]}"
    assert loss_on_the_batch().item() < first


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
    with pytest.raises(UnknownModelError, match="Did you mean: rsna2nd_resnext101_wsl"):  # a prefix
        get_spec("rsna2nd")


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


WINNERS = [n for n in ALL if n.startswith("rsna")]


def test_the_winners_recipes_are_in_the_zoo_with_their_sources():
    places = {n.split("_")[0] for n in WINNERS}
    assert places == {"rsna1st", "rsna2nd", "rsna3rd", "rsna11th"}
    for name in WINNERS:
        spec = get_spec(name)
        assert "2019" in spec.description and ".py" in spec.description  # repo and file named
        assert spec.optimizer == "adam" and 2e-5 <= spec.lr <= 5e-4 and spec.img_size in (256, 480, 512)
        assert spec.patience >= spec.epochs  # no early stopping, as they trained
        assert spec.aug.rotate >= 20 and spec.aug.hflip == 0.5  # their rotations of 20-30 degrees
    assert get_spec("rsna3rd_seresnext50").aug.distort == 0.5 and get_spec("rsna1st_densenet121").aug.channel_swap > 0


@pytest.mark.parametrize("name", WINNERS)
def test_winner_spec_trains_a_few_steps_on_cpu_at_a_tiny_size_through_set(name):
    """The spec's own optimizer, schedule and loss through the training loop's Trainer, with the
    size and batch scaled down by SET= overrides as a user would on a CPU."""
    from level1_models.config import parse_sets, resolve
    from level1_models.distributed import DistEnv
    from level1_models.loop import Runtime, Trainer, make_optimizer, make_scheduler

    overrides = parse_sets(["img_size=64", "batch_size=2", "pretrained=false", "device=cpu", "workers=0"])
    cfg = resolve(build_config(name, overrides), cuda_available=False, bf16_supported=False)
    assert cfg.lr_factor(1) < 1.0  # batch 2 is below the spec's batch: its lr rule lowered the lr
    torch.manual_seed(0)
    model = create_network(cfg).train()
    optimizer = make_optimizer(cfg, model, cfg.lr * cfg.lr_factor(1))
    scheduler = make_scheduler(cfg, optimizer, steps_per_epoch=3)
    rt = Runtime(device=torch.device("cpu"), env=DistEnv(), amp="off", channels_last=False)
    trainer = Trainer(cfg, rt, model, list(model.parameters()), optimizer, scheduler,
                      torch.amp.GradScaler("cpu", enabled=False))
    before = [p.detach().clone() for p in model.parameters()]
    x = torch.randint(0, 256, (2, n_channels(cfg.combination), 64, 64), dtype=torch.uint8)
    y = torch.tensor([[0, 0, 1, 0, 0, 1], [0, 0, 0, 0, 0, 0]], dtype=torch.float32)
    for _ in range(3):
        loss = trainer.micro_step(x, y, scale=0.5, sync=True)
        trainer.optimizer_step()
        assert torch.isfinite(loss)
    changed = sum(not torch.equal(a, b) for a, b in zip(before, model.parameters()))
    assert changed > len(before) // 2  # the optimiser moved the weights
    from features.augment import Augmenter  # and the spec's own augmentations run on a 2.5D HU stack

    stack = np.random.default_rng(0).uniform(-1024, 100, (64, 64, 3)).astype(np.float32)
    out = Augmenter(64, cfg.aug, seed=0).geometric(stack)
    assert out.shape == (64, 64, 3) and np.isfinite(out).all()
