"""The recipes' data: scikit-learn's digits (embedded) and Fashion-MNIST (Debian's ``dataset-fashion-mnist``)."""

import gzip
import os
import struct

import numpy as np
import torch
from digits import digits
from torch import Tensor
from torch.utils.data import DataLoader, TensorDataset

#: Where Debian's ``dataset-fashion-mnist`` package puts the IDX files.
FASHION_MNIST_DIR = "/usr/share/datasets/fashion-mnist"
DATASETS = ("digits", "fashion_mnist")
Splits = tuple[Tensor, Tensor, Tensor, Tensor]


def _idx(path: str) -> np.ndarray:
    """An array from a gzipped IDX file (big-endian dimensions after a 4-byte magic number)."""
    with gzip.open(path, "rb") as f:
        data = f.read()
    ndim = data[3]
    shape = struct.unpack(f">{ndim}I", data[4 : 4 + 4 * ndim])
    return np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim).reshape(shape)


def fashion_mnist(root: str = FASHION_MNIST_DIR) -> Splits:
    """Fashion-MNIST's 60,000 training and 10,000 test images as ``(N, 1, 28, 28)`` in ``[0, 1]``, with labels."""
    names = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")
    paths = [os.path.join(root, f"{name}.gz") for name in names]
    missing = [p for p in paths if not os.path.exists(p)]
    if missing:
        raise FileNotFoundError(
            f"Fashion-MNIST is not installed: {missing[0]} is missing. Install Debian's package "
            "(`sudo apt-get install dataset-fashion-mnist`), or use data=digits."
        )
    x_train, y_train, x_test, y_test = (torch.from_numpy(_idx(p).copy()) for p in paths)
    return x_train[:, None].float() / 255, y_train.long(), x_test[:, None].float() / 255, y_test.long()


def load(name: str) -> Splits:
    """The train/test splits of ``name``: ``digits`` or ``fashion_mnist``."""
    if name == "digits":
        return digits()
    if name == "fashion_mnist":
        return fashion_mnist()
    raise ValueError(f"`data.name`={name!r} is not a dataset of the recipes; allowed: {', '.join(DATASETS)}.")


def test_loader(name: str = "digits", batch_size: int = 64) -> DataLoader:
    """The test split of ``name`` as ``(image, label)`` batches, in order."""
    _, _, x_test, y_test = load(name)
    return DataLoader(TensorDataset(x_test, y_test), batch_size=batch_size)
