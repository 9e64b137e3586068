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
[ -n "${SKIP_ROW:-}" ] || prof row _fp8_gemm_persistent --set full --import-source no
for v in block row; do
    [ -f "$out/$v.ncu-rep" ] || continue
    "$ncu" --import "$out/$v.ncu-rep" --page source --print-source sass --csv >"$out/$v.sass.csv" 2>&1 || true
done
[ -n "${SKIP_CUBLAS:-}" ] || prof cublas_block "gemm|sm90|cutlass|xmma" --section LaunchStats --section SpeedOfLight --section Occupancy
[ -n "${SKIP_CUBLAS:-}" ] || prof cublas_row "gemm|sm90|cutlass|xmma" --section LaunchStats --section SpeedOfLight --section Occupancy
rm -f "$out"/*.ncu-rep  # the text pages above hold what the summary reads
ls -la "$out"
