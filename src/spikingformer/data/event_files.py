"""Readers of event-camera (DVS) files, in vectorised numpy; each returns an event array of
:data:`~spikingformer.data.events.EVENT_DTYPE`.

:func:`read_aedat2` (AEDAT 2.0, the container of the original CIFAR10-DVS files and of jAER DVS128
recordings), :func:`remap_cifar10dvs` (the authors'/SpikingJelly's CIFAR10-DVS remapping),
:func:`read_aedat31` (DVS128 Gesture, AEDAT 3.1 packets), :func:`read_gesture_labels` and
:func:`split_gesture_segments` (the gesture ``*_labels.csv`` files), :func:`read_nmnist` (N-MNIST
``.bin``/``.bs2``). A malformed file raises :class:`~spikingformer.data.events.EventFileError` naming the
file and the byte offset. Events outside the sensor (special/sync addresses, corrupt records) are dropped
with one :class:`~spikingformer.data.events.EventFileWarning` per file giving their count, never folded into
the frame; a recording with no events gives an ``EventFileWarning`` too. The readers' behaviour on damaged
files is fuzzed (``tests/test_event_fuzz.py``): they raise ``EventFileError`` or decode.
"""

from __future__ import annotations

import csv
import struct
from pathlib import Path

import numpy as np

from spikingformer.data.events import DVS128_SENSOR, NMNIST_SENSOR, EventFileError, PathLike, in_sensor

GESTURE_LABEL_DTYPE = np.dtype([("label", np.int64), ("start", np.int64), ("end", np.int64)])
"""Structured dtype of :func:`read_gesture_labels`: label 0..10, segment [start, end) in microseconds."""

_AEDAT2_MAGIC = b"#!AER-DAT2.0"
_AEDAT31_END = b"#!END-HEADER\r\n"
_AEDAT31_PACKET_HEADER = struct.Struct("<HHIIIIII")  # 28 bytes
_AEDAT31_POLARITY_EVENT = 1
_NMNIST_OVERFLOW_Y = 240  # y value of the timestamp-overflow marker of Orchard's ATIS files


# ----------------------------------------------------------------------------------------------------------------
# AEDAT 2.0


def _skip_hash_header(data: bytes) -> int | None:
    """The offset of the first byte after the leading '#' header lines of ``data``; None when the data ends
    inside a header line (no closing newline)."""
    pos = 0
    n = len(data)
    while pos < n and data[pos:pos + 1] == b"#":
        nl = data.find(b"\n", pos)
        if nl < 0:
            return None
        pos = nl + 1
    return pos


_DVS128_PIXEL_BITS = 0x7FFF  # y (bits 8-14), x (bits 1-7), polarity (bit 0); bit 15 marks jAER sync events


def read_aedat2(path: PathLike) -> np.ndarray:
    """Read a jAER AEDAT 2.0 file of a DVS128 (128x128) sensor, e.g. an original CIFAR10-DVS recording.

    Layout: ASCII header lines starting with ``#`` (the first one ``#!AER-DAT2.0``), then big-endian uint32
    pairs (address, timestamp in us). The address is decoded as jAER's ``DVS128.Extractor`` does:
    x = 127 - ((a >> 1) & 0x7F) (jAER flips x), y = (a >> 8) & 0x7F, and p = 1 - (a & 1) (the sensor signals
    ON with address bit 0 = 0; jAER's extractor flips it so that 1 is ON, as :data:`EVENT_DTYPE`).
    Addresses with bit 15 or any higher bit set are not pixel events (jAER: external-input sync events,
    special events): they are dropped with an :class:`EventFileWarning` giving their count.
    CIFAR10-DVS needs :func:`remap_cifar10dvs` on top.

    Returns:
        Events of dtype :data:`EVENT_DTYPE`, shape (N,), in file order.

    Raises:
        EventFileError: missing ``#!AER-DAT2.0`` header, a file that ends inside its header, or a data
            section whose size is not a multiple of 8 bytes (truncated file).
    """
    path = Path(path)
    data = path.read_bytes()
    if not data.startswith(_AEDAT2_MAGIC):
        raise EventFileError(
            f"{path}: missing AEDAT 2.0 header: the file must start with '#!AER-DAT2.0' "
            f"(found {data[:16]!r}); is it an AEDAT 3.1 file (use read_aedat31) or not an AEDAT file?")
    start = _skip_hash_header(data)
    if start is None:
        raise EventFileError(
            f"{path}: truncated AEDAT 2.0 file: it ends inside its '#' header (byte offset {len(data)}, no "
            f"closing newline), before any event. Re-copy or re-download the file.")
    payload = len(data) - start
    if payload % 8:
        good = start + (payload // 8) * 8
        raise EventFileError(
            f"{path}: truncated AEDAT 2.0 file: the event data from byte offset {start} has {payload} bytes, "
            f"not a multiple of the 8-byte (address, timestamp) record; the last complete record ends at byte "
            f"offset {good} ({len(data) - good} trailing bytes). Re-copy or re-download the file.")
    words = np.frombuffer(data, dtype=">u4", offset=start)
    addr = words[0::2].astype(np.int64)
    ts = words[1::2].astype(np.int64)
    pixel = (addr & ~_DVS128_PIXEL_BITS) == 0
    x = np.where(pixel, 127 - ((addr >> 1) & 0x7F), -1)  # -1: outside the sensor, dropped with a count
    return in_sensor(path, ts, x, (addr >> 8) & 0x7F, 1 - (addr & 1), DVS128_SENSOR,
                      "addresses with bit 15 or higher set: jAER sync/special events, not pixels")


def remap_cifar10dvs(events: np.ndarray) -> np.ndarray:
    """Apply the CIFAR10-DVS remapping of SpikingJelly (used by the Spikingformer authors).

    On the raw address fields SpikingJelly's ``load_origin_data`` (``spikingjelly/datasets/cifar10_dvs.py``)
    maps x' = 127 - y_raw, y' = 127 - x_raw, p' = 1 - p_raw, turning the recordings upright. On events in
    jAER's convention from :func:`read_aedat2` (x = 127 - x_raw, p = 1 - p_raw) the same mapping reads
    x' = 127 - y, y' = x, p' = p, which this function applies: the result equals SpikingJelly's, event for
    event.

    Args:
        events: events of dtype :data:`EVENT_DTYPE` read by :func:`read_aedat2`, shape (N,).

    Returns:
        A new event array, shape (N,).
    """
    out = events.copy()
    out["x"] = 127 - events["y"]
    out["y"] = events["x"]
    return out


# ----------------------------------------------------------------------------------------------------------------
# AEDAT 3.1 (DVS128 Gesture)


def read_aedat31(path: PathLike) -> np.ndarray:
    """Read the polarity events of an AEDAT 3.1 file (DVS128 Gesture, 128x128).

    Layout: ASCII header lines starting with ``#`` and ending with ``#!END-HEADER\\r\\n``; then packets, each
    a 28-byte little-endian header (uint16 eventType, uint16 eventSource, uint32 eventSize, uint32
    eventTSOffset, uint32 eventTSOverflow, uint32 eventCapacity, uint32 eventNumber, uint32 eventValid)
    followed by eventCapacity * eventSize bytes of events. Only packets of eventType 1 (polarity) are
    decoded, the others are skipped. A polarity event is uint32 data + int32 timestamp (at byte
    eventTSOffset, normally 4); x = (data >> 17) & 0x1FFF, y = (data >> 2) & 0x1FFF, p = (data >> 1) & 1,
    timestamp = (eventTSOverflow << 31) | ts. Only the first eventNumber events of a packet are read, and of
    those only the valid ones (data & 1). Events outside the 128x128 sensor are dropped with an
    :class:`EventFileWarning` giving their count.

    Returns:
        Events of dtype :data:`EVENT_DTYPE`, shape (N,), in file order.

    Raises:
        EventFileError: no ``#!END-HEADER`` line, a truncated packet header, or a packet header whose
            eventSize/eventCapacity/eventNumber is inconsistent with the bytes left in the file (names the
            packet's byte offset).
    """
    path = Path(path)
    data = path.read_bytes()
    end = data.find(_AEDAT31_END)
    if not data.startswith(b"#") or end < 0:
        raise EventFileError(
            f"{path}: not an AEDAT 3.1 file: no '#!END-HEADER' line closing a '#' header was found "
            f"(file starts with {data[:16]!r}); DVS128 Gesture files are AEDAT 3.1 (for AEDAT 2.0 use "
            f"read_aedat2).")
    pos = end + len(_AEDAT31_END)
    n = len(data)
    ts_parts: list[np.ndarray] = []
    addr_parts: list[np.ndarray] = []
    hsize = _AEDAT31_PACKET_HEADER.size
    while pos < n:
        if n - pos < hsize:
            raise EventFileError(
                f"{path}: truncated AEDAT 3.1 file: packet header at byte offset {pos} needs {hsize} bytes but "
                f"only {n - pos} remain. Re-copy the file.")
        (etype, _src, esize, ets_off, ets_ovf, ecap, enum, _evalid) = _AEDAT31_PACKET_HEADER.unpack_from(data, pos)
        body = pos + hsize
        nbytes = ecap * esize
        problem = None
        if enum > ecap:
            problem = f"eventNumber {enum} > eventCapacity {ecap}"
        elif nbytes > n - body:
            problem = (f"eventCapacity {ecap} x eventSize {esize} = {nbytes} bytes of events, but only "
                       f"{n - body} bytes remain")
        elif ecap > 0 and esize == 0:
            problem = f"eventSize 0 with eventCapacity {ecap}"
        elif etype == _AEDAT31_POLARITY_EVENT and enum > 0 and (esize < 8 or ets_off + 4 > esize):
            problem = f"polarity packet with eventSize {esize} and eventTSOffset {ets_off} (expected 8 and 4)"
        if problem is not None:
            raise EventFileError(
                f"{path}: corrupt AEDAT 3.1 packet header at byte offset {pos} (eventType {etype}): {problem}. "
                f"The file is truncated or damaged; re-copy it.")
        if etype == _AEDAT31_POLARITY_EVENT and enum > 0:
            raw = np.frombuffer(data, dtype=np.uint8, count=enum * esize, offset=body).reshape(enum, esize)
            addr = np.ascontiguousarray(raw[:, 0:4]).view("<u4").reshape(-1).astype(np.int64)
            ts = np.ascontiguousarray(raw[:, ets_off:ets_off + 4]).view("<u4").reshape(-1).astype(np.int64)
            ts |= np.int64(ets_ovf) << 31
            valid = (addr & 1).astype(bool)
            ts_parts.append(ts[valid])
            addr_parts.append(addr[valid])
        pos = body + nbytes
    if ts_parts:
        ts = np.concatenate(ts_parts)
        addr = np.concatenate(addr_parts)
    else:
        ts = np.zeros(0, np.int64)
        addr = np.zeros(0, np.int64)
    return in_sensor(path, ts, (addr >> 17) & 0x1FFF, (addr >> 2) & 0x1FFF, (addr >> 1) & 1, DVS128_SENSOR,
                      "corrupt polarity events")


def read_gesture_labels(csv_path: PathLike) -> np.ndarray:
    """Read a DVS128 Gesture ``<trial>_labels.csv`` file.

    Format: header ``class,startTime_usec,endTime_usec``, then one line per gesture with the class 1..11 and
    the segment's start/end timestamps in microseconds.

    Returns:
        Structured array of dtype :data:`GESTURE_LABEL_DTYPE`, shape (S,): ``label`` = class - 1 (0..10),
        ``start``, ``end`` (the segment is [start, end)).

    Raises:
        EventFileError: bad header, a malformed line, a class outside 1..11, or start >= end (names the line).
    """
    csv_path = Path(csv_path)
    with open(csv_path, newline="") as fh:
        rows = [r for r in csv.reader(fh) if r and any(c.strip() for c in r)]
    expected = ["class", "startTime_usec", "endTime_usec"]
    if not rows or [c.strip() for c in rows[0]] != expected:
        got = rows[0] if rows else "an empty file"
        raise EventFileError(
            f"{csv_path}: bad DVS128 Gesture labels header: expected 'class,startTime_usec,endTime_usec', "
            f"got {got!r}. Is this a *_labels.csv file of the DvsGesture data set?")
    out = np.empty(len(rows) - 1, dtype=GESTURE_LABEL_DTYPE)
    for i, row in enumerate(rows[1:]):
        line = i + 2
        try:
            cls, start, end = (int(c) for c in row)
        except ValueError:
            raise EventFileError(
                f"{csv_path}: line {line}: expected three integers 'class,startTime_usec,endTime_usec', "
                f"got {row!r}") from None
        if not 1 <= cls <= 11:
            raise EventFileError(f"{csv_path}: line {line}: class {cls} outside 1..11")
        if start >= end:
            raise EventFileError(f"{csv_path}: line {line}: segment start {start} >= end {end}")
        out[i] = (cls - 1, start, end)
    return out


def split_gesture_segments(events: np.ndarray, labels: np.ndarray,
                           source: PathLike | None = None) -> list[tuple[int, np.ndarray]]:
    """Cut a recording into its labelled gesture segments.

    Segment k holds the events with ``labels['start'][k] <= t < labels['end'][k]`` (SpikingJelly's rule), in
    file order.

    Args:
        events: the recording, dtype :data:`EVENT_DTYPE`, shape (N,).
        labels: from :func:`read_gesture_labels`, shape (S,).
        source: the labels file, only used in error messages.

    Returns:
        A list of S ``(label, segment_events)`` pairs.

    Raises:
        EventFileError: a segment that does not overlap the recording's time range or holds no event (the
            labels file does not belong to this recording).
    """
    t = events["t"]
    if t.size:
        t_lo, t_hi = int(t.min()), int(t.max())
    segments: list[tuple[int, np.ndarray]] = []
    name = f"{source}: " if source is not None else ""
    for k, (label, start, end) in enumerate(labels.tolist()):
        mask = (t >= start) & (t < end)
        if t.size == 0 or end <= t_lo or start > t_hi or not mask.any():
            rng = f"[{t_lo}, {t_hi}] us" if t.size else "empty"
            raise EventFileError(
                f"{name}segment {k} (class {label + 1}, [{start}, {end}) us) lies outside the recording's time "
                f"range {rng} or holds no event: the labels file does not match its recording.")
        segments.append((int(label), events[mask]))
    return segments


# ----------------------------------------------------------------------------------------------------------------
# N-MNIST


def read_nmnist(path: PathLike) -> np.ndarray:
    """Read an N-MNIST recording (``.bin`` of the original release, ``.bs2`` of the small copy; 34x34 sensor).

    Layout: 5 bytes per event: byte 0 = x, byte 1 = y, bit 7 of byte 2 = polarity, bits 22..0 of bytes 2-4
    (big-endian) = timestamp in us. As in Orchard's reference reader (and tonic's), an event with y = 240 is a
    timestamp-overflow marker: it adds 2**13 us to all following timestamps and is dropped (N-MNIST files
    contain none). Other events outside the 34x34 sensor are dropped with an :class:`EventFileWarning`
    giving their count.

    Returns:
        Events of dtype :data:`EVENT_DTYPE`, shape (N,), in file order.

    Raises:
        EventFileError: a file size that is not a multiple of 5 bytes (names the last complete offset).
    """
    path = Path(path)
    raw = np.fromfile(path, dtype=np.uint8)
    if raw.size % 5:
        good = (raw.size // 5) * 5
        raise EventFileError(
            f"{path}: truncated N-MNIST file: {raw.size} bytes is not a multiple of the 5-byte event record; "
            f"the last complete record ends at byte offset {good} ({raw.size - good} trailing bytes). "
            f"Re-copy the file.")
    rec = raw.reshape(-1, 5).astype(np.int64)
    x = rec[:, 0]
    y = rec[:, 1]
    p = rec[:, 2] >> 7
    t = ((rec[:, 2] & 0x7F) << 16) | (rec[:, 3] << 8) | rec[:, 4]
    overflow = y == _NMNIST_OVERFLOW_Y
    if overflow.any():
        t = t + np.cumsum(overflow) * (1 << 13)
        keep = ~overflow
        t, x, y, p = t[keep], x[keep], y[keep], p[keep]
    return in_sensor(path, t, x, y, p, NMNIST_SENSOR, "corrupt records")


__all__ = ["GESTURE_LABEL_DTYPE", "read_aedat2", "remap_cifar10dvs", "read_aedat31", "read_gesture_labels",
           "split_gesture_segments", "read_nmnist"]
