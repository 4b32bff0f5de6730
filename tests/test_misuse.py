"""Misuse, end to end: one test (or parametrized case) per row of the README's "Misuse and what you get" table.

Errors are checked by type and by a message that names the argument or value. Where a Trainer run is involved, the
model must come back bitwise (parameters, buffers, gradients, modes, flags, no forward left installed) and the
Trainer's ``inference_mode`` as it was; errors promised "before any batch" must come before the first forward call.
Documented behaviours are checked against references written out here (a copy of the model in eval mode, batch
statistics computed by hand).
"""

import copy
import functools
import re

import lightning as L
import pytest
import pytorch_lightning as pl
import torch
from torch import nn
from torch.utils.data import DataLoader, IterableDataset
from ttt_models import ConvNet, assert_state, images, loader, state, trainer

import ttc_lightning as ttc
from ttc_lightning import stopping
from ttc_lightning.data import corrupt, stream

SGD = functools.partial(torch.optim.SGD, lr=0.1)
TTA = ttc.TestTimeAugmentation


def case(label, *values):
    """A parametrized case named ``label``."""
    return pytest.param(*values, id=label)


def check_refused(make, error, match) -> None:
    """``make()`` must raise ``error`` with a message matching ``match``."""
    with pytest.raises(error, match=match):
        make()


def refused(callbacks, model, data, error, match, before_any_batch: bool = True, **trainer_kwargs):
    """``trainer.predict`` must raise ``error``; the model and the Trainer's flags come back as they were."""
    before = state(model)
    t = trainer(callbacks, **trainer_kwargs)
    with pytest.raises(error, match=match) as caught:
        t.predict(model, data)
    if before_any_batch:
        assert model.calls == 0, "the error came after the model had run"
    assert_state(model, before)
    assert t.predict_loop.inference_mode is True
    return caught


class Counting(L.LightningModule):
    """``self.net(x)`` behind a forward that counts its calls."""

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net, self.calls = net, 0

    def forward(self, x):
        self.calls += 1
        return self.net(x)


class Model(ttc.TestTimeComputeMixin, Counting):
    """With the mixin's predict_step."""


def two_images() -> tuple[torch.Tensor, torch.Tensor]:
    """Two images in [0, 1] and their labels, for the corruption and stream functions."""
    return torch.rand(2, 3, 8, 8, generator=torch.Generator().manual_seed(0)), torch.arange(2)


def vector_net(batchnorm: bool = False) -> nn.Sequential:
    """Linear 6->8, (BatchNorm1d with non-trivial statistics and affine parameters), ReLU, Linear 8->4."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        net = nn.Sequential(nn.Linear(6, 8), *([nn.BatchNorm1d(8)] if batchnorm else []), nn.ReLU(), nn.Linear(8, 4))
        if batchnorm:
            with torch.no_grad():
                net[1].running_mean.uniform_(-1, 1)
                net[1].running_var.uniform_(0.5, 2)
                net[1].weight.uniform_(0.5, 1.5)
                net[1].bias.uniform_(-0.5, 0.5)
    return net


def eval_copy(net: nn.Module) -> nn.Module:
    """A reference copy in eval mode (Lightning puts the model back in its own modes after predict)."""
    return copy.deepcopy(net).eval()


def vectors(n: int = 8) -> torch.Tensor:
    """``n`` seeded rows of 6 features."""
    return torch.randn(n, 6, generator=torch.Generator().manual_seed(0))


class Outputs(nn.Module):
    """A conv classifier returning its logits in another form: ``tuple``, ``dict``, ``list``, ``scalar``, ``scores``
    (one number per sample) or ``one_class``."""

    def __init__(self, kind: str) -> None:
        super().__init__()
        self.kind = kind
        self.net = copy.deepcopy(ConvNet().net)

    def forward(self, x):
        y = self.net(x)
        forms = {"tuple": (y, y), "dict": {"logits": y}, "list": [y], "scalar": y.sum(), "scores": y[:, 0]}
        return forms.get(self.kind, y[:, :1])


# --- Arguments ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("make", "error", "match"),
    [
        case("transforms", lambda: TTA(transforms="hflp"), ValueError, r"`transforms`='hflp' is not .*allowed: .*d4"),
        case("merge", lambda: TTA(merge="avg"), ValueError, r"`merge`='avg' is not supported; allowed: 'mean'"),
        case("task", lambda: TTA(task="detection"), ValueError, r"`task`='detection'.*'segmentation'"),
        case("space", lambda: TTA(space="probs"), ValueError, r"`space`='probs'.*'prob'"),
        case("activation", lambda: TTA(activation="relu"), ValueError, r"`activation`='relu'.*'sigmoid'"),
        case("norm", lambda: ttc.BatchNormAdapt(norm="train"), ValueError, r"`norm`='train'.*'batch'"),
        case("mode", lambda: ttc.IterativeInference(mode="mc"), ValueError, r"`mode`='mc'.*'sample'"),
        case("reset", lambda: ttc.Resets(every="episodic"), ValueError, r"`resets.every`='episodic'.*'batch'"),
        case("params", lambda: ttc.Tent(params="bn"), ValueError, r"`params`='bn'.*batchnorm"),
        case("objective", lambda: ttc.TestTimeTraining(SGD, objective="ent"), ValueError, r"`objective`='ent'"),
        case("interpolation", lambda: ttc.Scale(interpolation="cubic"), ValueError, r"`interpolation`='cubic'"),
        case("corruption", lambda: corrupt(two_images()[0], "fogg", 1), ValueError, r"`name`='fogg'.*'fog'"),
        case("stream_mode", lambda: stream(*two_images(), mode="x"), ValueError, "`mode`='x'"),
    ],
)
def test_an_unknown_name_is_refused_with_the_allowed_names(make, error, match):
    check_refused(make, error, match)


@pytest.mark.parametrize(
    ("make", "error", "match"),
    [
        case("misspelt", lambda: ttc.Tent(lr=1e-3), TypeError, r"unexpected keyword argument 'lr'"),
        case("preset_owned", lambda: ttc.Tent(norm="ema"), TypeError, r"unexpected keyword argument 'norm'"),
        case(
            "moved",
            lambda: ttc.Tent(keep_adapted=True),
            TypeError,
            re.escape("Tent(keep_adapted=...) moved to a new argument: pass persistence=ttc.Persistence(keep_adapted="),
        ),
        case("wrapper", lambda: ttc.TTAWrapper(nn.Identity(), stages=("predict",)), TypeError, "'stages'"),
    ],
)
def test_a_misspelt_or_preset_owned_option_is_refused(make, error, match):
    check_refused(make, error, match)


@pytest.mark.parametrize(
    ("make", "match"),
    [
        case("str", lambda: ttc.Tent(steps="2"), r"`steps`='2' must be an integer >= 1"),
        case("float", lambda: ttc.Tent(steps=1.5), r"`steps`=1.5 must be an integer >= 1"),
        case("bool", lambda: TTA(chunk_size=True), r"`chunk_size`=True must be an integer >= 1"),
        case("zero", lambda: ttc.MEMO(views=0), r"`views`=0 must be an integer >= 1"),
        case("max_iters", lambda: ttc.IterativeInference(max_iters=0), r"`max_iters`=0"),
        case("min_views", lambda: TTA(min_views="2"), r"`min_views`='2' must be an integer >= 1"),
        case("seed", lambda: ttc.RandomAugment(seed=-1), r"`seed`=-1 must be an integer >= 0"),
    ],
)
def test_a_non_integer_where_an_integer_goes(make, match):
    check_refused(make, ValueError, match)


@pytest.mark.parametrize(
    ("make", "match"),
    [
        case("alpha", lambda: ttc.BatchNormAdapt(alpha=2), r"`alpha`=2 must be a number in \[0, 1\]"),
        case("norm_alpha_str", lambda: ttc.NormStatistics("mix", alpha="0.5"), r"`alpha`='0.5' must be a"),
        case("momentum", lambda: ttc.BatchNormAdapt(momentum=0), r"`momentum`=0 .* \(0, 1\]"),
        case("ema", lambda: ttc.CoTTA(ema="x"), r"`ema`='x' must be a number in \[0, 1\]"),
        case("anchor", lambda: ttc.CoTTA(anchor_threshold=None), r"`anchor_threshold`=None"),
        case("severity", lambda: ttc.RandomAugment(severity="1"), r"`severity`='1' .* \(0, 1\]"),
        case("threshold", lambda: stopping.Confidence(1.5), r"`threshold`=1.5 .* \[0.0, 1.0\]"),
        case("e_margin", lambda: ttc.EATA(e_margin=0), r"`e_margin`=0 must be a positive number"),
        case("rho", lambda: ttc.SAR(rho=-1), r"`rho`=-1 must be a positive number"),
        case("fisher_alpha", lambda: ttc.EATA(fisher_alpha="x"), r"`fisher_alpha`='x' must be a non-negative"),
        case("clip_grad_bool", lambda: ttc.Updates(clip_grad=True), r"`updates.clip_grad`=True must be a non-negative"),
    ],
)
def test_a_number_out_of_range_or_not_a_number(make, match):
    check_refused(make, ValueError, match)


@pytest.mark.parametrize(
    ("make", "match"),
    [
        case("episodic", lambda: ttc.Tent(episodic="no"), r"`episodic`='no' must be True or False"),
        case("eata_episodic", lambda: ttc.EATA(episodic="False"), r"`episodic`='False'"),
        case("keep_adapted", lambda: ttc.Persistence(keep_adapted="no"), r"`persistence.keep_adapted`='no'"),
        case("sync", lambda: ttc.Updates(sync="yes"), r"`updates.sync`='yes' must be True or False"),
        case("flags", lambda: ttc.Tent(flags=1), r"`flags`=1 must be True or False"),
        case("anytime", lambda: TTA(stop=stopping.Confidence(), anytime="yes"), r"`anytime`='yes'"),
        case("return_views", lambda: TTA(stop=stopping.Confidence(), return_views=1), r"`return_views`=1"),
        case("writer_merge", lambda: ttc.PredictionWriter("p.pt", merge="yes"), r"`merge`='yes' must be a bool"),
    ],
)
def test_a_string_or_number_where_a_flag_goes(make, match):
    check_refused(make, ValueError, match)


@pytest.mark.parametrize(
    ("make", "error", "match"),
    [
        case("Scale", lambda: ttc.Scale(0.5), ValueError, r"`scales`=0.5 must be a list or tuple.*not a single float"),
        case("Rotate90", lambda: ttc.Rotate90(1), ValueError, r"`ks`=1 must be a list or tuple"),
        case("Add", lambda: ttc.Add(0.1), ValueError, r"`values`=0.1 must be a list or tuple"),
        case("Multiply_str", lambda: ttc.Multiply("1.1"), ValueError, r"`factors`='1.1' must be a list or tuple"),
        case("Resize", lambda: ttc.Resize(8), ValueError, r"`sizes`=8 must be a list or tuple"),
        case(
            "flip_classes",
            lambda: TTA(task=ttc.tta.Classification(flip_classes=5)),
            ValueError,
            r"`flip_classes`=5 must be a list of index",
        ),
        case("uncertainty", lambda: TTA(uncertainty=1), ValueError, r"`uncertainty`=1 must be True, a name or a list"),
        case("stages", lambda: TTA(stages="predict"), ValueError, r"`stages`='predict' must be a non-empty list"),
        case("AllOf", lambda: stopping.AllOf(stopping.Confidence()), TypeError, r"AllOf needs a list of stopping"),
        case(
            "severities",
            lambda: stream(*two_images(), severities=5),
            ValueError,
            r"`severities`=5 must",
        ),
    ],
)
def test_one_value_where_a_list_goes(make, error, match):
    check_refused(make, error, match)


@pytest.mark.parametrize(
    ("make", "error", "match"),
    [
        case("Add", lambda: ttc.Add(["a"]), ValueError, r"`values`=\('a',\) must hold numbers; got \['a'\]"),
        case("Multiply", lambda: ttc.Multiply([None]), ValueError, r"`factors`=\(None,\) must hold numbers"),
        case("Scale", lambda: ttc.Scale(["2"]), ValueError, r"`scales`=\('2',\) must be positive numbers"),
        case("Rotate90", lambda: ttc.Rotate90([5]), ValueError, r"`ks`=\(5,\) must hold integers in 0..3"),
        case(
            "pair",
            lambda: TTA(task=ttc.tta.Segmentation(flip_classes=[(0,)])),
            ValueError,
            r"`flip_classes` entry \(0,\) must be a pair",
        ),
        case(
            "reused",
            lambda: TTA(task=ttc.tta.Classification(flip_classes=[(0, 1), (1, 2)])),
            ValueError,
            r"`flip_classes`=.* uses an index",
        ),
        case("transforms", lambda: TTA(transforms=["hflip", 3]), TypeError, r"`transforms` entries must be names"),
        case("class", lambda: TTA(transforms=[ttc.HFlip]), TypeError, r"`transforms` entries .* got type"),
    ],
)
def test_bad_list_entries(make, error, match):
    check_refused(make, error, match)


@pytest.mark.parametrize(
    ("make", "error", "match"),
    [
        case("transforms_none", lambda: TTA(transforms=None), TypeError, r"`transforms` must be .* got NoneType None"),
        case("transforms_empty", lambda: TTA(transforms=[]), TypeError, r"`transforms` must be .* non-empty list"),
        case("merge_none", lambda: TTA(merge=None), ValueError, r"`merge`=None is not supported"),
        case("params_empty", lambda: ttc.Tent(params=[]), ValueError, r"`params`=\[\] selects no parameters"),
        case("stages_empty", lambda: TTA(stages=[]), ValueError, r"`stages`=\[\]"),
        case("AnyOf_empty", lambda: stopping.AnyOf([]), TypeError, r"AnyOf needs a non-empty list"),
        case(
            "corruptions",
            lambda: stream(*two_images(), corruptions=[]),
            ValueError,
            r"`corruptions`=\[\]",
        ),
    ],
)
def test_none_or_empty(make, error, match):
    check_refused(make, error, match)


def test_no_uncertainty_is_none_or_an_empty_list():
    assert TTA(uncertainty=None).augmenter.uncertainty == () == TTA(uncertainty=[]).augmenter.uncertainty


@pytest.mark.parametrize(
    ("make", "match"),
    [
        case(
            "optimizer_instance",
            lambda: ttc.Tent(optimizer=torch.optim.Adam(nn.Linear(2, 2).parameters())),
            r"`optimizer` must be a factory params -> Optimizer \(functools.partial\); got Adam",
        ),
        case("optimizer_str", lambda: ttc.EATA(optimizer="adam"), r"`optimizer` must be a factory.*'adam'"),
        case("scheduler", lambda: ttc.Updates(scheduler="cosine"), r"`updates.scheduler` must be a factory .*'cosine'"),
        case("objective", lambda: ttc.TestTimeTraining(SGD, objective=3), r"`objective` must be a name or a"),
        case("stop", lambda: TTA(stop="confidence"), r"`stop` must be a ttc_lightning.stopping rule; got str"),
        case("memo_augment", lambda: ttc.MEMO(augment=lambda x: x), r"`augment`=.* must be a ttc.RandomAugment"),
        case("cotta_augment", lambda: ttc.CoTTA(augment="x"), r"`augment`='x' must be a ttc.RandomAugment"),
    ],
)
def test_an_object_where_a_factory_or_rule_goes(make, match):
    check_refused(make, TypeError, match)


@pytest.mark.parametrize(
    ("factory", "error", "match"),
    [
        (functools.partial(torch.optim.SGD, lr=-1.0), ValueError, r"`optimizer` factory .* failed .*Invalid learning"),
        (lambda params: 3, TypeError, r"`optimizer` factory returned int, not a torch Optimizer"),
    ],
    ids=["fails", "not_an_optimizer"],
)
def test_a_failing_optimizer_factory_is_refused_before_any_batch(factory, error, match):
    refused([ttc.Tent(optimizer=factory)], ConvNet(), loader(images(8)), error, match)


@pytest.mark.parametrize(
    ("make", "error", "match"),
    [
        case(
            "save_path",
            lambda: ttc.Persistence(save_every_n_batches=1, save_path=3),
            TypeError,
            r"`persistence.save_path`=3 must be",
        ),
        case(
            "resume_from",
            lambda: ttc.Persistence(resume_from=3),
            TypeError,
            r"`persistence.resume_from`=3 must be a file name",
        ),
        case("writer_empty", lambda: ttc.PredictionWriter(""), ValueError, r"`path`='' must be the name of a file"),
        case("writer_folder", lambda: ttc.PredictionWriter("."), ValueError, r"`path`='.' .*not a folder"),
    ],
)
def test_a_path_that_is_not_a_file_name(make, error, match):
    check_refused(make, error, match)


def test_a_missing_save_folder_is_created(tmp_path):
    path = tmp_path / "new" / "folder" / "state.pt"
    trainer(
        [ttc.Tent(optimizer=SGD, persistence=ttc.Persistence(save_every_n_batches=1, save_path=str(path)))]
    ).predict(ConvNet(), loader(images(8), 4))
    assert torch.load(path, weights_only=False)["counters"]["batches_seen"] == 2


def test_resume_from_a_missing_file_or_a_file_that_is_not_a_state(tmp_path):
    refused(
        [ttc.Tent(persistence=ttc.Persistence(resume_from=str(tmp_path / "none.pt")))],
        ConvNet(),
        loader(images(8)),
        FileNotFoundError,
        "none.pt",
    )
    junk = tmp_path / "junk.pt"
    torch.save({"weights": torch.zeros(1)}, junk)
    match = (
        r"Tent cannot resume from a dict with keys \['weights'\]: not an adaptation state .*`persistence.resume_from`"
    )
    refused(
        [ttc.Tent(persistence=ttc.Persistence(resume_from=str(junk)))], ConvNet(), loader(images(8)), ValueError, match
    )


@pytest.mark.parametrize(
    ("make", "match"),
    [
        case("anytime", lambda: TTA(anytime=True), r"`anytime` and `return_views` need a stopping rule"),
        case("median", lambda: TTA(stop=stopping.Confidence(), merge="median"), r"merge='median'"),
        case("chunk", lambda: TTA(stop=stopping.Confidence(), chunk_size=None), r"`chunk_size`=None has no effect"),
        case("min_views", lambda: TTA(stop=stopping.Confidence(), min_views=3), r"`min_views`=3 exceeds the 2"),
        case("class_rule", lambda: TTA(stop=stopping.Margin(), task="segmentation"), r"needs task='classif"),
        case("vote_sigmoid", lambda: TTA(merge="vote", activation="sigmoid"), r"activation='sigmoid'"),
        case("vote_keypoints", lambda: TTA(merge="vote", task="keypoints"), r"merge='vote' needs class outputs"),
        case("gmean_logprob", lambda: TTA(merge="gmean", space="logprob"), r"merge='gmean' is undefined"),
        case("crop_segmentation", lambda: TTA(transforms="five_crop", task="segmentation"), r"no inverse"),
        case(
            "crop_keypoints",
            lambda: TTA("five_crop", task=ttc.tta.Keypoints(flip_pairs=[(0, 1)])),
            r"FiveCrop.*no inverse for task='keypoints'",
        ),
        case("iters", lambda: ttc.IterativeInference(min_iters=3, max_iters=2), r"`min_iters`=3 must not"),
        case("warm_start", lambda: ttc.IterativeInference(warm_start=True), r"`warm_start` needs mode='refine'"),
        case(
            "save",
            lambda: ttc.Persistence(save_every_n_batches=2),
            r"`persistence.save_every_n_batches`=2 needs a `persistence.save_path`",
        ),
    ],
)
def test_arguments_that_contradict_each_other(make, match):
    check_refused(make, ValueError, match)


@pytest.mark.parametrize("preset", [ttc.Tent, ttc.EATA, ttc.SAR, ttc.MEMO, ttc.CoTTA], ids=lambda c: c.__name__)
def test_no_optimizer_for_a_preset_that_takes_gradient_steps(preset):
    check_refused(lambda: preset(optimizer=None), ValueError, rf"`optimizer`=None: {preset.__name__} adapts .*Norm")


@pytest.mark.parametrize(
    ("make", "error", "match"),
    [
        case("steps", lambda: ttc.TestTimeTraining(steps=3), ValueError, r"`steps` set without an `optimizer`"),
        case(
            "several",
            lambda: ttc.TestTimeTraining(params="all", updates=ttc.Updates(tol=0.1)),
            ValueError,
            r"`params`, `updates.tol` set with",
        ),
        case("objective", lambda: ttc.TestTimeTraining(objective=lambda y: y.sum()), ValueError, r"`objective` set"),
        case(
            "sync",
            lambda: ttc.TestTimeTraining(updates=ttc.Updates(sync=True)),
            ValueError,
            r"`updates.sync` set without an `optimizer`",
        ),
        case(
            "bn_collapse",
            lambda: ttc.BatchNormAdapt(resets=ttc.Resets(on_collapse=0.1)),
            ValueError,
            r"`resets.on_collapse` set without an `optimizer`: nothing is trained",
        ),
        case("bn_scheduler", lambda: ttc.BatchNormAdapt(updates=ttc.Updates()), TypeError, r"'updates'"),
        case("bn_params", lambda: ttc.BatchNormAdapt(params="all"), TypeError, r"'params'"),
    ],
)
def test_gradient_options_without_an_optimizer(make, error, match):
    check_refused(make, error, match)


@pytest.mark.parametrize(
    ("make", "error", "match"),
    [
        case("tent_norm_alpha", lambda: ttc.Tent(norm_alpha=0.3), TypeError, r"keyword argument 'norm_alpha'"),
        case("memo_objective", lambda: ttc.MEMO(objective=len), TypeError, r"keyword argument 'objective'"),
        case("cotta_objective", lambda: ttc.CoTTA(objective=len), TypeError, r"keyword argument 'objective'"),
        case(
            "norm_alpha",
            lambda: ttc.TestTimeTraining(SGD, norm=ttc.NormStatistics("batch", alpha=0.3)),
            ValueError,
            r"`alpha`=0.3 has no effect: .*norm='mix', and norm='batch'. Set norm='mix'",
        ),
        case(
            "clip_mode",
            lambda: ttc.Tent(updates=ttc.Updates(clip_mode="value")),
            ValueError,
            r"`updates.clip_mode`='value' has no effect",
        ),
        case(
            "tol",
            lambda: ttc.Tent(updates=ttc.Updates(tol=0.1), steps=2),
            ValueError,
            r"`updates.tol`=0.1 has no effect: .*steps >= 3",
        ),
        case(
            "save_path",
            lambda: ttc.Persistence(save_path="s.pt"),
            ValueError,
            r"`persistence.save_path`='s.pt' has no effect",
        ),
        case(
            "bn_keep",
            lambda: ttc.BatchNormAdapt(persistence=ttc.Persistence(keep_adapted=True)),
            ValueError,
            r"`persistence.keep_adapted`=True .*'ema'",
        ),
        case(
            "sar_collapse",
            lambda: ttc.SAR(resets=ttc.Resets(on_collapse=0.1)),
            ValueError,
            r"`resets.on_collapse`=0.1 has no effect: .*`reset_below`",
        ),
        case(
            "episodic_every",
            lambda: ttc.Tent(episodic=True, resets=ttc.Resets(every=3)),
            ValueError,
            r"`resets.every`=3 has no effect: episodic=True",
        ),
        case("min_views", lambda: TTA(min_views=2), ValueError, r"`min_views`=2 has no effect: .*stop=None"),
        case(
            "flip_classes",
            lambda: TTA("rot90", task=ttc.tta.Classification(flip_classes=[(0, 1)])),
            ValueError,
            r"`flip_classes`=\[\(0, 1\)\] has no effect: .*'rot90' has none",
        ),
        case("activation", lambda: TTA(activation="sigmoid"), ValueError, r"`activation`='sigmoid' has no effect"),
        case("refine_seed", lambda: ttc.IterativeInference("refine", seed=1), ValueError, r"`seed`=1 has no effect"),
        case("min_iters", lambda: ttc.IterativeInference(min_iters=2), ValueError, r"`min_iters`=2 has no effect"),
        case("interpolation", lambda: ttc.Scale([1], "area"), ValueError, r"`interpolation`='area' has no effect"),
        case("fisher_alpha", lambda: ttc.EATA(fisher_alpha=1.0), ValueError, r"`fisher_alpha`=1.0 has no effect"),
        case("reset_below", lambda: ttc.SAR(episodic=True, reset_below=0.1), ValueError, r"`reset_below`=0.1 has"),
        case("memo_views", lambda: ttc.MEMO(transforms="d4", views=4), ValueError, r"`views`=4 has no effect"),
        case("cotta_views", lambda: ttc.CoTTA(anchor_threshold=0, views=4), ValueError, r"`views`=4 has no"),
        case(
            "shard_size",
            lambda: ttc.PredictionWriter("p.pt", shard_size=4, merge=False),
            ValueError,
            r"`shard_size`=4 has no effect: .* merge_parts\(path, shard_size=4\)",
        ),
    ],
)
def test_an_argument_that_cannot_act_given_the_others(make, error, match):
    """A sample of the refusals; tests/test_arguments.py tries every argument of every public class."""
    check_refused(make, error, match)


@pytest.mark.parametrize(
    ("callbacks", "make_model", "match"),
    [
        case(
            "sync",
            lambda: [ttc.Tent(optimizer=SGD, updates=ttc.Updates(sync=True))],
            ConvNet,
            r"`updates.sync`=True has no effect: .*one proc",
        ),
        case(
            "episodic_one_step",
            lambda: [ttc.Tent(optimizer=SGD, episodic=True)],
            ConvNet,
            r"`episodic`=True.* with steps=1 leaves the `optimizer` without effect",
        ),
        case(
            "one_dataloader",
            lambda: [ttc.TestTimeTraining(optimizer=SGD, resets=ttc.Resets(every="dataloader"))],
            ConvNet,
            r"`resets.every`='dataloader' has no effect: .* and this run has one",
        ),
        case(
            "norm_without_batchnorm",
            lambda: [ttc.TestTimeTraining(optimizer=SGD, params="norm", norm="ema")],
            lambda: _no_batchnorm("group"),
            r"`norm`='ema' has no effect: .*ConvNet has none",
        ),
    ],
)
def test_an_argument_the_run_leaves_without_effect_is_refused_before_any_batch(callbacks, make_model, match):
    refused(callbacks(), make_model(), loader(images(8)), ValueError, match)


def test_episodic_with_one_step_is_allowed_where_an_update_reaches_a_prediction():
    """Composed with TTA the prediction is the adapted model's; MEMO predicts after its update."""
    model = ConvNet()
    before = state(model)
    tent = ttc.Tent(optimizer=SGD, episodic=True)
    adapted = torch.cat(trainer([tent, TTA()]).predict(model, loader(images(8), 4)))
    source = torch.cat(trainer([ttc.BatchNormAdapt(), TTA()]).predict(model, loader(images(8), 4)))
    assert tent.updates == 2 and not torch.allclose(adapted, source)
    assert_state(model, before)


def test_the_callback_class_instead_of_an_instance_is_lightnings_own_error():
    """Documented, not ours: Lightning calls the hooks of the class unbound, as for any callback class."""
    with pytest.raises(TypeError, match="missing 1 required positional argument"):
        trainer([ttc.Tent]).predict(ConvNet(), loader(images(8)))


def test_tta_wrapper_needs_a_module():
    check_refused(lambda: ttc.TTAWrapper("model"), TypeError, r"`model` must be the nn.Module to wrap; got str")


# --- Inputs -------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("shape", [(8, 6), (8,)], ids=["2d", "1d"])
def test_non_image_input_with_pixel_moving_transforms(shape):
    model = Model(nn.Linear(shape[-1] if len(shape) == 2 else 1, 4))
    data = DataLoader(torch.randn(shape), batch_size=4)
    match = r"`transforms` \[HFlip.* move pixels and need an image batch .* got an input of shape \(4"
    refused([TTA()], model, data, ValueError, match)


def test_value_transforms_work_on_any_input():
    model, x = Model(vector_net()), vectors()
    out = torch.cat(trainer([TTA(transforms=ttc.Multiply([1.0, 0.5]))]).predict(model, DataLoader(x, batch_size=4)))
    with torch.no_grad():
        torch.testing.assert_close(out, (model.net(x) + model.net(x * 0.5)) / 2)


class ChannelLast(nn.Module):
    """A model for (B, H, W, C) images: it permutes them itself."""

    def __init__(self) -> None:
        super().__init__()
        self.net = copy.deepcopy(ConvNet().net)

    def forward(self, x):
        return self.net(x.permute(0, 3, 1, 2))


def test_channel_last_images_get_a_warning():
    x = images(8).permute(0, 2, 3, 1)  # (8, 8, 8, 3)
    with pytest.warns(UserWarning, match=r"shape \(4, 8, 8, 3\), which looks channel-last .* \(B, C, H, W\)"):
        trainer([TTA(transforms="vflip")]).predict(Model(ChannelLast()), DataLoader(x, batch_size=4))


class DefaultStep(Counting):
    """Lightning's default predict_step: ``self(batch)``, the whole (x,) list."""


@pytest.mark.parametrize(
    ("make", "error", "match"),
    [
        (lambda: TTA(), TypeError, r"needs a tensor input; got list. A step that calls self\(batch\) passes the whole"),
        (lambda: TTA(stop=stopping.Confidence()), TypeError, r"needs a tensor input; got list"),
        (lambda: ttc.MEMO(views=2), ValueError, r"MEMO \(random views\) needs an image batch .* got an input of type"),
        (lambda: ttc.CoTTA(views=2), ValueError, r"CoTTA .* needs an image batch .* got an input of type list"),
    ],
    ids=["tta", "adaptive_tta", "memo", "cotta"],
)
def test_the_whole_batch_passed_to_forward(make, error, match):
    refused([make()], DefaultStep(copy.deepcopy(ConvNet().net)), loader(images(8)), error, match)


def test_the_whole_batch_with_statistics_adaptation_is_the_models_own_error():
    """Documented: BatchNormAdapt passes the input on untouched; the model fails as it would without callbacks."""
    model = DefaultStep(copy.deepcopy(ConvNet().net))
    with pytest.raises(TypeError) as plain:
        trainer([]).predict(model, loader(images(8)))
    match = re.escape(str(plain.value)[:40])
    refused([ttc.BatchNormAdapt()], model, loader(images(8)), TypeError, match, before_any_batch=False)


class Pairs(Model):
    def ttc_inputs(self, batch):
        return batch[0]  # a tensor, not (args, kwargs)


@pytest.mark.parametrize(
    ("model", "data", "error", "match"),
    [
        (
            lambda: Model(copy.deepcopy(ConvNet().net)),
            lambda: DataLoader([{"image": torch.zeros(3, 8, 8)}] * 4, batch_size=2),
            KeyError,
            r"no key `ttc_input_key`='input'; its keys are \['image'\]",
        ),
        (
            lambda: Model(copy.deepcopy(ConvNet().net)),
            lambda: DataLoader(["abc"], batch_size=None),
            TypeError,
            r"Cannot find the input in a batch of type str.*Override `ttc_inputs`",
        ),
        (lambda: Pairs(copy.deepcopy(ConvNet().net)), lambda: loader(images(4)), TypeError, r"must return \(args, kw"),
    ],
    ids=["missing_key", "string", "ttc_inputs"],
)
def test_a_batch_the_mixin_cannot_read(model, data, error, match):
    refused([TTA()], model(), data(), error, match)


@pytest.mark.parametrize("preset", [lambda: ttc.MEMO(views=2), lambda: ttc.CoTTA(views=2)], ids=["memo", "cotta"])
def test_non_image_input_for_random_views(preset):
    match = r"needs an image batch \(B, C, H, W\); got an input of shape \(4, 6\)"
    refused([preset()], Model(vector_net(batchnorm=True)), loader(vectors(), 4), ValueError, match)


def test_memo_with_value_transforms_works_on_any_input():
    memo = ttc.MEMO(transforms=ttc.Multiply([1.0, 0.5]), optimizer=SGD)
    out = trainer([memo]).predict(Model(vector_net(batchnorm=True)), loader(vectors(), 4))
    assert [o.shape for o in out] == [(4, 4), (4, 4)] and memo.updates == 2


@pytest.mark.parametrize("kind", ["tuple", "dict", "list", "scalar"])
def test_tta_on_an_output_that_is_not_a_batch_first_tensor(kind):
    match = r"needs a batch-first tensor output with 4 rows \(1 views x batch 4\); the model returned"
    refused([TTA()], Model(Outputs(kind)), loader(images(8), 4), ValueError, match, before_any_batch=False)


def test_tta_on_one_score_per_sample():
    """Raw merges average the scores (documented); merges in class space need (B, C) outputs."""
    model, x = Model(Outputs("scores")), images(8)
    scores = eval_copy(model.net)
    out = torch.cat(trainer([TTA()]).predict(model, loader(x, 4)))
    with torch.no_grad():
        torch.testing.assert_close(out, (scores(x) + scores(x.flip(-1))) / 2)
    match = r"needs \(B, C\) class outputs; the model returned shape \(4,\)"
    refused([TTA(space="prob")], Model(Outputs("scores")), loader(x, 4), ValueError, match, before_any_batch=False)


@pytest.mark.parametrize("kind", ["tuple", "dict", "scalar", "scores", "one_class"])
@pytest.mark.parametrize(
    "preset",
    [ttc.Tent, ttc.EATA, ttc.SAR, lambda: ttc.MEMO(views=2), lambda: ttc.CoTTA(views=2)],
    ids=["tent", "eata", "sar", "memo", "cotta"],
)
def test_entropy_methods_on_outputs_that_are_not_logits(preset, kind):
    match = r"needs class logits \(B, C\) .* at least 2 classes on dim 1; the model returned"
    refused([preset()], Model(Outputs(kind)), loader(images(8), 4), ValueError, match, before_any_batch=False)


def test_statistics_adaptation_passes_any_output_through():
    out = trainer([ttc.BatchNormAdapt()]).predict(Model(Outputs("dict")), loader(images(8), 4))
    assert [tuple(o["logits"].shape) for o in out] == [(4, 4), (4, 4)]


class WrongRows(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.net = copy.deepcopy(ConvNet().net)

    def forward(self, x):
        return self.net(x)[:1]


def test_tta_on_an_output_with_the_wrong_number_of_rows():
    match = r"batch-first tensor output with 4 rows .* the model returned shape \(1, 4\)"
    refused([TTA()], Model(WrongRows()), loader(images(8), 4), ValueError, match, before_any_batch=False)


@pytest.mark.parametrize(
    ("objective", "match"),
    [
        (lambda y: y.sum(1), r"must return a scalar tensor; it returned shape \(4,\)"),
        (lambda y: 1.0, r"must return a scalar tensor; it returned float"),
        (lambda y: y.detach().sum(), r"returned a loss without a gradient"),
    ],
    ids=["vector", "float", "detached"],
)
def test_a_custom_objective_that_is_not_a_loss(objective, match):
    callback = ttc.TestTimeTraining(optimizer=SGD, objective=objective)
    refused([callback], ConvNet(), loader(images(8), 4), ValueError, match, before_any_batch=False)


@pytest.mark.parametrize("flag", ["warm_start", "anytime", "return_iterations"])
def test_iterative_flags_must_be_bools(flag):
    needs = {"warm_start": {"mode": "refine"}, "anytime": {"stop": stopping.Confidence()}}.get(flag, {})
    check_refused(
        functools.partial(ttc.IterativeInference, **needs, **{flag: "no"}),
        ValueError,
        rf"`{flag}`='no' must be True or False",
    )


@pytest.mark.parametrize("kind", ["tuple", "dict", "scalar", "scores"])
def test_sampling_on_an_output_that_is_not_class_logits(kind):
    callback = ttc.IterativeInference(augment=ttc.RandomAugment(), max_iters=2)
    refused([callback], Model(Outputs(kind)), loader(images(8), 4), ValueError, "the model returned", False)


def test_sampling_on_the_whole_batch():
    callback = ttc.IterativeInference(augment=ttc.RandomAugment(), max_iters=2)
    model = DefaultStep(copy.deepcopy(ConvNet().net))
    refused([callback], model, loader(images(8)), TypeError, r"tensor input; got list")


# --- Combinations -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("callbacks", "match"),
    [
        (lambda: [TTA(), TTA(transforms="vflip")], r"Two .* role 'augmentation' .*TestTimeAugmentation and Test"),
        (lambda: [ttc.Tent(), ttc.BatchNormAdapt()], r"Two .* role 'adaptation' in one run: Tent and BatchNormAdapt"),
        (
            lambda: [ttc.IterativeInference(augment=ttc.RandomAugment())] * 2,
            r"Two .* role 'iterative' .*IterativeInference and IterativeInference",
        ),
    ],
    ids=["two_tta", "two_adaptations", "same_instance_twice"],
)
def test_two_callbacks_of_one_role(callbacks, match):
    refused(callbacks(), ConvNet(), loader(images(8)), ValueError, match)


class Refiner(Model):
    def ttc_init(self, x):
        return torch.zeros(len(x), 4)

    def ttc_refine(self, x, state):
        return self.net(x) + 0 * state, state


def test_refinement_with_tta():
    callbacks = [ttc.IterativeInference(mode="refine"), TTA()]
    match = r"mode='refine' calls ttc_refine, not forward, so test-time augmentation cannot run inside it"
    refused(callbacks, Refiner(copy.deepcopy(ConvNet().net)), loader(images(8)), ValueError, match)


def test_adaptation_sampling_and_tta_compose():
    callbacks = [ttc.Tent(optimizer=SGD), TTA(), ttc.IterativeInference(augment=ttc.RandomAugment(), max_iters=2)]
    model = ConvNet()
    out = trainer(callbacks).predict(model, loader(images(8), 4))
    assert [o.shape for o in out] == [(4, 4), (4, 4)] and callbacks[0].updates == 2
    assert model.calls == 2 * (1 + 2 * 2)  # per batch: Tent's forward, then 2 draws of 2 views each


def test_a_callback_outside_its_stages_is_not_applied():
    model, x = ConvNet(), images(8)
    out = torch.cat(trainer([TTA(stages=("test",))]).predict(model, loader(x)))
    with torch.no_grad():
        torch.testing.assert_close(out, eval_copy(model.net)(x))


class PlainStep(Counting):
    def predict_step(self, batch, batch_idx):
        return self(batch[0])


def test_extras_without_the_mixin_are_not_returned():
    """Documented: the step returns what the user's predict_step returns; the extras stay in the pipeline."""
    out = trainer([TTA(uncertainty=True)]).predict(PlainStep(copy.deepcopy(ConvNet().net)), loader(images(8), 4))
    assert all(isinstance(o, torch.Tensor) and o.shape == (4, 4) for o in out)


# --- Models -------------------------------------------------------------------------------------------------------


def test_refinement_without_its_hooks():
    callback = ttc.IterativeInference(mode="refine")
    match = r"mode='refine' needs Model to define ttc_init\(x\) -> state .* missing: ttc_init, ttc_refine"
    refused([callback], Model(copy.deepcopy(ConvNet().net)), loader(images(8)), TypeError, match)


def test_refinement_hook_returning_a_tensor():
    class Bad(Refiner):
        def ttc_refine(self, x, state):
            return self.net(x)

    match = r"ttc_refine\(x, state\) must return \(output, state\)"
    callback = ttc.IterativeInference(mode="refine")
    refused([callback], Bad(copy.deepcopy(ConvNet().net)), loader(images(8)), TypeError, match, before_any_batch=False)


def test_sampling_without_dropout_or_augment():
    match = r"mode='sample' needs randomness, but ConvNet has no dropout layer with p > 0 and no `augment`"
    refused([ttc.IterativeInference()], ConvNet(), loader(images(8)), ValueError, match)


def _no_batchnorm(kind: str) -> ConvNet:
    model = ConvNet(norm={"group": "group", "layer": "layer"}.get(kind, "none"))
    if kind == "affine_false":
        model.net.insert(1, nn.BatchNorm2d(8, affine=False))
    return model


@pytest.mark.parametrize("kind", ["group", "layer", "none", "affine_false"])
@pytest.mark.parametrize("preset", [ttc.Tent, ttc.EATA], ids=["tent", "eata"])
def test_batchnorm_presets_on_a_model_without_batchnorm_parameters(preset, kind):
    match = r"`params`='batchnorm' selects no parameters of ConvNet: .* params='norm'"
    refused([preset()], _no_batchnorm(kind), loader(images(8)), ValueError, match)


def test_sar_default_params_cover_groupnorm():
    sar = ttc.SAR(optimizer=SGD, e_margin=10.0)
    trainer([sar]).predict(_no_batchnorm("group"), loader(images(8), 4))
    assert sar.updates == 2


@pytest.mark.parametrize("kind", ["group", "running_stats_off"])
def test_statistics_adaptation_without_batchnorm_statistics(kind):
    model = _no_batchnorm("group")
    if kind == "running_stats_off":
        model.net[1] = nn.BatchNorm2d(8, track_running_stats=False)
    match = r"`norm`='batch': ConvNet has no BatchNorm layer with running statistics"
    refused([ttc.BatchNormAdapt()], model, loader(images(8)), ValueError, match)


def test_a_step_that_never_calls_forward():
    class Submodule(Counting):
        def predict_step(self, batch, batch_idx):
            return self.net(batch[0])

    match = r"Batch 0: the step never called Submodule.forward, so no test-time strategy ran"
    model = Submodule(copy.deepcopy(ConvNet().net))
    refused([ttc.Tent()], model, loader(images(8)), RuntimeError, match, before_any_batch=False)


def test_a_step_that_calls_forward_twice_warns():
    class Twice(Counting):
        def predict_step(self, batch, batch_idx):
            return self(batch[0]) + self(batch[0])

    with pytest.warns(UserWarning, match=r"Batch 0: the step called Twice.forward 2 times"):
        trainer([TTA()]).predict(Twice(copy.deepcopy(ConvNet().net)), loader(images(8)))


def test_gradient_adaptation_of_low_precision_parameters():
    match = r"cannot update low-precision parameters .* use precision='bf16-mixed'"
    with pytest.raises(ValueError, match=match):
        trainer([ttc.Tent()], precision="bf16-true").predict(ConvNet(), loader(images(8)))


# --- Data ---------------------------------------------------------------------------------------------------------


class Batches(IterableDataset):
    def __init__(self, batches) -> None:
        self.batches = batches

    def __iter__(self):
        return iter(self.batches)


@pytest.mark.parametrize(
    ("data", "kwargs"),
    [
        (lambda: loader(torch.zeros(0, 3, 8, 8)), {}),
        (lambda: [], {}),
        (lambda: loader(images(8)), {"limit_predict_batches": 0}),
    ],
    ids=["empty_loader", "no_loaders", "limit_0"],
)
def test_no_batches_at_all(data, kwargs, tmp_path):
    model, tent = ConvNet(), ttc.Tent(optimizer=SGD)
    before = state(model)
    writer = ttc.PredictionWriter(tmp_path / "p.pt")
    assert not trainer([tent, writer], **kwargs).predict(model, data())
    assert model.calls == 0 and tent.updates == 0 and not (tmp_path / "p.pt").exists()
    assert_state(model, before)


@pytest.mark.parametrize(
    "make",
    [
        lambda: TTA(),
        lambda: ttc.Tent(optimizer=SGD),
        lambda: ttc.MEMO(views=2),
        lambda: TTA(stop=stopping.Confidence()),
    ],
    ids=["tta", "tent", "memo", "adaptive_tta"],
)
def test_a_batch_with_no_rows(make):
    x = images(4)
    callback = make()
    out = trainer([callback]).predict(ConvNet(), DataLoader(Batches([x[:0], x]), batch_size=None))
    assert [tuple(o.shape) for o in out] == [(0, 4), (4, 4)]
    assert getattr(callback, "updates", 1) == 1  # the empty batch took no step


def test_fisher_data_that_is_empty_or_not_batches():
    check_refused(lambda: ttc.EATA(fisher_data=images(4)), TypeError, r"`fisher_data` must be an iterable of .*tensor")
    check_refused(lambda: ttc.EATA(fisher_data=5), TypeError, r"`fisher_data` must be an iterable .* got int")
    match = r"`fisher_data` yielded no batch"
    refused([ttc.EATA(optimizer=SGD, fisher_data=[])], ConvNet(), loader(images(8)), ValueError, match)


@pytest.mark.parametrize(
    ("images_", "match"),
    [
        (torch.rand(2, 3, 8, 8).to(torch.uint8), r"`images` must be a floating-point tensor; got torch.uint8"),
        (torch.rand(2, 8, 8, 3), r"`images` must have shape \(B, C, H, W\) with C 1 or 3 .* got \(2, 8, 8, 3\)"),
        (torch.rand(2, 3, 8, 8) * 255, r"`images` must lie in \[0, 1\]"),
    ],
    ids=["uint8", "channel_last", "0_255"],
)
def test_corruptions_of_images_that_are_not_float_images_in_0_1(images_, match):
    check_refused(lambda: corrupt(images_, "fog", 1), ValueError, match)


def test_a_stream_with_the_wrong_labels():
    x = torch.rand(4, 3, 8, 8)
    check_refused(lambda: stream(x, [0, 1, 2, 3]), ValueError, r"`labels` must be a tensor .* \(4\); got list")


# --- Batch size 1 -------------------------------------------------------------------------------------------------


def batch_statistics(net: nn.Sequential, x: torch.Tensor) -> torch.Tensor:
    """Linear, BatchNorm1d with the batch's own (biased) statistics, ReLU, Linear, written out."""
    h = net[0](x)
    h = (h - h.mean(0)) / torch.sqrt(h.var(0, unbiased=False) + net[1].eps) * net[1].weight + net[1].bias
    return net[3](torch.relu(h))


def test_batchnorm1d_with_a_last_batch_of_one():
    """Torch's train-mode BatchNorm1d raises at batch size 1; BN-adapt normalises such a batch with the source
    running statistics and the others with their own."""
    model, x = Model(vector_net(batchnorm=True)), vectors(9)
    source = eval_copy(model.net)
    out = trainer([ttc.BatchNormAdapt()]).predict(model, loader(x, 4))
    assert [o.shape[0] for o in out] == [4, 4, 1]
    with torch.no_grad():
        torch.testing.assert_close(out[0], batch_statistics(source, x[:4]))
        torch.testing.assert_close(out[1], batch_statistics(source, x[4:8]))
        torch.testing.assert_close(out[2], source(x[8:]))
    with pytest.raises(ValueError, match="Expected more than 1 value per channel"):
        copy.deepcopy(model.net).train()(x[8:])  # what the user would get from torch


def test_batchnorm1d_with_batch_size_one_still_adapts():
    """Tent at batch size 1 on BatchNorm1d: running statistics, and a step on the affine parameters per batch; the
    first prediction is the source model's (TENT predicts before the update)."""
    model, x = Model(vector_net(batchnorm=True)), vectors(3)
    source = eval_copy(model.net)
    tent = ttc.Tent(optimizer=SGD)
    out = trainer([tent]).predict(model, loader(x, 1))
    assert tent.updates == 3 and tent.skipped == 0
    with torch.no_grad():
        torch.testing.assert_close(out[0], source(x[:1]))
        assert not torch.allclose(out[2], source(x[2:]))  # the steps moved the affine parameters


def test_batchnorm2d_at_batch_size_one_uses_the_image_statistics():
    model, x = ConvNet(), images(1)
    out = trainer([ttc.BatchNormAdapt()]).predict(model, loader(x, 1))[0]
    net = eval_copy(model.net)
    net[1].track_running_stats, net[1].running_mean, net[1].running_var = False, None, None
    with torch.no_grad():
        torch.testing.assert_close(out, net(x))  # BatchNorm without running statistics: the batch's own
        assert not torch.allclose(out, eval_copy(model.net)(x))


# --- The pytorch_lightning namespace ------------------------------------------------------------------------------


class OldNamespaceModel(ttc.TestTimeComputeMixin, pl.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.net, self.calls = copy.deepcopy(ConvNet().net), 0

    def forward(self, x):
        self.calls += 1
        return self.net(x)


def old_trainer(callbacks) -> "pl.Trainer":
    options = dict(logger=False, enable_progress_bar=False, enable_model_summary=False, enable_checkpointing=False)
    return pl.Trainer(callbacks=callbacks, accelerator="cpu", devices=1, **options)


def test_prediction_writer_refuses_a_pytorch_lightning_trainer(tmp_path):
    """Under pytorch_lightning's Trainer the writer would not see the dataset indices (a shuffled loader was written
    in arrival order): refused at setup, before any batch."""
    model = OldNamespaceModel()
    before = state(model)
    match = r"PredictionWriter is a `lightning.pytorch` callback, but the Trainer is a pytorch_lightning.Trainer"
    with pytest.raises(TypeError, match=match + r".*`import lightning.pytorch as pl`"):
        old_trainer([ttc.PredictionWriter(tmp_path / "p.pt")]).predict(model, loader(images(8)))
    assert model.calls == 0 and not list(tmp_path.iterdir())
    assert_state(model, before)


@pytest.mark.parametrize("make", [TTA, ttc.Tent], ids=["tta", "tent"])
def test_strategies_refuse_a_pytorch_lightning_trainer(make):
    model = OldNamespaceModel()
    before = state(model)
    with pytest.raises(TypeError, match=r"is a `lightning.pytorch` callback, but the Trainer is a pytorch_lightning"):
        old_trainer([make()]).predict(model, loader(images(8)))
    assert model.calls == 0
    assert_state(model, before)


def test_mixing_the_namespaces_is_lightnings_own_error():
    with pytest.raises(TypeError, match=r"`model` must be a `LightningModule`"):
        old_trainer([TTA()]).predict(ConvNet(), loader(images(8)))
    with pytest.raises(TypeError, match=r"`model` must be a `LightningModule`"):
        trainer([TTA()]).predict(OldNamespaceModel(), loader(images(8)))
