"""Would Winograd's F(2x2, 3x3) lift the dense limit of the tokenizers' 3x3 convolutions? Side by side.

The valid limit of issue 12 (``dense_limit.py``) times each of a step's convolutions and products as
PyTorch runs them: oneDNN's direct 3x3 convolutions, at 70-97% of the FMA peak on the CPUs measured.
A step can beat that limit only with less arithmetic. The spike routes do it with the sparsity of
spikes; Winograd's minimal filtering does it for any input: F(2x2, 3x3) computes each 2x2 block of
outputs from a 4x4 tile of inputs with 16 products per input and output channel instead of 36
(2.25x fewer), at the price of transforms of the input tiles (4x the input's size) and of the 16
products' sums back to outputs, and of rounding (its transforms add and subtract inputs before
the products).

For each 3x3 convolution of the zoo models' tokenizers, with the inputs, shapes and memory layout
they have in an inference batch of ``bench_model.py`` (captured from the model by hooks, which keep
the ``batch_pieces`` memory route off: the whole batch at once), with this package's CPU allocator
installed as the models run with it, this times alternately on the same tensors:

* ``direct``: ``F.conv2d`` (oneDNN's direct convolution: the limit's);
* ``Winograd``: F(2x2, 3x3) in plain PyTorch (:func:`winograd_f2`): the input transform (additions
  into a (16, tiles, C) array), 16 products of (tiles x C) by (C x K) in one ``bmm``, the output
  transform (additions into the output in the input's layout); the weights' transform is left out
  (it changes only with the weights: once per inference model, once per training step);
* ``fused``: the same with each transform one C++ pass over the maps (:data:`TRANSFORMS_CPP`,
  built like the package's kernels; the same additions in the same order, so the same bits);
* ``products``: the 16 products alone, the ceiling of a Winograd convolution whose transforms were
  free.

and prints each one's median, the ratio of the direct convolution's to each other's (above 1: faster
than the direct convolution), and Winograd's rounding error against the float64 convolution beside the
direct one's (largest difference over the largest output).

Usage::

    python benchmarks/study_winograd.py                 # both models, all cores
    python benchmarks/study_winograd.py --quick         # tiny shapes: a smoke test
"""

from __future__ import annotations

import argparse
import functools
import statistics
import sys
import time

import common

MODELS = {"cifar": ("spikingformer_cifar10_4_384", 16), "event": ("spikingformer_cifar10dvs_2_256", 8)}
QUICK = [((2, 8, 8, 8), (16, 8, 3, 3), False), ((1, 3, 7, 5), (4, 3, 3, 3), True)]  # (input, weight, channels last)


def weight_transform(w):
    """U = G w G^T for each (output, input) channel pair, G as Lavin and Gray give it: (16, C, K), the
    products' right operands. (B^T and A^T, whose entries are 0 and +-1, are the additions of
    :func:`input_transform` and :func:`output_transform`.)"""
    import torch

    g = torch.tensor([[1, 0, 0], [0.5, 0.5, 0.5], [0.5, -0.5, 0.5], [0, 0, 1]], dtype=w.dtype)
    return torch.einsum("ij,kcjl,ml->imck", g, w, g).reshape(16, w.shape[1], w.shape[0]).contiguous()


def input_transform(x):
    """V = B^T d B for every 4x4 input tile d (stride 2, padding 1): (16, tiles, C), channels last."""
    import torch
    import torch.nn.functional as F

    n, c, h, w = x.shape
    th, tw = (h + 1) // 2, (w + 1) // 2
    xp = F.pad(x, (1, 1 + 2 * tw - w, 1, 1 + 2 * th - h))
    d = xp.unfold(2, 4, 2).unfold(3, 4, 2).permute(4, 5, 0, 2, 3, 1)  # (4 rows, 4 cols, N, th, tw, C), a view
    rows = (d[0] - d[2], d[1] + d[2], d[2] - d[1], d[1] - d[3])  # B^T d: each (4 cols, N, th, tw, C)
    v = torch.empty((4, 4, n, th, tw, c), dtype=x.dtype)
    for i, r in enumerate(rows):  # (B^T d) B
        torch.sub(r[0], r[2], out=v[i, 0])
        torch.add(r[1], r[2], out=v[i, 1])
        torch.sub(r[2], r[1], out=v[i, 2])
        torch.sub(r[1], r[3], out=v[i, 3])
    return v.view(16, n * th * tw, c)


def output_transform(m, shape, channels_last: bool):
    """Y = A^T M A for every tile's 16 products' sums m (16, tiles, K): the (N, K, H, W) output."""
    import torch

    n, k, h, w = shape
    th, tw = (h + 1) // 2, (w + 1) // 2
    m = m.view(4, 4, n, th, tw, k)
    y = torch.empty((n, th, 2, tw, 2, k), dtype=m.dtype)
    for a, s in enumerate((m[0] + m[1] + m[2], m[1] - m[2] - m[3])):  # A^T M: each (4, N, th, tw, K)
        y[:, :, a, :, 0] = s[0] + s[1] + s[2]
        y[:, :, a, :, 1] = s[1] - s[2] - s[3]
    y = y.view(n, 2 * th, 2 * tw, k)[:, :h, :w].permute(0, 3, 1, 2)  # (N, K, H, W); a copy only for odd H or W
    return y.contiguous(memory_format=torch.channels_last if channels_last else torch.contiguous_format)


def _channels_last(x) -> bool:
    """x is laid out channels last (and not also contiguous, as maps of one pixel are)."""
    import torch

    return x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous()


def winograd_f2(x, w, u=None):
    """The 3x3 convolution of x (N, C, H, W) with w (K, C, 3, 3), stride 1, padding 1, by F(2x2, 3x3);
    ``u``: the weights' transform (:func:`weight_transform`), computed here when not given."""
    import torch

    u = weight_transform(w) if u is None else u
    m = torch.bmm(input_transform(x), u)
    return output_transform(m, (x.shape[0], w.shape[0], x.shape[2], x.shape[3]), _channels_last(x))


# The two transforms as one pass each over channels-last maps (OpenMP over tiles, the channels in
# vector lanes), in the additions' order of input_transform / output_transform, so the same bits.
TRANSFORMS_CPP = r"""
#include <algorithm>
#include <cstdint>
namespace { constexpr int64_t kChunk = 64; }
extern "C" {
// x (N, H, W, C) -> v (16, tiles, C): V = B^T d B of each 4x4 tile d (stride 2, padding 1)
int wino_input(const float* x, float* v, int64_t n, int64_t h, int64_t w, int64_t c) {
  const int64_t th = (h + 1) / 2, tw = (w + 1) / 2, tiles = n * th * tw;
#pragma omp parallel for schedule(static)
  for (int64_t p = 0; p < tiles; ++p) {
    const int64_t b = p / (th * tw), ty = p / tw % th, tx = p % tw;
    const float* at[4][4];
    for (int i = 0; i < 4; ++i)
      for (int j = 0; j < 4; ++j) {
        const int64_t y = 2 * ty - 1 + i, xx = 2 * tx - 1 + j;
        at[i][j] = y >= 0 && y < h && xx >= 0 && xx < w ? x + ((b * h + y) * w + xx) * c : nullptr;
      }
    for (int64_t c0 = 0; c0 < c; c0 += kChunk) {
      const int64_t cn = std::min(kChunk, c - c0);
      float d[4][4][kChunk], t[4][4][kChunk];
      for (int i = 0; i < 4; ++i)
        for (int j = 0; j < 4; ++j)
          for (int64_t e = 0; e < cn; ++e) d[i][j][e] = at[i][j] ? at[i][j][c0 + e] : 0.0f;
      for (int j = 0; j < 4; ++j)
        for (int64_t e = 0; e < cn; ++e) {
          t[0][j][e] = d[0][j][e] - d[2][j][e];
          t[1][j][e] = d[1][j][e] + d[2][j][e];
          t[2][j][e] = d[2][j][e] - d[1][j][e];
          t[3][j][e] = d[1][j][e] - d[3][j][e];
        }
      for (int i = 0; i < 4; ++i) {
        float* out[4];
        for (int j = 0; j < 4; ++j) out[j] = v + ((int64_t)(4 * i + j) * tiles + p) * c + c0;
        for (int64_t e = 0; e < cn; ++e) {
          out[0][e] = t[i][0][e] - t[i][2][e];
          out[1][e] = t[i][1][e] + t[i][2][e];
          out[2][e] = t[i][2][e] - t[i][1][e];
          out[3][e] = t[i][1][e] - t[i][3][e];
        }
      }
    }
  }
  return 0;
}
// m (16, tiles, K) -> y (N, H, W, K): Y = A^T M A of each tile's 4x4 sums
int wino_output(const float* m, float* y, int64_t n, int64_t h, int64_t w, int64_t k) {
  const int64_t th = (h + 1) / 2, tw = (w + 1) / 2, tiles = n * th * tw;
#pragma omp parallel for schedule(static)
  for (int64_t p = 0; p < tiles; ++p) {
    const int64_t b = p / (th * tw), ty = p / tw % th, tx = p % tw;
    for (int64_t k0 = 0; k0 < k; k0 += kChunk) {
      const int64_t kn = std::min(kChunk, k - k0);
      const float* in[16];
      for (int q = 0; q < 16; ++q) in[q] = m + ((int64_t)q * tiles + p) * k + k0;
      float s[2][4][kChunk];
      for (int j = 0; j < 4; ++j)
        for (int64_t e = 0; e < kn; ++e) {
          s[0][j][e] = in[j][e] + in[4 + j][e] + in[8 + j][e];
          s[1][j][e] = in[4 + j][e] - in[8 + j][e] - in[12 + j][e];
        }
      for (int a = 0; a < 2; ++a) {
        const int64_t yy = 2 * ty + a;
        if (yy >= h) continue;
        float* row = y + ((b * h + yy) * w + 2 * tx) * k + k0;
        for (int64_t e = 0; e < kn; ++e) row[e] = s[a][0][e] + s[a][1][e] + s[a][2][e];
        if (2 * tx + 1 < w)
          for (int64_t e = 0; e < kn; ++e) row[k + e] = s[a][1][e] - s[a][2][e] - s[a][3][e];
      }
    }
  }
  return 0;
}
}
"""


@functools.lru_cache(maxsize=None)
def transforms_library():
    """The C++ transforms (:data:`TRANSFORMS_CPP`), built and cached as the package's kernels are, with
    their flags."""
    import ctypes

    from spikingformer.kernels.cpu_backend import CXX_FLAGS, _cpu_signature
    from spikingformer.native import NativeLibrary

    def declare(lib):
        for fn in (lib.wino_input, lib.wino_output):
            fn.argtypes = [ctypes.c_void_p, ctypes.c_void_p] + [ctypes.c_int64] * 4
            fn.restype = ctypes.c_int

    lib = NativeLibrary("study_winograd_transforms", lambda: TRANSFORMS_CPP, CXX_FLAGS, key=_cpu_signature,
                        declare=declare, openmp=True).get()
    if lib is None:
        raise RuntimeError("the C++ transforms could not be built (a C++ compiler is needed)")
    return lib


def winograd_f2_fused(x, u, k: int):
    """:func:`winograd_f2` for a float32 channels-last x with the transforms in C++ (one pass each)."""
    import torch

    n, c, h, w = x.shape
    th, tw = (h + 1) // 2, (w + 1) // 2
    xl = x.permute(0, 2, 3, 1).contiguous()  # a view's copy-free contiguous() where x is channels last
    v = torch.empty((16, n * th * tw, c))
    lib = transforms_library()
    lib.wino_input(xl.data_ptr(), v.data_ptr(), n, h, w, c)
    m = torch.bmm(v, u)
    y = torch.empty((n, h, w, k))
    lib.wino_output(m.data_ptr(), y.data_ptr(), n, h, w, k)
    return y.permute(0, 3, 1, 2)  # (N, K, H, W), channels last


def tokenizer_convolutions(key: str) -> list[tuple]:
    """The 3x3 stride-1 convolutions an inference batch of ``bench_model.py``'s model ``key`` runs:
    one (input, weight) per distinct shape, the input in the layout the model gives it."""
    import torch

    import bench_model

    name, batch = MODELS[key]
    model, x, _ = bench_model.build(dict(name=name, batch=batch, build="ours"))
    seen, found = set(), []

    def hook(module, inputs, _out):
        t = inputs[0]
        if module.kernel_size == (3, 3) and module.stride == (1, 1) and module.padding == (1, 1):
            key_ = (tuple(t.shape), tuple(module.weight.shape))
            if key_ not in seen:
                seen.add(key_)
                found.append((t.detach().clone(memory_format=torch.preserve_format), module.weight.detach().clone()))

    handles = [m.register_forward_hook(hook) for m in model.modules() if isinstance(m, torch.nn.Conv2d)]
    model.eval()
    with torch.inference_mode():
        model(x)
    for h in handles:
        h.remove()
    return found


def relative_errors(x, w) -> tuple[float, float]:
    """(direct, Winograd): each float32 result's largest difference from the float64 convolution,
    over the latter's largest magnitude."""
    import torch.nn.functional as F

    exact = F.conv2d(x.double(), w.double(), padding=1)
    scale = exact.abs().max().item()
    direct = (F.conv2d(x, w, padding=1).double() - exact).abs().max().item() / scale
    wino = (winograd_f2(x, w).double() - exact).abs().max().item() / scale
    return direct, wino


def measure(x, w, reps: int) -> dict:
    """Median seconds of each contender, alternating on the same tensors (after one call each)."""
    import torch
    import torch.nn.functional as F

    u = weight_transform(w)
    v = input_transform(x)
    m = torch.bmm(v, u)
    calls = {
        "direct": lambda: F.conv2d(x, w, padding=1),
        "Winograd": lambda: winograd_f2(x, w, u),
        "fused": lambda: winograd_f2_fused(x, u, w.shape[0]),
        "products": lambda: torch.bmm(v, u, out=m),
    }
    times = {k: [] for k in calls}
    for r in range(reps + 1):
        for k, f in calls.items():
            t0 = time.perf_counter()
            f()
            if r:
                times[k].append(time.perf_counter() - t0)
    return {k: statistics.median(t) for k, t in times.items()}


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", nargs="+", choices=list(MODELS), default=list(MODELS))
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: all cores)")
    ap.add_argument("--reps", type=int, default=7, help="alternating timed rounds per convolution")
    ap.add_argument("--quick", action="store_true", help="tiny random shapes: checks the script runs")
    args = ap.parse_args(argv)
    from spikingformer import allocator

    allocator.configure_allocator()  # as the models run: without it, the large maps' page faults dominate
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    print("# Winograd F(2x2, 3x3) against the direct 3x3 convolution\n")
    print(f"Command: `{common.command(sys.argv[1:] if argv is None else argv)}`\n")
    print("\n".join(common.machine_lines(torch.get_num_threads())))
    print(f"- median of {args.reps} alternating rounds; CPU allocator: {allocator.allocator_state()}; "
          f"load average (1 min) {common.load_average():.2f}\n")
    if args.quick:
        g = torch.Generator().manual_seed(0)
        fmt = {True: torch.channels_last, False: torch.contiguous_format}
        cases = [("quick", torch.randn(xs, generator=g).contiguous(memory_format=fmt[cl]), torch.randn(ws, generator=g))
                 for xs, ws, cl in QUICK]
    else:
        cases = [(key, x, w) for key in args.models for x, w in tokenizer_convolutions(key)]
    print("| model | input (N, C, H, W) | K | layout | GFLOP (direct) | direct ms | Winograd ms | fused ms | products ms "
          "| direct / Winograd | direct / fused | direct / products | error: direct | error: Winograd |")
    print("|---|---|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for key, x, w in cases:
        n, c, h, wd = x.shape
        gflop = 2 * n * h * wd * c * w.shape[0] * 9 / 1e9
        t = measure(x, w, args.reps)
        e_direct, e_wino = relative_errors(x, w)
        layout = "channels last" if _channels_last(x) else "NCHW"
        ms = " | ".join(f"{1e3 * t[k]:.2f}" for k in ("direct", "Winograd", "fused", "products"))
        ratios = " | ".join(f"{t['direct'] / t[k]:.2f}" for k in ("Winograd", "fused", "products"))
        print(f"| {key} | {n}, {c}, {h}, {wd} | {w.shape[0]} | {layout} | {gflop:.2f} | {ms} | {ratios} "
              f"| {e_direct:.1e} | {e_wino:.1e} |")


if __name__ == "__main__":
    main()
