"""Issue 8 GPU check: placements on the GPU at hand, VRAM emulation, and the projection model against a measurement.

1. Context overhead: NVML `used` before CUDA init, after init, after the first cuBLAS GEMM and SDPA call.
2. Pinned host -> device bandwidth (2 GiB), as a fraction of the H100's PCIe 5.0 x16 rate.
3. FLUX.2-klein-4b, synthetic bf16, 64x64 latent tokens + 512 text: all resident vs BlockStreamer
   (blocks from pinned memory): ms/step (CUDA events, median p10 p90), allocator + NVML peaks; streamed
   output must equal the resident one bit for bit.
4. FLUX.2-dev (64 GB bf16): resident ms/step; then blocks streamed under an emulated 24 GiB card
   (allocator cap = 24 GiB - measured context overhead): bitwise check, ms/step, peaks; then making the
   weights resident under the same cap must raise OOM, recorded.
5. Per-kind efficiencies (one FLUX.2 GEMM shape, SDPA at the step's length; the rest of the measured
   step is taken as memory-bound time), WorkloadFigures, and projections for RTX tiers; the H100
   stream_blocks projection is compared with the measured streamed step (a check of the PCIe model).

    python3 reports/offload/bench_offload.py --out $OUT/offload_h100.json
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import os
import platform
import time

import torch
import torch.nn.functional as F
import triton
from torch.nn.attention import sdpa_kernel

from flux2_bench.attention import _SDPA_ORDER
from flux2_bench.measure import PeakMemory, context_overhead_bytes, cuda_timing, emulate_vram, is_oom
from flux2_bench.offload import BlockStreamer
from flux2_bench.sampling import image_ids, text_ids
from flux2_bench.tiers import (
    GIB,
    WorkloadFigures,
    choose_placement,
    count_step_flops,
    get_tier,
    kernel_efficiency,
    make_placement,
    project_step_ms,
)
from flux2_bench.weights import model_bytes, synthetic_transformer

TIERS = ("rtx3090", "rtx4080", "rtx4090", "rtx5080", "rtx5090", "rtx6000ada", "h100")


def nvml_used_raw(index: int = 0) -> int | None:
    """NVML used without touching CUDA (for the before-init reading)."""
    try:
        import pynvml

        pynvml.nvmlInit()
        return int(pynvml.nvmlDeviceGetMemoryInfo(pynvml.nvmlDeviceGetHandleByIndex(index)).used)
    except Exception:
        return None


def env_block() -> dict:
    props = torch.cuda.get_device_properties(0)
    try:
        import pynvml

        pynvml.nvmlInit()
        driver = pynvml.nvmlSystemGetDriverVersion()
    except Exception as e:
        driver = f"unknown ({type(e).__name__})"
    return {
        "gpu": props.name,
        "sm": f"{props.major}.{props.minor}",
        "total_memory_gib": props.total_memory / GIB,
        "driver": driver,
        "cuda": torch.version.cuda,
        "torch": torch.__version__,
        "triton": triton.__version__,
        "python": platform.python_version(),
        "git_sha": os.environ.get("GIT_SHA", "unknown"),
        "time": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
    }


def timing_dict(t) -> dict:
    return {"label": "measured", **dataclasses.asdict(t)}


def inputs_for(cfg, seed: int = 0):
    g = torch.Generator(device="cuda").manual_seed(seed)
    img = torch.randn(1, 64 * 64, cfg.in_channels, generator=g, device="cuda", dtype=torch.bfloat16)
    txt = torch.randn(1, 512, cfg.context_in_dim, generator=g, device="cuda", dtype=torch.bfloat16)
    t = torch.tensor([0.6], device="cuda", dtype=torch.bfloat16)
    guidance = torch.tensor([4.0], device="cuda", dtype=torch.bfloat16) if cfg.use_guidance_embed else None
    return img, image_ids(64, 64, device="cuda"), txt, text_ids(512, device="cuda"), t, guidance


def run_config(model, inputs, warmup: int, repeats: int) -> tuple[torch.Tensor, dict]:
    fwd = lambda: model(*inputs)
    out = fwd().clone()  # first call: also the output checked bit for bit
    with PeakMemory() as mem:
        fwd()
    t = cuda_timing(fwd, warmup=warmup, repeats=repeats)
    again = fwd()
    return out, {
        "ms_per_step": timing_dict(t),
        "memory": {"label": "measured", **mem.as_dict()},
        "repeatable_bitwise": bool(torch.equal(again, out)),
    }


def mismatch(a, b) -> dict:
    diff = a.float() - b.float()
    return {
        "bitwise_equal": bool(torch.equal(a, b)),
        "n_differ": int((a != b).sum()),
        "max_abs": float(diff.abs().max()),
        "rel_l2": float(diff.norm() / b.float().norm()),
        "nan": bool(torch.isnan(a).any()),
    }


def kind_efficiencies(h100) -> dict:
    """bf16 GEMM (single.linear1 at 1024²) and SDPA (B=1 H=48 L=4608 D=128) on real random data."""
    m, k, n = 4608, 6144, 55296
    a = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(n, k, device="cuda", dtype=torch.bfloat16)
    ref = (a[:64].float() @ b[:64].float().T).bfloat16()
    got = (a @ b.T)[:64, :64]
    rel = float((got.float() - ref.float()).norm() / ref.float().norm())
    assert rel < 1e-2, f"GEMM sanity check: rel L2 {rel:.2e} vs fp32 (bf16 output rounding is ~2e-3)"
    t_gemm = cuda_timing(lambda: a @ b.T, warmup=2, repeats=10)
    gemm_tflops = 2 * m * n * k / (t_gemm.median * 1e-3) / 1e12
    q, kk, v = (torch.randn(1, 48, 4608, 128, device="cuda", dtype=torch.bfloat16) for _ in range(3))
    with sdpa_kernel(_SDPA_ORDER, set_priority=True):  # the order the model's attention uses (cuDNN first)
        t_att = cuda_timing(lambda: F.scaled_dot_product_attention(q, kk, v), warmup=2, repeats=10)
    att_tflops = 4 * 48 * 4608**2 * 128 / (t_att.median * 1e-3) / 1e12
    return {
        "gemm_shape_mkn": [m, k, n],
        "gemm_tflops": gemm_tflops,
        "gemm_ms": timing_dict(t_gemm),
        "sdpa_tflops": att_tflops,
        "sdpa_ms": timing_dict(t_att),
        "efficiency": {
            "gemm_bf16": kernel_efficiency(gemm_tflops, h100, "gemm_bf16"),
            "attention_bf16": kernel_efficiency(att_tflops, h100, "attention_bf16"),
        },
    }


def h2d_bandwidth(h100) -> dict:
    """2 GiB pinned host -> device copies, as a fraction of the H100's PCIe 5.0 x16 rate."""
    host = torch.empty(2 * GIB, dtype=torch.uint8, pin_memory=True).random_()
    dev = torch.empty(2 * GIB, dtype=torch.uint8, device="cuda")
    t = cuda_timing(lambda: dev.copy_(host, non_blocking=True), warmup=1, repeats=5)
    gbs = 2 * GIB / (t.median * 1e-3) / 1e9
    assert torch.equal(dev[:4096].cpu(), host[:4096])
    return {"label": "measured", "gbs": gbs, "efficiency_vs_pcie5_x16": gbs / h100.pcie_gbs, "ms": timing_dict(t)}


def figures_for(cfg, block_bytes, other_bytes, activation_bytes, resident_ms, eff, h2d_eff, h100) -> tuple:
    """WorkloadFigures of one preset at 64x64 + 512 tokens; the measured step minus the compute terms
    projected on the H100 is attributed to memory-bound kernels at the H100's bandwidth."""
    flops = count_step_flops(cfg, 64 * 64, 512)
    compute_ms = sum(flops[k] / (h100.rate_tflops(k)[0] * 1e12 * eff[k]) * 1e3 for k in flops)
    memory_ms = max(resident_ms - compute_ms, 0.0)
    fig = WorkloadFigures(
        transformer_block_bytes=tuple(block_bytes),
        transformer_other_bytes=other_bytes,
        transformer_activation_bytes=activation_bytes,
        flops=flops,
        efficiency=dict(eff),
        memory_bytes=memory_ms * 1e-3 * h100.bandwidth_gbs * 1e9,
        memory_efficiency=1.0,
        h2d_efficiency=h2d_eff,
        measured_on="h100",
    )
    return fig, {"compute_ms_h100": compute_ms, "memory_bound_ms_h100": memory_ms}


def projections(fig, overhead_gib) -> dict:
    rows = {}
    for slug in TIERS:
        tier = get_tier(slug)
        chosen = choose_placement(fig, tier, context_overhead_gib=overhead_gib)
        per = {}
        for name in ("resident", "stream_blocks"):
            pl = make_placement(fig, name, overhead_gib)
            pr = project_step_ms(fig, tier, pl)
            per[name] = {
                "fits": pl.device_bytes <= tier.vram_bytes,
                "device_gib": pl.device_bytes / GIB,
                **dataclasses.asdict(pr),
            }
        rows[slug] = {"chosen": chosen.name if chosen else "does not fit", "placements": per}
    return rows


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--small", default="flux.2-klein-4b")
    ap.add_argument("--large", default="flux.2-dev")
    ap.add_argument("--cap-gib", type=float, default=24.0)
    args = ap.parse_args()
    res: dict = {"labels": "measured = timed/read here; emulated = under an allocator cap; projected = model"}

    def save():
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        with open(args.out, "w") as f:
            json.dump(res, f, indent=1)

    h100 = get_tier("h100")
    # 1. context overhead
    before = nvml_used_raw()
    torch.ones(1, device="cuda")
    torch.cuda.synchronize()
    after_init = nvml_used_raw()
    a = torch.randn(4096, 4096, device="cuda", dtype=torch.bfloat16)
    (a @ a).sum().item()
    q = torch.randn(1, 8, 1024, 128, device="cuda", dtype=torch.bfloat16)
    F.scaled_dot_product_attention(q, q, q).sum().item()
    del a, q
    torch.cuda.empty_cache()
    res["env"] = env_block()
    res["context_overhead"] = {
        "label": "measured",
        "nvml_used_before_cuda_init": before,
        "nvml_used_after_init": after_init,
        "overhead_after_gemm_and_sdpa_bytes": context_overhead_bytes(),
    }
    overhead_gib = res["context_overhead"]["overhead_after_gemm_and_sdpa_bytes"] / GIB
    res["context_overhead"]["overhead_gib"] = overhead_gib
    print("context overhead GiB", overhead_gib)
    save()

    # 2. pinned H2D bandwidth
    res["h2d"] = h2d_bandwidth(h100)
    h2d_gbs = res["h2d"]["gbs"]
    torch.cuda.empty_cache()
    print("H2D GB/s", h2d_gbs)
    save()

    # 5a. per-kind efficiencies (needs the GPU empty-ish; done before the big model)
    res["kernels"] = kind_efficiencies(h100)
    eff = res["kernels"]["efficiency"]
    torch.cuda.empty_cache()
    save()

    with torch.no_grad():
        for preset, warmup, repeats in ((args.small, 2, 7), (args.large, 1, 3)):
            r: dict = {"preset": preset, "tokens": {"image": 4096, "text": 512}, "weights": "synthetic (random)"}
            res[preset] = r
            t0 = time.perf_counter()
            model = synthetic_transformer(preset, device="cuda", dtype=torch.bfloat16, seed=0)
            torch.cuda.synchronize()
            r["build_s"] = time.perf_counter() - t0
            weights = model_bytes(model)
            r["weights_gib"] = weights / GIB
            inputs = inputs_for(model.config)
            ref, r["resident"] = run_config(model, inputs, warmup, repeats)
            r["resident"]["activation_bytes"] = r["resident"]["memory"]["allocator_peak_bytes"] - weights
            print(preset, "resident", r["resident"]["ms_per_step"]["median"])
            save()

            t0 = time.perf_counter()
            streamer = BlockStreamer(model, "cuda")
            torch.cuda.synchronize()
            r["pin_blocks_s"] = time.perf_counter() - t0
            r["block_bytes"] = streamer.block_bytes
            other = weights - sum(p.numel() * p.element_size() for b in streamer.blocks for p in b.parameters())
            r["other_bytes"] = other
            big = preset == args.large
            if big:
                cap_ctx = emulate_vram(args.cap_gib)
            else:
                cap_ctx = None
            try:
                if cap_ctx is not None:
                    cap = cap_ctx.__enter__()
                    r["emulated_cap"] = {"label": "emulated", **dataclasses.asdict(cap)}
                out, r["streamed"] = run_config(model, inputs, warmup, repeats)
                r["streamed"]["label"] = "emulated" if big else "measured"
                r["streamed"]["vs_resident"] = mismatch(out, ref)
                r["streamed"]["max_blocks_on_device"] = streamer.max_on_device
                if big:
                    dev_peak = r["streamed"]["memory"]["device_peak_bytes"]
                    r["streamed"]["fits_cap_device_level"] = dev_peak is not None and dev_peak <= args.cap_gib * GIB
                print(preset, "streamed", r["streamed"]["ms_per_step"]["median"], r["streamed"]["vs_resident"])
                save()
                streamer.remove()
                if big:  # the same weights made resident under the cap: must not fit
                    try:
                        for pm in streamer.pinned:
                            pm.to_device("cuda")
                        torch.cuda.synchronize()
                        r["resident_under_cap"] = {"label": "emulated", "fits": True}
                    except Exception as e:
                        if not is_oom(e):
                            raise
                        r["resident_under_cap"] = {
                            "label": "emulated",
                            "fits": False,
                            "oom": f"{type(e).__name__}: {str(e).splitlines()[0]}",
                            "blocks_loaded_before_oom": sum(pm.on_device for pm in streamer.pinned),
                        }
                    finally:
                        for pm in streamer.pinned:
                            pm.to_host()
                    print("resident under cap", r["resident_under_cap"])
            finally:
                if cap_ctx is not None:
                    cap_ctx.__exit__(None, None, None)
            save()

            fig, split = figures_for(
                model.config,
                r["block_bytes"],
                other,
                r["resident"]["activation_bytes"],
                r["resident"]["ms_per_step"]["median"],
                eff,
                res["h2d"]["efficiency_vs_pcie5_x16"],
                h100,
            )
            r["figures"] = {**dataclasses.asdict(fig), **split}
            r["projections"] = projections(fig, overhead_gib)
            proj_stream = r["projections"]["h100"]["placements"]["stream_blocks"]["step_ms"]
            r["model_check_h100_streamed"] = {
                "projected_ms": proj_stream,
                "measured_ms": r["streamed"]["ms_per_step"]["median"],
                "ratio_measured_over_projected": r["streamed"]["ms_per_step"]["median"] / proj_stream,
            }
            print(preset, "model check", r["model_check_h100_streamed"])
            save()
            del model, streamer, inputs, ref, out
            torch.cuda.empty_cache()
    print("done")


if __name__ == "__main__":
    main()
