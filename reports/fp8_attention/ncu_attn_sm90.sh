#!/usr/bin/env bash
# Nsight Compute profiles of ncu_attn_sm90.py's variants on the device (--set full, one launch each), their
# details / raw pages and the sm_90 kernel's per-SASS stall samples, then the summary ncu_attn_sm90.md.
# Usage: bash reports/fp8_attention/ncu_attn_sm90.sh OUTDIR
set -u
out=${1:?OUTDIR}
mkdir -p "$out/prof"
ncu=${NCU:-/usr/local/cuda/bin/ncu}
py="python3 reports/fp8_attention/ncu_attn_sm90.py"
echo "git ${GIT_SHA:-unknown}, $(nvidia-smi --query-gpu=name,clocks.max.sm --format=csv,noheader), $(date -u +%FT%TZ)" \
    >"$out/prof/meta.txt"
prof() {  # name kernel-regex launch-count
    local name=$1 regex=$2 count=$3
    "$ncu" --kernel-name "regex:$regex" --profile-from-start off --launch-count "$count" --set full \
        --import-source no -f -o "$out/prof/$name" $py "$name" >"$out/prof/$name.log" 2>&1 \
        || echo "ncu $name failed: $(tail -3 "$out/prof/$name.log")"
    [ -f "$out/prof/$name.ncu-rep" ] || return
    "$ncu" --import "$out/prof/$name.ncu-rep" --page raw --csv >"$out/prof/$name.raw.csv" 2>&1
    "$ncu" --import "$out/prof/$name.ncu-rep" --page details --print-details all >"$out/prof/$name.details.txt" 2>&1
    case $name in sm90*) "$ncu" --import "$out/prof/$name.ncu-rep" --page source --print-source sass --csv \
        >"$out/prof/$name.sass.csv" 2>&1 ;; esac
    rm -f "$out/prof/$name.ncu-rep"
}
prof sm90 _fp8_attention_sm90_kernel 1
prof sm90_pp _fp8_attention_sm90_kernel 1
prof cudnn "cudnn|fmha|sdpa|flash|attn" 1
prof prepass "_stats_kernel|_quant_kernel" 2
python3 reports/fp8_attention/ncu_attn_sm90.py --summarize "$out/prof" "$out/ncu_attn_sm90.md"
tar -czf "$out/ncu_attn_sm90_prof.tar.gz" -C "$out" prof && rm -rf "$out/prof"
ls -la "$out"
