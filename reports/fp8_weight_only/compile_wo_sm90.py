"""Compile kernels/fp8_weight_only_sm90.py's Gluon kernel for sm_90 on a machine without a GPU.

Run with Triton 3.6 (the device's version) first on the path, as reports/fp8_matmul/compile_block_sm90.py. For
each config it prints registers / spills (ptxas), shared memory, the setmaxnreg plan and each consumer's K loop
(opcode histogram; the order of HGMMA issue, WARPGROUP.DEPBAR waits and mbarrier traffic; shared loads).
"""

from __future__ import annotations

import argparse
import sys
from collections import Counter
from pathlib import Path

import triton
from triton.backends.compiler import GPUTarget

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "fp8_matmul"))

from compile_block_sm90 import loops, opcode, order_summary  # noqa: E402
from compile_row_sm90 import dump_and_report  # noqa: E402
from triton.experimental.gluon._runtime import GluonASTSource  # noqa: E402

from kernels import fp8_weight_only_sm90 as W  # noqa: E402


def desc_sig(rows: int, cols: int, gdt) -> str:
    import torch
    from triton.experimental.gluon import language as gl
    from triton.experimental.gluon.nvidia.hopper import TensorDescriptor
    from triton.runtime.jit import mangle_type

    tdt = {gl.uint8: torch.uint8, gl.bfloat16: torch.bfloat16}[gdt]
    t = torch.empty(512, 512, dtype=tdt)
    lay = gl.NVMMASharedLayout.get_default_for([rows, cols], gdt)
    return mangle_type(TensorDescriptor(t, [512, 512], [512, 1], [rows, cols], lay))


def compile_cfg(block_t: int, stages: int, mode: int, res: bool, gate: bool, stream_k: bool = False, decode: int = 1):
    from triton.experimental.gluon import language as gl

    sig = {
        "w_desc": desc_sig(W.ROWS, W.BLOCK_K, gl.uint8),
        "x_desc": desc_sig(block_t, W.BLOCK_K, gl.bfloat16),
        "out_desc": desc_sig(block_t, W.ROWS, gl.bfloat16),
        "res_desc": desc_sig(block_t, W.ROWS, gl.bfloat16),
        "w_scale_ptr": "*fp32",
        "gate_ptr": "*bf16",
        "ws_ptr": "*fp32",
        "cnt_ptr": "*i32",
        "out_ptr": "*bf16",
        "res_ptr": "*bf16",
        "M": "i32",
        "N": "i32",
        "K": "i32",
        "stride_wsn": "i32",
        "stride_wsk": "i32",
        "stride_gn": "i32",
        "stride_om": "i32",
        "stride_rm": "i32",
    }
    const = dict(SCALE_MODE=mode, HAS_RESIDUAL=res, HAS_GATE=gate, NUM_STAGES=stages, GROUP=W.GROUP,
                 STREAM_K=stream_k, SK_PROBE=0, DECODE=decode, PRODUCER_REGS=W.PRODUCER_REGS,
                 CONSUMER_REGS=W.CONSUMER_REGS, num_warps=4)  # fmt: skip
    for c in const:
        sig[c] = "constexpr"
    names = list(sig)
    div16 = ["w_scale_ptr", "gate_ptr", "ws_ptr", "cnt_ptr", "out_ptr", "res_ptr", "N", "K", "stride_om",
             "stride_rm"]  # fmt: skip
    attrs = {(names.index(a),): [["tt.divisibility", 16]] for a in div16}
    src = GluonASTSource(fn=W._fp8_weight_only_sm90_kernel, signature=sig, constexprs=const, attrs=attrs)
    return triton.compile(src, target=GPUTarget("cuda", 90, 32), options=dict(num_warps=4, maxnreg=W.MAXNREG))


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--dump", default="/tmp/wo_sm90", help="folder for ttgir/ptx/sass of each config")
    ap.add_argument("--match", default=None, help="only the configs whose tag contains this string")
    ap.add_argument("--decode", type=int, default=1, help="the weight decode (kernel's DECODE): 0 uint8, 1 pairs")
    args = ap.parse_args()
    print("triton", triton.__version__)
    cfgs = [(256, 4, 1, False, False, False), (128, 6, 1, False, False, False), (256, 4, 1, True, True, False),
            (128, 6, 2, False, False, False), (256, 4, 0, False, False, False), (256, 4, 1, False, False, True),
            (256, 4, 1, True, True, True), (256, 4, 2, False, False, True)]  # fmt: skip
    for block_t, stages, mode, res, gate, sk in cfgs:
        tag = f"bt{block_t}_s{stages}_mode{mode}_{'res' if res else 'nores'}_{'gate' if gate else 'nogate'}"
        tag += ("_sk" if sk else "") + ("_d0" if args.decode == 0 else "")
        if args.match and args.match not in tag:
            continue
        try:
            ck = compile_cfg(block_t, stages, mode, res, gate, sk, args.decode)
        except Exception as e:  # noqa: BLE001 (report every config)
            print(f"== {tag}: COMPILE FAILED {type(e).__name__}: {str(e)[:3000]}")
            continue
        sass = dump_and_report(ck, Path(args.dump), tag, W.smem_bytes(stages, block_t))
        mma_loops = [lp for lp in loops(sass) if any(opcode(x).startswith("HGMMA") for _, x in lp[2])]
        k_loops = [lp for lp in mma_loops if not any(opcode(x).startswith(("STG", "UTMASTG")) for _, x in lp[2])]
        inner = [lp for lp in k_loops if not any(lp[0] <= o[0] and o[1] <= lp[1] for o in k_loops if o != lp)]
        for start, end, body in inner:
            ops = Counter(opcode(x).split(".")[0] for _, x in body)
            print(f"   K loop {start:#x}-{end:#x}: {len(body)} instrs:",
                  ", ".join(f"{k} {v}" for k, v in ops.most_common(16)))  # fmt: skip
            print("   order:", order_summary(body))
            lds = Counter(opcode(x) for _, x in body if opcode(x).startswith(("LDS", "LDSM")))
            print("   shared loads:", dict(lds))


if __name__ == "__main__":
    main()
