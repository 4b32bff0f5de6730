"""Test-time augmentation on scikit-learn's digits: error before and after, on clean and shifted/noisy test sets.

Trains a small CNN on 8x8 digits (deterministic), augmenting each training batch with a random view of the
``shift x multiscale`` policy (views the model has never seen rarely help), then predicts the held-out digits with
``trainer.predict`` and several ``TestTimeAugmentation`` policies, and prints a markdown table of error rates (%) and
negative log-likelihood. The ``shift`` policy is a transform registered with ``@ttc.register_transform``; ``hflip``
is there to show that a policy must suit the data (digits are not mirror-symmetric). The results of a run are in
``benchmarks/README.md``.

Run: ``python recipes/tta_demo.py`` (after ``bash .ci/setup``); writes ``benchmarks/results/tta_demo.json`` (the
results with the date, machine and versions; ``--artefact NAME`` for another name).
"""

import argparse
import os
import sys

import torch
import torch.nn.functional as F
from digits import SHIFTS, TRAIN_VIEWS, digits, predict, quiet, shift, train
from torch import Tensor

import ttc_lightning as ttc


def test_sets(images: Tensor) -> dict[str, Tensor]:
    """Clean, randomly 1-pixel-shifted, and Gaussian-noise (std 0.3) copies of the test images, seeded."""
    generator = torch.Generator().manual_seed(1)
    picks = torch.randint(1, len(SHIFTS), (len(images),), generator=generator)
    shifted = torch.stack([shift(img, *SHIFTS[int(k)]) for img, k in zip(images, picks, strict=True)])
    noisy = (images + 0.3 * torch.randn(images.shape, generator=generator)).clamp(0, 1)
    return {"clean": images, "shifted": shifted, "noise": noisy}


POLICIES: dict[str, ttc.TestTimeAugmentation | None] = {
    "none": None,
    "shift (5 views)": ttc.TestTimeAugmentation(transforms="shift"),
    "multiscale (3)": ttc.TestTimeAugmentation(transforms="multiscale"),
    "shift x multiscale (15)": ttc.TestTimeAugmentation(transforms=["shift", "multiscale"]),
    "hflip (2)": ttc.TestTimeAugmentation(transforms="hflip"),
}


def main() -> None:
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks"))
    from common import add_artefact_option, load, save

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_artefact_option(parser, "tta_demo")
    args = parser.parse_args()
    start = load()
    quiet()
    print("Training a small CNN on digits (40 epochs)...")
    model = train(epochs=40, train_views=TRAIN_VIEWS)
    _, _, x_test, y_test = digits()
    results: dict[str, dict[str, dict[str, float]]] = {}
    for name, policy in POLICIES.items():
        for data, images in test_sets(x_test).items():
            logits = predict(model, images, [policy] if policy else [], batch_size=256)
            error = (logits.argmax(1) != y_test).float().mean().item() * 100
            nll = F.cross_entropy(logits, y_test).item()
            results.setdefault(name, {})[data] = {"error": error, "nll": nll}
    save(args, results, start)
    print("\nTest-time augmentation on digits (error % / NLL; lower is better)\n")
    print(render(results))


def render(results: dict[str, dict[str, dict[str, float]]]) -> str:
    """The demo's markdown table: error % / NLL per policy and test set."""
    sets = list(next(iter(results.values())))
    lines = ["| policy | " + " | ".join(sets) + " |", "|---|" + "---|" * len(sets)]
    for name, by_set in results.items():
        cells = [f"{r['error']:.1f} / {r['nll']:.3f}" for r in by_set.values()]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
