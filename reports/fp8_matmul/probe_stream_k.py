"""Every persistent-kernel config, pinned, on FLUX.2's M = 512 text GEMMs (row-wise scales), in GPU time.

Question: does stream-K beat the data-parallel tile loop where the tile count leaves a partial last
wave, and by how much per tile shape? Each config is checked against the fp32 reference (relative L2)
before it is timed with the autotuner's queued GPU-time timer (`_queued_gpu_time`, L2 flushed before
each call) and with a CUDA-graph replay. `_scaled_mm` row-wise (fast accumulation) is the anchor.

    python3 reports/fp8_matmul/probe_stream_k.py --out $OUT/probe_stream_k_runN.json

Run 1 (git a54510a) timed the first, tile-major stream-K split; run 2 the lanes per row of tiles.
Run 3 (--bk256) adds BLOCK_K = 256 data-parallel configs. Expectation, written before it: the Nsight
Compute profile of txt.qkv puts about 45 % of the stall cycles at CTA barriers, four per K step in
Triton's non-specialized TMA pipeline; 256-wide K steps halve them per FLOP but fit only 2-3 stages.
Expect 0-8 % on the M = 512 text shapes over the best 128-wide config, possibly a loss where 2 stages
cannot hide the load latency.
"""

from __future__ import annotations

import argparse
import json
import os

import torch
import triton

from flux2_bench.kernels import fp8_matmul as F

SHAPES = [("double.txt.qkv", 512, 6144, 18432), ("double.txt.mlp_in", 512, 6144, 36864),
          ("double.txt.mlp_out", 512, 18432, 6144), ("double.txt.proj", 512, 6144, 6144)]  # fmt: skip


def cfg_name(c) -> str:
    k = c.kwargs
    return (f"{k['BLOCK_M']}x{k['BLOCK_N']}{'' if k['BLOCK_K'] == 128 else '_k' + str(k['BLOCK_K'])}"
            f"_s{c.num_stages}_w{c.num_warps}"
            f"{'_sub' if k['EPILOGUE_SUBTILE'] else ''}{'_streamK' if k['STREAM_K'] else ''}")  # fmt: skip


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", required=True)
    p.add_argument("--bk256", action="store_true", help="also time BLOCK_K = 256 variants (run 3)")
    a = p.parse_args()
    kern = F._fp8_gemm_persistent
    configs = list(kern.configs)
    if a.bk256:  # half the CTA barriers per FLOP, twice the bytes per pipeline stage
        configs += [F._pcfg(128, 128, 3, 8, False, bk=256), F._pcfg(128, 128, 3, 4, False, bk=256),
                    F._pcfg(128, 256, 2, 8, True, bk=256), F._pcfg(64, 256, 2, 4, True, bk=256)]  # fmt: skip
    sms = F._num_sms(torch.device("cuda"))
    rows = []
    for name, M, K, N in SHAPES:
        x = torch.randn(M, K, device="cuda", dtype=torch.bfloat16)
        w = torch.randn(N, K, device="cuda", dtype=torch.bfloat16) * 0.02
        xq, xs = F.quantize_fp8(x, "row")
        wq, ws = F.quantize_fp8(w, "row")
        ref = F.fp8_gemm_ref(xq, wq, xs, ws, out_dtype=torch.float32)
        flops = 2 * M * N * K
        ws_1n = ws.reshape(1, N)

        def smm(xq=xq, wq=wq, xs=xs, ws_1n=ws_1n):
            return torch._scaled_mm(xq, wq.t(), xs, ws_1n, out_dtype=torch.bfloat16, use_fast_accum=True)

        anchor = {"queued_ms": F._queued_gpu_time(smm), "graph_ms": triton.testing.do_bench_cudagraph(smm, rep=50)}
        rows.append({"shape": name, "M": M, "K": K, "N": N, "config": "scaled_mm_row_fast", **anchor})
        print(rows[-1], flush=True)
        for c in configs:
            kw = c.kwargs
            tiles = triton.cdiv(M, kw["BLOCK_M"]) * triton.cdiv(N, kw["BLOCK_N"])
            row = {"shape": name, "M": M, "K": K, "N": N, "config": cfg_name(c), "tiles": tiles,
                   "waves": tiles / sms, "stream_k": kw["STREAM_K"]}  # fmt: skip
            if kw["STREAM_K"] and tiles % sms == 0:
                continue
            kern.configs, kern.cache = [c], {}
            F._FAST_LAUNCHERS.clear()

            def fn(xq=xq, wq=wq, xs=xs, ws=ws):
                return F.fp8_gemm(xq, wq, xs, ws)

            try:
                out = fn().float()
                row["rel_l2_vs_ref"] = ((out - ref).norm() / ref.norm()).item()
                row["queued_ms"] = F._queued_gpu_time(fn)
                row["graph_ms"] = triton.testing.do_bench_cudagraph(fn, rep=50)
                row["tflops_graph"] = flops / row["graph_ms"] / 1e9
                row["vs_scaled_mm_graph"] = anchor["graph_ms"] / row["graph_ms"]
                row["counters_zero"] = not F._streamk_buffers(xq.device)[1].any().item()
            except Exception as e:  # noqa: BLE001 (a config that does not fit must not lose the probe)
                row["error"] = f"{type(e).__name__}: {str(e)[:200]}"
            rows.append(row)
            print(row, flush=True)
    kern.configs, kern.cache = configs, {}
    meta = {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__, "triton": triton.__version__,
            "git_sha": os.environ.get("GIT_SHA", "unknown"), "sms": sms}  # fmt: skip
    with open(a.out, "w") as f:
        json.dump({"meta": meta, "rows": rows}, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
