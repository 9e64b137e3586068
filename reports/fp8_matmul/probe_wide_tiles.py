"""Wide persistent tiles (128 x (128 + 64), two accumulators) against every data-parallel config, pinned,
on FLUX.2-dev's GEMMs at 1024² (row-wise scales), in GPU time; then the library's autotuned pick.

Question: do 128 x 192 tiles close the wave-quantization gap of the M = 512 text GEMMs? Powers of two
leave a partial last wave there: txt.proj and txt.mlp_out (N = 6144) make 96 tiles of 128 x 256 or
192 of 128 x 128 for 132 SMs (one full wave of work then runs as 1.0 or 1.45 -> 2 waves); txt.qkv
(N = 18432) 288 or 576 (2.2 -> 3, 4.4 -> 5 waves). 128 x 192 tiles make 128 (one wave), 384 (2.9 ->
3 waves) and, for txt.mlp_in, 768 (5.8 -> 6 waves).

Expectation, written before the first run (git of this file's commit):
- txt.proj, txt.mlp_out: one wave of 128 x 192 tiles instead of two of 128 x 128 or one of
  128 x 256: 1.15-1.30x faster than the best power-of-two config (wave time 1.5 units against 2),
  less the second accumulator's extra A reads from shared memory.
- txt.qkv: 3 waves x 1.5 units against 5 x 1 (128 x 128): 1.0-1.10x.
- txt.mlp_in: 6 x 1.5 against 5 x 2 (128 x 256): 1.0-1.10x.
- M >= 4096: no wave gain (5.8-59 waves already); the wide loop is not flattened across tiles (a
  flattened one makes ptxas serialize the wgmmas, see the kernel), so each tile refills the
  pipeline: 0.90-1.0x the best 128 x 256 config; the autotuner should keep 128 x 256 there.
- Library pick (autotuned over all configs, wide included) against `_scaled_mm` row-wise fast,
  geomean over the ten shapes in GPU time: 1.00-1.05x, from run 10's 0.977x.

    python3 reports/fp8_matmul/probe_wide_tiles.py --out $OUT/probe_wide_tiles_runN.json

Run 1 (git 88fe456, H100, probe_wide_tiles_run1.json), written after it: the expectation missed. The
best wide config against the best power-of-two one (graph GPU time, same run): txt.proj 0.96x,
txt.mlp_out 0.96x, txt.qkv 0.97x, txt.mlp_in 0.88x, M >= 4096 0.76-0.83x. At M = 512 the wide tiles
kept 128 SMs busy instead of 96 but finished later: per active SM they ran at 8.3 TFLOP/s on
txt.mlp_out against 11.6 for 96 tiles of 128 x 256, i.e. the full waves are bound by L2-to-SM traffic
(as Nsight Compute said of txt.qkv in session 5), which 40 KB of A and B per 6.3 MFLOP K step (128 x
192) raises over 48 KB per 8.4 MFLOP (128 x 256); more busy SMs only split the same bandwidth. On
M >= 4096 the wide tile runs like the 128 x 128 8-warp config (0.78-0.88x of 128 x 256) plus the
pipeline refill of its unflattened loop. The wide path was reverted from the kernel (it added a
descriptor to every launch for no gain); run it at 88fe456. What would cut the L2 traffic is a weight
tile multicast to a cluster of CTAs (cuBLAS's kernels), not a different tile count.
"""

from __future__ import annotations

import argparse
import json
import math
import os

import torch
import triton

from flux2_bench.kernels import fp8_matmul as F

SHAPES = [("single.linear1", 4608, 6144, 55296), ("single.linear2", 4608, 24576, 6144),
          ("double.img.qkv", 4096, 6144, 18432), ("double.img.mlp_in", 4096, 6144, 36864),
          ("double.img.mlp_out", 4096, 18432, 6144), ("double.img.proj", 4096, 6144, 6144),
          ("double.txt.qkv", 512, 6144, 18432), ("double.txt.mlp_in", 512, 6144, 36864),
          ("double.txt.mlp_out", 512, 18432, 6144), ("double.txt.proj", 512, 6144, 6144)]  # fmt: skip


def cfg_name(c) -> str:
    k = c.kwargs
    width = f"{k['BLOCK_N']}+{k['BLOCK_N2']}" if k["BLOCK_N2"] else str(k["BLOCK_N"])
    return f"{k['BLOCK_M']}x{width}_s{c.num_stages}_w{c.num_warps}{'_sub' if k['EPILOGUE_SUBTILE'] else ''}"


def gpu_times(fn) -> dict:
    return {"queued_ms": F._queued_gpu_time(fn), "graph_ms": triton.testing.do_bench_cudagraph(fn, rep=50)}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", required=True)
    p.add_argument("--shapes", default="", help="comma-separated shape names (default: all ten)")
    a = p.parse_args()
    kern = F._fp8_gemm_persistent
    library = list(kern.configs)
    pinned = [c for c in library if not c.kwargs["STREAM_K"]]  # row-wise fast accumulation never gets stream-K
    sms = F._num_sms(torch.device("cuda"))
    names = set(a.shapes.split(",")) if a.shapes else None
    rows = []
    for name, M, K, N in SHAPES:
        if names and name not in names:
            continue
        x = torch.randn(M, K, device="cuda", dtype=torch.bfloat16)
        w = torch.randn(N, K, device="cuda", dtype=torch.bfloat16) * 0.02
        xq, xs = F.quantize_fp8(x, "row")
        wq, ws = F.quantize_fp8(w, "row")
        ref = F.fp8_gemm_ref(xq, wq, xs, ws, out_dtype=torch.float32)
        flops = 2 * M * N * K
        ws_1n = ws.reshape(1, N)

        def smm(xq=xq, wq=wq, xs=xs, ws_1n=ws_1n):
            return torch._scaled_mm(xq, wq.t(), xs, ws_1n, out_dtype=torch.bfloat16, use_fast_accum=True)

        anchor = gpu_times(smm)
        rows.append({"shape": name, "M": M, "K": K, "N": N, "config": "scaled_mm_row_fast", **anchor,
                     "tflops_graph": flops / anchor["graph_ms"] / 1e9})  # fmt: skip
        print(rows[-1], flush=True)

        def fn(xq=xq, wq=wq, xs=xs, ws=ws):
            return F.fp8_gemm(xq, wq, xs, ws)

        for label, configs in [(cfg_name(c), [c]) for c in pinned] + [("library_autotuned", library)]:
            row = {"shape": name, "M": M, "K": K, "N": N, "config": label}
            if len(configs) == 1:
                kw = configs[0].kwargs
                tiles = triton.cdiv(M, kw["BLOCK_M"]) * triton.cdiv(N, kw["BLOCK_N"] + kw["BLOCK_N2"])
                row.update(tiles=tiles, waves=tiles / sms, wide=bool(kw["BLOCK_N2"]))
            kern.configs, kern.cache = configs, {}
            F._FAST_LAUNCHERS.clear()
            try:
                out = fn().float()
                row["rel_l2_vs_ref"] = ((out - ref).norm() / ref.norm()).item()
                row.update(gpu_times(fn))
                row["tflops_graph"] = flops / row["graph_ms"] / 1e9
                row["vs_scaled_mm_graph"] = anchor["graph_ms"] / row["graph_ms"]
                row["vs_scaled_mm_queued"] = anchor["queued_ms"] / row["queued_ms"]
                if len(configs) > 1:
                    row["picked"] = cfg_name(kern.best_config)
            except Exception as e:  # noqa: BLE001 (a config that does not fit must not lose the probe)
                row["error"] = f"{type(e).__name__}: {str(e)[:200]}"
            rows.append(row)
            print(row, flush=True)
    kern.configs, kern.cache = library, {}
    lib = [r for r in rows if r["config"] == "library_autotuned" and "graph_ms" in r]
    summary = {}
    if lib:
        for key in ("vs_scaled_mm_graph", "vs_scaled_mm_queued"):
            summary[f"geomean_{key}"] = math.exp(sum(math.log(r[key]) for r in lib) / len(lib))
        summary["shapes"] = len(lib)
    meta = {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__, "triton": triton.__version__,
            "git_sha": os.environ.get("GIT_SHA", "unknown"), "sms": sms}  # fmt: skip
    with open(a.out, "w") as f:
        json.dump({"meta": meta, "expectation": __doc__, "summary": summary, "rows": rows}, f, indent=1)
    print(json.dumps(summary), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
