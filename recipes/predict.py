"""Apply any composition of test-time strategies to a LightningModule and write its predictions.

    python recipes/predict.py model=digits_cnn ckpt_path=model.ckpt ttc/ttt=tent ttc/tta=shift_multiscale

``model`` and ``data`` are config groups (``configs/model``, ``configs/data``): point ``model._target_`` at your
LightningModule class and ``data._target_`` at a function returning a DataLoader or a LightningDataModule (or add
your own configs with ``hydra.searchpath``). The strategies come from ``ttc/tta``, ``ttc/ttt`` and
``ttc/iterative``; ``ttc.PredictionWriter`` writes every prediction once, in dataset order, to ``output``
(``torch.load(output)``), on one device or many (``trainer=ddp``).
"""

from typing import Any

import hydra
import lightning as L
from digits import quiet
from hydra.utils import instantiate
from omegaconf import DictConfig
from schemas import register

import ttc_lightning as ttc

register()


def strategies(cfg: DictConfig) -> list[L.Callback]:
    """The callbacks of the ``ttc`` groups (empty ones are skipped)."""
    return [instantiate(node) for node in cfg.get("ttc", {}).values() if node]


@hydra.main(config_path="../configs", config_name="predict", version_base=None)
def main(cfg: DictConfig) -> Any:
    quiet()
    model = instantiate(cfg.model)
    data = instantiate(cfg.data)
    callbacks = [*strategies(cfg), ttc.PredictionWriter(cfg.output)]
    trainer = instantiate(cfg.trainer, callbacks=callbacks)
    if cfg.ckpt_path is None:
        print("No ckpt_path given: predicting with the model's initial weights.")
    trainer.predict(model, data, ckpt_path=cfg.ckpt_path, return_predictions=False)
    if trainer.is_global_zero:
        print(f"Predictions written to {cfg.output}")
    return cfg.output


if __name__ == "__main__":
    main()
