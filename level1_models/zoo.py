"""The named level-1 models. Each sees its own window combination, so their errors differ and
the level-2 stacker has something to combine.

Full-size specs follow the 2019 competition's habits (ImageNet backbones, a few epochs, AdamW or
SGD with a cosine schedule). Every full-size arch has ImageNet weights in timm (tests/test_zoo.py
checks it against ``timm.list_pretrained()``). The EfficientNets use their native compound-scaled
input sizes up to 512 px, the size of the largest cache the README asks for: B6 (native 528) and B7
(native 600) train at 512 px. The
``tiny_*`` / ``small_*`` specs are cheap enough for a CPU: the demo and the tests train them.
Adding a model is one decorated function here.
"""
from __future__ import annotations

from level1_models.registry import ModelSpec, register_model

# --- full-size models (GPU) -------------------------------------------------------------------


@register_model
def vgg16() -> ModelSpec:
    return ModelSpec(
        name="vgg16", arch="vgg16", combination="bsb", img_size=256, batch_size=32, epochs=6,
        optimizer="sgd", lr=0.01, momentum=0.9, weight_decay=1e-4, warmup_epochs=0.5, drop_rate=0.3,
        description="VGG-16 on brain/subdural/bone windows",
    )


@register_model
def resnet50() -> ModelSpec:
    return ModelSpec(
        # Batch 128 per GPU: at 32 an H100 trained 743 images/s, at 128 2,862 (make gpu-check,
        # 2026-11-25); lr 3e-4 at 32 grown by sqrt(4), timm's rule for AdamW.
        name="resnet50", arch="resnet50", combination="bss_sigmoid", img_size=256, batch_size=128, epochs=6,
        lr=6e-4, weight_decay=1e-2, warmup_epochs=0.5, drop_rate=0.2,
        description="ResNet-50 on sigmoid brain/subdural/soft-tissue windows",
    )


@register_model
def inceptionv3() -> ModelSpec:
    return ModelSpec(
        name="inceptionv3", arch="inception_v3", combination="brain3", img_size=299, batch_size=32, epochs=6,
        lr=3e-4, weight_decay=1e-2, warmup_epochs=0.5, drop_rate=0.2,
        description="Inception-v3 on the brain window of the previous, current and next slice (2.5D)",
    )


@register_model
def dilated_resnet50() -> ModelSpec:
    return ModelSpec(
        name="dilated_resnet50", arch="resnet50", output_stride=16, combination="bsb_sigmoid", img_size=256,
        batch_size=24, epochs=6, lr=3e-4, weight_decay=1e-2, warmup_epochs=0.5, drop_rate=0.2,
        description="ResNet-50 with a dilated last stage (output stride 16) on sigmoid brain/subdural/bone",
    )


# EfficientNet B0-B7: native input size (at most 512 px), a batch that fits ~40 GB, a window
# combination each. timm has no ImageNet weights for its own efficientnet_b6/b7: those two are the
# TensorFlow-ported NoisyStudent ones (tf_ models pad 'same', as in TensorFlow).
_EFFICIENTNETS: dict[str, tuple[str, int, int, str, float]] = {
    # name: (timm arch, img_size, batch_size, combination, drop_rate)
    "efficientnet_b0": ("efficientnet_b0", 224, 128, "bsb", 0.2),  # 128: 3,067 img/s at 256 px on an H100
    "efficientnet_b1": ("efficientnet_b1", 240, 48, "subdural3", 0.2),
    "efficientnet_b2": ("efficientnet_b2", 260, 48, "bss", 0.3),
    "efficientnet_b3": ("efficientnet_b3", 300, 32, "meta3", 0.3),
    "efficientnet_b4": ("efficientnet_b4", 380, 16, "bsb3", 0.4),
    "efficientnet_b5": ("efficientnet_b5", 456, 12, "bss_sigmoid", 0.4),
    "efficientnet_b6": ("tf_efficientnet_b6.ns_jft_in1k", 512, 8, "brain3", 0.5),
    "efficientnet_b7": ("tf_efficientnet_b7.ns_jft_in1k", 512, 6, "bsb_sigmoid", 0.5),
}

_NATIVE_ABOVE_512 = {"efficientnet_b6": 528, "efficientnet_b7": 600}  # the paper's sizes


def _efficientnet(name: str) -> ModelSpec:
    arch, size, batch, combination, drop = _EFFICIENTNETS[name]
    native = _NATIVE_ABOVE_512.get(name)
    where = f"at {size} px (native {native}; 512 px is the largest cache)" if native else f"at its native {size} px"
    return ModelSpec(
        name=name, arch=arch, combination=combination, img_size=size, batch_size=batch, epochs=5,
        lr=1e-3 * batch / 64, weight_decay=1e-2, warmup_epochs=0.5, drop_rate=drop, drop_path_rate=0.2,
        description=f"{arch} {where} on the {combination} windows",
    )


@register_model
def efficientnet_b0() -> ModelSpec:
    return _efficientnet("efficientnet_b0")


@register_model
def efficientnet_b1() -> ModelSpec:
    return _efficientnet("efficientnet_b1")


@register_model
def efficientnet_b2() -> ModelSpec:
    return _efficientnet("efficientnet_b2")


@register_model
def efficientnet_b3() -> ModelSpec:
    return _efficientnet("efficientnet_b3")


@register_model
def efficientnet_b4() -> ModelSpec:
    return _efficientnet("efficientnet_b4")


@register_model
def efficientnet_b5() -> ModelSpec:
    return _efficientnet("efficientnet_b5")


@register_model
def efficientnet_b6() -> ModelSpec:
    return _efficientnet("efficientnet_b6")


@register_model
def efficientnet_b7() -> ModelSpec:
    return _efficientnet("efficientnet_b7")


# --- small models (CPU: demo and tests) -------------------------------------------------------
# timm's test_* models are ~0.1-0.4 M parameters; they differ in architecture (residual, MBConv,
# ConvNeXt) and each sees another window combination.


@register_model
def tiny_resnet() -> ModelSpec:
    return ModelSpec(
        name="tiny_resnet", arch="test_resnet", combination="bsb", img_size=64, batch_size=32, epochs=6,
        lr=3e-3, weight_decay=1e-4, cpu_friendly=True,
        description="tiny ResNet (timm test_resnet, BatchNorm) on brain/subdural/bone at 64 px",
    )


@register_model
def tiny_efficientnet() -> ModelSpec:
    return ModelSpec(
        name="tiny_efficientnet", arch="test_efficientnet", combination="brain3", img_size=96, batch_size=32,
        epochs=6, lr=3e-3, weight_decay=1e-4, cpu_friendly=True,
        description="tiny EfficientNet (timm test_efficientnet) on 2.5D brain windows at 96 px",
    )


@register_model
def tiny_convnext() -> ModelSpec:
    return ModelSpec(
        name="tiny_convnext", arch="test_convnext", combination="bss_sigmoid", img_size=64, batch_size=32,
        epochs=6, lr=1e-3, weight_decay=1e-4, warmup_epochs=0.5, cpu_friendly=True,
        description="tiny ConvNeXt (timm test_convnext, LayerNorm: batch-independent) on sigmoid bss at 64 px",
    )


@register_model
def small_mobilenet() -> ModelSpec:
    return ModelSpec(
        name="small_mobilenet", arch="mobilenetv3_small_050", combination="subdural3", img_size=128,
        batch_size=32, epochs=6, lr=3e-3, weight_decay=1e-4, cpu_friendly=True,
        description="MobileNetV3-small x0.5 on 2.5D subdural windows at 128 px",
    )
