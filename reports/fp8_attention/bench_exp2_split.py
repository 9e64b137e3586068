"""A/B of the exp2 split in the fp8 attention kernel (half of each tile's exp2 on the FMA pipe).

Expectation written before the run, from the sm_90 SASS of the 128x64 tile (triton 3.6): the loop
already issues 634 instructions per warp and tile, which at two resident CTAs is more issue cycles per
scheduler than the tile's MMA or MUFU cycles; the split moves 32 MUFU.EX2 per thread to about 220 FMA /
ALU instructions. Expect the split to be slower (about 0.85-0.95x), i.e. the kernel is issue-bound, not
MUFU-bound. Timed kernel-only (quantize_qkv outside), alternated A/B/A/B, with cuDNN SDPA as the anchor.

    python3 reports/fp8_attention/bench_exp2_split.py --out $OUT/exp2_split.json
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import torch
import triton

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_fp8_attention import errors, flux_like, sdpa_fn  # noqa: E402

from flux2_bench.kernels.fp8_attention import attention_fp32_ref, fp8_attention_quantized, quantize_qkv  # noqa: E402


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    res = {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__, "triton": triton.__version__,
           "git_sha": os.environ.get("GIT_SHA", "unknown"), "rows": []}  # fmt: skip
    B, H, D = 1, 48, 128
    for L in (4608, 16896):
        q, k, v = flux_like(B, H, L, D)
        quant = quantize_qkv(q, k, v, pv="fp8")
        outs = {s: fp8_attention_quantized(quant, v, exp_split=s) for s in (False, True)}
        ref = attention_fp32_ref(q[:, :4].float(), k[:, :4].float(), v[:, :4].float())
        row = {"L": L, "split_vs_mufu": errors(outs[True], outs[False]),
               "vs_fp32": {str(s): errors(o[:, :4], ref) for s, o in outs.items()}}  # fmt: skip
        flops = 4 * B * H * L * L * D
        cudnn = triton.testing.do_bench(lambda q=q, k=k, v=v: sdpa_fn("cudnn")(q, k, v), rep=200)
        row["cudnn_ms"] = cudnn
        for rnd in range(2):
            for s in (False, True):
                ms = triton.testing.do_bench(
                    lambda s=s, quant=quant, v=v: fp8_attention_quantized(quant, v, exp_split=s), rep=200
                )
                row[f"kernel_ms_split{int(s)}_round{rnd}"] = ms
                row[f"tflops_split{int(s)}_round{rnd}"] = flops / ms / 1e9
                print(L, "split" if s else "mufu ", rnd, f"{ms:.3f} ms  {flops / ms / 1e9:.0f} TFLOP/s  "
                      f"x cuDNN {cudnn / ms:.2f}", flush=True)  # fmt: skip
        res["rows"].append(row)
        print(json.dumps({k: v for k, v in row.items() if "errors" not in k})[:600], flush=True)
    with open(args.out, "w") as f:
        json.dump(res, f, indent=1)


if __name__ == "__main__":
    main()
