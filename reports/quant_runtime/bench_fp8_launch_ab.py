"""FP8 dispatch inside the model: classic vs persistent kernel, Triton's launch path vs the cached one.

FLUX.2-dev with synthetic weights, fp8-row recipe (``--recipe fp8-block``: block scales), fused block
kernels, one forward at 1024², variants
alternated A/B/C/A/B/C in one process (clock drift between device calls is about 10 ms per step):
- "classic, triton launch": the library default up to 45200b9 (FLUX2_FP8_PERSISTENT unset, no cache);
- "classic, cached launch": kernels/fp8_matmul.FAST_LAUNCH (first launch of a specialization through
  Triton, later ones through the compiled kernel's launcher);
- "persistent, cached launch": the persistent TMA kernel with the eager autotune timer (the pair that
  returned wrong outputs needed the CUDA-graph timer too; reports/quant_runtime/diag_persistent_bisect);
  from run 3 on with the queued GPU-time autotune timer and stream-K configs among the candidates;
- "persistent, no stream-K" (run 4 on): the same without the stream-K configs, to tell a stream-K
  split of K (another fp32 summation order) from any other difference.
- "persistent, promoted block" (fp8-block recipe only, from run 10 on): block scales on the Gluon promotion
  kernel (``FLUX2_FP8_BLOCK_RESCALE=0``: fp32 promotion of every 128-wide K block), the library default up to
  session 14; from run 10 the persistent variants above it run the rescaled-accumulator kernel
  (``kernels/fp8_block_rescale_sm90.py``: fast accumulation across K), and their SQNR against the classic
  kernel's promoted sums measures what fast accumulation changes in the model's output.
- "persistent, Triton block" (fp8-block recipe only, from run 6 on): block scales on the Triton
  persistent kernel instead of the Gluon ones (``FLUX2_FP8_BLOCK_GLUON=0``, ``FLUX2_FP8_BLOCK_RESCALE=0``);
  up to run 9 the variants above it ran the Gluon warp-specialized (promotion) kernel for block scales
  on sm_90 (the persistent ones; the classic ones never do).
- "persistent, Triton row" (fp8-row recipe only, from run 8 on): row scales on the Triton persistent kernel
  everywhere (``FLUX2_FP8_ROW_GLUON=0``); the persistent variants above it run the Gluon warp-specialized
  row kernel on the text GEMMs with N >= 16384 (txt.qkv, txt.mlp_in at M = 512), and from run 11 on also on
  every row-scaled GEMM from 1024 rows (``fp8_matmul._row_gluon_options``), which must give the same bits.
Each row reports ms/step and the output's SQNR against the first variant's output: the cached launcher
must give the same bits (inf dB), and so must the data-parallel persistent kernel (its K loop is the
classic kernel's, measured in runs 1-2); a stream-K split sums K in another order (finite, high dB).
Synthetic weights: speed and agreement only, not image fidelity.

    python3 reports/quant_runtime/bench_fp8_launch_ab.py --out $OUT/fp8_launch_ab.json

Expectation for run 10 (fp8-block, written before it, session 15): the rescaled kernel's GEMMs run 1.25x the
promotion kernel's (reports/fp8_matmul run 19), and the block GEMMs were most of run 6's 366 ms step, so
"persistent, cached launch" 300-335 ms against 360-370 ms for "persistent, promoted block"; its SQNR against the
classic kernel 35-40 dB (run 6: a stream-K split of K alone gave 39.6 dB: the forward amplifies any change in
the GEMMs' summation), the promoted variants inf or ~40 dB as before.
Run 10 (written after it): 292-296 ms against 334 ms promoted and 391-395 ms Triton; 39.2 dB against 39.6 dB
for the promotion kernel.

Expectation for runs 11 (fp8-row) and 12 (fp8-block), written before them (session 16): row scales from 1024 rows
now run the Gluon 128 x 256 schedule (1.010-1.022x the Triton persistent kernel, probe_row_epilogue and
fp8_matmul run 20) and the rescaled block kernel has a fourth stage (1.024x, probe_block_rescale run 6). Run 11:
every persistent variant gives the classic kernel's bits (inf dB, as in run 9), "persistent, cached launch" 0-4 ms
per step below "persistent, Triton row" (~280 ms: inside the rounds' spread). Run 12: "persistent, cached launch"
285-292 ms (run 10: 292-296), SQNR 39.2 dB as in run 10 (the fourth stage does not change the bits).
Runs 11-12 (a1c198d, written after them): fp8-row, every variant inf dB (the Gluon row kernel gives the classic
kernel's bits inside the model); "persistent, cached launch" 270-274 ms against 280-283 ms for "persistent,
Triton row": 3.4 % per step, more than the 0-4 ms expected (the GEMM A/B said 1.0-2.2 %; not explained).
fp8-block: 290 ms (as expected), 39.2 dB.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "transformer"))
sys.path.insert(0, os.path.dirname(__file__))
from bench_quant_runtime import GIB, PRESET, free, inputs  # noqa: E402
from bench_transformer import env_block, time_forward  # noqa: E402

from flux2_bench.kernels import fp8_matmul as F  # noqa: E402
from flux2_bench.model import use_fused  # noqa: E402
from flux2_bench.quantize.formats import sqnr  # noqa: E402
from flux2_bench.weights import model_bytes, synthetic_transformer  # noqa: E402

VARIANTS = {  # name: (PERSISTENT, FAST_LAUNCH, stream-K configs allowed, BLOCK_GLUON, ROW_GLUON, BLOCK_RESCALE)
    "classic, triton launch": (False, False, True, True, True, False),
    "classic, cached launch": (False, True, True, True, True, False),
    "persistent, cached launch": (True, True, True, True, True, True),
    "persistent, no stream-K": (True, True, False, True, True, True),
    "persistent, promoted block": (True, True, True, True, True, False),
    "persistent, Triton block": (True, True, True, False, True, False),
    "persistent, Triton row": (True, True, True, True, False, True),
}


def stream_k_picks() -> list[str]:
    """Autotuner keys (shape, scale mode, ...) for which the persistent kernel chose a stream-K config."""
    return [str(k[:3]) for k, c in F._fp8_gemm_persistent.cache.items() if c.kwargs.get("STREAM_K")]


def run(recipe: str, rounds: int) -> list[dict]:
    model = synthetic_transformer(PRESET, device="cuda", seed=0, recipe=recipe)
    call_args = inputs(model.config, 1024)
    rows, base = [], None
    kern = F._fp8_gemm_persistent
    tuned = {True: (kern.configs, {}), False: ([c for c in kern.configs if not c.kwargs["STREAM_K"]], {})}
    with torch.inference_mode(), use_fused(True):
        for rnd in range(rounds):
            for name, (persistent, fast, stream_k, gluon, row_gluon, rescale) in VARIANTS.items():
                if recipe != "fp8-block" and (not gluon or (persistent and not rescale)):
                    continue  # BLOCK_GLUON and BLOCK_RESCALE only change block-scaled GEMMs
                if recipe != "fp8-row" and not row_gluon:
                    continue  # ROW_GLUON only changes row-scaled GEMMs
                F.PERSISTENT, F.FAST_LAUNCH, F.BLOCK_GLUON, F.ROW_GLUON = persistent, fast, gluon, row_gluon
                F.BLOCK_RESCALE = rescale
                kern.configs, kern.cache = tuned[stream_k]  # each set autotunes once, into its own cache
                free()
                out = model(*call_args).float()
                base = out if base is None else base
                r = {"recipe": recipe, "round": rnd, "variant": name, "weights_gib": model_bytes(model) / GIB,
                     **time_forward(lambda m=model, a=call_args: m(*a)),
                     "sqnr_vs_first_variant_db": sqnr(out, base), "nan": int(torch.isnan(out).sum()),
                     "stream_k_picks": stream_k_picks() if persistent else []}  # fmt: skip
                rows.append(r)
                db = r["sqnr_vs_first_variant_db"]
                print(f"{recipe} round {rnd} {name:26s} {r['ms_median']:7.1f} ms (p10 {r['ms_p10']:.1f}, "
                      f"p90 {r['ms_p90']:.1f})  sqnr vs first {db:.1f} dB", flush=True)  # fmt: skip
    return rows


def markdown(paths: list[str]) -> str:
    """One table per run JSON: ms/step per variant and round, and the SQNR against the first variant."""
    lines = ["# FP8 dispatch inside FLUX.2-dev (generated by `bench_fp8_launch_ab.py --markdown`)", ""]
    lines += [" ".join(__doc__.split("\n\n")[1].split()), ""]
    for path in paths:
        with open(path) as f:
            d = json.load(f)
        env = d["env"]
        lines += [
            f"## `{os.path.basename(path)}`: git {d.get('git_sha', '?')}, {env.get('gpu', '?')}, "
            f"torch {env.get('torch', '?')}, triton {env.get('triton', '?')}",
            "",
            "| round | variant | ms/step (median) | p10 | p90 | SQNR vs first variant (dB) | NaN | stream-K picks |",
            "|---|---|---|---|---|---|---|---|",
        ]
        for r in d["rows"]:
            lines.append(
                f"| {r['round']} | {r['variant']} | {r['ms_median']:.1f} | {r['ms_p10']:.1f} | {r['ms_p90']:.1f} | "
                f"{r['sqnr_vs_first_variant_db']:.1f} | {r['nan']} | {', '.join(r.get('stream_k_picks', []))} |"
            )
        lines.append("")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--markdown", nargs="+", metavar="JSON", help="render these runs to fp8_launch_ab.md beside them")
    ap.add_argument("--out")
    ap.add_argument("--recipe", default="fp8-row")
    ap.add_argument("--rounds", type=int, default=2)
    args = ap.parse_args()
    if args.markdown:
        out = os.path.join(os.path.dirname(args.markdown[0]), "fp8_launch_ab.md")
        with open(out, "w") as f:
            f.write(markdown(args.markdown))
        return
    if not args.out:
        ap.error("--out or --markdown")
    default = (F.PERSISTENT, F.FAST_LAUNCH, F.BLOCK_GLUON, F.ROW_GLUON, F.BLOCK_RESCALE)
    result = {"env": env_block(), "preset": PRESET, "size": 1024, "weights": "synthetic (random)",
              "git_sha": os.environ.get("GIT_SHA", "unknown")}  # fmt: skip
    configs = F._fp8_gemm_persistent.configs
    try:
        result["rows"] = run(args.recipe, args.rounds)
    finally:
        F.PERSISTENT, F.FAST_LAUNCH, F.BLOCK_GLUON, F.ROW_GLUON, F.BLOCK_RESCALE = default
        F._fp8_gemm_persistent.configs = configs
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
