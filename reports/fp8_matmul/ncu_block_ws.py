"""Why the block-scaled GEMM runs at ~0.7x row-wise: one launch of each variant on double.img.proj
(4096 x 6144 x 6144, where run 13 measured 952 TFLOP/s block against 1458 row-wise) for Nsight Compute.

argv[1] picks the variant:

- ``block``: the Gluon warp-specialized kernel as ``fp8_gemm`` dispatches it (ordered, unlagged, 3 stages);
- ``row``: our persistent row-wise kernel, autotuned as the library runs it;
- ``cublas_block`` / ``cublas_row``: ``torch._scaled_mm`` with 1x128 x 128x128 block / row-wise scales
  (its kernel name gives cuBLAS's tile and cluster shape, LaunchStats its registers and shared memory).

The device command (``ncu_block_ws.sh``) profiles each with ``--set full`` and prints the details page and
the per-SASS-instruction stall samples (``--page source``) into text files.
"""

import sys

import torch

from flux2_bench.kernels import fp8_block_gemm_sm90 as G
from flux2_bench.kernels import fp8_matmul as F
from flux2_bench.quantize.formats import quantize_fp8_block, quantize_fp8_row

M, K, N = 4096, 6144, 6144
variant = sys.argv[1]
x = torch.randn(M, K, device="cuda", dtype=torch.bfloat16)
w = torch.randn(N, K, device="cuda", dtype=torch.bfloat16) * 0.02
if variant in ("block", "cublas_block"):
    x8, xs = F.quantize_fp8(x, "block")
    w8, ws = quantize_fp8_block(w)  # 128 x 128 weight blocks
else:
    x8, xs = F.quantize_fp8(x, "row")
    w8, ws = quantize_fp8_row(w)

if variant == "block":
    assert F._use_block_gluon(x8, w8, xs, ws, None), "fp8_gemm would not dispatch this shape to the Gluon kernel"

    def call():
        return G.fp8_block_gemm_sm90_ws(x8, w8, xs, ws, num_stages=3, ordered=True, lagged=False)
elif variant == "row":

    def call():
        return F.fp8_gemm(x8, w8, xs, ws)
elif variant == "cublas_block":
    xs_outer = xs.t().contiguous().t()

    def call():
        return torch._scaled_mm(x8, w8.t(), scale_a=xs_outer, scale_b=ws.t(), out_dtype=torch.bfloat16)
elif variant == "cublas_row":

    def call():
        return torch._scaled_mm(
            x8, w8.t(), scale_a=xs, scale_b=ws.reshape(1, N), out_dtype=torch.bfloat16, use_fast_accum=True
        )
else:
    raise SystemExit(f"unknown variant {variant!r}: block | row | cublas_block | cublas_row")

for _ in range(25):  # autotuning and compilation happen here, outside the profiled range
    call()
torch.cuda.synchronize()
torch.cuda.cudart().cudaProfilerStart()  # ncu --profile-from-start off: only this call is profiled
call()
torch.cuda.synchronize()
torch.cuda.cudart().cudaProfilerStop()
print(variant, "shapes", tuple(x8.shape), tuple(w8.shape), tuple(xs.shape), tuple(ws.shape))
if variant == "row":
    print("config", {k: str(v) for k, v in getattr(F._fp8_gemm_persistent, "cache", {}).items()})
