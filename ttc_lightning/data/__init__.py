"""Corruptions (the 15 CIFAR-10-C families in torch, and its extra ones for validation) and shift streams for
test-time adaptation benchmarks."""

from ttc_lightning.data.corruptions import (
    CORRUPTIONS,
    FAMILIES,
    SEVERITIES,
    VALIDATION_CORRUPTIONS,
    corrupt,
    spatial_scale,
)
from ttc_lightning.data.streams import GRADUAL_SEVERITIES, STREAM_MODES, Shift, stream

__all__ = [
    "CORRUPTIONS",
    "FAMILIES",
    "GRADUAL_SEVERITIES",
    "SEVERITIES",
    "STREAM_MODES",
    "VALIDATION_CORRUPTIONS",
    "Shift",
    "corrupt",
    "spatial_scale",
    "stream",
]
