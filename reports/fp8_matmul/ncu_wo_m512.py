"""One weight-only FP8 launch at M = 512 (txt.qkv) for Nsight Compute, after autotuning.

    ncu --kernel-name regex:_fp8_weight_only --launch-skip 40 --launch-count 1 --section SpeedOfLight \
        --section WarpStateStats --section ComputeWorkloadAnalysis python3 reports/fp8_matmul/ncu_wo_m512.py
"""

import torch

from flux2_bench.kernels import fp8_matmul as F

M, K, N = 512, 6144, 18432
x = torch.randn(M, K, device="cuda", dtype=torch.bfloat16)
w8, ws = F.quantize_fp8(torch.randn(N, K, device="cuda", dtype=torch.bfloat16) * 0.02, "row")
F.WO_DEQUANT_MIN_M = 1 << 62
F._fp8_weight_only.configs = [
    c for c in F._fp8_weight_only.configs if str(c).startswith("BLOCK_N: 128, BLOCK_M: 256, BLOCK_K: 64")
][:1]
for _ in range(50):
    F.fp8_weight_only_linear(x, w8, ws.reshape(N))
torch.cuda.synchronize()
print("config", F._fp8_weight_only.cache)
