"""One launch of a weight-only variant at a FLUX.2-dev text shape, for Nsight Compute (ncu_wo_sk.sh).

    python3 reports/fp8_weight_only/ncu_wo_sk.py VARIANT SHAPE

VARIANT: dp (Gluon kernel, data-parallel grid), sk (Gluon kernel, stream-K), bf16 (cuBLAS on the dequantized
weight). SHAPE: txt.proj (512 x 6144 x 6144) or txt.mlp_out (512 x 18432 x 6144). Warm-up launches run before
the profiler starts (cudaProfilerStart); the profiled launch is the next one.
"""

import sys

import torch

from flux2_bench.kernels import fp8_matmul as F
from flux2_bench.kernels import fp8_weight_only_sm90 as W

SHAPES = {"txt.proj": (512, 6144, 6144), "txt.mlp_out": (512, 18432, 6144)}


def main():
    variant, shape = sys.argv[1], sys.argv[2]
    M, K, N = SHAPES[shape]
    x = torch.randn(M, K, device="cuda", dtype=torch.bfloat16)
    w8, ws = F.quantize_fp8(torch.randn(N, K, device="cuda", dtype=torch.bfloat16) * 0.02, "row")
    ws = ws.reshape(N)
    wbf = F.dequantize_fp8_weight_ref(w8, ws)
    run = {
        "dp": lambda: W.fp8_weight_only_sm90(x, w8, ws, stream_k=False),
        "sk": lambda: W.fp8_weight_only_sm90(x, w8, ws, stream_k=True),
        "bf16": lambda: torch.nn.functional.linear(x, wbf),
    }[variant]
    for _ in range(20):
        run()
    torch.cuda.synchronize()
    torch.cuda.cudart().cudaProfilerStart()
    run()
    torch.cuda.synchronize()
    torch.cuda.cudart().cudaProfilerStop()


if __name__ == "__main__":
    main()
