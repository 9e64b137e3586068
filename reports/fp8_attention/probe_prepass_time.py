"""Where does the attention pre-pass's time go at L = 4608: GPU kernels, or host launches leaking into the timer?

fp8_attention run 4 measured ``fp8_attention`` (pre-pass + sm_90 kernel) at 0.833 ms at L = 4608 and the kernel
alone at 0.615 ms: 0.218 ms for a pass that moves 368 MB (stats: K and V read; quant: Q, K, V read, fp8 written),
i.e. 1.7 TB/s, where the same pass reaches 2.7-2.8 TB/s from L = 16896 on. This probe times, at L = 4608 and
16896, each of cuDNN SDPA, ``fp8_attention``, ``quantize_qkv`` and the sm_90 kernel three ways: do_bench (the
benchmark's timer), GPU time alone (CUDA graphs of n x (L2 flush, call) minus n flushes), host time per call;
and lists the pre-pass's kernels with their GPU durations (torch.profiler).

Expectation (written before run 1): GPU time of the pre-pass at L = 4608 0.13-0.16 ms (368 MB at 2.7 TB/s plus
four launches: stats, two torch reductions, quant); do_bench 0.17-0.22 ms, the rest host time; stats ~0.045 ms,
quant ~0.09 ms, each reduction < 0.01 ms. If so, a pre-pass that reads K and V once (no stats pass) saves
~0.05 ms of GPU time at L = 4608, and fewer launches save host time only.

Run 1 confirmed it (GPU 0.156 ms: quant 83 us, stats 59 us at 1.9 TB/s, reductions 5.5 us; do_bench 0.232 with
264 us of host time per call). Run 2, after the pre-pass became one read (session 17): 0.123 ms, but the sample
kernel (one program per head) took 18.5 us and the fixup's serial reduction 6 us (18 us at L = 16896), and the
quant kernel 95 us (83 in run 1). Expectation for run 3 (written before it), with the sample split over 4
programs per head and the fixup's reduction vectorized: sample 3-5 us, fixup 3-5 us, pre-pass 0.10-0.11 ms of
GPU time at L = 4608; the quant kernel without its V block maxima (timing only) 0-10 % faster than with them.
Run 3: sample 7.4 us, fixup 5.4 us (11 at L = 16896), pre-pass 0.116 ms; the quant kernel 101 us with its block
maxima (a column reduction across the warps) and 89 without: the check cost 12 % (8 % at 16896). Expectation for
run 4 (written before it), with the check as an atomic max per V element above its channel's estimate (none in
the usual case: predicated off) and Q, K, V loaded before the estimates: quant kernel 83-90 us at L = 4608, the
check <= 3 % of it; fixup ~3 us (one 512-byte read per head); pre-pass 0.100-0.105 ms. Run 4: the fixup 1.6 us
as expected, but the check cost more, not less: 109 us against 92 without it (18 %; 16 % at L = 16896). Not
profiled; the likely cause is a layout conversion of the whole V tile for the per-element atomics. The library
went back to the column reduction, with the atomic only on the reduced vector (one per channel that overflows);
a one-off profile of that (device log only, no JSON) gave 111.6 us, so the library returned to run 3's kernels
(block maxima stored, the fixup reduces them), with the fixup reading 128 blocks per step.

    python3 reports/fp8_attention/probe_prepass_time.py --out $OUT/probe_prepass_time_run1.json
    python3 reports/fp8_attention/probe_prepass_time.py --render reports/fp8_attention/probe_prepass_time_run1.json
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import sys
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent / "fp8_matmul"))
from bench_fp8_attention import bench, flux_like, sdpa_fn  # noqa: E402
from bench_fp8_matmul import bench_graph, host_us  # noqa: E402

EXPECTATION = " ".join(__doc__.split("Expectation (written before run 1): ")[1].split("\n\n")[0].split())


def kernel_times(fn, reps: int = 5) -> dict[str, float]:
    """GPU microseconds per call of each kernel ``fn`` launches (torch.profiler, mean over ``reps`` calls)."""
    from torch.profiler import ProfilerActivity, profile

    fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(reps):
            fn()
        torch.cuda.synchronize()
    out: dict[str, float] = {}
    for e in prof.key_averages():
        if e.device_type.name == "CUDA" and e.self_device_time_total > 0:
            out[e.key[:80]] = e.self_device_time_total / reps
    return dict(sorted(out.items(), key=lambda kv: -kv[1]))


def run(out: Path) -> None:
    import triton

    from flux2_bench.kernels import fp8_attention as fa
    from flux2_bench.kernels.fp8_attention_sm90 import fp8_attention_sm90

    res = {"gpu": torch.cuda.get_device_name(0), "torch": torch.__version__, "triton": triton.__version__,
           "git_sha": os.environ.get("GIT_SHA", "unknown"),
           "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
           "expectation": EXPECTATION, "rows": []}  # fmt: skip
    for L in (4608, 16896):
        res["rows"].append(time_length(fa, fp8_attention_sm90, L))
        out.write_text(json.dumps(res, indent=1))
        torch.cuda.empty_cache()


def time_length(fa, fp8_attention_sm90, L: int) -> dict:
    q, k, v = flux_like(1, 48, L, 128)
    quant = fa.quantize_qkv(q, k, v, v_perm16=True)
    cudnn = sdpa_fn("cudnn")
    fns = {
        "sdpa cudnn": lambda: cudnn(q, k, v),
        "fp8_attention": lambda: fa.fp8_attention(q, k, v),
        "quantize_qkv": lambda: fa.quantize_qkv(q, k, v, v_perm16=True),
        "sm90 kernel": lambda: fp8_attention_sm90(quant, v),
    }
    # run 1: stats read K and V, quant read Q, K, V and wrote three fp8 tensors (13 bytes per element of one
    # tensor); run 2 on: Q, K, V read once (9), the sample's 2 x 256 tokens per head ignored (padding too)
    row = {"L": L, "bytes_prepass": (13 if hasattr(fa, "_stats_kernel") else 9) * q.numel(), "timers": {}}
    for name, fn in fns.items():
        row["timers"][name] = {"do_bench_ms": bench(fn)["ms"], "gpu_ms": bench_graph(fn, n=10)["ms"],
                               "host_us": host_us(fn, n=50)}  # fmt: skip
        print(L, name, row["timers"][name], flush=True)
    row["prepass_kernels_us"] = kernel_times(fns["quantize_qkv"])
    print(L, "pre-pass kernels", row["prepass_kernels_us"], flush=True)
    if hasattr(fa, "_V_CHECK"):  # run 3 on: the quant kernel without its V overflow check (timing only)
        fa._V_CHECK = False
        try:
            row["prepass_kernels_us_without_v_check"] = kernel_times(fns["quantize_qkv"])
        finally:
            fa._V_CHECK = True
        print(L, "without the V overflow check", row["prepass_kernels_us_without_v_check"], flush=True)
    return row


def render(path: Path) -> str:
    d = json.loads(path.read_text())
    lines = [f"# Attention pre-pass timing (generated by `probe_prepass_time.py --render {path.name}`)", "",
             f"{d['gpu']}, torch {d['torch']}, triton {d['triton']}, git {d['git_sha']}, {d['date']}. B=1, H=48, "
             "D=128, bf16 FLUX.2-like inputs.", "", f"Expectation: {d['expectation']}", "",
             "| L | call | do_bench ms | GPU ms (CUDA graph) | host us per call |",
             "|---|---|---|---|---|"]  # fmt: skip
    for r in d["rows"]:
        for name, t in r["timers"].items():
            lines.append(f"| {r['L']} | {name} | {t['do_bench_ms']:.3f} | {t['gpu_ms']:.3f} | {t['host_us']:.0f} |")
    lines += ["", "Pre-pass kernels (torch.profiler, GPU us per call):", "",
              "| L | kernel | us | pre-pass GB/s at the summed kernel time |", "|---|---|---|---|"]  # fmt: skip
    for r in d["rows"]:
        total = sum(r["prepass_kernels_us"].values())
        for name, us in r["prepass_kernels_us"].items():
            lines.append(f"| {r['L']} | `{name}` | {us:.1f} | |")
        lines.append(f"| {r['L']} | all | {total:.1f} | {r['bytes_prepass'] / total / 1e3:.0f} |")
        without = r.get("prepass_kernels_us_without_v_check", r.get("prepass_kernels_us_without_v_block_amax", {}))
        for name, us in without.items():
            if name.startswith("_quant"):
                lines.append(f"| {r['L']} | `{name}` without its V overflow check (timing only) | {us:.1f} | |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", type=Path)
    ap.add_argument("--render", type=Path)
    a = ap.parse_args()
    if a.render:
        print(render(a.render), end="")
    else:
        run(a.out)
