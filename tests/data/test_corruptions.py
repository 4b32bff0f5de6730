"""Corruptions: names, shape/dtype/range, determinism, per-sample draws, monotone severity on digits, references
(JPEG by scipy's DCT, CIFAR-10-C's defocus kernel by scipy's correlate, Gaussian blur by scipy's gaussian_filter,
HSV brightness by colorsys, noise statistics, block pixelation, spatter's water and mud), validation."""

import colorsys
import itertools

import numpy as np
import pytest
import scipy.fft
import scipy.ndimage
import torch
import torch.nn.functional as F
from digits import digits

import ttc_lightning.data as data
from ttc_lightning.data import CORRUPTIONS, FAMILIES, VALIDATION_CORRUPTIONS, corrupt, spatial_scale
from ttc_lightning.data.corruptions import blur
from ttc_lightning.data.corruptions.digital import pixelate_sizes

#: The 15 reported corruptions and the validation ones: every generic test runs on both.
ALL = CORRUPTIONS + VALIDATION_CORRUPTIONS
DETERMINISTIC = ("defocus_blur", "zoom_blur", "brightness", "contrast", "pixelate", "jpeg_compression", "gaussian_blur")
RANDOM = tuple(name for name in ALL if name not in DETERMINISTIC)


@pytest.fixture(scope="module")
def digits8() -> torch.Tensor:
    return digits()[2][:96]


@pytest.fixture(scope="module")
def digits28(digits8) -> torch.Tensor:
    return F.interpolate(digits8, size=28, mode="bilinear", align_corners=False).clamp(0, 1)


def smooth_rgb(n=4, h=13, w=17, seed=0) -> torch.Tensor:
    coarse = torch.rand(n, 3, 4, 5, generator=torch.Generator().manual_seed(seed))
    return F.interpolate(coarse, size=(h, w), mode="bicubic", align_corners=False).clamp(0, 1)


def test_names_order_and_families():
    assert CORRUPTIONS == (
        "gaussian_noise",
        "shot_noise",
        "impulse_noise",
        "defocus_blur",
        "glass_blur",
        "motion_blur",
        "zoom_blur",
        "snow",
        "frost",
        "fog",
        "brightness",
        "contrast",
        "elastic_transform",
        "pixelate",
        "jpeg_compression",
    )
    assert FAMILIES == {
        "noise": ("gaussian_noise", "shot_noise", "impulse_noise"),
        "blur": ("defocus_blur", "glass_blur", "motion_blur", "zoom_blur"),
        "weather": ("snow", "frost", "fog", "brightness"),
        "digital": ("contrast", "elastic_transform", "pixelate", "jpeg_compression"),
    }
    assert data.STREAM_MODES == ("reset", "continual", "gradual", "mixed")
    # CIFAR-10-C's extra corruptions but saturate (nothing to saturate on one channel), never among the 15
    assert VALIDATION_CORRUPTIONS == ("speckle_noise", "gaussian_blur", "spatter")
    assert not set(VALIDATION_CORRUPTIONS) & set(CORRUPTIONS)
    assert not set(VALIDATION_CORRUPTIONS) & {name for names in FAMILIES.values() for name in names}


@pytest.mark.parametrize("name", ALL)
@pytest.mark.parametrize(
    "images",
    [
        pytest.param(lambda: smooth_rgb(), id="rgb13x17"),
        pytest.param(lambda: torch.rand(3, 1, 4, 4, generator=torch.Generator().manual_seed(1)), id="gray4x4"),
        pytest.param(lambda: smooth_rgb(2, 33, 40).double(), id="rgb33x40-float64"),
        pytest.param(lambda: smooth_rgb(2, 9, 8)[:, :1].half(), id="gray9x8-float16"),
        pytest.param(lambda: torch.tensor([0.0, 1.0]).view(2, 1, 1, 1).expand(2, 3, 5, 6).clone(), id="black-white"),
    ],
)
def test_shape_dtype_and_range_are_kept(images, name):
    x = images()
    for severity in (1, 5):
        out = corrupt(x, name, severity)
        assert out.shape == x.shape and out.dtype == x.dtype and out.device == x.device
        assert bool(torch.isfinite(out).all()) and out.min() >= 0 and out.max() <= 1


@pytest.mark.parametrize("name", ALL)
def test_same_seed_same_output_and_the_global_rng_is_left_alone(name, digits8):
    torch.manual_seed(0)
    state = torch.get_rng_state()
    first = corrupt(digits8, name, 3, seed=7)
    assert torch.equal(torch.get_rng_state(), state)
    torch.manual_seed(123)
    assert torch.equal(corrupt(digits8, name, 3, seed=7), first)
    assert not torch.equal(first, digits8)  # every corruption changes a batch of digits


@pytest.mark.parametrize("name", ALL)
def test_a_different_seed_changes_random_corruptions_only(name, digits8):
    same = torch.equal(corrupt(digits8, name, 3, seed=0), corrupt(digits8, name, 3, seed=1))
    assert same == (name in DETERMINISTIC)


@pytest.mark.parametrize("name", RANDOM)
def test_identical_images_in_a_batch_get_different_draws(name, digits8):
    x = digits8[:1].repeat(4, 1, 1, 1)
    out = corrupt(x, name, 5)
    for i in range(4):
        for j in range(i + 1, 4):
            assert not torch.equal(out[i], out[j]), (i, j)


@pytest.mark.parametrize("name", DETERMINISTIC)
def test_deterministic_corruptions_act_on_each_sample_alone(name, digits8):
    x = digits8[:5]
    alone = torch.cat([corrupt(x[i : i + 1], name, 4) for i in range(len(x))])
    torch.testing.assert_close(corrupt(x, name, 4), alone)


@pytest.mark.parametrize("name", [name for name in ALL if name != "shot_noise"])
def test_a_sample_does_not_depend_on_its_neighbours_values(name, digits8):
    """Draws depend on the batch shape only (shot noise excepted: Poisson sampling consumes a value-dependent
    number of draws)."""
    x = digits8[:4].clone()
    y = x.clone()
    y[1] = y[1].flip(-1) * 0.5
    a, b = corrupt(x, name, 4, seed=3), corrupt(y, name, 4, seed=3)
    torch.testing.assert_close(a[[0, 2, 3]], b[[0, 2, 3]])


def mean_abs_difference(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.double() - b.double()).abs().mean().item()


@pytest.mark.parametrize("name", ALL)
@pytest.mark.parametrize("size", [8, 28])
def test_distance_to_the_clean_image_grows_strictly_with_severity(name, size, digits8, digits28):
    x = digits8 if size == 8 else digits28
    distances = [mean_abs_difference(corrupt(x, name, severity), x) for severity in range(1, 6)]
    assert distances[0] > 0
    assert all(a < b for a, b in itertools.pairwise(distances)), distances


@pytest.mark.parametrize("name", FAMILIES["blur"] + ("pixelate", "elastic_transform", "gaussian_blur"))
@pytest.mark.parametrize("size", [(8, 8), (13, 17), (32, 32)])
def test_spatial_corruptions_keep_a_constant_image(name, size):
    x = torch.full((2, 3, *size), 0.3)
    torch.testing.assert_close(corrupt(x, name, 5), x)


def test_spatial_scale():
    assert spatial_scale(32, 40) == 1
    assert spatial_scale(64, 96) == 2
    assert spatial_scale(8, 8) == pytest.approx(0.25**0.25)
    assert spatial_scale(28, 30) == pytest.approx((28 / 32) ** 0.25)


# References.


def cifar_disk(radius: float, alias: float) -> np.ndarray:
    """make_cifar_c.disk: pixels within radius on a 17x17 grid, normalised, then cv2.GaussianBlur((3, 3), alias)."""
    grid = np.arange(-8, 9)
    xx, yy = np.meshgrid(grid, grid)
    disk = ((xx**2 + yy**2) <= radius**2).astype(np.float64)
    disk /= disk.sum()
    taps = np.exp(-np.array([1.0, 0.0, 1.0]) / (2 * alias**2))
    taps /= taps.sum()
    return scipy.ndimage.correlate(disk, np.outer(taps, taps), mode="mirror")


@pytest.mark.parametrize("severity", range(1, 6))
def test_defocus_blur_at_32px_is_cifar_10_c(severity):
    x = smooth_rgb(2, 32, 32, seed=severity)
    radius, alias = [(0.3, 0.4), (0.4, 0.5), (0.5, 0.6), (1, 0.2), (1.5, 0.1)][severity - 1]
    kernel = cifar_disk(radius, alias)
    expected = np.stack(
        [[scipy.ndimage.correlate(channel, kernel, mode="mirror") for channel in image] for image in x.double().numpy()]
    )
    torch.testing.assert_close(corrupt(x.double(), "defocus_blur", severity), torch.from_numpy(expected).clamp(0, 1))


@pytest.mark.parametrize(
    ("side", "scale", "taps"),
    [
        (64, None, np.array([1, 2, 2, 2, 2, 2, 1]) / 12),  # each tap a 2 px box straddling pixel borders
        (24, 0.5, np.array([1, 4, 1]) / 6),  # each tap a half-pixel box: the outer ones split between two pixels
    ],
)
def test_defocus_kernel_scales_with_the_image(monkeypatch, side, scale, taps):
    """Severity 5's kernel (CIFAR-10-C: the 3x3 disk, alias blur negligible) stretched by the spatial scale, its
    area kept: written out by hand."""
    if scale is not None:
        monkeypatch.setattr(blur, "spatial_scale", lambda height, width: scale)
    x = smooth_rgb(2, side, side).double()
    kernel = np.outer(taps, taps)
    expected = np.stack(
        [[scipy.ndimage.correlate(channel, kernel, mode="mirror") for channel in image] for image in x.numpy()]
    )
    torch.testing.assert_close(corrupt(x, "defocus_blur", 5), torch.from_numpy(expected).clamp(0, 1))


LUMINANCE = np.array(
    [
        [16, 11, 10, 16, 24, 40, 51, 61],
        [12, 12, 14, 19, 26, 58, 60, 55],
        [14, 13, 16, 24, 40, 57, 69, 56],
        [14, 17, 22, 29, 51, 87, 80, 62],
        [18, 22, 37, 56, 68, 109, 103, 77],
        [24, 35, 55, 64, 81, 104, 113, 92],
        [49, 64, 78, 87, 103, 121, 120, 101],
        [72, 92, 95, 98, 112, 100, 103, 99],
    ]
)
CHROMINANCE = np.full((8, 8), 99)
CHROMINANCE[:4, :4] = [[17, 18, 24, 47], [18, 21, 26, 66], [24, 26, 56, 99], [47, 66, 99, 99]]


def ijg_table(quality: int, base: np.ndarray) -> np.ndarray:
    scale = 5000 / quality if quality < 50 else 200 - 2 * quality
    return np.clip(np.floor((base * scale + 50) / 100), 1, 255)


def near_half(values: np.ndarray) -> np.ndarray:
    return np.abs(np.abs(values - np.floor(values)) - 0.5) < 1e-6


def jpeg_plane(plane: np.ndarray, table: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Blockwise orthonormal DCT-II (scipy), quantised and dequantised, inverse DCT; plane padded by edge copies.

    Also returns where rounding met a tie (a coefficient quotient or a pixel at k + 1/2, up to float noise), which
    two correct implementations may round apart."""
    h, w = plane.shape
    padded = np.pad(plane, ((0, -h % 8), (0, -w % 8)), mode="edge")
    out, ties = np.empty_like(padded), np.zeros(padded.shape, dtype=bool)
    for i in range(0, padded.shape[0], 8):
        for j in range(0, padded.shape[1], 8):
            quotients = scipy.fft.dctn(padded[i : i + 8, j : j + 8], norm="ortho") / table
            out[i : i + 8, j : j + 8] = scipy.fft.idctn(np.round(quotients) * table, norm="ortho")
            ties[i : i + 8, j : j + 8] = near_half(quotients).any()
    return out[:h, :w], ties[:h, :w]


def jpeg_reference(image: np.ndarray, quality: int) -> tuple[np.ndarray, np.ndarray]:
    """The 8-bit JPEG round trip of a ``(C, H, W)`` image and where it met a rounding tie."""
    pixels = np.round(image * 255)
    if len(pixels) == 1:
        y, ties = jpeg_plane(pixels[0] - 128, ijg_table(quality, LUMINANCE))
        out = (y + 128)[None]
    else:
        r, g, b = pixels
        y, y_ties = jpeg_plane(0.299 * r + 0.587 * g + 0.114 * b - 128, ijg_table(quality, LUMINANCE))
        cb, cb_ties = jpeg_plane(-0.168736 * r - 0.331264 * g + 0.5 * b, ijg_table(quality, CHROMINANCE))
        cr, cr_ties = jpeg_plane(0.5 * r - 0.418688 * g - 0.081312 * b, ijg_table(quality, CHROMINANCE))
        y = y + 128
        out = np.stack([y + 1.402 * cr, y - 0.344136 * cb - 0.714136 * cr, y + 1.772 * cb])
        ties = y_ties | cb_ties | cr_ties
    ties = ties[None] | near_half(out)
    return np.clip(np.round(out), 0, 255) / 255, np.broadcast_to(ties, out.shape)


def test_ijg_tables():
    assert ijg_table(50, LUMINANCE).tolist() == LUMINANCE.tolist()
    assert ijg_table(80, LUMINANCE)[0].tolist() == [6, 4, 4, 6, 10, 16, 20, 24]  # libjpeg's quality-80 table


@pytest.mark.parametrize("severity", range(1, 6))
@pytest.mark.parametrize("shape", [(1, 8, 8), (1, 13, 20), (3, 16, 11)])
def test_jpeg_compression_against_scipy_dct(severity, shape, digits8):
    x = digits8[:8] if shape == (1, 8, 8) else smooth_rgb(8, *shape[1:], seed=severity)[:, : shape[0]]
    quality = (80, 65, 58, 50, 40)[severity - 1]
    references = [jpeg_reference(image, quality) for image in x.double().numpy()]
    expected = torch.from_numpy(np.stack([image for image, _ in references]))
    ties = torch.from_numpy(np.stack([tie for _, tie in references]))
    out = corrupt(x.double(), "jpeg_compression", severity)
    assert ties.double().mean() < 0.2
    torch.testing.assert_close(out[~ties], expected[~ties], atol=1e-12, rtol=0)
    assert torch.equal(torch.round(out * 255), out * 255)  # 8-bit output
    assert not torch.equal(out, torch.round(x.double() * 255) / 255)  # the quantisation did something


@pytest.mark.parametrize("severity", range(1, 6))
def test_brightness_raises_the_hsv_value(severity):
    x = smooth_rgb(2, 5, 6, seed=severity).double()
    x[0, :, 0, 0] = 0  # black pixel: hue and saturation undefined, becomes grey
    shift = (0.05, 0.1, 0.15, 0.2, 0.3)[severity - 1]
    expected = x.clone()
    for b in range(2):
        for i in range(5):
            for j in range(6):
                h, s, v = colorsys.rgb_to_hsv(*x[b, :, i, j].tolist())
                expected[b, :, i, j] = torch.tensor(colorsys.hsv_to_rgb(h, s, min(v + shift, 1.0)))
    torch.testing.assert_close(corrupt(x, "brightness", severity), expected)
    gray = x[:, :1]
    torch.testing.assert_close(corrupt(gray, "brightness", severity), (gray + shift).clamp(max=1))


@pytest.mark.parametrize("severity", range(1, 6))
def test_contrast_scales_deviations_from_each_channel_mean(severity):
    x = smooth_rgb(3, 7, 9, seed=severity).numpy()
    factor = (0.75, 0.5, 0.4, 0.3, 0.15)[severity - 1]
    means = x.mean(axis=(2, 3), keepdims=True)
    expected = torch.from_numpy((x - means) * factor + means)
    torch.testing.assert_close(corrupt(torch.from_numpy(x), "contrast", severity), expected)


def test_pixelate_sizes_and_exact_blocks(digits8):
    assert pixelate_sizes(32) == (30, 28, 27, 24, 20)  # CIFAR-10-C's int(32 * fraction)
    assert pixelate_sizes(8) == (7, 6, 5, 4, 3)  # strictly coarser on small images
    assert pixelate_sizes(4) == (3, 2, 2, 2, 2)
    blocks = digits8.view(-1, 1, 4, 2, 4, 2).mean((3, 5), keepdim=True).expand(-1, 1, 4, 2, 4, 2).reshape(-1, 1, 8, 8)
    torch.testing.assert_close(corrupt(digits8, "pixelate", 4), blocks)  # 8 -> 4 -> 8: 2x2 block means


@pytest.mark.parametrize(("size", "std"), [(32, 0.04), (8, 0.08)])
def test_gaussian_noise_std_follows_cifar_or_small_image_table(size, std):
    x = torch.full((64, 1, size, size), 0.5)
    noise = corrupt(x, "gaussian_noise", 1) - x
    assert noise.std().item() == pytest.approx(std, rel=0.05)
    assert abs(noise.mean().item()) < 0.005


def test_shot_noise_counts_photons():
    x = torch.full((64, 1, 32, 32), 0.5, dtype=torch.float64)
    out = corrupt(x, "shot_noise", 1)  # 500 photons at intensity 1
    counts = out * 500
    torch.testing.assert_close(counts, counts.round())
    assert out.mean().item() == pytest.approx(0.5, abs=0.002)
    assert out.var().item() == pytest.approx(0.5 / 500, rel=0.05)  # Poisson: variance = mean


@pytest.mark.parametrize(("size", "amount"), [(32, 0.07), (8, 0.27)])
def test_impulse_noise_sets_a_fraction_to_black_and_white(size, amount):
    x = torch.full((256, 3, size, size), 0.5)
    out = corrupt(x, "impulse_noise", 5)
    assert bool(((out == 0) | (out == 1) | (out == 0.5)).all())
    assert (out == 0).float().mean().item() == pytest.approx(amount / 2, rel=0.1)
    assert (out == 1).float().mean().item() == pytest.approx(amount / 2, rel=0.1)


@pytest.mark.parametrize("name", ["snow", "frost"])
def test_snow_and_frost_cover_a_black_image(name):
    """Snow and frost add light of their own: a black image comes out brighter, the more so at severity 5."""
    x = torch.zeros(16, 1, 16, 16)
    low, high = corrupt(x, name, 1).mean().item(), corrupt(x, name, 5).mean().item()
    assert 0 < low < high


@pytest.mark.parametrize("severity", range(1, 6))
def test_fog_adds_a_normalised_smooth_fractal_and_rescales(severity, digits28):
    """make_cifar_c.fog: ``(x + c * fractal) * max / (max + c)``, the fractal spanning [0, 1] per image; solved for
    the fractal, which must be smoother than the digits and differ between images."""
    strength = (0.2, 0.5, 0.75, 1.0, 1.5)[severity - 1]
    x = digits28.double()
    top = x.amax((1, 2, 3), keepdim=True)
    fractal = (corrupt(x, "fog", severity) * (top + strength) / top - x) / strength
    torch.testing.assert_close(fractal.amin((1, 2, 3)), torch.zeros(len(x), dtype=x.dtype))
    torch.testing.assert_close(fractal.amax((1, 2, 3)), torch.ones(len(x), dtype=x.dtype))
    roughness = (fractal.diff(dim=-1).abs().mean() / fractal.std()).item()
    assert roughness < (x.diff(dim=-1).abs().mean() / x.std()).item()
    assert not torch.allclose(fractal[0], fractal[1])


@pytest.mark.parametrize("severity", range(1, 6))
def test_gaussian_blur_at_32px_is_scipys_gaussian_filter(severity):
    """CIFAR-10-C's ``skimage.filters.gaussian`` (scipy's gaussian_filter, truncated at 4 sigma) at its sigmas, with
    mirrored borders."""
    x = smooth_rgb(2, 32, 32, seed=severity).double()
    sigma = (0.4, 0.6, 0.7, 0.8, 1.0)[severity - 1]
    expected = np.stack(
        [[scipy.ndimage.gaussian_filter(channel, sigma, mode="mirror") for channel in image] for image in x.numpy()]
    )
    torch.testing.assert_close(corrupt(x, "gaussian_blur", severity), torch.from_numpy(expected).clamp(0, 1))


@pytest.mark.parametrize(("size", "std"), [(32, 0.06), (8, 0.15)])
def test_speckle_noise_is_multiplicative(size, std):
    """``x + x * N(0, std)``: CIFAR-10-C's std at 32 px, ImageNet-C's below (like the other noises); black stays
    black."""
    x = torch.full((64, 1, size, size), 0.5, dtype=torch.float64)
    x[:, :, 0] = 0
    out = corrupt(x, "speckle_noise", 1)
    assert bool((out[:, :, 0] == 0).all())
    relative = (out[:, :, 1:] - 0.5) / 0.5
    assert relative.std().item() == pytest.approx(std, rel=0.05)
    assert abs(relative.mean().item()) < 0.01


WATER = np.array([175, 238, 238]) / 255
MUD = np.array([63, 42, 20]) / 255


@pytest.mark.parametrize("severity", [1, 2, 3])
def test_spatter_water_adds_pale_turquoise_light(severity):
    """Severities 1-3: ``x + drops * water`` with the drops in ``[0, 0.5]`` (the brightest at 0.5 in every image):
    on a black RGB image every covered pixel has the water's colour ratios."""
    x = torch.zeros(8, 3, 16, 16, dtype=torch.float64)
    out = corrupt(x, "spatter", severity).numpy()
    drops = out[:, 0] / WATER[0]
    covered = drops > 0
    assert 0 < covered.mean() < 0.5
    np.testing.assert_allclose(out, drops[:, None] * WATER[None, :, None, None], atol=1e-12)
    np.testing.assert_allclose(drops.max((1, 2)), 0.5)
    gray = torch.full((8, 1, 16, 16), 0.2, dtype=torch.float64)
    assert bool((corrupt(gray, "spatter", severity) >= gray).all())  # water only lightens


@pytest.mark.parametrize("severity", [4, 5])
def test_spatter_mud_blends_towards_brown(severity):
    """Severities 4-5: ``x * (1 - cover) + mud * cover``, the cover 0 or at least 0.8: on one channel the mud is
    its luma. Solved for the cover from two images, which must agree."""
    luma = 0.299 * MUD[0] + 0.587 * MUD[1] + 0.114 * MUD[2]
    for shape, mud in (((8, 3, 16, 16), MUD[None, :, None, None]), ((8, 1, 16, 16), luma)):
        white = corrupt(torch.ones(shape, dtype=torch.float64), "spatter", severity).numpy()
        black = corrupt(torch.zeros(shape, dtype=torch.float64), "spatter", severity).numpy()
        cover = (1 - white) / (1 - mud)
        np.testing.assert_allclose(black, mud * cover, atol=1e-12)
        covered = cover[:, 0] > 0
        assert 0 < covered.mean() < 0.5
        assert (cover[:, 0][covered] >= 0.8 - 1e-12).all() and (cover <= 1 + 1e-12).all()


def test_streams_take_the_validation_corruptions(digits8):
    labels = torch.arange(len(digits8))
    segments = data.stream(digits8, labels, VALIDATION_CORRUPTIONS, (2,), seed=4)
    assert [(s.name, s.severity) for s in segments] == [(name, 2) for name in VALIDATION_CORRUPTIONS]
    for segment in segments:
        torch.testing.assert_close(segment.images, corrupt(digits8, segment.name, 2, seed=4))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
@pytest.mark.parametrize("name", ALL)
def test_gpu_matches_cpu(name, digits28):
    cpu = corrupt(digits28, name, 5, seed=2)
    gpu = corrupt(digits28.cuda(), name, 5, seed=2)
    assert gpu.device.type == "cuda"
    torch.testing.assert_close(gpu.cpu(), cpu, atol=1e-4, rtol=0)


# Validation.


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"name": "blur"}, r"`name`='blur' is not supported; allowed: 'gaussian_noise'"),
        ({"severity": 0}, r"`severity`=0 is not supported; allowed: integers 1 to 5"),
        ({"severity": 6}, r"`severity`=6"),
        ({"severity": 2.0}, r"`severity`=2.0"),
        ({"severity": True}, r"`severity`=True"),
        ({"seed": -1}, r"`seed`=-1 must be an integer >= 0"),
        ({"images": torch.rand(2, 8, 8)}, r"`images` must have shape \(B, C, H, W\).*got \(2, 8, 8\)"),
        ({"images": torch.rand(2, 2, 8, 8)}, r"C 1 or 3.*got \(2, 2, 8, 8\)"),
        ({"images": torch.rand(2, 1, 3, 8)}, r"H, W >= 4.*got \(2, 1, 3, 8\)"),
        ({"images": torch.rand(2, 1, 8, 8) + 0.5}, r"`images` must lie in \[0, 1\]; got values in \[0\.5"),
        ({"images": torch.full((1, 1, 8, 8), float("nan"))}, r"`images` must lie in \[0, 1\]"),
        ({"images": torch.ones(1, 1, 8, 8, dtype=torch.uint8)}, r"`images` must be a floating-point tensor; got "),
        ({"images": np.ones((1, 1, 8, 8))}, r"`images` must be a floating-point tensor; got ndarray"),
    ],
)
def test_bad_arguments_are_named(kwargs, match):
    arguments = {"images": torch.rand(2, 1, 8, 8), "name": "contrast", "severity": 1, **kwargs}
    with pytest.raises(ValueError, match=match):
        corrupt(**arguments)


def test_an_empty_batch_passes_through():
    x = torch.zeros(0, 3, 8, 8)
    assert corrupt(x, "frost", 5).shape == (0, 3, 8, 8)


def test_each_corruption_lives_in_the_module_of_its_family():
    from ttc_lightning.data.corruptions.registry import FUNCTIONS

    validation = {"speckle_noise": "noise", "gaussian_blur": "blur", "spatter": "weather"}
    families = {name: family for family, names in FAMILIES.items() for name in names} | validation
    assert set(FUNCTIONS) == set(ALL)
    assert {name: FUNCTIONS[name].__module__.rsplit(".", 1)[1] for name in ALL} == families
