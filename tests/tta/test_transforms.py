"""Transforms, views and their composition: exact inverses, points, aliases (ttach parity), scales, crops, registry."""

import math

import pytest
import torch
import ttach
from hypothesis import given, settings
from hypothesis import strategies as st

import ttc_lightning as ttc
from ttc_lightning.tta import functional as F
from ttc_lightning.tta import registry as R
from ttc_lightning.tta.params import INTERPOLATIONS
from ttc_lightning.tta.registry import resolve_transforms
from ttc_lightning.tta.views import expand

EXACT_SPECS = {
    "hflip": "hflip",
    "vflip": "vflip",
    "rot90": "rot90",
    "transpose": "transpose",
    "flip": "flip",
    "d4": "d4",
    "transpose*rot90*vflip": lambda: [ttc.Transpose(), ttc.Rotate90(), ttc.VFlip()],
    "rot90(3,1)*hflip*transpose": lambda: [ttc.Rotate90((3, 1)), ttc.HFlip(), ttc.Transpose()],
}


def views_of(spec):
    return ttc.expand_views(spec() if callable(spec) else spec)


def rand(shape, seed):
    return torch.rand(shape, generator=torch.Generator().manual_seed(seed))


def forward_points(view, points, size):
    """The test's own forward map of points through a view, step by step with the functional point ops."""
    h, w = size
    for transform, param in view.steps:
        if isinstance(transform, ttc.HFlip) and param:
            points = F.points_hflip(points, (h, w))
        elif isinstance(transform, ttc.VFlip) and param:
            points = F.points_vflip(points, (h, w))
        elif isinstance(transform, ttc.Transpose) and param:
            points, (h, w) = F.points_transpose(points), (w, h)
        elif isinstance(transform, ttc.Rotate90):
            points = F.points_rot90(points, param, (h, w))
            h, w = (w, h) if param % 2 else (h, w)
        elif isinstance(transform, ttc.Scale):
            new = (max(1, math.floor(h * param)), max(1, math.floor(w * param)))
            points, (h, w) = F.points_resize(points, (h, w), new), new
    return points, (h, w)


image_shapes = st.tuples(
    st.integers(1, 3),  # batch
    st.lists(st.integers(1, 3), max_size=2),  # channel-like dims
    st.integers(1, 7),  # H
    st.integers(1, 7),  # W
)


# --- exact invertibility ----------------------------------------------------------------------------------------------


@settings(max_examples=80, deadline=None)
@given(spec=st.sampled_from(sorted(EXACT_SPECS)), shape=image_shapes, seed=st.integers(0, 2**16))
def test_every_view_deaugments_its_augmentation_exactly(spec, shape, seed):
    batch, dims, h, w = shape
    x = rand((batch, *dims, h, w), seed)
    for view in views_of(EXACT_SPECS[spec]):
        y = view.augment(x)
        assert y.shape[:-2] == x.shape[:-2]
        assert tuple(y.shape[-2:]) == view.sizes((h, w))[-1]
        assert sorted(y.flatten().tolist()) == sorted(x.flatten().tolist())  # a permutation of the pixels
        assert torch.equal(view.deaugment(y, (h, w)), x), str(view)


@settings(max_examples=80, deadline=None)
@given(spec=st.sampled_from(sorted(EXACT_SPECS)), h=st.integers(1, 9), w=st.integers(1, 9), seed=st.integers(0, 2**16))
def test_points_mapped_forward_come_back_through_deaugment_points(spec, h, w, seed):
    g = torch.Generator().manual_seed(seed)
    points = torch.rand(2, 6, 4, generator=g) * torch.tensor([w, h, 1.0, 1.0])  # (x, y, visibility, score)
    for view in views_of(EXACT_SPECS[spec]):
        moved, size = forward_points(view, points, (h, w))
        assert size == view.sizes((h, w))[-1]
        assert ((moved[..., 0] >= 0) & (moved[..., 0] <= size[1]) & (moved[..., 1] >= 0)).all()
        back = view.deaugment_points(moved, (h, w))
        torch.testing.assert_close(back, points, rtol=0, atol=1e-5, msg=str(view))
        assert torch.equal(back[..., 2:], points[..., 2:])


@settings(max_examples=80, deadline=None)
@given(spec=st.sampled_from(sorted(EXACT_SPECS)), h=st.integers(1, 7), w=st.integers(1, 7), data=st.data())
def test_a_bright_pixel_lands_where_the_point_ops_send_its_center(spec, h, w, data):
    i, j = data.draw(st.integers(0, h - 1)), data.draw(st.integers(0, w - 1))
    x = torch.zeros(1, 2, h, w)
    x[:, 1, i, j] = 1.0
    center = torch.tensor([[j + 0.5, i + 0.5]])
    for view in views_of(EXACT_SPECS[spec]):
        (i2, j2), *rest = torch.nonzero(view.augment(x)[0, 1]).tolist()
        assert not rest
        moved, _ = forward_points(view, center, (h, w))
        assert moved.tolist() == [[j2 + 0.5, i2 + 0.5]], str(view)
        assert view.deaugment_points(torch.tensor([[j2 + 0.5, i2 + 0.5]]), (h, w)).tolist() == center.tolist()


def test_rotate90_view_turns_counter_clockwise_and_maps_points_back():
    (identity, quarter, half, three), x = views_of(lambda: [ttc.Rotate90()]), torch.tensor([[[[1, 2, 3], [4, 5, 6]]]])
    assert identity.augment(x).tolist() == [[[[1, 2, 3], [4, 5, 6]]]]
    assert quarter.augment(x).tolist() == [[[[3, 6], [2, 5], [1, 4]]]]
    assert half.augment(x).tolist() == [[[[6, 5, 4], [3, 2, 1]]]]
    assert three.augment(x).tolist() == [[[[4, 1], [5, 2], [6, 3]]]]
    # the pixel "3" (row 0, col 2) is at row 0, col 0 after the quarter turn: its center (0.5, 0.5) maps back
    assert quarter.deaugment_points(torch.tensor([[0.5, 0.5]]), (2, 3)).tolist() == [[2.5, 0.5]]
    assert three.deaugment_points(torch.tensor([[0.5, 0.5]]), (2, 3)).tolist() == [[0.5, 1.5]]


def test_d4_is_the_dihedral_group_and_reflects_counts_mirrors():
    x = rand((1, 1, 5, 5), 0)
    d4 = views_of("d4")
    images = [v.augment(x) for v in d4]
    assert all(not torch.equal(a, b) for n, a in enumerate(images) for b in images[n + 1 :])
    # transpose x rot90 x vflip covers each of the 8 group elements exactly twice
    other = [v.augment(x) for v in views_of(EXACT_SPECS["transpose*rot90*vflip"])]
    assert len(other) == 16
    for image in images:
        assert sum(torch.equal(image, o) for o in other) == 2
    # a view reflects iff its point map reverses orientation (negative determinant)
    frame = torch.tensor([[0.0, 0.0], [1.0, 0.0], [0.0, 1.0]])
    for view in d4 + views_of(EXACT_SPECS["transpose*rot90*vflip"]) + views_of("flip"):
        (o, a, b), _ = forward_points(view, frame, (5, 5))
        det = (a - o)[0] * (b - o)[1] - (a - o)[1] * (b - o)[0]
        assert view.reflects == (det < 0).item(), str(view)
    assert [v.reflects for v in d4] == [False] * 4 + [True] * 4


# --- composition and aliases (ttach semantics) ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("ours", "theirs"),
    [
        ("d4", ttach.aliases.d4_transform),
        ([ttc.HFlip(), ttc.Rotate90()], ttach.aliases.d4_transform),
        ("flip", ttach.aliases.flip_transform),
        ("hflip", ttach.aliases.hflip_transform),
        ("vflip", ttach.aliases.vlip_transform),
    ],
)
def test_views_match_ttach_view_by_view(ours, theirs):
    h, w = 5, 7
    x, mask = rand((2, 3, h, w), 1), rand((2, 4, h, w), 2)
    kp = rand((2, 6, 2), 3)  # ttach: normalised (x, y) in [0, 1]
    views, compose = views_of(ours), list(theirs())
    assert len(views) == len(compose)
    assert views[0].augment(x) is x or torch.equal(views[0].augment(x), x)  # identity first
    for view, t in zip(views, compose, strict=True):
        assert torch.equal(view.augment(x), t.augment_image(x)), str(view)
        y = view.augment(mask)  # a dense output in the augmented frame
        assert torch.equal(view.deaugment(y, (h, w)), t.deaugment_mask(y)), str(view)
        ah, aw = view.sizes((h, w))[-1]
        ours_kp = view.deaugment_points(kp * torch.tensor([aw, ah]), (h, w)) / torch.tensor([w, h])
        torch.testing.assert_close(ours_kp, t.deaugment_keypoints(kp), rtol=0, atol=1e-6)


def test_multiscale_matches_ttach_with_nearest_where_sizes_are_whole():
    x = rand((2, 3, 8, 16), 4)
    views = views_of(ttc.Scale(interpolation="nearest"))
    compose = list(ttach.aliases.multiscale_transform([0.875, 1.125]))
    for view, t in zip(views, compose, strict=True):
        assert torch.equal(view.augment(x), t.augment_image(x)), str(view)


@pytest.mark.parametrize(
    ("alias", "labels"),
    [
        ("identity", ["identity(None)"]),
        ("hflip", ["hflip(False)", "hflip(True)"]),
        ("vflip", ["vflip(False)", "vflip(True)"]),
        ("flip", [f"hflip({h})*vflip({v})" for h in (False, True) for v in (False, True)]),
        ("d4", [f"hflip({h})*rot90({k})" for h in (False, True) for k in range(4)]),
        ("multiscale", ["scale(1.0)", "scale(0.875)", "scale(1.125)"]),
        ("five_crop", [f"five_crop({p})" for p in ("center", "top_left", "top_right", "bottom_left", "bottom_right")]),
        (
            "ten_crop",
            [
                f"hflip({h})*five_crop({p})"
                for h in (False, True)
                for p in ("center", "top_left", "top_right", "bottom_left", "bottom_right")
            ],
        ),
    ],
)
def test_aliases_expand_to_the_documented_views(alias, labels):
    assert [str(v) for v in views_of(alias)] == labels
    assert resolve_transforms(alias)[0] is not resolve_transforms(alias)[0]  # a fresh list each time
    crops = [t for t in resolve_transforms(alias) if isinstance(t, ttc.FiveCrop)]
    assert all(c.size == 0.875 for c in crops)


def test_expand_views_is_public_and_gives_the_augmenters_views_in_order():
    """``ttc.expand_views`` (also ``ttc.tta.expand_views``) is the product order TTA runs: identity first."""
    assert ttc.expand_views is ttc.tta.expand_views
    x = torch.arange(6.0).view(1, 1, 2, 3)
    for spec in ("d4", "flip", "multiscale", ["vflip", ttc.Rotate90((2,)), "multiply"]):
        views = ttc.expand_views(spec)
        assert all(isinstance(v, ttc.tta.View) for v in views)
        assert [str(v) for v in views] == [str(v) for v in ttc.Augmenter(spec).views]
        assert [str(v) for v in views] == [str(v) for v in expand(resolve_transforms(spec))]
        assert torch.equal(views[0].augment(x), x)  # identity first
    with pytest.raises(ValueError, match="`transforms`='hflp'"):
        ttc.expand_views("hflp")


def test_a_list_mixes_names_objects_and_aliases_last_transform_fastest():
    rot = ttc.Rotate90((2,))
    transforms = resolve_transforms(["vflip", rot, "flip", "multiply"])
    assert [type(t) for t in transforms] == [ttc.VFlip, ttc.Rotate90, ttc.HFlip, ttc.VFlip, ttc.Multiply]
    assert transforms[1] is rot and rot.params == (0, 2)
    views = expand(transforms)
    assert len(views) == 2 * 2 * 2 * 2 * 3
    assert [p for _, p in views[0].steps] == [False, 0, False, False, 1.0]
    assert [p for _, p in views[1].steps] == [False, 0, False, False, 0.9]
    assert [p for _, p in views[3].steps] == [False, 0, False, True, 1.0]
    assert [p for _, p in views[-1].steps] == [True, 2, True, True, 1.1]
    assert resolve_transforms(rot) == [rot]
    assert [type(t) for t in resolve_transforms(("hflip", "rot90"))] == [ttc.HFlip, ttc.Rotate90]


def test_resolve_transforms_errors_name_the_problem():
    with pytest.raises(ValueError, match="'hflp'") as info:
        resolve_transforms("hflp")
    for name in ("hflip", "vflip", "flip", "d4", "multiscale", "five_crop", "ten_crop", "rot90", "transpose"):
        assert name in str(info.value)
    with pytest.raises(ValueError, match="allowed"):
        resolve_transforms(["hflip", "nope"])
    for bad in (3, None, [], (), {"hflip": 1}, ttc.HFlip):
        with pytest.raises(TypeError, match="transforms"):
            resolve_transforms(bad)
    for bad in (["hflip", 3], ["hflip", ["vflip"]], [ttc.HFlip, "vflip"]):
        with pytest.raises(TypeError, match="entries"):
            resolve_transforms(bad)


@pytest.mark.parametrize("bad", [2.5, None])
def test_resize_names_the_argument_for_a_non_int_non_pair_size(bad):
    # DESIGN section 6: arguments validated eagerly with messages naming the argument
    with pytest.raises((ValueError, TypeError), match="`sizes`"):
        ttc.Resize([bad])


def test_constructors_validate_and_put_the_identity_first():
    assert ttc.Rotate90((3, 1)).params == (0, 3, 1)
    assert ttc.Rotate90((2, 0)).params == (0, 2)
    assert ttc.Scale((2, 0.5)).params == (1.0, 2.0, 0.5)
    assert ttc.Add((0.5,)).params == (0.0, 0.5)
    assert ttc.Multiply((2,)).params == (1.0, 2.0)
    assert ttc.Resize([5, (3, 4)]).params == (None, (5, 5), (3, 4))
    for bad in [(4,), (-1,), (1.0,), (True,)]:
        with pytest.raises(ValueError, match="`ks`"):
            ttc.Rotate90(bad)
    for bad in [(0.0,), (-1.0,), ("2",), (True,)]:
        with pytest.raises(ValueError, match="`scales`"):
            ttc.Scale(bad)
    with pytest.raises(ValueError, match=r"`interpolation`='linear'.*bilinear"):
        ttc.Scale(interpolation="linear")
    for bad in [[0], [(3, 4, 5)], [(3, 0)], [(2.5, 3)]]:
        with pytest.raises(ValueError, match="`sizes`"):
            ttc.Resize(bad)
    for bad in [0.0, 1.5, 0, (3, 0), (True, 2)]:
        with pytest.raises(ValueError, match="`size`"):
            ttc.FiveCrop(bad)
    with pytest.raises(ValueError, match="at least one parameter"):
        ttc.Transform(())


# --- Scale and Resize -------------------------------------------------------------------------------------------------


@settings(max_examples=60, deadline=None)
@given(
    h=st.integers(1, 13),
    w=st.integers(1, 13),
    factor=st.sampled_from([0.1, 0.3, 0.5, 0.75, 0.875, 1.125, 1.5, 2.0, 2.7]),
    mode=st.sampled_from(INTERPOLATIONS),
)
def test_scale_restores_the_exact_original_size(h, w, factor, mode):
    x = rand((2, 3, h, w), h * w)
    view = views_of(ttc.Scale((factor,), interpolation=mode))[1]
    expected = (max(1, math.floor(h * factor)), max(1, math.floor(w * factor)))
    assert view.sizes((h, w)) == [(h, w), expected]
    y = view.augment(x)
    assert y.shape == (2, 3, *expected)
    assert view.deaugment(y, (h, w)).shape == (2, 3, h, w)
    points = rand((1, 4, 2), 5) * torch.tensor([w, h])
    moved, size = forward_points(view, points, (h, w))
    assert size == expected
    torch.testing.assert_close(view.deaugment_points(moved, (h, w)), points, rtol=0, atol=1e-5)


def test_scale_output_size_floors_like_interpolate_and_keeps_one():
    scale = ttc.Scale()
    assert scale.output_size((10, 7), 0.875) == (8, 6)  # 8.75, 6.125
    assert scale.output_size((9, 5), 1.125) == (10, 5)  # 10.125, 5.625
    assert scale.output_size((3, 2), 0.1) == (1, 1)
    assert scale.output_size((8, 16), 0.875) == (7, 14)


@pytest.mark.parametrize(("h", "w"), [(7, 7), (9, 13), (16, 11)])
@pytest.mark.parametrize("factor", [2, 3])
def test_integer_upscale_with_nearest_is_exactly_invertible(h, w, factor):
    x = rand((2, 3, h, w), 6)
    view = views_of(ttc.Scale((factor,), interpolation="nearest"))[1]
    y = view.augment(x)
    assert y.shape[-2:] == (h * factor, w * factor)
    assert torch.equal(view.deaugment(y, (h, w)), x)


@pytest.mark.parametrize(("h", "w"), [(33, 33), (31, 45), (48, 27)])
@pytest.mark.parametrize("transform", [ttc.Scale((0.75, 0.875, 1.125, 1.5)), ttc.Resize([(40, 40), (25, 37)])])
@pytest.mark.parametrize("mode", ["bilinear", "bicubic"])
def test_scale_and_resize_approximately_recover_a_smooth_image(h, w, transform, mode):
    transform.interpolation = mode
    rows = torch.linspace(0, 1, h).view(h, 1)
    cols = torch.linspace(0, 1, w).view(1, w)
    x = torch.stack([torch.sin(2.0 * rows + 1.0 * cols), torch.cos(1.5 * cols - rows) * rows]).unsqueeze(0)
    rough = rand((1, 2, h, w), 7)
    for view in views_of(transform)[1:]:
        back = view.deaugment(view.augment(x), (h, w))
        assert back.shape == x.shape
        assert (back - x).abs().max() < 0.03, str(view)
        # a non-smooth image is not recovered: the check above has teeth
        assert (view.deaugment(view.augment(rough), (h, w)) - rough).abs().max() > 0.1


def test_resize_deaugment_needs_the_input_resolution():
    view = views_of(ttc.Resize([(6, 6)]))[1]
    y = torch.zeros(1, 2, 3, 3)  # half the augmented (6, 6) resolution
    with pytest.raises(ValueError, match=r"resolution.*\(3, 3\)"):
        view.deaugment(y, (10, 12))


# --- FiveCrop ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("h", "w", "size", "crop"),
    [(9, 12, (5, 8), (5, 8)), (8, 8, 3, (3, 3)), (10, 7, 0.5, (5, 3)), (10, 7, 0.875, (8, 6)), (6, 5, (6, 5), (6, 5))],
)
def test_five_crop_positions_center_first_then_corners(h, w, size, crop):
    x = torch.arange(2 * h * w).reshape(2, 1, h, w)
    ch, cw = crop
    top, left = h // 2 - ch // 2, w // 2 - cw // 2  # ttach's center crop
    expected = [
        x[..., top : top + ch, left : left + cw],
        x[..., :ch, :cw],
        x[..., :ch, w - cw :],
        x[..., h - ch :, :cw],
        x[..., h - ch :, w - cw :],
    ]
    views = views_of(ttc.FiveCrop(size))
    for view, ref in zip(views, expected, strict=True):
        assert torch.equal(view.augment(x), ref), str(view)
        assert view.sizes((h, w))[-1] == crop
        view.check((h, w))


@pytest.mark.parametrize(("size", "image"), [((6, 3), (5, 9)), (10, (9, 12)), ((3, 13), (9, 12))])
def test_a_crop_larger_than_the_image_raises_before_any_forward(size, image):
    calls = []

    def forward(x):
        calls.append(x.shape)
        return x.mean((-2, -1))

    augmenter = ttc.Augmenter(ttc.FiveCrop(size), chunk_size=1)
    with pytest.raises(ValueError, match=r"larger than the image \(" + str(image[0])):
        augmenter(forward, torch.zeros(2, 3, *image))
    assert calls == []
    augmenter = ttc.Augmenter(["hflip", ttc.FiveCrop(size)], chunk_size=None)
    with pytest.raises(ValueError, match="larger than the image"):
        augmenter(forward, torch.zeros(2, 3, *image))
    assert calls == []


def test_ten_crop_classification_averages_the_crops_and_their_mirrors():
    x = rand((2, 3, 8, 10), 8)
    weights = rand((3, 7, 4), 9)

    def forward(z):  # position-dependent on purpose: uses a fixed (7, 4) crop window
        return torch.einsum("bchw,chw->b", z[..., :7, :4], weights).unsqueeze(1)

    merged, _ = ttc.Augmenter("ten_crop", chunk_size=None)(forward, x)

    def crops(z):  # 0.875 of (8, 10) -> (7, 8) (floored); the center crop starts at (1, 1)
        return [z[..., 1:8, 1:9], z[..., :7, :8], z[..., :7, 2:], z[..., 1:, :8], z[..., 1:, 2:]]

    # the flip is applied first, then the crop (ttach's order: hflip outer)
    expected = sum(forward(c) for c in crops(x) + crops(x.flip(-1))) / 10
    torch.testing.assert_close(merged, expected)


# --- register_transform -----------------------------------------------------------------------------------------------


@pytest.fixture
def registry():
    """Restores the global transform registry after the test (labels are set on the test's own classes)."""
    saved = dict(R._REGISTRY)
    yield
    R._REGISTRY.clear()
    R._REGISTRY.update(saved)


def make_roll(name):
    @ttc.register_transform(name)
    class Roll(ttc.Transform):
        def __init__(self, shifts=(0, 2, -3)):
            super().__init__(shifts)

        def augment(self, x, param):
            return x.roll(param, dims=-1)

        def deaugment(self, y, param, size):
            return y.roll(-param, dims=-1)

    return Roll


@pytest.mark.parametrize("chunk_size", [1, None])
def test_a_registered_transform_is_used_by_name_and_inverts(registry, chunk_size):
    roll = make_roll("test_roll_by_name")
    assert isinstance(resolve_transforms("test_roll_by_name")[0], roll)
    x = rand((2, 3, 5, 6), 10)
    views = views_of(["hflip", "test_roll_by_name"])
    assert [str(v) for v in views][:3] == [
        "hflip(False)*test_roll_by_name(0)",
        "hflip(False)*test_roll_by_name(2)",
        "hflip(False)*test_roll_by_name(-3)",
    ]
    for view in views:
        assert torch.equal(view.deaugment(view.augment(x), (5, 6)), x)
    conv = torch.nn.Conv2d(3, 4, 1)
    seen = []

    def forward(z):
        seen.append(z.clone())
        return conv(z)

    augmenter = ttc.Augmenter(["hflip", "test_roll_by_name"], task="segmentation", chunk_size=chunk_size)
    with torch.no_grad():
        merged, _ = augmenter(forward, x)
        torch.testing.assert_close(merged, conv(x), rtol=0, atol=1e-6)
    inputs = torch.cat(seen)
    assert torch.equal(inputs[2:4], x.roll(2, dims=-1)) and torch.equal(inputs[-2:], x.flip(-1).roll(-3, dims=-1))
    # no deaugment_points: not invertible for coordinates
    with pytest.raises(ValueError, match="task='keypoints'"):
        ttc.Augmenter("test_roll_by_name", task="keypoints")


def test_register_rejects_non_transforms_and_taken_names(registry):
    with pytest.raises(TypeError, match="Transform"):
        ttc.register_transform("test_not_a_transform")(object)
    with pytest.raises(TypeError, match="Transform"):
        ttc.register_transform("test_not_a_transform")(lambda x: x)
    assert "test_not_a_transform" not in R._REGISTRY
    make_roll("test_roll_twice")
    with pytest.raises(ValueError, match="'test_roll_twice'"):
        make_roll("test_roll_twice")
    for taken in ("hflip", "d4", "ten_crop", "rot90"):
        with pytest.raises(ValueError, match=f"'{taken}'"):
            make_roll(taken)
    assert R._REGISTRY["hflip"] is ttc.HFlip


def test_a_transform_without_deaugment_is_rejected_for_dense_tasks_at_construction(registry):
    @ttc.register_transform("test_shift_no_inverse")
    class ShiftNoInverse(ttc.Transform):
        def __init__(self):
            super().__init__((0, 1))

        def augment(self, x, param):
            return x.roll(param, dims=-2)

    for task in ("segmentation", "keypoints", "boxes"):
        with pytest.raises(ValueError, match=f"ShiftNoInverse.*task='{task}'"):
            ttc.Augmenter(["hflip", "test_shift_no_inverse"], task=task)
    # fine where labels do not move
    merged, _ = ttc.Augmenter("test_shift_no_inverse")(lambda z: z.sum((-2, -1)), torch.ones(2, 3, 4, 4))
    assert torch.equal(merged, torch.full((2, 3), 16.0))
