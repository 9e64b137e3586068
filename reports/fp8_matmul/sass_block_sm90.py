"""SASS fingerprints of the Gluon block kernel's dispatched configurations, compiled for sm_90 without a GPU.

A refactor that must not change what runs (session 18: the options ``fp8_matmul`` never dispatches were pruned
from ``kernels/fp8_block_gemm_sm90.py``) is checked by compiling every configuration ``_block_gluon_options`` can
return, before and after, and comparing the SASS: identical SASS is the same kernel on the GPU.

Run with Triton 3.6 (the device's version) first on the path (``reports/DEVICE.md``, session 4)::

    python reports/fp8_matmul/sass_block_sm90.py --out reports/fp8_matmul/sass_block_sm90_<sha>.json

Constexprs the kernel no longer has are dropped (the pruned kernel has no LAGGED / DEFER_SCALE: the dispatched
values are now its only schedule).
"""

from __future__ import annotations

import argparse
import hashlib
import json
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
DT = {
    "bf16": (torch.bfloat16, gl.bfloat16),
    "fp32": (torch.float32, gl.float32),
    "e4m3": (torch.float8_e4m3fn, gl.float8e4nv),
}


def desc_sig(rows: int, dtype: str) -> str:
    """The signature string Triton's launcher builds for a Gluon TMA descriptor of [rows, 128] ``dtype``."""
    tdt, gdt = DT[dtype]
    lay = gl.NVMMASharedLayout.get_default_for([rows, 128], gdt)
    return mangle_type(TensorDescriptor(torch.empty(256, 512, dtype=tdt), [256, 512], [512, 1], [rows, 128], lay))


def dispatched() -> list[tuple[str, dict, bool, bool, str]]:
    """(tag, options, residual, gate, out dtype) for every schedule ``fp8_matmul._block_gluon_options`` returns."""
    out = []
    for consumers, ordered, stages in ((2, True, 3), (2, True, 5), (3, False, 4)):
        for odt in ("bf16", "fp32"):
            for res_gate in (False, True):
                opts = dict(CONSUMERS=consumers, ORDERED=ordered, NUM_STAGES=stages, TMA_STORE=odt == "bf16",
                            LAGGED=False, DEFER_SCALE=True)  # fmt: skip
                tag = f"c{consumers}{'_ordered' if ordered else ''}_s{stages}_{odt}{'_res_gate' if res_gate else ''}"
                out.append((tag, opts, res_gate, res_gate, odt))
    return out


def compile_ws(opts: dict, has_res: bool, has_gate: bool, odt: str):
    fn = G._fp8_block_gemm_sm90_ws_kernel
    maxnreg, consumer_regs, producer_regs = G.WS_REGS[opts["CONSUMERS"]]
    sig = {"a_desc": desc_sig(64, "e4m3"), "b_desc": desc_sig(G.BLOCK_N, "e4m3"), "out_desc": desc_sig(64, odt)}
    ptrs = {
        "a_scale_ptr": "*fp32",
        "b_scale_ptr": "*fp32",
        "out_ptr": f"*{odt}",
        "res_ptr": f"*{odt}",
        "gate_ptr": "*bf16",
    }
    ints = [
        "M",
        "N",
        "K",
        "stride_asm",
        "stride_ask",
        "stride_bsn",
        "stride_bsk",
        "stride_om",
        "stride_rm",
        "stride_gn",
    ]
    sig.update(ptrs)
    sig.update({n: "i32" for n in ints})
    const = dict(HAS_RESIDUAL=has_res, HAS_GATE=has_gate, GROUP=G.GROUP_M, PRODUCER_REGS=producer_regs,
                 CONSUMER_REGS=consumer_regs, num_warps=4, **opts)  # fmt: skip
    const = {k: v for k, v in const.items() if k in fn.arg_names}
    missing = [n for n in fn.arg_names if n not in sig and n not in const]
    if missing:
        raise SystemExit(f"the kernel has parameters this script does not know: {missing}")
    sig = {n: sig.get(n, "constexpr") for n in fn.arg_names}
    names = list(sig)
    div16 = ["a_scale_ptr", "b_scale_ptr", "out_ptr", "res_ptr", "gate_ptr", "N", "K", "stride_om", "stride_rm"]
    attrs = {(names.index(a),): [["tt.divisibility", 16]] for a in div16}
    attrs[(names.index("stride_ask"),)] = []
    src = GluonASTSource(fn=fn, signature=sig, constexprs=const, attrs=attrs)
    return triton.compile(src, target=GPUTarget("cuda", 90, 32), options=dict(num_warps=4, maxnreg=maxnreg))


def sass_text(ck, tmp: Path, tag: str) -> str:
    cubin = tmp / f"{tag}.cubin"
    cubin.write_bytes(ck.asm["cubin"])
    sass = subprocess.run([BIN / "cuobjdump", "-sass", cubin], capture_output=True, text=True, check=True).stdout
    # instructions only (the header names the file)
    return "\n".join(m.group(1) for m in re.finditer(r"/\*[0-9a-f]{4,}\*/\s+(.*?;)", sass))


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", required=True, help="JSON: {tag: {sha256, instructions, shared}}")
    ap.add_argument("--compare", default=None, help="an earlier JSON: exit 1 unless every fingerprint matches")
    args = ap.parse_args()
    tmp = Path("/tmp/sass_block_sm90")
    tmp.mkdir(exist_ok=True)
    result = {"triton": triton.__version__, "kernels": {}}
    for tag, opts, res, gate, odt in dispatched():
        ck = compile_ws(opts, res, gate, odt)
        text = sass_text(ck, tmp, tag)
        result["kernels"][tag] = dict(sha256=hashlib.sha256(text.encode()).hexdigest(), instructions=text.count(";"),
                                      shared=ck.metadata.shared)  # fmt: skip
        print(f"{tag}: {result['kernels'][tag]}")
    Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
    if args.compare:
        before = json.loads(Path(args.compare).read_text())["kernels"]
        diff = [t for t in result["kernels"] if before.get(t) != result["kernels"][t]]
        print("identical SASS for every dispatched configuration" if not diff else f"SASS differs: {diff}")
        sys.exit(1 if diff else 0)


if __name__ == "__main__":
    main()
