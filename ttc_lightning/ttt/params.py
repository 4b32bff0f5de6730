"""Which parameters test-time training adapts."""

import re
from collections.abc import Sequence

import torch
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
    specs = check_params(params)
    chosen: dict[str, nn.Parameter] = {}
    for spec in specs:
        chosen.update(_select_one(module, spec))
    if not chosen:
        raise ValueError(
            f"`params`={params!r} selects no parameters of {type(module).__name__}: the model has no adaptable "
            "parameters of that kind. Choose other layers (e.g. params='norm' or 're:<pattern>')."
        )
    return chosen


def adapted_parameters(module: nn.Module, params: ParamSpec) -> list[nn.Parameter]:
    """The parameters chosen by ``params`` (see :func:`select_parameters`), set to require gradients alone.

    Raises:
        ValueError: as :func:`select_parameters`, and for parameters held in half precision.
    """
    chosen = select_parameters(module, params)
    low = sorted(name for name, p in chosen.items() if p.dtype in (torch.float16, torch.bfloat16))
    if low:
        raise ValueError(
            f"Test-time training cannot update low-precision parameters ({low[0]} is "
            f"{chosen[low[0]].dtype}); use precision='bf16-mixed' or '16-mixed' instead of a '-true' one."
        )
    module.requires_grad_(False)
    return [p.requires_grad_(True) for p in chosen.values()]


def check_params(params: ParamSpec) -> list[str | type[nn.Module]]:
    """The entries of ``params`` after checking their names and types (no model needed)."""
    if isinstance(params, str | type):
        specs = [params]
    elif isinstance(params, Sequence):
        specs = list(params)
        if not specs:
            raise ValueError("`params`=[] selects no parameters; give at least one name, type or pattern.")
    else:
        raise TypeError(f"`params` must be a name, a module type or a list of those; got {params!r}.")
    allowed = ", ".join([*NORM_LAYERS, "all", "re:<pattern>", "a module type"])
    for spec in specs:
        if isinstance(spec, str):
            if spec != "all" and not spec.startswith("re:") and spec not in NORM_LAYERS:
                raise ValueError(f"`params`={spec!r} is not supported; allowed: {allowed}.")
            if spec.startswith("re:"):
                try:
                    re.compile(spec[3:])
                except re.error as error:
                    raise ValueError(f"`params`={spec!r} is not a valid regular expression: {error}.") from error
        elif not (isinstance(spec, type) and issubclass(spec, nn.Module)):
            raise TypeError(f"`params` entries must be names or nn.Module types; got {spec!r}.")
    return specs


def _select_one(module: nn.Module, spec: str | type[nn.Module]) -> dict[str, nn.Parameter]:
    if spec == "all":
        return dict(module.named_parameters())
    if isinstance(spec, str) and spec.startswith("re:"):
        pattern = re.compile(spec[3:])
        return {name: p for name, p in module.named_parameters() if pattern.search(name)}
    types = NORM_LAYERS[spec] if isinstance(spec, str) else (spec,)
    return {
        f"{prefix}.{name}" if prefix else name: p
        for prefix, sub in module.named_modules()
        if isinstance(sub, types)
        for name, p in sub.named_parameters(recurse=False)
    }
