"""RandomAugment: seeded, per-sample, per-rank random views; range-agnostic (normalised inputs); validation."""

import pytest
import torch

import ttc_lightning as ttc
from ttc_lightning.ops import seeding
from ttc_lightning.ops.augmix import OPERATIONS, RandomAugment


def batch(n=6, c=3, h=9, w=7, seed=0, dtype=torch.float32):
    return torch.rand(n, c, h, w, generator=torch.Generator().manual_seed(seed), dtype=dtype)


def views(augment, x, k=3):
    return [augment(x) for _ in range(k)]


def test_public_name():
    assert ttc.RandomAugment is RandomAugment


def test_same_seed_same_views_different_seed_different_views():
    x = batch()
    a, b, c = views(RandomAugment(seed=3), x), views(RandomAugment(seed=3), x), views(RandomAugment(seed=4), x)
    for u, v in zip(a, b, strict=True):
        assert torch.equal(u, v)
    for u, v in zip(a, c, strict=True):
        assert not torch.allclose(u, v)
    assert not torch.allclose(a[0], a[1])  # successive draws differ


def test_seed_is_independent_of_the_global_rng():
    x = batch()
    torch.manual_seed(0)
    first = RandomAugment(seed=1)(x)
    torch.manual_seed(123)
    torch.rand(10)
    assert torch.equal(RandomAugment(seed=1)(x), first)


def test_each_sample_gets_its_own_draw():
    image = batch(1)
    x = image.repeat(4, 1, 1, 1)
    out = RandomAugment(seed=0)(x)
    for i in range(4):
        for j in range(i + 1, 4):
            assert not torch.allclose(out[i], out[j]), (i, j)


def test_a_sample_does_not_depend_on_its_neighbours_values():
    """The draws depend on the batch size only, not on the values: changing one sample leaves the others' views."""
    x = batch(5)
    y = x.clone()
    y[2] = torch.rand(y[2].shape, generator=torch.Generator().manual_seed(9)) * 10 - 5
    a, b = RandomAugment(seed=2)(x), RandomAugment(seed=2)(y)
    keep = [0, 1, 3, 4]
    torch.testing.assert_close(a[keep], b[keep])


@pytest.mark.parametrize(
    ("shape", "dtype"),
    [((6, 3, 9, 7), torch.float32), ((1, 1, 5, 5), torch.float32), ((4, 2, 6, 11), torch.float64)],
)
def test_shape_and_dtype_kept_and_outputs_finite(shape, dtype):
    x = torch.rand(*shape, generator=torch.Generator().manual_seed(1), dtype=dtype)
    augment = RandomAugment(seed=0)
    for _ in range(5):
        out = augment(x)
        assert out.shape == x.shape and out.dtype == x.dtype and out.device == x.device
        assert torch.isfinite(out).all()


def test_views_stay_near_the_image():
    """A blend of the image with bounded operations: views differ from the input but stay at its scale."""
    x = batch(16)
    out = RandomAugment(seed=0)(x)
    assert not torch.allclose(out, x)
    assert (out - x).abs().mean() < x.std()
    assert out.abs().max() < 3 * x.abs().max()


def test_constant_images_are_finite():
    """Zero standard deviation (a blank image) must not produce NaN in the std-relative operations."""
    x = torch.full((8, 3, 6, 6), 0.7)
    out = RandomAugment(seed=0)(x)
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out, x)  # every operation keeps a constant image constant


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_works_on_normalised_inputs(seed):
    """Range-agnostic: every operation commutes with a per-tensor shift and a positive scale (photometric magnitudes
    are relative to each image's own mean and std), so a normalised image (negative values, any range) gets the
    view of the raw image, normalised; nothing is clamped to [0, 1]."""
    x = batch(8)
    mean, std = 0.45, 0.22
    normalised = (x - mean) / std
    assert (normalised < 0).any()
    raw = RandomAugment(seed=seed)(x)
    out = RandomAugment(seed=seed)(normalised)
    torch.testing.assert_close(out, (raw - mean) / std, rtol=1e-4, atol=1e-4)
    assert (out < 0).any() and (out > 1).any()


def test_state_dict_reproduces_the_next_draws():
    x = batch()
    augment = RandomAugment(seed=5)
    augment(x)
    state = augment.state_dict()
    expected = views(augment, x)
    augment.load_state_dict(state)
    for u, v in zip(views(augment, x), expected, strict=True):
        assert torch.equal(u, v)
    other = RandomAugment(seed=99)  # the state, not the seed, decides
    other.load_state_dict(state)
    for u, v in zip(views(other, x), expected, strict=True):
        assert torch.equal(u, v)


def test_state_dict_is_a_copy():
    augment = RandomAugment(seed=5)
    state = augment.state_dict()
    saved = state["generator"].clone()
    augment(batch())
    assert torch.equal(state["generator"], saved)


@pytest.mark.parametrize(
    ("options", "name"),
    [
        (dict(severity=0), "severity"),
        (dict(severity=2), "severity"),
        (dict(severity=-0.5), "severity"),
        (dict(width=0), "width"),
        (dict(depth=0), "depth"),
        (dict(alpha=-1), "alpha"),
        (dict(alpha=0), "alpha"),
    ],
)
def test_bad_arguments_name_the_argument(options, name):
    with pytest.raises(ValueError, match=f"`{name}`"):
        RandomAugment(**options)


@pytest.mark.parametrize("shape", [(3, 8, 8), (2, 3, 4, 8, 8), (8,)])
def test_non_4d_input_is_an_error(shape):
    with pytest.raises(ValueError, match=r"\(B, C, H, W\)"):
        RandomAugment()(torch.zeros(shape))


def test_seeded_per_rank(monkeypatch):
    """Each process uses seed + rank: rank 1 draws differ from rank 0's and equal rank 0's with seed + 1."""
    x = batch()
    rank0 = RandomAugment(seed=0)(x)
    seed1 = RandomAugment(seed=1)(x)
    monkeypatch.setattr(seeding, "process_rank", lambda: 1)
    rank1 = RandomAugment(seed=0)(x)
    assert not torch.allclose(rank1, rank0)
    assert torch.equal(rank1, seed1)


def test_rank_is_read_when_the_generator_is_first_used(monkeypatch):
    """Built in the parent process (rank unknown), seeded in the worker: the rank of first use counts."""
    expected = RandomAugment(seed=3)(batch())  # rank 0
    augment = RandomAugment(seed=0)
    monkeypatch.setattr(seeding, "process_rank", lambda: 3)
    assert torch.equal(augment(batch()), expected)


def test_severity_scales_the_change():
    """Over many samples, views at severity 0.1 stay closer to the image than at severity 1 (same draws)."""
    x = batch(64, seed=3)
    mild = (RandomAugment(seed=0, severity=0.1)(x) - x).abs().mean()
    strong = (RandomAugment(seed=0, severity=1.0)(x) - x).abs().mean()
    assert mild < strong


def test_every_operation_is_used():
    """With many samples and chains, each operation of OPERATIONS is drawn (spied on the private appliers)."""
    seen = set()
    augment = RandomAugment(seed=0)
    for name in OPERATIONS:
        method = getattr(augment, f"_{name}")

        def spy(x, method=method, name=name):
            seen.add(name)
            return method(x)

        setattr(augment, f"_{name}", spy)
    augment(batch(32))
    assert seen == set(OPERATIONS)
