#!/usr/bin/env bash
# Nsight Compute of our row-wise GEMM (the library's dispatch: the Triton persistent kernel at M >= 4096) and
# cuBLAS's row-wise _scaled_mm (fast accumulation) on double.img.qkv (4096 x 6144 x 18432, where ours runs
# 0.92-0.93x cuBLAS by A/B) and double.img.proj (4096 x 6144 x 6144, 1.0x): SpeedOfLight, memory workload,
# warp state and launch sections, one launch each (ncu_block_ws.py's variants).
# Usage: bash reports/fp8_matmul/ncu_row.sh OUTDIR
set -u
out=${1:?OUTDIR}
ncu=${NCU:-/usr/local/cuda/bin/ncu}
py="python3 reports/fp8_matmul/ncu_block_ws.py"
for shape in qkv:4096,6144,18432 proj:4096,6144,6144; do
    name=${shape%%:*}
    for v in row cublas_row; do
        regex=$([ "$v" = row ] && echo _fp8_gemm_persistent || echo "gemm|sm90|cutlass|xmma")
        NCU_SHAPE=${shape#*:} "$ncu" --kernel-name "regex:$regex" --profile-from-start off --launch-count 1 \
            --section SpeedOfLight --section MemoryWorkloadAnalysis --section WarpStateStats --section LaunchStats \
            --section ComputeWorkloadAnalysis --section SchedulerStats \
            -f -o "$out/${name}_$v" $py "$v" >"$out/${name}_$v.log" 2>&1 || echo "ncu $name $v failed"
        "$ncu" --import "$out/${name}_$v.ncu-rep" --page details --print-details all >"$out/${name}_$v.txt" 2>&1
        rm -f "$out/${name}_$v.ncu-rep" "$out/${name}_$v.log"
    done
done
ls -la "$out"
