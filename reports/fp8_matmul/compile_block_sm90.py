"""Compile kernels/fp8_block_gemm_sm90.py's Gluon kernel for sm_90 on a machine without a GPU.

History: written for the options ``kernels/fp8_block_gemm_sm90.py`` had up to 787a08e (``fp8_block_gemm_sm90_ws``,
``lagged``, ``defer_scale``, the non-specialized kernel); they were pruned in session 18. Run it from that commit.

Run with Triton 3.6 (the device's version) first on the path, e.g. ``/tmp/py36 reports/fp8_matmul/
compile_block_sm90.py [--dump DIR]``. For each config (``ws_*``: the warp-specialized kernel) it
prints registers / spills (ptxas) / shared memory, and the SASS of the K loop (of each consumer
partition for ``ws_*``): the opcode histogram and the order of the HGMMA issue, the promotion
FFMAs/FMULs and the WARPGROUP.DEPBAR wait (the overlap this kernel exists for: the FMAs
of step k-1 must sit between the HGMMA of step k and its wait).
"""

from __future__ import annotations

import argparse
import collections
import os
import re
import subprocess
import sys
from pathlib import Path

import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.runtime.jit import mangle_type

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from triton.experimental.gluon import language as gl  # noqa: E402
from triton.experimental.gluon._runtime import GluonASTSource  # noqa: E402
from triton.experimental.gluon.nvidia.hopper import TensorDescriptor  # noqa: E402

from kernels import fp8_block_gemm_sm90 as G  # noqa: E402

BIN = Path(triton.__file__).parent / "backends/nvidia/bin"


def desc_sig(rows: int, dtype=torch.float8_e4m3fn) -> str:
    """The signature string Triton's launcher builds for a Gluon TMA descriptor of [rows, 128] ``dtype``."""
    t = torch.empty(256, 512, dtype=dtype)
    gdt = {torch.float8_e4m3fn: gl.float8e4nv, torch.bfloat16: gl.bfloat16, torch.float32: gl.float32}[dtype]
    lay = gl.NVMMASharedLayout.get_default_for([rows, 128], gdt)
    return mangle_type(TensorDescriptor(t, [256, 512], [512, 1], [rows, 128], lay))


def compile_cfg(
    block_m: int, num_stages: int, has_res: bool, has_gate: bool, out: str, ws: bool = False, sched: str = "lag"
):
    """``sched`` (warp-specialized kernel only): "lag", "lag+order" or "order" (ORDERED, not LAGGED),
    plus "+defer" (DEFER_SCALE), "+tma" (TMA_STORE), "+c3" (three consumers, 192-row tiles; not ordered:
    "c3" alone is the unlagged schedule). (The 128 x 256 "wide" consumer compiled here at ae0bdcf: 276
    bytes of spills; removed after probe_ws_schedule run 2.)"""
    fn = G._fp8_block_gemm_sm90_ws_kernel if ws else G._fp8_block_gemm_sm90_kernel
    num_warps = 4 if ws else G._WARPS[block_m]
    odt = {"bf16": torch.bfloat16, "fp32": torch.float32}[out]
    sig = {
        "a_desc": desc_sig(64 if ws else block_m),
        "b_desc": desc_sig(G.BLOCK_N),
        **({"out_desc": desc_sig(64, odt)} if ws else {}),
        "a_scale_ptr": "*fp32",
        "b_scale_ptr": "*fp32",
        "out_ptr": f"*{out}",
        "res_ptr": f"*{out}",
        "gate_ptr": "*bf16",
        "M": "i32",
        "N": "i32",
        "K": "i32",
        "stride_asm": "i32",
        "stride_ask": "i32",
        "stride_bsn": "i32",
        "stride_bsk": "i32",
        "stride_om": "i32",
        "stride_rm": "i32",
        "stride_gn": "i32",
    }
    const = {"HAS_RESIDUAL": has_res, "HAS_GATE": has_gate, "NUM_STAGES": num_stages, "GROUP": G.GROUP_M}
    consumers = 3 if "c3" in sched else 2
    maxnreg, consumer_regs, producer_regs = G.WS_REGS[consumers]
    if ws:
        const.update(PRODUCER_REGS=producer_regs, CONSUMER_REGS=consumer_regs)
        const.update(ORDERED="order" in sched, LAGGED="lag" in sched, CONSUMERS=consumers)
        const.update(DEFER_SCALE="defer" in sched, TMA_STORE="tma" in sched)
    const["num_warps"] = num_warps
    for c in const:
        sig[c] = "constexpr"
    names = list(sig)
    # what the launcher specializes on for contiguous tensors: 16-byte aligned pointers, row strides
    div16 = ["a_scale_ptr", "b_scale_ptr", "out_ptr", "res_ptr", "gate_ptr", "N", "K", "stride_om", "stride_rm"]
    attrs = {(names.index(a),): [["tt.divisibility", 16]] for a in div16}
    attrs[(names.index("stride_ask"),)] = []  # a_scale (M, kb) row-major: stride 1 along kb
    src = GluonASTSource(fn=fn, signature=sig, constexprs=const, attrs=attrs)
    opts = dict(num_warps=num_warps, maxnreg=maxnreg) if ws else dict(num_warps=num_warps)
    return triton.compile(src, target=GPUTarget("cuda", 90, 32), options=opts)


def ptxas_report(ptx: Path, cubin: Path) -> str:
    """Registers, spill stores/loads and ptxas warnings (e.g. wgmma serialization) of the PTX."""
    r = subprocess.run([BIN / "ptxas", "-v", "-arch=sm_90a", "-o", cubin, ptx], capture_output=True, text=True)
    lines = [x.strip() for x in (r.stdout + r.stderr).splitlines()]
    keep = [x for x in lines if "registers" in x or "spill" in x or "arning" in x or "rror" in x]
    return " | ".join(keep)


def loops(sass: str):
    """(start, end, [instructions]) of every backward branch's body in a cuobjdump -sass listing."""
    ins = []
    for line in sass.splitlines():
        m = re.match(r"\s*/\*([0-9a-f]{4,})\*/\s+(.*?);", line)
        if m:
            ins.append((int(m.group(1), 16), m.group(2).strip()))
    for addr, txt in ins:
        t = re.search(r"BRA.*?0x([0-9a-f]+)", txt)
        if t and int(t.group(1), 16) < addr:
            tgt = int(t.group(1), 16)
            yield tgt, addr, [(a, x) for a, x in ins if tgt <= a <= addr]


def opcode(txt: str) -> str:
    return re.sub(r"^@!?U?P\w+\s+", "", txt).split()[0]


def order_summary(body) -> str:
    """Run-length summary of the loop body restricted to the instructions that matter for overlap."""
    keep = ("HGMMA", "QGMMA", "WARPGROUP", "FFMA", "FMUL", "FADD", "SYNCS", "UTMALDG", "LDG", "BAR", "WARPSYNC")
    seq = []
    for _, x in body:
        op = opcode(x)
        base = op.split(".")[0]
        if base.startswith(keep):
            name = op if base in ("WARPGROUP", "SYNCS") else base
            if seq and seq[-1][0] == name:
                seq[-1][1] += 1
            else:
                seq.append([name, 1])
    return " -> ".join(f"{n}x{c}" if c > 1 else n for n, c in seq)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--dump", default=None, help="folder for ttgir/ptx/sass of each config")
    ap.add_argument("--only-ws", action="store_true", help="the warp-specialized configs only")
    ap.add_argument("--match", default=None, help="only the configs whose tag contains this string")
    args = ap.parse_args()
    print("triton", triton.__version__)
    cfgs = [(128, 4, False, False, "bf16", False), (128, 4, True, True, "bf16", False),
            (128, 3, False, False, "fp32", False), (64, 6, False, False, "bf16", False),
            (64, 4, True, True, "fp32", False),
            (128, 4, False, False, "bf16", True), (128, 4, True, True, "bf16", True),
            (128, 3, False, False, "fp32", True), (128, 5, True, True, "fp32", True)]  # fmt: skip
    cfgs = [c + ("lag",) for c in cfgs]
    cfgs += [(128, 4, False, False, "bf16", True, "lag+order"), (128, 4, False, False, "bf16", True, "order"),
             (128, 5, True, True, "bf16", True, "order"), (128, 3, False, False, "bf16", True, "order+defer"),
             (128, 3, False, False, "bf16", True, "order+defer+tma"), (128, 4, True, True, "bf16", True, "c3+defer"),
             (128, 4, False, False, "bf16", True, "c3+defer+tma"),
             (128, 4, False, False, "bf16", True, "c3")]  # fmt: skip
    if args.only_ws:
        cfgs = [c for c in cfgs if c[5]]
    for block_m, stages, res, gate, out, ws, sched in cfgs:
        tag = f"bm{block_m}_s{stages}_{'res' if res else 'nores'}_{'gate' if gate else 'nogate'}_{out}"
        tag = f"ws_{sched}_" + tag if ws else tag
        if args.match and args.match not in tag:
            continue
        try:
            ck = compile_cfg(block_m, stages, res, gate, out, ws, sched)
        except Exception as e:  # noqa: BLE001 (report every config)
            print(f"== {tag}: COMPILE FAILED {type(e).__name__}: {str(e)[:2000]}")
            continue
        d = Path(args.dump or f"/tmp/block_sm90_{os.getpid()}")
        d.mkdir(parents=True, exist_ok=True)
        (d / f"{tag}.ttgir").write_text(ck.asm["ttgir"])
        (d / f"{tag}.ptx").write_text(ck.asm["ptx"])
        cubin = d / f"{tag}.cubin"
        cubin.write_bytes(ck.asm["cubin"])
        sass = subprocess.run([BIN / "cuobjdump", "-sass", cubin], capture_output=True, text=True).stdout
        (d / f"{tag}.sass").write_text(sass)
        res_use = subprocess.run([BIN / "cuobjdump", "-res-usage", cubin], capture_output=True, text=True).stdout
        usage = dict(re.findall(r"(REG|STACK|SHARED|LOCAL):(\d+)", res_use))
        print(f"== {tag}: num_warps={ck.metadata.num_warps} smem={ck.metadata.shared} B, cuobjdump: {usage}")
        print("   ptxas -v:", ptxas_report(d / f"{tag}.ptx", d / f"{tag}_v.cubin"))
        ptx = ck.asm["ptx"]
        print(
            "   ptx: wgmma.mma_async",
            ptx.count("wgmma.mma_async"),
            " wgmma.wait_group",
            len(re.findall(r"wgmma.wait_group", ptx)),
            " cp.async.bulk.tensor",
            ptx.count("cp.async.bulk.tensor"),
        )
        mma_loops = [lp for lp in loops(sass) if any(opcode(x).startswith(("HGMMA", "QGMMA")) for _, x in lp[2])]
        if ws:  # one K loop per consumer partition (innermost loops holding a QGMMA), plus the register plan
            # (a K loop holds no STG: backward branches from the out-of-line mbarrier retry stubs span
            # the epilogue too)
            k_loops = [lp for lp in mma_loops if not any(opcode(x).startswith("STG") for _, x in lp[2])]
            inner = [lp for lp in k_loops if not any(lp[0] <= o[0] and o[1] <= lp[1] for o in k_loops if o != lp)]
            regs = re.findall(r"setmaxnreg\.(inc|dec)\.sync\.aligned\.u32\s+(\d+)", ptx)
            print("   setmaxnreg in the PTX (in order):", " ".join(f"{d}{n}" for d, n in regs))
            print("   USETMAXREG in the SASS:", " ".join(re.findall(r"USETMAXREG\.(\S+ \S+ ?\S*?) ;", sass)))
            tma_loops = [lp for lp in loops(sass) if any(opcode(x).startswith("UTMALDG") for _, x in lp[2])]
            for start, end, body in tma_loops[:1]:
                print(f"   producer loop {start:#x}-{end:#x}: {len(body)} instrs, order: {order_summary(body)}")
        else:
            inner = sorted(mma_loops, key=lambda lp: len(lp[2]))[:1]  # the innermost: the K loop
        for start, end, body in inner:
            analyse_k_loop(start, end, body)


def analyse_k_loop(start, end, body):
    """Opcode histogram, order, barriers and the FFMA window of one K loop."""
    ops = collections.Counter(opcode(x).split(".")[0] for _, x in body)
    print(f"   K loop {start:#x}-{end:#x}: {len(body)} instrs:", ", ".join(f"{k} {v}" for k, v in ops.most_common(18)))
    print("   order:", order_summary(body))
    bars = [x for _, x in body if opcode(x).startswith("BAR")]
    cta = [x for x in bars if not re.search(r"BAR\.\S+\s+\S+,\s*0x", x)]  # no thread count: the whole CTA
    kinds = sorted({re.sub(r"^@!?U?P\w+\s+", "", x) for x in bars})
    print(f"   barriers: {len(bars)} ({len(cta)} CTA-wide, {len(bars) - len(cta)} named with a thread count): {kinds}")
    first_hgmma = next(i for i, (_, x) in enumerate(body) if opcode(x).startswith(("HGMMA", "QGMMA")))
    last_hgmma = max(i for i, (_, x) in enumerate(body) if opcode(x).startswith(("HGMMA", "QGMMA")))
    waits = [i for i, (_, x) in enumerate(body) if opcode(x).startswith("WARPGROUP.DEPBAR")]
    wait_after = [w for w in waits if w > last_hgmma]
    if wait_after:
        between = [opcode(x).split(".")[0] for _, x in body[last_hgmma + 1 : wait_after[0]]]
        c = collections.Counter(between)
        print(f"   between the last QGMMA ({last_hgmma}) and its wait ({wait_after[0]}): FFMA {c['FFMA']}, "
              f"FMUL {c['FMUL']}, FADD {c['FADD']}, LDG {c['LDG']}, of {len(between)} instrs")  # fmt: skip
    print(f"   QGMMA (fp8 HGMMA) at loop positions {first_hgmma}..{last_hgmma}, WARPGROUP.DEPBAR at {waits}")
    movs = sum(1 for _, x in body[wait_after[0] if wait_after else 0 :] if opcode(x).startswith(("IMAD.MOV", "MOV")))
    print(f"   register moves after the wait (copy of the product into the lagged registers): {movs}")


if __name__ == "__main__":
    main()
