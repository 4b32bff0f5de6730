"""Parameter selection for test-time training: named groups, "all", module types, patterns, lists, errors."""

import functools

import lightning as L
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import ttc_lightning as ttc
from ttc_lightning.ttt.params import select_parameters


def zoo() -> nn.Sequential:
    """One layer of every kind, with the names their parameters get written out in EXPECTED."""
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1),  # 0
        nn.BatchNorm2d(4),  # 1
        nn.GroupNorm(2, 4),  # 2
        nn.InstanceNorm2d(4, affine=True),  # 3
        nn.InstanceNorm2d(4),  # 4: no parameters
        nn.BatchNorm2d(4, affine=False),  # 5: no parameters
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(4, 6),  # 8
        nn.LayerNorm(6),  # 9
        nn.BatchNorm1d(6),  # 10
        nn.Linear(6, 3),  # 11
    )


def pair(index: int) -> set[str]:
    return {f"{index}.weight", f"{index}.bias"}


EXPECTED = {
    "batchnorm": pair(1) | pair(10),
    "groupnorm": pair(2),
    "layernorm": pair(9),
    "instancenorm": pair(3),
    "norm": pair(1) | pair(2) | pair(3) | pair(9) | pair(10),
    "all": pair(0) | pair(1) | pair(2) | pair(3) | pair(8) | pair(9) | pair(10) | pair(11),
}


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_named_groups_select_exactly_their_layers(name):
    net = zoo()
    chosen = select_parameters(net, name)
    assert set(chosen) == EXPECTED[name]
    named = dict(net.named_parameters())
    assert all(chosen[key] is named[key] for key in chosen)  # the module's own Parameter objects, not copies


def test_default_is_the_batchnorm_family():
    net = zoo()
    assert set(select_parameters(net)) == EXPECTED["batchnorm"]


def test_batchnorm_family_includes_subclasses():
    class MyNorm(nn.BatchNorm2d):
        pass

    net = nn.Sequential(nn.Conv2d(3, 4, 1), MyNorm(4), nn.BatchNorm3d(4), nn.SyncBatchNorm(4))
    assert set(select_parameters(net, "batchnorm")) == pair(1) | pair(2) | pair(3)


@pytest.mark.parametrize(
    ("module_type", "expected"),
    [(nn.Linear, pair(8) | pair(11)), (nn.Conv2d, pair(0)), (nn.BatchNorm1d, pair(10)), (nn.GroupNorm, pair(2))],
)
def test_module_type_selects_direct_parameters_of_its_instances(module_type, expected):
    assert set(select_parameters(zoo(), module_type)) == expected


def test_module_type_takes_direct_parameters_only():
    class Block(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.scale = nn.Parameter(torch.ones(1))
            self.inner = nn.Linear(2, 2)

    net = nn.Sequential(Block(), nn.Linear(2, 2))
    assert set(select_parameters(net, Block)) == {"0.scale"}
    assert set(select_parameters(net, nn.Linear)) == {"0.inner.weight", "0.inner.bias", "1.weight", "1.bias"}


@pytest.mark.parametrize(
    ("pattern", "expected"),
    [
        ("re:bias$", {f"{i}.bias" for i in (0, 1, 2, 3, 8, 9, 10, 11)}),
        (r"re:^1[01]?\.", pair(1) | pair(10) | pair(11)),
        ("re:^9.weight$", {"9.weight"}),
    ],
)
def test_patterns_search_qualified_names(pattern, expected):
    assert set(select_parameters(zoo(), pattern)) == expected


@pytest.mark.parametrize(
    ("spec", "expected"),
    [
        (["groupnorm", "layernorm"], pair(2) | pair(9)),
        (("batchnorm", nn.Linear), pair(1) | pair(10) | pair(8) | pair(11)),
        (["re:^0\\.", "batchnorm", "re:^1\\."], pair(0) | pair(1) | pair(10)),  # overlaps counted once
        ([nn.Conv2d, "re:^11.weight$"], pair(0) | {"11.weight"}),
    ],
)
def test_lists_select_the_union(spec, expected):
    chosen = select_parameters(zoo(), spec)
    assert set(chosen) == expected
    assert len(chosen) == len(expected)


def test_nested_modules_get_qualified_names():
    net = nn.Sequential(nn.Sequential(nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4)), nn.Flatten())
    assert set(select_parameters(net)) == {"0.1.weight", "0.1.bias"}


def test_shared_layer_is_selected_once():
    bn = nn.BatchNorm1d(3)
    net = nn.Sequential(bn, nn.ReLU(), bn)
    chosen = select_parameters(net)
    assert len({id(p) for p in chosen.values()}) == len(chosen) == 2


@pytest.mark.parametrize("name", ["batchnrom", "BatchNorm", "bn", "re", ""])
def test_unknown_name_is_a_value_error_listing_allowed(name):
    with pytest.raises(ValueError, match="`params`") as info:
        select_parameters(zoo(), name)
    assert "batchnorm" in str(info.value) and "re:<pattern>" in str(info.value)


@pytest.mark.parametrize("spec", [[3], [torch.Tensor], [None], ["batchnorm", str], int])
def test_wrong_entry_types_are_type_errors_naming_params(spec):
    with pytest.raises(TypeError, match="`params`"):
        select_parameters(zoo(), spec)


@pytest.mark.parametrize("spec", [3, None, 2.5])
def test_wrong_top_level_types_are_type_errors_naming_params(spec):
    with pytest.raises(TypeError, match="`params`"):
        select_parameters(zoo(), spec)


@pytest.mark.parametrize(
    ("net", "spec"),
    [
        (nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU()), "batchnorm"),
        (nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4, affine=False)), "batchnorm"),
        (nn.Sequential(nn.Conv2d(3, 4, 3), nn.InstanceNorm2d(4)), "norm"),
        (nn.Sequential(nn.Conv2d(3, 4, 3)), "re:^nothing"),
        (nn.Sequential(nn.Conv2d(3, 4, 3)), []),
        (nn.Sequential(nn.ReLU()), "all"),
    ],
)
def test_nothing_to_adapt_is_a_value_error_naming_params(net, spec):
    with pytest.raises(ValueError, match="`params`") as info:
        select_parameters(net, spec)
    assert "no" in str(info.value) and "parameters" in str(info.value)


# Through the callback ---------------------------------------------------------------------------------------------


class NoNorm(ttc.TestTimeComputeMixin, L.LightningModule):
    """A conv classifier without any normalisation layer; counts forward calls."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.net = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 4))
        self.calls = 0

    def forward(self, x):
        self.calls += 1
        return self.net(x)


def loader() -> DataLoader:
    return DataLoader(TensorDataset(torch.randn(12, 3, 6, 6, generator=torch.Generator().manual_seed(0))), 4)


def test_tent_on_a_model_without_batchnorm_fails_clearly_before_any_batch(make_trainer):
    model = NoNorm()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    trainer = make_trainer([ttc.Tent()])
    with pytest.raises(ValueError, match="`params`='batchnorm' selects no parameters of NoNorm"):
        trainer.predict(model, loader())
    assert model.calls == 0
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert {n: p.requires_grad for n, p in model.named_parameters()} == flags
    assert "forward" not in model.__dict__
    assert trainer.predict_loop.inference_mode is True


def test_params_selecting_nothing_on_a_batchnorm_model_leaves_the_model_as_it_was(make_trainer):
    """The error comes at the start of the run; the BatchNorm layers must not keep any test-time statistics policy."""
    model = NoNorm()
    model.net[1] = nn.Sequential(nn.BatchNorm2d(8), nn.ReLU())
    with torch.no_grad():
        model.net[1][0].running_mean.uniform_(-1, 1)
    plain = torch.cat(make_trainer([]).predict(model, loader()))
    trainer = make_trainer([ttc.Tent(params="re:^nothing")])
    with pytest.raises(ValueError, match="`params`='re:\\^nothing' selects no parameters"):
        trainer.predict(model, loader())
    assert model.calls == 3  # the plain run's
    assert all("forward" not in vars(m) for m in model.modules())
    assert torch.equal(torch.cat(make_trainer([]).predict(model, loader())), plain)


def test_callback_params_choose_what_adapts(make_trainer):
    """Tent(params=nn.Linear) on a model without BatchNorm adapts the linear layer and nothing else."""
    model = NoNorm()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    changed = {}

    class Probe(L.Callback):
        def on_predict_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0):
            for name, p in pl_module.named_parameters():
                changed[name] = changed.get(name, False) or not torch.equal(p, before[name])

    opt = functools.partial(torch.optim.SGD, lr=0.5)
    trainer = make_trainer([ttc.Tent(optimizer=opt, params=nn.Linear), Probe()])
    trainer.predict(model, loader())
    assert changed == {"net.0.weight": False, "net.0.bias": False, "net.4.weight": True, "net.4.bias": True}
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())  # restored afterwards


def test_unknown_params_name_is_rejected_by_the_constructor():
    """DESIGN 6: arguments are validated eagerly in ``__init__``; a misspelt group needs no model to be wrong."""
    with pytest.raises(ValueError, match="`params`"):
        ttc.Tent(params="batchnrom")
    with pytest.raises(ValueError, match="`params`"):
        ttc.TestTimeTraining(optimizer=functools.partial(torch.optim.SGD, lr=0.1), params="bn")
