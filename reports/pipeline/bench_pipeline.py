"""GPU: full-size FLUX.2 VAE (synthetic weights) decode time/peak memory at 1024² and 2048², tiled and
untiled, then `generate` at 1024² with the synthetic flux.2-dev transformer (4 steps) and its time split.

    python3 reports/pipeline/bench_pipeline.py --out $OUT/pipeline.json
"""

import argparse
import json
import os
import platform
import time

import torch
import triton

from flux2_bench.autoencoder import synthetic_autoencoder
from flux2_bench.pipeline import Flux2Pipeline, synthetic_prompt_embeds
from flux2_bench.weights import synthetic_transformer


def timed(fn, reps):
    """Median of `reps` runs with CUDA events (one warm-up), and the allocator peak during them."""
    fn()
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    ts = []
    for _ in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        torch.cuda.synchronize()
        ts.append(a.elapsed_time(b))
    ts.sort()
    return ts[len(ts) // 2], (torch.cuda.max_memory_allocated() - base) / 2**30


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--steps", type=int, default=4)
    args = ap.parse_args()
    dev = "cuda"
    rows = {
        "gpu": torch.cuda.get_device_name(),
        "torch": torch.__version__,
        "triton": triton.__version__,
        "python": platform.python_version(),
        "git_sha": os.environ.get("GIT_SHA", "unknown"),
        "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "note": "synthetic weights: timings and memory only, images meaningless",
        "vae_decode": [],
    }
    vae = synthetic_autoencoder("flux.2", device=dev, dtype=torch.bfloat16)
    with torch.no_grad():
        for px in (1024, 2048):
            g = torch.Generator(device=dev).manual_seed(px)
            z = torch.randn(1, 128, px // 16, px // 16, generator=g, device=dev, dtype=torch.bfloat16)
            outs = {}
            for tiled in (False, True):
                out = vae.decode(z, tiled=tiled)
                outs[tiled] = out.float()
                ms, peak = timed(lambda tiled=tiled, z=z: vae.decode(z, tiled=tiled), reps=3 if px == 1024 else 2)
                row = {
                    "pixels": f"{px}x{px}",
                    "tiled": tiled,
                    "tile": "512 px, overlap 128" if tiled else None,
                    "ms_median": ms,
                    "peak_extra_gib": peak,
                    "finite": bool(torch.isfinite(out).all()),
                }
                rows["vae_decode"].append(row)
                print(row, flush=True)
            d = (outs[True] - outs[False]).abs()
            rows["vae_decode"][-1]["tiled_vs_untiled_mean_abs_over_std"] = float(d.mean() / outs[False].std())
            del outs
            torch.cuda.empty_cache()

    t0 = time.perf_counter()
    tr = synthetic_transformer("flux.2-dev", device=dev, dtype=torch.bfloat16)
    torch.cuda.synchronize()
    rows["synthetic_transformer_build_s"] = time.perf_counter() - t0
    pipe = Flux2Pipeline(tr, vae, None, device=dev)
    emb = synthetic_prompt_embeds("a red fox in the snow", tr.config.context_in_dim)
    kw = dict(prompt_embeds=emb, width=1024, height=1024, guidance=4.0, seed=0, progress=False)
    pipe.generate(**kw, steps=1)  # warm-up (kernels, allocator)
    torch.cuda.reset_peak_memory_stats()
    out = pipe.generate(**kw, steps=args.steps)
    img = out.images[0]
    rows["generate"] = {
        "preset": "flux.2-dev synthetic bf16 + synthetic VAE bf16 + synthetic prompt embeddings (no text encoder)",
        "size": "1024x1024",
        "steps": args.steps,
        "timings_s": out.timings,
        "denoise_ms_per_step": 1e3 * out.timings["denoise_s"] / args.steps,
        "peak_gib": torch.cuda.max_memory_allocated() / 2**30,
        "weights_gib": sum(p.numel() * p.element_size() for p in tr.parameters()) / 2**30,
        "image_size": list(img.size),
        "latents_finite": bool(torch.isfinite(out.latents).all()),
    }
    print(rows["generate"], flush=True)
    with open(args.out, "w") as f:
        json.dump(rows, f, indent=2)


if __name__ == "__main__":
    main()
