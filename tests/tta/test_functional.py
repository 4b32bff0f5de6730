"""Pure tensor ops of ``ttc_lightning.tta.functional``: coordinate frame, rot90 direction, image/point agreement."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from ttc_lightning.tta import functional as F

IMAGE_OPS = {
    "hflip": (F.hflip, lambda p, size: F.points_hflip(p, size)),
    "vflip": (F.vflip, lambda p, size: F.points_vflip(p, size)),
    "transpose": (F.transpose, lambda p, size: F.points_transpose(p)),
    **{
        f"rot90({k})": (lambda x, k=k: F.rot90(x, k), lambda p, size, k=k: F.points_rot90(p, k, size))
        for k in (-1, 0, 1, 2, 3, 5)
    },
}


def bright_pixel(shape, i, j):
    x = torch.zeros(shape)
    x[..., i, j] = 1.0
    return x


def where(x):
    """(row, col) of the single nonzero pixel of an (H, W) image."""
    (i, j), *rest = torch.nonzero(x).tolist()
    assert not rest
    return i, j


# --- the frame and the direction of rot90, pinned by hand -------------------------------------------------------------


def test_rot90_is_counter_clockwise_on_square_and_non_square_images():
    square = torch.tensor([[1, 2], [3, 4]])
    assert F.rot90(square, 1).tolist() == [[2, 4], [1, 3]]  # top-right corner goes to top-left
    assert F.rot90(square, -1).tolist() == [[3, 1], [4, 2]]
    assert F.rot90(square, 2).tolist() == [[4, 3], [2, 1]]
    wide = torch.tensor([[1, 2, 3], [4, 5, 6]])
    assert F.rot90(wide, 1).tolist() == [[3, 6], [2, 5], [1, 4]]
    assert F.rot90(wide, 3).tolist() == [[4, 1], [5, 2], [6, 3]]
    batch = torch.arange(2 * 3 * 2 * 5).reshape(2, 3, 2, 5)
    assert torch.equal(F.rot90(batch, 1), torch.rot90(batch, 1, (2, 3)))  # ttach's convention on (B, C, H, W)


def test_flips_and_transpose_by_hand():
    x = torch.tensor([[1, 2, 3], [4, 5, 6]])
    assert F.hflip(x).tolist() == [[3, 2, 1], [6, 5, 4]]
    assert F.vflip(x).tolist() == [[4, 5, 6], [1, 2, 3]]
    assert F.transpose(x).tolist() == [[1, 4], [2, 5], [3, 6]]


def test_point_ops_by_hand_in_the_continuous_pixel_frame():
    # an image of H=3 rows, W=4 columns spans [0, 4] x [0, 3]; (x, y) = (0.5, 0.5) is the top-left pixel's center
    size = (3, 4)
    p = torch.tensor([[0.5, 0.5], [0.0, 0.0], [4.0, 3.0], [1.0, 2.0]])
    assert F.points_hflip(p, size).tolist() == [[3.5, 0.5], [4.0, 0.0], [0.0, 3.0], [3.0, 2.0]]
    assert F.points_vflip(p, size).tolist() == [[0.5, 2.5], [0.0, 3.0], [4.0, 0.0], [1.0, 1.0]]
    assert F.points_transpose(p).tolist() == [[0.5, 0.5], [0.0, 0.0], [3.0, 4.0], [2.0, 1.0]]
    # counter-clockwise quarter turn: the top-left corner goes to the bottom-left of the (W=3, H=4) result
    assert F.points_rot90(p, 1, size).tolist() == [[0.5, 3.5], [0.0, 4.0], [3.0, 0.0], [2.0, 3.0]]
    assert F.points_rot90(p, 2, size).tolist() == [[3.5, 2.5], [4.0, 3.0], [0.0, 0.0], [3.0, 1.0]]
    assert F.points_rot90(p, 3, size).tolist() == [[2.5, 0.5], [3.0, 0.0], [0.0, 4.0], [1.0, 1.0]]
    assert F.points_rot90(p, -1, size).tolist() == F.points_rot90(p, 3, size).tolist()
    assert F.points_resize(p, size, (6, 2)).tolist() == [[0.25, 1.0], [0.0, 0.0], [2.0, 6.0], [0.5, 4.0]]


def test_point_ops_keep_extra_columns_and_leading_dims():
    p = torch.rand(2, 5, 4) * 3
    for name, (_, point_op) in IMAGE_OPS.items():
        out = point_op(p, (3, 4))
        assert out.shape == p.shape, name
        assert torch.equal(out[..., 2:], p[..., 2:]), name
    out = F.points_resize(p, (3, 4), (7, 1))
    assert out.shape == p.shape and torch.equal(out[..., 2:], p[..., 2:])


# --- image ops and point ops agree pixel for pixel --------------------------------------------------------------------


@settings(max_examples=60, deadline=None)
@given(
    op=st.sampled_from(sorted(IMAGE_OPS)),
    h=st.integers(1, 7),
    w=st.integers(1, 7),
    data=st.data(),
)
def test_a_bright_pixel_moves_where_the_point_op_sends_its_center(op, h, w, data):
    i, j = data.draw(st.integers(0, h - 1)), data.draw(st.integers(0, w - 1))
    image_op, point_op = IMAGE_OPS[op]
    out = image_op(bright_pixel((2, 3, h, w), i, j))
    assert out.shape[:2] == (2, 3)
    i2, j2 = where(out[1, 2])
    center = torch.tensor([j + 0.5, i + 0.5])
    assert point_op(center, (h, w)).tolist() == [j2 + 0.5, i2 + 0.5]
    # and the corners of the pixel's cell map to the corners of the new cell (boxes ride on this)
    box = torch.tensor([[float(j), float(i), j + 1.0, i + 1.0]])
    moved = F.points_as_boxes(point_op(F.boxes_as_points(box), (h, w)))
    assert moved.tolist() == [[j2, i2, j2 + 1.0, i2 + 1.0]]


@settings(max_examples=40, deadline=None)
@given(h=st.integers(1, 6), w=st.integers(1, 6), k=st.integers(-4, 7), seed=st.integers(0, 2**16))
def test_point_rot90_inverse_and_composition(h, w, k, seed):
    g = torch.Generator().manual_seed(seed)
    p = torch.rand(5, 3, generator=g) * torch.tensor([w, h, 1.0])
    rotated = F.points_rot90(p, k, (h, w))
    new_size = (w, h) if k % 2 else (h, w)
    torch.testing.assert_close(F.points_rot90(rotated, -k, new_size), p, rtol=0, atol=1e-5)
    one = F.points_rot90(p, 1, (h, w))
    torch.testing.assert_close(F.points_rot90(one, 1, (w, h)), F.points_rot90(p, 2, (h, w)), rtol=0, atol=1e-5)
    # hflip and vflip are their own inverses; their product is rot90(2)
    torch.testing.assert_close(F.points_hflip(F.points_hflip(p, (h, w)), (h, w)), p, rtol=0, atol=1e-5)
    both = F.points_vflip(F.points_hflip(p, (h, w)), (h, w))
    torch.testing.assert_close(both, F.points_rot90(p, 2, (h, w)), rtol=0, atol=1e-5)


def test_image_ops_keep_leading_dims_and_act_on_the_last_two():
    x = torch.arange(2 * 3 * 4 * 5 * 6.0).reshape(2, 3, 4, 5, 6)
    assert torch.equal(F.hflip(x), x.flip(4))
    assert torch.equal(F.vflip(x), x.flip(3))
    assert torch.equal(F.transpose(x), x.permute(0, 1, 2, 4, 3))
    assert torch.equal(F.rot90(x, 1), torch.rot90(x, 1, (3, 4)))
    assert torch.equal(F.crop(x, 1, 2, 3, 4), x[..., 1:4, 2:6])


# --- resize -----------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["nearest", "bilinear", "bicubic", "area"])
def test_resize_matches_interpolate_on_any_leading_dims(mode):
    x = torch.randn(2, 3, 4, 5, 7, generator=torch.Generator().manual_seed(0))
    out = F.resize(x, (9, 4), mode)
    assert out.shape == (2, 3, 4, 9, 4)
    align = False if mode in ("bilinear", "bicubic") else None
    expected = torch.nn.functional.interpolate(x.reshape(2, 12, 5, 7), size=(9, 4), mode=mode, align_corners=align)
    torch.testing.assert_close(out, expected.reshape(2, 3, 4, 9, 4), rtol=0, atol=1e-6)
    assert F.resize(x, (5, 7), mode) is x


def test_resize_keeps_constants_and_points_resize_matches_pixel_centers():
    x = torch.full((1, 1, 5, 7), 3.25)
    assert torch.allclose(F.resize(x, (8, 3)), torch.full((1, 1, 8, 3), 3.25))
    # an integer upscale with 'nearest' copies pixel (i, j) to a block whose center is the scaled point
    big = F.resize(bright_pixel((1, 1, 3, 4), 1, 2), (6, 12), "nearest")[0, 0]
    rows, cols = torch.nonzero(big).T
    center = torch.tensor([cols.float().mean() + 0.5, rows.float().mean() + 0.5])
    assert F.points_resize(torch.tensor([2.5, 1.5]), (3, 4), (6, 12)).tolist() == center.tolist()


# --- boxes as corner points -------------------------------------------------------------------------------------------


def test_boxes_as_points_and_back_keep_extra_columns_and_reorder_corners():
    boxes = torch.tensor([[[1.0, 2.0, 4.0, 6.0, 0.5, 7.0]], [[0.0, 0.0, 1.0, 1.0, 0.25, 3.0]]])
    corners = F.boxes_as_points(boxes)
    assert corners.shape == (2, 1, 2, 4)
    assert corners[0, 0].tolist() == [[1.0, 2.0, 0.5, 7.0], [4.0, 6.0, 0.5, 7.0]]
    assert torch.equal(F.points_as_boxes(corners), boxes)
    swapped = corners.flip(-2)  # corners in the wrong order come back as x1 <= x2, y1 <= y2
    assert torch.equal(F.points_as_boxes(swapped), boxes)
    mixed = torch.tensor([[[5.0, 1.0], [2.0, 3.0]]])  # (x2, y1) and (x1, y2)
    assert F.points_as_boxes(mixed).tolist() == [[2.0, 1.0, 5.0, 3.0]]
