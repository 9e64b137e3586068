"""Probe: does a warp-specialized Gluon kernel close the row-wise FP8 GEMM's gap to cuBLAS?

Question. ``fp8_gemm`` with row scales (the Triton persistent TMA kernel) measured 0.975x ``_scaled_mm``
row-wise fast in GPU time over the FLUX.2-dev shapes (run 14; target >= 1.0), 0.92-0.98x on four of the six
M >= 4096 shapes. That kernel issues its TMA loads from the warps that issue the wgmmas and leaves the tensor
cores idle during its epilogue. ``kernels/fp8_row_gemm_sm90.py`` is the block kernel's warp-specialized
structure without the promotion: a TMA producer warp, two consumer warpgroups chaining their wgmmas (one in
flight), the TMA-store epilogue. Variants (``fp8_row_gemm_sm90`` keywords):

- ``coop_bn256_s3``: both consumers on one 128 x 256 tile (64 rows each), 3 stages (208 KB of shared memory);
- ``coop_bn128_s6``: 128 x 128 tiles, 6 stages (cuBLAS's row-wise tile and depth, without its 1 x 2 cluster);
- ``pingpong_s5`` / ``pingpong_s4``: each consumer owns whole 128 x 128 tiles, alternating, so one's epilogue
  runs under the other's K loop.

Expectation (written before the first run): see ``EXPECTATION``.

What it does, on every FLUX.2-dev GEMM shape at 1024^2: each variant once in a child process with a time limit
(a wrong mbarrier phase deadlocks: ragged 1000 x 1112 x 784 with and without the gated residual, per-row and
per-tensor scales, against ``fp8_gemm_ref``); per shape, every variant's bf16 output compared bit for bit with
the library's row-wise ``fp8_gemm`` (Triton; stream-K shapes may differ in the last bit) and its rel L2 against
``fp8_gemm_ref`` on 256 sampled rows; GPU time (``bench_graph``) of the variants and anchors (library row-wise
``fp8_gemm``, ``_scaled_mm`` row-wise fast); interleaved A/B of the fastest variant against both anchors. On the
three shapes FLUX.2 runs with the gated residual (single.linear2, double.img.mlp_out, double.img.proj) the same
with ``residual`` and ``gate`` (anchor: ``_scaled_mm`` then ``torch.addcmul``).

    python3 reports/fp8_matmul/probe_row_ws.py --out $OUT/probe_row_ws_run1.json
    python3 reports/fp8_matmul/probe_row_ws.py --render reports/fp8_matmul/probe_row_ws_run*.json
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from probe_ws_schedule import geo, probe_meta, probe_shapes, time_and_ab  # noqa: E402

VARIANTS = {
    "coop_bn256_s3": dict(block_n=256, num_stages=3),
    "coop_bn128_s6": dict(block_n=128, num_stages=6),
    "pingpong_s5": dict(pingpong=True, block_n=128, num_stages=5),
    "pingpong_s4": dict(pingpong=True, block_n=128, num_stages=4),
}
EPILOGUE_SHAPES = ("single.linear2", "double.img.mlp_out", "double.img.proj")
EXPECTATION = {
    1: "GPU time vs _scaled_mm row fast on M >= 4096: coop_bn256_s3 0.97-1.03x, pingpong_s5 1.00-1.05x (epilogue "
    "hidden), coop_bn128_s6 0.90-0.98x (no cluster multicast); vs the library row-wise fp8_gemm 1.00-1.08x; on "
    "M = 512 0.85-1.0x (no stream-K: txt.proj and txt.mlp_out have 48-96 tiles); with the gated residual the "
    "cooperative 128 x 256 consumer spills (1.8 KB per thread in the epilogue, compile_row_sm90): 0.9-1.0x the "
    "library there; bits equal to the library's where it runs without stream-K; written before run 1",
    2: "run 1: the ping-pong variants failed (consumer 1 waited on ready slots more than one ring lap ahead; fixed "
    "with the turn mbarriers), coop_bn256_s3 ran at the library's speed (A/B 0.98-1.01x) with its bits, "
    "coop_bn128_s6 slower on M >= 4096 but 1.05-1.12x on txt.qkv / txt.mlp_in; so the warp-specialized structure "
    "alone gains nothing, and what remains is the epilogue (~2-4 % of a 128 x 256 tile): pingpong_s5 / s4 "
    "0.97-1.04x the library on M >= 4096 (epilogue hidden, but 128 x 128 tiles read B twice as often from L2), "
    "like coop_bn128_s6 on M = 512; written before run 2",
}

SMOKE = """
import json, sys, torch
from flux2_bench.kernels import fp8_row_gemm_sm90 as R
from flux2_bench.kernels.fp8_matmul import fp8_gemm_ref
kw = json.loads(sys.argv[1])
g = torch.Generator().manual_seed(0)
M, N, K = 1000, 1112, 784
a = (torch.randn(M, K, generator=g) * 2).to(torch.float8_e4m3fn).cuda()
b = (torch.randn(N, K, generator=g) * 2).to(torch.float8_e4m3fn).cuda()
res = (torch.randn(M, N, generator=g) * 10).to(torch.bfloat16).cuda()
gate = torch.randn(N, generator=g).to(torch.bfloat16).cuda()
for tag, sa, sb in (("row", torch.rand(M, 1, generator=g) + 0.5, torch.rand(1, N, generator=g) + 0.5),
                    ("tensor", torch.tensor(0.7), torch.tensor(1.3))):
    sa, sb = sa.cuda(), sb.cuda()
    for epi in ({}, {"residual": res, "gate": gate}):
        out = R.fp8_row_gemm_sm90(a, b, sa, sb, **epi, **kw)
        torch.cuda.synchronize()
        ref = fp8_gemm_ref(a, b, sa, sb, out_dtype=torch.float32, **epi)
        print("rel_l2", tag, bool(epi), ((out.float() - ref).norm() / ref.norm()).item())
"""


def smoke(name: str, timeout_s: int = 180) -> dict:
    argv = [sys.executable, "-c", SMOKE, json.dumps(VARIANTS[name])]
    try:
        r = subprocess.run(argv, capture_output=True, text=True, timeout=timeout_s)
    except subprocess.TimeoutExpired:
        return {"ok": False, "error": f"timed out after {timeout_s} s (deadlock?)"}
    rel = {" ".join(x.split()[1:3]): float(x.split()[3]) for x in r.stdout.splitlines() if x.startswith("rel_l2")}
    ok = r.returncode == 0 and len(rel) == 4 and max(rel.values()) < 8e-3  # bf16 output rounding
    return {"ok": ok, "rc": r.returncode, "rel_l2": rel, "tail": "" if ok else (r.stdout + r.stderr)[-1500:]}


def run_shape(name, M, K, N, ok):
    from bench_block_sm90 import operands
    from bench_fp8_matmul import scaled_mm

    from flux2_bench.kernels import fp8_matmul as F
    from flux2_bench.kernels import fp8_row_gemm_sm90 as R

    row = {"name": name, "M": M, "K": K, "N": N, "flops": 2 * M * N * K, "check": {}, "times": {}, "ab": {}}
    _, (x8, xs, w8, ws) = operands(M, K, N)

    def gluon(v, **epi):
        return lambda: R.fp8_row_gemm_sm90(x8, w8, xs, ws, **VARIANTS[v], **epi)

    lib = F.fp8_gemm(x8, w8, xs, ws)
    rows = torch.randperm(M, device="cuda")[:256]
    ref = F.fp8_gemm_ref(x8[rows], w8, xs[rows], ws, out_dtype=torch.float32)
    row["check"]["library_rel_l2_vs_ref"] = ((lib[rows].float() - ref).norm() / ref.norm()).item()
    for v in ok:
        out = gluon(v)()
        row["check"][f"{v}_rel_l2_vs_ref"] = ((out[rows].float() - ref).norm() / ref.norm()).item()
        row["check"][f"{v}_bitwise_equal_library"] = bool(torch.equal(out, lib))
        row["check"][f"{v}_max_abs_diff_library"] = (out.float() - lib.float()).abs().max().item()
    del lib, ref

    fns = {f"gluon_{v}": gluon(v) for v in ok}
    fns["ours_gemm_row"] = lambda: F.fp8_gemm(x8, w8, xs, ws)
    fns["scaled_mm_row_fast"] = lambda: scaled_mm(x8, w8, xs, ws.reshape(1, N), True)
    time_and_ab(row, fns, [f"gluon_{v}" for v in ok], ("scaled_mm_row_fast", "ours_gemm_row"), "best")
    fns.clear()

    if name in EPILOGUE_SHAPES:  # FLUX.2's gated residual fused into the epilogue
        res = torch.randn(M, N, device="cuda", dtype=torch.bfloat16)
        gate = torch.randn(N, device="cuda", dtype=torch.bfloat16)
        epi = dict(residual=res, gate=gate)
        lib = F.fp8_gemm(x8, w8, xs, ws, **epi)
        for v in ok:
            row["check"][f"{v}_epi_bitwise_equal_library"] = bool(torch.equal(gluon(v, **epi)(), lib))
        del lib
        fns = {f"gluon_{v}_epi": gluon(v, **epi) for v in ok}
        fns["ours_gemm_row_epi"] = lambda: F.fp8_gemm(x8, w8, xs, ws, **epi)
        ws_n = ws.reshape(1, N)
        fns["scaled_mm_row_fast_addcmul"] = lambda: torch.addcmul(res, gate, scaled_mm(x8, w8, xs, ws_n, True))
        sub = {"name": name, "flops": row["flops"], "times": {}, "ab": {}}
        time_and_ab(sub, fns, [f"gluon_{v}_epi" for v in ok], ("ours_gemm_row_epi", "scaled_mm_row_fast_addcmul"),
                    "best")  # fmt: skip
        row["times"].update(sub["times"])
        row["ab"].update(sub["ab"])
        row["best_epi"] = sub.get("best")
        fns.clear()
    return row


def render(paths: list[Path]) -> str:
    L = [f"# Row-wise FP8 GEMM, warp-specialized Gluon kernel (generated by `{Path(__file__).name} --render`)", ""]
    for path in paths:
        d = json.loads(path.read_text())
        m = d["meta"]
        L += [f"## `{path.name}`", "", f"git {m['git_sha']}, {m['gpu']}, torch {m['torch']}, triton {m['triton']}. "
              f"Timer: {m['timer']}.", "", f"Expectation recorded in the run: {m['expectation']}", ""]  # fmt: skip
        smoke_txt = [f"{s}: " + ("ok" if r["ok"] else "FAILED " + (r.get("error") or str(r.get("rc"))))
                     for s, r in m["smoke"].items()]  # fmt: skip
        L += ["Smoke runs (child process, ragged 1000 x 1112 x 784, row and tensor scales, with and without the "
              "gated residual): " + ", ".join(smoke_txt), ""]  # fmt: skip
        names = [f"gluon_{v}" for v in m["variants"]]
        for suffix, title in (("", "GEMM"), ("_epi", "GEMM + gated residual")):
            keys = [k + suffix for k in names] + (["ours_gemm_row", "scaled_mm_row_fast"] if not suffix else
                                                  ["ours_gemm_row_epi", "scaled_mm_row_fast_addcmul"])  # fmt: skip
            shapes = [r for r in d["shapes"] if any("ms" in r.get("times", {}).get(k, {}) for k in keys)]
            if not shapes:
                continue
            L += [f"{title}, TFLOP/s (GPU time):", "", "| shape | M×K×N | " + " | ".join(keys) + " | bits = library |",
                  "|---|---|" + "---|" * (len(keys) + 1)]  # fmt: skip
            for r in shapes:
                cells = [f"{r['times'][k]['tflops']:.0f}" if "tflops" in r["times"].get(k, {}) else "" for k in keys]
                eq = [f"{v}: {r['check'][f'{v}{suffix}_bitwise_equal_library']}" for v in m["variants"]
                      if f"{v}{suffix}_bitwise_equal_library" in r["check"]]  # fmt: skip
                L.append(f"| {r['name']} | {r['M']}×{r['K']}×{r['N']} | " + " | ".join(cells) + f" | {', '.join(eq)} |")
            L += ["", "Geomean speed ratios (anchor GPU time / ours), from the table's timer:", ""]
            anchors = keys[-2:]
            subsets = (("all", lambda r: True), ("M >= 4096", lambda r: r["M"] >= 4096),
                       ("M = 512", lambda r: r["M"] < 1024))  # fmt: skip
            for ours in keys[:-2] + [anchors[0]]:
                for anchor in anchors:
                    if ours == anchor:
                        continue
                    for label, sel in subsets:
                        v = [r["times"][anchor]["ms"] / r["times"][ours]["ms"] for r in shapes if sel(r)
                             and all("ms" in r["times"].get(k, {}) for k in (ours, anchor))]  # fmt: skip
                        g = geo(v)
                        if g and (label == "all" or len(v) < len(shapes)):
                            L.append(f"- {ours} / {anchor} ({label}): {g[0]:.3f} (min {g[1]:.2f}, max {g[2]:.2f})")
            L += ["", "Interleaved A/B (median of per-round ratios anchor / ours; fastest variant per shape):", ""]
            for anchor in anchors:
                v = [(r["name"], ab["ratio"]) for r in shapes for k, ab in r.get("ab", {}).items()
                     if k.endswith("|" + anchor) and k.split("|")[0].endswith(suffix or "") and "ratio" in ab
                     and (suffix == "_epi") == k.split("|")[0].endswith("_epi")]  # fmt: skip
                g = geo([x for _, x in v])
                if g:
                    per = ", ".join(f"{n} {x:.3f}" for n, x in v)
                    L.append(f"- fastest / {anchor}: {g[0]:.3f} (min {g[1]:.2f}, max {g[2]:.2f}); {per}")
            key = "best_epi" if suffix else "best"
            L += ["", "Fastest variant per shape: " + ", ".join(f"{r['name']}: {r.get(key)}" for r in shapes), ""]
        checks = [f"{r['name']}: " + ", ".join(f"{k.removesuffix('_rel_l2_vs_ref')} {v:.1e}"
                                               for k, v in r["check"].items() if k.endswith("_rel_l2_vs_ref"))
                  for r in d["shapes"] if "check" in r]  # fmt: skip
        L += ["Rel L2 against `fp8_gemm_ref` (256 sampled rows, bf16 outputs): " + "; ".join(checks), ""]
        errors = [f"{r['name']}: {r['error']}" for r in d["shapes"] if "error" in r]
        if errors:
            L += ["Errors: " + "; ".join(errors), ""]
    return "\n".join(L)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", help="JSON to write (rewritten after every shape)")
    ap.add_argument("--render", nargs="+", type=Path, help="run JSONs to render into probe_row_ws.md")
    ap.add_argument("--run", type=int, default=max(EXPECTATION), help="run number (selects the expectation)")
    ap.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    ap.add_argument("--res", type=int, default=1024)
    args = ap.parse_args()
    if args.render:
        (args.render[0].parent / "probe_row_ws.md").write_text(render(args.render))
        return 0
    if not args.out:
        ap.error("--out or --render")

    t0 = time.time()
    meta = probe_meta(EXPECTATION[args.run], run=args.run, variants=args.variants)
    meta["smoke"] = {v: smoke(v) for v in args.variants}
    print("smoke", meta["smoke"], flush=True)
    ok = [v for v in args.variants if meta["smoke"][v]["ok"]]
    data = {"meta": meta, "shapes": []}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    probe_shapes(out, data, lambda *s: run_shape(*s, ok), args.res, t0)
    return 0


if __name__ == "__main__":
    sys.exit(main())
