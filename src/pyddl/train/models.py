"""Models for `pyddl train`: a small CNN for the digits default and torchvision classifiers by name.

torchvision models are built with weights=None (nothing is downloaded) and, where the model
supports it, zero_init_residual=True: the last BN gamma of each residual block starts at 0 so
every block starts as the identity (Goyal et al. 2017, section 5.1). torchvision is optional.
"""

from __future__ import annotations

import difflib

from torch import nn

__all__ = ["SMALL_CNN", "SmallCNN", "available_models", "build_model"]

SMALL_CNN = "small_cnn"
# Their auxiliary heads make train-mode outputs tuples; one logits tensor keeps the loop generic.
_AUX_LOGITS_MODELS = ("googlenet", "inception_v3")


class SmallCNN(nn.Module):
    """Three 3x3 conv-BN-ReLU layers, global average pooling and a linear head (about 93k weights).

    Input size only needs to be at least 2x2 (one 2x2 max-pool); sized for 8x8 digits.
    """

    def __init__(self, in_channels: int = 1, num_classes: int = 10, width: int = 32):
        super().__init__()
        if in_channels < 1 or num_classes < 1 or width < 1:
            raise ValueError(
                f"SmallCNN needs positive in_channels, num_classes and width, got "
                f"{in_channels}, {num_classes}, {width}"
            )

        def block(c_in: int, c_out: int) -> list[nn.Module]:
            return [nn.Conv2d(c_in, c_out, 3, padding=1, bias=False), nn.BatchNorm2d(c_out),
                    nn.ReLU(inplace=True)]

        self.features = nn.Sequential(
            *block(in_channels, width), *block(width, 2 * width), nn.MaxPool2d(2),
            *block(2 * width, 4 * width), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
        )
        self.head = nn.Linear(4 * width, num_classes)

    def forward(self, x):
        return self.head(self.features(x))


def _torchvision_models():
    try:
        from torchvision import models
    except ImportError as exc:
        raise ImportError(
            "torchvision models need torchvision: pip install torchvision "
            f"(or use --model {SMALL_CNN}, which needs nothing more)"
        ) from exc
    return models


def available_models() -> list[str]:
    """List the model names `build_model` accepts (torchvision's only if it is installed)."""
    try:
        models = _torchvision_models()
    except ImportError:
        return [SMALL_CNN]
    return [SMALL_CNN] + sorted(models.list_models(module=models))


def build_model(name: str, num_classes: int, input_shape: tuple[int, ...] = (3, 224, 224)) -> nn.Module:
    """Build `name` ("small_cnn" or a torchvision classifier such as "resnet50") untrained.

    Args:
        name: the model name (see `available_models`).
        num_classes: size of the classifier head.
        input_shape: (channels, height, width) of one input image.

    Returns:
        The model, with zero-initialised last BN gamma per residual block where supported.

    Raises:
        ValueError: an unknown name (close matches listed), or a torchvision model given
            images that do not have 3 channels.
        ImportError: a torchvision model without torchvision installed.

    Example:
        >>> build_model("resnet50", num_classes=1000)
    """
    if num_classes < 1:
        raise ValueError(f"num_classes must be >= 1, got {num_classes}")
    if name == SMALL_CNN:
        return SmallCNN(in_channels=input_shape[0], num_classes=num_classes)
    models = _torchvision_models()
    names = models.list_models(module=models)
    if name not in names:
        close = difflib.get_close_matches(name, [SMALL_CNN] + names, n=5, cutoff=0.5)
        hint = f"did you mean {', '.join(close)}?" if close else f"try {SMALL_CNN}, resnet50, resnet101"
        raise ValueError(f"unknown model {name!r}; {hint} (pyddl.train.models.available_models() "
                         f"lists all {len(names) + 1})")
    if input_shape[0] != 3:
        raise ValueError(
            f"torchvision's {name} takes 3-channel images, the data has {input_shape[0]} "
            f"(shape {tuple(input_shape)}); use --model {SMALL_CNN} for digits, or RGB data"
        )
    kwargs = {"weights": None, "num_classes": num_classes}
    if name in _AUX_LOGITS_MODELS:
        kwargs.update(aux_logits=False, init_weights=True)
    try:
        return models.get_model(name, zero_init_residual=True, **kwargs)
    except TypeError as exc:
        if "zero_init_residual" not in str(exc):
            raise
    return models.get_model(name, **kwargs)
