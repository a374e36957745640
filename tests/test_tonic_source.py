"""tonic's events and data sets as a source for this project's frames (data/tonic_source.py).

The first tests need no tonic: they feed hand-made arrays of tonic's layout. The others compare
tonic's own readers and frame integration with ours on the shared real recordings, and skip
without tonic (``pip install 'spikingformer[tonic]'``) or without the data.
"""

from __future__ import annotations

import re
import warnings

import numpy as np
import pytest
import torch

from conftest import DATA, require
from spikingformer import checkpoints
from spikingformer.cli import main
from spikingformer.config import DataSection
from spikingformer.data import build_dataset
from spikingformer.data.event_datasets import NMNIST
from spikingformer.data.event_files import read_aedat2, read_nmnist
from spikingformer.data.frames import integrate_frames
from spikingformer.data.tonic_source import TonicFrames, events_from_tonic
from spikingformer.engine import evaluation, trainer

TONIC_DTYPE = np.dtype([("x", np.int16), ("y", np.int16), ("t", np.int64), ("p", bool)])  # tonic.io.events_struct


def _tonic_events(x, y, t, p, dtype=TONIC_DTYPE) -> np.ndarray:
    ev = np.empty(len(x), dtype=dtype)
    ev["x"], ev["y"], ev["t"], ev["p"] = x, y, t, p
    return ev


def test_events_from_tonic_fields_and_polarity():
    ev = events_from_tonic(_tonic_events([3, 0], [1, 2], [10, 25], [True, False]))
    assert ev["x"].tolist() == [3, 0] and ev["y"].tolist() == [1, 2]
    assert ev["t"].tolist() == [10, 25] and ev["p"].tolist() == [1, 0]


def test_events_from_tonic_other_field_order_seconds_and_signed_polarity():
    seconds = np.dtype([("t", np.float64), ("p", np.int8), ("y", int), ("x", int)])  # another order, OFF = -1
    ev = events_from_tonic(_tonic_events([1, 1], [0, 0], [0.5, 1.25e-6], [-1, 1], seconds), time_unit_us=1e6)
    assert ev["t"].tolist() == [500000, 1] and ev["p"].tolist() == [0, 1]


def test_events_from_tonic_without_polarity_names_the_field():
    with pytest.raises(ValueError, match="missing p"):
        events_from_tonic(np.zeros(2, dtype=[("x", int), ("y", int), ("t", int)]))


class _ListDataset:
    """The shape of a tonic data set: (events, target) items, sensor_size (W, H, P), classes."""

    def __init__(self, items, sensor_size, classes=("a", "b", "c")):
        self.items, self.sensor_size, self.classes = items, sensor_size, classes

    def __len__(self):
        return len(self.items)

    def __getitem__(self, i):
        return self.items[i]


def test_tonic_frames_axes_padding_and_targets():
    # a 5-wide, 3-high sensor: tonic's sensor_size is (width, height, polarities)
    ev = _tonic_events([4, 0, 2], [2, 0, 1], [0, 1, 2], [True, False, True])
    frames = TonicFrames(_ListDataset([(ev, 2)], (5, 3, 2)), time_steps=3)
    x, target = frames[0]
    assert x.shape == (3, 2, 3, 5) and x.dtype == torch.float32 and target == 2 and frames.num_classes == 3
    expected = torch.zeros(3, 2, 3, 5)
    expected[0, 1, 2, 4] = expected[1, 0, 0, 0] = expected[2, 1, 1, 2] = 1  # frame j, polarity, row y, column x
    torch.testing.assert_close(x, expected, rtol=0, atol=0)
    padded, _ = TonicFrames(_ListDataset([(ev, 0)], (5, 3, 2)), time_steps=3, pad_to=7)[0]
    assert padded.shape == (3, 2, 7, 7)
    torch.testing.assert_close(padded[:, :, 2:5, 1:6], expected, rtol=0, atol=0)  # centred: 2 rows, 1 column before
    assert padded.sum() == 3
    with pytest.raises(ValueError, match=r"sensor_size \(width, height, 2\)"):
        TonicFrames(_ListDataset([], (5, 3, 1)), time_steps=3)
    with pytest.raises(ValueError, match="pad_to must be >= the sensor's 3x5"):
        TonicFrames(_ListDataset([], (5, 3, 2)), time_steps=3, pad_to=4)


# ------------------------------------------------------------------------------------------------
# tonic itself, on real recordings

NMNIST_SMALL = DATA / "nmnist-small"
DVS128 = DATA / "dvs128-aedat2"


def _test_list() -> list[tuple[str, int]]:
    lines = (require(NMNIST_SMALL) / "test100.txt").read_text().splitlines()
    return [(a, int(b)) for a, b in (line.split() for line in lines if line.strip() and not line.startswith("#"))]


def _last_frame_difference(events: np.ndarray, T: int, split_by: str, h: int, w: int) -> np.ndarray:
    """The events ours puts into the last frame and tonic's ToFrame drops (docs/data.md), counted by hand."""
    n = events.size
    if split_by == "number":
        dropped = events[T * (n // T):]
    else:
        t0, t1 = int(events["t"][0]), int(events["t"][-1])
        dropped = events[events["t"] >= t0 + T * ((t1 - t0) // T)]
    out = np.zeros((2, h, w))
    np.add.at(out, (dropped["p"].astype(int), dropped["y"], dropped["x"]), 1)
    return out


@pytest.mark.parametrize("split_by", ["number", "time"])
def test_nmnist_tonic_decoding_and_frames_match_ours(split_by):
    tonic = pytest.importorskip("tonic")
    T = 8
    to_frame = tonic.transforms.ToFrame(sensor_size=tonic.datasets.NMNIST.sensor_size,
                                        **{"n_event_bins" if split_by == "number" else "n_time_bins": T})
    for sample, _ in _test_list():
        path = NMNIST_SMALL / f"{sample}.bs2"
        theirs = tonic.io.read_mnist_file(str(path), dtype=tonic.datasets.NMNIST.dtype)
        ours = read_nmnist(path)
        converted = events_from_tonic(theirs)
        for f in ("t", "x", "y", "p"):  # the same events, field by field
            np.testing.assert_array_equal(converted[f], ours[f], err_msg=f"{path} field {f}")
        mine = integrate_frames(ours, T, 34, 34, split_by)
        tonic_frames = to_frame(theirs)
        assert tonic_frames.shape == mine.shape == (T, 2, 34, 34)
        np.testing.assert_array_equal(tonic_frames[:-1], mine[:-1], err_msg=str(path))  # every frame but the last
        np.testing.assert_array_equal(mine[-1] - tonic_frames[-1], _last_frame_difference(ours, T, split_by, 34, 34))


class _TonicStyleNMNIST:
    """What a tonic user writes for N-MNIST files outside tonic's download layout: tonic's reader,
    tonic.datasets.NMNIST's sensor size and classes."""

    def __init__(self, tonic):
        self.tonic, self.items = tonic, _test_list()
        self.sensor_size, self.classes = tonic.datasets.NMNIST.sensor_size, tonic.datasets.NMNIST.classes

    def __len__(self):
        return len(self.items)

    def __getitem__(self, i):
        sample, label = self.items[i]
        return self.tonic.io.read_mnist_file(str(NMNIST_SMALL / f"{sample}.bs2"), dtype=self.tonic.datasets.NMNIST.dtype), label


def test_tonic_dataset_gives_the_frames_of_our_nmnist_reader(tmp_path):
    tonic = pytest.importorskip("tonic")
    theirs = TonicFrames(_TonicStyleNMNIST(tonic), time_steps=8, pad_to=48)
    ours = NMNIST(require(NMNIST_SMALL), train=False, time_steps=8, pad_to=48, cache_dir=tmp_path)
    assert len(theirs) == len(ours) == 100 and theirs.num_classes == 10
    for i in range(len(ours)):
        (a, ya), (b, yb) = theirs[i], ours[i]
        assert ya == yb
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def _tonic_nmnist_layout(save_to, splits=("Test",)) -> None:
    """tonic's N-MNIST layout under ``save_to/NMNIST``: each split's folder holds the 100 test
    recordings linked 100 times each (tonic wants 10,000 files before it reads any), beside the
    archive tonic looks for."""
    root = save_to / "NMNIST"
    root.mkdir()
    for split in splits:
        (root / f"{split.lower()}.zip").write_bytes(b"")
        for sample, label in _test_list():
            folder = root / split / str(label)
            folder.mkdir(parents=True, exist_ok=True)
            for k in range(100):
                (folder / f"{sample}_{k}.bin").symlink_to(NMNIST_SMALL / f"{sample}.bs2")


def test_recipe_dataset_tonic_nmnist(tmp_path):
    """``dataset: tonic:NMNIST`` builds tonic's own NMNIST class from files in its layout."""
    tonic = pytest.importorskip("tonic")
    _tonic_nmnist_layout(tmp_path)
    section = DataSection(dataset="tonic:NMNIST", data_dir=str(tmp_path), time_steps=8, split_by="number")
    data = build_dataset(section, img_size=48, train=False)
    assert len(data) == 10_000 and data.num_classes == 10 and isinstance(data.dataset, tonic.datasets.NMNIST)
    for i in (0, 4321, 9999):
        x, y = data[i]
        source = data.dataset.data[i]
        assert y == int(source.split("/")[-2])
        expected = torch.nn.functional.pad(torch.from_numpy(integrate_frames(read_nmnist(source), 8, 34, 34)), (7, 7, 7, 7))
        torch.testing.assert_close(x, expected, rtol=0, atol=0)
    with pytest.raises(FileNotFoundError, match="not in tonic's layout under .*put them there first"):
        build_dataset(DataSection(dataset="tonic:NMNIST", data_dir=str(tmp_path / "empty")), img_size=48, train=True)
    with pytest.raises(ValueError, match="tonic has no data set 'NoSuchSet'"):
        build_dataset(DataSection(dataset="tonic:NoSuchSet", data_dir=str(tmp_path)), img_size=48, train=False)


def test_train_command_on_tonic_nmnist(tmp_path, monkeypatch, capsys):
    """``spikingformer train --config nmnist --dataset tonic:NMNIST --data-dir DIR`` (docs/data.md)
    trains on tonic's own NMNIST class reading the real recordings, and ends as every run does. Each
    split is cut to 100 of its 10,000 linked files, spread over the digits (an epoch of all of them
    would take minutes). ``spikingformer eval`` then reads the data set the checkpoint records."""
    tonic = pytest.importorskip("tonic")
    _tonic_nmnist_layout(tmp_path, ("Train", "Test"))
    build = trainer.build_dataset

    def cut_to_100(section, img_size, train):
        data = build(section, img_size, train)
        assert isinstance(data.dataset, tonic.datasets.NMNIST)
        data.dataset.data, data.dataset.targets = data.dataset.data[::100], data.dataset.targets[::100]
        return data

    monkeypatch.setattr(trainer, "build_dataset", cut_to_100)
    monkeypatch.setattr(evaluation, "build_dataset", cut_to_100)
    argv = ["train", "--config", "nmnist", "--dataset", "tonic:NMNIST", "--data-dir", str(tmp_path), "--epochs", "1", "--warmup-epochs", "0",
            "--output", str(tmp_path / "runs"), "--tensorboard", "false", "--workers", "0"]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "final test top-1" in out and "theoretical energy per image" in out
    checkpoint = re.search(r"^checkpoint: (\S+)", out, re.M).group(1)
    assert checkpoints.read(checkpoint).train_config["data"]["dataset"] == "tonic:NMNIST"
    # and evaluated on the data set the checkpoint records
    assert main(["eval", "--checkpoint", checkpoint]) == 0
    assert re.match(r"spikingformer_nmnist on tonic:NMNIST \(100 images\): top-1 ", capsys.readouterr().out)


def test_dvs128_aedat2_container_decoding_matches_ours():
    """tonic's AEDAT 2.0 container reader gives our timestamps, and the address bits of our x, y, p
    in jAER's DVS128 convention (x mirrored, ON = bit 0 clear); addresses with bit 15 or higher set
    (special events, outside the sensor) are the ones we drop."""
    tonic = pytest.importorskip("tonic")
    for path in sorted(require(DVS128).glob("*.aedat")):
        header = tonic.io.read_aedat_header_from_file(str(path))
        raw = tonic.io.get_aer_events_from_file(str(path), header[0], header[1])
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the count of dropped events, tested in test_events.py
            ours = read_aedat2(path)
        a = raw["address"].astype(np.int64)
        on_sensor = a < 0x8000
        a = a[on_sensor]
        np.testing.assert_array_equal(raw["timeStamp"].astype(np.int64)[on_sensor], ours["t"], err_msg=str(path))
        np.testing.assert_array_equal(127 - ((a >> 1) & 0x7F), ours["x"])
        np.testing.assert_array_equal((a >> 8) & 0x7F, ours["y"])
        np.testing.assert_array_equal(1 - (a & 1), ours["p"])


def test_tonic_read_dvs_128_has_x_and_y_swapped():
    tonic = pytest.importorskip("tonic")
    path = require(DVS128) / "neal_walking.aedat"
    try:
        _, theirs = tonic.io.read_dvs_128(str(path))
    except ValueError as err:  # tonic 1.7.0: the header reader returns 3 values, read_dvs_128 unpacks 2
        pytest.skip(f"tonic {tonic.__version__}: read_dvs_128 fails on AEDAT 2.0 files ({err}); see docs/data.md")
    ours = read_aedat2(path)
    np.testing.assert_array_equal(theirs["x"], ours["y"])  # their x holds the row bits
    np.testing.assert_array_equal(theirs["y"], 127 - ours["x"])  # their y the unmirrored column bits


def test_tonic_dataset_without_tonic_names_the_extra(monkeypatch, tmp_path):
    import sys

    monkeypatch.setitem(sys.modules, "tonic", None)  # as if tonic were not installed
    with pytest.raises(ValueError, match=r"needs the tonic package: pip install 'spikingformer\[tonic\]'"):
        build_dataset(DataSection(dataset="tonic:NMNIST", data_dir=str(tmp_path)), img_size=48, train=False)
