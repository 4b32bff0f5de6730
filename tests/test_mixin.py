"""TestTimeComputeMixin: input extraction from batches, extra forward arguments, the step's return value."""

import pytest
import torch
from torch.utils.data import DataLoader

import ttc_lightning as ttc


def d4_views(x):
    """The 8 views of ``transforms="d4"`` (h-flip x rot90 0/90/180/270), as a set: order does not matter for a mean."""
    return [torch.rot90(v, k, (2, 3)) for v in (x, x.flip(-1)) for k in range(4)]


def as_batches(batches):
    """A loader yielding ``batches`` exactly as given (no collation)."""
    return DataLoader(batches, batch_size=None, collate_fn=lambda b: b)


@pytest.mark.parametrize("kind", ["tensor", "tuple", "list"])
def test_inputs_of_tensor_tuple_list(kind, model, images, labels):
    x = images[:8]
    batch = {"tensor": x, "tuple": (x, labels[:8]), "list": [x, labels[:8]]}[kind]
    args, kwargs = model.ttc_inputs(batch)
    assert len(args) == 1 and args[0] is x and kwargs == {}


def test_inputs_of_mapping_default_and_custom_key(model, images):
    x, other = images[:8], images[8:16]
    assert ttc.TestTimeComputeMixin.ttc_input_key == "input"
    assert model.ttc_inputs({"label": 0, "input": x})[0][0] is x
    model.ttc_input_key = "image"
    assert model.ttc_inputs({"input": other, "image": x})[0][0] is x


def test_missing_key_names_key_and_lists_keys(model, images):
    model.ttc_input_key = "image"
    with pytest.raises(KeyError) as error:
        model.ttc_inputs({"input": images, "label": 0})
    message = str(error.value)
    assert "'image'" in message and "'input'" in message and "'label'" in message


@pytest.mark.parametrize("batch", [3, "abc", None, (), []], ids=repr)
def test_unsupported_batch_raises_type_error(batch, model):
    with pytest.raises(TypeError, match="ttc_inputs"):
        model.ttc_inputs(batch)


@pytest.mark.parametrize("kind", ["tensor", "tuple", "list", "dict", "custom_key"])
def test_predict_finds_input_in_every_batch_kind(kind, model, images, labels, make_trainer, reference):
    chunks = [(images[i : i + 8], labels[i : i + 8]) for i in range(0, len(images), 8)]
    make = {
        "tensor": lambda x, y: x,
        "tuple": lambda x, y: (x, y),
        "list": lambda x, y: [x, y],
        "dict": lambda x, y: {"label": y, "input": x},
        "custom_key": lambda x, y: {"label": y, "input": y, "image": x},
    }[kind]
    if kind == "custom_key":
        model.ttc_input_key = "image"
    preds = make_trainer([ttc.TestTimeAugmentation()]).predict(model, as_batches([make(x, y) for x, y in chunks]))
    assert len(preds) == len(chunks)
    for pred, (x, _) in zip(preds, chunks, strict=True):
        torch.testing.assert_close(pred, reference(model, x))


@pytest.mark.parametrize("keyword", [False, True])
def test_extra_batch_first_argument_follows_stacked_views(keyword, classifier_cls, images, make_trainer):
    class Scaled(classifier_cls):
        def forward(self, x, scale, offset=0.0):
            return self.net(x) * scale + offset

        def ttc_inputs(self, batch):
            x, scale = batch
            return ((x,), {"scale": scale, "offset": 0.5}) if keyword else ((x, scale, 0.5), {})

    model = Scaled()
    scales = torch.arange(1.0, 1.0 + len(images)).unsqueeze(1)  # a different scale per sample, (B, 1)
    batches = [(images[i : i + 8], scales[i : i + 8]) for i in range(0, len(images), 8)]
    tta = ttc.TestTimeAugmentation(transforms="d4", chunk_size=None)  # 4 views per forward (2 shapes)
    preds = make_trainer([tta]).predict(model, as_batches(batches))
    with torch.no_grad():
        for pred, (x, scale) in zip(preds, batches, strict=True):
            expected = torch.stack([model.net(v) * scale + 0.5 for v in d4_views(x)]).mean(0)
            torch.testing.assert_close(pred, expected)


def test_without_callbacks_the_step_returns_self_of_x(model, loader, images, make_trainer):
    preds = make_trainer().predict(model, loader)
    with torch.no_grad():
        for i, pred in enumerate(preds):
            assert torch.equal(pred, model(images[8 * i : 8 * i + 8]))
    assert model.ttc_extras == {}


def test_outputs_hook(model):
    y, std = torch.ones(2, 3), torch.zeros(2, 3)
    assert model.ttc_outputs(y, {}) is y
    out = model.ttc_outputs(y, {"std": std})
    assert out.keys() == {"prediction", "std"} and out["prediction"] is y and out["std"] is std


def test_ttc_extras_in_a_test_step_hold_the_latest_call_s_extras(classifier_cls, loader, images, make_trainer):
    """Documented: inside your own ``test_step``, ``self.ttc_extras`` holds the extras of the latest ``self(x)``."""

    class Testing(classifier_cls):
        def test_step(self, batch, batch_idx):
            x = batch[0]
            before = self.ttc_extras
            out = self(x)
            self.ttc_extras.clear()  # a copy: clearing it changes nothing
            self.seen.append((before, self.ttc_extras, out))

    model = Testing()
    model.seen = []
    tta = ttc.TestTimeAugmentation(uncertainty="std", stages=("test",))
    make_trainer([tta], limit_test_batches=2).test(model, loader, verbose=False)
    assert len(model.seen) == 2
    with torch.no_grad():
        for i, (before, extras, out) in enumerate(model.seen):
            x = images[8 * i : 8 * i + 8]
            assert list(before) == ([] if i == 0 else ["std"])  # the previous batch's call
            assert isinstance(out, torch.Tensor) and list(extras) == ["std"]  # self(x) gives the value alone
            torch.testing.assert_close(extras["std"], (model.net(x) - model.net(x.flip(-1))).abs() / 2)
    assert model.ttc_extras == {}  # outside the stage nothing is installed
