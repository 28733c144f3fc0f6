"""Datasets as in-memory tensors with seeded train/val/test splits, and batched augmentation.

Every dataset here is small enough to hold in memory as one uint8/float tensor per split, which on
a 2-core machine is several times faster than a per-image DataLoader pipeline; augmentation
(random crop with padding, horizontal flip) runs on whole batches.

- ``digits``: scikit-learn's ``load_digits`` (1,797 real 8x8 handwritten digits, shipped with the
  package), seeded 60/20/20 train/val/test split. The embedded default.
- ``cifar10``, ``cifar100``, ``svhn``: torchvision's dataset classes over a local root in the
  standard on-disk format, ``download=False``; the validation split is carved out of the official
  training set (seeded), the official test set is the test split.
- ``imagefolder``: ``root/train/<class>/*`` and ``root/test/<class>/*`` (the ImageNet layout), with
  optional resizing and a training subset.
"""

from __future__ import annotations

import os
import pickle

import numpy as np
import torch
import torch.nn.functional as F

from distributed.progress import progress
from metanet.data import TaskData

DATASETS = ("digits", "cifar10", "cifar100", "svhn", "imagefolder")


class DatasetError(ValueError):
    """A dataset that is missing, malformed, or asked for with bad options."""


# ------------------------------------------------------------------------------ helpers
def _split_indices(n: int, fractions: tuple[float, ...], seed: int) -> list[torch.Tensor]:
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    counts = [int(round(f * n)) for f in fractions[:-1]]
    counts.append(n - sum(counts))
    return list(torch.split(order, counts))


def _normalise(train: torch.Tensor, *others: torch.Tensor) -> tuple[list[torch.Tensor], dict]:
    """Per-channel standardisation with statistics of the training split only."""
    dims = [0] + list(range(2, train.dim()))
    mean = train.mean(dim=dims, keepdim=True)
    std = train.std(dim=dims, keepdim=True).clamp_min(1e-6)
    stats = {"mean": mean.flatten().tolist(), "std": std.flatten().tolist()}
    return [(t - mean) / std for t in (train, *others)], stats


def _from_images(images: torch.Tensor, labels: torch.Tensor, test_images: torch.Tensor,
                 test_labels: torch.Tensor, *, name: str, num_classes: int, val_fraction: float,
                 seed: int, train_subset: int | None, size: int | None, flip: bool) -> TaskData:
    """uint8 [N, C, H, W] images -> normalised splits (val carved from train), optional resize."""
    if size is not None and size != images.shape[-1]:
        images = F.interpolate(images.float(), size=(size, size), mode="area")
        test_images = F.interpolate(test_images.float(), size=(size, size), mode="area")
    images, test_images = images.float() / 255.0, test_images.float() / 255.0  # uint8 scale, resized or not
    train_idx, val_idx = _split_indices(images.shape[0], (1 - val_fraction, val_fraction), seed)
    if train_subset is not None:
        if train_subset > len(train_idx):
            raise DatasetError(f"{name}: train_subset={train_subset} but only {len(train_idx)} training images")
        train_idx = train_idx[:train_subset]
    (xtr, xva, xte), stats = _normalise(images[train_idx], images[val_idx], test_images)
    labels, test_labels = labels.long(), test_labels.long()
    pad = max(1, images.shape[-1] // 8)
    return TaskData(name, num_classes, (xtr, labels[train_idx]), (xva, labels[val_idx]), (xte, test_labels),
                    crop_padding=pad, flip=flip, info={"normalisation": stats, "seed": seed})


# ----------------------------------------------------------------------------- loaders
DIGITS_OPTIONS = ("seed", "val_fraction", "train_subset")  # what the embedded digits dataset takes


def load_digits(seed: int = 0, val_fraction: float | None = None, train_subset: int | None = None) -> TaskData:
    """scikit-learn's digits: 8x8 grayscale, values 0..16; a seeded 60/20/20 split. The test split
    is fixed (20%); ``val_fraction`` is the share of the other 80% held out for validation (default
    0.25: the 60/20 split), ``train_subset`` keeps the first that many training images."""
    from sklearn.datasets import load_digits as sk_digits

    raw = sk_digits()
    x = torch.tensor(raw.images, dtype=torch.float32).unsqueeze(1) / 16.0
    y = torch.tensor(raw.target, dtype=torch.int64)
    n = x.shape[0]
    tr, va, te = _split_indices(n, (0.6, 0.2, 0.2), seed)
    if val_fraction is not None:  # the same permutation and test split, the rest re-divided
        rest = torch.cat([tr, va])
        n_val = int(round(val_fraction * len(rest)))
        if not 0 < n_val < len(rest):
            raise DatasetError(f"digits: val_fraction={val_fraction} leaves no training or no validation images")
        tr, va = rest[:len(rest) - n_val], rest[len(rest) - n_val:]
    if train_subset is not None:
        if train_subset > len(tr):
            raise DatasetError(f"digits: train_subset={train_subset} but only {len(tr)} training images")
        tr = tr[:train_subset]
    (xtr, xva, xte), stats = _normalise(x[tr], x[va], x[te])
    return TaskData("digits", 10, (xtr, y[tr]), (xva, y[va]), (xte, y[te]), crop_padding=0, flip=False,
                    info={"normalisation": stats, "seed": seed})


def _require(path: str, what: str) -> None:
    if not os.path.exists(path):
        raise DatasetError(f"{what}: expected {path} (download is disabled: put the dataset there "
                           "in its standard on-disk format)")


class _ArraysOnly(pickle.Unpickler):
    """CIFAR's python batches are pickles: this unpickler builds what they hold (dicts, lists,
    bytes, numbers and numpy arrays) and refuses any other global, so a crafted file under a
    dataset root cannot run code when it is read (plain ``pickle.load`` would run it)."""

    ALLOWED = {("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
               ("numpy", "ndarray"), ("numpy", "dtype"), ("numpy.core.multiarray", "scalar"),
               ("numpy._core.multiarray", "scalar"), ("_codecs", "encode")}

    def find_class(self, module: str, name: str):
        if (module, name) not in self.ALLOWED:
            raise pickle.UnpicklingError(f"refusing to unpickle {module}.{name}: a CIFAR batch holds only arrays "
                                         "and lists")
        return super().find_class(module, name)


def _read_batch(path: str) -> dict:
    with open(path, "rb") as f:
        loaded = _ArraysOnly(f, encoding="latin1").load()
    if not isinstance(loaded, dict):
        raise ValueError(f"a {type(loaded).__name__}, not a dict")
    return loaded


CIFAR_FILES = {  # (folder, training batches, test batches, label key), as the datasets ship them
    "cifar10": ("cifar-10-batches-py", [f"data_batch_{i}" for i in range(1, 6)], ["test_batch"], "labels"),
    "cifar100": ("cifar-100-python", ["train"], ["test"], "fine_labels"),
}


def _read_cifar(root: str, name: str) -> tuple[tuple[np.ndarray, list], tuple[np.ndarray, list]]:
    """(images uint8 [N, 32, 32, 3], labels) of the training and test batches under ``root``."""
    folder_name, train_files, test_files, key = CIFAR_FILES[name]
    folder = os.path.join(root, folder_name)
    for fname in train_files + test_files:
        _require(os.path.join(folder, fname), name)
    splits = []
    for files in (train_files, test_files):
        data, labels = [], []
        for fname in files:
            path = os.path.join(folder, fname)
            try:
                batch = _read_batch(path)
                data.append(np.asarray(batch["data"], dtype=np.uint8).reshape(-1, 3, 32, 32))
                labels.extend(int(v) for v in batch[key])
            except Exception as err:  # unpickling, a missing key, a wrong shape: say which file
                raise DatasetError(f"{name}: {path} is malformed ({type(err).__name__}: "
                                   f"{' '.join(str(err).split())[:200]})") from None
        splits.append((np.concatenate(data).transpose(0, 2, 3, 1), labels))
    return splits[0], splits[1]


def load_cifar(root: str, *, hundred: bool = False, seed: int = 0, val_fraction: float = 0.1,
               train_subset: int | None = None, size: int | None = None) -> TaskData:
    """CIFAR-10/100 from ``root/cifar-10-batches-py`` (or ``cifar-100-python``)."""
    (train_x, train_y), (test_x, test_y) = _read_cifar(root, "cifar100" if hundred else "cifar10")
    to_tensor = lambda d: torch.from_numpy(np.ascontiguousarray(d)).permute(0, 3, 1, 2)  # noqa: E731
    return _from_images(to_tensor(train_x), torch.tensor(train_y), to_tensor(test_x), torch.tensor(test_y),
                        name="cifar100" if hundred else "cifar10", num_classes=100 if hundred else 10,
                        val_fraction=val_fraction, seed=seed, train_subset=train_subset, size=size, flip=True)


def load_svhn(root: str, *, seed: int = 0, val_fraction: float = 0.1, train_subset: int | None = None,
              size: int | None = None) -> TaskData:
    """SVHN from ``root/train_32x32.mat`` and ``root/test_32x32.mat`` (no flips: digits)."""
    from torchvision.datasets import SVHN

    class LocalSVHN(SVHN):
        def _check_integrity(self) -> bool:
            return True

    for split in ("train", "test"):
        _require(os.path.join(root, SVHN.split_list[split][1]), "svhn")
    try:
        train, test = LocalSVHN(root, "train", download=False), LocalSVHN(root, "test", download=False)
    except Exception as err:
        raise DatasetError(f"svhn: files under {root} are malformed ({type(err).__name__}: {err})") from None
    return _from_images(torch.from_numpy(train.data), torch.from_numpy(train.labels), torch.from_numpy(test.data),
                        torch.from_numpy(test.labels), name="svhn", num_classes=10, val_fraction=val_fraction,
                        seed=seed, train_subset=train_subset, size=size, flip=False)


def load_imagefolder(root: str, *, seed: int = 0, val_fraction: float = 0.1, train_subset: int | None = None,
                     size: int | None = None, test_subset: int | None = None) -> TaskData:
    """``root/train/<class>/*`` and ``root/test/<class>/*`` read with torchvision's ImageFolder,
    decoded once (resized to ``size`` if given) into memory; a progress bar shows the decoding."""
    from torchvision.datasets import ImageFolder

    splits = {}
    for split in ("train", "test"):
        path = os.path.join(root, split)
        _require(path, "imagefolder")
        try:
            splits[split] = ImageFolder(path)
        except (FileNotFoundError, RuntimeError) as err:
            raise DatasetError(f"imagefolder: {path}: {err}") from None
    if splits["train"].classes != splits["test"].classes:
        raise DatasetError(f"imagefolder: {root}/train and {root}/test have different classes")
    gen = torch.Generator().manual_seed(seed)

    def decode(ds, subset):
        idx = torch.randperm(len(ds), generator=gen)[:subset] if subset else torch.arange(len(ds))
        images, labels = [], []
        for i in progress(idx.tolist(), desc=f"decoding {os.path.basename(ds.root)}", unit="img", leave=False,
                          disable=len(idx) < 2000):
            path, label = ds.samples[i]
            img = ds.loader(path).convert("RGB")
            if size is not None:
                img = img.resize((size, size), resample=4)  # PIL BOX filter: area averaging
            images.append(torch.from_numpy(np.asarray(img, dtype=np.uint8).copy()).permute(2, 0, 1))
            labels.append(label)
        shapes = {tuple(t.shape) for t in images}
        if len(shapes) != 1:
            raise DatasetError(f"imagefolder: images under {ds.root} have different sizes {sorted(shapes)[:3]}; "
                               "pass size= to resize them")
        return torch.stack(images), torch.tensor(labels)

    # decode enough training images for the subset plus the validation share
    need = None if train_subset is None else int(np.ceil(train_subset / (1 - val_fraction))) + 1
    xtr, ytr = decode(splits["train"], need)
    xte, yte = decode(splits["test"], test_subset)
    data = _from_images(xtr, ytr, xte, yte, name=f"imagefolder:{os.path.basename(os.path.normpath(root))}",
                        num_classes=len(splits["train"].classes), val_fraction=val_fraction, seed=seed,
                        train_subset=train_subset, size=None, flip=True)
    data.info["classes"] = splits["train"].classes
    return data


def load_dataset(name: str, root: str | None = None, **options) -> TaskData:
    """One entry point for every dataset; ``root`` is required for all but digits."""
    if name == "digits":
        unused = sorted(k for k, v in {**options, "root": root}.items() if v is not None and k not in DIGITS_OPTIONS)
        if unused:
            raise DatasetError(f"digits: {', '.join(unused)} does not apply to the embedded digits dataset "
                               f"(it takes {', '.join(DIGITS_OPTIONS)}); remove it")
        return load_digits(**{k: options[k] for k in DIGITS_OPTIONS if options.get(k) is not None})
    if name not in DATASETS:
        raise DatasetError(f"unknown dataset {name!r}; known: {', '.join(DATASETS)}")
    if not root:
        raise DatasetError(f"{name}: a local root folder is required (nothing is downloaded)")
    if name in ("cifar10", "cifar100"):
        return load_cifar(root, hundred=name == "cifar100", **options)
    if name == "svhn":
        return load_svhn(root, **options)
    return load_imagefolder(root, **options)


def load_from_config(cfg: dict, root: str | None = None) -> TaskData:
    """The dataset a zoo spec's ``dataset`` section describes (``root`` overrides its folder)."""
    options = {k: v for k, v in cfg.items() if k not in ("name", "root")}
    return load_dataset(cfg["name"], root or cfg.get("root"), **options)
