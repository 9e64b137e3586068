"""What limits fp8_attention on the H100: one launch of each variant for Nsight Compute.

argv[1] picks the variant (B=1, H=48, D=128, bench_fp8_attention's FLUX.2-like inputs):

- ``sm90`` / ``sm90_pp``: the warp-specialized main loop (``fp8_attention_sm90``, library defaults; ``_pp`` with
  ping-pong consumers) at L = 8704, on pre-quantized inputs;
- ``cudnn``: SDPA's cuDNN bf16 backend at L = 8704 (the anchor);
- ``prepass``: ``quantize_qkv`` (its two Triton kernels) at L = 4608, where it costs a quarter of fp8_attention.

The device command (``ncu_attn_sm90.sh``) profiles each with ``--set full`` and writes the details page, the raw
metrics and (for sm90) the per-SASS warp-stall samples; ``python3 ncu_attn_sm90.py --summarize DIR`` turns them into
``ncu_attn_sm90.md``: duration, clocks, pipe utilization (tensor, MUFU/XU, FMA, ALU), issue activity and the stall
reasons of each code region of the sm_90 kernel.
"""

import contextlib
import csv
import sys
from pathlib import Path

RAW_METRICS = {  # raw-page metric -> label
    "gpu__time_duration.sum": "duration",
    "sm__cycles_elapsed.avg.per_second": "SM clock",
    "sm__pipe_tensor_cycles_active.avg.pct_of_peak_sustained_active": "tensor pipe active %",
    "sm__inst_executed_pipe_xu.avg.pct_of_peak_sustained_active": "XU (MUFU) pipe issue %",
    "sm__pipe_fma_cycles_active.avg.pct_of_peak_sustained_active": "FMA pipe active %",
    "sm__pipe_alu_cycles_active.avg.pct_of_peak_sustained_active": "ALU pipe active %",
    "smsp__issue_active.avg.pct_of_peak_sustained_active": "issue slots busy %",
    "gpu__compute_memory_throughput.avg.pct_of_peak_sustained_elapsed": "memory throughput %",
    "sm__warps_active.avg.pct_of_peak_sustained_active": "warps active %",
    "launch__registers_per_thread": "registers / thread",
    "launch__grid_size": "grid size",
}
VARIANTS = ("sm90", "sm90_pp", "cudnn", "prepass")


def raw_metrics(path: Path) -> list[dict[str, str]]:
    """Rows (one per profiled kernel) of ``ncu --page raw --csv``: metric name -> value (with its unit)."""
    rows = list(csv.reader(path.open()))
    start = next(i for i, r in enumerate(rows) if "Kernel Name" in r)
    hdr, units = rows[start], rows[start + 1]
    return [{h: f"{v} {u}".strip() if u and u != "%" else v for h, v, u in zip(hdr, r, units, strict=True)}
            for r in rows[start + 2 :] if len(r) == len(hdr)]  # fmt: skip


def stall_regions(path: Path) -> list[str]:
    """Warp-stall samples of the sm90 kernel per code region (runs of instructions with one execution count)."""
    rows = list(csv.reader(path.open()))
    hdr, data = rows[1], rows[2:]
    reasons = [h for h in hdr if h.startswith("stall_") and "Not Issued" not in h]
    i_e, i_s = hdr.index("Instructions Executed"), hdr.index("Warp Stall Sampling (All Samples)")
    groups = []
    for k, r in enumerate(data):
        e = int(r[i_e] or 0)
        if groups and groups[-1][2] == e:
            groups[-1][1] = k
        else:
            groups.append([k, k, e])
    total = sum(int(r[i_s] or 0) for r in data)
    L = [f"{total} samples in all.", "", "| instructions | executed | first | samples | top stall reasons |",
         "|---|---|---|---|---|"]  # fmt: skip
    for a, b, e in groups:
        sums = {r: sum(int(data[k][hdr.index(r)] or 0) for k in range(a, b + 1)) for r in reasons}
        n = sum(sums.values())
        if n >= 0.02 * total:
            top = ", ".join(f"{k[6:]} {v}" for k, v in sorted(sums.items(), key=lambda x: -x[1])[:5] if v)
            L.append(f"| {a}-{b} | {e} | `{data[a][1].strip()[:40]}` | {n} | {top} |")
    # the consumers' main loop: the instructions executed as often as the one with the most samples per count
    per_count: dict[int, int] = {}
    for r in data:
        per_count[int(r[i_e] or 0)] = per_count.get(int(r[i_e] or 0), 0) + int(r[i_s] or 0)
    loop_n = max((n for n in per_count if n > 0), key=lambda n: per_count[n])
    ops: dict[str, dict[str, int]] = {}
    for r in data:
        if int(r[i_e] or 0) != loop_n:
            continue
        words = r[1].strip().split()
        op = (words[1] if words[0].startswith("@") else words[0]).split(".")[0]
        for h in reasons:
            ops.setdefault(op, {}).setdefault(h[6:], 0)
            ops[op][h[6:]] += int(r[hdr.index(h)] or 0)
    n_loop = sum(sum(v.values()) for v in ops.values())
    L += ["", f"Main loop (instructions executed {loop_n} times, all warps): {n_loop} samples, by opcode:", "",
          "| opcode | samples | share | top stall reasons |", "|---|---|---|---|"]  # fmt: skip
    for op, c in sorted(ops.items(), key=lambda x: -sum(x[1].values()))[:14]:
        n = sum(c.values())
        top = ", ".join(f"{k} {v}" for k, v in sorted(c.items(), key=lambda x: -x[1])[:4] if v)
        L.append(f"| {op} | {n} | {100 * n / max(n_loop, 1):.1f} % | {top} |")
    L += ["", "Instructions with >= 1 % of the samples:", "", "| # | SASS | samples | executed |", "|---|---|---|---|"]
    for k, r in enumerate(data):
        if int(r[i_s] or 0) >= 0.01 * total:
            L.append(f"| {k} | `{r[1].strip()[:60]}` | {r[i_s]} | {r[i_e]} |")
    return L


def summarize(d: Path) -> list[str]:
    L = [f"# Nsight Compute: fp8_attention on the H100 (generated by `ncu_attn_sm90.py --summarize {d.name}`)", ""]
    meta = d / "meta.txt"
    if meta.exists():
        L += [meta.read_text().strip(), ""]
    L += ["| variant | kernel | " + " | ".join(RAW_METRICS.values()) + " |", "|---|---|" + "---|" * len(RAW_METRICS)]
    for v in VARIANTS:
        f = d / f"{v}.raw.csv"
        if not f.exists():
            continue
        for r in raw_metrics(f):
            vals = []
            for m in RAW_METRICS:
                x = r.get(m, "")
                num, _, unit = x.partition(" ")
                with contextlib.suppress(ValueError):
                    x = f"{float(num.replace(',', '')):.4g} {unit}".strip()
                vals.append(x or "n/a")
            L.append(f"| {v} | `{r.get('Kernel Name', '?')[:40]}` | " + " | ".join(vals) + " |")
    for v in ("sm90", "sm90_pp"):
        f = d / f"{v}.sass.csv"
        if f.exists():
            L += ["", f"## {v}: warp-stall samples per code region", ""] + stall_regions(f)
    return L + [""]


if __name__ == "__main__" and sys.argv[1:2] == ["--summarize"]:
    d = Path(sys.argv[2])
    out = Path(sys.argv[3]) if len(sys.argv) > 3 else Path(__file__).parent / "ncu_attn_sm90.md"
    out.write_text("\n".join(summarize(d)))
    sys.exit(0)

import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_fp8_attention import flux_like, sdpa_fn  # noqa: E402

from flux2_bench.kernels import fp8_attention_sm90 as A  # noqa: E402
from flux2_bench.kernels.fp8_attention import quantize_qkv  # noqa: E402

variant = sys.argv[1]
if variant not in VARIANTS:
    raise SystemExit(f"unknown variant {variant!r}: one of {VARIANTS}")
L = 4608 if variant == "prepass" else 8704
q, k, v = flux_like(1, 48, L, 128)
if variant == "cudnn":
    cudnn = sdpa_fn("cudnn")

    def call():
        return cudnn(q, k, v)
elif variant == "prepass":

    def call():
        return quantize_qkv(q, k, v, pv="fp8", v_perm16=True)
else:
    quant = quantize_qkv(q, k, v, pv="fp8", v_perm16=True)
    pp = variant == "sm90_pp"

    def call():
        return A.fp8_attention_sm90(quant, v, pingpong=pp)


for _ in range(5):  # compilation happens here, outside the profiled range
    call()
torch.cuda.synchronize()
torch.cuda.cudart().cudaProfilerStart()  # ncu --profile-from-start off: only this call is profiled
call()
torch.cuda.synchronize()
torch.cuda.cudart().cudaProfilerStop()
print(variant, "L", L, "ok")
