"""ModuleSnapshot: bitwise capture and restore of parameters, buffers, modes and requires_grad flags."""

import copy

import torch
from torch import nn

from ttc_lightning.state import ModuleSnapshot


def bits(t):
    return t.detach().reshape(-1).view(torch.uint8)


def same_bits(a, b) -> bool:
    """Bitwise equality (tells -0.0 from 0.0), or both ``None``."""
    if a is None or b is None:
        return a is None and b is None
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(bits(a), bits(b))


def module() -> nn.Sequential:
    torch.manual_seed(0)
    stateless_bn = nn.BatchNorm2d(4, track_running_stats=False)  # running statistics are None buffers
    net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Dropout(0.2), stateless_bn)
    with torch.no_grad():
        net[1].running_mean.uniform_()
        net[1].running_var.uniform_(1, 2)
        net[1].num_batches_tracked.fill_(7)
        net[0].bias[0] = -0.0
    net.train()
    net[2].eval()
    net[0].bias.requires_grad_(False)
    return net


def tensors(net):
    """Every parameter and buffer slot by name, ``None`` buffers included."""
    out = {name: p for name, p in net.named_parameters()}
    for prefix, sub in net.named_modules():
        out.update({f"{prefix}.{name}": b for name, b in sub._buffers.items()})
    return out


def assert_same_state(net, expected):
    got, want = tensors(net), tensors(expected)
    assert got.keys() == want.keys()
    for name in want:
        assert same_bits(got[name], want[name]), name
    assert {n: m.training for n, m in net.named_modules()} == {n: m.training for n, m in expected.named_modules()}
    assert {n: p.requires_grad for n, p in net.named_parameters()} == {
        n: p.requires_grad for n, p in expected.named_parameters()
    }


def scramble(net):
    """Change every kind of state a strategy may touch."""
    with torch.no_grad():
        for p in net.parameters():
            p.add_(1.0)
        net[0].bias[0] = 0.0  # only the sign bit differs from the captured -0.0
        net[1].num_batches_tracked.add_(3)
    net[1].running_mean = torch.zeros(4)  # the buffer object replaced
    net[1].running_var = None  # a buffer dropped
    net[3].running_mean = torch.ones(4)  # a buffer that was None now set
    net.eval()
    net[2].train()
    for p in net.parameters():
        p.requires_grad_(not p.requires_grad)


def test_restore_is_bitwise_for_tensors_modes_and_flags():
    net = module()
    expected = copy.deepcopy(net)
    snapshot = ModuleSnapshot.capture(net)
    scramble(net)
    snapshot.restore(net)
    assert_same_state(net, expected)
    assert net[3].running_mean is None


def test_snapshot_is_independent_of_later_changes_and_reusable():
    net = module()
    expected = copy.deepcopy(net)
    snapshot = ModuleSnapshot.capture(net)
    for _ in range(2):
        scramble(net)
        snapshot.restore(net)
        with torch.no_grad():  # in-place changes after restore must not reach the snapshot
            for t in tensors(net).values():
                if t is not None:
                    t.add_(1)
        snapshot.restore(net)
        assert_same_state(net, expected)


def test_restore_copies_into_existing_tensors():
    net = module()
    snapshot = ModuleSnapshot.capture(net)
    weight, running_mean = net[0].weight, net[1].running_mean
    with torch.no_grad():
        weight.mul_(2)
        running_mean.mul_(2)
    snapshot.restore(net)
    assert net[0].weight is weight and net[1].running_mean is running_mean  # optimizers keep their references


def test_without_tensors_only_modes_and_flags_are_restored():
    net = module()
    expected = copy.deepcopy(net)
    snapshot = ModuleSnapshot.capture(net, tensors=False)
    assert snapshot.tensors is None
    with torch.no_grad():
        net[0].weight.add_(1.0)
    net.eval()
    net[0].weight.requires_grad_(False)
    snapshot.restore(net)
    assert {n: m.training for n, m in net.named_modules()} == {n: m.training for n, m in expected.named_modules()}
    assert [p.requires_grad for p in net.parameters()] == [p.requires_grad for p in expected.parameters()]
    assert torch.equal(net[0].weight, expected[0].weight + 1.0)  # values untouched
