"""Tests of the event-camera data layer: readers, frame integration, emulator, augmentation, datasets."""

from __future__ import annotations

import gc
import math
import os
import shutil
import stat
import struct
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.utils.data import Subset

from spikingformer.data import event_datasets, sample_name
from spikingformer.data.digits_dvs import DigitsDVS
from spikingformer.data.emulator import emulate_dvs, saccade_path
from spikingformer.data.event_augment import EventAugment, apply_op
from spikingformer.data.event_datasets import CIFAR10DVS, NMNIST, DVS128Gesture
from spikingformer.data.event_files import (
    read_aedat2,
    read_aedat31,
    read_gesture_labels,
    read_nmnist,
    remap_cifar10dvs,
    split_gesture_segments,
)
from spikingformer.data.events import EventFileError, EventFileWarning, make_events
from spikingformer.data.frames import integrate_frames_by_count, integrate_frames_by_time

SHARED = Path(__file__).resolve().parents[1].parent / "shared"
DATA = SHARED / "data"
AEDAT2_DIR = DATA / "dvs128-aedat2"
NMNIST_SMALL = DATA / "nmnist-small"
FIXTURE = SHARED / "fixtures" / "frames_spikingjelly_neal_walking.npz"


def need(path: Path, what: str) -> None:
    if not path.exists():
        pytest.skip(f"{what} not available: {path} is absent (the shared data folder ../shared next to the repo "
                    f"exists only on the project's machines)")


# ----------------------------------------------------------------------------------------------------------------
# Writers of the formats, byte by byte from the format descriptions

AEDAT2_HEADER = b"#!AER-DAT2.0\r\n# This is a raw AE data file - do not edit\r\n# AEChip: DVS128\r\n"


def write_aedat2(path: Path, addresses: list[int], timestamps: list[int], header: bytes = AEDAT2_HEADER) -> None:
    body = b"".join(struct.pack(">II", a, t) for a, t in zip(addresses, timestamps))
    path.write_bytes(header + body)


AEDAT31_HEADER = b"#!AER-DAT3.1\r\n#Format: RAW\r\n#Source 1: DVS128\r\n#!END-HEADER\r\n"


def aedat31_packet(etype: int, esize: int, overflow: int, payload: bytes, number: int, valid: int,
                   capacity: int | None = None, ts_offset: int = 4) -> bytes:
    cap = number if capacity is None else capacity
    return struct.pack("<HHIIIIII", etype, 1, esize, ts_offset, overflow, cap, number, valid) + payload


def polarity_payload(events: list[tuple[int, int, int, int, int]]) -> bytes:
    """events: (x, y, p, valid, ts) -> uint32 data + int32 timestamp, little-endian."""
    return b"".join(struct.pack("<Ii", (x << 17) | (y << 2) | (p << 1) | v, ts) for x, y, p, v, ts in events)


def write_nmnist(path: Path, events: list[tuple[int, int, int, int]]) -> None:
    """events: (x, y, p, t) -> 5 bytes: x, y, p<<7 | t[22:16], t[15:8], t[7:0]."""
    out = bytearray()
    for x, y, p, t in events:
        out += bytes([x, y, (p << 7) | ((t >> 16) & 0x7F), (t >> 8) & 0xFF, t & 0xFF])
    path.write_bytes(bytes(out))


def to_aedat31(events: np.ndarray, per_packet: int = 1000) -> bytes:
    """Real DVS128 events -> AEDAT 3.1 polarity packets (timestamps must be < 2**31)."""
    out = bytearray(AEDAT31_HEADER)
    for s in range(0, events.size, per_packet):
        ev = events[s:s + per_packet]
        data = ((ev["x"].astype(np.uint32) << 17) | (ev["y"].astype(np.uint32) << 2)
                | (ev["p"].astype(np.uint32) << 1) | 1)
        rec = np.empty((ev.size, 2), "<u4")
        rec[:, 0] = data
        rec[:, 1] = ev["t"].astype(np.uint32)
        out += aedat31_packet(1, 8, 0, rec.tobytes(), ev.size, ev.size)
    return bytes(out)


def to_aedat2(events: np.ndarray) -> bytes:
    addr = (events["y"].astype(np.uint32) << 8) | (events["x"].astype(np.uint32) << 1) | events["p"]
    rec = np.empty((events.size, 2), ">u4")
    rec[:, 0] = addr
    rec[:, 1] = events["t"].astype(np.uint32)
    return AEDAT2_HEADER + rec.tobytes()


def synthetic_events(n: int, seed: int, t0: int = 1000) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return make_events(t0 + np.cumsum(rng.integers(0, 50, n)), rng.integers(0, 128, n), rng.integers(0, 128, n),
                       rng.integers(0, 2, n))


# ----------------------------------------------------------------------------------------------------------------
# Readers on hand-written files


def test_read_aedat2_hand_written(tmp_path: Path) -> None:
    f = tmp_path / "rec.aedat"
    # raw address = y << 8 | x_raw << 1 | bit0, with x = 127 - x_raw and ON = bit0 0 (jAER's DVS128.Extractor)
    write_aedat2(f, [0x0000070B, 0x00007F00, 0x000000FE], [100, 250, 251])
    ev = read_aedat2(f)
    assert ev["x"].tolist() == [122, 127, 0]
    assert ev["y"].tolist() == [7, 127, 0]
    assert ev["p"].tolist() == [0, 1, 1]
    assert ev["t"].tolist() == [100, 250, 251]
    rm = remap_cifar10dvs(ev)  # SpikingJelly on the raw fields: x' = 127 - y, y' = 127 - x_raw, p' = 1 - bit0
    assert rm["x"].tolist() == [120, 0, 127]
    assert rm["y"].tolist() == [122, 127, 0]
    assert rm["p"].tolist() == [0, 1, 1]
    assert rm["t"].tolist() == [100, 250, 251]


def test_aedat2_drops_sync_events_with_a_count(tmp_path: Path) -> None:
    """Bit 15 (jAER's sync/external-input flag) or higher: not a pixel, dropped and counted, never folded."""
    f = tmp_path / "sync.aedat"
    write_aedat2(f, [0x0000070B, 0x000080FF, 0x00008000, 0x00010000, 0x00007F00], [1, 2, 3, 4, 5])
    with pytest.warns(EventFileWarning, match=r"sync.aedat: dropped 3 of 5 events outside the 128x128 sensor"):
        ev = read_aedat2(f)
    assert ev["t"].tolist() == [1, 5] and ev["y"].tolist() == [7, 127]


def test_aedat2_truncated_header(tmp_path: Path) -> None:
    cut = tmp_path / "cut.aedat"
    cut.write_bytes(AEDAT2_HEADER[:40])  # ends inside the second header line
    with pytest.raises(EventFileError, match=r"cut.aedat: truncated AEDAT 2.0 file: it ends inside its '#' header"):
        read_aedat2(cut)


def test_aedat2_header_only_warns_empty(tmp_path: Path) -> None:
    empty = tmp_path / "header_only.aedat"
    empty.write_bytes(AEDAT2_HEADER)
    with pytest.warns(EventFileWarning, match="header_only.aedat: the recording holds no events"):
        assert read_aedat2(empty).size == 0


def test_aedat2_empty_file_has_no_header(tmp_path: Path) -> None:
    (tmp_path / "zero.aedat").write_bytes(b"")
    with pytest.raises(EventFileError, match="missing AEDAT 2.0 header"):
        read_aedat2(tmp_path / "zero.aedat")


def test_aedat31_drops_out_of_sensor_events_with_a_count(tmp_path: Path) -> None:
    f = tmp_path / "wide.aedat"
    payload = polarity_payload([(5, 6, 1, 1, 10), (128, 0, 1, 1, 11), (0, 4000, 0, 1, 12)])
    f.write_bytes(AEDAT31_HEADER + aedat31_packet(1, 8, 0, payload, 3, 3))
    with pytest.warns(EventFileWarning, match=r"wide.aedat: dropped 2 of 3 events outside the 128x128 sensor"):
        ev = read_aedat31(f)
    assert ev["x"].tolist() == [5] and ev["y"].tolist() == [6]


def test_aedat31_header_only_warns_empty(tmp_path: Path) -> None:
    g = tmp_path / "header_only.aedat"
    g.write_bytes(AEDAT31_HEADER)
    with pytest.warns(EventFileWarning, match="header_only.aedat: the recording holds no events"):
        assert read_aedat31(g).size == 0


def test_nmnist_drops_out_of_sensor_events_with_a_count(tmp_path: Path) -> None:
    n = tmp_path / "7.bs2"
    write_nmnist(n, [(1, 2, 1, 100), (34, 2, 1, 101), (3, 200, 0, 102)])
    with pytest.warns(EventFileWarning, match=r"7.bs2: dropped 2 of 3 events outside the 34x34 sensor"):
        assert read_nmnist(n)["t"].tolist() == [100]


def test_nmnist_empty_file_warns_empty(tmp_path: Path) -> None:
    (tmp_path / "0.bs2").write_bytes(b"")
    with pytest.warns(EventFileWarning, match="0.bs2: the recording holds no events"):
        assert read_nmnist(tmp_path / "0.bs2").size == 0


def test_read_aedat31_hand_written(tmp_path: Path) -> None:
    f = tmp_path / "user01_test.aedat"
    p1 = aedat31_packet(1, 8, 0, polarity_payload([(10, 20, 1, 1, 1000), (50, 60, 1, 0, 1001),
                                                   (127, 0, 0, 1, 1002)]), number=3, valid=2)
    p2 = aedat31_packet(2, 16, 0, bytes(range(32)), number=2, valid=2, ts_offset=12)  # special events: skipped
    p3 = aedat31_packet(1, 8, 1, polarity_payload([(3, 4, 1, 1, 5)]), number=1, valid=1)
    f.write_bytes(AEDAT31_HEADER + p1 + p2 + p3)
    ev = read_aedat31(f)
    assert ev["x"].tolist() == [10, 127, 3]
    assert ev["y"].tolist() == [20, 0, 4]
    assert ev["p"].tolist() == [1, 0, 1]
    assert ev["t"].tolist() == [1000, 1002, 2**31 + 5]


def test_read_nmnist_hand_written(tmp_path: Path) -> None:
    f = tmp_path / "00001.bin"
    f.write_bytes(bytes([3, 33, 0x81, 0x23, 0x45,    # x 3, y 33, p 1, t 0x012345 = 74565
                         0, 0, 0x00, 0x00, 0x07,     # x 0, y 0, p 0, t 7
                         33, 1, 0xFF, 0xFF, 0xFF]))  # x 33, y 1, p 1, t 0x7FFFFF = 8388607
    ev = read_nmnist(f)
    assert ev["x"].tolist() == [3, 0, 33]
    assert ev["y"].tolist() == [33, 0, 1]
    assert ev["p"].tolist() == [1, 0, 1]
    assert ev["t"].tolist() == [74565, 7, 8388607]


def test_read_nmnist_overflow_marker(tmp_path: Path) -> None:
    f = tmp_path / "ovf.bin"
    write_nmnist(f, [(1, 2, 1, 100), (0, 240, 0, 0), (4, 5, 0, 50)])  # y = 240: +8192 us from here on
    ev = read_nmnist(f)
    assert ev["t"].tolist() == [100, 8242]
    assert ev["y"].tolist() == [2, 5]


def test_gesture_labels_and_segments(tmp_path: Path) -> None:
    csv = tmp_path / "user01_led_labels.csv"
    csv.write_text("class,startTime_usec,endTime_usec\n1,100,200\n11,200,350\n")
    lab = read_gesture_labels(csv)
    assert lab["label"].tolist() == [0, 10]
    assert lab["start"].tolist() == [100, 200]
    assert lab["end"].tolist() == [200, 350]
    ev = make_events([50, 100, 150, 199, 200, 349, 350], [0] * 7, [0] * 7, [0] * 7)
    segs = split_gesture_segments(ev, lab)
    assert [s[0] for s in segs] == [0, 10]
    assert segs[0][1]["t"].tolist() == [100, 150, 199]
    assert segs[1][1]["t"].tolist() == [200, 349]


# ----------------------------------------------------------------------------------------------------------------
# Real files and the SpikingJelly fixture


def test_real_aedat2_files_decode() -> None:
    need(AEDAT2_DIR, "DVS128 AEDAT 2.0 recordings")
    files = sorted(AEDAT2_DIR.glob("*.aedat"))
    assert len(files) == 12
    with_sync = {}
    for f in files:
        data = f.read_bytes()
        words = np.frombuffer(data[_header_length(data):], ">u4")
        sync = int(np.count_nonzero(words[0::2] >> 15))  # addresses with bit 15 or higher set
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            ev = read_aedat2(f)
        if sync:
            with_sync[f.name] = sync
            assert [str(w.message) for w in caught] == [
                f"{f}: dropped {sync} of {words.size // 2} events outside the 128x128 sensor (addresses with bit 15 "
                f"or higher set: jAER sync/special events, not pixels)"]
        else:
            assert not caught
        assert ev.size == words.size // 2 - sync > 1000, f
        assert ev["x"].min() >= 0 and ev["x"].max() < 128
        assert ev["y"].min() >= 0 and ev["y"].max() < 128
        assert set(np.unique(ev["p"]).tolist()) <= {0, 1}
        assert np.all(np.diff(ev["t"]) >= 0), f
    # three recordings hold such events; the reader used to fold them into row 0
    assert with_sync == {"rotated_cam255_alex_standing_up2.aedat": 99, "rotated_cam255_neal_standing_up.aedat": 80,
                         "rotated_cam255_neal_standing_up2.aedat": 113}


def _header_length(data: bytes) -> int:
    """Bytes of the '#' header lines at the start of an AEDAT 2.0 file."""
    pos = 0
    while data[pos:pos + 1] == b"#":
        pos = data.index(b"\n", pos) + 1
    return pos


def test_real_nmnist_files_decode() -> None:
    need(NMNIST_SMALL, "N-MNIST small copy")
    files = sorted(NMNIST_SMALL.glob("*.bs2"))
    assert len(files) == 1100
    for f in files:
        ev = read_nmnist(f)
        assert ev.size == f.stat().st_size // 5
        assert ev["x"].min() >= 0 and ev["x"].max() < 34
        assert ev["y"].min() >= 0 and ev["y"].max() < 34
        assert np.all(np.diff(ev["t"]) >= 0), f


def test_spikingjelly_fixture_events_and_frames() -> None:
    need(FIXTURE, "SpikingJelly frames fixture")
    need(AEDAT2_DIR, "DVS128 AEDAT 2.0 recordings")
    ref = np.load(FIXTURE)
    ev = remap_cifar10dvs(read_aedat2(AEDAT2_DIR / "neal_walking.aedat"))
    for k in "txyp":
        np.testing.assert_array_equal(ev[k].astype(np.int64), ref[k].astype(np.int64))
    for T in (10, 16):
        frames = integrate_frames_by_count(ev, T, 128, 128)
        assert frames.dtype == np.float32 and frames.shape == (T, 2, 128, 128)
        np.testing.assert_array_equal(frames, ref[f"T{T}"])


# ----------------------------------------------------------------------------------------------------------------
# Frame integration, hand-computed


def test_integrate_by_count_hand_computed() -> None:
    # 7 events, T = 3: di = 2, slices [0,2), [2,4), [4,7)
    ev = make_events(t=[0, 1, 2, 3, 4, 5, 6], x=[0, 1, 2, 0, 0, 2, 1], y=[0, 0, 1, 1, 0, 2, 0],
                     p=[1, 0, 1, 1, 1, 0, 1])
    exp = np.zeros((3, 2, 3, 3), np.float32)
    exp[0, 1, 0, 0] = 1  # (x0, y0, p1)
    exp[0, 0, 0, 1] = 1  # (x1, y0, p0)
    exp[1, 1, 1, 2] = 1  # (x2, y1, p1)
    exp[1, 1, 1, 0] = 1  # (x0, y1, p1)
    exp[2, 1, 0, 0] = 1  # (x0, y0, p1)
    exp[2, 0, 2, 2] = 1  # (x2, y2, p0)
    exp[2, 1, 0, 1] = 1  # (x1, y0, p1)
    out = integrate_frames_by_count(ev, 3, 3, 3)
    assert out.dtype == np.float32
    np.testing.assert_array_equal(out, exp)


REPEATED = make_events(t=[0, 1, 2, 3], x=[1, 1, 1, 1], y=[0, 0, 0, 0], p=[0, 0, 0, 0])


def test_integrate_by_count_adds_repeated_events() -> None:
    out = integrate_frames_by_count(REPEATED, 2, 1, 2)  # di = 2
    assert out[:, 0, 0, 1].tolist() == [2.0, 2.0]


def test_integrate_by_count_fewer_events_than_frames() -> None:
    few = integrate_frames_by_count(REPEATED[:2], 4, 1, 2)  # N < T: di = 0, all events in the last frame
    assert few[:, 0, 0, 1].tolist() == [0.0, 0.0, 0.0, 2.0]


def test_integrate_by_count_no_events() -> None:
    empty = integrate_frames_by_count(REPEATED[:0], 3, 2, 2)
    assert empty.shape == (3, 2, 2, 2) and empty.sum() == 0


def test_integrate_by_time_hand_computed() -> None:
    # t0 = 0, t_last = 20, T = 4: dt = 5; windows [0,5), [5,10), [10,15), [15, 20] (last holds t_last)
    ev = make_events(t=[0, 4, 5, 9, 10, 14, 15, 20], x=[0, 1, 0, 1, 0, 1, 0, 1], y=[0] * 8,
                     p=[0, 1, 1, 0, 0, 0, 1, 1])
    exp = np.zeros((4, 2, 1, 2), np.float32)
    exp[0, 0, 0, 0] = 1
    exp[0, 1, 0, 1] = 1
    exp[1, 1, 0, 0] = 1
    exp[1, 0, 0, 1] = 1
    exp[2, 0, 0, 0] = 1
    exp[2, 0, 0, 1] = 1
    exp[3, 1, 0, 0] = 1
    exp[3, 1, 0, 1] = 1
    np.testing.assert_array_equal(integrate_frames_by_time(ev, 4, 1, 2), exp)


def test_integrate_by_time_remainder_in_the_last_window() -> None:
    # dt = (22 - 0) // 4 = 5: the remainder [20, 22] lands in the last window; window [5, 10) is empty
    ev2 = make_events(t=[0, 12, 17, 22], x=[0, 0, 0, 0], y=[0] * 4, p=[0] * 4)
    assert integrate_frames_by_time(ev2, 4, 1, 1)[:, 0, 0, 0].tolist() == [1.0, 0.0, 1.0, 2.0]


def test_integrate_rejects_out_of_frame_events() -> None:
    ev = make_events([0], [34], [0], [0])
    with pytest.raises(ValueError, match="out of the 34x34 frame"):
        integrate_frames_by_count(ev, 2, 34, 34)


# ----------------------------------------------------------------------------------------------------------------
# Emulator


@pytest.mark.parametrize("still", [dict(amplitude=0.0), dict(path=np.zeros((5, 2)))], ids=["zero_amplitude", "no_motion"])
def test_emulator_static_image_gives_no_events(still) -> None:
    img = np.random.default_rng(0).random((16, 16))
    assert emulate_dvs(img, **still).size == 0


def test_emulator_moving_bar_on_leading_off_trailing_edge() -> None:
    img = np.zeros((16, 32))
    img[:, 12:20] = 1.0  # bright vertical bar, edges at x = 12 (left) and x = 20 (right)
    path = np.stack([np.linspace(0.0, 3.0, 7), np.zeros(7)], axis=1)  # moves 3 px to the right
    ev = emulate_dvs(img, path=path, step_us=1000, seed=3)
    on, off = ev[ev["p"] == 1], ev[ev["p"] == 0]
    assert on.size > 0 and off.size > 0
    # leading (right) edge gets brighter: ON; trailing (left) edge gets darker: OFF
    assert set(np.unique(on["x"]).tolist()) <= {20, 21, 22}
    assert set(np.unique(off["x"]).tolist()) <= {12, 13, 14}
    assert np.all(np.diff(ev["t"]) >= 0) and ev["t"].min() >= 0 and ev["t"].max() <= 6000
    # deterministic for a seed
    again = emulate_dvs(img, path=path, step_us=1000, seed=3)
    np.testing.assert_array_equal(ev, again)


def test_saccade_path_is_closed_triangle() -> None:
    p = saccade_path(2.0, 4)
    assert p.shape == (13, 2)
    np.testing.assert_allclose(p[[0, 4, 8, 12]], [[0, 0], [1, 2], [2, 0], [0, 0]])


# ----------------------------------------------------------------------------------------------------------------
# Errors


def test_aedat2_trailing_bytes_name_the_offset(tmp_path: Path) -> None:
    f = tmp_path / "trunc.aedat"
    write_aedat2(f, [1, 2], [10, 20])
    f.write_bytes(f.read_bytes() + b"\x01\x02\x03")
    good_end = len(AEDAT2_HEADER) + 16
    with pytest.raises(EventFileError) as e:
        read_aedat2(f)
    assert "trunc.aedat" in str(e.value) and f"byte offset {good_end}" in str(e.value)


def test_aedat2_without_header_names_the_magic(tmp_path: Path) -> None:
    g = tmp_path / "nohdr.aedat"
    g.write_bytes(struct.pack(">II", 1, 2))
    with pytest.raises(EventFileError, match="#!AER-DAT2.0"):
        read_aedat2(g)


GOOD_PACKET = aedat31_packet(1, 8, 0, polarity_payload([(1, 1, 1, 1, 5)]), 1, 1)


def test_aedat31_corrupt_packet_header_names_the_offset(tmp_path: Path) -> None:
    f = tmp_path / "corrupt.aedat"
    # second packet claims 100 events of 8 bytes but carries only one
    bad = aedat31_packet(1, 8, 0, polarity_payload([(1, 1, 1, 1, 6)]), number=100, valid=100)
    f.write_bytes(AEDAT31_HEADER + GOOD_PACKET + bad)
    offset = len(AEDAT31_HEADER) + len(GOOD_PACKET)
    with pytest.raises(EventFileError) as e:
        read_aedat31(f)
    msg = str(e.value)
    assert "corrupt.aedat" in msg and f"byte offset {offset}" in msg and "corrupt AEDAT 3.1 packet header" in msg


def test_aedat31_cut_packet_names_the_offset(tmp_path: Path) -> None:
    g = tmp_path / "cut.aedat"
    g.write_bytes(AEDAT31_HEADER + GOOD_PACKET + GOOD_PACKET[:10])
    with pytest.raises(EventFileError) as e:
        read_aedat31(g)
    assert "cut.aedat" in str(e.value) and f"byte offset {len(AEDAT31_HEADER) + len(GOOD_PACKET)}" in str(e.value)


def test_aedat31_header_without_end(tmp_path: Path) -> None:
    h = tmp_path / "noend.aedat"
    h.write_bytes(b"#!AER-DAT3.1\r\n" + GOOD_PACKET)
    with pytest.raises(EventFileError, match="END-HEADER"):
        read_aedat31(h)


def test_nmnist_truncated(tmp_path: Path) -> None:
    f = tmp_path / "12.bs2"
    write_nmnist(f, [(1, 1, 1, 1), (2, 2, 0, 2)])
    f.write_bytes(f.read_bytes() + b"\x00\x01")
    with pytest.raises(EventFileError) as e:
        read_nmnist(f)
    assert "12.bs2" in str(e.value) and "byte offset 10" in str(e.value)


def test_label_file_with_a_wrong_header(tmp_path: Path) -> None:
    bad = tmp_path / "bad_labels.csv"
    bad.write_text("label,start,end\n1,0,10\n")
    with pytest.raises(EventFileError, match="bad_labels.csv.*header"):
        read_gesture_labels(bad)


def test_label_outside_the_recording(tmp_path: Path) -> None:
    csv = tmp_path / "user02_led_labels.csv"
    csv.write_text("class,startTime_usec,endTime_usec\n3,100,200\n4,5000,6000\n")
    ev = make_events([100, 150, 300], [0] * 3, [0] * 3, [0] * 3)
    with pytest.raises(EventFileError) as e:
        split_gesture_segments(ev, read_gesture_labels(csv), source=csv)
    msg = str(e.value)
    assert "user02_led_labels.csv" in msg and "outside the recording" in msg and "[5000, 6000)" in msg


# ----------------------------------------------------------------------------------------------------------------
# Augmentation


def _dot() -> torch.Tensor:
    x = torch.zeros(3, 2, 16, 16)
    x[:, :, 4, 8] = 1.0
    return x


@pytest.mark.parametrize("op, magnitude, row, col", [("TranslateX", 3.0, 4, 11), ("TranslateY", -2.0, 2, 8)])
def test_event_augment_translate(op, magnitude, row, col) -> None:
    x = _dot()
    moved = apply_op(x, op, magnitude)
    assert moved[:, :, row, col].eq(1).all() and moved.sum() == x.sum()


def test_event_augment_translate_truncates_the_magnitude() -> None:
    x = _dot()
    assert apply_op(x, "TranslateX", 0.9999).equal(x)  # int() truncation, as in the authors' code


def test_event_augment_cutout_same_square_everywhere() -> None:
    ones = torch.ones(3, 2, 32, 32)
    cut = apply_op(ones, "Cutout", 0.0, generator=torch.Generator().manual_seed(0))
    holes = (cut == 0)
    assert holes.any() and holes.float().mean() <= 0.11 + 1e-6
    assert holes.all(dim=0).all(dim=0).sum() == holes[0, 0].sum()  # the same square in every frame/channel


def test_event_augment_applies_one_op_to_all_frames() -> None:
    ones = torch.ones(3, 2, 32, 32)
    aug = EventAugment(generator=torch.Generator().manual_seed(0))
    for _ in range(20):
        y = aug(ones)
        assert y.shape == ones.shape
        assert y.eq(y[0:1, 0:1]).all()  # the same op for all T frames and both polarities


# ----------------------------------------------------------------------------------------------------------------
# Datasets


def _small_nmnist(root: Path, ids: list[str]) -> list[int]:
    need(NMNIST_SMALL, "N-MNIST small copy")
    root.mkdir(parents=True, exist_ok=True)
    table = dict(line.split() for line in (NMNIST_SMALL / "train1K.txt").read_text().splitlines()[1:])
    for i in ids:
        shutil.copy2(NMNIST_SMALL / f"{i}.bs2", root / f"{i}.bs2")
    (root / "train3.txt").write_text("#sample #class\n" + "".join(f"{i}\t{table[i]}\n" for i in ids))
    (root / "test0.txt").write_text("#sample #class\n")
    return [int(table[i]) for i in ids]


def test_nmnist_shared_small_set(tmp_path: Path) -> None:
    need(NMNIST_SMALL, "N-MNIST small copy")
    ds = NMNIST(NMNIST_SMALL, train=True, time_steps=8, cache_dir=tmp_path)
    assert len(ds) == 1000 and ds.num_classes == 10 and ds.sensor_size == (34, 34)
    frames, label = ds[0]
    assert label == 5  # train1K.txt: "1 5"
    assert frames.dtype == torch.float32 and frames.shape == (8, 2, 34, 34)
    assert frames.sum().item() == (NMNIST_SMALL / "1.bs2").stat().st_size // 5
    assert sample_name(ds, 0) == str(NMNIST_SMALL / "1.bs2")
    test = NMNIST(NMNIST_SMALL, train=False, time_steps=8, cache_dir=tmp_path, pad_to=48)
    assert len(test) == 100 and test.frame_size == (48, 48)
    frames, label = test[0]
    assert label == 7  # test100.txt: "60001 7"
    assert frames.shape == (8, 2, 48, 48)
    n = (NMNIST_SMALL / "60001.bs2").stat().st_size // 5
    assert frames[:, :, 7:41, 7:41].sum().item() == n == frames.sum().item()


def test_nmnist_original_layout(tmp_path: Path) -> None:
    root = tmp_path / "NMNIST"
    for split, digit, name, events in [("Train", 3, "00002.bin", [(1, 1, 1, 5), (2, 2, 0, 9)]),
                                       ("Train", 0, "00010.bin", [(0, 0, 0, 1)]),
                                       ("Test", 9, "00001.bin", [(33, 33, 1, 3)])]:
        (root / split / str(digit)).mkdir(parents=True, exist_ok=True)
        write_nmnist(root / split / str(digit) / name, events)
    (root / "Train" / "3" / "._00002.bin").write_bytes(b"\x00\x05\x16\x07 Mac OS X")  # not a recording
    tr = NMNIST(root, train=True, time_steps=2, cache_dir=tmp_path / "c")
    assert tr.targets == [0, 3]
    frames = tr[1][0]  # events (x1, y1, p1, t5) in frame 0 and (x2, y2, p0, t9) in frame 1
    assert frames.sum().item() == 2 and frames[0, 1, 1, 1].item() == 1 and frames[1, 0, 2, 2].item() == 1
    te = NMNIST(root, train=False, time_steps=2, cache_dir=tmp_path / "c")
    assert te.targets == [9] and te[0][0][1, 1, 33, 33].item() == 1


def test_nmnist_cache_created_reused_and_rebuilt(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    root = tmp_path / "nm"
    labels = _small_nmnist(root, ["1", "2", "3"])
    ds = NMNIST(root, train=True, time_steps=4)
    assert ds.targets == labels
    first = [ds[i][0] for i in range(3)]
    cache_file = root / ".spikingformer_cache" / "frames_number_T4" / "bs2" / "2.npz"
    assert cache_file.is_file()

    def boom(path: object) -> None:
        raise AssertionError("the cache should have been used")

    monkeypatch.setattr(event_datasets, "read_nmnist", boom)
    again = NMNIST(root, train=True, time_steps=4)
    for i in range(3):
        assert again[i][0].equal(first[i])
    monkeypatch.undo()

    # replace sample "2" by the recording of "3" with a new mtime: the cache must be rebuilt
    shutil.copyfile(root / "3.bs2", root / "2.bs2")
    st = os.stat(root / "2.bs2")
    os.utime(root / "2.bs2", ns=(st.st_atime_ns, st.st_mtime_ns + 5_000_000_000))
    rebuilt = NMNIST(root, train=True, time_steps=4)[1][0]
    assert rebuilt.equal(first[2])
    assert rebuilt.sum().item() == (root / "3.bs2").stat().st_size // 5
    # another T gets its own cache folder
    NMNIST(root, train=True, time_steps=2)[0]
    assert (root / ".spikingformer_cache" / "frames_number_T2" / "bs2" / "1.npz").is_file()


@pytest.mark.filterwarnings("error::pytest.PytestUnraisableExceptionWarning")
def test_a_full_disk_under_the_cache_is_one_warning_and_the_frames_still_come(tmp_path: Path, full_disk) -> None:
    # the cache only saves time: a failed write (here the disk fills after 100 bytes) warns once,
    # leaves no file behind and no zip file open (NumPy 1.x left its writer's open, and its garbage
    # collection said "Exception ignored in ZipFile.__del__"), and the frames are those built without a cache
    root = tmp_path / "nm"
    _small_nmnist(root, ["1", "2", "3"])
    expected = [NMNIST(root, train=True, time_steps=4, cache_dir=tmp_path / "ok")[i][0] for i in range(3)]
    full_disk(100)
    ds = NMNIST(root, train=True, time_steps=4, cache_dir=tmp_path / "full")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        frames = [ds[i][0] for i in range(3)]
    assert all(f.equal(e) for f, e in zip(frames, expected))
    assert [str(w.message) for w in caught] == [
        f"spikingformer: cannot write the frame cache {tmp_path / 'full' / 'frames_number_T4' / 'bs2' / '1.npz'}: No space "
        "left on device; going on without it (each epoch integrates the frames from the recordings again, which is "
        "slower): free space there or give another folder (--cache-dir, or cache_dir= of the data set)"]
    assert [p.name for p in (tmp_path / "full").rglob("*") if p.is_file()] == []  # no partial file, no temporary
    gc.collect()  # an open zip file left behind would be closed here, on the files closed under it


def test_cache_falls_back_to_home_for_read_only_root(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    root = tmp_path / "ro"
    _small_nmnist(root, ["1"])
    home = tmp_path / "home"
    home.mkdir()
    monkeypatch.setenv("HOME", str(home))
    root.chmod(stat.S_IRUSR | stat.S_IXUSR | stat.S_IRGRP | stat.S_IXGRP | stat.S_IROTH | stat.S_IXOTH)
    try:
        ds = NMNIST(root, train=True, time_steps=3)
        ds[0]
        assert not (root / ".spikingformer_cache").exists()
        hits = list((home / ".cache" / "spikingformer").glob("ro-*/frames_number_T3/bs2/1.npz"))
        assert len(hits) == 1
    finally:
        root.chmod(0o755)


def _cifar_tree(root: Path) -> dict[str, np.ndarray]:
    written = {}
    for c, name in enumerate(CIFAR10DVS.classes):
        (root / name).mkdir(parents=True)
        for k in range(11):
            ev = synthetic_events(20 + k, seed=100 * c + k)
            fname = f"cifar10_{name}_{k}.aedat"
            (root / name / fname).write_bytes(to_aedat2(ev))
            written[f"{name}/{fname}"] = ev
    return written


def test_cifar10dvs_tiny_tree(tmp_path: Path) -> None:
    root = tmp_path / "CIFAR10DVS"
    written = _cifar_tree(root)
    tr = CIFAR10DVS(root, train=True, time_steps=4, cache_dir=tmp_path / "cache")
    te = CIFAR10DVS(root, train=False, time_steps=4, cache_dir=tmp_path / "cache")
    # 11 files a class: ceil(11 * 0.9) = 10 train, 1 test; names sort lexicographically (0, 1, 10, 2, ..., 9)
    assert len(tr) == 100 and len(te) == 10
    assert te.targets == list(range(10)) and tr.targets == [c for c in range(10) for _ in range(10)]
    assert te._keys[3] == "cat/cifar10_cat_9"
    # macOS's "._NAME.aedat" metadata copies (and Jupyter's folders) are no recordings: the same split
    for name in CIFAR10DVS.classes:
        for k in range(11):
            (root / name / f"._cifar10_{name}_{k}.aedat").write_bytes(b"\x00\x05\x16\x07 Mac OS X")
        (root / name / ".ipynb_checkpoints").mkdir()
    again = CIFAR10DVS(root, train=False, time_steps=4, cache_dir=tmp_path / "cache")
    assert again._keys == te._keys and again.targets == te.targets
    frames, label = te[3]
    assert label == 3 and frames.shape == (4, 2, 128, 128)
    ev = written["cat/cifar10_cat_9.aedat"]
    assert frames.sum().item() == ev.size == 29
    # the remap sends a raw event (x, y, p) to pixel (x' = 127 - y, y' = 127 - x) of channel 1 - p
    e0 = ev[0]
    assert frames[0, 1 - int(e0["p"]), 127 - int(e0["x"]), 127 - int(e0["y"])].item() >= 1
    assert tr.num_classes == 10 and tr.sensor_size == (128, 128)


def test_dvs128gesture_tiny_tree(tmp_path: Path) -> None:
    root = tmp_path / "DvsGesture"
    root.mkdir()
    ev_a = synthetic_events(300, seed=1, t0=10_000)
    ev_b = synthetic_events(200, seed=2, t0=50_000)
    (root / "user01_fluorescent.aedat").write_bytes(to_aedat31(ev_a, per_packet=64))
    (root / "user24_led.aedat").write_bytes(to_aedat31(ev_b, per_packet=64))
    ta = ev_a["t"]
    cut = [int(ta[10]), int(ta[100]), int(ta[250])]
    (root / "user01_fluorescent_labels.csv").write_text(
        f"class,startTime_usec,endTime_usec\n2,{cut[0]},{cut[1]}\n11,{cut[1]},{cut[2]}\n")
    tb = ev_b["t"]
    (root / "user24_led_labels.csv").write_text(f"class,startTime_usec,endTime_usec\n5,{int(tb[0])},{int(tb[-1])}\n")
    # without the official lists: users 1-23 train, 24-29 test
    tr = DVS128Gesture(tmp_path, train=True, time_steps=4, cache_dir=tmp_path / "cache")
    te = DVS128Gesture(root, train=False, time_steps=4, cache_dir=tmp_path / "cache")
    assert tr.targets == [1, 10] and te.targets == [4]
    seg_counts = [int(((ta >= cut[0]) & (ta < cut[1])).sum()), int(((ta >= cut[1]) & (ta < cut[2])).sum())]
    for i in range(2):
        frames, _ = tr[i]
        assert frames.shape == (4, 2, 128, 128)
        assert frames.sum().item() == seg_counts[i]
    assert te[0][0].sum().item() == int((tb < tb[-1]).sum())
    # with the official lists (here swapped on purpose)
    (root / "trials_to_train.txt").write_text("user24_led.aedat\n")
    (root / "trials_to_test.txt").write_text("user01_fluorescent.aedat\n")
    assert DVS128Gesture(root, train=True, time_steps=4, cache_dir=tmp_path / "cache").targets == [4]
    assert DVS128Gesture(root, train=False, time_steps=4, cache_dir=tmp_path / "cache").targets == [1, 10]
    assert tr.num_classes == 11 and len(tr.classes) == 11
    # messages about a sample (non-finite batches) name its recording and segment
    assert sample_name(Subset(tr, [1, 0]), 0) == f"{root / 'user01_fluorescent.aedat'} segment 001"


@pytest.mark.parametrize("dataset, layout", [(CIFAR10DVS, r"airplane/\*\.aedat.*AEDAT 2\.0"),
                                             (DVS128Gesture, "user01_fluorescent.aedat"),
                                             (NMNIST, r"Train/<digit>/\*\.bin")], ids=["CIFAR10DVS", "DVS128Gesture", "NMNIST"])
def test_missing_root_names_the_layout(tmp_path: Path, dataset, layout) -> None:
    with pytest.raises(FileNotFoundError, match=f"root {tmp_path / 'nope'} does not exist: expected .*{layout}"):
        dataset(tmp_path / "nope")
    (tmp_path / "a_file").write_text("")  # a file given as the root is said to be one
    with pytest.raises(FileNotFoundError, match=f"root {tmp_path / 'a_file'} is a file, not a folder: expected .*{layout}"):
        dataset(tmp_path / "a_file")


def test_digits_dvs() -> None:
    tr = DigitsDVS(train=True, time_steps=4)
    te = DigitsDVS(train=False, time_steps=4)
    assert (len(tr), len(te)) == (1437, 360)
    assert tr.num_classes == 10 and tr.sensor_size == (32, 32)
    frames, label = te[0]
    assert frames.dtype == torch.float32 and frames.shape == (4, 2, 32, 32)
    assert 0 <= label < 10 and frames.sum() > 0 and frames[:, 0].sum() > 0 and frames[:, 1].sum() > 0
    counts = np.bincount(te.targets, minlength=10)
    assert counts.min() >= 35 and counts.max() <= 37  # stratified: about 36 of each digit
    assert set(tr.indices.tolist()).isdisjoint(te.indices.tolist())
    assert math.isclose(len(te) / (len(tr) + len(te)), 0.2, abs_tol=1e-3)
