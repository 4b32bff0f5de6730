"""The Hydra recipes end to end: a reduced benchmark, a sweep and its aggregation, and the entry-point configs; the
main job's committed artefacts and README.md's table rendered from them."""

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate
from omegaconf import OmegaConf
from schemas import register

import ttc_lightning as ttc

ROOT = Path(__file__).resolve().parents[1]

CONFIGS = ROOT / "configs"
#: A benchmark small enough for the test suite: 1 training epoch, 120 test digits, 2 corruptions, 2 severities.
SMALL = ["train.epochs=1", "train.progress_bar=false", "subset=120", "corruptions=[gaussian_noise,contrast]"]


def run(script: str, *args: str, cwd: Path) -> str:
    env = {**os.environ, "PYTHONPATH": str(ROOT / "recipes")}
    done = subprocess.run(
        [sys.executable, str(ROOT / "recipes" / script), *args], cwd=cwd, env=env, capture_output=True, text=True
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return done.stdout


def test_reduced_benchmark_runs_end_to_end(tmp_path):
    out = tmp_path / "run"
    stdout = run(
        "benchmark.py",
        *SMALL,
        "methods=[source,bn,tent,tta]",
        "severities=[3,5]",
        f"train.cache_dir={tmp_path / 'cache'}",
        f"hydra.run.dir={out}",
        cwd=tmp_path,
    )
    results = json.loads((out / "results.json").read_text())
    assert list(results) == ["source", "bn", "tent", "tta"]
    for row in results.values():
        assert set(row) == {"gaussian_noise", "contrast", "clean", "mean"}
        assert row["mean"] == pytest.approx((row["gaussian_noise"] + row["contrast"]) / 2)
    with open(out / "results.csv") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 4 * (1 + 2 * 2)  # methods x (clean + corruptions x severities)
    for r in rows:
        if r["severity"] == "5":
            assert float(r["error"]) == pytest.approx(results[r["method"]][r["corruption"]], abs=1e-3)
    assert (out / "severity.png").stat().st_size > 0
    assert "| method | clean | gauss | contr | mean | NLL | ECE % |" in stdout
    # the report: the same errors, NLL and ECE % as the CSV's means over the corruptions at table_severity
    report = json.loads((out / "report.json").read_text())
    assert {"command", "date", "machine", "versions", "load_average", "settings"} <= set(report)
    assert report["command"].startswith(".venv/bin/python recipes/benchmark.py train.epochs=1")
    assert report["settings"]["threads"] == 1 and report["samples"] == 120
    for method, row in report["results"].items():
        assert {k: v for k, v in row.items() if k not in ("batch_size", "seconds", "nll", "ece")} == results[method]
        at5 = [r for r in rows if r["method"] == method and r["severity"] == "5"]
        assert row["nll"] == pytest.approx(sum(float(r["nll"]) for r in at5) / 2, abs=1e-4)
        assert row["ece"] == pytest.approx(sum(float(r["ece"]) for r in at5) / 2 * 100, abs=1e-2)
        assert row["batch_size"] == 64
    from benchmark import readme_block

    assert readme_block(report) in stdout
    # the cached source model is reused
    again = run(
        "benchmark.py",
        *SMALL,
        "methods=[source]",
        "severities=[5]",
        f"train.cache_dir={tmp_path / 'cache'}",
        f"hydra.run.dir={tmp_path / 'again'}",
        cwd=tmp_path,
    )
    assert "Source model loaded from" in again
    assert json.loads((tmp_path / "again" / "results.json").read_text())["source"] == results["source"]
    # training is deterministic: a fresh cache trains the same model again
    fresh = run(
        "benchmark.py",
        *SMALL,
        "methods=[source]",
        "severities=[5]",
        f"train.cache_dir={tmp_path / 'cache2'}",
        f"hydra.run.dir={tmp_path / 'fresh'}",
        cwd=tmp_path,
    )
    assert "Training the source model" in fresh
    assert json.loads((tmp_path / "fresh" / "results.json").read_text())["source"] == results["source"]


def report(results: dict, batch_sizes: dict[str, int], notes: dict[str, str] | None = None) -> dict:
    """A hand-made main-job report (the form of benchmarks/results/digits_results.json)."""
    return {
        "command": ".venv/bin/python recipes/benchmark.py",
        "date": "2026-12-01T12:00:00+00:00",
        "machine": {"cpu": "Some CPU", "cores": 2, "torch_threads": 1},
        "versions": {"python": "3.11.2", "torch": "2.13.0+cpu", "lightning": "2.6.6", "ttc_lightning": "0.1.0"},
        "load_average": {"start": [1.5, 1.0, 0.5], "end": [2.0, 1.0, 0.5]},
        "seconds": 241.4,
        "settings": {"data": {"name": "digits", "batch_size": 64}, "stream": "reset"},
        "samples": 719,
        "table_severity": 5,
        "notes": notes or {},
        "results": {
            method: {"batch_size": batch_sizes[method], "seconds": 1.0, **row, "nll": nll, "ece": ece}
            for method, (row, nll, ece) in results.items()
        },
    }


def test_the_readme_block_renders_a_report():
    from benchmark import readme_block

    artefact = report(
        {
            "source": ({"clean": 1.25, "gaussian_noise": 50.96, "fog": 10.0, "mean": 30.48}, 2.6543, 31.04),
            "memo": ({"clean": 2.0, "gaussian_noise": 40.0, "fog": 20.04, "mean": 30.02}, 1.5, 9.96),
        },
        {"source": 64, "memo": 16},
        {"memo": "not the paper's protocol."},
    )
    assert readme_block(artefact) == (
        "Error % at severity 5 of 2 corruptions (each shift adapted to from the source model) on the 719 test images "
        "of `digits`, batch 64 unless named; NLL and ECE: means over the corruptions at that severity. Run of "
        "2026-12-01 (`.venv/bin/python recipes/benchmark.py`): Some CPU, 2 cores, torch 2.13.0+cpu, lightning 2.6.6; "
        "241 s in all, load average 1.5 at start.\n\n"
        "| method | clean | gauss | fog | mean | NLL | ECE % |\n"
        "|---|---|---|---|---|---|---|\n"
        "| source | 1.2 | 51.0 | 10.0 | 30.5 | 2.654 | 31.0 |\n"
        "| memo (batch 16) | 2.0 | 40.0 | 20.0 | 30.0 | 1.500 | 10.0 |\n\n"
        "`memo`: not the paper's protocol."
    )
    artefact["cpu_seconds"] = 199.6
    assert "241 s in all (200 s of CPU time), load average 1.5 at start." in readme_block(artefact)


def test_readme_main_table_is_the_committed_artefacts_rendering():
    """README.md holds exactly what benchmarks/render_main_table.py renders from benchmarks/results/."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from render_main_table import current, expected

    assert current((ROOT / "README.md").read_text()) == expected()


def test_committed_artefacts_come_from_the_current_configuration():
    """digits_results.json was run with today's benchmark settings (regenerate it when they change), and EATA's
    d_margin in the config is what the validation sweep chose."""
    from benchmark import RESULTS, settings

    cfg = _compose("benchmark")
    main = json.loads((RESULTS / "digits_results.json").read_text())
    assert main["settings"] == settings(cfg)
    assert main["command"] in {  # the main job itself, publishing or not
        ".venv/bin/python recipes/benchmark.py",
        ".venv/bin/python recipes/benchmark.py publish=benchmarks/results",
    }
    assert list(main["results"]) == list(cfg.methods)
    hparams = json.loads((RESULTS / "hparams.json").read_text())
    assert cfg.suite.eata.d_margin == hparams["chosen"] == cfg.suite.eta.d_margin
    assert hparams["corruptions"] == ["speckle_noise", "gaussian_blur", "spatter"]
    memo = json.loads((RESULTS / "memo_bs1.json").read_text())
    assert memo["memo"] == OmegaConf.to_container(cfg.suite.memo, resolve=True)
    for artefact in (main, hparams, memo):
        assert {"command", "date", "machine", "versions", "load_average"} <= set(artefact)


def test_the_validation_sweep_breaks_ties_towards_the_paper_value():
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from select_hparams import PAPER, choose

    assert PAPER == 0.05
    assert choose({0.05: 20.0, 0.4: 19.9, 0.6: 19.9}) == 0.4  # lowest error, then the smaller value
    assert choose({0.4: 20.0, 0.05: 20.0, 0.2: 20.0}) == 0.05  # a tie goes to the paper's value
    assert choose({0.8: 20.0, 0.2: 20.0}) == 0.2


def test_eata_gets_the_first_training_images_as_fisher_data_and_eta_none():
    import torch
    from benchmark import fisher_loader, strategy, uses_fisher
    from digits import digits

    cfg = _compose("benchmark")
    x_train = digits()[0]
    loader = fisher_loader(cfg, x_train)
    assert torch.equal(torch.cat([batch[0] for batch in loader]), x_train[: cfg.fisher.samples])
    assert 500 <= cfg.fisher.samples <= len(x_train)
    assert strategy(cfg.suite.eata, loader).fisher_data is loader
    assert strategy(cfg.suite.eata, None).fisher_data is None
    assert type(strategy(cfg.suite.tent, loader)) is ttc.Tent
    assert [m for m in cfg.methods if uses_fisher(cfg, m)] == ["eata"]
    assert uses_fisher(cfg, "eata+tta-hflip") and not uses_fisher(cfg, "eta")
    with pytest.raises(ValueError, match=r"`fisher.samples`=2000 must be an integer from 1 to 1078"):
        fisher_loader(_compose("benchmark", "fisher.samples=2000"), x_train)


def test_a_sweep_over_ttc_groups_and_its_aggregation(tmp_path):
    sweep = tmp_path / "sweep"
    run(
        "benchmark.py",
        "-m",
        "ttc/ttt=none,bn",
        *SMALL,
        "severities=[5]",
        f"train.cache_dir={tmp_path / 'cache'}",
        f"hydra.sweep.dir={sweep}",
        cwd=tmp_path,
    )
    assert [json.loads((sweep / str(i) / "results.json").read_text()).keys() for i in (0, 1)] == [
        {"source": 0}.keys(),
        {"bn": 0}.keys(),
    ]
    stdout = run("aggregate.py", str(sweep), cwd=tmp_path)
    merged = json.loads((sweep / "results.json").read_text())
    assert list(merged) == ["source", "bn"] and "| bn |" in stdout


def _compose(name: str, *overrides: str):
    register()
    with initialize_config_dir(config_dir=str(CONFIGS), version_base=None):
        return compose(config_name=name, overrides=list(overrides), return_hydra_config=False)


def test_benchmark_suite_instantiates_every_method():
    import digits  # noqa: F401  (registers the "shift" transform of the TTA policy)

    cfg = _compose("benchmark")
    kinds = {name: type(instantiate(node)) for name, node in cfg.suite.items()}
    assert kinds == {
        "bn": ttc.BatchNormAdapt,
        "tent": ttc.Tent,
        "eta": ttc.EATA,
        "eata": ttc.EATA,
        "sar": ttc.SAR,
        "memo": ttc.MEMO,
        "cotta": ttc.CoTTA,
        "tta": ttc.TestTimeAugmentation,
    }
    assert set(cfg.methods) == {"source", *kinds}


@pytest.mark.parametrize("trainer", ["cpu", "gpu", "ddp"])
def test_predict_config_composes_for_each_trainer(trainer):
    cfg = _compose("predict", f"trainer={trainer}", "ttc/ttt=tent", "ttc/tta=hflip")
    assert cfg.trainer.devices == (2 if trainer == "ddp" else 1)
    assert type(instantiate(cfg.ttc.ttt)) is ttc.Tent and cfg.ttc.iterative == {}


def test_predict_recipe_writes_the_same_predictions_as_trainer_predict(tmp_path):
    import torch
    from digits import DigitsCNN, trainer
    from loaders import test_loader

    model = DigitsCNN()
    fit = trainer(max_epochs=1, default_root_dir=tmp_path)
    x, y = test_loader().dataset.tensors
    fit.fit(model, torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=64))
    fit.save_checkpoint(tmp_path / "model.ckpt")
    output = tmp_path / "preds.pt"
    run(
        "predict.py",
        f"ckpt_path={tmp_path / 'model.ckpt'}",
        "ttc/ttt=tent",
        f"output={output}",
        f"hydra.run.dir={tmp_path / 'run'}",
        cwd=tmp_path,
    )
    expected = torch.cat(trainer([ttc.Tent()]).predict(model.eval(), test_loader()))
    torch.testing.assert_close(torch.load(output), expected)


def test_lightning_cli_builds_the_same_callbacks_from_yaml(tmp_path):
    import torch
    from cli import main
    from digits import trainer

    cli = main(["--config", str(ROOT / "recipes" / "cli_predict.yaml")], run=False)
    tent, tta, writer = (c for c in cli.trainer.callbacks if type(c).__module__.startswith("ttc_lightning"))
    assert type(tent) is ttc.Tent and type(writer) is ttc.PredictionWriter
    optimizer = tent.optimizer_factory([torch.nn.Parameter(torch.zeros(1))])
    assert isinstance(optimizer, torch.optim.Adam) and optimizer.defaults["lr"] == 1e-3
    assert tent.updater.options == ttc.Updates(clip_grad=100.0)
    assert len(tta.augmenter) == 15 and repr(tta.augmenter.stop) == "Confidence(0.95)"
    # the CLI's callbacks predict what the same callbacks built in Python predict
    model, loader = cli.model.eval(), cli.datamodule.predict_dataloader()
    ours = torch.cat(trainer([tent, tta]).predict(model, loader))
    stop = ttc.stopping.Confidence(0.95)
    reference = [
        ttc.Tent(updates=ttc.Updates(clip_grad=100.0)),
        ttc.TestTimeAugmentation(["shift", "multiscale"], stop=stop),
    ]
    torch.testing.assert_close(ours, torch.cat(trainer(reference).predict(model, loader)))


def test_model_data_and_trainer_configs_instantiate():
    import lightning as L
    from digits import DigitsCNN

    cfg = _compose("predict")
    assert isinstance(instantiate(cfg.model), DigitsCNN)
    loader = instantiate(cfg.data)
    images, labels = next(iter(loader))
    assert images.shape == (64, 1, 8, 8) and labels.shape == (64,)
    assert isinstance(instantiate(cfg.trainer), L.Trainer)


def _write_idx(path: Path, array) -> None:
    import gzip
    import struct

    header = struct.pack(">I", 0x0800 | array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
    with gzip.open(path, "wb") as f:
        f.write(header + array.astype("uint8").tobytes())


def test_fashion_mnist_reads_debians_idx_files_and_says_how_to_install_them(tmp_path):
    import numpy as np
    from loaders import fashion_mnist, load

    rng = np.random.default_rng(0)
    train, test = rng.integers(0, 256, (5, 28, 28)), rng.integers(0, 256, (3, 28, 28))
    for name, array in [
        ("train-images-idx3", train),
        ("train-labels-idx1", np.arange(5)),
        ("t10k-images-idx3", test),
        ("t10k-labels-idx1", np.array([9, 0, 4])),
    ]:
        _write_idx(tmp_path / f"{name}-ubyte.gz", array)
    x_train, y_train, x_test, y_test = fashion_mnist(str(tmp_path))
    assert x_train.shape == (5, 1, 28, 28) and x_test.shape == (3, 1, 28, 28)
    assert np.allclose(x_test[:, 0].numpy(), test / 255) and y_test.tolist() == [9, 0, 4]
    assert y_train.tolist() == list(range(5))
    with pytest.raises(FileNotFoundError, match="apt-get install dataset-fashion-mnist"):
        fashion_mnist(str(tmp_path / "missing"))
    with pytest.raises(ValueError, match=r"data\.name"):
        load("cifar10")


def test_predict_recipe_on_two_ddp_processes_equals_one_process(tmp_path):
    import torch
    from digits import DigitsCNN

    checkpoint = tmp_path / "model.ckpt"  # an untrained model, as a minimal Lightning checkpoint
    torch.save({"state_dict": DigitsCNN().state_dict(), "pytorch-lightning_version": "2.6.6"}, checkpoint)
    for name, extra in (("one", []), ("ddp", ["trainer=ddp"])):
        run(
            "predict.py",
            *extra,
            f"ckpt_path={checkpoint}",
            "ttc/tta=hflip",
            f"output={tmp_path / name}.pt",
            f"hydra.run.dir={tmp_path / name}",
            cwd=tmp_path,
        )
    one, ddp = torch.load(tmp_path / "one.pt"), torch.load(tmp_path / "ddp.pt")
    assert one.shape == (719, 10)
    torch.testing.assert_close(ddp, one, atol=1e-5, rtol=1e-5)
