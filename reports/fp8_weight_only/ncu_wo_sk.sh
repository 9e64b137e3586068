#!/usr/bin/env bash
# Nsight Compute on the weight-only variants of ncu_wo_sk.py (one launch each): speed of light, memory
# workload (L2 / DRAM throughput), warp states and the launch; the details pages in OUTDIR/ncu_<variant>_<shape>.txt.
# Usage: bash reports/fp8_weight_only/ncu_wo_sk.sh OUTDIR
set -u
out=${1:?OUTDIR}
ncu=${NCU:-/usr/local/cuda/bin/ncu}
for shape in txt.proj txt.mlp_out; do
    for v in dp sk bf16; do
        "$ncu" --profile-from-start off --launch-count 1 --section SpeedOfLight --section MemoryWorkloadAnalysis \
            --section WarpStateStats --section LaunchStats --section SchedulerStats \
            python3 reports/fp8_weight_only/ncu_wo_sk.py "$v" "$shape" >"$out/ncu_${v}_${shape}.txt" 2>&1 \
            || echo "ncu $v $shape failed: $(tail -3 "$out/ncu_${v}_${shape}.txt")"
    done
done
