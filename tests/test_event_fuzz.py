"""Fuzzing of the binary event readers (AEDAT 2.0, AEDAT 3.1, N-MNIST).

Every damaged file (seeded random truncations, bit flips, inserted and deleted bytes) must either
raise :class:`EventFileError` naming the file, or decode into events that lie on the sensor and
integrate into frames. Any other exception, any other warning, or a hang (a watchdog stops the
test after a generous bound) is a failure.
"""

from __future__ import annotations

import contextlib
import signal
import struct
import warnings
from pathlib import Path

import numpy as np
import pytest

from spikingformer.data.event_files import read_aedat2, read_aedat31, read_nmnist
from spikingformer.data.events import DVS128_SENSOR, EVENT_DTYPE, NMNIST_SENSOR, EventFileError, EventFileWarning
from spikingformer.data.frames import integrate_frames

CASES_PER_READER = 1500


def aedat2_file(rng: np.random.Generator) -> bytes:
    n = 120
    addr = (rng.integers(0, 128, n) << 8) | (rng.integers(0, 128, n) << 1) | rng.integers(0, 2, n)
    addr[::17] |= 0x8000  # a few sync events
    rec = np.empty((n, 2), ">u4")
    rec[:, 0] = addr
    rec[:, 1] = np.cumsum(rng.integers(0, 40, n))
    return b"#!AER-DAT2.0\r\n# This is a raw AE data file\r\n# AEChip: DVS128\r\n" + rec.tobytes()


def aedat31_file(rng: np.random.Generator) -> bytes:
    out = bytearray(b"#!AER-DAT3.1\r\n#Format: RAW\r\n#Source 1: DVS128\r\n#!END-HEADER\r\n")
    t = 0
    for packet in range(4):
        n = 30
        data = (rng.integers(0, 128, n) << 17) | (rng.integers(0, 128, n) << 2) | (rng.integers(0, 2, n) << 1) | 1
        rec = np.empty((n, 2), "<u4")
        rec[:, 0] = data
        rec[:, 1] = t + np.cumsum(rng.integers(0, 40, n))
        t = int(rec[-1, 1])
        out += struct.pack("<HHIIIIII", 1, 1, 8, 4, packet, n, n, n) + rec.tobytes()
        out += struct.pack("<HHIIIIII", 0, 1, 8, 4, 0, 2, 2, 2) + bytes(16)  # a special-event packet, skipped
    return bytes(out)


def nmnist_file(rng: np.random.Generator) -> bytes:
    n = 150
    t = np.cumsum(rng.integers(0, 60, n))
    rec = np.stack([rng.integers(0, 34, n), rng.integers(0, 34, n), (rng.integers(0, 2, n) << 7) | ((t >> 16) & 0x7F),
                    (t >> 8) & 0xFF, t & 0xFF], axis=1)
    return rec.astype(np.uint8).tobytes()


READERS = {
    "aedat2": (read_aedat2, aedat2_file, DVS128_SENSOR),
    "aedat31": (read_aedat31, aedat31_file, DVS128_SENSOR),
    "nmnist": (read_nmnist, nmnist_file, NMNIST_SENSOR),
}


def mutate(data: bytes, rng: np.random.Generator) -> tuple[bytes, str]:
    """One or two random damages; returns the bytes and a description for failure messages."""
    done = []
    buf = bytearray(data)
    for _ in range(int(rng.integers(1, 3))):
        kind = ("truncate", "flip", "insert", "delete")[int(rng.integers(0, 4))]
        pos = int(rng.integers(0, len(buf) + 1))
        if kind == "truncate":
            del buf[pos:]
        elif kind == "flip":
            for _ in range(int(rng.integers(1, 9))):
                if buf:
                    i = int(rng.integers(0, len(buf)))
                    buf[i] ^= 1 << int(rng.integers(0, 8))
        elif kind == "insert":
            buf[pos:pos] = rng.integers(0, 256, int(rng.integers(1, 17)), dtype=np.uint8).tobytes()
        else:
            del buf[pos:pos + int(rng.integers(1, 33))]
        done.append(f"{kind}@{pos}")
    return bytes(buf), "+".join(done)


@contextlib.contextmanager
def watchdog(seconds: int):
    """Fail instead of hanging: raises TimeoutError after ``seconds`` (where SIGALRM exists)."""
    if not hasattr(signal, "SIGALRM"):
        yield
        return

    def expired(signum, frame):
        raise TimeoutError(f"the readers did not finish the fuzz cases within {seconds} s: a reader hangs")

    previous = signal.signal(signal.SIGALRM, expired)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


@pytest.mark.parametrize("fmt", sorted(READERS))
def test_damaged_files_raise_event_file_error_or_decode(fmt, tmp_path: Path):
    reader, make, (height, width) = READERS[fmt]
    rng = np.random.default_rng(["aedat2", "aedat31", "nmnist"].index(fmt))
    outcomes = {"error": 0, "decoded": 0}
    with watchdog(120):
        for case in range(CASES_PER_READER):
            data, what = mutate(make(rng), rng)
            path = tmp_path / f"case{case}.bin"
            path.write_bytes(data)
            try:
                with warnings.catch_warnings():
                    warnings.simplefilter("error")  # numpy overflow and the like are failures too
                    warnings.simplefilter("ignore", EventFileWarning)
                    events = reader(path)
                    frames = integrate_frames(events, 3, height, width, ("number", "time")[case % 2])
            except EventFileError as err:
                assert str(path) in str(err), f"case {case} ({what}): the error does not name the file: {err}"
                outcomes["error"] += 1
                continue
            except Exception as err:  # noqa: BLE001 - any other exception is the failure this test looks for
                pytest.fail(f"{fmt} case {case} ({what}): {type(err).__name__}: {err}")
            assert events.dtype == EVENT_DTYPE
            if events.size:
                assert events["x"].min() >= 0 and events["x"].max() < width
                assert events["y"].min() >= 0 and events["y"].max() < height
                assert set(np.unique(events["p"]).tolist()) <= {0, 1}
            assert frames.shape == (3, 2, height, width) and frames.sum() == events.size
            outcomes["decoded"] += 1
    # the damages exercise both outcomes
    assert outcomes["error"] > 20 and outcomes["decoded"] > 20, outcomes
