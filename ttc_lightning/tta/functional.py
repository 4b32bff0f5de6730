"""Pure tensor operations on image batches ``(B, ..., H, W)`` and on point coordinates.

Points are ``(..., D)`` tensors whose first two columns are ``(x, y)`` in continuous pixel coordinates, the image
spanning ``[0, W] x [0, H]``; further columns (visibility, score) pass through unchanged. Boxes are ``xyxy`` in the
same frame. ``size`` arguments are ``(H, W)`` of the image the points currently live in.
"""

import torch
import torch.nn.functional as F
from torch import Tensor

Size = tuple[int, int]


def hflip(x: Tensor) -> Tensor:
    """Mirror left-right (reverse the last dimension)."""
    return x.flip(-1)


def vflip(x: Tensor) -> Tensor:
    """Mirror top-bottom (reverse the second-to-last dimension)."""
    return x.flip(-2)


def rot90(x: Tensor, k: int) -> Tensor:
    """Rotate ``k`` quarter turns counter-clockwise, as ``torch.rot90(x, k, (-2, -1))``."""
    return torch.rot90(x, k, (-2, -1))


def transpose(x: Tensor) -> Tensor:
    """Swap the two spatial axes (mirror about the main diagonal)."""
    return x.transpose(-2, -1)


def resize(x: Tensor, size: Size, mode: str = "bilinear") -> Tensor:
    """Resize the last two dimensions to ``size`` with ``torch.nn.functional.interpolate``."""
    if tuple(x.shape[-2:]) == tuple(size):
        return x
    align = False if mode in ("bilinear", "bicubic") else None
    flat = x.reshape(1, -1, *x.shape[-2:])
    out = F.interpolate(flat, size=tuple(size), mode=mode, align_corners=align)
    return out.reshape(*x.shape[:-2], *size)


def crop(x: Tensor, top: int, left: int, height: int, width: int) -> Tensor:
    """Cut the window ``[top, top + height) x [left, left + width)``."""
    return x[..., top : top + height, left : left + width]


def _with_xy(points: Tensor, x: Tensor, y: Tensor) -> Tensor:
    return torch.cat([x.unsqueeze(-1), y.unsqueeze(-1), points[..., 2:]], dim=-1)


def points_hflip(points: Tensor, size: Size) -> Tensor:
    """Point coordinates after :func:`hflip` of an image of ``size``: ``x -> W - x``."""
    return _with_xy(points, size[1] - points[..., 0], points[..., 1])


def points_vflip(points: Tensor, size: Size) -> Tensor:
    """Point coordinates after :func:`vflip`: ``y -> H - y``."""
    return _with_xy(points, points[..., 0], size[0] - points[..., 1])


def points_rot90(points: Tensor, k: int, size: Size) -> Tensor:
    """Point coordinates after :func:`rot90` by ``k`` of an image of ``size``."""
    x, y = points[..., 0], points[..., 1]
    height, width = size
    k %= 4
    if k == 1:
        x, y = y, width - x
    elif k == 2:
        x, y = width - x, height - y
    elif k == 3:
        x, y = height - y, x
    return _with_xy(points, x, y)


def points_transpose(points: Tensor) -> Tensor:
    """Point coordinates after :func:`transpose`: ``(x, y) -> (y, x)``."""
    return _with_xy(points, points[..., 1], points[..., 0])


def points_resize(points: Tensor, size: Size, new_size: Size) -> Tensor:
    """Point coordinates after :func:`resize` from ``size`` to ``new_size``."""
    return _with_xy(points, points[..., 0] * (new_size[1] / size[1]), points[..., 1] * (new_size[0] / size[0]))


def boxes_as_points(boxes: Tensor) -> Tensor:
    """``(..., 4 + E)`` xyxy boxes to ``(..., 2, 2 + E)`` corner points, extra columns copied to both corners."""
    extra = boxes[..., 4:]
    first = torch.cat([boxes[..., 0:2], extra], dim=-1)
    second = torch.cat([boxes[..., 2:4], extra], dim=-1)
    return torch.stack([first, second], dim=-2)


def points_as_boxes(corners: Tensor) -> Tensor:
    """Inverse of :func:`boxes_as_points`, re-ordering corners so that ``x1 <= x2`` and ``y1 <= y2``."""
    xy = corners[..., :2]
    low, high = xy.amin(dim=-2), xy.amax(dim=-2)
    return torch.cat([low, high, corners[..., 0, 2:]], dim=-1)
