"""Merges and merge spaces: parity with ttach on raw outputs, and every space/merge written out from a view stack."""

import pytest
import torch
import ttach
from torch import nn
from view_tables import table_tta

import ttc_lightning as ttc
from ttc_lightning.ops.merge import MERGES, Merger
from ttc_lightning.tta.augmenter import Augmenter

TOL = dict(rtol=1e-6, atol=1e-6)
TTACH_ALIASES = {
    "hflip": ttach.aliases.hflip_transform,
    "flip": ttach.aliases.flip_transform,
    "d4": ttach.aliases.d4_transform,
}


def conv_classifier(out: nn.Module | None = None) -> nn.Module:
    """A conv classifier whose logits change under flips and rotations (2x2 pooling keeps the layout)."""
    torch.manual_seed(0)
    layers = [nn.Conv2d(3, 6, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d((2, 2)), nn.Flatten(), nn.Linear(24, 5)]
    return nn.Sequential(*layers, *([out] if out is not None else [])).eval()


def conv_segmenter() -> nn.Module:
    """A fully convolutional (B, 4, H, W) segmenter; works on non-square and rotated inputs."""
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 6, 3, padding=1), nn.ReLU(), nn.Conv2d(6, 4, 3, padding=1)).eval()


def image_batch(h: int = 6, w: int = 8, b: int = 3) -> torch.Tensor:
    return torch.randn(b, 3, h, w, generator=torch.Generator().manual_seed(1))


def ttach_wrapper(model: nn.Module, task: str, transforms: str, merge: str) -> nn.Module:
    cls = ttach.ClassificationTTAWrapper if task == "classification" else ttach.SegmentationTTAWrapper
    return cls(model, TTACH_ALIASES[transforms](), merge_mode=merge)


def logit_table(views: int = 5, batch: int = 3, classes: int = 4, seed: int = 0, scale: float = 2.0) -> torch.Tensor:
    return scale * torch.randn(views, batch, classes, generator=torch.Generator().manual_seed(seed))


# ---------------------------------------------------------------- parity with ttach (raw space, ttach's own numbers)


@pytest.mark.parametrize("merge", ["mean", "sum", "max", "min"])
@pytest.mark.parametrize("transforms", ["hflip", "flip", "d4"])
@pytest.mark.parametrize("task", ["classification", "segmentation"])
def test_raw_merges_equal_ttach(task, transforms, merge):
    model = conv_classifier() if task == "classification" else conv_segmenter()
    x = image_batch()  # non-square: rotated views have another shape
    with torch.no_grad():
        expected = ttach_wrapper(model, task, transforms, merge)(x)
        for chunk_size in (1, 3, None):
            ours = ttc.TTAWrapper(model, transforms=transforms, merge=merge, task=task, chunk_size=chunk_size)(x)
            assert ours.shape == expected.shape
            torch.testing.assert_close(ours, expected, **TOL)


@pytest.mark.parametrize("merge", ["gmean", "tsharpen"])
@pytest.mark.parametrize("transforms", ["hflip", "d4"])
@pytest.mark.parametrize("task", ["classification", "segmentation"])
def test_raw_gmean_tsharpen_equal_ttach_on_positive_outputs(task, transforms, merge):
    if task == "classification":
        model = conv_classifier(nn.Softmax(dim=1))
    else:
        model = nn.Sequential(conv_segmenter(), nn.Softmax(dim=1))
    x = image_batch()
    with torch.no_grad():
        expected = ttach_wrapper(model, task, transforms, merge)(x)
        assert torch.isfinite(expected).all()
        for chunk_size in (1, 3, None):
            augmenter = Augmenter(transforms, merge=merge, task=task, space="raw", chunk_size=chunk_size)
            ours, extras = augmenter(model, x)
            assert extras == {}
            torch.testing.assert_close(ours, expected, rtol=1e-5, atol=1e-6)


def test_gmean_on_logits_is_nan_in_ttach_but_finite_in_prob_space():
    model, x = conv_classifier(), image_batch(8, 8)
    with torch.no_grad():
        theirs = ttach_wrapper(model, "classification", "d4", "gmean")(x)
        ours = ttc.TTAWrapper(model, transforms="d4", merge="gmean")(x)
        stack = torch.stack([t.deaugment_label(model(t.augment_image(x))) for t in ttach.aliases.d4_transform()])
    assert torch.isnan(theirs).any()
    assert torch.isfinite(ours).all()
    torch.testing.assert_close(ours, stack.log_softmax(2).mean(0), **TOL)


@pytest.mark.parametrize("merge", ["gmean", "tsharpen"])
def test_raw_gmean_tsharpen_on_negative_outputs_raise_naming_the_minimum(merge):
    model, x = conv_classifier(), image_batch(8, 8)
    with torch.no_grad():
        lowest = min(model(t.augment_image(x)).min().item() for t in ttach.aliases.d4_transform())
        assert lowest < 0
        augmenter = Augmenter("d4", merge=merge, space="raw", chunk_size=None)
        with pytest.raises(ValueError, match=f"minimum of {lowest:.4g}") as info:
            augmenter(model, x)
    assert f"`merge`={merge!r}" in str(info.value) and "space" in str(info.value)


# --------------------------------------------------------------- spaces and merges written out from the view stack


def reference(stack: torch.Tensor, merge: str, space: str, activation: str = "softmax") -> torch.Tensor:
    """Independent formulas, class dimension 2 of ``stack`` (views, batch, classes, ...)."""
    n = stack.shape[0]
    if activation == "softmax":
        p, log_p = stack.softmax(2), stack.log_softmax(2)
    else:
        p, log_p = stack.sigmoid(), nn.functional.logsigmoid(stack)

    def to_logits(log_q: torch.Tensor) -> torch.Tensor:  # logits whose activation gives exp(log_q)
        return log_q if activation == "softmax" else torch.logit(log_q.exp().double()).to(log_q.dtype)

    if merge == "vote":
        votes = nn.functional.one_hot(stack.argmax(2), stack.shape[2]).movedim(-1, 2).sum(0).to(stack.dtype)
        return votes / n + p.mean(0) / (n + 1)
    if merge == "gmean":
        return log_p.mean(0).exp() if space == "raw" else to_logits(log_p.mean(0))
    if merge == "tsharpen":
        return stack.sqrt().mean(0) if space == "raw" else to_logits(p.sqrt().mean(0).log())
    values = {"raw": stack, "prob": p, "logprob": log_p}[space]
    if merge == "median":
        ordered = values.sort(0).values
        merged = ordered[n // 2] if n % 2 else (ordered[n // 2 - 1] + ordered[n // 2]) / 2
    else:
        merged = {"mean": values.mean(0), "sum": values.sum(0), "max": values.amax(0), "min": values.amin(0)}[merge]
    if space == "raw":
        return merged
    return to_logits(merged.log() if space == "prob" else merged)


SPACE_CASES = [
    (merge, space) for merge in ("mean", "sum", "max", "min", "median") for space in ("raw", "prob", "logprob")
] + [("gmean", "prob"), ("tsharpen", "prob"), ("vote", "prob")]


@pytest.mark.parametrize(("merge", "space"), SPACE_CASES)
@pytest.mark.parametrize("views", [4, 5])
def test_merge_in_space_matches_formula_via_augmenter_and_merger(merge, space, views):
    table = logit_table(views)
    expected = reference(table, merge, space)
    for chunk_size in (1, 2, None):
        torch.testing.assert_close(table_tta(table, chunk_size, merge=merge, space=space), expected, **TOL)
    merger = Merger(merge, space, "softmax")
    for stack in table.split([1, views - 3, 2]):
        merger.add(stack)
    torch.testing.assert_close(merger.result(), expected, **TOL)


def test_default_spaces():
    table = logit_table(4)
    torch.testing.assert_close(table_tta(table, merge="mean"), table.mean(0), **TOL)  # raw by default, like ttach
    torch.testing.assert_close(table_tta(table, merge="gmean"), table.log_softmax(2).mean(0), **TOL)
    torch.testing.assert_close(table_tta(table, merge="tsharpen"), table.softmax(2).sqrt().mean(0).log(), **TOL)
    torch.testing.assert_close(table_tta(table, merge="vote"), reference(table, "vote", "prob"), **TOL)


def test_prob_mean_is_log_of_mean_softmax_and_a_valid_logit():
    table = logit_table(6)
    out = table_tta(table, merge="mean", space="prob")
    torch.testing.assert_close(out, table.softmax(2).mean(0).log(), **TOL)
    torch.testing.assert_close(out.softmax(1).sum(1), torch.ones(3), **TOL)
    torch.testing.assert_close(out.exp(), out.softmax(1), **TOL)  # already normalised: log-probabilities


def test_median_even_averages_the_two_middle_values_odd_takes_the_middle():
    values = torch.tensor([3.0, -1.0, 7.0, 2.0, 10.0]).view(5, 1, 1)  # 1 sample, 1 output
    assert table_tta(values[:4], merge="median").item() == pytest.approx((2.0 + 3.0) / 2)
    assert table_tta(values, merge="median").item() == pytest.approx(3.0)


class BufferModel(nn.Module):
    """Writes every output into one reused buffer, as CUDA-graph models (torch.compile "reduce-overhead") do."""

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net, self.buffer = net, None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.net(x)
        if self.buffer is None or self.buffer.shape != y.shape:
            self.buffer = torch.empty_like(y)
        return self.buffer.copy_(y)


@pytest.mark.parametrize("merge", ["median", "mean", "max"])
def test_merges_do_not_keep_references_to_model_outputs(merge):
    model, x = conv_classifier(), image_batch(8, 8)
    with torch.no_grad():
        stack = torch.stack([model(t.augment_image(x)) for t in ttach.aliases.flip_transform()])
        expected = reference(stack, merge, "raw")
        for chunk_size in (1, 2, None):
            out = ttc.TTAWrapper(BufferModel(model), transforms="flip", merge=merge, chunk_size=chunk_size)(x)
            torch.testing.assert_close(out, expected, **TOL, msg=f"chunk_size={chunk_size}")


@pytest.mark.parametrize(("merge", "space"), [("mean", "raw"), ("mean", "prob"), ("max", "raw"), ("gmean", "prob")])
def test_gradients_flow_through_merges(merge, space):
    model = conv_classifier()
    x = image_batch()
    weights = torch.randn(3, 5, generator=torch.Generator().manual_seed(4))
    views = [(h, k) for h in (False, True) for k in range(4)]

    def grad(run):
        leaf = x.clone().requires_grad_(True)
        (run(leaf) * weights).sum().backward()
        return leaf.grad

    def by_hand(leaf):
        stack = torch.stack([model(torch.rot90(leaf.flip(-1) if h else leaf, k, (2, 3))) for h, k in views])
        return reference(stack, merge, space)

    expected = grad(by_hand)
    for chunk_size in (1, 3, None):
        augmenter = Augmenter("d4", merge=merge, space=space, chunk_size=chunk_size)
        got = grad(lambda leaf, augmenter=augmenter: augmenter(model, leaf)[0])
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(
    ("merge", "space"),
    [
        ("mean", "prob"),
        ("mean", "logprob"),
        ("median", "prob"),
        ("median", "logprob"),
        ("gmean", "prob"),
        ("tsharpen", "prob"),
    ],
)
def test_sigmoid_result_is_the_logit_of_the_merged_probability(merge, space):
    table = logit_table(5, classes=6)
    p, log_p = table.sigmoid(), nn.functional.logsigmoid(table)
    merged_p = {
        ("mean", "prob"): p.mean(0),
        ("mean", "logprob"): log_p.mean(0).exp(),
        ("median", "prob"): p.median(0).values,  # odd count: the middle value
        ("median", "logprob"): log_p.median(0).values.exp(),
        ("gmean", "prob"): log_p.mean(0).exp(),
        ("tsharpen", "prob"): p.sqrt().mean(0),
    }[(merge, space)]
    for chunk_size in (1, None):
        out = table_tta(table, chunk_size, merge=merge, space=space, activation="sigmoid")
        torch.testing.assert_close(out.sigmoid(), merged_p, **TOL)
        torch.testing.assert_close(out, reference(table, merge, space, "sigmoid"), rtol=1e-5, atol=1e-5)


def probability_logits(rows: list[list[list[float]]]) -> torch.Tensor:
    """(views, batch, classes) logits whose softmax is the given probabilities."""
    return torch.tensor(rows).permute(1, 0, 2).log()


def test_vote_majority_wins_over_mean_probability_and_ties_break_by_mean_probability():
    weak0, weak0b, strong1, strong2 = [0.5, 0.3, 0.2], [0.4, 0.35, 0.25], [0.05, 0.9, 0.05], [0.01, 0.01, 0.98]
    table = probability_logits(
        [
            [weak0, weak0, strong1, strong1],  # 2-2 tie between 0 and 1: class 1 has the larger mean probability
            [weak0b, weak0b, weak0b, strong2],  # majority 0, though class 2 has the larger mean probability
        ]
    )
    n = 4
    out = table_tta(table, merge="vote")
    assert out.argmax(1).tolist() == [1, 0]
    assert table_tta(table, merge="mean", space="prob").argmax(1).tolist() == [1, 2]
    votes = torch.tensor([[2.0, 2.0, 0.0], [3.0, 0.0, 1.0]])
    documented = votes / n + table.softmax(2).mean(0) / (n + 1)  # merge.py: votes / n + mean_prob / (n + 1)
    torch.testing.assert_close(out, documented, **TOL)


def test_vote_segmentation_counts_per_pixel():
    table = torch.randn(5, 2, 3, 4, 6, generator=torch.Generator().manual_seed(3))  # views, B, C, H, W
    out = table_tta(table, merge="vote", task="segmentation", chunk_size=2)
    torch.testing.assert_close(out, reference(table, "vote", "prob"), **TOL)
    majority = nn.functional.one_hot(table.argmax(2), 3).sum(0).argmax(-1)  # ties: see the exact values above
    counts = nn.functional.one_hot(table.argmax(2), 3).sum(0)
    unique = (counts == counts.amax(-1, keepdim=True)).sum(-1) == 1
    assert torch.equal(out.argmax(1)[unique], majority[unique])


# ------------------------------------------------------------------------------------------------------ dtypes


@pytest.mark.parametrize(("merge", "space"), [("mean", "raw"), ("mean", "prob"), ("gmean", "prob"), ("vote", "prob")])
def test_float64_model_gives_float64_computed_in_float64(merge, space):
    table = logit_table(7).double()
    out = table_tta(table, 3, merge=merge, space=space)
    assert out.dtype == torch.float64
    torch.testing.assert_close(out, reference(table, merge, space), rtol=1e-12, atol=1e-12)


def test_bfloat16_output_accumulates_in_float32():
    table = torch.ones(16, 1, 2, dtype=torch.bfloat16)
    table[0] = 256.0  # bfloat16 spacing at 256 is 2: a bfloat16 running sum never moves past 256
    naive = table[0]
    for v in range(1, 16):
        naive = naive + table[v]
    expected = table.float().mean(0).bfloat16()  # 271 / 16, rounded once
    assert not torch.equal(naive / 16, expected)
    for chunk_size in (1, None):
        out = table_tta(table, chunk_size, merge="mean")
        assert out.dtype == torch.bfloat16
        assert torch.equal(out, expected)


@pytest.mark.parametrize(("merge", "space"), [("mean", "raw"), ("sum", "raw"), ("mean", "prob"), ("tsharpen", "prob")])
def test_bfloat16_output_matches_float32_reference_to_bfloat16_precision(merge, space):
    table = logit_table(8).bfloat16()
    out = table_tta(table, 3, merge=merge, space=space)
    assert out.dtype == torch.bfloat16
    expected = reference(table.float(), merge, space)
    torch.testing.assert_close(out.float(), expected, rtol=2**-7, atol=2**-7)


# ------------------------------------------------------------------------------------- constant memory in views


def held_tensors(merger: Merger) -> list[torch.Tensor]:
    found = []
    for value in vars(merger).values():
        items = value if isinstance(value, list | tuple) else [value]
        found += [item for item in items if isinstance(item, torch.Tensor)]
    return found


@pytest.mark.parametrize(
    ("merge", "space"), [(m, s) for m in MERGES for s in ("raw", "prob") if (m, s) != ("vote", "raw")]
)
def test_merger_memory_is_constant_in_views_except_median(merge, space):
    generator = torch.Generator().manual_seed(0)
    held = {}
    for stacks in (2, 50):
        merger = Merger(merge, space, "softmax")
        for _ in range(stacks):
            merger.add(torch.rand(1, 3, 4, generator=generator))  # positive: raw gmean/tsharpen are defined
        assert torch.isfinite(merger.result()).all()
        tensors = held_tensors(merger)
        held[stacks] = (len(tensors), sum(t.numel() for t in tensors))
    if merge == "median":
        assert held[50][0] == 50 and held[50][1] == 25 * held[2][1]
    else:
        assert held[2] == held[50]


# ---------------------------------------------------------------------------------------------------- bad input


@pytest.mark.parametrize(
    ("options", "words"),
    [
        (dict(merge="avg"), ["`merge`='avg'", "'mean'"]),
        (dict(space="log"), ["`space`='log'", "'logprob'"]),
        (dict(activation="relu"), ["`activation`='relu'", "'sigmoid'"]),
        (dict(merge="vote", task="keypoints"), ["merge='vote'", "task='keypoints'"]),
        (dict(merge="vote", task="boxes"), ["merge='vote'", "task='boxes'"]),
        (dict(merge="vote", activation="sigmoid"), ["merge='vote'", "activation"]),
        (dict(merge="vote", space="raw"), ["merge='vote'", "space"]),
        (dict(merge="vote", space="logprob"), ["merge='vote'", "space"]),
        (dict(space="prob", task="keypoints"), ["space='prob'", "task='keypoints'"]),
        (dict(space="logprob", task="boxes"), ["space='logprob'", "task='boxes'"]),
        (dict(merge="gmean", space="logprob"), ["merge='gmean'", "log-probabilities"]),
        (dict(merge="tsharpen", space="logprob"), ["merge='tsharpen'", "log-probabilities"]),
    ],
)
def test_bad_options_raise_at_construction_naming_argument_and_value(options, words):
    for build in (Augmenter, ttc.TestTimeAugmentation, lambda **o: ttc.TTAWrapper(nn.Identity(), **o)):
        with pytest.raises(ValueError) as info:
            build(**options)
        for word in words:
            assert word in str(info.value)


@pytest.mark.parametrize(
    ("forward", "words"),
    [
        (lambda x: {"logits": x.mean((2, 3))}, ["tensor output", "dict"]),
        (lambda x: x.mean((2, 3))[:1], ["4 rows", "(1, 3)"]),  # 2 views x batch 2 stacked, one row returned
        (lambda x: x.mean(), ["4 rows", "shape ()"]),
    ],
)
def test_model_output_that_cannot_be_merged_raises(forward, words):
    with pytest.raises(ValueError) as info:
        Augmenter("hflip", chunk_size=None)(forward, image_batch(b=2))
    for word in words:
        assert word in str(info.value)


@pytest.mark.parametrize("options", [dict(merge="vote"), dict(space="prob"), dict(space="logprob")])
def test_class_merges_on_a_one_dimensional_output_raise(options):
    with pytest.raises(ValueError, match=r"\(B, C\) class outputs.*shape \(3,\)"):
        Augmenter("hflip", **options)(lambda x: x.mean((1, 2, 3)), image_batch())
    out, _ = Augmenter("hflip", merge="mean")(lambda x: x.mean((1, 2, 3)), image_batch())  # raw: fine
    assert out.shape == (3,)
