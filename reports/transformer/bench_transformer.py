"""Issue 2 GPU check: FLUX.2-dev, synthetic weights, one forward at 1024² (4096 image + 512 text tokens).

Builds our reference model with synthetic bf16 weights directly on the GPU, checks the output is
finite, then builds diffusers' Flux2Transformer2DModel sharing the SAME weight storage (q/k/v are
views of our fused qkv; only the 75 M-parameter final modulation is copied) and compares outputs and
times both in the same process. Writes one JSON row set to $OUT/transformer.json.

Run on the device (diffusers from carried wheels):
    python3 reports/transformer/bench_transformer.py --out $OUT/transformer.json
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics

import torch
import triton

from flux2_bench import attention
from flux2_bench.sampling import image_ids, text_ids
from flux2_bench.weights import model_bytes, synthetic_transformer, transformer_state

GIB = 2**30


def env_block() -> dict:
    props = torch.cuda.get_device_properties(0)
    try:
        import pynvml

        pynvml.nvmlInit()
        driver = pynvml.nvmlSystemGetDriverVersion()
    except Exception as e:  # NVML is optional for the figures here
        driver = f"unknown ({type(e).__name__})"
    return {
        "gpu": props.name,
        "sm": f"{props.major}.{props.minor}",
        "driver": driver,
        "cuda": torch.version.cuda,
        "torch": torch.__version__,
        "triton": triton.__version__,
        "python": platform.python_version(),
        "git_sha": os.environ.get("GIT_SHA", "unknown"),
        "time": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
    }


def time_forward(fn, warmup: int = 2, repeats: int = 7) -> dict:
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    ms = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        ms.append(start.elapsed_time(end))
    ms.sort()
    q = statistics.quantiles(ms, n=10)
    return {
        "ms_median": statistics.median(ms),
        "ms_p10": q[0],
        "ms_p90": q[-1],
        "ms_all": ms,
        "peak_allocated_gib": torch.cuda.max_memory_allocated() / GIB,
    }


def profile_table(fn, top: int = 30) -> list[dict]:
    """CUDA time per op for one call, largest first."""
    from torch.profiler import ProfilerActivity, profile

    fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    rows = []
    for e in prof.key_averages():
        dev_us = getattr(e, "device_time_total", None) or getattr(e, "cuda_time_total", 0)
        if dev_us:
            rows.append({"op": e.key[:120], "calls": e.count, "ms": dev_us / 1e3})
    rows.sort(key=lambda r: -r["ms"])
    for r in rows[:top]:
        print(f"{r['ms']:9.2f} ms {r['calls']:6d}  {r['op']}")
    return rows[:top]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--preset", default="flux.2-dev")
    ap.add_argument("--size", type=int, default=1024)
    ap.add_argument("--profile", action="store_true", help="add a per-op CUDA time table of one forward")
    args = ap.parse_args()
    dev, dt = "cuda", torch.bfloat16
    result = {"env": env_block(), "preset": args.preset, "size": args.size, "weights": "synthetic (random)"}

    model = synthetic_transformer(args.preset, device=dev, dtype=dt, seed=0)
    cfg = model.config
    result["weights_gib"] = model_bytes(model) / GIB
    n = args.size // 16
    g = torch.Generator().manual_seed(0)
    img = torch.randn(1, n * n, cfg.in_channels, generator=g).to(dev, dt)
    txt = torch.randn(1, 512, cfg.context_in_dim, generator=g).to(dev, dt)
    iid, tid = image_ids(n, n, device=dev), text_ids(512, device=dev)
    t = torch.full((1,), 0.7, device=dev, dtype=dt)
    gd = torch.full((1,), 4.0, device=dev, dtype=dt)
    result["tokens"] = {"image": n * n, "text": 512}
    # FLOPs as reference/method.md counts them: each token passes through one stream's linears
    # (2 * params * tokens), attention is 4 * L^2 * hidden per block over the joint sequence
    L = n * n + 512

    def block_params(prefix: str) -> int:
        return sum(p.numel() for name, p in model.named_parameters() if name.startswith(prefix) and p.ndim == 2)

    single = block_params("single_blocks.") / cfg.depth_single_blocks
    stream = block_params("double_blocks.") / (2 * cfg.depth)
    linear_flops = 2 * (single * L * cfg.depth_single_blocks + stream * L * cfg.depth)
    flops = linear_flops + 4 * L * L * cfg.hidden_size * (cfg.depth + cfg.depth_single_blocks)
    result["tflop_per_forward"] = flops / 1e12

    with torch.inference_mode():
        ours = model(img, iid, txt, tid, t, gd)
        result["ours_finite"] = bool(torch.isfinite(ours).all())
        result["ours_output_rms"] = ours.float().pow(2).mean().sqrt().item()

        variants = {}
        default_order = list(attention._SDPA_ORDER)
        for name, order in (
            ("ours_eager_sdpa_cudnn", default_order),
            ("ours_eager_sdpa_flash", [o for o in default_order if o.name != "CUDNN_ATTENTION"]),
        ):
            attention._SDPA_ORDER[:] = order
            variants[name] = time_forward(lambda: model(img, iid, txt, tid, t, gd))
            print(name, round(variants[name]["ms_median"], 1), "ms", flush=True)
        attention._SDPA_ORDER[:] = default_order
        if args.profile:
            result["profile_ours"] = profile_table(lambda: model(img, iid, txt, tid, t, gd))

        # diffusers, sharing our weight storage
        try:
            from diffusers import Flux2Transformer2DModel

            from flux2_bench.weights import diffusers_config

            dcfg = {k: v for k, v in diffusers_config(cfg).items() if not k.startswith("_")}
            with torch.device("meta"):
                dmodel = Flux2Transformer2DModel(**dcfg)
            dmodel.load_state_dict(transformer_state(model, "diffusers"), assign=True, strict=True)
            dmodel.eval()

            def dfwd():
                return dmodel(
                    hidden_states=img,
                    encoder_hidden_states=txt,
                    timestep=t,
                    img_ids=iid[0],
                    txt_ids=tid[0],
                    guidance=gd,
                    return_dict=False,
                )[0]

            theirs = dfwd()
            diff = (ours.float() - theirs.float()).norm() / theirs.float().norm()
            result["rel_l2_ours_vs_diffusers_bf16"] = diff.item()
            variants["diffusers_eager"] = time_forward(dfwd)
            print("diffusers", round(variants["diffusers_eager"]["ms_median"], 1), "ms", flush=True)
        except ImportError as e:
            result["diffusers_error"] = str(e)

    for v in variants.values():
        v["tflops"] = flops / (v["ms_median"] * 1e-3) / 1e12
    result["variants"] = variants
    if "diffusers_eager" in variants:
        result["speedup_vs_diffusers"] = (
            variants["diffusers_eager"]["ms_median"] / variants["ours_eager_sdpa_cudnn"]["ms_median"]
        )
    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(result, f, indent=2)
    print(json.dumps({k: v for k, v in result.items() if k != "variants"}, indent=2))


if __name__ == "__main__":
    main()
