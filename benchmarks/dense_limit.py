"""The valid limit of a step: the time its own convolutions and matrix products take at this machine's rate.

A step cannot run faster than the dense arithmetic it contains. :func:`dense_ops` records every
convolution and matrix product one real step dispatches, forward and backward (a
``TorchDispatchMode`` over the step: the ops ``torch.utils.flop_counter`` counts, with their exact
shapes, strides, dtypes and parameters, e.g. ``convolution_backward``'s output mask; also those our
own operators run inside them, such as the spike linear's dense product under autocast, which
``FlopCounterMode`` does not see, the ``spike_conv`` route's int8 convolutions, with their
packed weights, and the ``fused_attention`` route's products, forward and backward); :func:`replay` runs each distinct
one in isolation on fresh tensors of the same layout and keeps its best time. The sum over all
recorded ops (best time x how often the step calls it) is the time the step's dense arithmetic
needs at the rate this machine reaches on exactly those shapes, and ``that sum / step time`` is an
efficiency that cannot exceed 100% except by timing noise (the isolated op has its inputs' cache
and the machine to itself at least as much as inside the step).

:func:`fma_peak` gives the theoretical FMA peak beside it: cores x clock (measured by
``clock_probe.py``: a virtual machine's ``/proc/cpuinfo`` gives the nominal one) x FLOPs per cycle
of the ISA the convolutions run with (``ONEDNN_MAX_CPU_ISA`` caps it).

:func:`measure_with_dense_model` gives a second, lifted limit beside it: the same step with the token linears as
dense products and the tokenizer's convolutions direct float32 ones (the ``spike_linear``,
``spike_conv`` and ``winograd`` routes off), i.e. the dense model's arithmetic at this machine's
rates. A step whose spike linears add only the spikes' weights, whose spike convolutions sum
integers, or whose convolutions take Winograd's 16 products per tile for the direct algorithm's
36, does less or cheaper arithmetic than that and can beat it: efficiency against it may exceed
100%.
"""

from __future__ import annotations

import os
import time
from collections import Counter
from typing import Callable

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves
from torch.utils.flop_counter import flop_registry

import common
import spikingformer.kernels.attention  # noqa: F401  (registers spikingformer::spike_attention, counted below)
from spikingformer.cpu_features import ISA_VARIABLES, amx_allowed, isa_variables_set, onednn_cap


def _int8_conv_flops(qx, x_scale, x_zero_point, qw, *args, out_val=None, **kwargs) -> int:
    """FLOPs of oneDNN's int8 convolution (the ``spike_conv`` route's pieces), counted as a float
    convolution's: two per multiply-add."""
    return 2 * out_val.numel() * qw.shape[1] * qw.shape[2] * qw.shape[3]


def _onednn_linear_flops(x, weight, *args, out_val=None, **kwargs) -> int:
    """FLOPs of oneDNN's matmul (the ``token_linear`` route's products): two per multiply-add."""
    return 2 * out_val.numel() * weight.shape[1]


def _attention_flops(q, k, v, heads, scale, out_val=None, products: int = 2) -> int:
    """FLOPs of the ``fused_attention`` route's forward: ``K^T V`` and ``Q (K^T V)`` per head, two per
    multiply-add each (those of the two batched products it replaces)."""
    r, n, c = q.shape
    return 2 * products * r * n * c * (c // heads)


def _attention_backward_flops(q, k, v, grad, heads, scale, out_val=None) -> int:
    """FLOPs of its backward: the four products of the batched products' backward (it also sums ``K^T V``
    again, which the products' autograd keeps: not counted)."""
    return _attention_flops(q, k, v, heads, scale, products=4)


# dense ops flop_counter does not know: the spike_conv route's int8 convolutions, the token_linear
# route's oneDNN products, the fused_attention route's kernel
EXTRA_FLOPS = {torch.ops.onednn.qconv2d_pointwise: _int8_conv_flops} if hasattr(torch.ops, "onednn") else {}
EXTRA_FLOPS[torch.ops.spikingformer.spike_attention] = _attention_flops
EXTRA_FLOPS[torch.ops.spikingformer.spike_attention_backward] = _attention_backward_flops
if hasattr(torch.ops.mkldnn, "_linear_pointwise"):
    EXTRA_FLOPS[torch.ops.mkldnn._linear_pointwise] = _onednn_linear_flops


def _spec(value):
    """A hashable description of one op argument: tensors by layout, lists by their items; an opaque
    oneDNN tensor (a packed weight) as itself, which the replay reuses."""
    if isinstance(value, torch.Tensor) and value.is_mkldnn:
        return ("fixed", value)
    if isinstance(value, torch.Tensor):
        return ("tensor", tuple(value.shape), tuple(value.stride()), str(value.dtype).replace("torch.", ""))
    if isinstance(value, (list, tuple)):
        return (type(value).__name__, tuple(_spec(v) for v in value))
    return ("value", value)


def _build(spec, device: str, generator: torch.Generator):
    """A fresh argument from :func:`_spec`'s description (random values, the same shape and strides)."""
    kind, payload = spec[0], spec[1:]
    if kind == "fixed":
        return payload[0]
    if kind == "tensor":
        shape, stride, dtype = payload
        extent = 1 + sum((s - 1) * st for s, st in zip(shape, stride) if s > 0)
        base = torch.randn(extent, generator=generator).to(device=device, dtype=getattr(torch, dtype))
        return base.as_strided(shape, stride)
    if kind in ("list", "tuple"):
        items = [_build(v, device, generator) for v in payload[0]]
        return items if kind == "list" else tuple(items)
    return payload[0]


def _custom_op_function(func, device_type: str) -> Callable | None:
    """The Python kernel that a ``torch.library.custom_op`` operator of this project
    (``spikingformer::``) runs for tensors on ``device_type`` (e.g. the Triton kernel on CUDA, not
    the CPU kernel the operator was defined with), else None: not ours, or no kernel for that device."""
    from torch._library.custom_ops import OPDEFS

    name = func.name().split(".")[0]
    if not name.startswith("spikingformer::") or name not in OPDEFS:
        return None
    return OPDEFS[name]._backend_fns.get(device_type)


def _device_type(args) -> str:
    """The device type of the first tensor among ``args`` (nested lists too); ``cpu`` if none."""
    return next((a.device.type for a in tree_leaves(args) if isinstance(a, torch.Tensor)), "cpu")


class _Recorder(TorchDispatchMode):
    """Counts the dense ops (those ``flop_registry`` knows) a region dispatches, by op and argument layout."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: Counter = Counter()
        self.ops: dict = {}
        self.flops: dict = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        packet = func._overloadpacket
        count = flop_registry.get(packet) or EXTRA_FLOPS.get(packet)
        impl = _custom_op_function(func, _device_type(args)) if count is None else None
        if impl is not None:
            # one of our operators (torch.library.custom_op) that is not itself a product (those are
            # recorded as ops, as the attention's): its function runs under this mode, so
            # that the dense products it falls back to (the spike linear under autocast without a bf16
            # limit, or above its firing-rate limit: F.linear, mm) are recorded; its kernels' additions are not products
            with self:
                return impl(*args, **kwargs)
        if count is None:
            # composite ops (conv2d, linear, matmul) reach this mode undecomposed in inference mode
            with self:
                out = func.decompose(*args, **kwargs)
            if out is not NotImplemented:
                return out
        out = func(*args, **kwargs)
        if count is not None:
            key = (str(func), _spec(list(args)), _spec(sorted(kwargs.items())))
            if key not in self.ops:
                self.ops[key] = func
                self.flops[key] = int(count(*args, **kwargs, out_val=out))
            self.calls[key] += 1
        return out


def dense_ops(step: Callable[[], object]) -> list[dict]:
    """Run ``step`` once and return its distinct dense ops: ``op``, ``args``/``kwargs`` (layouts, see
    :func:`_spec`), ``count`` (calls in the step) and ``flops`` (per call, ``flop_counter``'s formula)."""
    recorder = _Recorder()
    with recorder:
        step()
    return [dict(op=recorder.ops[key], name=key[0], args=key[1], kwargs=key[2], count=n, flops=recorder.flops[key])
            for key, n in recorder.calls.items()]


def replay(ops: list[dict], device: str = "cpu", reps: int = 5,
           before_round: Callable[[bool], object] | None = None) -> list[dict]:
    """Time every op of :func:`dense_ops` in isolation: fresh random tensors of the recorded layouts
    (all built first), one warm-up call of each, then ``reps`` rounds that call every op once in turn
    (no autograd). Adds ``seconds`` and ``cpu_seconds`` (each op's best wall and best process CPU time
    over the rounds, per call). Rounds, not an op's calls back to back: a slow spell of a shared
    machine then slows one round's calls of a few ops, where it could slow every call of one op (an
    op's best of five back-to-back calls was seen at 1.8 times its time, which overstated the limit).
    ``before_round`` (e.g. one timed step of the model) runs before each timed round, so that a round
    and that step share a spell of the machine (called as ``before_round(False)``), and once before the
    warm-up calls as ``before_round(True)``: its own warm-up, not to be timed (with the replay's tensors
    alive, a training step's first run grows the heap: the event model's took 2.2 s where its next took
    0.9 s). ``round_seconds`` and ``round_cpu_seconds`` keep each round's time of the op per call."""
    sync = common.MemoryProbe(device).synchronize
    generator = torch.Generator().manual_seed(0)
    calls = [(op["op"], _build(op["args"], device, generator), dict(_build(op["kwargs"], device, generator)))
             for op in ops]
    wall: list[list[float]] = [[] for _ in ops]
    cpu: list[list[float]] = [[] for _ in ops]
    if before_round is not None:
        before_round(True)
    with torch.no_grad():
        for fn, args, kwargs in calls:
            fn(*args, **kwargs)
    for _ in range(reps):
        if before_round is not None:
            before_round(False)
        with torch.no_grad():
            for i, (fn, args, kwargs) in enumerate(calls):
                sync()
                t0, c0 = time.perf_counter(), time.process_time()
                fn(*args, **kwargs)
                sync()
                wall[i].append(time.perf_counter() - t0)
                cpu[i].append(time.process_time() - c0)
    del calls
    return [dict(op, seconds=min(w), cpu_seconds=min(c), round_seconds=w, round_cpu_seconds=c)
            for op, w, c in zip(ops, wall, cpu)]


def summary(timed: list[dict]) -> dict:
    """Totals of :func:`replay`'s ops: ``flops``, ``seconds`` and ``cpu_seconds`` (the step's dense time by
    either clock, each op at its best round), ``round_seconds`` and ``round_cpu_seconds`` (the same, one
    total per round, each op at its time in that round) and ``ops`` (one JSON-friendly row per distinct
    op: name, count, GFLOP, ms and CPU ms per call)."""
    flops = sum(o["flops"] * o["count"] for o in timed)
    seconds = sum(o["seconds"] * o["count"] for o in timed)
    cpu_seconds = sum(o["cpu_seconds"] * o["count"] for o in timed)
    reps = min((len(o["round_seconds"]) for o in timed), default=0)
    rounds = {name: [sum(o[name][r] * o["count"] for o in timed) for r in range(reps)]
              for name in ("round_seconds", "round_cpu_seconds")}
    rows = [dict(name=o["name"].replace("aten.", ""), shapes=[a[1] for a in o["args"][1] if a[0] == "tensor"],
                 count=o["count"], gflop=o["flops"] / 1e9, ms=o["seconds"] * 1e3, cpu_ms=o["cpu_seconds"] * 1e3)
            for o in timed]
    return dict(flops=flops, seconds=seconds, cpu_seconds=cpu_seconds, **rounds, ops=rows)


def measure(step: Callable[[], object], device: str = "cpu", reps: int = 5) -> dict:
    """:func:`summary` of the dense ops of one run of ``step``, each timed in isolation."""
    return summary(replay(dense_ops(step), device, reps))


def dense_model_ops(step: Callable[[], object]) -> list[dict]:
    """:func:`dense_ops` of ``step`` with the ``spike_linear``, ``spike_conv`` and ``winograd`` routes
    off: the model's convolutions and products as float arithmetic, the token linears' forward (and
    in training their weight gradients) as the dense products the first route replaces by additions
    of the spikes' weights, the tokenizer's convolutions as the direct float convolutions the
    second replaces by sums or int8 ones and the third by Winograd's fewer products."""
    from spikingformer.layers import routes

    with routes.configured("-spike_linear,-spike_conv,-winograd"):
        return dense_ops(step)


def measure_with_dense_model(step: Callable[[], object], device: str = "cpu", reps: int = 5,
                             before_round: Callable[[bool], object] | None = None) -> tuple[dict, dict]:
    """:func:`measure` of ``step`` and of the dense model (:func:`dense_model_ops`), from one replay
    (``before_round`` as :func:`replay`'s): an op both record is timed once, so the two limits share
    its time (in bf16 where the spike linears take the dense product, they are the same ops and so
    the same limit; where they sum bf16 spikes, as in float32, the dense model's has more). Our
    step can beat the dense model's limit by doing less arithmetic (the sparsity of the spikes lifts it)."""
    own, model = dense_ops(step), dense_model_ops(step)

    def key(op: dict) -> tuple:
        return op["name"], op["args"], op["kwargs"]

    distinct = list({key(o): o for o in own + model}.values())
    timed = {key(o): o for o in replay(distinct, device, reps, before_round)}
    clocks = ("seconds", "cpu_seconds", "round_seconds", "round_cpu_seconds")

    def limit(ops: list[dict]) -> dict:
        return summary([dict(o, **{c: timed[key(o)][c] for c in clocks}) for o in ops])

    return limit(own), limit(model)


# ---------------------------------------------------------------------------------- the ISA ----

# FLOPs per cycle and core of one ISA's fp32 FMA: FMA units x fp32 lanes x 2 (multiply and add)
FMA_UNITS = 2
LANES = {"AVX-512": 16, "AVX2": 8, "SSE": 4}
# Intel's AMX (TMUL) per core: one bf16 tile product (16 x 16 outputs, 32 products each) per 16 cycles
AMX_BF16_FLOPS_PER_CYCLE = 1024
_ISA_NAMES = {"sse": "SSE", "avx2": "AVX2", "avx512": "AVX-512"}  # cpu_features.onednn_cap's names


def isa(flags: list[str] | None = None, env: dict | None = None) -> str:
    """The vector ISA the convolutions run with: the CPU's widest FMA ISA (AVX-512 needs ``avx512f``,
    AVX2 ``avx2`` and ``fma``), capped by ``ONEDNN_MAX_CPU_ISA`` (oneDNN runs the convolutions)."""
    flags = common.cpu_model_and_flags()[1] if flags is None else flags
    env = os.environ if env is None else env
    cpu = "AVX-512" if "avx512f" in flags else "AVX2" if {"avx2", "fma"} <= set(flags) else "SSE"
    cap = _ISA_NAMES.get(onednn_cap(env))
    order = list(LANES)  # widest first
    return cap if cap is not None and order.index(cap) > order.index(cpu) else cpu


def halves_avx512(info: dict | None = None) -> bool:
    """Whether the CPU executes each 512-bit instruction as two 256-bit halves: AMD's Zen 4 (family 25
    with AVX-512), whose FMA units are 256 bits wide. (Zen 5, family 26, has 512-bit units.)"""
    info = common.cpu_info() if info is None else info
    return "AMD" in info["model"] and (info["family"] or "").startswith("family 25,") and "avx512f" in info["flags"]


def fma_peak(threads: int, isa_name: str, ghz: float, bf16: bool = False, info: dict | None = None,
             env: dict | None = None) -> dict:
    """Theoretical peak of ``threads`` cores at ``ghz``: ``FMA_UNITS`` x lanes x 2 FLOPs per cycle
    (fp32), twice that for bf16 on AVX512-BF16 (``vdpbf16ps``: two products per fp32 lane). The lanes
    are the FMA units' width: AVX-512's 16 only where the units are 512 bits wide
    (:func:`halves_avx512`; ``info``: :func:`common.cpu_info`'s, this CPU's by default). bf16 on a
    CPU with matrix tiles (``amx_bf16``) that oneDNN may use (``env``'s ``ONEDNN_MAX_CPU_ISA``,
    this process's by default): :data:`AMX_BF16_FLOPS_PER_CYCLE`, where its products run."""
    info = common.cpu_info() if info is None else info
    if bf16 and isa_name == "AVX-512" and "amx_bf16" in info["flags"] and amx_allowed(env):
        return dict(isa="AMX", flops_per_cycle=AMX_BF16_FLOPS_PER_CYCLE, ghz=ghz, cores=threads,
                    flops=threads * ghz * 1e9 * AMX_BF16_FLOPS_PER_CYCLE,
                    note="bf16 products on AMX tiles: a 16x32 by 32x16 tile product, 16384 FLOPs, per 16 cycles")
    halved = isa_name == "AVX-512" and halves_avx512(info)
    lanes = LANES["AVX2"] if halved else LANES[isa_name]
    per_cycle = FMA_UNITS * lanes * 2 * (2 if bf16 else 1)
    return dict(isa=isa_name, flops_per_cycle=per_cycle, ghz=ghz, cores=threads, flops=threads * ghz * 1e9 * per_cycle,
                note="AVX-512 on 256-bit FMA units (AMD Zen 4)" if halved else "")


def isa_settings() -> str:
    """The settings that choose the ISA of this process's arithmetic, as one line."""
    capability = torch.backends.cpu.get_cpu_capability()
    env = ", ".join(isa_variables_set()) or f"none of {', '.join(ISA_VARIABLES)} set"
    return f"ATen CPU capability {capability}; {env}"
