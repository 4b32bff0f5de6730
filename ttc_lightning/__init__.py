"""ttc-lightning: test-time compute (augmentation, adaptation, iterative inference) for PyTorch Lightning."""

from ttc_lightning import data, stopping
from ttc_lightning.callback import TestTimeCallback
from ttc_lightning.iterative import IterativeInference
from ttc_lightning.mixin import TestTimeComputeMixin
from ttc_lightning.ops.augmix import RandomAugment
from ttc_lightning.tta.augmenter import Augmenter
from ttc_lightning.tta.callback import TestTimeAugmentation
from ttc_lightning.tta.registry import register_transform
from ttc_lightning.tta.transforms import (
    Add,
    FiveCrop,
    HFlip,
    Identity,
    Multiply,
    Resize,
    Rotate90,
    Scale,
    Transform,
    Transpose,
    VFlip,
)
from ttc_lightning.tta.views import expand_views
from ttc_lightning.tta.wrapper import TTAWrapper
from ttc_lightning.ttt.base import TestTimeTraining
from ttc_lightning.ttt.bn import BatchNormAdapt
from ttc_lightning.ttt.cotta import CoTTA
from ttc_lightning.ttt.eata import EATA
from ttc_lightning.ttt.memo import MEMO
from ttc_lightning.ttt.norm import NormStatistics
from ttc_lightning.ttt.persistence import Persistence
from ttc_lightning.ttt.resets import Resets
from ttc_lightning.ttt.sar import SAR
from ttc_lightning.ttt.tent import Tent
from ttc_lightning.ttt.updater import Updates
from ttc_lightning.writer import PredictionWriter, load_predictions, merge_parts

__version__ = "0.1.0"

__all__ = [
    "EATA",
    "MEMO",
    "SAR",
    "Add",
    "Augmenter",
    "BatchNormAdapt",
    "CoTTA",
    "FiveCrop",
    "HFlip",
    "Identity",
    "IterativeInference",
    "Multiply",
    "NormStatistics",
    "Persistence",
    "PredictionWriter",
    "RandomAugment",
    "Resets",
    "Resize",
    "Rotate90",
    "Scale",
    "TTAWrapper",
    "Tent",
    "TestTimeAugmentation",
    "TestTimeCallback",
    "TestTimeComputeMixin",
    "TestTimeTraining",
    "Transform",
    "Transpose",
    "Updates",
    "VFlip",
    "__version__",
    "data",
    "expand_views",
    "load_predictions",
    "merge_parts",
    "register_transform",
    "stopping",
]
