"""Diagnose: does the first (autotuning) call of the FP8 GEMM return a wrong result? (run 3 SQNR drop)"""

import json
import os

import torch
import triton

import flux2_bench.kernels.fp8_matmul as fm
from flux2_bench.quantize.formats import sqnr

out = {}
dev = "cuda"


def case(tag, M, N, K, gran, via, bench=None):
    if bench is not None:
        for k in (fm._fp8_gemm_persistent, fm._fp8_gemm):
            k.do_bench = bench
    torch.manual_seed(M + N + K)
    x = torch.randn(M, K, device=dev, dtype=torch.bfloat16)
    w = torch.randn(N, K, device=dev, dtype=torch.bfloat16) * 0.02
    wq, ws = fm.quantize_fp8(w, "row" if gran != "tensor" else "row")
    if gran == "tensor":
        ws = ws.amax().reshape(())
        wq = (w.float() / ws).clamp(-448, 448).to(torch.float8_e4m3fn)
    ref = x.float() @ (wq.float() * (ws.reshape(-1, 1) if ws.ndim else ws)).T
    res = []
    for _ in range(3):
        if via == "linear":
            y = fm.fp8_linear(x, wq, ws, granularity=gran)
        else:
            xq, xs = fm.quantize_fp8(x, gran if gran != "tensor" else "row")
            y = fm.fp8_gemm(xq, wq, xs, ws)
        torch.cuda.synchronize()
        res.append(round(sqnr(y.float(), ref), 2))
    out[tag] = res
    print(tag, res, flush=True)


case("linear row 512x18432x6144 graph-bench", 512, 18432, 6144, "row", "linear")
case("linear tensor 512x6144x6144 graph-bench", 512, 6144, 6144, "tensor", "linear")
case("gemm row 4096x6144x6144 graph-bench", 4096, 6144, 6144, "row", "gemm")
case("linear row 4096x36864x6144 graph-bench", 4096, 36864, 6144, "row", "linear")
eager = lambda fn, quantiles=None: triton.testing.do_bench(fn, warmup=5, rep=25, quantiles=quantiles)
case("linear row 512x36864x6144 eager-bench", 512, 36864, 6144, "row", "linear", bench=eager)
case("linear tensor 512x18432x6144 eager-bench", 512, 18432, 6144, "tensor", "linear", bench=eager)
case("gemm row 4096x18432x6144 eager-bench", 4096, 18432, 6144, "row", "gemm", bench=eager)
with open(os.path.join(os.environ.get("OUT", "/tmp"), "diag_first_call.json"), "w") as f:
    json.dump(out, f, indent=1)
