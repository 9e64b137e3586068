"""4-bit dequantization (``int4_matmul.dequantize_4bit``): does a larger tile per program move more bytes per second?

The 4-bit recipes run every block GEMM from 512 rows as ``dequantize_4bit`` (packed weight -> bf16, 512 MB chunks)
followed by cuBLAS. quant_runtime run 7 (H100, 37ca6d8) profiled 36.1 ms of ``_dequantize_4bit_kernel`` per nf4 step
(33.1 ms int4-g128) and measured nf4 at 482.1 ms per step against the 480 ms target of issue 7 (run 6: 476.9). The
kernel has used one 64 x 64 tile per program (2 KB read, 8 KB written) with 4 warps since it was written; no other
tile was ever timed. Each (BLOCK_N, BLOCK_K, num_warps) below is launched directly on FLUX.2-dev weight chunks, its
output compared bit for bit with the library's, and timed with ``triton.testing.do_bench`` (median); GB/s counts
the packed bytes and scales read plus the bf16 bytes written. Ceilings in the same run: a bf16 ``copy_`` and a
``fill_`` of the output's size.

    python3 reports/int4_matmul/probe_dequant_tiles.py --out $OUT/probe_dequant_tiles_run1.json
    python3 reports/int4_matmul/probe_dequant_tiles.py --wide --out $OUT/probe_dequant_tiles_run2.json

Expectation (written before the first run, session 19): the 64 x 64 tile moves ~2.1-2.2 TB/s (run 7's profile: about
78 GB per nf4 step in 36.1 ms), the copy ceiling is ~3.0 TB/s (reference/environment.md, KINDS.md); 128-256 rows per
program with 8 warps reach 2.5-2.8 TB/s, i.e. 28-31 ms per nf4 step, 5-8 ms less. BLOCK_K is capped at the group (64
for nf4, one scale per row and program), so the gain must come from rows.

Run 1 (f0cbf86), written after it: wrong. Rows do not matter: nf4 moved 2.13-2.36 TB/s with every tile, int4-g128
2.29-2.44; only BLOCK_K = 128 (int4's group) moved more, +3.5-4.8 % on every chunk. Copy ran 2.93-2.97 TB/s and fill
3.13-3.17 TB/s. What a program writes per row is BLOCK_K x 2 bytes (128 B at 64): longer contiguous segments are
what helped.

Run 2 expectation (``--wide``, written before it, session 19): the kernel now takes one scale per (row, group), so
BLOCK_K can span groups. 256-512 wide: nf4 2.5-2.7 TB/s (+10-20 %), int4 2.55-2.75; the library picks the widest
BLOCK_K (up to 512) that divides K, with 16 KB of output per program (16 x 512 at K = 6144): its GB/s within 3 % of
the sweep's best. Per nf4 step: dequantization 36 -> 30-33 ms.

Run 2 (00bead4), written after it: met for the kernel. 16 x 512 with 4 warps moved 2.50-2.51 TB/s for nf4 (64 x 64:
2.07-2.22, +13-21 %) and 2.63-2.67 TB/s for int4 (+8-15 %), 85-90 % of the copy ceiling, every output bit-equal to the
library's; 8 warps or 64 rows at 512 lost (nf4 64 x 512 x 8 warps: 1.76-1.85 TB/s). The "library" column missed for
nf4 (1.83-2.26 TB/s) because this run passed the codebook tensor, which makes ``dequantize_4bit`` rebuild its lookup
table on every call; the model passes ``code=None`` for the standard table (``QuantLinear._kernel_code``), as the probe
now does.
quant_runtime run 8 measured the model: nf4 dequantization 36.1 -> 30.5 ms per step, int4 33.1 -> 29.1.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
from pathlib import Path

# (N, K) weight chunks as the 4-bit QuantLinear dequantizes them: linear1 in two 27648-row chunks (340 MB of bf16),
# linear2 (302 MB), the double blocks' qkv (226 MB)
CHUNKS = [("single.linear1 half", 27648, 6144), ("single.linear2", 6144, 24576), ("double.qkv", 18432, 6144)]
TILES = [(64, 64, 4), (32, 64, 4), (128, 64, 4), (128, 64, 8), (256, 64, 8), (64, 128, 4), (128, 128, 8)]
# run 2: BLOCK_K across several scale groups (the kernel takes one scale per row and group since session 19)
TILES_WIDE = [(64, 64, 4), (128, 64, 4), (64, 128, 4), (32, 256, 4), (64, 256, 4), (16, 512, 4), (32, 512, 4),
              (32, 512, 8), (64, 512, 8)]  # fmt: skip


EXPECTATION = __doc__.split("Expectation (")[1].split("): ", 1)[1].split("\n\n")[0].strip()
EXPECTATION_WIDE = __doc__.split("Run 2 expectation (")[1].split("): ", 1)[1].split("\n\n")[0].strip().rstrip('"')


def _bench(fn) -> float:
    import triton

    return triton.testing.do_bench(fn, warmup=25, rep=200)


def probe_format(name: str, n: int, k: int, fmt: str, w, dst, ceil: dict, tiles) -> dict:
    """Every tile of TILES (BLOCK_K up to the format's group) on one weight chunk: bits against the library, GB/s."""
    import torch
    import triton

    from flux2_bench.kernels import int4_matmul as I

    if fmt == "nf4":
        qw, sc, code = I.pack_nf4(w)
        group, scales, lut = 64, sc.reshape(n, k // 64), I._lut(I.NF4_CODE, "cuda")
    else:
        qw, scales = I.pack_int4_g128(w)
        group, code, lut = 128, None, dst
    ref = I.dequantize_4bit(qw, scales, fmt=fmt, code=code)
    moved = qw.numel() + scales.numel() * scales.element_size() + 2 * n * k
    row = {"chunk": name, "N": n, "K": k, "fmt": fmt, **ceil, "tiles": {}}
    for bn, bk, warps in tiles:
        if bk > group and tiles is TILES:  # run 1's kernel took one scale per row and program
            continue
        key = f"{bn}x{bk}_w{warps}"

        def call(bn=bn, bk=bk, warps=warps):
            I._dequantize_4bit_kernel[(triton.cdiv(n, bn), k // bk)](
                qw, scales, lut, dst, n, qw.stride(0), scales.stride(0), dst.stride(0),
                IS_NF4=fmt == "nf4", GROUP_SIZE=group, BLOCK_N=bn, BLOCK_K=bk, num_warps=warps,
            )  # fmt: skip

        dst.zero_()
        call()
        same = bool(torch.equal(dst, ref))
        ms = _bench(call)
        row["tiles"][key] = {"ms": ms, "gbs": moved / ms / 1e6, "bits_equal_library": same}
        print(f"{name:20s} {fmt:9s} {key:12s} {ms:.4f} ms {moved / ms / 1e6:7.0f} GB/s same={same}", flush=True)
    # code=None for the standard NF4 table, as QuantLinear passes it (a codebook tensor rebuilds the LUT per call)
    ms = _bench(lambda: I.dequantize_4bit(qw, scales, fmt=fmt, out=dst))
    row["library"] = {"tile": list(I._dequant_tile(k, group)), "ms": ms, "gbs": moved / ms / 1e6}
    return row


def probe_chunk(name: str, n: int, k: int, tiles) -> list[dict]:
    import torch

    w = torch.randn(n, k, device="cuda", dtype=torch.bfloat16) * 0.02
    dst = torch.empty(n, k, device="cuda", dtype=torch.bfloat16)
    src = torch.randn_like(dst)
    ceil = {"copy_gbs": 4 * n * k / _bench(lambda: dst.copy_(src)) / 1e6,
            "fill_gbs": 2 * n * k / _bench(lambda: dst.fill_(1.0)) / 1e6}  # fmt: skip
    return [probe_format(name, n, k, fmt, w, dst, ceil, tiles) for fmt in ("nf4", "int4-g128")]


def run(out: Path, tiles) -> None:
    import torch
    import triton

    res = {"gpu": torch.cuda.get_device_name(0), "torch": torch.__version__, "triton": triton.__version__,
           "git_sha": os.environ.get("GIT_SHA", "unknown"),
           "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
           "expectation": EXPECTATION if tiles is TILES else EXPECTATION_WIDE, "rows": []}  # fmt: skip
    for name, n, k in CHUNKS:
        res["rows"] += probe_chunk(name, n, k, tiles)
        out.write_text(json.dumps(res, indent=1))
        torch.cuda.empty_cache()


def render(path: Path) -> str:
    d = json.loads(path.read_text())
    keys = list(dict.fromkeys(k for r in d["rows"] for k in r["tiles"]))
    L = [f"## {path.name}", "",
         f"{d['gpu']}, torch {d['torch']}, triton {d['triton']}, git {d['git_sha']}, {d['date']}. GB/s = bytes read "
         "(packed weight, scales) + bf16 bytes written, over the do_bench median; `*`: output bits differ from the "
         "library's. Ceilings: bf16 copy_ (read + write) and fill_ (write) of the output's size, same run.", "",
         f"Expectation: {d['expectation']}", "",
         "| chunk | fmt | copy_ GB/s | fill_ GB/s | " + " | ".join(keys) + " | library (tile) |",
         "|---|---|---|---|" + "---|" * len(keys) + "---|"]  # fmt: skip
    for r in d["rows"]:
        cells = []
        for k in keys:
            t = r["tiles"].get(k)
            cells.append(f"{t['gbs']:.0f}{'' if t['bits_equal_library'] else ' *'}" if t else "")
        head = f"| {r['chunk']} | {r['fmt']} | {r['copy_gbs']:.0f} | {r['fill_gbs']:.0f} | "
        lib = r.get("library")
        lib = f"{lib['gbs']:.0f} ({lib['tile'][0]}x{lib['tile'][1]})" if lib else ""
        L.append(head + " | ".join(cells) + f" | {lib} |")
    return "\n".join(L) + "\n"


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", type=Path)
    ap.add_argument("--render", type=Path, nargs="+")
    ap.add_argument("--wide", action="store_true", help="run 2's tiles (BLOCK_K over several scale groups)")
    a = ap.parse_args()
    if a.render:
        head = "# 4-bit dequantization tiles (generated by `probe_dequant_tiles.py --render`)\n\n"
        (Path(__file__).parent / "probe_dequant_tiles.md").write_text(head + "\n".join(render(p) for p in a.render))
    elif a.out:
        run(a.out, TILES_WIDE if a.wide else TILES)
    else:
        ap.error("--out or --render")
