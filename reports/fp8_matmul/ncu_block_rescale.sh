#!/usr/bin/env bash
# Nsight Compute (--set full, per-SASS stall samples) of the rescaled block kernel, both wgmma shapes, and our
# row-wise kernel on double.img.proj (ncu_block_ws.py's variants). Summarize with
# `python3 reports/fp8_matmul/ncu_block_ws.py --summarize DIR` (ncu_block_ws.md).
# Usage: bash reports/fp8_matmul/ncu_block_rescale.sh OUTDIR
set -u
out=${1:?OUTDIR}
ncu=${NCU:-/usr/local/cuda/bin/ncu}
py="python3 reports/fp8_matmul/ncu_block_ws.py"
for v in rescale_wide rescale row; do
    regex=$([ "$v" = row ] && echo _fp8_gemm_persistent || echo _fp8_block_gemm_rescaled)
    "$ncu" --kernel-name "regex:$regex" --profile-from-start off --launch-count 1 --set full --import-source no \
        -f -o "$out/$v" $py "$v" >"$out/$v.log" 2>&1 || echo "ncu $v failed: $(tail -3 "$out/$v.log")"
    "$ncu" --import "$out/$v.ncu-rep" --page details --print-details all >"$out/$v.details.txt" 2>&1
    "$ncu" --import "$out/$v.ncu-rep" --page source --print-source sass --csv >"$out/$v.sass.csv" 2>&1 || true
done
rm -f "$out"/*.ncu-rep
ls -la "$out"
