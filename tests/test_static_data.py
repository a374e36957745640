"""Static image data: the embedded digits, CIFAR in both on-disk layouts, ImageNet folders, recipe transforms."""

from __future__ import annotations

import pickle
import random
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision.transforms.functional import pil_to_tensor

import spikingformer as sf
from conftest import DATA, require, write_cifar_folders
from spikingformer.config import DataSection, load_config
from spikingformer.data import build_dataset, check_batch
from spikingformer.data.static import ImageFolder, UnreadableImageWarning, digits_split
from spikingformer.engine.distributed import Runtime
from spikingformer.engine.trainer import evaluate, make_loader
from spikingformer.models import NonFiniteInputError


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


def test_digits_augmentation_jitters_the_images():
    train = build_dataset(DataSection(dataset="digits"), img_size=16, train=True)
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


def test_damaged_cifar_pickles_name_each_file_and_download_is_not_offered(tmp_path):
    # torchvision says "Dataset not found or corrupted. You can use download=True": nothing downloads here
    write_cifar_pickles(tmp_path)  # synthetic batches: every MD5 differs from the originals'
    (tmp_path / "cifar-10-batches-py" / "data_batch_5").unlink()
    with pytest.raises(ValueError) as err:
        build_dataset(DataSection(dataset="cifar10", data_dir=str(tmp_path)), 32, train=False)
    assert str(err.value) == (
        f"cifar10 in {tmp_path / 'cifar-10-batches-py'} is incomplete or damaged: data_batch_1 damaged (its MD5 "
        "differs), data_batch_2 damaged (its MD5 differs), data_batch_3 damaged (its MD5 differs), data_batch_4 "
        "damaged (its MD5 differs), data_batch_5 missing, test_batch damaged (its MD5 differs), batches.meta damaged "
        "(its MD5 differs); unpack cifar-10-python.tar.gz there again (nothing is downloaded)")


@pytest.mark.parametrize("layout, said", [
    (["train/cat", "test/cat"], "{root}/train: Found no valid file for the classes cat."),
    (["train", "test"], "{root}/train: Couldn't find any class folder in {root}/train."),
])
def test_an_image_folder_without_images_names_the_folder(tmp_path, layout, said):
    for folder in layout:
        (tmp_path / folder).mkdir(parents=True)
    with pytest.raises(FileNotFoundError) as err:
        build_dataset(DataSection(dataset="cifar10", data_dir=str(tmp_path)), 32, train=True)
    assert str(err.value).startswith(said.format(root=tmp_path))


def test_hidden_files_and_folders_in_an_image_folder_are_left_out(tmp_path, recwarn):
    # what Jupyter and macOS leave in a data folder: a hidden folder would be class 0 and shift every
    # label; an AppleDouble "._NAME.png" is no image (one warning per file, every epoch)
    for split in ("train", "test"):
        for c, name in enumerate(("cat", "dog")):
            folder = tmp_path / split / name
            (folder / ".ipynb_checkpoints").mkdir(parents=True)
            Image.fromarray(np.full((32, 32, 3), 40 * c, np.uint8)).save(folder / "a.png")
            Image.fromarray(np.full((32, 32, 3), 40 * c, np.uint8)).save(folder / ".ipynb_checkpoints" / "b.png")
            (folder / "._a.png").write_bytes(b"\x00\x05\x16\x07 Mac OS X metadata")
        (tmp_path / split / ".ipynb_checkpoints").mkdir()
        Image.fromarray(np.zeros((32, 32, 3), np.uint8)).save(tmp_path / split / ".ipynb_checkpoints" / "c.png")
    ds = ImageFolder(str(tmp_path / "train"))
    assert ds.classes == ["cat", "dog"] and ds.class_to_idx == {"cat": 0, "dog": 1}
    assert [(Path(p).relative_to(tmp_path).as_posix(), y) for p, y in ds.samples] == [("train/cat/a.png", 0), ("train/dog/a.png", 1)]
    assert [ds[i][1] for i in range(len(ds))] == [0, 1] and len(recwarn) == 0
    hidden_root = tmp_path / ".cache" / "data"  # a data folder may itself lie under a hidden folder
    shutil.copytree(tmp_path / "train", hidden_root / "train")
    assert len(ImageFolder(str(hidden_root / "train"))) == 2


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


def test_imagenet_folders(tmp_path):
    for split in ("train", "val"):
        for wnid in ("n01440764", "n01443537"):
            (tmp_path / split / wnid).mkdir(parents=True)
            Image.fromarray(np.full((300, 400, 3), 128, np.uint8)).save(tmp_path / split / wnid / "a.JPEG")
    cfg = load_config("imagenet", {"data_dir": str(tmp_path)}).data
    val = build_dataset(cfg, 224, train=False)
    assert val.classes == ["n01440764", "n01443537"] and val[1][0].shape == (3, 224, 224) and val[1][1] == 1
    assert build_dataset(cfg, 224, train=True)[0][0].shape == (3, 224, 224)


def test_missing_imagenet_root_names_the_layout(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"ImageNet not found under .*train/<wnid>/\*.JPEG"):
        build_dataset(DataSection(dataset="imagenet", data_dir=str(tmp_path / "x")), 224, train=True)


def test_unknown_dataset_lists_the_valid_ones():
    with pytest.raises(ValueError, match=r"unknown dataset 'mnist'; did you mean 'nmnist'\? valid datasets .*: cifar10, .*digits"):
        build_dataset(DataSection(dataset="mnist"), 32, train=True)


# a tiny CIFAR-10 run of the command: one block of width 16, T = 1, one epoch of 5 batches
TINY_CIFAR_RUN = ["--config", "cifar10", "--model-args", "{embed_dim: 16, num_heads: 2, time_steps: 1, depth: 1}",
                  "--epochs", "1", "--cooldown-epochs", "0", "--warmup-epochs", "0", "--batch-size", "4",
                  "--eval-batch-size", "8", "--tensorboard", "false"]


def test_unreadable_files_in_an_image_folder_are_named_and_skipped(tmp_path):
    write_cifar_folders(tmp_path)
    text = tmp_path / "test" / "cat" / "notes.png"
    text.write_text("this is not an image")
    good = tmp_path / "test" / "dog" / "0.png"
    cut = tmp_path / "test" / "dog" / "cut.png"
    cut.write_bytes(good.read_bytes()[:60])  # a PNG cut after its header
    cfg = load_config("cifar10", {"data_dir": str(tmp_path)}).data
    test = build_dataset(cfg, 32, train=False)
    assert len(test) == 22
    runtime = Runtime(device=torch.device("cpu"))
    loader = make_loader(test, 4, False, runtime, 0, 0)
    with pytest.warns(UnreadableImageWarning) as caught:
        sizes = [len(target) for _, target in loader]
    messages = sorted(str(w.message) for w in caught)
    assert len(messages) == 2
    assert messages[0].startswith(f"skipping {text}: not a readable image (UnidentifiedImageError")
    assert messages[1].startswith(f"skipping {cut}: not a readable image")
    assert sum(sizes) == 20
    model = sf.create_model("spikingformer_cifar10_4_256", embed_dim=32, depth=1, num_heads=2, time_steps=1)
    with pytest.warns(UnreadableImageWarning):
        assert evaluate(model, loader, runtime, None)["samples"] == 20


@pytest.mark.parametrize("workers", [0, 2])
def test_training_on_a_folder_with_an_unreadable_image_warns_on_its_own_line(tmp_path, workers):
    """The command trains on (a batch left at an odd size trains its last image unmixed:
    :func:`test_a_batch_left_at_an_odd_size_trains_its_last_image_unmixed`) and names the file in
    one line of its own beside the progress bar, also from a worker."""
    write_cifar_folders(tmp_path / "cifar")
    broken = tmp_path / "cifar" / "train" / "cat" / "notes.png"
    broken.write_text("this is not an image")
    run = subprocess.run([sys.executable, "-m", "spikingformer", "train", *TINY_CIFAR_RUN, "--data-dir", str(tmp_path / "cifar"),
                          "--output", str(tmp_path / "runs"), "--workers", str(workers)],
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    said = [line for line in run.stderr.split("\n") if str(broken) in line]
    assert said and said[0].startswith(f"skipping {broken}: not a readable image (UnidentifiedImageError"), run.stderr
    assert "checkpoint:" in run.stdout


def _mixup(**kwargs):
    from timm.data import Mixup

    return Mixup(num_classes=4, label_smoothing=0.1, **kwargs)


@pytest.mark.parametrize("kind", [dict(mixup_alpha=0.8), dict(mixup_alpha=0.0, cutmix_alpha=1.0)])
def test_a_batch_left_at_an_odd_size_trains_its_last_image_unmixed(kind):
    """timm's Mixup pairs image i with image n-1-i and refuses an odd batch, which an unreadable image
    leaves: the pairs are mixed and the last image trains as Mixup trains an image it does not mix,
    its target one-hot with label smoothing 0.1 over 4 classes (0.925 and 0.025 each, by hand)."""
    from spikingformer.engine.trainer import mix_batch

    images = torch.arange(5 * 3 * 4 * 4, dtype=torch.float32).view(5, 3, 4, 4)
    target = torch.tensor([0, 1, 2, 3, 1])
    mixed, soft = mix_batch(_mixup(**kind), images.clone(), target)
    assert mixed.shape == images.shape and soft.shape == (5, 4)
    assert torch.equal(mixed[4], images[4])
    assert torch.equal(soft[4], torch.tensor([0.025, 0.925, 0.025, 0.025]))
    # the first four as a mix of each image i with image 3 - i, by the weight their targets carry
    lam = (soft[0, 0] - 0.025) / 0.9  # image 0's class 0 is not image 3's class
    head = images[:4]
    if not kind.get("cutmix_alpha"):
        torch.testing.assert_close(mixed[:4], lam * head + (1 - lam) * head.flip(0), rtol=1e-5, atol=1e-4)
    else:  # CutMix: each pixel is the image's own or its partner's, the partner's on a 1 - lam share
        own = (mixed[:4] == head).all(1)
        assert ((mixed[:4] == head) | (mixed[:4] == head.flip(0))).all()
        assert own.float().mean().item() == pytest.approx(float(lam), abs=1e-5)
    torch.testing.assert_close(soft[:4].sum(1), torch.ones(4))


def test_a_batch_of_one_image_trains_it_unmixed():
    from spikingformer.engine.trainer import mix_batch

    images = torch.rand(1, 3, 4, 4)
    mixed, soft = mix_batch(_mixup(mixup_alpha=0.8), images, torch.tensor([2]))
    assert torch.equal(mixed, images)
    assert torch.equal(soft, torch.tensor([[0.025, 0.025, 0.925, 0.025]]))


def _recipe_transform(aa: str):
    from spikingformer.data.static import image_transform

    return image_transform(load_config("cifar10").data.__class__(aa=aa), 32, True, (0.5,) * 3, (0.5,) * 3)


def _rgb(seed: int = 0) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (32, 32, 3), dtype=np.uint8))


def test_randaugment_keeping_zero_bits_gives_a_black_image_as_pillow_before_13():
    """The CIFAR and ImageNet recipes' RandAugment (rand-m9-n1-mstd0.4-inc1) draws magnitudes around
    9 with a spread of 0.4 and asks its posterize for 4 - int(m / 10 * 4) bits: 0 bits at m = 10,
    which Pillow 13 refuses (a ValueError that stopped CIFAR training in its first epoch). 0 bits
    is the black image (Pillow before 13, TensorFlow); other bit counts are Pillow's as before."""
    from timm.data.auto_augment import AugmentOp

    from spikingformer.data.static import augment_ops

    op = next(o for o in augment_ops(_recipe_transform(load_config("cifar10").data.aa)) if o.name == "PosterizeIncreasing")
    op.prob, op.magnitude_std = 1.0, 0.0
    pixels = np.asarray(_rgb())
    op.magnitude = 10
    assert not np.asarray(op(_rgb())).any()
    op.magnitude = 5  # 4 - int(2.0) = 2 bits: the two high bits of every channel
    assert np.array_equal(np.asarray(op(_rgb())), pixels & 0b11000000)
    if int(Image.__version__.split(".")[0]) >= 13:  # what timm's own op does there
        with pytest.raises(ValueError, match="bits must be between"):
            AugmentOp("PosterizeIncreasing", prob=1.0, magnitude=10)(_rgb())


@pytest.mark.parametrize("aa", ["rand-m10-n1-inc1", "rand-m1-n2", "v0", "augmix-m5-w4-d2"])
def test_every_policys_posterize_takes_zero_bits(aa):
    """RandAugment at magnitude 10 with increasing ops, and below 2.5 without (int(m / 10 * 4) = 0
    bits), AutoAugment's v0 policy (Posterize at magnitude 0-2) and AugMix: the training transform
    runs through 300 draws (posterize among 13-15 ops each) and their posterize ops are ours."""
    from spikingformer.data.static import augment_ops, posterize

    transform = _recipe_transform(aa)
    ops = [o for o in augment_ops(transform) if "Posterize" in o.name]
    assert ops and all(o.aug_fn is posterize for o in ops)
    random.seed(0)
    for k in range(300):
        assert transform(_rgb(k)).shape == (3, 32, 32)


@pytest.mark.parametrize("recipe", ["cifar10", "cifar100", "imagenet"])
def test_every_augment_op_of_a_recipe_runs_at_its_magnitude_extremes(recipe):
    """Each op of the recipe's RandAugment, applied at magnitude 0, 5 and 10 (the policy's range;
    its magnitude spread is clipped to it), gives an image of the input's size and mode: an op that a
    new Pillow or timm release refuses at some magnitude (Pillow 13's posterize at 0 bits stopped
    CIFAR training in 2026) shows here, not hours into a run."""
    from spikingformer.data.static import augment_ops

    ops = augment_ops(_recipe_transform(load_config(recipe).data.aa))
    assert len(ops) >= 14
    image = _rgb()
    for op in ops:
        op.prob, op.magnitude_std = 1.0, 0.0
        for magnitude in (0, 5, 10):
            op.magnitude = magnitude
            out = op(image)
            assert (out.size, out.mode) == (image.size, image.mode), (op.name, magnitude)


def test_a_runs_data_folder_holds_from_any_working_folder_and_home_is_expanded(tmp_path, monkeypatch, capsys):
    """A relative --data-dir is recorded as the absolute folder it named, so the checkpoint evaluates
    from another working folder; ``~`` (a recipe's ``data_dir: ~/cifar``) is the home folder."""
    from spikingformer.checkpoints import load_checkpoint
    from spikingformer.cli import main

    write_cifar_folders(tmp_path / "home" / "cifar")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.chdir(tmp_path / "home")
    assert main(["train", *TINY_CIFAR_RUN, "--data-dir", "cifar", "--output", "runs", "--name", "r", "--workers", "0"]) == 0
    best = tmp_path / "home" / "runs" / "r" / "best.pt"
    assert load_checkpoint(best)["train_config"]["data"]["data_dir"] == str(tmp_path / "home" / "cifar")
    monkeypatch.chdir(tmp_path)
    capsys.readouterr()
    assert main(["eval", "--checkpoint", str(best)]) == 0
    assert "on cifar10 (20 images)" in capsys.readouterr().out
    assert main(["eval", "--checkpoint", str(best), "--data-dir", "~/cifar"]) == 0
    assert "on cifar10 (20 images)" in capsys.readouterr().out


def _poisoned_folder(root):
    """A class-folder tree whose image ``train/frog/1.png`` turns into NaN through its transform."""
    write_cifar_folders(root, per_class=3)
    poisoned = root / "train" / "frog" / "1.png"

    def transform(image):
        x = pil_to_tensor(image).float() / 255
        return x * float("nan") if x[0, 0, 0] == (6 * 20 + 1) / 255 else x

    return ImageFolder(str(root / "train"), transform=transform), poisoned


@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
def test_non_finite_images_stop_the_loop_naming_the_file(tmp_path, train):
    """A sample that turns into NaN stops the loop with the batch and its file named, also behind the
    shuffled, sharded training sampler."""
    data, poisoned = _poisoned_folder(tmp_path)
    loader = make_loader(data, 4, train, Runtime(device=torch.device("cpu")), 0, seed=3)
    if train:
        loader.sampler.set_epoch(1)
    with pytest.raises(NonFiniteInputError) as err:
        for step, (images, _) in enumerate(loader):
            check_batch(images, loader, step)
    bad_row = int((~torch.isfinite(images)).flatten(1).any(1).nonzero())
    assert str(err.value).startswith(
        f"batch {step} (from 0) of the data holds NaN or infinite values (samples {bad_row}: {poisoned} of the batch)")


def test_evaluation_stops_at_a_non_finite_image_naming_the_file(tmp_path):
    data, poisoned = _poisoned_folder(tmp_path)
    runtime = Runtime(device=torch.device("cpu"))
    model = sf.create_model("spikingformer_cifar10_4_256", embed_dim=32, depth=1, num_heads=2, time_steps=1)
    with pytest.raises(NonFiniteInputError, match=f"{poisoned} of the batch"):
        evaluate(model, make_loader(data, 4, False, runtime, 0, seed=3), runtime, None)
