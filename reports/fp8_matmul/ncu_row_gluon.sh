#!/usr/bin/env bash
# Nsight Compute, clocks locked: the library's row-wise GEMM (fp8_gemm's dispatch: the Gluon warp-specialized
# kernel of kernels/fp8_row_gemm_sm90.py on these shapes) against cuBLAS's row-wise _scaled_mm (fast accumulation)
# on the three shapes below 1.0x in run 21 and one control (img.proj, ours 1.017x). One launch each; summary:
# python3 reports/fp8_matmul/ncu_row_gluon.py DIR (writes ncu_row_gluon.md). Expectation: probe_row_gap.py.
# Usage: bash reports/fp8_matmul/ncu_row_gluon.sh OUTDIR
set -u
out=${1:?OUTDIR}
mkdir -p "$out"
ncu=${NCU:-/usr/local/cuda/bin/ncu}
py="python3 reports/fp8_matmul/ncu_block_ws.py"
metrics=dram__bytes_read.sum,lts__t_sectors_srcunit_tex_op_read.sum,lts__t_sector_op_read_hit_rate.pct,sm__pipe_tensor_cycles_active.avg.pct_of_peak_sustained_elapsed,gpu__time_duration.sum
for shape in txt_qkv:512,6144,18432 img_proj:4096,6144,6144 img_mlp_in:4096,6144,36864 linear1:4608,6144,55296; do
    name=${shape%%:*}
    for v in row cublas_row; do
        regex=$([ "$v" = row ] && echo "_fp8_row_gemm_sm90_kernel|_fp8_gemm_persistent" || echo "gemm|sm90|cutlass|xmma|nvjet")
        f="$out/${name}_$v"
        for m in "--metrics $metrics" ""; do  # without the extra metrics if one is unknown to this ncu
            NCU_SHAPE=${shape#*:} "$ncu" --kernel-name "regex:$regex" --profile-from-start off --launch-count 1 \
                --section SpeedOfLight --section MemoryWorkloadAnalysis --section LaunchStats $m \
                -f -o "$f" $py "$v" >"$f.log" 2>&1 && break
            echo "ncu $name $v ${m:+(with metrics)} failed: $(tail -2 "$f.log")"
        done
        "$ncu" --import "$f.ncu-rep" --page details --print-details all >"$f.txt" 2>&1
        "$ncu" --import "$f.ncu-rep" --page raw --csv >"$f.raw.csv" 2>&1
        grep -q "$v shapes" "$f.log" && rm -f "$f.log"
        rm -f "$f.ncu-rep"
    done
done
ls -la "$out"
