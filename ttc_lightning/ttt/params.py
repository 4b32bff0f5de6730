"""Which parameters test-time training adapts."""

import re
from collections.abc import Sequence

from torch import nn

#: Named groups of normalisation layers.
NORM_LAYERS: dict[str, tuple[type[nn.Module], ...]] = {
    "batchnorm": (nn.modules.batchnorm._BatchNorm,),
    "groupnorm": (nn.GroupNorm,),
    "layernorm": (nn.LayerNorm,),
    "instancenorm": (nn.modules.instancenorm._InstanceNorm,),
}
NORM_LAYERS["norm"] = tuple(t for group in NORM_LAYERS.values() for t in group)
ParamSpec = str | type[nn.Module] | Sequence[str | type[nn.Module]]


def select_parameters(module: nn.Module, params: ParamSpec = "batchnorm") -> dict[str, nn.Parameter]:
    """The parameters of ``module`` chosen by ``params``, by qualified name.

    Args:
        module: the model.
        params: ``"batchnorm"`` (affine weight and bias of the BatchNorm family, tent's choice; the default),
            ``"groupnorm"``, ``"layernorm"``, ``"instancenorm"``, ``"norm"`` (all of these), ``"all"``, a module
            type (its direct parameters), a string ``"re:<pattern>"`` matched against qualified parameter names, or
            a list of these (their union).

    Raises:
        ValueError: for an unknown name, or when nothing is selected (the model has no adaptable parameters).
    """
    specs = [params] if isinstance(params, str | type) else list(params)
    chosen: dict[str, nn.Parameter] = {}
    for spec in specs:
        chosen.update(_select_one(module, spec))
    if not chosen:
        raise ValueError(
            f"`params`={params!r} selects no parameters of {type(module).__name__}: the model has no adaptable "
            "parameters of that kind. Choose other layers (e.g. params='norm' or 're:<pattern>')."
        )
    return chosen


def _select_one(module: nn.Module, spec: str | type[nn.Module]) -> dict[str, nn.Parameter]:
    if spec == "all":
        return dict(module.named_parameters())
    if isinstance(spec, str) and spec.startswith("re:"):
        pattern = re.compile(spec[3:])
        return {name: p for name, p in module.named_parameters() if pattern.search(name)}
    if isinstance(spec, str):
        if spec not in NORM_LAYERS:
            allowed = ", ".join([*NORM_LAYERS, "all", "re:<pattern>", "a module type"])
            raise ValueError(f"`params`={spec!r} is not supported; allowed: {allowed}.")
        types = NORM_LAYERS[spec]
    elif isinstance(spec, type) and issubclass(spec, nn.Module):
        types = (spec,)
    else:
        raise TypeError(f"`params` entries must be names or nn.Module types; got {spec!r}.")
    return {
        f"{prefix}.{name}" if prefix else name: p
        for prefix, sub in module.named_modules()
        if isinstance(sub, types)
        for name, p in sub.named_parameters(recurse=False)
    }
