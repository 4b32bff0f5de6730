"""The composed forward: role ordering, one strategy per role, install/uninstall."""

import itertools

import pytest
import torch

import ttc_lightning as ttc
from ttc_lightning import pipeline


class Traced(ttc.TestTimeCallback):
    """A pass-through strategy that records when its wrapped forward is entered and left."""

    role = "adaptation"

    def __init__(self, trace: list, **kwargs) -> None:
        super().__init__(**kwargs)
        self.trace = trace

    def wrap(self, inner, context):
        def forward(x, *args, **kwargs):
            self.trace.append(f"{self.role}>")
            out = inner(x, *args, **kwargs)
            self.trace.append(f"<{self.role}")
            return out

        return forward


class Adaptation(Traced):
    role = "adaptation"


class Iterative(Traced):
    role = "iterative"


class Unknown(Traced):
    role = "postprocess"


class TracedTTA(ttc.TestTimeAugmentation):
    """TTA recording its own entry/exit and every call of the forward it wraps."""

    def __init__(self, trace: list, **kwargs) -> None:
        super().__init__(**kwargs)
        self.trace = trace

    def wrap(self, inner, context):
        def base(x, *args, **kwargs):
            self.trace.append("forward")
            return inner(x, *args, **kwargs)

        tta = super().wrap(base, context)

        def forward(x, *args, **kwargs):
            self.trace.append("augmentation>")
            out = tta(x, *args, **kwargs)
            self.trace.append("<augmentation")
            return out

        return forward


@pytest.mark.parametrize("order", list(itertools.permutations(range(3))))
def test_roles_nest_adaptation_iterative_augmentation_whatever_the_list_order(
    order, model, loader, images, make_trainer, reference
):
    trace: list[str] = []
    callbacks = [Adaptation(trace), Iterative(trace), TracedTTA(trace)]
    trainer = make_trainer([callbacks[i] for i in order], limit_predict_batches=1)
    (pred,) = trainer.predict(model, loader)
    assert trace == [
        "adaptation>",
        "iterative>",
        "augmentation>",
        "forward",
        "forward",
        "<augmentation",
        "<iterative",
        "<adaptation",
    ]
    assert "forward" not in model.__dict__
    torch.testing.assert_close(pred, reference(model, images[:8]))


@pytest.mark.parametrize(
    "make_callbacks",
    [
        lambda: [ttc.TestTimeAugmentation(), ttc.TestTimeAugmentation(transforms="vflip")],
        lambda: [Adaptation([]), ttc.TestTimeAugmentation(), Adaptation([])],
    ],
    ids=["two_tta", "two_adaptations"],
)
def test_two_strategies_of_one_role_raise_at_setup(make_callbacks, model, loader, make_trainer):
    trainer = make_trainer(make_callbacks())
    with pytest.raises(ValueError, match="Two test-time strategies of role"):
        trainer.predict(model, loader)
    assert model.calls == 0  # raised before any batch ran
    assert "forward" not in model.__dict__


def test_same_role_on_different_stages_is_allowed(model, loader, images, make_trainer, reference):
    test_only = ttc.TestTimeAugmentation(transforms="vflip", stages=("test",))
    trainer = make_trainer([test_only, ttc.TestTimeAugmentation(transforms="hflip")])
    preds = trainer.predict(model, loader)
    torch.testing.assert_close(preds[0], reference(model, images[:8]))  # the predict-stage one (hflip) ran


def test_unknown_role_raises(model, loader, make_trainer):
    with pytest.raises(ValueError, match=r"role='postprocess'.*adaptation, iterative, augmentation"):
        make_trainer([Unknown([])]).predict(model, loader)
    assert model.calls == 0 and "forward" not in model.__dict__
    with pytest.raises(ValueError, match="postprocess"):
        pipeline.check_roles([Unknown([])])


def test_install_wraps_once_and_uninstall_restores_own_forward(model, images):
    x = images[:8]
    own = model.forward
    context = pipeline.install(model, [ttc.TestTimeAugmentation()])
    assert isinstance(model.__dict__["forward"], pipeline.ComposedForward)
    with pytest.raises(RuntimeError, match="already wrapped"):
        pipeline.install(model, [ttc.TestTimeAugmentation()])
    with torch.no_grad():
        model(x)
        model(x)
    assert context.calls == 2 and model.calls == 4  # two top-level calls, two views each
    pipeline.uninstall(model)
    assert "forward" not in model.__dict__ and model.forward == own
    pipeline.uninstall(model)  # a no-op when nothing is installed


def test_extras_are_those_of_the_latest_call(model, images):
    pipeline.install(model, [ttc.TestTimeAugmentation(uncertainty="std")])
    with torch.no_grad():
        a, b = images[:8], images[8:16]
        model(a)
        model(b)
        std = pipeline.current_extras(model)["std"]
        expected = (model.net(b) - model.net(b.flip(-1))).abs() / 2  # population std of two views
    torch.testing.assert_close(std, expected)
    pipeline.uninstall(model)
    assert pipeline.current_extras(model) == {}


def test_run_leaves_no_forward_attribute(model, loader, make_trainer):
    trainer = make_trainer([Adaptation([]), ttc.TestTimeAugmentation()])
    trainer.predict(model, loader)
    assert "forward" not in model.__dict__
    assert model.calls == 6  # 3 batches x 2 views: the composed forward ran once per batch


def test_callbacks_from_configure_callbacks_join_the_pipeline(classifier_cls, loader, images, make_trainer, reference):
    trace: list[str] = []

    class WithCallbacks(classifier_cls):
        def configure_callbacks(self):
            return [ttc.TestTimeAugmentation()]

    module = WithCallbacks()
    preds = make_trainer([Iterative(trace)], limit_predict_batches=1).predict(module, loader)
    assert trace == ["iterative>", "<iterative"] and module.calls == 2
    torch.testing.assert_close(preds[0], reference(module, images[:8]))
