"""Diagnose: which persistent FP8 GEMM configs return wrong results on which FLUX.2 shapes (run 3)."""

import json
import os

import torch

import flux2_bench.kernels.fp8_matmul as fm
from flux2_bench.quantize.formats import sqnr

dev = "cuda"
shapes = [(4096, 36864, 6144), (4096, 18432, 6144), (4608, 55296, 6144), (512, 36864, 6144), (4096, 6144, 18432)]
kern = fm._fp8_gemm_persistent
all_cfgs = list(kern.configs)
out = {"configs": [str(c) for c in all_cfgs], "rows": []}
for M, N, K in shapes:
    torch.manual_seed(0)
    x = torch.randn(M, K, device=dev, dtype=torch.bfloat16)
    w = torch.randn(N, K, device=dev, dtype=torch.bfloat16) * 0.02
    wq, ws = fm.quantize_fp8(w, "row")
    xq, xs = fm.quantize_fp8(x, "row")
    ref = (xq.float() * xs) @ (wq.float() * ws.reshape(-1, 1)).T
    for i, c in enumerate(all_cfgs):
        for resid in (False, True):
            kern.configs, kern.cache = [c], {}
            try:
                r = torch.randn(M, N, device=dev, dtype=torch.bfloat16) if resid else None
                g = torch.randn(N, device=dev, dtype=torch.bfloat16) if resid else None
                y = fm.fp8_gemm(xq, wq, xs, ws, residual=r, gate=g).float()
                want = ref if not resid else r.float() + g.float() * ref
                s = round(sqnr(y, want), 1)
            except Exception as e:  # noqa: BLE001
                s = f"{type(e).__name__}: {str(e)[:80]}"
            row = {"shape": [M, N, K], "config": i, "residual": resid, "sqnr_db": s}
            out["rows"].append(row)
            print(row, flush=True)
kern.configs, kern.cache = all_cfgs, {}
with open(os.path.join(os.environ.get("OUT", "/tmp"), "diag_persistent_configs.json"), "w") as f:
    json.dump(out, f, indent=1)
