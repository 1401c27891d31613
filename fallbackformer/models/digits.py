"""Reference models for the embedded digits data (scikit-learn's 8x8 images, values 0..16).

Both read the raw image ``[B, 1, 8, 8]``. The primary reads a richer view: the image upsampled
bilinearly to 16x16, so its convolutions see a finer grid and its early exits sit at several
resolutions. The student reads the reduced, native input: the 8x8 image flattened to 64 features.
The pooled student (a reduced-input fallback rung) reads less still: the image average-pooled to
4x4, 16 features. The CNN student reads the native 8x8 image with two small convolutions, so a shift
of a few pixels moves its features instead of scrambling its input vector.
"""

from __future__ import annotations

from torch import nn

from fallbackformer.models.multi_exit import MultiExitNet
from fallbackformer.models.registry import register_model
from fallbackformer.models.transforms import Resize, ScaleShift

# Mean and std of x/16 over the whole digits data set: fixed constants, not fitted per split.
DIGITS_MEAN = 0.305
DIGITS_STD = 0.385


def _conv_block(c_in: int, c_out: int, pool: bool) -> nn.Sequential:
    layers: list[nn.Module] = [
        nn.Conv2d(c_in, c_out, kernel_size=3, padding=1, bias=False),
        nn.BatchNorm2d(c_out),
        nn.ReLU(inplace=True),
    ]
    if pool:
        layers.append(nn.MaxPool2d(2))
    return nn.Sequential(*layers)


def _exit_head(channels: int, num_classes: int, pooled: int = 4) -> nn.Sequential:
    return nn.Sequential(
        nn.AdaptiveAvgPool2d(pooled),
        nn.Flatten(),
        nn.Linear(channels * pooled * pooled, num_classes),
    )


@register_model("digits_cnn_exits")
def digits_cnn_exits(num_classes: int = 10, width: int = 16, image_size: int = 16) -> MultiExitNet:
    """A 4-stage CNN with 3 early exits and the final head.

    Args:
        num_classes: number of classes.
        width: channels of the first stage; later stages use 2x and 4x.
        image_size: side of the upsampled view the convolutions read.
    """
    w = width
    stages = [
        _conv_block(1, w, pool=True),  # [B, w, S/2, S/2]
        _conv_block(w, 2 * w, pool=False),  # [B, 2w, S/2, S/2]
        _conv_block(2 * w, 2 * w, pool=True),  # [B, 2w, S/4, S/4]
        _conv_block(2 * w, 4 * w, pool=False),  # [B, 4w, S/4, S/4]
    ]
    heads = {
        0: _exit_head(w, num_classes),
        1: _exit_head(2 * w, num_classes),
        2: _exit_head(2 * w, num_classes),
        3: nn.Sequential(
            nn.AdaptiveAvgPool2d(2),
            nn.Flatten(),
            nn.Linear(4 * w * 4, 64),
            nn.ReLU(inplace=True),
            nn.Linear(64, num_classes),
        ),
    }
    transform = nn.Sequential(ScaleShift(16.0, DIGITS_MEAN, DIGITS_STD), Resize(image_size))
    return MultiExitNet(stages, heads, input_transform=transform)


class MLPStudent(nn.Module):
    """A shallow MLP on the flattened native image, its input transform inside.

    Args:
        in_features: input size after flattening (64 for digits).
        hidden: hidden width.
        num_classes: number of classes.
    """

    def __init__(self, in_features: int = 64, hidden: int = 256, num_classes: int = 10) -> None:
        super().__init__()
        self.input_transform = nn.Sequential(ScaleShift(16.0, DIGITS_MEAN, DIGITS_STD), nn.Flatten())
        self.net = nn.Sequential(
            nn.Linear(in_features, hidden),
            nn.ReLU(inplace=True),
            nn.Dropout(0.1),
            nn.Linear(hidden, num_classes),
        )

    def forward(self, x):  # [B, 1, 8, 8] -> [B, C]
        return self.net(self.input_transform(x))


@register_model("digits_mlp_student")
def digits_mlp_student(num_classes: int = 10, hidden: int = 256) -> MLPStudent:
    """The fallback student for digits: one hidden layer on the native 8x8 input."""
    return MLPStudent(64, hidden, num_classes)


class PooledStudent(nn.Module):
    """A reduced-input student: the image average-pooled ``pool`` x ``pool``, flattened, then a tiny MLP.

    Args:
        image_size: side of the raw square image (8 for digits).
        pool: pooling window and stride; ``image_size`` must be a multiple of it.
        hidden: hidden width, 0 for a linear model.
        num_classes: number of classes.
    """

    def __init__(self, image_size: int = 8, pool: int = 2, hidden: int = 64, num_classes: int = 10) -> None:
        super().__init__()
        if pool < 1 or image_size % pool:
            raise ValueError(f"pool={pool} must be >= 1 and divide image_size={image_size}")
        features = (image_size // pool) ** 2
        self.input_transform = nn.Sequential(
            ScaleShift(16.0, DIGITS_MEAN, DIGITS_STD), nn.AvgPool2d(pool), nn.Flatten()
        )  # [B, 1, S, S] -> [B, (S/pool)^2]
        self.net = (nn.Sequential(nn.Linear(features, hidden), nn.ReLU(inplace=True), nn.Linear(hidden, num_classes))
                    if hidden else nn.Linear(features, num_classes))

    def forward(self, x):  # [B, 1, 8, 8] -> [B, C]
        return self.net(self.input_transform(x))


@register_model("digits_pooled_student")
def digits_pooled_student(num_classes: int = 10, pool: int = 2, hidden: int = 64) -> PooledStudent:
    """A reduced-input fallback rung for digits: a tiny MLP on the 8x8 image average-pooled to 4x4."""
    return PooledStudent(8, pool, hidden, num_classes)


class CNNStudent(nn.Module):
    """A tiny CNN on the native image: conv-pool, conv, average-pool to 2x2, one linear layer.

    Args:
        width: channels of the first convolution; the second has ``2 * width``.
        num_classes: number of classes.
    """

    def __init__(self, width: int = 16, num_classes: int = 10) -> None:
        super().__init__()
        self.input_transform = ScaleShift(16.0, DIGITS_MEAN, DIGITS_STD)
        self.features = nn.Sequential(
            _conv_block(1, width, pool=True),  # [B, w, 4, 4]
            _conv_block(width, 2 * width, pool=False),  # [B, 2w, 4, 4]
            nn.AdaptiveAvgPool2d(2),
            nn.Flatten(),  # [B, 8w]
        )
        self.head = nn.Linear(8 * width, num_classes)

    def forward(self, x):  # [B, 1, 8, 8] -> [B, C]
        return self.head(self.features(self.input_transform(x)))


@register_model("digits_cnn_student")
def digits_cnn_student(num_classes: int = 10, width: int = 16) -> CNNStudent:
    """A convolutional fallback student for digits on the native 8x8 input (6.8% of the primary's FLOPs at width 16, 1.9% at 8)."""
    return CNNStudent(width, num_classes)
