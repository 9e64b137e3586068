"""One transformer forward with a printed summary: the main job until the harness lands."""

from __future__ import annotations

import time

import torch

from flux2_bench.model import num_parameters
from flux2_bench.sampling import image_ids, text_ids
from flux2_bench.weights import load_transformer, model_bytes, synthetic_transformer

_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def forward_once(
    *,
    preset: str = "tiny",
    checkpoint: str | None = None,
    width: int = 256,
    height: int = 256,
    device: str = "cpu",
    dtype: str = "bf16",
    seed: int = 0,
    repeats: int = 3,
    text_tokens: int = 512,
) -> dict:
    """Build (or load) the transformer, run `repeats` timed forwards at width x height, print a summary."""
    if width % 16 or height % 16 or width < 16 or height < 16:
        raise ValueError(f"width and height must be positive multiples of 16, got {width}x{height}")
    torch_dtype = _DTYPES[dtype]
    if checkpoint:
        model = load_transformer(checkpoint, preset=None, device=device, dtype=torch_dtype)
    else:
        model = synthetic_transformer(preset, device=device, dtype=torch_dtype, seed=seed)
    cfg = model.config
    gh, gw = height // 16, width // 16
    g = torch.Generator().manual_seed(seed)
    img = torch.randn(1, gh * gw, cfg.in_channels, generator=g).to(device, torch_dtype)
    txt = torch.randn(1, text_tokens, cfg.context_in_dim, generator=g).to(device, torch_dtype)
    args = (img, image_ids(gh, gw, device=device), txt, text_ids(text_tokens, device=device))
    t = torch.full((1,), 0.5, device=device, dtype=torch_dtype)
    guid = torch.full((1,), 4.0, device=device, dtype=torch_dtype) if cfg.use_guidance_embed else None
    times = []
    with torch.inference_mode():
        for i in range(repeats + 1):
            if device.startswith("cuda"):
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            out = model(*args, t, guid)
            if device.startswith("cuda"):
                torch.cuda.synchronize()
            if i:
                times.append(time.perf_counter() - t0)
    times.sort()
    summary = {
        "preset": "checkpoint" if checkpoint else preset,
        "parameters": num_parameters(cfg),
        "weights_gib": model_bytes(model) / 2**30,
        "tokens": f"{gh * gw} image + {text_tokens} text",
        "output_shape": tuple(out.shape),
        "output_finite": bool(torch.isfinite(out).all()),
        "ms_per_forward": 1e3 * times[len(times) // 2],
        "device": device,
        "dtype": dtype,
    }
    if device.startswith("cuda"):
        summary["peak_gib"] = torch.cuda.max_memory_allocated() / 2**30
    print(
        f"FLUX.2 {summary['preset']} ({checkpoint or 'synthetic weights'}), "
        f"{summary['parameters'] / 1e9:.3f} B parameters ({summary['weights_gib']:.2f} GiB {dtype})\n"
        f"  input {width}x{height}: {summary['tokens']} tokens -> output {list(out.shape)}, "
        f"finite={summary['output_finite']}\n"
        f"  forward: {summary['ms_per_forward']:.1f} ms (median of {repeats}) on {device}"
        + (f", peak {summary['peak_gib']:.2f} GiB" if "peak_gib" in summary else "")
    )
    return summary
