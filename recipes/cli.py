"""The recipes' model and data under LightningCLI: test-time strategies as ``trainer.callbacks`` in YAML.

    python recipes/cli.py predict --config recipes/cli_predict.yaml --ckpt_path model.ckpt

Needs the ``cli`` extra (jsonargparse). Strategy arguments are checked against the callbacks' signatures, like the
Hydra schemas; optimizer factories are ``class_path`` / ``init_args`` of an optimizer class.
"""

import lightning as L
from digits import DigitsCNN
from lightning.pytorch.cli import LightningCLI
from loaders import test_loader
from torch.utils.data import DataLoader


class DigitsData(L.LightningDataModule):
    """The test split of a recipes dataset for ``predict``.

    Args:
        name: ``digits`` or ``fashion_mnist``. Default ``"digits"``.
        batch_size: test batch size. Default ``64``.
    """

    def __init__(self, name: str = "digits", batch_size: int = 64) -> None:
        super().__init__()
        self.name, self.batch_size = name, batch_size

    def predict_dataloader(self) -> DataLoader:
        return test_loader(self.name, self.batch_size)


def main(args: list[str] | None = None, run: bool = True) -> LightningCLI:
    """The CLI; ``args`` and ``run`` as in :class:`LightningCLI` (for tests)."""
    return LightningCLI(DigitsCNN, DigitsData, args=args, run=run, save_config_callback=None)


if __name__ == "__main__":
    main()
