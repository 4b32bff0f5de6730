"""TestTimeAugmentation as a Lightning callback: output contract, plain modules, stages, precision, restoration."""

import signal

import pytest
import torch

import ttc_lightning as ttc


def views(x, transforms):
    """The views of an alias as a set (a mean does not depend on their order); classification needs no inverse."""
    if transforms == "hflip":
        return [x, x.flip(-1)]
    return [torch.rot90(v, k, (2, 3)) for v in (x, x.flip(-1)) for k in range(4)]  # d4


def views_mean(forward, x, transforms="hflip"):
    with torch.no_grad():
        return torch.stack([forward(v) for v in views(x, transforms)]).mean(0)


def batches(images):
    return [images[i : i + 8] for i in range(0, len(images), 8)]


def state(model):
    """Everything restoration promises: tensors (cloned), modes, requires_grad flags."""
    tensors = {k: v.detach().clone() for k, v in model.state_dict().items()}
    modes = {n: m.training for n, m in model.named_modules()}
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    return tensors, modes, flags


def assert_state(model, before):
    tensors, modes, flags = state(model)
    assert tensors.keys() == before[0].keys()
    for name, value in before[0].items():
        assert torch.equal(tensors[name].reshape(-1).view(torch.uint8), value.reshape(-1).view(torch.uint8)), name
    assert modes == before[1] and flags == before[2]
    assert "forward" not in model.__dict__


@pytest.fixture
def keep_sigint():
    """Lightning ignores SIGINT after a KeyboardInterrupt; put the handler back."""
    handler = signal.getsignal(signal.SIGINT)
    yield
    signal.signal(signal.SIGINT, handler)


# -- output contract ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("transforms", ["hflip", "d4"])
def test_predictions_match_written_out_mean_wrapper_and_augmenter(transforms, model, loader, images, make_trainer):
    preds = make_trainer([ttc.TestTimeAugmentation(transforms=transforms)]).predict(model, loader)
    wrapper = ttc.TTAWrapper(model.net, transforms=transforms)  # no Lightning, not the LightningModule
    augmenter = ttc.Augmenter(transforms=transforms)
    assert len(preds) == 3
    with torch.no_grad():
        for pred, x in zip(preds, batches(images), strict=True):
            own = model(x)
            assert type(pred) is type(own) and pred.shape == own.shape and pred.dtype == own.dtype
            torch.testing.assert_close(pred, views_mean(model.net, x, transforms))
            assert torch.equal(pred, wrapper(x))
            assert torch.equal(pred, augmenter(model, x)[0])


def test_uncertainty_returns_dict_equal_to_wrapper(model, loader, images, make_trainer):
    preds = make_trainer([ttc.TestTimeAugmentation(uncertainty=True)]).predict(model, loader)
    wrapper = ttc.TTAWrapper(model.net, uncertainty=True)
    with torch.no_grad():
        for pred, x in zip(preds, batches(images), strict=True):
            assert pred.keys() == {"prediction", "std", "entropy", "mutual_info", "agreement"}
            torch.testing.assert_close(pred["prediction"], views_mean(model.net, x))
            a, b = model.net(x), model.net(x.flip(-1))
            torch.testing.assert_close(pred["std"], (a - b).abs() / 2)
            p = (a.softmax(1) + b.softmax(1)) / 2
            torch.testing.assert_close(pred["entropy"], -(p * p.log()).sum(1))
            expected = wrapper(x)
            assert expected.keys() == pred.keys()
            for name, value in expected.items():
                assert torch.equal(pred[name], value), name


def test_uncertainty_names_select_the_extras(model, loader, make_trainer):
    preds = make_trainer([ttc.TestTimeAugmentation(uncertainty=["std", "agreement"])]).predict(model, loader)
    assert all(pred.keys() == {"prediction", "std", "agreement"} for pred in preds)


# -- plain LightningModule without the mixin ------------------------------------------------------------------------


def test_plain_module_gives_the_mixin_predictions(model, plain_model, loader, make_trainer):
    mixin = make_trainer([ttc.TestTimeAugmentation(transforms="d4")]).predict(model, loader)
    plain = make_trainer([ttc.TestTimeAugmentation(transforms="d4")]).predict(plain_model, loader)
    for a, b in zip(mixin, plain, strict=True):
        assert torch.equal(a, b)


def test_step_that_bypasses_forward_raises(plain_cls, loader, make_trainer):
    class Bypass(plain_cls):
        def predict_step(self, batch, batch_idx):
            return self.net(batch[0])

    module = Bypass()
    with pytest.raises(RuntimeError, match=r"never called.*TestTimeComputeMixin"):
        make_trainer([ttc.TestTimeAugmentation()]).predict(module, loader)
    assert "forward" not in module.__dict__


def test_step_calling_forward_twice_warns_once(plain_cls, loader, images, make_trainer):
    class Twice(plain_cls):
        def predict_step(self, batch, batch_idx):
            self(batch[0])
            return self(batch[0])

    module = Twice()
    with pytest.warns(UserWarning, match="2 times") as record:
        preds = make_trainer([ttc.TestTimeAugmentation()]).predict(module, loader)
    assert sum("2 times" in str(w.message) for w in record) == 1
    for pred, x in zip(preds, batches(images), strict=True):
        torch.testing.assert_close(pred, views_mean(module.net, x))


# -- stages ----------------------------------------------------------------------------------------------------------


def test_default_stages_leave_test_untouched(model, loader, images, make_trainer):
    make_trainer([ttc.TestTimeAugmentation()]).test(model, loader, verbose=False)
    with torch.no_grad():
        for (out, wrapped), x in zip(model.records["test"], batches(images), strict=True):
            assert not wrapped and torch.equal(out, model.net(x))


def test_test_stage_applies_tta_inside_test_step(model, loader, images, labels, make_trainer):
    tta = ttc.TestTimeAugmentation(stages=("predict", "test"))
    (metrics,) = make_trainer([tta]).test(model, loader, verbose=False)
    expected = [views_mean(model.net, x) for x in batches(images)]
    for (out, wrapped), reference in zip(model.records["test"], expected, strict=True):
        assert wrapped
        torch.testing.assert_close(out, reference)
    loss = torch.nn.functional.cross_entropy(torch.cat(expected), labels)  # equal batches: mean of batch means
    torch.testing.assert_close(torch.as_tensor(metrics["test_loss"]), loss)
    assert "forward" not in model.__dict__


def test_validate_stage_acts_in_trainer_validate_not_in_fit(model, loader, images, make_trainer):
    tta = ttc.TestTimeAugmentation(stages=["validate"])
    trainer = make_trainer([tta], max_epochs=1, limit_train_batches=2)
    trainer.fit(model, train_dataloaders=loader, val_dataloaders=loader)
    fit_records = model.records.pop("validate")
    assert len(fit_records) == 2 + 3  # sanity check + one epoch of validation
    assert not any(wrapped for _, wrapped in fit_records)
    assert not any(model.records["train_wrapped"])
    trainer.validate(model, loader, verbose=False)
    for (out, wrapped), x in zip(model.records["validate"], batches(images), strict=True):
        assert wrapped
        torch.testing.assert_close(out, views_mean(model.net, x))
    assert "forward" not in model.__dict__


@pytest.mark.parametrize("stages", ["fit", "predict", [], ("predict", "fit"), ("train",)], ids=repr)
def test_bad_stages_raise(stages):
    with pytest.raises(ValueError, match="stages"):
        ttc.TestTimeAugmentation(stages=stages)


# -- Trainer settings ------------------------------------------------------------------------------------------------


def test_default_trainer_inference_mode(classifier_cls, loader, images, make_trainer):
    class Probe(classifier_cls):
        def forward(self, x):
            self.modes = [*getattr(self, "modes", []), torch.is_inference_mode_enabled()]
            return super().forward(x)

    module = Probe()
    trainer = make_trainer([ttc.TestTimeAugmentation()])
    assert trainer.predict_loop.inference_mode
    preds = trainer.predict(module, loader)
    assert module.modes == [True] * 6 and trainer.predict_loop.inference_mode
    for pred, x in zip(preds, batches(images), strict=True):
        torch.testing.assert_close(pred, views_mean(module.net, x))


def test_bf16_mixed_keeps_the_model_autocast_dtype(model, loader, images, make_trainer):
    preds = make_trainer([ttc.TestTimeAugmentation()], precision="bf16-mixed").predict(model, loader)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        for pred, x in zip(preds, batches(images), strict=True):
            own, flipped = model.net(x), model.net(x.flip(-1))
            assert own.dtype == torch.bfloat16 and pred.dtype == own.dtype and pred.shape == own.shape
            torch.testing.assert_close(pred, ((own.float() + flipped.float()) / 2).to(own.dtype))


def test_runs_are_identical_and_a_trainer_predicts_twice(model, loader, make_trainer):
    trainer = make_trainer([ttc.TestTimeAugmentation(transforms="d4")])
    first, second = trainer.predict(model, loader), trainer.predict(model, loader)
    third = make_trainer([ttc.TestTimeAugmentation(transforms="d4")]).predict(model, loader)
    for a, b, c in zip(first, second, third, strict=True):
        assert torch.equal(a, b) and torch.equal(a, c)
    assert "forward" not in model.__dict__


# -- restoration -----------------------------------------------------------------------------------------------------


class Nudge(ttc.TestTimeCallback):
    """A toy adaptation that changes parameters, buffers, flags and modes in its wrapped forward."""

    role = "adaptation"
    modifies_model = True

    def start(self, run):
        self.module = run.module

    def wrap(self, inner):
        def forward(x, *args, **kwargs):
            net = self.module.net
            with torch.no_grad():
                net[0].weight.add_(1.0)
            net[1].running_mean, net[1].running_var = None, None  # batch statistics from now on
            net[0].bias.requires_grad_(False)
            net[1].train()
            return inner.forward(x, *args, **kwargs)

        return forward


def failing(classifier_cls, exception):
    class Failing(classifier_cls):
        def forward(self, x):
            if self.calls == 2:  # the first view of the second batch
                raise exception
            return super().forward(x)

    return Failing(norm=True)


def prepare(module):
    module.train()
    module.net[1].eval()  # a mixed-mode model
    module.net[-1].weight.requires_grad_(False)
    return state(module)


def test_train_mode_model_is_restored_after_predict(classifier_cls, loader, images, make_trainer):
    module = classifier_cls(norm=True)
    before = prepare(module)
    preds = make_trainer([ttc.TestTimeAugmentation()]).predict(module, loader)
    assert_state(module, before)
    module.eval()
    for pred, x in zip(preds, batches(images), strict=True):
        torch.testing.assert_close(pred, views_mean(module.net, x))  # predicted in eval mode


def test_exception_in_forward_propagates_and_model_is_restored(classifier_cls, loader, make_trainer):
    module = failing(classifier_cls, ValueError("boom"))
    before = prepare(module)
    with pytest.raises(ValueError, match="boom"):
        make_trainer([ttc.TestTimeAugmentation()]).predict(module, loader)
    assert_state(module, before)


def test_keyboard_interrupt_becomes_system_exit_and_model_is_restored(
    classifier_cls, loader, make_trainer, keep_sigint
):
    module = failing(classifier_cls, KeyboardInterrupt())
    before = prepare(module)
    with pytest.raises(SystemExit):  # lightning 2.6.6: on_exception, teardown, then sys.exit(1)
        make_trainer([ttc.TestTimeAugmentation(), Nudge()]).predict(module, loader)
    assert_state(module, before)


@pytest.mark.parametrize("fail", [False, True])
def test_modifying_strategy_is_undone(fail, classifier_cls, loader, make_trainer):
    module = failing(classifier_cls, ValueError("boom")) if fail else classifier_cls(norm=True)
    before = prepare(module)
    trainer = make_trainer([ttc.TestTimeAugmentation(), Nudge()])
    if fail:
        with pytest.raises(ValueError, match="boom"):
            trainer.predict(module, loader)
    else:
        trainer.predict(module, loader)
    assert module.calls >= 2  # the nudge ran at least once
    assert_state(module, before)


def test_modifying_strategy_runs_are_identical(classifier_cls, loader, make_trainer):
    module = classifier_cls(norm=True)
    runs = [make_trainer([Nudge(), ttc.TestTimeAugmentation()]).predict(module, loader) for _ in range(2)]
    for a, b in zip(*runs, strict=True):
        assert torch.equal(a, b)


def test_restores_the_state_loaded_from_ckpt_path(classifier_cls, loader, make_trainer, tmp_path):
    source = classifier_cls(norm=True)
    with torch.no_grad():
        for p in source.parameters():
            p.mul_(-2.0)
        source.net[1].running_mean.uniform_()
    saver = make_trainer()
    saver.predict(source, loader)
    saver.save_checkpoint(tmp_path / "source.ckpt")
    module = classifier_cls(norm=True)
    trainer = make_trainer([ttc.TestTimeAugmentation(), Nudge()])
    trainer.predict(module, loader, ckpt_path=tmp_path / "source.ckpt")
    assert module.training
    assert_state(module, state(source.train()))  # "before" means after the checkpoint was loaded
