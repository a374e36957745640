"""How accurate would a larger Winograd tile be? F(2x2, 3x3), F(3x3, 3x3) and F(4x4, 3x3) side by side.

The ``winograd`` route runs F(2x2, 3x3): 16 products per 2x2 block of outputs where the direct 3x3
convolution takes 36. Larger tiles take fewer products per output, F(3x3, 3x3) 25 per 3x3 block
(2.78 per output against 4), F(4x4, 3x3) 36 per 4x4 block (2.25), but their transforms have larger
coefficients, which cost accuracy: the question for bf16, whose products the route rounds three
times (the transformed tiles, the transformed weight and the products' sums).

For each of the event model's Winograd layers (bf16: 64 -> 128 at 32x32, 128 -> 256 at 16x16,
256 -> 256 at 8x8) on 4 images, spike maps firing at 0.4 and dense (normal) maps, with weights of
Kaiming's scale, this prints the largest difference from the float64 convolution over the largest
output (a relative error of the layer) for: PyTorch's direct convolution in the dtype (oneDNN's);
each tile size in plain PyTorch, the transforms in float64 rounded to float32 and then to the
dtype, the products in the dtype (float32 sums, rounded once to bf16), as the route computes
them; and, as a check that the prototype models the route, the route's own F(2x2, 3x3)
(:func:`spikingformer.kernels.winograd.winograd_conv2d`).

The transforms are Toom-Cook's (Lavin and Gray, 2016) for interpolation points 0, 1, -1 (F(2x2)),
0, 1, -1, 2 (F(3x3)), 0, 1, -1, 2, -2 (F(4x4)) and infinity: ``A^T`` and ``G`` from the points, ``B^T``
solved from the identity ``A^T [(G g) * (B^T d)] = g correlated with d`` for every ``g`` and ``d``.

    python benchmarks/winograd_tile_accuracy.py
"""

from __future__ import annotations

import argparse
import math
import sys

import torch

import common

TILES = {"F(2x2, 3x3)": (2, [0.0, 1.0, -1.0]),
         "F(3x3, 3x3)": (3, [0.0, 1.0, -1.0, 2.0]),
         "F(4x4, 3x3)": (4, [0.0, 1.0, -1.0, 2.0, -2.0])}
LAYERS = [(64, 128, 32), (128, 256, 16), (256, 256, 8)]  # (C_in, C_out, H = W)
R = 3  # the filter's size


def toom_cook(m: int, points: list[float]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(A^T, G, B^T)`` of F(m, 3) for the finite ``points`` (m + 1 of them) and infinity, float64."""
    n = m + R - 1
    if len(points) != n - 1:
        raise ValueError(f"F({m}, {R}) needs {n - 1} finite points, got {len(points)}")
    at = torch.zeros(m, n, dtype=torch.float64)
    g = torch.zeros(n, R, dtype=torch.float64)
    for i, a in enumerate(points):
        at[:, i] = torch.tensor([a ** k for k in range(m)])
        f = math.prod(a - b for j, b in enumerate(points) if j != i)
        g[i] = torch.tensor([a ** j / f for j in range(R)])
    at[m - 1, n - 1] = 1.0
    g[n - 1, R - 1] = 1.0
    # B^T's column l solves sum_i A^T[k, i] G[i, j] B^T[i, l] = [l == k + j] for all k, j
    system = (at[:, None, :] * g.t()[None, :, :]).reshape(m * R, n)
    target = torch.zeros(m * R, n, dtype=torch.float64)
    for k in range(m):
        for j in range(R):
            target[k * R + j, k + j] = 1.0
    bt = torch.linalg.lstsq(system, target).solution
    if (system @ bt - target).abs().max() > 1e-9:
        raise RuntimeError(f"no B^T for F({m}, {R}) at points {points}")
    return at, g, bt


def rounded(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``x`` rounded to float32, then to ``dtype``, back in float64 (how the route stores a value it
    computed in float32); float64: ``x`` itself (the exact algorithm, for tests)."""
    return x if dtype == torch.float64 else x.float().to(dtype).double()


def tiled_conv(x: torch.Tensor, w: torch.Tensor, mats, dtype: torch.dtype) -> torch.Tensor:
    """F(m, 3) in each dimension of inputs ``x`` (N, C, H, W) and weights ``w`` (K, C, 3, 3), both
    float64 holding ``dtype``'s values: the tiles' and weight's transforms and the products' sums
    each rounded to ``dtype``, the output's too."""
    at, g, bt = mats
    m, n = at.shape
    _, _, h, wd = x.shape
    th, tw = -(-h // m), -(-wd // m)
    pad = (1, tw * m + n - m - 1 - wd, 1, th * m + n - m - 1 - h)  # left, right, top, bottom
    tiles = torch.nn.functional.pad(x, pad).unfold(2, n, m).unfold(3, n, m)  # N C th tw n n
    v = rounded(bt @ tiles @ bt.t(), dtype)
    u = rounded(g @ w @ g.t(), dtype)  # K C n n
    mm = torch.einsum("ncyxij,kcij->nkyxij", v.to(dtype), u.to(dtype)).double()  # sums as bmm's in dtype
    y = rounded(at @ mm @ at.t(), dtype)  # N K th tw m m
    return y.permute(0, 1, 2, 4, 3, 5).reshape(x.shape[0], w.shape[0], th * m, tw * m)[:, :, :h, :wd]


def route_conv(x: torch.Tensor, w: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The ``winograd`` route's F(2x2, 3x3) in ``dtype`` (its C++ transforms where the kernel library
    builds, else their PyTorch twins), back in float64 and channels-first."""
    from spikingformer.kernels import winograd

    xl = x.to(dtype).contiguous(memory_format=torch.channels_last)
    return winograd.winograd_conv2d(xl, w.to(dtype)).double()


def errors(images: int, seed: int) -> list[dict]:
    """One row per layer, input kind and dtype: each method's largest error over the largest output."""
    torch.manual_seed(seed)
    mats = {name: toom_cook(m, pts) for name, (m, pts) in TILES.items()}
    rows = []
    for c, k, h in LAYERS:
        w = torch.randn(k, c, R, R, dtype=torch.float64) * math.sqrt(2 / (R * R * c))
        for kind in ("spikes at 0.4", "dense"):
            x = ((torch.rand(images, c, h, h) < 0.4).double() if kind.startswith("spikes")
                 else torch.randn(images, c, h, h, dtype=torch.float64))
            exact = torch.nn.functional.conv2d(x, w, padding=1)
            scale = exact.abs().max()
            for dtype in (torch.float32, torch.bfloat16):
                xr, wr = x.to(dtype).double(), w.to(dtype).double()
                err = {"direct": torch.nn.functional.conv2d(x.to(dtype), w.to(dtype), padding=1).double()}
                err.update({name: tiled_conv(xr, wr, mats[name], dtype) for name in TILES})
                err["route, F(2x2, 3x3)"] = route_conv(x, w, dtype)
                rows.append(dict(layer=f"{c} -> {k} at {h}x{h}", kind=kind, dtype=str(dtype).split(".")[-1],
                                 **{name: float((y - exact).abs().max() / scale) for name, y in err.items()}))
    return rows


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=4, help="images per layer (default 4)")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    rows = errors(args.images, args.seed)
    methods = [key for key in rows[0] if key not in ("layer", "kind", "dtype")]
    print("# Winograd tiles' accuracy: largest error over the largest output, against float64\n")
    print(f"Command: `{common.command(sys.argv[1:] if argv is None else argv)}`\n")
    print("| layer | maps | dtype | " + " | ".join(methods) + " |")
    print("|---|---|---|" + "---:|" * len(methods))
    for r in rows:
        print(f"| {r['layer']} | {r['kind']} | {r['dtype']} | " + " | ".join(f"{r[m]:.1e}" for m in methods) + " |")
    for dtype in ("float32", "bfloat16"):
        sel = [r for r in rows if r["dtype"] == dtype]
        spans = ", ".join(f"{m} {min(r[m] for r in sel):.1e} to {max(r[m] for r in sel):.1e}" for m in methods)
        ratio = ", ".join(f"{m} {min(r[m] / r['direct'] for r in sel):.1f}-{max(r[m] / r['direct'] for r in sel):.1f}x"
                          for m in methods if m != "direct")
        print(f"\n{dtype}: {spans}; against the direct convolution: {ratio}")


if __name__ == "__main__":
    main()
