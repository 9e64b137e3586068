"""GPU check and benchmark of flux2_bench.kernels.fused_modulate on the FLUX.2-dev 1024² shapes.

    python reports/fused_modulate/bench_fused_modulate.py --out $OUT/fused_modulate.json   # on the GPU
    python reports/fused_modulate/bench_fused_modulate.py --render reports/fused_modulate/fused_modulate.json
    python reports/fused_modulate/bench_fused_modulate.py --smoke --out /tmp/x.json   # CPU interpreter, tiny

Per case (1024²: 4096 image + 512 text tokens, so 4608 rows in the single-stream blocks):
1. correctness on the GPU: fused (quant=None) vs the eager ops (`*_ref`) in bf16 ulps; fused
   quant="row"/"block" vs `quantize_fp8` (our Triton kernel) of the fused bf16 output (must be
   bit-identical) and vs `quantize_fp8_ref` of the eager output (LayerNorm reduction-order ulps);
2. median times (triton.testing.do_bench, which flushes L2 before every call) of the unfused chain
   as the model runs it today (LayerNorm, `1 + scale`, addcmul; silu, mul, the attention output's
   transpose+flatten copy, cat; then `quantize_fp8` for the fp8 cases) against the fused kernel.
Bytes = what the fused kernel must move (inputs read once, outputs written once); the ceiling is a
large `Tensor.copy_` timed in the same run. Inputs are random normal, never zeros; every input is
larger than L2 except the 512-row text cases (do_bench flushes L2 between calls anyway).
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import platform
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

EXPECTATIONS = """\
Written before the first GPU run (predictions, not results). Bytes per output element, bf16:
- norm_modulate: eager = LayerNorm (read 2, write 2) + addcmul (read 2, write 2) = 8 B, fused 4 B;
  with the FP8 row quantize (read 2, write 1) eager 11 B, fused 3 B. Expect 1.8-2.2x (None) and
  3-3.5x ("row") on the image / single-stream rows, less on the 512-row text cases (a ~10 us
  kernel is launch- and tail-bound).
- swiglu (double-stream MLP, no prefix): eager silu (read 2, write 2) + mul (read 4, write 2) =
  10 B per output element, fused 6 B: ~1.6x; with the row quantize 13 B vs 5 B: ~2.4x.
- swiglu + prefix (single-stream linear2 input, P = 6144, F = 18432): eager = attention output
  transpose+flatten copy (P: 4 B) + silu*mul (F: 10 B) + cat (P+F: 4 B) = 300 KiB per row, fused
  132 KiB: ~2.2x; with the row quantize 372 KiB vs 108 KiB: ~3.2x.
- The fused kernels keep the whole row in registers (one program per row, 8-16 warps); expect
  75-90 % of the copy bandwidth on the >= 4096-row cases (the quantize_fp8 kernel of the same design
  reached 2.2-2.9 TB/s in reports/fp8_matmul).
- Per FLUX.2-dev step (8 double + 48 single blocks, fp8-row recipe): expect 25-40 ms saved, mostly
  from the single-stream swiglu+prefix+quantize (the largest eager chain), i.e. the 369 ms step toward
  ~330-345 ms once the lead wires the kernels in.
"""

EXPECTATIONS_RUN2 = """\
Written before run 2 (predictions, not results), for the chunked SwiGLU (run 1's row-tile kernel
timed beside it as "old"):
- quant=None / "block" ((row, chunk) grid, no row reduction, no lanes on padding, no SiLU on prefix
  chunks): an elementwise kernel with ~25 instructions per output element (accurate expf, IEEE
  division, two bf16 roundings) over ~85 M SwiGLU elements is ~0.07 ms of issue on 132 SMs, below
  the ~0.2 ms of memory time, so expect 75-85 % of the copy rate: single-stream + prefix ~0.24 ms
  (None; old 0.62 ms, ~2.6x) and double-stream image ~0.17 ms (old 0.45 ms).
- quant="row" (two passes per row): pass 2 rereads the row's inputs (84 KiB with the prefix); with
  2-8 persistent programs per SM that is 22-90 MB in flight against the 50 MB L2, so expect the
  recompute variant to fall off at 8 programs per SM and the best row config to reach 60-75 % of
  the copy rate (extra issue of the second SiLU pass); ~0.2 ms for the single-stream case (old 0.60).
- All variants bit-identical to each other and to the eager ops (0 ulps, 0 fp8 bit mismatches).
- Per FLUX.2-dev step, fp8-row: SwiGLU from ~33 ms (run 1) to ~12 ms.
"""

TXT = 512
DOUBLE_BLOCKS, SINGLE_BLOCKS = 8, 48  # FLUX.2-dev
QUANTS = [None, "row", "block"]


def shapes(smoke: bool) -> dict:
    if smoke:
        return dict(C=192, H=2, D=64, F=288, img=8, txt=3)
    return dict(C=6144, H=48, D=128, F=18432, img=(1024 // 16) ** 2, txt=TXT)


def cases(s: dict) -> list[dict]:
    """(name, kernel, rows, per-step count) for one forward at 1024²."""
    single = s["img"] + s["txt"]
    return [
        dict(name="single.pre_norm", kernel="norm_modulate", rows=single, per_step=SINGLE_BLOCKS),
        dict(name="double.img.norm", kernel="norm_modulate", rows=s["img"], per_step=2 * DOUBLE_BLOCKS),
        dict(name="double.txt.norm", kernel="norm_modulate", rows=s["txt"], per_step=2 * DOUBLE_BLOCKS),
        dict(name="single.linear2_in", kernel="swiglu+prefix", rows=single, per_step=SINGLE_BLOCKS),
        dict(name="double.img.mlp_act", kernel="swiglu", rows=s["img"], per_step=DOUBLE_BLOCKS),
        dict(name="double.txt.mlp_act", kernel="swiglu", rows=s["txt"], per_step=DOUBLE_BLOCKS),
    ]


def ulps_bf16(a, b):
    def ordered(t):
        i = t.contiguous().view(torch.int16).to(torch.int32)
        return torch.where(i < 0, -(i & 0x7FFF), i)

    return (ordered(a) - ordered(b)).abs()


def bit_mismatches(q, r) -> int:
    return int((q.view(torch.uint8) != r.view(torch.uint8)).sum())


def bench_fn(dev):
    if dev == "cuda":
        import triton.testing

        return lambda fn: float(triton.testing.do_bench(fn, return_mode="median"))

    def cpu_time(fn):  # smoke mode: checks the script runs, the numbers mean nothing
        fn()
        t = time.perf_counter()
        fn()
        return (time.perf_counter() - t) * 1e3

    return cpu_time


def copy_gbs(dev, timer, smoke):
    n = (1 << 16) if smoke else (1 << 29)  # 1 GiB of bf16 each way
    src = torch.randn(n, device=dev, dtype=torch.bfloat16)
    dst = torch.empty_like(src)
    ms = timer(lambda: dst.copy_(src))
    return {"bytes": 2 * src.numel() * 2, "ms": ms, "GBps": 2 * src.numel() * 2 / ms / 1e6}


def inputs(case, s, dev):
    """bf16 inputs laid out as the model has them (modulation and linear1 output are views)."""
    g = torch.Generator(device=dev).manual_seed(0)
    C, Fh, rows = s["C"], s["F"], case["rows"]

    def rnd(*shape, mul=1.0, add=0.0):
        return (torch.randn(*shape, device=dev, generator=g) * mul + add).to(torch.bfloat16)

    if case["kernel"] == "norm_modulate":
        x = rnd(1, rows, C, mul=2.0, add=0.1)
        mod = rnd(1, 1, 6 * C, mul=0.5)
        shift, scale = mod.chunk(6, dim=-1)[:2]
        return dict(x=x, shift=shift, scale=scale)
    if case["kernel"] == "swiglu+prefix":
        lin1 = rnd(1, rows, 3 * C + 2 * Fh, mul=2.0)
        o = rnd(1, s["H"], rows, s["D"])  # SDPA output (B, H, L, D)
        return dict(x=lin1[..., 3 * C :], o=o)
    return dict(x=rnd(1, rows, 2 * Fh, mul=2.0))


def old_module():
    """Run 1's kernels (one program per row, whole padded row in registers), frozen beside this
    script as run1_fused_modulate.py, timed in the same run as the anchor for the new swiglu."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(
        "run1_fused_modulate", Path(__file__).with_name("run1_fused_modulate.py")
    )
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def sweep_configs(quant):
    """swiglu launch configurations timed per case (the default is timed as 'fused')."""
    from flux2_bench.kernels.fused_modulate import SwigluConfig as C

    if quant == "row":
        return [
            C(block=b, warps=w, programs_per_sm=p, use_tmp=t)
            for b, w in ((2048, 4), (4096, 8))
            for p in (2, 4, 8)
            for t in (False, True)
        ]
    return [C(block=1024, warps=4), C(block=2048, warps=4), C(block=2048, warps=8), C(block=4096, warps=8)]


def cfg_name(c) -> str:
    """b<block>w<warps>p<programs per SM><t: scratch reload | r: recompute> (p, t/r: quant="row" only)."""
    return f"b{c.block}w{c.warps}p{c.programs_per_sm}{'t' if c.use_tmp else 'r'}"


def chains(case, t):
    """(eager today, fused) callables per quant mode."""
    from flux2_bench.kernels import fused_modulate as FM
    from flux2_bench.kernels.fp8_matmul import quantize_fp8

    if case["kernel"] == "norm_modulate":
        x, shift, scale = t["x"], t["shift"], t["scale"]
        C = x.shape[-1]

        def eager():  # model: _modulate(self.img_norm1(img), shift, scale)
            return torch.addcmul(shift, F.layer_norm(x, (C,), eps=1e-6), 1 + scale)

        def fused(q):
            return FM.norm_modulate(x, shift, scale, quant=q)

        def ref(q):
            return FM.norm_modulate_ref(x, shift, scale, quant=q)
    else:
        x, o = t["x"], t.get("o")

        def eager():  # model: attention() returns o.transpose(1, 2).flatten(2); cat((attn, mlp_act(mlp)))
            gate, value = x.chunk(2, dim=-1)
            act = F.silu(gate) * value
            return act if o is None else torch.cat((o.transpose(1, 2).flatten(2), act), dim=-1)

        def fused(q):
            return FM.swiglu(x, prefix=None if o is None else o.transpose(1, 2), quant=q)

        def ref(q):
            return FM.swiglu_ref(x, prefix=None if o is None else o.transpose(1, 2), quant=q)

        old = OLD["mod"]

        def fused_old(q):
            return old.swiglu(x, prefix=None if o is None else o.transpose(1, 2), quant=q)

        def fused_cfg(q, cfg):
            return FM._swiglu(x, prefix=None if o is None else o.transpose(1, 2), quant=q, config=cfg)

        fused.old, fused.cfg = fused_old, fused_cfg

    def eager_q(q):
        return eager if q is None else (lambda: quantize_fp8(eager(), q))

    return eager_q, fused, ref


def fused_bytes(case, s, quant) -> int:
    C, Fh, rows = s["C"], s["F"], case["rows"]
    if case["kernel"] == "norm_modulate":
        n_in, n_out, extra = rows * C, rows * C, 2 * C * 2
    elif case["kernel"] == "swiglu+prefix":
        P = s["H"] * s["D"]
        n_in, n_out, extra = rows * (2 * Fh + P), rows * (P + Fh), 0
    else:
        n_in, n_out, extra = rows * 2 * Fh, rows * Fh, 0
    n = n_out // rows
    out_b = {None: 2 * n_out, "row": n_out + 4 * rows, "block": n_out + 4 * rows * math.ceil(n / 128)}[quant]
    return 2 * n_in + out_b + extra


def check(case, t):
    from flux2_bench.kernels.fp8_matmul import quantize_fp8, quantize_fp8_ref

    eager_q, fused, ref = chains(case, t)
    out, r = fused(None), ref(None)
    u = ulps_bf16(out, r)
    res = {
        "max_ulp": int(u.max()),
        "frac_ulp_ne_0": float((u > 0).float().mean()),
        "n_ulp_gt_1": int((u > 1).sum()),
        "nan": int(torch.isnan(out).sum()),
        "numel": out.numel(),
    }
    for q in ("row", "block"):
        qk, sk = fused(q)
        qo, so = quantize_fp8(out, q)  # our quantize kernel on the fused bf16 output: must match exactly
        qr, sr = quantize_fp8_ref(r, q)
        res[q] = {
            "bits_vs_quantize_fp8_of_fused": bit_mismatches(qk, qo),
            "scales_vs_quantize_fp8_of_fused": int((sk != so).sum()),
            "bits_vs_ref": bit_mismatches(qk, qr),
            "scales_vs_ref": int((sk != sr).sum()),
            "n_scales": sk.numel(),
        }
    if hasattr(fused, "old"):  # swiglu: old kernel and every swept config give the same bits
        res["variants_bit_equal"] = {}
        for q in QUANTS:
            want = fused(q)
            for name, fn in [("old", lambda q=q: fused.old(q))] + [
                (cfg_name(c), lambda q=q, c=c: fused.cfg(q, c)) for c in sweep_configs(q)
            ]:
                got = fn()
                same = (
                    torch.equal(got, want)
                    if q is None
                    else (
                        torch.equal(got[0].view(torch.uint8), want[0].view(torch.uint8))
                        and torch.equal(got[1], want[1])
                    )
                )
                res["variants_bit_equal"][f"{q}:{name}"] = bool(same)
    del eager_q
    return res


def timing(case, t, s, timer, copy):
    eager_q, fused, _ = chains(case, t)
    rows = {}
    for q in QUANTS:
        e_ms = timer(eager_q(q))
        f_ms = timer(lambda q=q: fused(q))
        b = fused_bytes(case, s, q)
        extra = {}
        if hasattr(fused, "old"):
            o_ms = timer(lambda q=q: fused.old(q))
            sweep = {cfg_name(c): timer(lambda q=q, c=c: fused.cfg(q, c)) for c in sweep_configs(q)}
            best = min(sweep, key=sweep.get)
            extra = {
                "old_ms": o_ms,
                "old_pct_copy": 100 * b / o_ms / 1e6 / copy["GBps"],
                "speedup_vs_old": o_ms / f_ms,
                "sweep_ms": sweep,
                "best_cfg": best,
                "best_ms": sweep[best],
                "best_pct_copy": 100 * b / sweep[best] / 1e6 / copy["GBps"],
            }
        rows[str(q)] = {
            **extra,
            "eager_ms": e_ms,
            "fused_ms": f_ms,
            "speedup": e_ms / f_ms,
            "fused_bytes": b,
            "fused_GBps": b / f_ms / 1e6,
            "fused_pct_copy": 100 * b / f_ms / 1e6 / copy["GBps"],
        }
    return rows


OLD = {}


def FM_configs():
    from flux2_bench.kernels import fused_modulate as FM

    return {q: cfg_name(FM.SWIGLU_CONFIGS[q]) for q in QUANTS}


def run(out_path: Path, smoke: bool) -> dict:
    if smoke:
        os.environ.setdefault("TRITON_INTERPRET", "1")
    dev = "cuda" if torch.cuda.is_available() and not smoke else "cpu"
    import triton

    s = shapes(smoke)
    timer = bench_fn(dev)
    OLD["mod"] = old_module()
    data = {
        "meta": {
            "gpu": torch.cuda.get_device_name() if dev == "cuda" else f"cpu interpreter ({platform.processor()})",
            "torch": torch.__version__,
            "triton": triton.__version__,
            "cuda": torch.version.cuda,
            "git_sha": os.environ.get("GIT_SHA", "unknown"),
            "time": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
            "smoke": smoke,
            "shapes": s,
        },
        "expectations": EXPECTATIONS,
        "expectations_run2": EXPECTATIONS_RUN2,
        "swiglu_default_configs": {str(q): FM_configs()[q] for q in QUANTS},
        "cases": [],
    }

    def save():
        out_path.parent.mkdir(parents=True, exist_ok=True)
        out_path.write_text(json.dumps(data, indent=1))

    data["copy"] = copy_gbs(dev, timer, smoke)
    print(f"copy: {data['copy']['GBps']:.0f} GB/s", flush=True)
    save()
    for case in cases(s):
        t0 = time.time()
        t = inputs(case, s, dev)
        row = dict(case)
        row["check"] = check(case, t)
        row["timing"] = timing(case, t, s, timer, data["copy"])
        row["wall_s"] = time.time() - t0
        data["cases"].append(row)
        save()
        tm = row["timing"]
        print(
            f"{case['name']}: max ulp {row['check']['max_ulp']}, row bits vs ref {row['check']['row']['bits_vs_ref']}; "
            + ", ".join(
                f"{q}: {v['eager_ms']:.4f} -> {v['fused_ms']:.4f} ms ({v['speedup']:.2f}x)" for q, v in tm.items()
            ),
            flush=True,
        )
        del t
    return data


# ----------------------------------------------------------------------------------------------
# README from the JSON
# ----------------------------------------------------------------------------------------------


def render(data: dict) -> str:
    m, copy = data["meta"], data["copy"]
    L = [
        "# fused_modulate: LayerNorm+modulate and SwiGLU(+concat) with optional FP8 output",
        "",
        f"Generated by `bench_fused_modulate.py --render` from `{data.get('_source', 'fused_modulate.json')}` "
        f"({m['gpu']}, torch {m['torch']}, triton {m['triton']}, CUDA {m['cuda']}, git {m['git_sha']}, {m['time']}).",
        "",
        f"Shapes: FLUX.2-dev at 1024², {m['shapes']['img']} image + {m['shapes']['txt']} text tokens, "
        f"C = {m['shapes']['C']}, F = {m['shapes']['F']}, attention output {m['shapes']['H']} x {m['shapes']['D']}. "
        f"Measured copy ceiling (`Tensor.copy_`, 1 GiB): **{copy['GBps']:.0f} GB/s**.",
        "",
        "## Time (do_bench median, ms): eager chain as the model runs it today vs the fused kernel",
        "",
        "| case | rows | quant | eager ms | fused ms | speedup | fused GB/s | % of copy |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for c in data["cases"]:
        for q, v in c["timing"].items():
            L.append(
                f"| {c['name']} ({c['kernel']}) | {c['rows']} | {q} | {v['eager_ms']:.4f} | {v['fused_ms']:.4f} | "
                f"{v['speedup']:.2f}x | {v['fused_GBps']:.0f} | {v['fused_pct_copy']:.0f} % |"
            )
    sw = [c for c in data["cases"] if "old_ms" in next(iter(c["timing"].values()))]
    if sw:
        L += [
            "",
            "## SwiGLU: run 1's row-tile kernel (old) vs the chunked kernel (new), same run",
            "",
            "new = the default launch config when run ("
            + ", ".join(f"{q}: {v}" for q, v in data["swiglu_default_configs"].items())
            + "); "
            "best = the fastest swept config (`cfg_name`: b block, w warps, p programs per SM and t scratch / r "
            'recompute, the last two for quant="row" only).',
            "",
            "| case | quant | eager ms | old ms | new ms | best ms (config) | new vs old | old % of copy | "
            "new % of copy | best % of copy |",
            "|---|---|---|---|---|---|---|---|---|---|",
        ]
        for c in sw:
            for q, v in c["timing"].items():
                L.append(
                    f"| {c['name']} | {q} | {v['eager_ms']:.4f} | {v['old_ms']:.4f} | {v['fused_ms']:.4f} | "
                    f"{v['best_ms']:.4f} ({v['best_cfg']}) | {v['speedup_vs_old']:.2f}x | {v['old_pct_copy']:.0f} % | "
                    f"{v['fused_pct_copy']:.0f} % | {v['best_pct_copy']:.0f} % |"
                )
        L += ["", "All swept configs (ms):", ""]
        for c in sw:
            for q, v in c["timing"].items():
                L.append(f"- {c['name']} {q}: " + ", ".join(f"{k} {ms:.4f}" for k, ms in v["sweep_ms"].items()))
        L += ["", "Bit equality with the default launch (old kernel and every swept config, plain and fp8): "]
        bad = [f"{c['name']} {k}" for c in sw for k, ok in c["check"].get("variants_bit_equal", {}).items() if not ok]
        n = sum(len(c["check"].get("variants_bit_equal", {})) for c in sw)
        L[-1] += f"{n - len(bad)} of {n} equal" + (f"; differ: {', '.join(bad)}" if bad else "") + "."
    L += ["", "## Per FLUX.2-dev step (8 double + 48 single blocks), sum of count x time", ""]
    L += ["| quant | eager ms / step | fused ms / step | saved ms / step |", "|---|---|---|---|"]
    for q in ("None", "row", "block"):
        e = sum(c["per_step"] * c["timing"][q]["eager_ms"] for c in data["cases"])
        f = sum(c["per_step"] * c["timing"][q]["fused_ms"] for c in data["cases"])
        L.append(f"| {q} | {e:.2f} | {f:.2f} | {e - f:.2f} |")
    L += [
        "",
        "The per-step sum counts each case once per use (norm: 2 per double block and stream, 1 per single "
        "block; SwiGLU: 1 per block and stream); the final layer's norm and the eager chain's launch gaps "
        "between kernels are not included.",
        "",
        "## Correctness on the GPU",
        "",
        "bf16 output vs the eager ops in ulps; fp8 payload bit mismatches and scale mismatches vs our "
        "`quantize_fp8` of the fused bf16 output (same values, so must be 0) and vs `quantize_fp8_ref` of "
        "the eager output.",
        "",
        "| case | max ulp | elements != eager | > 1 ulp | NaN | row bits / scales vs quantize(fused) | "
        "row bits / scales vs ref | block bits / scales vs quantize(fused) | block bits / scales vs ref |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for c in data["cases"]:
        k = c["check"]
        r, b = k["row"], k["block"]
        L.append(
            f"| {c['name']} | {k['max_ulp']} | {k['frac_ulp_ne_0']:.2e} of {k['numel']} | {k['n_ulp_gt_1']} | "
            f"{k['nan']} | {r['bits_vs_quantize_fp8_of_fused']} / {r['scales_vs_quantize_fp8_of_fused']} | "
            f"{r['bits_vs_ref']} / {r['scales_vs_ref']} | {b['bits_vs_quantize_fp8_of_fused']} / "
            f"{b['scales_vs_quantize_fp8_of_fused']} | {b['bits_vs_ref']} / {b['scales_vs_ref']} |"
        )
    L += ["", "## Expectations", "", data["expectations"].rstrip(), ""]
    if data.get("expectations_run2"):
        L += [data["expectations_run2"].rstrip(), ""]
    if data.get("analysis"):  # prose from analysis.md; its {placeholders} are filled from this JSON
        L += ["## Results against the expectations", "", data["analysis"].rstrip().format_map(figures(data)), ""]
    return "\n".join(L)


def figures(data: dict) -> dict:
    """Named numbers for analysis.md: {case}__{quant}__{x|eager|fused|gbps|pct}, {case}__{check},
    step__{quant}__{eager|fused|saved}, copy_gbps (case names with '.' -> '_')."""
    f = {"copy_gbps": data["copy"]["GBps"]}
    for c in data["cases"]:
        n = c["name"].replace(".", "_")
        for q, v in c["timing"].items():
            f.update({
                f"{n}__{q}__x": v["speedup"], f"{n}__{q}__eager": v["eager_ms"], f"{n}__{q}__fused": v["fused_ms"],
                f"{n}__{q}__gbps": v["fused_GBps"], f"{n}__{q}__pct": v["fused_pct_copy"],
                f"{n}__{q}__at80": v["fused_bytes"] / (0.8 * data["copy"]["GBps"] * 1e6),
            })  # fmt: skip
            if "old_ms" in v:
                f.update({
                    f"{n}__{q}__old": v["old_ms"], f"{n}__{q}__oldpct": v["old_pct_copy"],
                    f"{n}__{q}__best": v["best_ms"], f"{n}__{q}__bestpct": v["best_pct_copy"],
                    f"{n}__{q}__bestx": v["old_ms"] / v["best_ms"],
                })  # fmt: skip
        k = c["check"]
        f.update({
            f"{n}__maxulp": k["max_ulp"], f"{n}__frac_ne": k["frac_ulp_ne_0"], f"{n}__gt1": k["n_ulp_gt_1"],
            f"{n}__numel": k["numel"], f"{n}__row_own_bits": k["row"]["bits_vs_quantize_fp8_of_fused"],
            f"{n}__row_own_scales": k["row"]["scales_vs_quantize_fp8_of_fused"],
            f"{n}__row_ref_bits": k["row"]["bits_vs_ref"],
        })  # fmt: skip
    for q in ("None", "row", "block"):
        e = sum(c["per_step"] * c["timing"][q]["eager_ms"] for c in data["cases"])
        fu = sum(c["per_step"] * c["timing"][q]["fused_ms"] for c in data["cases"])
        f.update({f"step__{q}__eager": e, f"step__{q}__fused": fu, f"step__{q}__saved": e - fu})
    sw = [c for c in data["cases"] if c["kernel"].startswith("swiglu")]
    f["extra_saved_row_at80"] = sum(
        c["per_step"] * (c["timing"]["row"]["fused_ms"] - f[c["name"].replace(".", "_") + "__row__at80"]) for c in sw
    )
    return f


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, help="JSON to write (on the GPU: $OUT/fused_modulate.json)")
    p.add_argument("--render", type=Path, help="JSON to render into README.md beside it")
    p.add_argument("--smoke", action="store_true", help="tiny shapes on the CPU interpreter (script check)")
    a = p.parse_args(argv)
    if a.render:
        data = json.loads(a.render.read_text())
        data["_source"] = a.render.name
        analysis = a.render.parent / "analysis.md"
        if analysis.exists():
            data["analysis"] = analysis.read_text()
        (a.render.parent / "README.md").write_text(render(data))
        return 0
    if not a.out:
        p.error("--out or --render")
    run(a.out, a.smoke)
    return 0


if __name__ == "__main__":
    sys.exit(main())
