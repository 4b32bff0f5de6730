"""Persistence of test-time training: keep the adapted model after the stage, save the adaptation state every N
batches, resume from a saved state.

:class:`Persistence` groups the options (``persistence=Persistence(...)``); :func:`check_state` checks a state read
back before a stage continues from it.
"""

import os
from dataclasses import dataclass, fields
from typing import TYPE_CHECKING, Any

import torch

from ttc_lightning.checks import check_bool, check_int, check_unused, is_default

if TYPE_CHECKING:
    from ttc_lightning.ttt.base import TestTimeTraining


@dataclass(frozen=True)
class Persistence:
    """What of the adaptation outlives a stage or a process (the ``persistence`` option).

    Args:
        keep_adapted: keep the adapted parameters after the stage instead of restoring the source model (without an
            ``optimizer``, only ``norm="ema"`` changes the model). Default ``False``.
        save_every_n_batches: write the adaptation state (``adaptation_state()``) to ``save_path`` every N batches,
            so an interrupted online adaptation can resume. Default ``None`` (never).
        save_path: the file (its folder is created); ``{rank}`` in it is replaced by the process rank (required with
            several processes); needs ``save_every_n_batches``. Default ``None``.
        resume_from: a file written by ``save_every_n_batches``: the stage starts from that state instead of the
            source model. Feed it the stream from sample ``samples_seen`` of the saved state on (see the README's
            resume recipe) to get the predictions of an uninterrupted run. Default ``None``.

    Raises:
        TypeError: for a path that is not a file name.
        ValueError: for a bad value, ``save_every_n_batches`` without ``save_path`` or the other way round.
    """

    keep_adapted: bool = False
    save_every_n_batches: int | None = None
    save_path: str | None = None
    resume_from: str | None = None

    def __post_init__(self) -> None:
        check_bool("persistence.keep_adapted", self.keep_adapted)
        for name in ("save_path", "resume_from"):
            path = getattr(self, name)
            if path is not None and not isinstance(path, str | os.PathLike):
                raise TypeError(f"`persistence.{name}`={path!r} must be a file name (a str or path) or None.")
        every = self.save_every_n_batches
        if every is not None:
            check_int("persistence.save_every_n_batches", every, 1)
            if not self.save_path:
                raise ValueError(f"`persistence.save_every_n_batches`={every} needs a `persistence.save_path`.")
        why = "it is where `save_every_n_batches` writes the adaptation state, and save_every_n_batches=None"
        if every is None:
            check_unused("persistence.save_path", self.save_path, None, why, "Set `save_every_n_batches` or drop it")

    def given(self) -> list[str]:
        """The options set to other values than their defaults, as ``persistence.<name>``."""
        return [f"persistence.{f.name}" for f in fields(self) if not is_default(getattr(self, f.name), f.default)]

    def due(self, batches_seen: int) -> bool:
        """Whether the state is saved after batch number ``batches_seen``."""
        every = self.save_every_n_batches
        return every is not None and batches_seen > 0 and batches_seen % every == 0

    def save(self, state: dict[str, Any], rank: int, world_size: int) -> None:
        """Write ``state`` to ``save_path`` (``{rank}`` replaced by ``rank``).

        Raises:
            ValueError: with several processes and no ``{rank}`` in the path.
        """
        assert self.save_path is not None
        if world_size > 1 and "{rank}" not in os.fspath(self.save_path):
            raise ValueError(
                f"`persistence.save_path`={self.save_path!r} needs a '{{rank}}' placeholder with several processes."
            )
        path = os.fspath(self.save_path).replace("{rank}", str(rank))
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        torch.save(state, path)

    def load(self, preset: str) -> dict[str, Any]:
        """The state saved in ``resume_from``, checked by :func:`check_state`."""
        assert self.resume_from is not None
        return check_state(torch.load(self.resume_from, map_location="cpu", weights_only=False), preset)


def check_state(state: Any, preset: str) -> dict[str, Any]:
    """Return ``state`` if it is an adaptation state saved by ``preset`` (the class name).

    Raises:
        ValueError: for anything else.
    """
    if not isinstance(state, dict) or "preset" not in state:
        got = f"a dict with keys {sorted(map(str, state))}" if isinstance(state, dict) else type(state).__name__
        raise ValueError(
            f"{preset} cannot resume from {got}: not an adaptation state written by "
            "`persistence.save_every_n_batches` or adaptation_state(). Check `persistence.resume_from`."
        )
    if state["preset"] != preset:
        raise ValueError(f"The adaptation state was saved by {state['preset']}, not {preset}.")
    return state


def adaptation_state(tt: "TestTimeTraining") -> dict[str, Any]:
    """The full adaptation state of ``tt`` during a stage (empty outside one): the model's parameters and buffers, the
    source state, the updater's (optimizer, scheduler, figures), the reset policy's, the anchors', the correction's,
    the preset's own state, the random state and the counters."""
    source = tt._source
    if source is None or source.tensors is None:
        return {}
    return {
        "preset": type(tt).__name__,
        "model": {k: v.detach().clone() for k, v in tt._module.state_dict().items()},
        "source": source.tensors,
        "updater": None if tt.updater is None else tt.updater.state(),
        "resets": tt.resetter.state(),
        "anchors": [anchor.state() for anchor in tt.anchors],
        "correction": tt.correction.state(),
        "extra": tt.extra_state(),
        "counters": {"samples_seen": tt.samples_seen, "batches_seen": tt.batches_seen},
        "torch_rng": torch.get_rng_state(),
    }


def load_adaptation_state(tt: "TestTimeTraining", state: dict[str, Any]) -> None:
    """Continue ``tt`` from an :func:`adaptation_state` (an empty state, as saved outside a stage, is ignored).

    Raises:
        ValueError: for a state that is not an adaptation state of ``tt``'s class.
    """
    if not state:
        return
    check_state(state, type(tt).__name__)
    tt._module.load_state_dict(state["model"])
    assert tt._source is not None and tt._source.tensors is not None
    tt._source.tensors.update(state["source"])
    if tt.updater is not None:
        tt.updater.load_state(state["updater"])
    tt.resetter.load_state(state["resets"])
    for anchor, saved in zip(tt.anchors, state["anchors"], strict=True):
        anchor.load_state(saved, tt._params)
    tt.correction.load_state(state["correction"])
    tt.load_extra_state(state["extra"])
    tt.samples_seen, tt.batches_seen = state["counters"]["samples_seen"], state["counters"]["batches_seen"]
    torch.set_rng_state(state["torch_rng"])
