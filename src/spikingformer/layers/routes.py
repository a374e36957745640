"""Speed and memory routes of the building blocks, and the one switch that selects them.

Each route computes what the plain PyTorch module calls of :mod:`spikingformer.layers.blocks`
compute, faster or in less memory. The blocks ask :func:`enabled` before taking one:

* ``stem_once``: for static images the tokenizer's first convolution runs once per image instead of
  once per time step (BatchNorm still sees all T copies). The convolution then sees a smaller
  batch and may pick another algorithm, so float32 values may differ by rounding.
* ``channels_last``: the tokenizer's convolutions, BatchNorms, neurons and max-pools run on
  channels-last maps, and its hand-over to the blocks is a free view. oneDNN's channels-last
  convolution sums in another order than the NCHW one: float32 outputs differ by rounding (up to
  about 2e-6 seen), so a membrane within rounding of the threshold can fire in one layout only.
* ``inplace_bn``: without autograd, the tokenizer's BatchNorm overwrites the conv output it reads
  (PyTorch's own kernel with ``out=`` its input: the module's values, bit for bit), one map fewer.
* ``recompute``: in training, BN -> SN -> max-pool between two tokenizer convolutions keeps only its
  input for backward and recomputes the rest there (values, gradients and running statistics of
  the module calls, bit for bit), for maps of at least :data:`RECOMPUTE_MIN_ELEMENTS` elements
  that ``fused_spike_pool`` does not take.
* ``fused_spike_pool``: on the CPU, with ``channels_last``, the tokenizer's BN -> SN [-> max-pool] runs
  as one pass of the C++ kernel each way (in training PyTorch finds BN's batch statistics first
  and does BN's own backward after), no BN output, full-size spike map or max-pool indices in memory.
  Spikes, gradients and BN's arithmetic are those of the module calls, bit for bit where PyTorch's
  BN kernel is its x86 FMA build (``AVX2``/``AVX512`` capability; elsewhere rounding may differ).
  Under bf16 autocast it runs likewise, bit for bit in that dtype: the kernel reads and
  writes it, and rounds BN's output to it as PyTorch's mixed-precision BN kernel stores it.
* ``fused_bn_spike``: in training on the CPU, a block's ConvBN -> SN (token BatchNorm, then neuron)
  runs as one pass of the C++ kernel from BN's batch statistics, and keeps only BN's input and
  those statistics for backward, where one pass computes BN's output and the membrane again: BN's
  output is neither written nor kept for the neuron's backward. Spikes, gradients and running
  statistics are those of the module calls, bit for bit where PyTorch's BN kernel is its x86 FMA
  build (as ``fused_spike_pool``; under autocast too, as there). In inference (no autograd, BN with
  running statistics) the same ConvBN -> SN is one pass of the kernel, with no BN output written.
* ``token_linear``: the dense products of float32 CPU token linears with at least
  :data:`ONEDNN_MIN_WEIGHTS` weights (the forward, and the input gradient; also those of
  ``spike_linear``: its input gradient, and its forward where the input is not sparse spikes) run
  through oneDNN's matmul instead of MKL's ``sgemm`` (:mod:`spikingformer.kernels.products`;
  another summation order than ``F.linear``: float32 rounding differs).
* ``spike_linear``: float32 CPU token linears whose input is spikes (every element 0 or 1) with a
  firing rate of at most :data:`SPIKE_LINEAR_MAX_DENSITY` (per ISA), and at least
  :data:`SPIKE_LINEAR_MIN_WORK` rows x in x out (per ISA and pass), sum the weight columns of each
  row's spikes, bias first, in ascending column order: the paper's accumulate-only synaptic
  operations, so the work falls with the firing rate. Another summation order than ``F.linear``'s:
  float32 rounding differs. The weight gradient sums output-gradient rows likewise; the input
  gradient is PyTorch's dense product. Where the blocks pass a neuron's output
  (``TokenLinear(x, spikes=True)``), autograd keeps the input as bits (1/32 of its float32 size).
  Under CPU bf16 autocast, where bf16 products run on vector units (:func:`spike_limit_bf16`),
  the same sums of autocast's bf16 weights (and output-gradient rows) in float32, each rounded
  once to bf16 as the dense product rounds its float32 sums: the same values but for the
  summation order; elsewhere (and for float16) autocast's dense product, bit for bit, with the
  bits replacing the 16-bit copy of the input. Takes precedence over ``token_linear``.
* ``spike_conv``: the tokenizer's 3x3 convolutions of spike maps (stages 1-4, behind a spiking
  neuron) with at least :data:`SPIKE_CONV_MIN_CHANNELS` input channels, two ways
  (:mod:`spikingformer.kernels.spike_conv`). At a firing rate of at most
  :data:`SPIKE_CONV_MAX_DENSITY` (per ISA and pass), the weights of each window's spikes are added
  (the spike linear's kernel). In training, up to its ``weight_grad`` rate (on a CPU with AMX at
  any rate), autograd keeps the spikes as bits, the input gradient is PyTorch's and the weight
  gradient adds the output gradient at every window's spike (above that rate PyTorch's, of the
  unpacked bits). Else, on a CPU with AMX, in inference and in training's forward, three int8
  convolutions of oneDNN (each weight three 8-bit pieces per output channel, to 2^-24 of the
  channel's largest, cut again for each version of the weight; sums exact in int32); elsewhere
  the float32 convolution. Under CPU bf16 autocast, where :data:`SPIKE_CONV_BF16` has limits, the
  sums of autocast's bf16 weights in float32, each rounded once to bf16 (the weight gradient's
  too). Each way rounds otherwise than the dense convolution, so values differ by rounding.
* ``winograd``: the tokenizer's float32 3x3 convolutions that the spike routes leave dense (the maps
  above ``spike_conv``'s firing-rate limits, the stage-0 convolution where it is wide enough, the
  dense convolutions inside ``spike_conv``'s operators), with at least
  :data:`WINOGRAD_MIN_CHANNELS` input and output channels (per ISA), outside ``torch.compile``
  and ``torch.jit.trace``: by Winograd's F(2x2, 3x3) (:mod:`spikingformer.kernels.winograd`: 16 products
  per tile of 2x2 outputs where the direct convolution takes 36, the transforms in C++), the
  forward and, in training, the input and weight gradients. The
  transforms add and subtract before and after the products: float32 rounding differs from the
  direct convolution's (no larger against float64, measured). Under CPU bf16 autocast, where bf16
  products run on vector units and :data:`WINOGRAD_MIN_CHANNELS_BF16` has a limit, the same in
  bf16 on autocast's casts (transforms in float32, each result rounded once to bf16; against
  float64 about 1.5-3x the direct bf16 convolution's error, within about one bf16 step of the
  largest output).
* ``batch_pieces``: in inference (no autograd, the tokenizer in eval mode, no hooks on it or its
  modules), the tokenizer runs on pieces of the batch whose stem output holds at most
  :data:`~spikingformer.layers.batch_pieces.PIECE_BYTES` on the CPU, and joins the
  pieces' tokens: every map of the tokenizer is that much smaller. Samples are independent there
  (BatchNorm uses its running statistics); a convolution over fewer images may pick another
  algorithm, so float32 values may differ by rounding. On a GPU, whose host issues the
  tokenizer's kernels once per piece (such pieces made event inference 1.9-2.2x as slow on an
  H200), a piece may fill 1/16 of its memory (:func:`~spikingformer.layers.batch_pieces.piece_elements`).
* ``attention_order``: spike attention computes ``Q (K^T V)`` instead of ``(Q K^T) V`` when that
  is cheaper (N > d); the same numbers in float32 for spikes and a power-of-two scale (under bf16
  autocast each order rounds its products' sums above 256, differently).
* ``fused_attention``: with ``attention_order``'s ``Q (K^T V)``, on the CPU, for float32 or bf16
  heads of 16, 32, 48 or 64 channels, the C++ kernels of :mod:`spikingformer.kernels.attention`
  compute the heads' products and their gradients from and into token rows: no copies into
  head-major layouts. The products' values bit for bit for spikes (in bf16 too: each product's
  sums rounded once, as PyTorch's); gradients the same arithmetic in another summation order.

Which are on by default depends on the CPU's vector ISA (:func:`default_routes`): a speed route
is on only where it measured faster (``token_linear`` by the CPU's vendor and ISA: with AVX-512
where MKL runs its generic code, :func:`~spikingformer.cpu_features.mkl_generic`); ``recompute``, ``fused_bn_spike``
and ``batch_pieces`` (memory) and ``stem_once`` (less work) are on everywhere. The choice is fixed
per ISA and vendor, so seeded runs on one machine stay reproducible.

**The switch** is ``SPIKINGFORMER_ROUTES``, read when this module is imported: comma-separated
items applied left to right to this machine's default set: ``none`` (all
off), ``all``, ``name`` or ``+name`` (on), ``-name`` (off). ``SPIKINGFORMER_ROUTES=none`` runs the
plain module calls; ``SPIKINGFORMER_ROUTES=-token_linear,-recompute`` turns those two off. In code,
``with routes.configured("none"): ...`` applies the same syntax to the routes in force.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterable, Iterator

from spikingformer.cpu_features import bf16_matrix_tiles, mkl_generic, native_bf16, vector_isa

ROUTES = ("stem_once", "channels_last", "inplace_bn", "recompute", "fused_spike_pool", "fused_bn_spike",
          "token_linear", "spike_linear", "spike_conv", "attention_order", "fused_attention", "batch_pieces", "winograd")
ENV = "SPIKINGFORMER_ROUTES"
ONEDNN_MIN_WEIGHTS = 1 << 16  # with token_linear on, smaller layers keep F.linear
RECOMPUTE_MIN_ELEMENTS = 1 << 24  # maps of 64 MB (fp32) and up: event and ImageNet resolutions


cpu_isa = vector_isa  # the key of MEASURED_FASTER


# Per ISA, the speed routes that measured faster there: the geometric mean of their on / off time
# ratios over the zoo models' cases of benchmarks/study_routes.py below 1 (docs/performance.md,
# "Routes by ISA"). An ISA not measured runs the plain module calls.
_FASTER_ON_X86 = frozenset({"channels_last", "inplace_bn", "fused_spike_pool", "spike_linear", "spike_conv",
                            "attention_order", "fused_attention"})
# winograd on AVX2: an AVX2-only AMD EPYC (Zen 3) measured it 0.95 over its cases, the whole event
# model 0.85 (inference) and 0.95 (training); with AVX-512 on AMD's CPUs only (ON_WHERE_MKL_IS_GENERIC).
MEASURED_FASTER = {"avx512": _FASTER_ON_X86, "avx2": _FASTER_ON_X86 | {"winograd"}}
# Per ISA, the firing rate up to which spike_linear's accumulation beat the dense product of the
# zoo's token-linear shapes (docs/performance-log.md, "Spike linear"); above it, F.linear. AVX2's is
# the AVX2-only AMD EPYC Zen 3's (geometric mean 0.95 at 0.40, 1.03 at 0.45), lower than what AVX-512
# CPUs capped at AVX2 allowed (0.50).
SPIKE_LINEAR_MAX_DENSITY = {"avx512": 0.30, "avx2": 0.40}
# Per ISA, the same under CPU bf16 autocast, against autocast's bf16 dense product where that runs
# on vector units (AVX512-BF16; measured on an AMD EPYC Zen 4: docs/performance-log.md, "Spike
# linear in bf16"). None where bf16 products run on matrix tiles (AMX: cpu_features.bf16_matrix_tiles),
# whose dense product beat the sums at every rate measured, 0.05-0.50 (an Intel Xeon with AMX, "Spike
# linear in bf16 on AMX"), nor where bf16 is not native: the dense product stays there.
SPIKE_LINEAR_MAX_DENSITY_BF16 = {"avx512": 0.15}
# Per ISA, the bf16 limit of wide layers (out_features >= 2 in_features: the MLPs' fc1), which beat
# the dense product at 0.20 too (0.77-0.89 of its time; square and narrow ones 0.90-1.13).
SPIKE_LINEAR_MAX_DENSITY_BF16_WIDE = {"avx512": 0.20}
# Per ISA and pass, the least work (rows x in x out) for which spike_linear measured faster (in bf16
# too): below it the kernels' fixed costs (operator call, gathers, the weight's tiled copy) outweigh
# what they save.
SPIKE_LINEAR_MIN_WORK = {"avx512": {"train": 1 << 27, "infer": 1 << 23}, "avx2": {"train": 1 << 24, "infer": 1 << 22}}
# Per ISA, the least input channels for which spike_conv measured faster than the float32
# convolution on the zoo's tokenizer shapes, and the firing rates up to which its accumulation did:
# "infer", the inference forward (on AVX-512: beat the int8 pieces too); "train", the training
# forward and backward together; "weight_grad" (at least "train"), the weight gradient alone, the
# forward above "train" being the float32 convolution (docs/performance-log.md, "Spike convolution").
SPIKE_CONV_MIN_CHANNELS = {"avx512": 64, "avx2": 64}
SPIKE_CONV_MAX_DENSITY = {"avx512": {"train": 0.20, "infer": 0.10, "weight_grad": 0.20},
                          "avx2": {"train": 0.30, "infer": 0.30, "weight_grad": 0.45}}
# Per ISA, the least input and output channels for which winograd's F(2x2, 3x3) measured faster than
# oneDNN's direct 3x3 convolution on the zoo's tokenizer shapes (benchmarks/study_winograd.py; an
# AVX2-only AMD EPYC Zen 3: 1.06-1.71x from 64 input channels, the 32-48-channel layers slower or
# level; an AMD EPYC Zen 4 with AVX-512: 1.14-1.33x from 96 input channels, 0.93x at 64). An ISA not
# measured has none: the route does not run there.
WINOGRAD_MIN_CHANNELS = {"avx512": 96, "avx2": 64}
# Per ISA, the same under CPU bf16 autocast where bf16 products run on vector units (bf16_limit),
# against autocast's bf16 direct convolution (an AMD EPYC Zen 4: forward 1.11-1.43x, input gradient
# 1.11-1.44x from 64 input channels, 0.77-0.84x at 32-48). None elsewhere (AMX's tiles: unmeasured).
WINOGRAD_MIN_CHANNELS_BF16 = {"avx512": 64}
# Per ISA, spike_conv's limits on the layers winograd takes (each at most SPIKE_CONV_MAX_DENSITY's): there
# the dense alternative is F(2x2, 3x3), not the direct convolution the others were placed against
# (benchmarks/bench_spike_conv.py). "infer", on the Zen 3: Winograd's time over the accumulation's on
# the six layers from 64 channels, geometric mean 1.05 at a firing rate of 0.20, 0.86 at 0.25, 0.73 at
# 0.30. "weight_grad", capped at AVX2 on a Zen 4 (ONEDNN_MAX_CPU_ISA=AVX2, x86-64-v3 kernels) since
# the weight gradient runs by F(2x2, 3x3) too: the summed weight gradient ahead of the route's dense
# form on five of the six layers at 0.30, level at 0.35 (geometric means 1.31x and 1.29x autograd's
# direct step), behind on all six at 0.40.
SPIKE_CONV_BESIDE_WINOGRAD = {"avx2": {"infer": 0.20, "weight_grad": 0.35}}
# Per ISA, the same under CPU bf16 autocast where bf16 runs on vector units, with its least input channels
# (an AMD EPYC Zen 5: docs/performance-log.md, "Spike convolution in bf16"); elsewhere the dense convolution.
SPIKE_CONV_BF16 = {"avx512": {"min_channels": 128, "train": 0.10, "infer": 0.10, "weight_grad": 0.10}}
# On x86 CPUs that are not Intel's, where MKL's float32 products run its generic code (at most
# AVX2): oneDNN's matmul measured 1.2-2.3x faster on the token linears' forward and input
# gradient there with AVX-512 (AMD EPYC, Zen 5) and 1.09-1.21x capped at AVX2 (docs/performance-log.md,
# "Products through oneDNN"); on Intel CPUs MKL measured as fast or faster (an Intel Xeon with AMX:
# MKL's time / oneDNN's 0.83-1.16 on their forward and input gradient, whole models 1.00-1.03x as
# long with the route on, on AVX-512 and capped at AVX2). Per ISA: on an AVX2-only AMD EPYC (Zen 3)
# MKL's generic code was as fast or faster (oneDNN's time 0.90-1.28x MKL's on the forward and input
# gradient, whole models 1.03-1.09x as long in training with the route), so AVX-512 only.
# winograd with AVX-512 here too: measured on an AMD EPYC Zen 4 alone (0.94 over its cases, whole
# models 0.85-0.96), whose FMA units are 256 bits wide; Intel's AVX-512 CPUs, with 512-bit units for
# the direct convolution, have not measured it.
ON_WHERE_MKL_IS_GENERIC = {"avx512": frozenset({"token_linear", "winograd"})}
# On everywhere: recompute, fused_bn_spike and batch_pieces for memory (the first and last cost
# time, the second measured 0.96-1.02 of it) and stem_once for work (T - 1 fewer stem convolutions,
# which deployment's operation counts rely on; no slower where measured).
ALWAYS_ON = frozenset({"recompute", "fused_bn_spike", "batch_pieces", "stem_once"})


def default_routes() -> frozenset[str]:
    """The routes on when ``SPIKINGFORMER_ROUTES`` says nothing: those measured faster on this
    CPU's ISA (:func:`cpu_isa`), the ISA's :data:`ON_WHERE_MKL_IS_GENERIC` where MKL runs its generic
    code, and :data:`ALWAYS_ON`."""
    isa = cpu_isa()
    on = MEASURED_FASTER.get(isa, frozenset()) | ALWAYS_ON
    return on | ON_WHERE_MKL_IS_GENERIC.get(isa, frozenset()) if mkl_generic() else on


def parse(spec: str, start: Iterable[str]) -> frozenset[str]:
    """The routes ``spec`` (the ``SPIKINGFORMER_ROUTES`` syntax) leaves on, starting from ``start``."""
    on = set(start)
    for item in filter(None, (s.strip() for s in spec.split(","))):
        if item in ("all", "none"):
            on = set(ROUTES) if item == "all" else set()
            continue
        sign, name = (item[0], item[1:]) if item[0] in "+-" else ("+", item)
        if name not in ROUTES:
            raise ValueError(f"{ENV}: unknown route {name!r} in {spec!r}; use 'all', 'none' or route names "
                             f"({', '.join(ROUTES)}), each optionally prefixed with + or -")
        (on.add if sign == "+" else on.discard)(name)
    return frozenset(on)


_active = parse(os.environ.get(ENV, ""), default_routes())
# spike_linear's limits here (an ISA not measured gets the strictest measured)
_spike_max_density = SPIKE_LINEAR_MAX_DENSITY.get(cpu_isa(), min(SPIKE_LINEAR_MAX_DENSITY.values()))


def bf16_limit(table: dict = SPIKE_LINEAR_MAX_DENSITY_BF16):
    """A route's limit under bf16 autocast on this CPU (default: spike_linear's firing rate): ``table``'s
    entry for its ISA where bf16 is native and its products run on vector units; else None (autocast's ops)."""
    return table.get(cpu_isa()) if native_bf16() and not bf16_matrix_tiles() else None


_spike_max_density_bf16 = bf16_limit()
_spike_max_density_bf16_wide = SPIKE_LINEAR_MAX_DENSITY_BF16_WIDE.get(cpu_isa())
_spike_min_work = SPIKE_LINEAR_MIN_WORK.get(cpu_isa(), SPIKE_LINEAR_MIN_WORK["avx512"])
_spike_conv_min_channels = SPIKE_CONV_MIN_CHANNELS.get(cpu_isa(), max(SPIKE_CONV_MIN_CHANNELS.values()))
_spike_conv_max_density = SPIKE_CONV_MAX_DENSITY.get(cpu_isa(), {p: min(d[p] for d in SPIKE_CONV_MAX_DENSITY.values())
                                                                   for p in ("train", "infer", "weight_grad")})
_spike_conv_bf16 = bf16_limit(SPIKE_CONV_BF16)
_winograd_min_channels = WINOGRAD_MIN_CHANNELS.get(cpu_isa())
_winograd_min_channels_bf16 = bf16_limit(WINOGRAD_MIN_CHANNELS_BF16)
_spike_conv_beside_winograd = SPIKE_CONV_BESIDE_WINOGRAD.get(cpu_isa(), {})


def spike_limit_bf16(in_features: int, out_features: int) -> float | None:
    """spike_linear's firing-rate limit under bf16 autocast for a layer of this shape: None where the
    route has no bf16 limit on this CPU (:func:`bf16_limit`), else that limit, raised to
    :data:`SPIKE_LINEAR_MAX_DENSITY_BF16_WIDE` for wide layers (``out_features >= 2 * in_features``)."""
    base = _spike_max_density_bf16
    if base is None or _spike_max_density_bf16_wide is None or out_features < 2 * in_features:
        return base
    return max(base, _spike_max_density_bf16_wide)


def enabled(name: str) -> bool:
    """True when route ``name`` is on."""
    if name not in ROUTES:
        raise KeyError(f"unknown route {name!r}; routes: {', '.join(ROUTES)}")
    return name in _active


def active() -> frozenset[str]:
    """The routes on now."""
    return _active


@contextlib.contextmanager
def configured(spec: str) -> Iterator[frozenset[str]]:
    """Within the ``with`` block, the routes ``spec`` (``SPIKINGFORMER_ROUTES`` syntax) leaves on."""
    global _active
    saved = _active
    _active = parse(spec, saved)
    try:
        yield _active
    finally:
        _active = saved


_MOVED_TO_BN_SPIKE = frozenset({"spike_maps", "repeat_steps", "max_pool", "spike_pool", "bn_spike_pool_plain",
                                "bn_spike_pool", "bn_spike_tokens"})


def __getattr__(name: str):
    """The BN -> SN [-> max-pool] routes where they lived before :mod:`spikingformer.layers.bn_spike`."""
    if name in _MOVED_TO_BN_SPIKE:
        from spikingformer.layers import bn_spike

        return getattr(bn_spike, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
