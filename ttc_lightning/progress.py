"""Strategy figures in the TQDM progress bar, in the Trainer's loggers, and as an end-of-stage summary.

Lightning's own progress bars show no metrics during predict and ``self.log`` raises there, so strategies report
through here: the TQDM bar's postfix (the Rich bar is left alone), ``logger.log_metrics`` with the batch count as
the step, and one ``rank_zero_info`` line per strategy at the end of the stage.
"""

import math

import lightning.pytorch as pl
from lightning.pytorch.callbacks import TQDMProgressBar
from lightning.pytorch.utilities import rank_zero_info

from ttc_lightning.lightning_internals import progress_bar


def _format(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else f"{value:.4g}"


def show(trainer: pl.Trainer, stage: str, figures: dict[str, float], step: int) -> None:
    """Put ``figures`` in the stage's TQDM bar and send them to every logger of ``trainer``."""
    if not figures:
        return
    bar_callback = trainer.progress_bar_callback
    if isinstance(bar_callback, TQDMProgressBar):
        bar = progress_bar(bar_callback, stage)
        if bar is not None:
            bar.set_postfix({name: _format(value) for name, value in figures.items()}, refresh=False)
    for logger in trainer.loggers:
        logger.log_metrics({name: float(value) for name, value in figures.items()}, step=step)


def summarise(name: str, figures: dict[str, float]) -> None:
    """One line with a strategy's figures at the end of a stage (rank zero)."""
    shown = ", ".join(f"{key} {_format(value)}" for key, value in figures.items() if not math.isnan(value))
    if shown:
        rank_zero_info(f"{name}: {shown}")
