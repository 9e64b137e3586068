"""Compile kernels/fp8_attention_sm90.py's Gluon kernel for sm_90 on a machine without a GPU.

Run with Triton 3.6 (the device's version) first on the path, as reports/fp8_matmul/compile_block_sm90.py. For
each config it prints registers / spills (ptxas), shared memory, the setmaxnreg plan and each consumer's main
loop (opcode histogram; the order of QGMMA / IGMMA issue, WARPGROUP.DEPBAR waits and mbarrier traffic).
"""

from __future__ import annotations

import argparse
import sys
from collections import Counter
from pathlib import Path

import torch
import triton
from triton.backends.compiler import GPUTarget

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "fp8_matmul"))

from compile_block_sm90 import loops, opcode, order_summary  # noqa: E402
from compile_row_sm90 import desc_sig_n, dump_and_report  # noqa: E402
from triton.experimental.gluon._runtime import GluonASTSource  # noqa: E402

from kernels import fp8_attention_sm90 as A  # noqa: E402


def compile_cfg(
    block_n: int, stages: int, pingpong: int, scale_block: int, qk_int8: bool, split: bool = False, d: int = 128,
    tree: bool = False, late: bool = False, consumers: int = 2,
):  # fmt: skip
    qk_dt = torch.int8 if qk_int8 else torch.float8_e4m3fn
    sig = {
        "q_desc": desc_sig_n(A.CONSUMER_ROWS, d, qk_dt),
        "k_desc": desc_sig_n(block_n, d, qk_dt),
        "v_desc": desc_sig_n(d, block_n, torch.float8_e4m3fn),
        "qs_ptr": "*fp32",
        "ks_ptr": "*fp32",
        "vs_ptr": "*fp32",
        "o_ptr": "*bf16",
        "L": "i32",
        "Lp": "i32",
        "H": "i32",
        "n_sblk": "i32",
        "stride_ob": "i32",
        "stride_oh": "i32",
        "stride_ol": "i32",
    }
    const = dict(SCALE_BLOCK=scale_block, NUM_STAGES=stages, PINGPONG=int(pingpong), EXP_SPLIT=split,
                 ROW_TREE=tree, LATE_RESCALE=late, CONSUMERS=consumers,
                 PRODUCER_REGS=A.WS_REGS[consumers][2], CONSUMER_REGS=A.WS_REGS[consumers][1], num_warps=4)  # fmt: skip
    for c in const:
        sig[c] = "constexpr"
    names = list(sig)
    div16 = ["qs_ptr", "ks_ptr", "vs_ptr", "o_ptr", "Lp", "stride_ob", "stride_oh", "stride_ol"]
    attrs = {(names.index(a),): [["tt.divisibility", 16]] for a in div16}
    src = GluonASTSource(fn=A._fp8_attention_sm90_kernel, signature=sig, constexprs=const, attrs=attrs)
    opts = dict(num_warps=4, maxnreg=A.WS_REGS[consumers][0])
    return triton.compile(src, target=GPUTarget("cuda", 90, 32), options=opts)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--dump", default="/tmp/attn_sm90", help="folder for ttgir/ptx/sass of each config")
    ap.add_argument("--match", default=None, help="only the configs whose tag contains this string")
    args = ap.parse_args()
    print("triton", triton.__version__)
    # (block_n, stages, ping-pong mode, scale_block, int8 Q·K, exp2 split, tree rows, late rescale, consumers)
    cfgs = [(128, 2, 0, 128, False, False, False, False, 2), (128, 2, 0, 128, False, True, False, False, 2),
            (128, 2, 1, 128, False, False, False, False, 2), (128, 2, 2, 128, False, False, False, False, 2),
            (128, 2, 0, 128, False, False, True, False, 2), (128, 2, 0, 128, False, False, False, True, 2),
            (128, 2, 2, 128, False, False, True, True, 2),
            (128, 2, 0, 64, False, False, False, False, 2), (64, 4, 0, 128, False, False, False, False, 2),
            (128, 2, 0, 128, True, False, False, False, 2),
            (64, 2, 0, 128, False, False, False, False, 3), (64, 4, 0, 128, False, False, False, False, 3),
            (128, 2, 0, 128, False, False, False, False, 3)]  # fmt: skip
    for block_n, stages, pp, sb, i8, split, tree, late, cons in cfgs:
        tag = f"bn{block_n}_s{stages}_{f'pp{pp}' if pp else 'nopp'}_sb{sb}_{'int8' if i8 else 'fp8'}"
        tag += ("_split" if split else "") + ("_tree" if tree else "") + ("_late" if late else "")
        tag += f"_c{cons}" if cons != 2 else ""
        if args.match and args.match not in tag:
            continue
        try:
            ck = compile_cfg(block_n, stages, pp, sb, i8, split, tree=tree, late=late, consumers=cons)
        except Exception as e:  # noqa: BLE001 (report every config)
            print(f"== {tag}: COMPILE FAILED {type(e).__name__}: {str(e)[:4000]}")
            continue
        sass = dump_and_report(ck, Path(args.dump), tag, A.smem_bytes(stages, block_n, consumers=cons))
        mma_loops = [lp for lp in loops(sass) if any(opcode(x).startswith(("QGMMA", "IGMMA")) for _, x in lp[2])]
        for start, end, body in mma_loops:
            ops = Counter(opcode(x).split(".")[0] for _, x in body)
            top = ", ".join(f"{k} {v}" for k, v in ops.most_common(14))
            print(f"   main loop {start:#x}-{end:#x}: {len(body)} instrs; {top}")
            print(f"     order: {order_summary(body)}")


if __name__ == "__main__":
    main()
