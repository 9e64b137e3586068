"""Diagnose run 3's wrong FP8 GEMM results: autotuning timer (CUDA graph vs eager) x kernel (persistent
vs classic), each on a fresh autotune cache, output SQNR against the dequantized fp32 product."""

import json
import os

import torch
import triton

import flux2_bench.kernels.fp8_matmul as fm
from flux2_bench.quantize.formats import sqnr

dev = "cuda"
graph = fm._autotune_bench
eager = lambda fn, quantiles=None: triton.testing.do_bench(fn, warmup=5, rep=25, quantiles=quantiles)  # noqa: E731
out = []
for M, N, K in [(4096, 36864, 6144), (4608, 55296, 6144), (4096, 6144, 18432)]:
    torch.manual_seed(0)
    x = torch.randn(M, K, device=dev, dtype=torch.bfloat16)
    w = torch.randn(N, K, device=dev, dtype=torch.bfloat16) * 0.02
    wq, ws = fm.quantize_fp8(w, "row")
    wq_copy, ws_copy = wq.clone(), ws.clone()
    xq, xs = fm.quantize_fp8(x, "row")
    ref = (xq.float() * xs) @ (wq.float() * ws.reshape(-1, 1)).T
    for persistent in (True, False):
        for name, bench in (("graph", graph), ("eager", eager)):
            fm.PERSISTENT = persistent
            for k in (fm._fp8_gemm_persistent, fm._fp8_gemm):
                k.do_bench, k.cache = bench, {}
            s = [round(sqnr(fm.fp8_gemm(xq, wq, xs, ws).float(), ref), 1) for _ in range(2)]
            intact = bool(torch.equal(wq.view(torch.uint8), wq_copy.view(torch.uint8)) and torch.equal(ws, ws_copy))
            best = str(fm._fp8_gemm_persistent.best_config if persistent else fm._fp8_gemm.best_config)
            row = {"shape": [M, N, K], "persistent": persistent, "timer": name, "sqnr_db": s, "weights_intact": intact,
                   "best": best}  # fmt: skip
            out.append(row)
            print(row, flush=True)
            if not intact:
                wq.copy_(wq_copy)
                ws.copy_(ws_copy)
with open(os.path.join(os.environ.get("OUT", "/tmp"), "diag_autotune.json"), "w") as f:
    json.dump(out, f, indent=1)
