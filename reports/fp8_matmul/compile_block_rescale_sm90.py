"""Compile kernels/fp8_block_rescale_sm90.py's Gluon kernel for sm_90 on a machine without a GPU.

Run with Triton 3.6 (the device's version) first on the path (``compile_block_sm90.py``'s docstring). For each
config it prints registers / spills (ptxas), shared memory and, for each consumer's K loop, the opcode histogram
and the order of the QGMMA issue, the rescale FMULs and the WARPGROUP.DEPBAR wait.

    python3 reports/fp8_matmul/compile_block_rescale_sm90.py [--dump DIR] [--match TAG]
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
from pathlib import Path

import torch
import triton
from triton.backends.compiler import GPUTarget

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parents[1]))
sys.path.insert(0, str(HERE))

from compile_block_sm90 import BIN, analyse_k_loop, loops, opcode, order_summary, ptxas_report  # noqa: E402
from triton.experimental.gluon import language as gl  # noqa: E402
from triton.experimental.gluon._runtime import GluonASTSource  # noqa: E402
from triton.experimental.gluon.nvidia.hopper import TensorDescriptor  # noqa: E402
from triton.runtime.jit import mangle_type  # noqa: E402

from kernels import fp8_block_rescale_sm90 as R  # noqa: E402


def desc_sig(rows: int, cols: int, dtype) -> str:
    t = torch.empty(512, 512, dtype=dtype)
    gdt = {torch.float8_e4m3fn: gl.float8e4nv, torch.bfloat16: gl.bfloat16}[dtype]
    lay = gl.NVMMASharedLayout.get_default_for([rows, cols], gdt)
    return mangle_type(TensorDescriptor(t, [512, 512], [512, 1], [rows, cols], lay))


def compile_cfg(num_stages: int, has_res: bool, has_gate: bool, wide: bool, block_n: int = 256, share=False):
    e4m3 = torch.float8_e4m3fn
    sig = {"a_desc": desc_sig(64, 128, e4m3), "b_desc": desc_sig(block_n, 128, e4m3),
           "out_desc": desc_sig(64, R.HALF_N, torch.bfloat16), "a_scale_ptr": "*fp32", "b_scale_ptr": "*fp32",
           "res_ptr": "*bf16", "gate_ptr": "*bf16"}  # fmt: skip
    for n in ("M", "N", "K", "stride_asm", "stride_ask", "stride_bsn", "stride_bsk", "stride_rm", "stride_gn"):
        sig[n] = "i32"
    const = dict(HAS_RESIDUAL=has_res, HAS_GATE=has_gate, NUM_STAGES=num_stages, GROUP=R.GROUP_M,
                 PRODUCER_REGS=R.PRODUCER_REGS, CONSUMER_REGS=R.CONSUMER_REGS, WIDE=wide, SHARE_OUT=share,
                 num_warps=4)  # fmt: skip
    for c in const:
        sig[c] = "constexpr"
    names = list(sig)
    div16 = ["a_scale_ptr", "b_scale_ptr", "res_ptr", "gate_ptr", "N", "K", "stride_rm"]
    attrs = {(names.index(a),): [["tt.divisibility", 16]] for a in div16}
    src = GluonASTSource(fn=R._fp8_block_gemm_rescaled_kernel, signature=sig, constexprs=const, attrs=attrs)
    return triton.compile(src, target=GPUTarget("cuda", 90, 32), options=dict(num_warps=4, maxnreg=R.MAXNREG))


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--dump", default=None, help="folder for ttgir/ptx/sass of each config")
    ap.add_argument("--match", default=None, help="only the configs whose tag contains this string")
    args = ap.parse_args()
    print("triton", triton.__version__)
    cfgs = [  # (stages, residual, gate, wide, block_n, share_out_buffer)
        (3, False, False, False, 256, False), (3, True, True, False, 256, False), (2, False, False, False, 256, False),
        (3, False, False, True, 256, False), (3, True, True, True, 256, False), (6, False, False, True, 128, False),
        (6, True, True, True, 128, False), (4, False, False, True, 256, True), (4, True, True, True, 256, True),
    ]  # fmt: skip
    for stages, res, gate, wide, bn, share in cfgs:
        ep = f"{'res' if res else 'nores'}_{'gate' if gate else 'nogate'}"
        tag = f"rescale{'_wide' if wide else ''}_bn{bn}_s{stages}_{ep}{'_shared' if share else ''}"
        if args.match and args.match not in tag:
            continue
        try:
            ck = compile_cfg(stages, res, gate, wide, bn, share)
        except Exception as e:  # noqa: BLE001 (report every config)
            print(f"== {tag}: COMPILE FAILED {type(e).__name__}: {str(e)[:3000]}")
            continue
        d = Path(args.dump or f"/tmp/block_rescale_{os.getpid()}")
        d.mkdir(parents=True, exist_ok=True)
        for k in ("ttgir", "ptx"):
            (d / f"{tag}.{k}").write_text(ck.asm[k])
        cubin = d / f"{tag}.cubin"
        cubin.write_bytes(ck.asm["cubin"])
        sass = subprocess.run([BIN / "cuobjdump", "-sass", cubin], capture_output=True, text=True).stdout
        (d / f"{tag}.sass").write_text(sass)
        print(f"== {tag}: smem={ck.metadata.shared} B")
        print("   ptxas -v:", ptxas_report(d / f"{tag}.ptx", d / f"{tag}_v.cubin"))
        ptx = ck.asm["ptx"]
        regs = re.findall(r"setmaxnreg\.(inc|dec)\.sync\.aligned\.u32\s+(\d+)", ptx)
        print("   setmaxnreg:", " ".join(f"{a}{n}" for a, n in regs))
        mma_loops = [lp for lp in loops(sass) if any(opcode(x).startswith(("HGMMA", "QGMMA")) for _, x in lp[2])]
        k_loops = [lp for lp in mma_loops if not any(opcode(x).startswith(("STG", "UTMASTG")) for _, x in lp[2])]
        inner = [lp for lp in k_loops if not any(lp[0] <= o[0] and o[1] <= lp[1] for o in k_loops if o != lp)]
        for start, end, body in inner:
            analyse_k_loop(start, end, body)
        tma_loops = [lp for lp in loops(sass) if any(opcode(x).startswith("UTMALDG") for _, x in lp[2])]
        for start, end, body in tma_loops[:1]:
            print(f"   producer loop {start:#x}-{end:#x}: {len(body)} instrs, order: {order_summary(body)}")


if __name__ == "__main__":
    main()
