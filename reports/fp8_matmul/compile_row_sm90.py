"""Compile kernels/fp8_row_gemm_sm90.py's Gluon kernel for sm_90 on a machine without a GPU.

Run with Triton 3.6 (the device's version) first on the path, as compile_block_sm90.py. For each config it
prints registers / spills (ptxas), shared memory, the setmaxnreg plan, the producer loop and each consumer's
K loop (opcode histogram and the order of QGMMA issue, WARPGROUP.DEPBAR wait and mbarrier traffic).
"""

from __future__ import annotations

import argparse
import re
import subprocess
import sys
from pathlib import Path

import torch
import triton
from triton.backends.compiler import GPUTarget

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from compile_block_sm90 import BIN, analyse_k_loop, desc_sig, loops, opcode, order_summary, ptxas_report  # noqa: E402
from triton.experimental.gluon._runtime import GluonASTSource  # noqa: E402

from kernels import fp8_row_gemm_sm90 as R  # noqa: E402


def desc_sig_n(rows: int, cols: int, dtype) -> str:
    """desc_sig for a [rows, cols] box (desc_sig's boxes are [rows, 128])."""
    from triton.experimental.gluon import language as gl
    from triton.experimental.gluon.nvidia.hopper import TensorDescriptor
    from triton.runtime.jit import mangle_type

    t = torch.empty(512, 512, dtype=dtype)
    gdt = {torch.float8_e4m3fn: gl.float8e4nv, torch.bfloat16: gl.bfloat16, torch.int8: gl.int8}[dtype]
    lay = gl.NVMMASharedLayout.get_default_for([rows, cols], gdt)
    return mangle_type(TensorDescriptor(t, [512, 512], [512, 1], [rows, cols], lay))


def dump_and_report(ck, d: Path, tag: str, expected_smem: int) -> str:
    """Write the compiled kernel's TTGIR, PTX, cubin and SASS under ``d`` as ``tag.*``, print its shared memory,
    ptxas registers / spills and setmaxnreg plan; return the SASS."""
    d.mkdir(parents=True, exist_ok=True)
    for k in ("ttgir", "ptx"):
        (d / f"{tag}.{k}").write_text(ck.asm[k])
    cubin = d / f"{tag}.cubin"
    cubin.write_bytes(ck.asm["cubin"])
    sass = subprocess.run([BIN / "cuobjdump", "-sass", cubin], capture_output=True, text=True).stdout
    (d / f"{tag}.sass").write_text(sass)
    print(f"== {tag}: smem={ck.metadata.shared} B (expected {expected_smem})")
    print("   ptxas -v:", ptxas_report(d / f"{tag}.ptx", d / f"{tag}_v.cubin"))
    regs = re.findall(r"setmaxnreg\.(inc|dec)\.sync\.aligned\.u32\s+(\d+)", ck.asm["ptx"])
    print("   setmaxnreg in the PTX (in order):", " ".join(f"{a}{n}" for a, n in regs))
    return sass


def compile_cfg(
    block_n: int, stages: int, pingpong: bool, res: bool, gate: bool, prefetch=False, subtile=False, store=True
):
    rows = 128 if pingpong else 64
    part = block_n // 2 if subtile else block_n
    sig = {
        "a_desc": desc_sig(rows),
        "b_desc": desc_sig(block_n),
        "out_desc": desc_sig_n(rows, part, torch.bfloat16),
        "a_scale_ptr": "*fp32",
        "b_scale_ptr": "*fp32",
        "res_ptr": "*bf16",
        "gate_ptr": "*bf16",
        "M": "i32",
        "N": "i32",
        "K": "i32",
        "stride_asm": "i32",
        "stride_bsn": "i32",
        "stride_rm": "i32",
        "stride_gn": "i32",
    }
    const = dict(HAS_RESIDUAL=res, HAS_GATE=gate, NUM_STAGES=stages, GROUP=R.GROUP_M, PRODUCER_REGS=R.PRODUCER_REGS,
                 CONSUMER_REGS=R.CONSUMER_REGS, PINGPONG=pingpong, PREFETCH=prefetch, SUBTILE=subtile,
                 STORE=store, num_warps=4)  # fmt: skip
    for c in const:
        sig[c] = "constexpr"
    names = list(sig)
    div16 = ["a_scale_ptr", "b_scale_ptr", "res_ptr", "gate_ptr", "N", "K", "stride_rm"]
    attrs = {(names.index(a),): [["tt.divisibility", 16]] for a in div16}
    src = GluonASTSource(fn=R._fp8_row_gemm_sm90_kernel, signature=sig, constexprs=const, attrs=attrs)
    return triton.compile(src, target=GPUTarget("cuda", 90, 32), options=dict(num_warps=4, maxnreg=R.MAXNREG))


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--dump", default="/tmp/row_sm90", help="folder for ttgir/ptx/sass of each config")
    ap.add_argument("--match", default=None, help="only the configs whose tag contains this string")
    args = ap.parse_args()
    print("triton", triton.__version__)
    # (block_n, stages, ping-pong, residual, gate, prefetch_scales, epilogue_subtile)
    cfgs = [(256, 3, False, False, False, False, False), (256, 3, False, True, True, False, False),
            (128, 5, True, False, False, False, False), (128, 5, True, True, True, False, False),
            (128, 6, False, False, False, False, False), (256, 3, False, False, False, True, False),
            (256, 4, False, False, False, True, True), (256, 4, False, True, True, True, True),
            (256, 4, False, False, False, False, True)]  # fmt: skip
    for block_n, stages, pp, res, gate, pre, sub in cfgs:
        epi = f"{'res' if res else 'nores'}_{'gate' if gate else 'nogate'}"
        tag = f"{'pp' if pp else 'coop'}_bn{block_n}_s{stages}_{epi}{'_pre' if pre else ''}{'_sub' if sub else ''}"
        if args.match and args.match not in tag:
            continue
        try:
            ck = compile_cfg(block_n, stages, pp, res, gate, pre, sub)
        except Exception as e:  # noqa: BLE001 (report every config)
            print(f"== {tag}: COMPILE FAILED {type(e).__name__}: {str(e)[:3000]}")
            continue
        sass = dump_and_report(ck, Path(args.dump), tag, R.smem_bytes(stages, block_n, pp, subtile=sub, prefetch=pre))
        tma_loops = [lp for lp in loops(sass) if any(opcode(x).startswith("UTMALDG") for _, x in lp[2])]
        for start, end, body in tma_loops[:1]:
            print(f"   producer loop {start:#x}-{end:#x}: {len(body)} instrs, order: {order_summary(body)}")
        mma_loops = [lp for lp in loops(sass) if any(opcode(x).startswith(("HGMMA", "QGMMA")) for _, x in lp[2])]
        k_loops = [lp for lp in mma_loops if not any(opcode(x).startswith(("STG", "UTMASTG")) for _, x in lp[2])]
        inner = [lp for lp in k_loops if not any(lp[0] <= o[0] and o[1] <= lp[1] for o in k_loops if o != lp)]
        for start, end, body in inner:
            analyse_k_loop(start, end, body)


if __name__ == "__main__":
    main()
