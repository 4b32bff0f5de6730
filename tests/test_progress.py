"""Strategy figures reach the TQDM predict bar, the Trainer's loggers and an end-of-stage summary."""

import functools
import logging

import lightning as L
import torch
from lightning.pytorch.loggers import Logger
from ttt_models import ConvNet, images, loader

import ttc_lightning as ttc


class Recording(Logger):
    """A logger that keeps every ``log_metrics`` call."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: list[tuple[dict, int]] = []

    @property
    def name(self) -> str:
        return "recording"

    @property
    def version(self) -> int:
        return 0

    def log_hyperparams(self, params, *args, **kwargs) -> None:
        pass

    def log_metrics(self, metrics, step=None) -> None:
        self.calls.append((dict(metrics), step))


def predict(callbacks, **options):
    trainer = L.Trainer(callbacks=callbacks, enable_model_summary=False, enable_checkpointing=False, **options)
    trainer.predict(ConvNet(), loader(images(n=24)))  # 3 batches
    return trainer


def test_figures_go_to_the_logger_once_per_batch():
    logger = Recording()
    tent = ttc.Tent(optimizer=functools.partial(torch.optim.SGD, lr=0.01))
    predict([tent], logger=logger, enable_progress_bar=False)
    assert [step for _, step in logger.calls] == [1, 2, 3]
    assert [metrics["tent/updates"] for metrics, _ in logger.calls] == [1.0, 2.0, 3.0]
    assert logger.calls[-1][0]["tent/loss"] == tent.last_loss
    assert {"tent/backwards", "tent/resets", "tent/skipped"} <= set(logger.calls[-1][0])


def test_figures_appear_in_the_tqdm_predict_bar():
    trainer = predict([ttc.Tent()], logger=False, enable_progress_bar=True)
    postfix = trainer.progress_bar_callback._predict_progress_bar.postfix
    assert "tent/updates=3" in postfix and "tent/loss=" in postfix


def test_a_summary_line_is_printed_at_the_end(caplog):
    with caplog.at_level(logging.INFO, logger="lightning.pytorch"):
        predict([ttc.Tent()], logger=False, enable_progress_bar=False)
    assert any(r.getMessage().startswith("Tent: loss") and "updates 3" in r.getMessage() for r in caplog.records)


def test_strategies_without_figures_log_nothing():
    logger = Recording()
    predict([ttc.TestTimeAugmentation(), ttc.BatchNormAdapt()], logger=logger, enable_progress_bar=False)
    assert logger.calls == []


def test_halting_figures_reach_the_bar_and_the_logger():
    from ttc_lightning import stopping

    logger = Recording()
    tta = ttc.TestTimeAugmentation("d4", stop=stopping.Confidence(0.3))
    trainer = predict([tta], logger=logger, enable_progress_bar=True)
    figures = logger.calls[-1][0]
    assert {"testtimeaugmentation/iterations", "testtimeaugmentation/saved"} <= set(figures)
    assert 1 <= figures["testtimeaugmentation/iterations"] <= 8
    assert figures["testtimeaugmentation/saved"] == 1 - figures["testtimeaugmentation/iterations"] / 8
    halted = sum(v for k, v in figures.items() if k.startswith("testtimeaugmentation/halted/"))
    assert halted == 1.0  # Confidence(0.3) or max_iters: one reason per sample
    assert "testtimeaugmentation/iterations=" in trainer.progress_bar_callback._predict_progress_bar.postfix
