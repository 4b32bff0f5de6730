"""Structured-config schemas of the library's callbacks, so that a misspelt argument fails when Hydra composes.

Each schema is a dataclass built from the callback's signature, registered in Hydra's ConfigStore as
``<group>/<name>_schema``; an option group of a :class:`~ttc_lightning.TestTimeTraining` preset
(``updates=Updates(...)``, ``resets``, ``persistence``) becomes a nested node with its own ``_target_`` and fields, so
``ttc.ttt.persistence.keep_adapted=true`` is checked too. A YAML config of a strategy starts with
``defaults: [<name>_schema, _self_]``; composing it then checks every key against the schema. Defaults that are
``functools.partial`` factories become ``{_target_, _partial_: true, ...}`` nodes, whose keys stay open (another
optimizer may take other arguments). The library itself never imports Hydra: this module lives with the recipes.

Call :func:`register` before composing (the recipes and tests do).
"""

import dataclasses
import functools
import inspect
from dataclasses import field, make_dataclass
from typing import Any

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING

import ttc_lightning as ttc

#: (Hydra group, schema name, callback class) of every strategy config.
STRATEGIES: list[tuple[str, str, type]] = [
    ("ttc/tta", "tta", ttc.TestTimeAugmentation),
    ("ttc/iterative", "iterative", ttc.IterativeInference),
    ("ttc/ttt", "bn", ttc.BatchNormAdapt),
    ("ttc/ttt", "tent", ttc.Tent),
    ("ttc/ttt", "eata", ttc.EATA),
    ("ttc/ttt", "sar", ttc.SAR),
    ("ttc/ttt", "memo", ttc.MEMO),
    ("ttc/ttt", "cotta", ttc.CoTTA),
]


def _target(obj: Any) -> str:
    return f"{obj.__module__}.{obj.__qualname__}"


def _node(default: Any) -> tuple[Any, Any]:
    """The (type, dataclass field) of a signature default."""
    if default is inspect.Parameter.empty:
        return Any, field(default=MISSING)
    if isinstance(default, functools.partial):
        node = {"_target_": _target(default.func), "_partial_": True, **default.keywords}
        return dict[str, Any] | None, field(default_factory=lambda: dict(node))
    if dataclasses.is_dataclass(default) and not isinstance(default, type):
        group = _group(type(default))
        return group, field(default_factory=group)
    if isinstance(default, tuple | list):
        return Any, field(default_factory=lambda: list(default))
    if default is None or isinstance(default, bool | int | float | str):
        return Any, field(default=default)
    raise TypeError(f"No config form for the default {default!r}; give it one in recipes/schemas.py.")


@functools.cache
def _group(cls: type) -> type:
    """The schema of an option group (a dataclass such as :class:`~ttc_lightning.Updates`): ``_target_`` and its
    fields with their defaults."""
    fields: list[tuple[str, Any, Any]] = [("_target_", str, field(default=f"ttc_lightning.{cls.__name__}"))]
    fields += [(f.name, *_node(f.default)) for f in dataclasses.fields(cls)]
    return make_dataclass(f"{cls.__name__}Config", fields)


def schema(cls: type) -> type:
    """A dataclass with ``_target_`` and one field per argument of ``cls`` (nested ones for option groups)."""
    parameters = dict(inspect.signature(cls).parameters)
    fields: list[tuple[str, Any, Any]] = [("_target_", str, field(default=f"ttc_lightning.{cls.__name__}"))]
    for name, parameter in parameters.items():
        if parameter.kind in (parameter.VAR_POSITIONAL, parameter.VAR_KEYWORD):
            continue
        fields.append((name, *_node(parameter.default)))
    return make_dataclass(f"{cls.__name__}Config", fields)


@functools.cache
def register() -> None:
    """Store every strategy schema in Hydra's ConfigStore (once per process)."""
    store = ConfigStore.instance()
    for group, name, cls in STRATEGIES:
        store.store(group=group, name=f"{name}_schema", node=schema(cls))
