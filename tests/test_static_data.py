"""Static image data: the embedded digits, CIFAR in both on-disk layouts, ImageNet folders, recipe transforms."""

from __future__ import annotations

import pickle

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import DATA, require
from spikingformer.config import DataSection, load_config
from spikingformer.data import build_dataset
from spikingformer.data.static import digits_split


def test_digits_split_is_fixed_and_stratified():
    x_tr, y_tr, x_te, y_te = digits_split()
    assert (len(y_tr), len(y_te)) == (1437, 360)
    assert x_tr.shape[1:] == (8, 8) and x_tr.max() == 16
    assert np.bincount(y_te).min() >= 35  # ~36 per class
    x2 = digits_split()[2]
    assert np.array_equal(x_te, x2)


def test_digits_dataset_normalised_and_resized():
    train = build_dataset(DataSection(dataset="digits"), img_size=16, train=True)
    test = build_dataset(DataSection(dataset="digits"), img_size=16, train=False)
    assert (len(train), len(test), train.num_classes) == (1437, 360, 10)
    x, y = test[0]
    assert x.shape == (1, 16, 16) and isinstance(y, int)
    stacked = train.images
    assert abs(float(stacked.mean())) < 0.05 and abs(float(stacked.std()) - 1) < 0.1
    jittered = build_dataset(DataSection(dataset="digits", augment=True), img_size=16, train=True)
    torch.manual_seed(0)
    assert not torch.equal(jittered[0][0], train[0][0])


def write_cifar_pickles(root, n=20):
    folder = root / "cifar-10-batches-py"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        batch = {"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8), "labels": [int(v) for v in rng.integers(0, 10, n)]}
        with open(folder / name, "wb") as f:
            pickle.dump(batch, f)
    with open(folder / "batches.meta", "wb") as f:
        pickle.dump({"label_names": [c for c in "airplane automobile bird cat deer dog frog horse ship truck".split()]}, f)
    return batch


def test_cifar_pickle_layout(tmp_path, monkeypatch):
    import torchvision.datasets.cifar

    last = write_cifar_pickles(tmp_path)
    monkeypatch.setattr(torchvision.datasets.cifar, "check_integrity", lambda *args: True)  # no md5 of the originals
    cfg = load_config("cifar10", {"data_dir": str(tmp_path)}).data
    test = build_dataset(cfg, 32, train=False)
    assert len(test) == 20 and test.num_classes == 10 and test.classes[0] == "airplane"
    x, y = test[3]
    assert x.shape == (3, 32, 32) and y == last["labels"][3]
    # eval transform: ToTensor + the CIFAR constants of the recipe
    raw = torch.from_numpy(last["data"][3].reshape(3, 32, 32)).float() / 255
    mean, std = torch.tensor(cfg.mean).view(3, 1, 1), torch.tensor(cfg.std).view(3, 1, 1)
    torch.testing.assert_close(x, (raw - mean) / std, atol=1e-5, rtol=0)
    train = build_dataset(cfg, 32, train=True)
    assert len(train) == 100 and train[0][0].shape == (3, 32, 32)


def test_cifar_folder_layout_on_the_real_copy():
    root = require(DATA / "cifar10")
    cfg = DataSection(dataset="cifar10", data_dir=str(root), mean=[0.4914, 0.4822, 0.4465], std=[0.2470, 0.2435, 0.2616])
    test = build_dataset(cfg, 32, train=False)
    assert len(test) == 10_000 and test.classes[-1] == "truck"
    x, y = test[9_999]
    assert x.shape == (3, 32, 32) and y == 9
    image = Image.open(root / "test" / "truck" / "0999.jpg")
    expected = (torch.from_numpy(np.asarray(image, dtype=np.float32) / 255).permute(2, 0, 1) - torch.tensor(cfg.mean).view(3, 1, 1)) / torch.tensor(cfg.std).view(3, 1, 1)
    torch.testing.assert_close(x, expected, atol=1e-5, rtol=0)


def test_imagenet_folders_and_missing_roots(tmp_path):
    for split in ("train", "val"):
        for wnid in ("n01440764", "n01443537"):
            (tmp_path / split / wnid).mkdir(parents=True)
            Image.fromarray(np.full((300, 400, 3), 128, np.uint8)).save(tmp_path / split / wnid / "a.JPEG")
    cfg = load_config("imagenet", {"data_dir": str(tmp_path)}).data
    val = build_dataset(cfg, 224, train=False)
    assert val.classes == ["n01440764", "n01443537"] and val[1][0].shape == (3, 224, 224) and val[1][1] == 1
    assert build_dataset(cfg, 224, train=True)[0][0].shape == (3, 224, 224)
    with pytest.raises(FileNotFoundError, match=r"ImageNet not found under .*train/<wnid>/\*.JPEG"):
        build_dataset(DataSection(dataset="imagenet", data_dir=str(tmp_path / "x")), 224, train=True)
    with pytest.raises(ValueError, match="unknown dataset 'mnist'; valid datasets: digits"):
        build_dataset(DataSection(dataset="mnist"), 32, train=True)
