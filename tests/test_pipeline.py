"""The composed forward: role ordering, one strategy per role, install/uninstall."""

import dataclasses
import functools
import itertools

import pytest
import torch
import ttt_models

import ttc_lightning as ttc
from ttc_lightning import pipeline
from ttc_lightning.tta import augmenter


class Traced(ttc.TestTimeCallback):
    """A pass-through strategy that records when its wrapped forward is entered and left."""

    role = "adaptation"

    def __init__(self, trace: list, **kwargs) -> None:
        super().__init__(**kwargs)
        self.trace = trace

    def wrap(self, inner):
        def forward(x, *args, **kwargs):
            self.trace.append(f"{self.role}>")
            out = inner.forward(x, *args, **kwargs)
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

    def wrap(self, inner):
        def base(x, *args, **kwargs):
            self.trace.append("forward")
            return inner.forward(x, *args, **kwargs)

        tta = super().wrap(dataclasses.replace(inner, forward=base))

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


class Boom(RuntimeError):
    """The error a life-cycle step raises on purpose."""


class Lifecycle(ttc.TestTimeCallback):
    """A pass-through strategy of any role that records its life cycle and adds one extra per call; raises in
    ``start`` or ``finish`` on request."""

    def __init__(self, role: str, trace: list, fail: str = "") -> None:
        super().__init__()
        self.role, self.trace, self.fail, self.runs = role, trace, fail, []

    def start(self, run):
        self.trace.append(f"start {self.role}")
        self.runs.append(run)
        if self.fail == "start":
            raise Boom(self.role)

    def wrap(self, inner):
        self.trace.append(f"wrap {self.role} composed={inner.composed}")

        def step(x):
            below = inner.forward(x)
            assert isinstance(below, pipeline.Output)
            return pipeline.Output(below.value, {**below.extras, self.role: torch.full((len(x),), len(self.trace))})

        return step

    def batch_end(self, run):
        self.trace.append(f"batch_end {self.role} loader={run.dataloader_idx}")

    def finish(self):
        self.trace.append(f"finish {self.role}")
        if self.fail == "finish":
            raise Boom(self.role)


def test_life_cycle_order_run_and_extras_as_return_values(model, loader, make_trainer):
    trace: list[str] = []
    strategies = [Lifecycle(role, trace) for role in ("iterative", "adaptation", "augmentation")]
    trainer = make_trainer(strategies, limit_predict_batches=1)
    (out,) = trainer.predict(model, loader)
    assert trace == [
        "start augmentation",
        "start iterative",
        "start adaptation",
        "wrap augmentation composed=False",
        "wrap iterative composed=True",
        "wrap adaptation composed=True",
        "batch_end iterative loader=0",  # in the Trainer's callback order
        "batch_end adaptation loader=0",
        "batch_end augmentation loader=0",
        "finish adaptation",
        "finish iterative",
        "finish augmentation",
    ]
    assert list(out) == ["prediction", "augmentation", "iterative", "adaptation"]  # innermost extras first
    (run,) = strategies[0].runs
    assert all(s.runs == [run] for s in strategies)  # one run object for the stage
    assert (run.trainer, run.module, run.stage, run.rank, run.world_size) == (trainer, model, "predict", 0, 1)
    assert run.precision == "32-true" and run.source is None  # no strategy changes the model: no tensors taken
    assert "forward" not in model.__dict__ and model.ttc_extras == {}


@pytest.mark.parametrize("failing", ["augmentation", "iterative", "adaptation"])
def test_a_failed_start_finishes_the_started_strategies_and_installs_nothing(failing, model, loader, make_trainer):
    trace: list[str] = []
    roles = ("augmentation", "iterative", "adaptation")
    strategies = [Lifecycle(role, trace, "start" if role == failing else "") for role in roles]
    trainer = make_trainer(strategies)
    with pytest.raises(Boom, match=failing):
        trainer.predict(model, loader)
    started = roles[: roles.index(failing) + 1]
    assert trace == [f"start {r}" for r in started] + [f"finish {r}" for r in reversed(started)]
    assert model.calls == 0 and "forward" not in model.__dict__
    assert trainer.predict_loop.inference_mode


def test_every_strategy_finishes_and_the_model_is_restored_when_one_finish_raises(classifier_cls, loader, make_trainer):
    trace: list[str] = []
    model = classifier_cls(norm=True)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    tent = ttc.Tent(optimizer=functools.partial(torch.optim.SGD, lr=0.5))
    strategies = [tent, Lifecycle("iterative", trace, "finish"), Lifecycle("augmentation", trace)]
    trainer = make_trainer(strategies, limit_predict_batches=1)
    with pytest.raises(Boom, match="iterative"):
        trainer.predict(model, loader)
    assert trace[-2:] == ["finish iterative", "finish augmentation"] and tent.updates == 1
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    assert "forward" not in model.__dict__ and trainer.predict_loop.inference_mode


def test_install_wraps_once_and_uninstall_restores_own_forward(model, images):
    x = images[:8]
    own = model.forward
    installed = pipeline.install(pipeline.Run(model), [ttc.TestTimeAugmentation()])
    assert model.__dict__["forward"] is installed and isinstance(installed, pipeline.ComposedForward)
    with pytest.raises(RuntimeError, match="already wrapped"):
        pipeline.install(pipeline.Run(model), [ttc.TestTimeAugmentation()])
    with torch.no_grad():
        model(x)
        model(x)
    assert installed.calls == 2 and model.calls == 4  # two top-level calls, two views each
    pipeline.uninstall(model)
    assert "forward" not in model.__dict__ and model.forward == own
    pipeline.uninstall(model)  # a no-op when nothing is installed


def test_extras_are_those_of_the_latest_call(model, images):
    pipeline.install(pipeline.Run(model), [ttc.TestTimeAugmentation(uncertainty="std")])
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


# -- device-independent composition ----------------------------------------------------------------------------------

SGD = functools.partial(torch.optim.SGD, lr=0.05)
ADAPTATIONS = {
    "tent": lambda: ttc.Tent(optimizer=SGD),
    "bn_adapt": lambda: ttc.BatchNormAdapt(),
    "bn_adapt_mix": lambda: ttc.BatchNormAdapt(norm="mix"),
    "eata": lambda: ttc.EATA(optimizer=SGD, d_margin=0.4),
    "sar": lambda: ttc.SAR(optimizer=SGD),
    "cotta": lambda: ttc.CoTTA(optimizer=SGD, views=2),
    "memo": lambda: ttc.MEMO(optimizer=SGD, views=2),
}


def tta_predictions(callbacks: list, model=None, chunk_size="auto") -> tuple[torch.Tensor, int]:
    model = model or ttt_models.ConvNet()
    tta = ttc.TestTimeAugmentation(transforms="d4", chunk_size=chunk_size)
    out = ttt_models.trainer([*callbacks, tta]).predict(model, ttt_models.loader(ttt_models.images()))
    return torch.cat(out), model.calls


def on_an_accelerator(monkeypatch) -> None:
    """What ``chunk_size="auto"`` picks on an accelerator (all views of a shape in one forward), simulated on CPU."""
    monkeypatch.setattr(augmenter, "auto_chunk_size", lambda device: None)


@pytest.mark.parametrize("name", list(ADAPTATIONS))
def test_batch_statistics_below_tta_give_the_same_predictions_on_any_device(name, monkeypatch):
    """Adaptation with batch statistics makes the model's forward depend on its batch: "auto" then runs the views
    one per forward on every device, so the composition's predictions do not depend on the device."""
    cpu, cpu_calls = tta_predictions([ADAPTATIONS[name]()])
    on_an_accelerator(monkeypatch)
    accelerator, accelerator_calls = tta_predictions([ADAPTATIONS[name]()])
    assert torch.equal(cpu, accelerator) and cpu_calls == accelerator_calls
    stacked, _ = tta_predictions([ADAPTATIONS[name]()], chunk_size=None)
    assert not torch.allclose(stacked, cpu, atol=1e-4)  # stacking the views would change these predictions


def test_a_model_whose_batchnorm_uses_batch_statistics_is_batch_dependent(monkeypatch):
    def model():
        module = ttt_models.ConvNet()
        module.net[1].running_mean = module.net[1].running_var = None  # batch statistics in eval mode
        return module

    cpu, cpu_calls = tta_predictions([], model())
    on_an_accelerator(monkeypatch)
    accelerator, accelerator_calls = tta_predictions([], model())
    assert torch.equal(cpu, accelerator) and cpu_calls == accelerator_calls == 3 * 8  # one view per forward (8 views)


def test_a_batch_independent_forward_keeps_the_device_choice(monkeypatch):
    """The device choice of "auto" stays where the forward does not depend on the batch: source statistics (norm
    "source"), or no statistics policy acting (GroupNorm)."""
    cases = {
        "no_adaptation": lambda: ([], ttt_models.ConvNet()),
        "source_statistics": lambda: ([ttc.TestTimeTraining(optimizer=SGD, norm="source")], ttt_models.ConvNet()),
        "groupnorm": lambda: ([ttc.Tent(optimizer=SGD, params="groupnorm")], ttt_models.ConvNet(norm="group")),
    }
    for name, make in cases.items():
        cpu, cpu_calls = tta_predictions(*make())
        with monkeypatch.context() as patch:
            on_an_accelerator(patch)
            accelerator, accelerator_calls = tta_predictions(*make())
        adapted = 0 if name == "no_adaptation" else 3  # the adaptation's own forward, once per batch
        assert (cpu_calls, accelerator_calls) == (adapted + 3 * 8, adapted + 3), name  # 8 views, then stacked
        torch.testing.assert_close(accelerator, cpu, rtol=1e-5, atol=1e-5, msg=name)


def test_the_plain_module_wrapper_chunks_a_batch_dependent_model_the_same_on_any_device(monkeypatch):
    net = ttt_models.conv_net()
    net.train()  # BatchNorm with batch statistics
    x = ttt_models.images()
    with torch.no_grad():
        cpu = ttc.TTAWrapper(net, transforms="d4")(x)
        on_an_accelerator(monkeypatch)
        accelerator = ttc.TTAWrapper(net, transforms="d4")(x)
        stacked = ttc.TTAWrapper(net, transforms="d4", chunk_size=None)(x)
        net.eval()  # running statistics: batch-independent, so the accelerator choice (stacking) applies
        independent = ttc.TTAWrapper(net, transforms="d4")(x)
        expected = torch.stack([net(v) for v in [torch.rot90(u, k, (2, 3)) for u in (x, x.flip(-1)) for k in range(4)]])
    assert torch.equal(cpu, accelerator) and not torch.allclose(stacked, cpu, atol=1e-4)
    torch.testing.assert_close(independent, expected.mean(0))
