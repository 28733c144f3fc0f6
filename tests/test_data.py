"""Datasets: digits splits, CIFAR/SVHN/ImageFolder from small files in their real on-disk formats
(written here), clear errors for missing or malformed data, and augmentation."""

import os
import pickle

import numpy as np
import pytest
import torch
from PIL import Image

from zoo.data import DatasetError, load_dataset, load_digits


def test_digits_split_is_seeded_and_normalised():
    a, b, c = load_digits(0), load_digits(0), load_digits(1)
    sizes = [len(a.train[1]), len(a.val[1]), len(a.test[1])]
    assert sum(sizes) == 1797 and sizes == [1078, 359, 360]
    assert torch.equal(a.train[0], b.train[0]) and not torch.equal(a.train[0], c.train[0])
    assert abs(float(a.train[0].mean())) < 1e-4 and abs(float(a.train[0].std()) - 1) < 0.05
    assert a.input_shape == (1, 1, 8, 8) and a.num_classes == 10


def _write_cifar(root, n_train=20, n_test=10, hundred=False):
    rng = np.random.default_rng(0)
    folder = os.path.join(root, "cifar-100-python" if hundred else "cifar-10-batches-py")
    os.makedirs(folder)
    key = "fine_labels" if hundred else "labels"
    files = ["train", "test"] if hundred else [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]
    for name in files:
        n = n_test if "test" in name else n_train
        batch = {"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8),
                 key: rng.integers(0, 100 if hundred else 10, n).tolist()}
        with open(os.path.join(folder, name), "wb") as f:
            pickle.dump(batch, f)
    meta = "meta" if hundred else "batches.meta"
    with open(os.path.join(folder, meta), "wb") as f:
        names = {"fine_label_names": [f"c{i}" for i in range(100)]} if hundred else \
            {"label_names": [f"c{i}" for i in range(10)]}
        pickle.dump(names, f)
    return folder


@pytest.mark.parametrize("hundred", [False, True])
def test_cifar_from_its_standard_files(tmp_path, hundred):
    _write_cifar(str(tmp_path), hundred=hundred)
    name = "cifar100" if hundred else "cifar10"
    data = load_dataset(name, str(tmp_path), val_fraction=0.2, seed=0)
    n_train = 20 if hundred else 100
    assert len(data.train[1]) + len(data.val[1]) == n_train and len(data.val[1]) == round(0.2 * n_train)
    assert data.test[0].shape == (10, 3, 32, 32) and data.num_classes == (100 if hundred else 10)
    assert data.flip and data.crop_padding == 4
    small = load_dataset(name, str(tmp_path), size=16, train_subset=5)
    assert small.train[0].shape == (5, 3, 16, 16)


def test_cifar_missing_or_malformed_files_are_named(tmp_path):
    with pytest.raises(DatasetError, match=r"cifar10: expected .*cifar-10-batches-py/data_batch_1"):
        load_dataset("cifar10", str(tmp_path))
    folder = _write_cifar(str(tmp_path))
    os.remove(os.path.join(folder, "test_batch"))
    with pytest.raises(DatasetError, match="test_batch"):
        load_dataset("cifar10", str(tmp_path))
    with open(os.path.join(folder, "test_batch"), "wb") as f:
        f.write(b"not a pickle")
    with pytest.raises(DatasetError, match="malformed"):
        load_dataset("cifar10", str(tmp_path))
    with pytest.raises(DatasetError, match="a local root folder is required"):
        load_dataset("cifar10")
    with pytest.raises(DatasetError, match="unknown dataset 'mnist'"):
        load_dataset("mnist", str(tmp_path))


def test_svhn_from_its_mat_files(tmp_path):
    from scipy.io import savemat

    rng = np.random.default_rng(0)
    for split, n in (("train", 30), ("test", 12)):
        savemat(tmp_path / f"{split}_32x32.mat",
                {"X": rng.integers(0, 256, (32, 32, 3, n), dtype=np.uint8), "y": rng.integers(1, 11, (n, 1))})
    data = load_dataset("svhn", str(tmp_path), val_fraction=0.1)
    assert len(data.train[1]) == 27 and len(data.val[1]) == 3 and data.test[0].shape == (12, 3, 32, 32)
    assert not data.flip and int(data.train[1].max()) <= 9  # label 10 means digit 0
    os.remove(tmp_path / "test_32x32.mat")
    with pytest.raises(DatasetError, match="svhn: expected .*test_32x32.mat"):
        load_dataset("svhn", str(tmp_path))


def _write_folder(root, classes=("cat", "dog", "emu"), per=6, size=20):
    rng = np.random.default_rng(0)
    for split in ("train", "test"):
        for c in classes:
            os.makedirs(os.path.join(root, split, c))
            for i in range(per):
                Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(
                    os.path.join(root, split, c, f"{i}.jpg"))


def test_imagefolder_with_resizing_and_a_training_subset(tmp_path):
    _write_folder(str(tmp_path))
    data = load_dataset("imagefolder", str(tmp_path), size=8, val_fraction=0.25, train_subset=6)
    assert data.train[0].shape == (6, 3, 8, 8) and data.test[0].shape == (18, 3, 8, 8)
    assert data.num_classes == 3 and data.info["classes"] == ["cat", "dog", "emu"]
    with pytest.raises(DatasetError, match=r"imagefolder: expected .*nowhere/train"):
        load_dataset("imagefolder", str(tmp_path / "nowhere"))


def test_augmentation_is_a_seeded_crop_and_flip():
    data = load_dataset("digits")
    data.crop_padding, data.flip = 2, True
    x = data.train[0][:16]
    a = data.augment(x, torch.Generator().manual_seed(0))
    b = data.augment(x, torch.Generator().manual_seed(0))
    assert a.shape == x.shape and torch.equal(a, b) and not torch.equal(a, x)
    # a crop of the zero-padded image: every output pixel is an input pixel or padding
    values = set(x.unique().tolist()) | {0.0}
    assert set(a.unique().tolist()) <= values


class _RunsCode:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_a_crafted_cifar_batch_cannot_run_code(tmp_path):
    """CIFAR's batches are pickles: they are read by an unpickler that builds arrays, lists and
    dicts only, so a file that would run code when unpickled is refused, naming it."""
    folder = _write_cifar(str(tmp_path / "data"))
    marker = tmp_path / "ran"
    with open(os.path.join(folder, "data_batch_1"), "wb") as f:
        pickle.dump({"data": _RunsCode(marker), "labels": [0]}, f)
    with pytest.raises(DatasetError, match=r"data_batch_1 is malformed \(UnpicklingError: refusing to unpickle "
                                           r"(posix|os)\.system"):
        load_dataset("cifar10", str(tmp_path / "data"))
    assert not marker.exists()
