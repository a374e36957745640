"""Sub-command ``info``: what this machine gives ``spikingformer``, and why.

The speed routes, the bf16 default and the int8 convolutions are chosen per CPU (the vector ISA
PyTorch's kernels use, native bf16, 8-bit matrix tiles, MKL's code path; docs/performance.md,
"Routes by ISA"), and the kernel library is compiled for it on first use. ``spikingformer info``
prints those choices and the facts they rest on, one ``label: value`` line each, so that a user
can see what a run on this machine will do, and quote it in a bug report.
"""

from __future__ import annotations

import argparse
import os
import platform
import time


def _kernel_library(build: bool) -> tuple[str, bool]:
    """Where the fused CPU kernels' library is and whether it is built (``build``: build it now, if
    needed), and whether asking for it now costs no build."""
    from spikingformer import native
    from spikingformer.kernels import cpu_backend

    path = cpu_backend.library_path()
    cxx = os.path.basename(native.compiler_name()) or "no compiler"
    threads = "OpenMP" if "-fopenmp" in cpu_backend.LIBRARY.compile_flags() else "one thread a kernel (no OpenMP)"
    if threads == "OpenMP" and native.second_openmp_runtime_expected():
        threads += f" (a second OpenMP runtime beside PyTorch's; GOMP_SPINCOUNT={os.environ.get('GOMP_SPINCOUNT', 'unset')})"
    target = f"-march={native.target_arch()}, {cxx}, {threads}"
    if not build and not path.exists():
        return f"{target}: not built yet (compiled on first use, 15-25 s; `spikingformer info --build` builds it now)", False
    start = time.perf_counter()
    if cpu_backend.get_library() is None:
        return f"{target}: cannot be built here ({(cpu_backend.build_error() or '').splitlines()[0][:300]})", True
    return f"{target}: loaded in {time.perf_counter() - start:.1f} s from {path}", True


def _mkl_line() -> str:
    """Which code computes PyTorch's float32 products here, as the vendor rule of the routes sees it
    (``routes.ON_WHERE_MKL_IS_GENERIC``: ``token_linear``, and per ISA others measured only on x86
    CPUs that are not Intel's, e.g. ``winograd`` with AVX-512)."""
    import torch

    from spikingformer.cpu_features import mkl_generic
    from spikingformer.layers import routes

    if not torch.backends.mkl.is_available():
        return "not in this PyTorch build (e.g. on Arm), so token_linear (oneDNN's products) is not a default route"
    isa = routes.cpu_isa()
    by_vendor = routes.ON_WHERE_MKL_IS_GENERIC.get(isa, frozenset())
    others = ", ".join(sorted(by_vendor - {"token_linear"}))
    if not mkl_generic():
        return ("its own code for this CPU, so token_linear (oneDNN's products) is not a default route"
                + (f" (nor, with {isa}, {others}: measured on other vendors' CPUs only)" if others else ""))
    if "token_linear" in by_vendor:
        return ("generic code on this CPU, so token_linear (oneDNN's products) is a default route"
                + (f" ({others} too, with {isa})" if others else ""))
    return (f"generic code on this CPU, but token_linear (oneDNN's products) is not a default route with {isa}: "
            "it measured no faster than MKL there")


def _bf16_line(native: bool, spike_limit: float | None, spike_linear_on: bool = True,
               wide_limit: float | None = None, conv: dict | None = None, spike_conv_on: bool = True,
               winograd_channels: int | None = None) -> str:
    """The bf16 line: native or emulated (``--amp auto``'s choice), and what the spike linear does in it
    (``wide_limit``: its limit for wide layers, where higher), the dense convolutions where the
    ``winograd`` route takes them in bf16 (``winograd_channels``: its least channels, None where it
    does not run) and the spike convolution (``conv``: its :data:`routes.SPIKE_CONV_BF16` entry for
    this CPU, None where it has none)."""
    if not native:
        return "emulated (no AVX512-BF16 or AMX, or capped): `--amp auto` stays float32"
    if not spike_linear_on:
        how = "the spike_linear route is off, so the token linears are autocast's bf16 products"
    elif spike_limit is not None:
        how = f"spike_linear sums bf16 spikes up to a firing rate of {spike_limit:g}"
        if wide_limit is not None and wide_limit > spike_limit:
            how += f" ({wide_limit:g} in layers with at least twice as many outputs as inputs)"
    else:
        how = "spike_linear keeps autocast's bf16 products (matrix tiles, or no limit measured for this ISA)"
    if winograd_channels is not None:
        how += f"; winograd runs bf16 convolutions of {winograd_channels} channels or more by F(2x2, 3x3)"
    if not spike_conv_on:
        how += "; the spike_conv route is off"
    elif conv is not None:
        how += (f"; spike_conv sums bf16 spike maps of {conv['min_channels']} input channels or more up to "
                f"{conv['infer']:g} (training {conv['train']:g})")
    else:
        how += "; spike_conv keeps autocast's bf16 convolutions"
    return f"native: `--amp auto` trains in bf16 on this CPU; {how}"


def _batch_norm_line(ready: bool) -> str:
    """Whether the fused kernels compute BatchNorm here: only with the rounding of PyTorch's kernel in
    use (``kernels.cpu_backend.bn_rounding``), which a build without FMA cannot give where it fuses."""
    from spikingformer.kernels import cpu_backend

    how = {"fused": "one rounding per multiply-add", "unfused": "two roundings per multiply-add",
           None: "a rounding the probe does not recognise"}[cpu_backend.bn_rounding()]
    if not ready:
        return f"PyTorch's kernel: {how}; whether the fused kernels reproduce it is known once the library is built"
    if cpu_backend.kernel_reproduces_bn():
        return f"computed in the fused kernels as PyTorch's kernel computes it ({how})"
    return (f"left to PyTorch's kernel ({how}), which the fused kernels cannot reproduce here: "
            "fused_bn_spike and fused_spike_pool run BatchNorm as a separate call")


def _onnx_line() -> str:
    """Whether ``export --output NAME.onnx`` can run here: the exporter's packages, and ONNX Runtime for its check."""
    from importlib import metadata

    from spikingformer.deploy.onnx_export import missing_packages

    names = ("onnx", "onnxscript", "onnxruntime")
    missing = missing_packages(names)
    found = ", ".join(f"{name} {metadata.version(name)}" for name in names if name not in missing)
    if "onnx" in missing or "onnxscript" in missing:
        return f"not available ({', '.join(missing)} missing): pip install 'spikingformer[onnx]'"
    if missing:
        return f"available ({found}); onnxruntime missing, so the written file is not run to check it"
    return f"available ({found}); the written file is run once on ONNX Runtime to check it"


def describe(build: bool = False) -> list[tuple[str, str]]:
    """``(label, value)`` lines: versions, the CPU, the choices made for it, the kernels, the devices."""
    import torch

    from spikingformer import __version__, kernels
    from spikingformer.allocator import allocator_state
    from spikingformer.cpu_features import cpu_name, isa_variables_set, native_bf16, native_int8, usable_cpus
    from spikingformer.layers import routes

    on = routes.active()
    off = [name for name in routes.ROUTES if name not in on]
    isa = routes.cpu_isa()
    cuda = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())] if torch.cuda.is_available() else []
    library, ready = _kernel_library(build)
    usable = usable_cpus()
    auto = kernels.select_backend(torch.zeros(1)) if ready else "cpu once the library is built (torch if it cannot be)"
    return [
        ("spikingformer", f"{__version__} (torch {torch.__version__}, python {platform.python_version()}, "
                          f"{platform.system()} {platform.machine()})"),
        ("CPU", f"{cpu_name()}; {os.cpu_count()} logical cores" + (
            f", {usable} usable (affinity and cgroup CPU quota)" if usable < (os.cpu_count() or 1) else "")
         + f"; torch threads {torch.get_num_threads()}"),
        ("vector ISA", f"{isa} (PyTorch's kernels: {torch.backends.cpu.get_cpu_capability()}; caps set: "
                       f"{', '.join(isa_variables_set()) or 'none'})" + ("" if isa in routes.MEASURED_FASTER else
                                                 ": not measured, so no speed route is on (`python benchmarks/"
                                                 "study_routes.py` measures them here and prints the "
                                                 f"{routes.ENV} value that sets them)")),
        ("bf16", _bf16_line(native_bf16(), routes.bf16_limit(), routes.enabled("spike_linear"),
                            routes.SPIKE_LINEAR_MAX_DENSITY_BF16_WIDE.get(routes.cpu_isa()),
                            routes.bf16_limit(routes.SPIKE_CONV_BF16), routes.enabled("spike_conv"),
                            routes._winograd_min_channels_bf16 if routes.enabled("winograd") else None)),
        ("int8 matrix tiles (AMX)", "yes: spike_conv's int8 pieces take the spike maps the accumulation declines "
                                    "(inference, and training's forward)" if native_int8()
                                    else "no: spike maps the accumulation declines take the float32 convolution"),
        ("MKL", _mkl_line()),
        ("routes on", ", ".join(name for name in routes.ROUTES if name in on) or "none"),
        ("routes off", ", ".join(off) or "none"),
        ("SPIKINGFORMER_ROUTES", os.environ.get(routes.ENV) or "unset (the defaults for this CPU)"),
        ("kernel library", library),
        ("BatchNorm", _batch_norm_line(ready)),
        ("LIF backends", f"{', '.join(kernels.available_backends())}, reference; on CPU tensors 'auto' picks {auto}"),
        ("CPU allocator", allocator_state()),
        ("CUDA", ", ".join(cuda) if cuda else "no device visible"),
        ("Apple GPU (MPS)", "available: --device mps (the neuron runs PyTorch's loop there)"
                            if torch.backends.mps.is_available() else "not available"),
        ("ONNX export", _onnx_line()),
    ]


def run_info(args: argparse.Namespace) -> int:
    lines = describe(build=args.build)
    width = max(len(label) for label, _ in lines)
    for label, value in lines:
        print(f"{label + ':':<{width + 1}} {value}")
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("info", help="what this machine gives spikingformer: ISA, routes, bf16, kernels, devices",
                       description="Print the versions, the CPU and the choices made for it (vector ISA, speed "
                                   "routes, bf16 default, int8 convolutions, MKL or oneDNN products), the fused "
                                   "kernels' library and the devices, one line each.")
    p.add_argument("--build", action="store_true",
                   help="build the fused CPU kernels' library now if needed (else only say whether it is built)")
    p.set_defaults(func=run_info)
