"""PredictionWriter: one file (or shards and an index) in dataset order, every sample exactly once, on one device and
on 2 CPU processes (ddp, ddp_spawn) with an uneven split; the checks for samplers that would repeat or drop samples;
the merge's own checks on hand-made part files."""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from ddp_writer import BATCH, SAMPLES, Net, Stream, inputs, mlp
from ddp_writer import loader as data
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.utils.data import DataLoader

import ttc_lightning as ttc
from ttc_lightning.writer import PredictionWriter, load_predictions, merge_parts
from ttc_lightning.writer.parts import PartWriter

SCRIPT = Path(__file__).parent / "ddp_writer.py"


def expected(n: int = SAMPLES, seed: int = 1) -> torch.Tensor:
    """The model's output on the whole input at once, in dataset order."""
    with torch.no_grad():
        return mlp()(inputs(n, seed))


def check_extras(got: dict, n: int = SAMPLES, seed: int = 1) -> None:
    """``Net(extras=True)``'s file: logits, the dataset indices 0..n-1 in order, and the (sum, first feature) tuple."""
    x = inputs(n, seed)
    assert set(got) == {"prediction", "index", "parts"}
    torch.testing.assert_close(got["prediction"], expected(n, seed))
    assert torch.equal(got["index"], torch.arange(n))
    assert isinstance(got["parts"], tuple) and len(got["parts"]) == 2
    torch.testing.assert_close(got["parts"][0], x.sum(1))
    assert torch.equal(got["parts"][1], x[:, :1])


def leftovers(folder: Path) -> list[str]:
    return sorted(name for name in os.listdir(folder) if name.endswith((".part", ".tmp")))


def run_script(strategy: str, out: Path) -> list[dict]:
    command = [sys.executable, str(SCRIPT), strategy, str(out)]
    done = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    ranks = (0, 1) if strategy == "ddp" else (0,)
    return [torch.load(out / f"errors.rank{rank}.pt") for rank in ranks]


# --- one device ------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("batch_size", [1, 5, SAMPLES, 40])
def test_tensor_output_is_the_model_output_in_dataset_order(batch_size, tmp_path, make_trainer):
    path = tmp_path / "out" / "preds.pt"  # the folder is created
    returned = make_trainer([PredictionWriter(path)]).predict(Net(), data(batch_size=batch_size, shuffle=True))
    got = torch.load(path)
    torch.testing.assert_close(got, expected())
    assert not torch.allclose(torch.cat(returned), got)  # the batches came shuffled; the file is in dataset order
    assert leftovers(path.parent) == []


def test_dict_and_tuple_outputs_are_concatenated_per_key(tmp_path, make_trainer):
    path = tmp_path / "preds.pt"
    make_trainer([PredictionWriter(str(path))]).predict(Net(extras=True), data(batch_size=3))
    check_extras(torch.load(path, weights_only=True))


def test_return_predictions_false(tmp_path, make_trainer):
    path = tmp_path / "preds.pt"
    assert make_trainer([PredictionWriter(path)]).predict(Net(), data(), return_predictions=False) is None
    torch.testing.assert_close(torch.load(path), expected())


def test_several_dataloaders_give_a_list_with_one_output_each(tmp_path, make_trainer):
    path = tmp_path / "preds.pt"
    make_trainer([PredictionWriter(path)]).predict(Net(), [data(), data(5, 2, seed=2)])
    got = torch.load(path)
    assert isinstance(got, list) and len(got) == 2
    torch.testing.assert_close(got[0], expected())
    torch.testing.assert_close(got[1], expected(5, seed=2))


def test_extras_from_a_strategy_are_written_as_a_dict(tmp_path, make_trainer, model, loader, images, reference):
    path = tmp_path / "preds.pt"
    returned = make_trainer([ttc.TestTimeAugmentation(uncertainty=True), PredictionWriter(path)]).predict(model, loader)
    got = torch.load(path)
    assert "prediction" in got and set(got) == set(returned[0])
    torch.testing.assert_close(got["prediction"], reference(model.net, images))
    for key, value in got.items():
        assert torch.equal(value, torch.cat([batch[key] for batch in returned]))


@pytest.mark.parametrize("shard_size", [1, 5, SAMPLES, 100])
def test_shards_with_an_index_equal_the_single_file(shard_size, tmp_path, make_trainer):
    single, sharded = tmp_path / "single.pt", tmp_path / "sharded.pt"
    make_trainer([PredictionWriter(single), PredictionWriter(sharded, shard_size=shard_size)]).predict(
        Net(extras=True), data(batch_size=3), return_predictions=False
    )
    index = torch.load(sharded, weights_only=True)
    sizes = [min(shard_size, SAMPLES - start) for start in range(0, SAMPLES, shard_size)]
    assert index == {
        "format": "ttc_lightning.shards",
        "shards": [f"sharded.{number:05d}.pt" for number in range(len(sizes))],
        "sizes": sizes,
    }
    start = 0
    for name, size in zip(index["shards"], sizes, strict=True):
        shard = torch.load(tmp_path / name, weights_only=True)
        assert torch.equal(shard["index"], torch.arange(start, start + size))
        start += size
    got = load_predictions(sharded)
    check_extras(got)
    whole = torch.load(single)
    for key in ("prediction", "index"):
        assert torch.equal(got[key], whole[key])
    assert leftovers(tmp_path) == []


def test_shards_of_several_dataloaders(tmp_path, make_trainer):
    path = tmp_path / "preds.pt"
    make_trainer([PredictionWriter(path, shard_size=4)]).predict(Net(), [data(), data(5, 2, seed=2)])
    index = torch.load(path)
    assert [entry["sizes"] for entry in index] == [[4, 4, 4, 4, 1], [4, 1]]
    assert index[1]["shards"] == ["preds.dl1.00000.pt", "preds.dl1.00001.pt"]
    got = load_predictions(path)
    torch.testing.assert_close(got[0], expected())
    torch.testing.assert_close(got[1], expected(5, seed=2))


def test_iterable_dataset_is_written_in_arrival_order_on_one_device(tmp_path, make_trainer):
    class Backwards(Stream):
        def __iter__(self):
            return reversed(list(super().__iter__()))

    path = tmp_path / "preds.pt"
    make_trainer([PredictionWriter(path)]).predict(Net(True), DataLoader(Backwards(), batch_size=BATCH))
    got = torch.load(path)
    assert torch.equal(got["index"], torch.arange(SAMPLES).flip(0))
    torch.testing.assert_close(got["prediction"], expected().flip(0))


def test_a_second_run_overwrites_and_a_failed_run_leaves_an_incomplete_part(tmp_path, make_trainer):
    class Failing(Net):
        def predict_step(self, batch, batch_idx, dataloader_idx=0):
            if batch_idx == 2:
                raise KeyError("boom")
            return super().predict_step(batch, batch_idx, dataloader_idx)

    path = tmp_path / "preds.pt"
    with pytest.raises(KeyError, match="boom"):
        make_trainer([PredictionWriter(path)]).predict(Failing(), data())
    assert not path.exists()
    with pytest.raises(RuntimeError, match="incomplete"):
        merge_parts(path)
    make_trainer([PredictionWriter(path)]).predict(Net(), data())
    torch.testing.assert_close(torch.load(path), expected())
    assert leftovers(tmp_path) == []


# --- errors ----------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"path": ""}, "`path`=''"),
        ({"path": 3}, "`path`=3"),
        ({"path": "."}, "not a folder"),
        ({"path": "p.pt", "shard_size": 0}, "`shard_size`=0 must be an integer >= 1"),
        ({"path": "p.pt", "shard_size": True}, "`shard_size`=True"),
        ({"path": "p.pt", "shard_size": 2.0}, "`shard_size`=2.0"),
        ({"path": "p.pt", "merge": "yes"}, "`merge`='yes' must be a bool"),
    ],
)
def test_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        PredictionWriter(**kwargs)


class Returns(Net):
    """A module whose ``predict_step`` returns ``make(logits, batch_idx)``."""

    def __init__(self, make) -> None:
        super().__init__()
        self.make = make

    def predict_step(self, batch, batch_idx, dataloader_idx=0):
        return self.make(self.net(batch[0]), batch_idx)


@pytest.mark.parametrize(
    ("make", "error", "match"),
    [
        (lambda y, i: "text", TypeError, r"the prediction is a str"),
        (lambda y, i: None, TypeError, r"the prediction is a NoneType"),
        (lambda y, i: {"y": y, "ids": ["a"] * len(y)}, TypeError, r"the prediction\['ids'\]\[0\] is a str"),
        (lambda y, i: {1: y}, TypeError, "has the key 1; dict keys must be str"),
        (lambda y, i: {}, TypeError, "holds no tensor"),
        (lambda y, i: y.sum(), ValueError, r"prediction has shape \(\) in batch 0"),
        (lambda y, i: y[:1], ValueError, r"prediction has shape \(1, 3\) in batch 0 .* which has 4 samples"),
        (lambda y, i: (y, y[:, : i + 1]), ValueError, r"prediction\[1\] in batch 1 .* shape \(2,\)"),
        (lambda y, i: y.double() if i else y, ValueError, "dtype torch.float64"),
        (lambda y, i: {"a": y} if i else {"b": y}, ValueError, "has the structure {'a': 0}"),
    ],
)
def test_unsupported_predictions_are_refused_with_their_name(make, error, match, tmp_path, make_trainer):
    with pytest.raises(error, match=match):
        make_trainer([PredictionWriter(tmp_path / "p.pt")]).predict(Returns(make), data())


def test_shards_refuse_a_shuffled_dataloader_before_any_batch(tmp_path, make_trainer):
    model = Returns(lambda y, i: pytest.fail("a batch ran"))
    with pytest.raises(ValueError, match="shuffles, but `shard_size`=4 needs each rank's samples in dataset order"):
        make_trainer([PredictionWriter(tmp_path / "p.pt", shard_size=4)]).predict(model, data(shuffle=True))


@pytest.mark.parametrize("limits", [{"limit_predict_batches": 2}, {"limit_predict_batches": 0.5}, {"fast_dev_run": 1}])
def test_limited_batches_are_refused(limits, tmp_path, make_trainer):
    with pytest.raises(ValueError, match=r"runs \d of its 5 batches"):
        make_trainer([PredictionWriter(tmp_path / "p.pt")], **limits).predict(Net(), data())


# --- the merge, on hand-made parts -----------------------------------------------------------------------------------


def write_part(path, rank, world, batches, lengths=(4,), run="r", footer=True):
    """A part file: ``batches`` are (dataloader, indices) pairs; each sample's value is its index (as a float)."""
    part = PartWriter(f"{path}.rank{rank}.part", {"run": run, "rank": rank, "world_size": world, "lengths": lengths})
    written = [[] for _ in lengths or ()]
    for dataloader, indices in batches:
        values = torch.tensor(indices, dtype=torch.float)
        part.write(dataloader, {"indices": torch.tensor(indices), "skeleton": 0, "leaves": [values]})
        written[dataloader] += indices
    ordered = [w == sorted(set(w)) for w in written]  # strictly increasing
    part.close({"samples": [len(w) for w in written], "ordered": ordered} if footer else None)


@pytest.mark.parametrize(
    ("first", "second", "match"),
    [
        ([0, 1, 2], [2, 3], r"1 written more than once \(first: \[2\]\)"),
        ([0, 1], [3], r"1 never written \(first: \[2\]\)"),
        ([0, 1], [0, 1], r"2 written more than once \(first: \[0, 1\]\)"),
        ([0, 2], [1, 3, 4], "holds the dataset index 4 .* outside 0..3"),
    ],
)
@pytest.mark.parametrize("shard_size", [None, 2])
def test_merge_finds_repeated_missing_and_foreign_indices(first, second, match, shard_size, tmp_path):
    path = tmp_path / "p.pt"
    write_part(path, 0, 2, [(0, first)])
    write_part(path, 1, 2, [(0, second)])
    with pytest.raises(RuntimeError, match=match):
        merge_parts(path, shard_size)
    assert leftovers(tmp_path) == ["p.pt.rank0.part", "p.pt.rank1.part"]  # kept for another try


@pytest.mark.parametrize("unordered", [[(0, [2, 0])], [(0, [2]), (0, [0])]], ids=["in a batch", "across batches"])
def test_merge_of_unordered_parts_needs_one_file(unordered, tmp_path):
    path = tmp_path / "p.pt"
    write_part(path, 0, 2, unordered)
    write_part(path, 1, 2, [(0, [1, 3])])
    with pytest.raises(RuntimeError, match="not strictly increasing"):
        merge_parts(path, shard_size=2)
    merge_parts(path)
    assert torch.equal(torch.load(path), torch.arange(4.0))


def test_parts_of_a_shuffled_run_merge_into_one_file_not_into_shards(tmp_path, make_trainer):
    path = tmp_path / "p.pt"
    make_trainer([PredictionWriter(path, merge=False)]).predict(Net(), data(shuffle=True))
    with pytest.raises(RuntimeError, match=r"p.pt.rank0.part are not strictly increasing .* shuffle=False"):
        merge_parts(path, shard_size=5)
    merge_parts(path)
    torch.testing.assert_close(torch.load(path), expected())


def test_merge_with_an_empty_rank_and_several_dataloaders(tmp_path):
    path = tmp_path / "p.pt"
    write_part(path, 0, 3, [(0, [0, 3]), (1, [0])], lengths=(4, 1))
    write_part(path, 1, 3, [(0, [1, 2])], lengths=(4, 1))
    write_part(path, 2, 3, [], lengths=None)  # a rank that Lightning skipped: no batches
    write_part(path, 3, 4, [], lengths=None)  # a stale part of a larger run: not read, not removed
    merge_parts(path)
    got = torch.load(path)
    assert torch.equal(got[0], torch.arange(4.0)) and torch.equal(got[1], torch.zeros(1))
    assert leftovers(tmp_path) == ["p.pt.rank3.part"]


def test_merge_reports_missing_foreign_incomplete_and_truncated_parts(tmp_path):
    path = tmp_path / "p.pt"
    write_part(path, 0, 2, [(0, [0, 2])])
    with pytest.raises(FileNotFoundError, match=r"rank1.part'\] of a run on 2 ranks .* shares; .*merge_parts\(path\)"):
        merge_parts(path)
    write_part(path, 1, 2, [(0, [1, 3])], run="other")
    with pytest.raises(RuntimeError, match="comes from another run"):
        merge_parts(path)
    write_part(path, 1, 2, [(0, [1, 3])], footer=False)
    with pytest.raises(RuntimeError, match="incomplete"):
        merge_parts(path)
    write_part(path, 1, 2, [(0, [1, 3])])
    data = Path(f"{path}.rank1.part").read_bytes()
    Path(f"{path}.rank1.part").write_bytes(data[:-5])
    with pytest.raises(RuntimeError, match="truncated"):
        merge_parts(path)


def test_merge_refuses_parts_whose_shapes_disagree(tmp_path):
    path = tmp_path / "p.pt"
    write_part(path, 0, 2, [(0, [0, 2])])
    part = PartWriter(f"{path}.rank1.part", {"run": "r", "rank": 1, "world_size": 2, "lengths": (4,)})
    part.write(0, {"indices": torch.tensor([1, 3]), "skeleton": 0, "leaves": [torch.zeros(2, 5)]})
    part.close({"samples": [2], "ordered": [True]})
    with pytest.raises(ValueError, match=r"per-sample shape \(5,\) .* but \(\) and"):
        merge_parts(path)


@settings(max_examples=30, deadline=None)
@given(
    samples=st.integers(1, 30),
    world=st.integers(1, 4),
    batch=st.integers(1, 5),
    shard_size=st.none() | st.integers(1, 12),
)
def test_merge_of_a_strided_split_is_every_index_once_in_order(samples, world, batch, shard_size, tmp_path_factory):
    """Lightning's split (rank r gets r, r + world, ...; a rank may be empty), batched: the merge gives 0..N-1."""
    path = tmp_path_factory.mktemp("merge") / "p.pt"
    for rank in range(world):
        mine = list(range(rank, samples, world))
        write_part(path, rank, world, [(0, mine[i : i + batch]) for i in range(0, len(mine), batch)], (samples,))
    merge_parts(path, shard_size)
    got = load_predictions(path)
    assert torch.equal(got, torch.arange(float(samples)))
    if shard_size is not None:
        assert torch.load(path)["sizes"] == [min(shard_size, samples - s) for s in range(0, samples, shard_size)]


# --- 2 processes -----------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def ddp(tmp_path_factory):
    out = tmp_path_factory.mktemp("ddp")
    return out, run_script("ddp", out)


def test_ddp_runs_through_and_leaves_no_part(ddp):
    out, errors = ddp
    expected_to_fail = {"repeating_sampler", "no_distributed_sampler", "torch_sampler", "iterable"}
    for rank in (0, 1):
        assert {name for name, error in errors[rank].items() if error} == expected_to_fail
    assert leftovers(out) == [f"{name}.rank{rank}.part" for name in ("repeated.pt", "unmerged.pt") for rank in (0, 1)]


def test_ddp_merge_error_is_raised_on_every_rank(ddp):
    out, errors = ddp
    repeated = "of the dataset indices 0..16 of dataloader 0, 17 written more than once (first: [0, 1, 2"
    assert errors[0]["repeating_sampler"].startswith("RuntimeError: PredictionWriter: " + repeated)
    assert errors[1]["repeating_sampler"].startswith(
        "RuntimeError: PredictionWriter: rank 0 could not merge the predictions: RuntimeError: PredictionWriter: "
        + repeated
    )
    assert not (out / "repeated.pt").exists()


def test_ddp_tensor_output_equals_the_single_process_reference(ddp):
    out, _ = ddp
    torch.testing.assert_close(torch.load(out / "tensor.pt"), expected())


def test_ddp_dict_shards_batch_one_two_dataloaders_and_an_empty_rank(ddp):
    out, _ = ddp
    index = torch.load(out / "dict_shards.pt")
    assert index["sizes"] == [5, 5, 5, 2] and all((out / name).exists() for name in index["shards"])
    check_extras(load_predictions(out / "dict_shards.pt"))
    check_extras(torch.load(out / "batch_one.pt"))
    check_extras(torch.load(out / "empty_rank.pt"), n=1)
    two = torch.load(out / "two.pt")
    torch.testing.assert_close(two[0], expected())
    torch.testing.assert_close(two[1], expected(5, seed=2))


def test_ddp_parts_left_by_merge_false_merge_afterwards(ddp, tmp_path):
    out, _ = ddp
    assert not (out / "unmerged.pt").exists()
    for name in ("one.pt", "sharded.pt"):
        for rank in (0, 1):
            shutil.copy(out / f"unmerged.pt.rank{rank}.part", tmp_path / f"{name}.rank{rank}.part")
    merge_parts(tmp_path / "one.pt")
    check_extras(torch.load(tmp_path / "one.pt"))
    merge_parts(tmp_path / "sharded.pt", shard_size=6)
    assert torch.load(tmp_path / "sharded.pt")["sizes"] == [6, 6, 5]
    check_extras(load_predictions(tmp_path / "sharded.pt"))
    assert leftovers(tmp_path) == []


def test_ddp_refuses_samplers_that_repeat_samples_on_every_rank(ddp):
    _, errors = ddp
    for name in ("no_distributed_sampler", "torch_sampler", "iterable"):
        assert errors[0][name] == errors[1][name]
    assert "uses a SequentialSampler on 2 ranks" in errors[0]["no_distributed_sampler"]
    assert "use_distributed_sampler=True" in errors[0]["no_distributed_sampler"]
    assert "DistributedSampler on 17 samples and 2 ranks, which repeats samples" in errors[0]["torch_sampler"]
    assert "gives no dataset indices" in errors[0]["iterable"]


@pytest.mark.slow
def test_ddp_spawn_without_returned_predictions(tmp_path):
    (errors,) = run_script("ddp_spawn", tmp_path)
    assert errors == {"spawn": None}
    assert torch.load(tmp_path / "spawn.pt")["sizes"] == [4, 4, 4, 4, 1]
    check_extras(load_predictions(tmp_path / "spawn.pt"))
    assert leftovers(tmp_path) == []
