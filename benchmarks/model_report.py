"""The model benchmark's report (``bench_model.py``): the contenders, the valid limit and issue 12's targets.

Targets, per ISA, for every training step and inference batch: at least :data:`EFFICIENCY_TARGET`
of the valid limit (``dense_limit.py``), never slower than the fastest baseline, at most
:data:`MAX_MEMORY_RATIO` of its peak; and where the limit leaves room, the speed-ups of
:data:`SPEEDUP_TARGETS` over it. Efficiency is reported against two limits: our step's own dense
ops (which it cannot beat), and the dense model's (``dense_limit.measure_with_dense_model``: the token
linears as dense products, which the spike linears beat by doing less arithmetic, and the
tokenizer's convolutions of spikes in float32, which the spike convolutions beat with int8 sums).
"""

from __future__ import annotations

import statistics

import clock_probe
import common

EFFICIENCY_TARGET = 0.9
MAX_MEMORY_RATIO = 0.5
SPEEDUP_TARGETS = {("cifar", "train"): 1.3, ("event", "train"): 1.5, ("cifar", "infer"): 1.5, ("event", "infer"): 1.5}


def label(contender: dict, releases: list[dict]) -> str:
    """A contender's row name: ``ours``, or the baseline's SpikingJelly release, neuron and allocator."""
    if contender["build"] == "ours":
        return "ours"
    rel = releases[contender["release"]]
    return f"authors + SJ {rel['version']} {rel['node']}, {contender['allocator']}"


def fastest_baseline(row: dict, contenders: list[dict], release: int | None = None) -> str | None:
    ids = [c["id"] for c in contenders if c["build"] == "authors" and (release is None or c["release"] == release)
           and c["id"] in row]
    return min(ids, key=lambda i: row[i]["median"], default=None)


INT8_CONV = "int8 convolution pieces (spike_conv)"


def _op_kind(name: str) -> str:
    return {"convolution": "convolution forward", "convolution_backward": "convolution backward",
            "onednn": INT8_CONV}.get(name.split(".")[0], "matrix products (mm, addmm, bmm, oneDNN's matmul)")


def _efficiency(limit: dict | None, ours: dict, name: str) -> tuple[float, str]:
    """Our step's efficiency against ``limit`` (``name`` in our row's ``paired``) as the number the target is
    judged by (paired where measured, else the best round's limit over the median step) and as text with both."""
    if not limit or not limit["seconds"]:
        return float("nan"), "n/a"
    best = limit["seconds"] / ours["median"]
    pairs = ours.get("paired", {}).get(name) or []
    if not pairs:
        return best, f"{best:.1%}"
    paired = statistics.median(pairs)
    return paired, f"{best:.1%} (paired {paired:.1%}, {pairs[0]:.0%}-{pairs[-1]:.0%})"


def print_report(args, command: str, releases: list[dict], contenders: list[dict], rows: dict, elapsed: float,
                 load_start: float, models_note: str, names: dict, batches: dict, allocators_note: str,
                 device_note: str) -> None:
    """Print the benchmark's report: machine and ISA, every contender, the valid limit, the targets."""
    import dense_limit

    print("# Model benchmark\n")
    print(f"Command: `{command}`\n")
    print("\n".join(common.machine_lines(args.threads)))
    print(f"- device: {device_note}")
    peak = None
    if args.device == "cpu":
        isa = dense_limit.isa()
        mhz = common.cpu_info()["mhz"]
        ghz = clock_probe.measured_ghz()
        print(f"- ISA of the dense arithmetic: {isa} ({dense_limit.isa_settings()})")
        if ghz or mhz:
            source = "/proc/cpuinfo"
            if ghz:
                source = "measured: a chain of dependent additions on one core" + (
                    f"; /proc/cpuinfo says {mhz / 1000:.2f} GHz" if mhz else "")
            peak = {d: dense_limit.fma_peak(args.threads, isa, ghz or mhz / 1000, bf16=d == "bf16") for d in args.dtypes}
            print("- theoretical FMA peak = cores x clock x FLOPs/cycle, assuming "
                  f"{dense_limit.FMA_UNITS} FMA units per core (bf16 on AMX: its tiles' rate): " + "; ".join(
                      f"{d}: {p['cores']} x {p['ghz']:.2f} GHz ({source}) x {p['flops_per_cycle']}"
                      + (f" ({p['note']})" if p["note"] else "") + f" = {p['flops'] / 1e9:.0f} GFLOP/s"
                      for d, p in peak.items()))
    for rel in releases:
        timed = "; ".join(f"{n}: " + ", ".join(f"T={t} {s * 1e3:.0f} ms" for t, s in v.items())
                          for n, v in rel["nodes"].items() if v)
        print(f"- SpikingJelly {rel['version']} ({rel['python']}): neuron {rel['node']}"
              + (f" (fastest forward+backward of 2^20 elements on {args.device}: {timed})" if timed else ""))
    print("- clock: " + ("process CPU time of the worker (one thread; page faults count as system time)"
                         if args.clock == "cpu" else "wall clock"))
    print(f"- {args.warmup} warm-up step(s), then {args.steps} timed steps per process, {args.rounds} round(s) with the "
          f"contenders interleaved, each a fresh process; medians; run took {elapsed:.0f} s; load average (1 min) at "
          f"start / end: {load_start:.2f} / {common.load_average():.2f}")
    print(f"- models: {models_note}")
    print(f"- allocators of the baselines: {allocators_note}")
    if args.device == "cuda":
        print("- peak = the CUDA caching allocator's peak allocated bytes during the steps minus those allocated "
              "before the first step (the step's working set on the GPU); max RSS MB = that peak in all; "
              "faults = the host process's minor page faults per timed step\n")
    else:
        print("- peak = peak RSS of the worker minus its RSS before the first step (the step's working set); "
              "faults = minor page faults per timed step\n")
    if args.quick:
        print("**--quick: tiny models, the numbers only show that the benchmark runs.**\n")

    print("| model | pass | dtype | contender | ms / step | images/s | peak MB | max RSS MB | faults / step |")
    print("|---|---|---|---|---:|---:|---:|---:|---:|")
    for (key, mode, dtype), row in rows.items():
        for con in contenders:
            r = row.get(con["id"])
            if r:
                print(f"| {names[key]}, B={batches[key]} | {mode} | {dtype} | {label(con, releases)} | "
                      f"{r['median'] * 1e3:.0f} | {batches[key] / r['median']:.1f} | {r['peak'] / 2**20:.0f} | "
                      f"{r['max_rss'] / 2**20:.0f} | {r['faults']:.0f} |")

    print("\nValid limit: our step's own convolutions and products (forward and backward), each timed alone, "
          f"best of {args.limit_reps} rounds; efficiency = their summed time / our step's median time (at most "
          "100% but for noise), and paired (each round's limit / the step timed just before it):\n")
    print("| model | pass | dtype | dense ops | GFLOP | dense ms at measured rate | measured GFLOP/s | of FMA peak "
          "| ours ms | efficiency |")
    print("|---|---|---|---|---:|---:|---:|---:|---:|---:|")
    for (key, mode, dtype), row in rows.items():
        lim = row["ours"]["limit"]
        if lim is None:
            continue
        kinds: dict = {}
        for op in lim["ops"]:
            k = kinds.setdefault(_op_kind(op["name"]), [0.0, 0.0, 0])
            k[0] += op["gflop"] * op["count"]
            k[1] += op["ms"] * op["count"]
            k[2] += op["count"]
        for kind, (gflop, ms, n) in [*sorted(kinds.items()), ("all", (lim["flops"] / 1e9, lim["seconds"] * 1e3, None))]:
            rate = gflop / ms * 1e3 if ms else 0.0
            # the fp32 FMA peak bounds neither int8 arithmetic nor a row that holds it
            of_peak = f"{rate * 1e9 / peak[dtype]['flops']:.0%}" if peak and INT8_CONV not in kinds else ""
            of_peak = of_peak if kind != INT8_CONV else "(int8)"
            last = kind == "all"
            ours = f"{row['ours']['median'] * 1e3:.0f}" if last else ""
            eff = _efficiency(lim, row["ours"], "limit")[1] if last else ""
            ops = f"**all {sum(k[2] for k in kinds.values())} calls**" if last else f"{kind} ({n} calls)"
            print(f"| {names[key]} | {mode} | {dtype} | {ops} | {gflop:.1f} | {ms:.0f} | {rate:.0f} | {of_peak} | "
                  f"{ours} | {eff} |")

    print("\nDense-model limit: the same step with the token linears as dense products and the tokenizer's "
          "convolutions as direct float convolutions (the spike_linear, spike_conv and winograd routes off), its "
          "convolutions and products each timed alone as above: the time the model's dense arithmetic needs at "
          "this machine's rates. The spike linears add only the weights of the spikes, less arithmetic than those "
          "products, the spike convolutions sum integers, cheaper arithmetic (three int8 pieces count three times "
          "the FLOPs), and Winograd's convolutions take 16 products per tile for 36, so our step can beat this "
          "limit (efficiency above 100%):\n")
    print("| model | pass | dtype | dense-model GFLOP | our step's dense GFLOP | dense-model ms at measured rates "
          "| ours ms | efficiency vs the dense model |")
    print("|---|---|---|---:|---:|---:|---:|---:|")
    for (key, mode, dtype), row in rows.items():
        lim, model = row["ours"]["limit"], row["ours"].get("dense_model_limit")
        if lim is None or model is None:
            continue
        print(f"| {names[key]} | {mode} | {dtype} | {model['flops'] / 1e9:.1f} | {lim['flops'] / 1e9:.1f} | "
              f"{model['seconds'] * 1e3:.0f} | {row['ours']['median'] * 1e3:.0f} | "
              f"{_efficiency(model, row['ours'], 'dense_model_limit')[1]} |")

    print("\nTargets (issue 12): efficiency >= "
          f"{EFFICIENCY_TARGET:.0%} of the valid limit; never slower than the fastest baseline; peak <= "
          f"{MAX_MEMORY_RATIO} of its peak; the speed-up target where the limit leaves room (max speed-up the limit "
          "allows = fastest baseline's time / our dense time). Efficiency is given against both limits: our "
          "step's own dense ops, and the dense model's; each as the best round's limit / our median step, and "
          "paired: the median over the replay's rounds of the round's limit / the step timed just before it "
          "(one spell of the machine), which decides the target where it was measured:\n")
    heads = " | ".join(f"vs SJ {rel['version']} (best allocator)" for rel in releases)
    print(f"| model | pass | dtype | fastest baseline | speed-up | {heads} | efficiency | vs dense model | peak ratio "
          "| limit allows | speed-up target | met: efficiency (own, dense model) / not slower / memory / speed-up |")
    print("|---|---|---|---|---:|" + "---:|" * len(releases) + "---:|---:|---:|---:|---:|---|")
    for (key, mode, dtype), row in rows.items():
        ours, best = row["ours"], fastest_baseline(row, contenders)
        if best is None:
            continue
        base = row[best]
        speed = base["median"] / ours["median"]
        per_release = []
        for i in range(len(releases)):
            b = fastest_baseline(row, contenders, i)
            per_release.append(f"{row[b]['median'] / ours['median']:.2f}x" if b else "")
        mem = ours["peak"] / max(base["peak"], 1)
        lim = ours["limit"] if ours["limit"] and ours["limit"]["seconds"] else None
        model = ours.get("dense_model_limit")
        eff, eff_text = _efficiency(lim, ours, "limit")
        eff_model, eff_model_text = _efficiency(model, ours, "dense_model_limit")
        allows = base["median"] / lim["seconds"] if lim else float("inf")
        target = SPEEDUP_TARGETS[(key, mode)]
        if allows < target:
            speed_met = f"forbidden by the limit (at most {allows:.2f}x)"
        else:
            speed_met = "yes" if speed >= target else f"no ({speed:.2f}x)"
        yes = {True: "yes", False: "no"}
        met = " / ".join([f"{yes[eff >= EFFICIENCY_TARGET]}, {yes[eff_model >= EFFICIENCY_TARGET]}", yes[speed >= 1],
                          yes[mem <= MAX_MEMORY_RATIO], speed_met])
        con = next(c for c in contenders if c["id"] == best)
        print(f"| {names[key]} | {mode} | {dtype} | {label(con, releases)}: {base['median'] * 1e3:.0f} ms | "
              f"{speed:.2f}x | {' | '.join(per_release)} | {eff_text} | {eff_model_text} | {mem:.2f} | {allows:.2f}x | "
              f"{target}x | {met} |")
