"""De-augmentation per task through ``Augmenter``: segmentation, keypoints, boxes, with exactly equivariant toy models.

A model ``M`` that commutes with a view ``g`` (``M(g x) = g M(x)``) must get its own output back from TTA: each view's
output, mapped back, equals ``M(x)``. Chiral models (equivariant under rotations, swapping left/right labels under
mirrors) get it back only with ``flip_classes`` / ``flip_pairs``.
"""

import inspect
import math
import re

import pytest
import torch
import torch.nn.functional as tnf

import ttc_lightning as ttc

CHUNKS = [1, None]
SHAPES = [(6, 6), (5, 8)]
SPATIAL = ["d4", "flip", "transpose", [ttc.Transpose(), ttc.Rotate90(), ttc.VFlip()]]


def rand(shape, seed):
    return torch.rand(shape, generator=torch.Generator().manual_seed(seed))


def run(forward, x, **kwargs):
    with torch.no_grad():
        merged, extras = ttc.Augmenter(merge="mean", **kwargs)(forward, x)
    assert extras == {}
    return merged


def spec_id(spec):
    return spec if isinstance(spec, str) else "*".join(type(t).__name__ for t in spec)


# --- models -----------------------------------------------------------------------------------------------------------


def pixel_model():
    """A per-pixel 1x1 conv: commutes with every permutation of pixels."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        conv = torch.nn.Conv2d(3, 4, 1)
    return lambda x: conv(x)


def _chiral_kernels():
    """A 5x5 kernel invariant under quarter turns but not under mirrors, its mirror image, and their sum."""
    seed = torch.zeros(5, 5)
    seed[0, 1] = 1.0
    seed[1, 2] = 0.5
    left = sum(torch.rot90(seed, k) for k in range(4))
    right = left.flip(-1)
    assert not torch.equal(left, right)
    assert all(torch.equal(torch.rot90(left, k), left) for k in range(4))
    assert torch.equal(left.transpose(0, 1), right) and torch.equal(left.flip(0), right)
    return torch.stack([left, right, left + right]).unsqueeze(1)


CHIRAL = _chiral_kernels()


def chiral_segmenter(x):
    """(B, 1, H, W) -> 3 classes: 'left-handed', 'right-handed', achiral. Mirrors swap classes 0 and 1."""
    return tnf.conv2d(x, CHIRAL, torch.tensor([0.1, 0.1, 0.3]), padding=2)  # paired classes share their bias


def centroids(x):
    """Intensity-weighted centroid per channel of (B, K, H, W), in pixel coordinates (centers at j + 0.5, i + 0.5)."""
    h, w = x.shape[-2:]
    cols = torch.arange(w, dtype=x.dtype) + 0.5
    rows = torch.arange(h, dtype=x.dtype) + 0.5
    mass = x.sum((-2, -1))
    return torch.stack([(x.sum(-2) * cols).sum(-1) / mass, (x.sum(-1) * rows).sum(-1) / mass], dim=-1)


def keypoint_model(x):
    """(B, K, H, W) -> (B, K, 3): centroid (x, y) and the channel's mass, which passes through unchanged."""
    return torch.cat([centroids(x), x.sum((-2, -1)).unsqueeze(-1)], dim=-1)


def chiral_keypoints(x):
    """(B, 3, H, W), one spot per channel: nose = channel 0; of the other two, keypoint 1 is the one with the
    positive cross product (c1 - c0) x (c2 - c0). Rotations keep that sign, mirrors flip it: keypoints 1 and 2 swap."""
    c = centroids(x)
    a, b = c[:, 1] - c[:, 0], c[:, 2] - c[:, 0]
    positive = (a[:, 0] * b[:, 1] - a[:, 1] * b[:, 0] > 0).view(-1, 1)
    first = torch.where(positive, c[:, 1], c[:, 2])
    second = torch.where(positive, c[:, 2], c[:, 1])
    return torch.stack([c[:, 0], first, second], dim=1)


def box_model(x):
    """(B, N, H, W) -> (B, N, 5): [min col, min row, max col + 1, max row + 1] of nonzero pixels, and their count."""
    h, w = x.shape[-2:]
    on = x != 0
    rows_on, cols_on = on.any(-1), on.any(-2)
    rows = torch.arange(h).expand_as(rows_on)
    cols = torch.arange(w).expand_as(cols_on)
    big = max(h, w) + 1
    boxes = torch.stack(
        [
            torch.where(cols_on, cols, big).amin(-1),
            torch.where(rows_on, rows, big).amin(-1),
            torch.where(cols_on, cols, -1).amax(-1) + 1,
            torch.where(rows_on, rows, -1).amax(-1) + 1,
            on.sum((-2, -1)),
        ],
        dim=-1,
    )
    return boxes.float()


def spots(batch, channels, size, seed, per_channel=1):
    """Images with ``per_channel`` distinct bright pixels in each channel, at random positions."""
    g = torch.Generator().manual_seed(seed)
    h, w = size
    x = torch.zeros(batch, channels, h * w)
    for b in range(batch):
        for c in range(channels):
            x[b, c, torch.randperm(h * w, generator=g)[:per_channel]] = 1.0 + torch.rand(per_channel, generator=g)
    return x.view(batch, channels, h, w)


# --- segmentation -----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("chunk_size", CHUNKS)
@pytest.mark.parametrize("size", SHAPES)
@pytest.mark.parametrize("transforms", SPATIAL, ids=spec_id)
def test_segmentation_of_an_equivariant_model_is_its_own_output(transforms, size, chunk_size):
    model, x = pixel_model(), rand((2, 3, *size), 0)
    merged = run(model, x, transforms=transforms, task="segmentation", chunk_size=chunk_size)
    assert merged.shape == (2, 4, *size)
    torch.testing.assert_close(merged, model(x).detach(), rtol=0, atol=1e-5)


def test_segmentation_of_a_position_dependent_model_is_not_its_own_output():
    # the check above has teeth: a model that is not equivariant gets a different, averaged answer
    model, x = pixel_model(), rand((2, 3, 5, 8), 0)
    ramp = torch.arange(8.0)

    def biased(z):
        return model(z) + ramp[: z.shape[-1]]

    merged = run(biased, x, transforms="hflip", task="segmentation", chunk_size=None)
    torch.testing.assert_close(merged, model(x).detach() + ramp.mean(), rtol=0, atol=1e-5)


@pytest.mark.parametrize("chunk_size", CHUNKS)
@pytest.mark.parametrize("size", [(16, 16), (15, 21)])
def test_segmentation_multiscale_matches_the_written_out_average(size, chunk_size):
    model, h, w = pixel_model(), *size
    rows, cols = torch.linspace(0, 1, h).view(h, 1), torch.linspace(0, 1, w).view(1, w)
    x = torch.stack([torch.sin(2 * rows + cols), torch.cos(cols - rows), rows * cols]).unsqueeze(0).repeat(2, 1, 1, 1)
    merged = run(model, x, transforms="multiscale", task="segmentation", chunk_size=chunk_size)
    expected = 0
    for s in (1.0, 0.875, 1.125):
        small = (max(1, math.floor(h * s)), max(1, math.floor(w * s)))
        z = x if s == 1.0 else tnf.interpolate(x, size=small, mode="bilinear", align_corners=False)
        y = model(z).detach()
        expected = expected + (y if s == 1.0 else tnf.interpolate(y, size=size, mode="bilinear", align_corners=False))
    torch.testing.assert_close(merged, expected / 3, rtol=0, atol=1e-5)
    torch.testing.assert_close(merged, model(x).detach(), rtol=0, atol=0.02)  # smooth image: nearly its own output


@pytest.mark.parametrize("chunk_size", CHUNKS)
@pytest.mark.parametrize("size", [(7, 7), (6, 9)])
@pytest.mark.parametrize("transforms", ["d4", "flip", "transpose", "vflip"], ids=spec_id)
def test_flip_classes_makes_a_chiral_segmenter_consistent(transforms, size, chunk_size):
    x = rand((2, 1, *size), 1)
    own = chiral_segmenter(x)
    merged = run(chiral_segmenter, x, transforms=transforms, task=ttc.tta.Segmentation(flip_classes=[(0, 1)]),
                 chunk_size=chunk_size)  # fmt: skip
    torch.testing.assert_close(merged, own, rtol=0, atol=1e-5)
    unswapped = run(chiral_segmenter, x, transforms=transforms, task="segmentation", chunk_size=chunk_size)
    assert (unswapped[:, :2] - own[:, :2]).abs().max() > 0.1  # mirrored views disagree without the swap
    torch.testing.assert_close(unswapped[:, 2], own[:, 2], rtol=0, atol=1e-5)  # the achiral class is unaffected


def test_flip_classes_without_a_mirrored_view_is_refused():
    """Rotations never mirror, so flip_classes could not act on them: refused by name, not ignored."""
    rotations = ttc.Rotate90()
    assert not any(view.reflects for view in ttc.Augmenter(rotations).views)
    with pytest.raises(ValueError, match=r"`flip_classes`=\[\(0, 1\)\] has no effect: .*has none. Add a mirroring"):
        ttc.Augmenter(rotations, task=ttc.tta.Segmentation(flip_classes=[(0, 1)]))


@pytest.mark.parametrize("width", [6, 7])
def test_flip_classes_with_a_left_half_right_half_model_under_hflip(width):
    # class 0 on the left half and class 1 on the right half of any image (scaled by the pixel): mapped back, an
    # h-flipped view has them the wrong way round
    def model(z):
        left = (torch.arange(z.shape[-1]) < z.shape[-1] / 2).float()
        return torch.cat([z * left, z * left.flip(0)], dim=1)

    x = rand((2, 1, 4, width), 3)
    merged = run(model, x, transforms="hflip", task=ttc.tta.Segmentation(flip_classes=[(1, 0)]))
    assert torch.equal(merged, model(x))
    assert not torch.allclose(run(model, x, transforms="hflip", task="segmentation"), model(x))

    # channel 0 = x, channel 1 = hflip(x) is equivariant, not chiral: it needs no swap and is broken by one
    def mirrored(z):
        return torch.cat([z, z.flip(-1)], dim=1)

    assert torch.equal(run(mirrored, x, transforms="hflip", task="segmentation"), mirrored(x))
    assert not torch.allclose(run(mirrored, x, transforms="hflip", task=ttc.tta.Segmentation(flip_classes=[(0, 1)])),
                              mirrored(x))  # fmt: skip


def test_flip_classes_for_classification_swaps_logits_of_mirrored_views():
    def left_right(z):  # mass of the left half, mass of the right half: an h-flip swaps them
        w = z.shape[-1]
        return torch.stack([z[..., : w // 2].sum((1, 2, 3)), z[..., w - w // 2 :].sum((1, 2, 3))], dim=1)

    x = rand((3, 2, 5, 6), 4)
    swapped = run(left_right, x, transforms="hflip", task=ttc.tta.Classification(flip_classes=[(0, 1)]))
    torch.testing.assert_close(swapped, left_right(x))
    mean = left_right(x).mean(1, keepdim=True).expand(3, 2)
    torch.testing.assert_close(run(left_right, x, transforms="hflip"), mean)


@pytest.mark.parametrize("chunk_size", CHUNKS)
@pytest.mark.parametrize("size", [(8, 8), (8, 12)])
def test_segmentation_at_half_resolution_works_with_flips_and_rotations(size, chunk_size):
    conv = pixel_model()

    def half(z):
        return conv(tnf.avg_pool2d(z, 2))

    x = rand((2, 3, *size), 5)
    for transforms in ("d4", [ttc.Transpose(), ttc.VFlip()]):
        merged = run(half, x, transforms=transforms, task="segmentation", chunk_size=chunk_size)
        assert merged.shape == (2, 4, size[0] // 2, size[1] // 2)
        torch.testing.assert_close(merged, half(x).detach(), rtol=0, atol=1e-5)


@pytest.mark.parametrize("transforms", ["multiscale", ttc.Resize([(8, 8)]), ["hflip", ttc.Scale((2.0,))]], ids=str)
def test_segmentation_at_half_resolution_with_scale_is_a_clear_error(transforms):
    conv = pixel_model()
    with pytest.raises(ValueError, match=r"resolution.*\(4, 6\)"):
        run(lambda z: conv(tnf.avg_pool2d(z, 2)), rand((2, 3, 8, 12), 6), transforms=transforms, task="segmentation")


# --- keypoints --------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("chunk_size", CHUNKS)
@pytest.mark.parametrize("size", SHAPES)
@pytest.mark.parametrize("transforms", SPATIAL, ids=spec_id)
def test_keypoints_of_centroids_are_recovered(transforms, size, chunk_size):
    x = rand((2, 4, *size), 7) ** 3  # uneven mass: centroids away from the center
    merged = run(keypoint_model, x, transforms=transforms, task="keypoints", chunk_size=chunk_size)
    assert merged.shape == (2, 4, 3)
    torch.testing.assert_close(merged, keypoint_model(x), rtol=0, atol=1e-5)


def test_keypoints_in_another_frame_are_not_recovered():
    # pins the frame: a model reporting pixel indices (j, i) instead of centers (j + 0.5, i + 0.5) is off by 0.5
    x = spots(1, 2, (5, 8), 8)
    index_model = lambda z: centroids(z) - 0.5  # noqa: E731
    merged = run(index_model, x, transforms="hflip", task="keypoints")
    torch.testing.assert_close(merged[..., 0], index_model(x)[..., 0] + 0.5)
    torch.testing.assert_close(merged[..., 1], index_model(x)[..., 1])


@pytest.mark.parametrize("transforms", ["d4", "multiscale", [ttc.Resize([(7, 3), 9]), ttc.Rotate90((1,))]], ids=str)
def test_keypoints_and_boxes_tied_to_the_image_frame_map_back_through_scales(transforms):
    x = rand((2, 1, 9, 14), 9)

    def frame_points(z):  # the image center in the augmented frame, with a visibility column
        h, w = z.shape[-2:]
        return torch.tensor([[w / 2, h / 2, 1.0]]).expand(z.shape[0], 1, 3)

    def frame_box(z):
        h, w = z.shape[-2:]
        return torch.tensor([[0.0, 0.0, w, h, 0.5]]).expand(z.shape[0], 1, 5)

    points = run(frame_points, x, transforms=transforms, task="keypoints")
    torch.testing.assert_close(points, frame_points(x))
    torch.testing.assert_close(run(frame_box, x, transforms=transforms, task="boxes"), frame_box(x))


@pytest.mark.parametrize("chunk_size", CHUNKS)
@pytest.mark.parametrize("size", [(9, 9), (7, 11)])
@pytest.mark.parametrize("transforms", ["d4", "hflip", "transpose"], ids=spec_id)
def test_flip_pairs_make_a_chiral_keypoint_model_consistent(transforms, size, chunk_size):
    x = spots(6, 3, size, 10)
    own = chiral_keypoints(x)
    merged = run(chiral_keypoints, x, transforms=transforms, task=ttc.tta.Keypoints(flip_pairs=[(1, 2)]),
                 chunk_size=chunk_size)  # fmt: skip
    torch.testing.assert_close(merged, own, rtol=0, atol=1e-5)
    unswapped = run(chiral_keypoints, x, transforms=transforms, task="keypoints", chunk_size=chunk_size)
    assert (unswapped[:, 1:] - own[:, 1:]).abs().max() > 0.4
    torch.testing.assert_close(unswapped[:, 0], own[:, 0], rtol=0, atol=1e-5)  # the nose is not paired


# --- boxes ------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("chunk_size", CHUNKS)
@pytest.mark.parametrize("size", [(6, 6), (5, 9)])
@pytest.mark.parametrize("transforms", SPATIAL, ids=spec_id)
def test_boxes_of_nonzero_pixels_are_exact(transforms, size, chunk_size):
    x = spots(3, 4, size, 11, per_channel=3)
    own = box_model(x)
    merged = run(box_model, x, transforms=transforms, task="boxes", chunk_size=chunk_size)
    assert merged.shape == (3, 4, 5)
    assert torch.equal(merged, own)  # integers: exact; the count column passes through
    only_xyxy = run(lambda z: box_model(z)[..., :4], x, transforms=transforms, task="boxes", chunk_size=chunk_size)
    assert torch.equal(only_xyxy, own[..., :4])


def test_boxes_by_hand_under_hflip():
    x = torch.zeros(1, 1, 3, 5)
    x[0, 0, 1, 1:3] = 1.0  # row 1, cols 1..2: box [1, 1, 3, 2]
    seen = []

    def model(z):
        seen.append(box_model(z))
        return seen[-1]

    merged = run(model, x, transforms="hflip", task="boxes", chunk_size=1)
    assert seen[1].tolist() == [[[2.0, 1.0, 4.0, 2.0, 2.0]]]  # the mirrored view sees cols 2..3
    assert merged.tolist() == [[[1.0, 1.0, 3.0, 2.0, 2.0]]]


# --- errors -----------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("task", "output", "shape"),
    [
        ("keypoints", lambda z: z.mean((-2, -1)), "(2, 3)"),
        ("keypoints", lambda z: z.mean(-1, keepdim=True)[..., 0, :1], "(2, 3, 1)"),
        ("keypoints", lambda z: z[..., :2], "(2, 3, 4, 2)"),
        ("boxes", lambda z: z.mean(-2)[..., :3], "(2, 3, 3)"),
        ("boxes", lambda z: z.mean((1, 2, 3)), "(2,)"),
        ("segmentation", lambda z: z.mean((-2, -1)), "(2, 3)"),
    ],
)
def test_wrong_output_shapes_name_the_shape(task, output, shape):
    with pytest.raises(ValueError, match=f"task='{task}'.*" + re.escape(shape)):
        run(output, rand((2, 3, 4, 6), 12), transforms="hflip", task=task)


def test_an_output_with_the_wrong_number_of_rows_is_an_error():
    with pytest.raises(ValueError, match=r"4 rows .*shape \(2, 3\)"):
        run(lambda z: z.mean((-2, -1))[:2], rand((2, 3, 4, 4), 13), transforms="hflip", chunk_size=None)


def test_non_image_input_with_spatial_transforms_names_the_shape():
    with pytest.raises(ValueError, match=r"\(4, 5\)"):
        run(lambda z: z, rand((4, 5), 14), transforms="hflip")
    with pytest.raises(ValueError, match=r"\(4, 5\)"):
        run(lambda z: z, rand((4, 5), 14), transforms=["add", "d4"])


@pytest.mark.parametrize("chunk_size", CHUNKS)
def test_value_transforms_work_on_non_image_input(chunk_size):
    x, weight = rand((4, 5), 15), rand((5, 3), 16)
    merged = run(lambda z: z @ weight, x, transforms=[ttc.Add((0.5,)), ttc.Multiply((2.0, 3.0))], chunk_size=chunk_size)
    expected = sum(((x + a) * m) @ weight for a in (0.0, 0.5) for m in (1.0, 2.0, 3.0)) / 6
    torch.testing.assert_close(merged, expected)


def test_pairs_are_checked_at_construction():
    """Pairs are options of their task objects: checked when built, and only where they apply."""
    for task in (ttc.tta.Classification, ttc.tta.Segmentation, ttc.tta.Boxes):
        with pytest.raises(TypeError, match=r"flip_pairs|Boxes\(\) takes no arguments"):
            task(flip_pairs=[(0, 1)])
    for task in (ttc.tta.Keypoints, ttc.tta.Boxes):
        with pytest.raises(TypeError, match=r"flip_classes|Boxes\(\) takes no arguments"):
            task(flip_classes=[(0, 1)])
    for bad in ([(0, 1), (1, 2)], [(2, 2)], [(0, 1), (3, 0)]):
        for task in (ttc.tta.Classification, ttc.tta.Segmentation):
            with pytest.raises(ValueError, match=r"`flip_classes`=.* uses an index twice"):
                task(flip_classes=bad)
        with pytest.raises(ValueError, match=r"`flip_pairs`=.* uses an index twice"):
            ttc.tta.Keypoints(flip_pairs=bad)
    for bad in ([(0,)], [(0, 1, 2)], [(-1, 2)], [(True, 2)], [(0.0, 1)]):
        with pytest.raises(ValueError, match="`flip_classes` entry"):
            ttc.tta.Segmentation(flip_classes=bad)
        with pytest.raises(ValueError, match="`flip_pairs` entry"):
            ttc.tta.Keypoints(flip_pairs=bad)
    for bad in (5, "01"):
        with pytest.raises(ValueError, match=r"`flip_pairs`=.* must be a list of index pairs"):
            ttc.tta.Keypoints(flip_pairs=bad)


@pytest.mark.parametrize("cls", [ttc.Augmenter, ttc.TestTimeAugmentation, ttc.TTAWrapper])
def test_the_moved_keywords_say_where_they_went(cls):
    """``flip_classes``/``flip_pairs`` moved from the TTA classes to the task objects: a clear TypeError."""
    model = () if cls is not ttc.TTAWrapper else (torch.nn.Identity(),)
    with pytest.raises(TypeError, match=r"\(flip_pairs=...\) moved to the task object: pass task=ttc.tta.Keypoints"):
        cls(*model, "hflip", task="keypoints", flip_pairs=[(0, 1)])
    for task in ("classification", "segmentation"):
        with pytest.raises(TypeError, match=r"\(flip_classes=...\) moved .*ttc.tta.Segmentation\(flip_classes=...\)"):
            cls(*model, "hflip", task=task, flip_classes=[(0, 1)])
    assert not {"flip_classes", "flip_pairs"} & set(inspect.signature(cls).parameters)


def test_task_names_are_the_task_objects_with_their_defaults():
    """``task="segmentation"`` and ``task=ttc.tta.Segmentation()`` give the same numbers, bitwise."""
    x = rand((2, 1, 6, 8), 20)
    for name, cls, model in [
        ("classification", ttc.tta.Classification, lambda z: z.mean((-2, -1))),
        ("segmentation", ttc.tta.Segmentation, chiral_segmenter),
        ("keypoints", ttc.tta.Keypoints, keypoint_model),
        ("boxes", ttc.tta.Boxes, lambda z: keypoint_model(z)[..., :2].repeat(1, 1, 2) + torch.tensor([0, 0, 1, 2])),
    ]:
        assert ttc.tta.TASKS[name] is cls and cls.name == name
        augmenter = ttc.Augmenter("d4", task=name)
        assert type(augmenter.task) is cls and repr(augmenter.task) == repr(cls())
        assert torch.equal(run(model, x, transforms="d4", task=name), run(model, x, transforms="d4", task=cls()))
    with pytest.raises(ValueError, match=r"`task`='detection' is not supported; allowed: .*'boxes', or a .*Task"):
        ttc.Augmenter(task="detection")


class Heatmaps(ttc.tta.Task):
    """A new task is one class: per-keypoint heatmaps (B, K, H, W), mapped back like dense outputs."""

    name, inverse = "heatmaps", "dense"

    def check_output(self, y, classes, setting):
        if y.ndim != 4:
            raise ValueError(f"task='heatmaps' needs (B, K, H, W) outputs; got shape {tuple(y.shape)}.")

    def deaugment(self, view, y, size):
        return view.deaugment(y, size) if view.spatial else y


@pytest.mark.parametrize("chunk_size", CHUNKS)
def test_a_new_task_is_one_class(chunk_size):
    x = rand((2, 3, 5, 7), 21)
    conv = pixel_model()
    with torch.no_grad():
        torch.testing.assert_close(run(conv, x, transforms="d4", task=Heatmaps(), chunk_size=chunk_size), conv(x))
    with pytest.raises(ValueError, match=r"FiveCrop.*no inverse for task='heatmaps'"):
        ttc.Augmenter("five_crop", task=Heatmaps())
    with pytest.raises(ValueError, match="merge='vote' needs class outputs; task='heatmaps'"):
        ttc.Augmenter("hflip", merge="vote", task=Heatmaps())
    with pytest.raises(ValueError, match="task='heatmaps' needs"):
        run(lambda z: z.mean((-2, -1)), x, task=Heatmaps())


def test_out_of_range_pairs_raise_at_runtime_naming_them():
    x = rand((2, 1, 5, 5), 17)
    with pytest.raises(ValueError, match=r"`flip_classes`=\(\(0, 3\),\).*3 entries"):
        run(chiral_segmenter, x, transforms="hflip", task=ttc.tta.Segmentation(flip_classes=[(0, 3)]))
    with pytest.raises(ValueError, match=r"`flip_pairs`=\(\(1, 4\),\)"):
        run(keypoint_model, x, transforms="hflip", task=ttc.tta.Keypoints(flip_pairs=[(1, 4)]))
    with pytest.raises(ValueError, match=r"`flip_classes`=\[\(0, 3\)\] has no effect"):  # rotations never mirror
        run(chiral_segmenter, x, transforms="rot90", task=ttc.tta.Segmentation(flip_classes=[(0, 3)]))
