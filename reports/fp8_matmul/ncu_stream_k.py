"""One persistent row-wise launch on txt.qkv (512 x 6144 x 18432) for Nsight Compute: data-parallel
128x256 (4 stages) or its stream-K lanes twin, pinned (argv[1]: dp | sk).

    ncu --kernel-name regex:_fp8_gemm_persistent --launch-skip 20 --launch-count 1 --section SpeedOfLight \
        --section MemoryWorkloadAnalysis --section WarpStateStats --section SchedulerStats \
        python3 reports/fp8_matmul/ncu_stream_k.py sk
"""

import sys

import torch

from flux2_bench.kernels import fp8_matmul as F

M, K, N = 512, 6144, 18432
x8, xs = F.quantize_fp8(torch.randn(M, K, device="cuda", dtype=torch.bfloat16), "row")
w8, ws = F.quantize_fp8(torch.randn(N, K, device="cuda", dtype=torch.bfloat16) * 0.02, "row")
F._fp8_gemm_persistent.configs = [F._pcfg(128, 256, 4, 8, True, stream_k=sys.argv[1] == "sk")]
for _ in range(30):
    F.fp8_gemm(x8, w8, xs, ws)
torch.cuda.synchronize()
print("config", F._fp8_gemm_persistent.cache)
