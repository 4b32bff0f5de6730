"""The neutral layer of shared tensor operations.

Test-time augmentation (``ttc_lightning.tta``), adaptation (``ttc_lightning.ttt``), iterative inference and the
per-sample halting and stopping rules all build on these modules, and these modules import none of them (only
torch and ``ttc_lightning.checks``). ``tests/test_layering.py`` checks the imports:

* :mod:`~ttc_lightning.ops.activations`: class probabilities under softmax or sigmoid, and back to logits.
* :mod:`~ttc_lightning.ops.entropy`: entropy, marginal entropy and soft cross-entropy (the only place entropy is
  written).
* :mod:`~ttc_lightning.ops.merge`: running merges of stacks of view outputs (``mean``, ``gmean``, ``vote``, ...).
* :mod:`~ttc_lightning.ops.uncertainty`: running uncertainty measures across views (``std``, ``entropy``, ...).
* :mod:`~ttc_lightning.ops.seeding`: seeded random generators, optionally distinct per distributed process.
* :mod:`~ttc_lightning.ops.augmix`: ``RandomAugment``, seeded random views of image batches (MEMO, CoTTA, iterative
  sampling).
"""
