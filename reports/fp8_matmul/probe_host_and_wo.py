"""Two small questions on the H100, one call.

1. Where the host time of one cached `fp8_gemm` launch goes (persistent TMA kernel and classic kernel,
   M = 512 text shapes): wall time per call of back-to-back calls, a cProfile of 300 calls, and the cost
   of the pieces alone (TensorDescriptor, fill_tma_descriptor, current stream, the compiled runner).
2. Weight-only fused kernel at M = 512: every autotune config (plus a few candidates) timed alone,
   against bf16 cuBLAS, to see whether any tile shape gets past ~0.6x bf16 speed.

    python3 reports/fp8_matmul/probe_host_and_wo.py --out $OUT/probe_host_and_wo.json
"""

from __future__ import annotations

import argparse
import cProfile
import io
import json
import os
import pstats
import time

import torch
import triton

from flux2_bench.kernels import fp8_matmul as F


def host_us(fn, n=300):
    for _ in range(20):
        fn()
    torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(n):
        fn()
    host = (time.perf_counter() - t) / n * 1e6
    torch.cuda.synchronize()
    return host


def pieces(a, b, out):
    from triton.runtime import driver

    M, K = a.shape
    N = b.shape[0]
    r = {}
    r["TensorDescriptor x3"] = host_us(
        lambda: [F.TensorDescriptor(t, list(t.shape), [t.stride(0), 1], [128, 128]) for t in (a, b, out)], 2000
    )
    util = driver.active.utils
    r["fill_tma_descriptor x1"] = host_us(
        lambda: util.fill_tma_descriptor(a.data_ptr(), 3, 1, 0, [128, 128], [M, K], [K, 1], 0), 2000
    )
    r["current device+stream"] = host_us(
        lambda: driver.active.get_current_stream(driver.active.get_current_device()), 2000
    )
    r["torch.empty out"] = host_us(lambda: torch.empty((M, N), device="cuda", dtype=torch.bfloat16), 2000)
    return r


def profile(fn, n=300):
    pr = cProfile.Profile()
    pr.enable()
    for _ in range(n):
        fn()
    pr.disable()
    torch.cuda.synchronize()
    s = io.StringIO()
    pstats.Stats(pr, stream=s).sort_stats("tottime").print_stats(18)
    return s.getvalue()


def host_part(res):
    M, K, N = 512, 6144, 6144
    a = torch.randn(M, K, device="cuda").to(torch.float8_e4m3fn)
    b = torch.randn(N, K, device="cuda").to(torch.float8_e4m3fn)
    sa, sb = torch.rand(M, device="cuda") + 0.5, torch.rand(N, device="cuda") + 0.5
    out = torch.empty(M, N, device="cuda", dtype=torch.bfloat16)
    res["pieces"] = pieces(a, b, out)
    for persistent in (True, False):
        for fast in (True, False):
            F.PERSISTENT, F.FAST_LAUNCH = persistent, fast
            name = f"{'persistent' if persistent else 'classic'}, {'cached' if fast else 'triton'} launch"
            res[name] = {"host_us": host_us(lambda: F.fp8_gemm(a, b, sa, sb))}
            if fast:
                res[name]["profile"] = profile(lambda: F.fp8_gemm(a, b, sa, sb))
            print(name, res[name]["host_us"], flush=True)
    F.PERSISTENT, F.FAST_LAUNCH = True, True
    print(json.dumps(res["pieces"]), flush=True)


EXTRA_WO = [  # (BLOCK_N, BLOCK_M, BLOCK_K, stages, warps)
    (128, 256, 64, 5, 8),
    (64, 256, 64, 3, 4),
    (64, 256, 32, 6, 4),
    (128, 256, 32, 6, 8),
    (128, 128, 64, 6, 8),
    (64, 128, 128, 4, 4),
]


def wo_part(res):
    wo = ("BLOCK_N", "BLOCK_M", "BLOCK_K", "GROUP_N")
    configs = list(F._fp8_weight_only.configs) + [F._cfg(*c, names=wo) for c in EXTRA_WO]
    rows = []
    old = F.WO_DEQUANT_MIN_M
    F.WO_DEQUANT_MIN_M = 1 << 62
    for name, K, N in (("txt.qkv", 6144, 18432), ("txt.proj", 6144, 6144), ("txt.mlp_out", 18432, 6144)):
        M = 512
        x = torch.randn(M, K, device="cuda", dtype=torch.bfloat16)
        w = torch.randn(N, K, device="cuda", dtype=torch.bfloat16) * 0.02
        w8, ws = F.quantize_fp8(w, "row")
        ws = ws.reshape(N)
        ref = F.fp8_weight_only_linear_ref(x[:64], w8, ws, out_dtype=torch.float32)
        bf16 = triton.testing.do_bench(lambda x=x, w=w: torch.mm(x, w.t()), rep=100)
        for cfg in configs:
            F._fp8_weight_only.configs, F._fp8_weight_only.cache = [cfg], {}
            F._FAST_LAUNCHERS.clear()
            try:
                out = F.fp8_weight_only_linear(x, w8, ws, out_dtype=torch.float32)
                err = ((out[:64] - ref).norm() / ref.norm()).item()
                ms = triton.testing.do_bench(lambda x=x, w8=w8, ws=ws: F.fp8_weight_only_linear(x, w8, ws), rep=100)
                rows.append({"shape": name, "config": str(cfg), "ms": ms, "bf16_ms": bf16, "speed_vs_bf16": bf16 / ms,
                             "rel_err": err})  # fmt: skip
            except Exception as e:  # noqa: BLE001 (a config that does not fit is recorded)
                rows.append({"shape": name, "config": str(cfg), "error": f"{type(e).__name__}: {str(e)[:200]}"})
            print(rows[-1], flush=True)
    F.WO_DEQUANT_MIN_M = old
    res["wo_configs_m512"] = rows


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    res = {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__, "triton": triton.__version__,
           "git_sha": os.environ.get("GIT_SHA", "unknown")}  # fmt: skip
    try:
        host_part(res)
        wo_part(res)
    finally:
        with open(args.out, "w") as f:
            json.dump(res, f, indent=1)


if __name__ == "__main__":
    main()
