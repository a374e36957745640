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

Which are on by default depends on the CPU's vector ISA (:func:`default_routes`): a speed route
is on only where it measured faster (``token_linear`` by the CPU's vendor: where MKL runs its
generic code, :func:`~spikingformer.cpu_features.mkl_generic`); ``recompute``, ``fused_bn_spike``
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
from typing import Callable

import torch
from torch import nn

from spikingformer import kernels
from spikingformer.cpu_features import bf16_matrix_tiles, mkl_generic, native_bf16, vector_isa
from spikingformer.kernels import ops
from spikingformer.neuron import MultiStepLIF, multistep_lif

ROUTES = ("stem_once", "channels_last", "inplace_bn", "recompute", "fused_spike_pool", "fused_bn_spike",
          "token_linear", "spike_linear", "spike_conv", "attention_order", "batch_pieces")
ENV = "SPIKINGFORMER_ROUTES"
ONEDNN_MIN_WEIGHTS = 1 << 16  # with token_linear on, smaller layers keep F.linear
RECOMPUTE_MIN_ELEMENTS = 1 << 24  # maps of 64 MB (fp32) and up: event and ImageNet resolutions


cpu_isa = vector_isa  # the key of MEASURED_FASTER


# Per ISA, the speed routes that measured faster there: the geometric mean of their on / off time
# ratios over the zoo models' cases of benchmarks/study_routes.py below 1 (docs/performance.md,
# "Routes by ISA"). An ISA not measured runs the plain module calls.
_FASTER_ON_X86 = frozenset({"channels_last", "inplace_bn", "fused_spike_pool", "spike_linear", "spike_conv",
                            "attention_order"})
MEASURED_FASTER = {"avx512": _FASTER_ON_X86, "avx2": _FASTER_ON_X86}
# Per ISA, the firing rate up to which spike_linear's accumulation beat the dense product of the
# zoo's token-linear shapes (docs/performance-log.md, "Spike linear"); above it, F.linear.
SPIKE_LINEAR_MAX_DENSITY = {"avx512": 0.30, "avx2": 0.45}
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
# Per ISA, the same under CPU bf16 autocast where bf16 runs on vector units, with its least input channels
# (an AMD EPYC Zen 5: docs/performance-log.md, "Spike convolution in bf16"); elsewhere the dense convolution.
SPIKE_CONV_BF16 = {"avx512": {"min_channels": 128, "train": 0.10, "infer": 0.10, "weight_grad": 0.10}}
# On x86 CPUs that are not Intel's, where MKL's float32 products run its generic code (at most
# AVX2): oneDNN's matmul measured 1.2-2.3x faster on the token linears' forward and input
# gradient there with AVX-512 (AMD EPYC, Zen 5) and 1.09-1.21x capped at AVX2 (docs/performance-log.md,
# "Products through oneDNN"); on Intel CPUs MKL measured as fast or faster (an Intel Xeon with AMX:
# MKL's time / oneDNN's 0.83-1.16 on their forward and input gradient, whole models 1.00-1.03x as
# long with the route on, on AVX-512 and capped at AVX2).
ON_WHERE_MKL_IS_GENERIC = frozenset({"token_linear"})
# On everywhere: recompute, fused_bn_spike and batch_pieces for memory (the first and last cost
# time, the second measured 0.96-1.02 of it) and stem_once for work (T - 1 fewer stem convolutions,
# which deployment's operation counts rely on; no slower where measured).
ALWAYS_ON = frozenset({"recompute", "fused_bn_spike", "batch_pieces", "stem_once"})


def default_routes() -> frozenset[str]:
    """The routes on when ``SPIKINGFORMER_ROUTES`` says nothing: those measured faster on this
    CPU's ISA (:func:`cpu_isa`), :data:`ON_WHERE_MKL_IS_GENERIC` where MKL runs its generic code,
    and :data:`ALWAYS_ON`."""
    on = MEASURED_FASTER.get(cpu_isa(), frozenset()) | ALWAYS_ON
    return on | ON_WHERE_MKL_IS_GENERIC if mkl_generic() else on


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


# ----------------------------------------------------------------------------- channels_last


def spike_maps(neuron: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    """``neuron(x)`` for ``(T, B, C, H, W)`` maps; with ``channels_last``, run on the ``(T, B, H, W, C)``
    permutation (elementwise over all but T, so the same values), which for channels-last maps is
    a contiguous view: the neuron reads and writes memory in order and its spikes stay channels-last."""
    if enabled("channels_last"):
        return neuron(x.permute(0, 1, 3, 4, 2)).permute(0, 1, 4, 2, 3)
    return neuron(x)


def repeat_steps(y: torch.Tensor, time_steps: int) -> torch.Tensor:
    """``(1, B, C, H, W)`` -> ``(T, B, C, H, W)``: T copies in memory of their own (later stages may
    overwrite their input, ``inplace_bn``), each map in the tokenizer's memory format."""
    if enabled("channels_last"):
        z = y.permute(0, 1, 3, 4, 2)
        return z.expand(time_steps, *z.shape[1:]).contiguous().permute(0, 1, 4, 2, 3)
    return y.expand(time_steps, *y.shape[1:]).contiguous()


def max_pool(x: torch.Tensor) -> torch.Tensor:
    """MaxPool2d(kernel 3, stride 2, padding 1) on ``(T, B, C, H, W)``."""
    t, b = x.shape[:2]
    y = nn.functional.max_pool2d(x.flatten(0, 1), kernel_size=3, stride=2, padding=1)
    return y.view(t, b, *y.shape[1:])


# ----------------------------------------------------------------------------- inplace_bn, recompute


def _kernel_takes(lif: nn.Module, x: torch.Tensor) -> bool:
    """Whether the C++ tokenizer kernel (:func:`kernels.cpu_backend.lif_pool_forward`) computes SN of
    ``x`` in its layout ``(T, B, H, W, C)`` for ``lif``: contiguous float32 or bfloat16 CPU values,
    a plain :class:`MultiStepLIF` on the CPU kernel with no hooks to call (firing-rate meters must
    see its spikes), and the kernel library built."""
    return (x.device.type == "cpu" and x.dtype in kernels.cpu_backend.MAP_DTYPES and x.dim() == 5
            and x.is_contiguous() and type(lif) is MultiStepLIF and lif.backend in ("auto", "cpu")
            and not (lif._forward_hooks or lif._forward_pre_hooks)
            and not (nn.modules.module._global_forward_hooks or nn.modules.module._global_forward_pre_hooks)
            and kernels.select_backend(x) == "cpu")


def _fused_kernel_takes(lif: nn.Module, z: torch.Tensor) -> bool:
    """Whether ``fused_spike_pool`` computes SN [-> max-pool] of the channels-last maps ``z``
    ``(T, B, C, H, W)`` for ``lif`` (:func:`_kernel_takes`)."""
    return enabled("fused_spike_pool") and z.dim() == 5 and _kernel_takes(lif, z.permute(0, 1, 3, 4, 2))


def spike_pool(neuron: Callable[[torch.Tensor], torch.Tensor], lif: nn.Module, pool: bool,
               z: torch.Tensor) -> torch.Tensor:
    """``[MP](neuron(z))`` for BN output maps ``z``; ``neuron`` is ``lif`` or a hook-free call of its
    maths. With ``fused_spike_pool``, SN -> max-pool runs as one kernel pass each way."""
    if pool and _fused_kernel_takes(lif, z):
        return ops.lif_pool_op(z.permute(0, 1, 3, 4, 2), lif.params).permute(0, 1, 4, 2, 3)
    x = spike_maps(neuron, z)
    return max_pool(x) if pool else x


def _inference_bn(bn: nn.Module, kind: type[nn.Module] = nn.BatchNorm2d) -> bool:
    return (not torch.is_grad_enabled() and isinstance(bn, kind) and not bn.training and bn.affine
            and bn.running_mean is not None)


def _kernel_bn(bn: nn.Module, kind: type[nn.Module]) -> bool:
    """An inference BatchNorm (:func:`_inference_bn`) the inference kernel applies as PyTorch would: no
    hooks to call, an eps this PyTorch takes (else the module call raises F.batch_norm's error), and
    the kernel's rounding that of PyTorch's CPU kernel in use."""
    return (_inference_bn(bn, kind) and _eps_accepted(bn.eps) and not (bn._forward_hooks or bn._forward_pre_hooks)
            and kernels.cpu_backend.kernel_reproduces_bn())


def _eps_accepted(eps: float) -> bool:
    """Whether this PyTorch's ``F.batch_norm`` takes ``eps`` in inference (:func:`ops.check_batch_norm_eps`)."""
    try:
        ops.check_batch_norm_eps(eps, training=False)
    except ValueError:
        return False
    return True


def _bn_lif_kernel(bn: nn.Module, lif: nn.Module, pool: bool, x: torch.Tensor) -> torch.Tensor:
    """BN with running statistics -> SN [-> max-pool] of ``x`` in the kernel's layout ``(T, B, H, W, C)``,
    one pass of the inference kernel."""
    p = lif.params
    return ops.bn_lif_pool(x, bn.running_mean, bn.running_var, bn.weight, bn.bias, bn.eps, p.tau, p.v_threshold,
                           p.v_reset, pool)


def bn_spike_pool_plain(stage: nn.Module, lif: nn.Module, pool: bool, y: torch.Tensor) -> torch.Tensor:
    """``[MP](SN(BN(y)))`` by module calls: the BN of ``stage`` (a ConvBN) on its conv output ``y``.

    In inference (no autograd, BN with running statistics): with ``fused_spike_pool`` the three run as
    one kernel pass; else with ``inplace_bn`` the BN overwrites ``y``, which must then own its
    memory (no expanded view). Not while ``torch.compile`` traces: the compiler plans the memory
    itself, and Dynamo of PyTorch 2.11 refuses that ``out=`` (a channels-last view).
    """
    bn = stage.bn
    if _inference_bn(bn):  # F.batch_norm's check, which the native operators below skip
        ops.check_batch_norm_eps(bn.eps, training=False)
    if _kernel_bn(bn, nn.BatchNorm2d) and _fused_kernel_takes(lif, y):
        return _from_kernel(_bn_lif_kernel(bn, lif, pool, _to_kernel(y)), tokens=False)
    if enabled("inplace_bn") and _inference_bn(bn) and not torch.compiler.is_compiling():
        flat = y.flatten(0, 1)
        torch.ops.aten.native_batch_norm.out(flat, bn.weight, bn.bias, bn.running_mean, bn.running_var, False, 0.0,
                                             bn.eps, out=flat, save_mean=bn.running_mean.new_empty(0),
                                             save_invstd=bn.running_mean.new_empty(0))
        z = y
    else:
        z = stage.normalize(y)
    return spike_pool(lif, lif, pool, z)


def _bn_spike_pool_again(stage: nn.Module, lif: MultiStepLIF, pool: bool, y: torch.Tensor) -> torch.Tensor:
    """:func:`bn_spike_pool_plain` in training again, bit for bit, for :class:`_RecomputedBNSpikePool`'s
    backward: batch statistics without touching the running estimates a second time, and no module
    calls, so forward hooks (firing-rate meters) do not see the batch twice."""
    bn = stage.bn
    z = nn.functional.batch_norm(y.flatten(0, 1), None, None, bn.weight, bn.bias, True, 0.0, bn.eps).view(y.shape)
    return spike_pool(lambda s: multistep_lif(s, lif.params, lif.backend), lif, pool, z)


class _RecomputedBNSpikePool(torch.autograd.Function):
    """:func:`bn_spike_pool_plain` in training, keeping only its input ``y`` for backward.

    Autograd would keep the BN output, the spikes and the max-pool's int64 indices, the size of the
    largest feature maps; this keeps the conv output (which BN's backward keeps anyway) and
    recomputes BN, neuron and max-pool in backward.
    """

    @staticmethod
    def forward(ctx, y, weight, bias, stage, lif, pool):
        ctx.stage, ctx.lif, ctx.pool = stage, lif, pool
        device = y.device.type
        ctx.autocast = (device, torch.is_autocast_enabled(device), torch.get_autocast_dtype(device))
        ctx.save_for_backward(y)
        return bn_spike_pool_plain(stage, lif, pool, y.detach())  # module calls: running statistics, hooks

    @staticmethod
    def backward(ctx, grad):
        (y,) = ctx.saved_tensors
        bn = ctx.stage.bn
        device, enabled_, dtype = ctx.autocast
        with torch.enable_grad(), torch.autocast(device, dtype=dtype, enabled=enabled_):
            y = y.detach().requires_grad_()
            out = _bn_spike_pool_again(ctx.stage, ctx.lif, ctx.pool, y)
        wanted = [t for t, need in zip((y, bn.weight, bn.bias), ctx.needs_input_grad[:3]) if need]
        grads = iter(torch.autograd.grad(out, wanted, grad))
        return (*(next(grads) if need else None for need in ctx.needs_input_grad[:3]), None, None, None)


def _training_bn(bn: nn.Module) -> bool:
    """A plain training BatchNorm (1d over token rows, 2d over maps) with running statistics and
    affine parameters, no hooks, whose output the kernel computes with PyTorch's rounding."""
    return (type(bn) in (nn.BatchNorm1d, nn.BatchNorm2d) and bn.training and bn.affine and bn.track_running_stats
            and bn.running_mean is not None and not (bn._forward_hooks or bn._forward_pre_hooks)
            and kernels.cpu_backend.kernel_reproduces_bn())


# A BN input in the fused kernel's layout (T, B, H, W, C) and back, and as its BatchNorm module sees
# it: channels-last maps (T, B, C, H, W) for BatchNorm2d over T*B maps, tokens (T, B, N, C) (as maps
# of N x 1 pixels) for BatchNorm1d over T*B*N rows.
def _to_kernel(y: torch.Tensor) -> torch.Tensor:
    return y.unsqueeze(3) if y.dim() == 4 else y.permute(0, 1, 3, 4, 2)


def _from_kernel(x: torch.Tensor, tokens: bool) -> torch.Tensor:
    return x.squeeze(3) if tokens else x.permute(0, 1, 4, 2, 3)


def _bn_view(y: torch.Tensor) -> torch.Tensor:
    return y.reshape(-1, y.shape[-1]) if y.dim() == 4 else y.flatten(0, 1)


def _fused_bn_spike(bn: nn.Module, lif: nn.Module, pool: bool, y: torch.Tensor) -> torch.Tensor:
    """``fused_spike_pool`` (maps, with a max-pool) and ``fused_bn_spike`` (tokens) in training:
    BN -> SN [-> max-pool] of ``y`` by :func:`~spikingformer.kernels.ops.bn_spike_train`, which
    keeps only BN's input and batch statistics for backward: BN's output is neither written nor
    kept, and backward computes it again in its one pass."""
    tokens = y.dim() == 4
    out = ops.bn_spike_train(_to_kernel(y), bn.running_mean, bn.running_var, bn.num_batches_tracked, bn.momentum,
                             bn.weight, bn.bias, bn.eps, lif.params, pool, tokens)
    return _from_kernel(out, tokens)


def bn_spike_pool(stage: nn.Module, lif: nn.Module, pool: bool, y: torch.Tensor) -> torch.Tensor:
    """``[MP](SN(BN(y)))`` for a ConvBN's conv output ``y``. In training (not for a neuron with state
    or hooks): with ``fused_spike_pool``, :func:`_fused_bn_spike` (under ``torch.compile`` too: an
    operator); else with ``recompute`` (not under ``torch.compile``, whose partitioner decides what
    to keep) memory-lean for maps of at least :data:`RECOMPUTE_MIN_ELEMENTS` elements;
    :func:`bn_spike_pool_plain` otherwise."""
    bn = stage.bn
    training = torch.is_grad_enabled()
    if training and _training_bn(bn) and _fused_kernel_takes(lif, y):
        return _fused_bn_spike(bn, lif, pool, y)
    if (enabled("recompute") and training and not torch.compiler.is_compiling() and isinstance(bn, nn.BatchNorm2d)
            and bn.training and bn.affine and type(lif) is MultiStepLIF and y.numel() >= RECOMPUTE_MIN_ELEMENTS):
        return _RecomputedBNSpikePool.apply(y, bn.weight, bn.bias, stage, lif, pool)
    return bn_spike_pool_plain(stage, lif, pool, y)


def bn_spike_tokens(bn: nn.Module, lif: nn.Module, y: torch.Tensor) -> torch.Tensor:
    """``lif(bn(y))`` for a token linear's output ``y`` ``(T, B, N, C)`` and the BatchNorm1d ``bn``
    over its rows. With ``fused_bn_spike``: in training, :func:`_fused_bn_spike`: no BN output kept
    for the neuron's backward, which the kernel computes again from ``y``, the tensor BN's backward
    keeps anyway; in inference (no autograd, running statistics), one pass of the kernel: no BN
    output written."""
    if enabled("fused_bn_spike") and y.dim() == 4 and _kernel_takes(lif, _to_kernel(y)):
        if torch.is_grad_enabled() and _training_bn(bn):
            return _fused_bn_spike(bn, lif, False, y)
        if _kernel_bn(bn, nn.BatchNorm1d):
            return _from_kernel(_bn_lif_kernel(bn, lif, False, _to_kernel(y)), tokens=True)
    return lif(bn(_bn_view(y)).view(y.shape))
