"""Command-line entry points. Thin: parse, then call one library function by keyword."""

from __future__ import annotations

import argparse
import sys

import torch

from flux2_bench.model import PRESETS

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def _default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def _add_forward(sub) -> None:
    from flux2_bench.smoke import forward_once

    d = forward_once.__kwdefaults__
    p = sub.add_parser(
        "forward",
        help="one full transformer forward on synthetic or loaded weights, with a short summary",
        description="Run one FLUX.2 transformer forward (one sampling step) and print parameters, "
        "output shape, time and peak memory. Synthetic weights unless --checkpoint is given.",
    )
    p.add_argument("--preset", default=d["preset"], choices=list(PRESETS), help="architecture (default: %(default)s)")
    p.add_argument("--checkpoint", default=d["checkpoint"], help="BFL file, diffusers folder or sharded index")
    p.add_argument("--width", type=int, default=d["width"], help="image width in pixels (default: %(default)s)")
    p.add_argument("--height", type=int, default=d["height"], help="image height in pixels (default: %(default)s)")
    p.add_argument("--device", default=None, help="cuda or cpu (default: cuda when available)")
    p.add_argument("--dtype", default=d["dtype"], choices=list(DTYPES), help="(default: %(default)s)")
    p.add_argument("--seed", type=int, default=d["seed"])
    p.add_argument("--repeats", type=int, default=d["repeats"], help="timed forwards after one warm-up")


def bench_main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="flux2-bench",
        description="FLUX.2 at lower precision: fit, speed and fidelity. With no command, runs the "
        "embedded default: one forward of the `tiny` preset with synthetic weights.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    _add_forward(sub)
    args = parser.parse_args(argv)
    if args.command is None:
        args = parser.parse_args(["forward", *(argv or [])])
    if args.command == "forward":
        from flux2_bench.smoke import forward_once

        forward_once(
            preset=args.preset,
            checkpoint=args.checkpoint,
            width=args.width,
            height=args.height,
            device=args.device or _default_device(),
            dtype=args.dtype,
            seed=args.seed,
            repeats=args.repeats,
        )
    return 0


def quantize_main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="flux2-quantize",
        description="Stream FLUX.2 checkpoints into FP8 and 4-bit safetensors (ComfyUI-, diffusers- and "
        "bitsandbytes-compatible where those formats exist), verify and inspect them.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(bench_main())
