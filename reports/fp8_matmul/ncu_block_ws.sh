#!/usr/bin/env bash
# Nsight Compute profiles of ncu_block_ws.py's variants on the device: `--set full` for our two kernels
# (details page + per-SASS stall samples), LaunchStats + SpeedOfLight for cuBLAS's (its kernel names).
# Usage: bash reports/fp8_matmul/ncu_block_ws.sh OUTDIR
set -u
out=${1:?OUTDIR}
ncu=${NCU:-/usr/local/cuda/bin/ncu}
py="python3 reports/fp8_matmul/ncu_block_ws.py"
prof() {  # name kernel-regex sections...
    local name=$1 regex=$2
    shift 2
    "$ncu" --kernel-name "regex:$regex" --profile-from-start off --launch-count 1 "$@" -f -o "$out/$name" $py "$name" \
        >"$out/$name.log" 2>&1 || echo "ncu $name failed: $(tail -3 "$out/$name.log")"
    "$ncu" --import "$out/$name.ncu-rep" --page details --print-details all >"$out/$name.details.txt" 2>&1
}
prof block _fp8_block_gemm_sm90_ws --set full --import-source no
prof row _fp8_gemm_persistent --set full --import-source no
for v in block row; do
    "$ncu" --import "$out/$v.ncu-rep" --page source --print-source sass --csv >"$out/$v.sass.csv" 2>&1 || true
done
prof cublas_block "gemm|sm90|cutlass|xmma" --section LaunchStats --section SpeedOfLight --section Occupancy
prof cublas_row "gemm|sm90|cutlass|xmma" --section LaunchStats --section SpeedOfLight --section Occupancy
ls -la "$out"
