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


def _add_generate(sub) -> None:
    from flux2_bench.pipeline import generate_to_file

    d = generate_to_file.__kwdefaults__
    p = sub.add_parser(
        "generate",
        help="text-to-image / reference editing with real (--checkpoint) or synthetic weights",
        description="Generate one image. With --checkpoint DIR (official files or diffusers layout) real "
        "weights are used; without it the --preset transformer and VAE get synthetic random weights and the "
        "prompt is replaced by seeded random embeddings (plumbing and timing, not a meaningful image).",
    )
    p.add_argument("--prompt", required=True)
    p.add_argument("--ref", action="append", default=None, help="reference image (PNG/JPEG); repeat up to 10x")
    p.add_argument("--out", required=True, help="output PNG/JPEG path")
    p.add_argument("--checkpoint", default=d["checkpoint"], help="folder with weights (official or diffusers)")
    p.add_argument("--preset", default=d["preset"], choices=list(PRESETS), help="synthetic run (default: %(default)s)")
    p.add_argument("--width", type=int, default=d["width"], help="pixels (default: 1024, tiny: 128)")
    p.add_argument("--height", type=int, default=d["height"], help="pixels (default: 1024, tiny: 128)")
    p.add_argument("--steps", type=int, default=d["steps"], help="(default: the preset's)")
    p.add_argument("--guidance", type=float, default=d["guidance"], help="(default: the preset's)")
    p.add_argument("--seed", type=int, default=d["seed"])
    p.add_argument("--device", default=None, help="cuda or cpu (default: cuda when available)")
    p.add_argument("--dtype", default=d["dtype"], choices=list(DTYPES), help="(default: %(default)s)")
    p.add_argument("--offload", action="store_true", help="keep each component on the device only for its phase")
    p.add_argument("--tiled-vae", action="store_true", help="tiled VAE encode/decode (large images)")
    p.add_argument("--cache-dir", default=d["cache_dir"], help="prompt-embedding cache folder")


def _add_report(sub) -> None:
    p = sub.add_parser(
        "report",
        help="report.md, report.html and PNG plots from a run directory's results.json",
        description="Regenerate results.csv and write report.md, report.html (self-contained) and the PNG "
        "plots into DIR, from DIR/results.json (plus kernels.json and images/ when present).",
    )
    p.add_argument("dir", metavar="DIR", help="run directory holding results.json")
    p.add_argument("--readme", metavar="FILE", help="also rewrite FILE's generated results block from this run")


def _csv(kind):
    def parse(text: str) -> tuple:
        try:
            return tuple(kind(x.strip()) for x in text.split(",") if x.strip())
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"expected a comma-separated list of {kind.__name__}, got {text!r}"
            ) from None

    return parse


def _add_run(sub) -> None:
    from flux2_bench.bench import RunConfig

    d = RunConfig()
    p = sub.add_parser(
        "run",
        help="the benchmark matrix: recipes x resolutions x references, tiers emulated and projected",
        description="Measure FLUX.2 per precision recipe: transformer ms/step (median, p10, p90), the "
        "encode/denoise/decode split, weights and peak memory (allocator and NVML), fidelity against bf16 "
        "and typography (OCR) with real weights; for each tier, the fastest placement that fits its VRAM "
        "(emulated on the GPU at hand) and a projected step time. Writes results.json/csv and a report. "
        "Defaults: on CPU the tiny preset (synthetic weights, 256², a few minutes); on a GPU FLUX.2-dev "
        "with synthetic weights at 1024².",
    )
    src = p.add_mutually_exclusive_group()
    src.add_argument("--checkpoint", metavar="DIR", help="pipeline folder: official files or diffusers layout")
    src.add_argument("--synthetic", action="store_true", help="random weights of the preset's exact shapes (default)")
    p.add_argument("--preset", default=d.preset, help="synthetic runs: tiny, flux.2-dev, flux.2-klein-4b, ...")
    p.add_argument("--recipes", type=_csv(str), default=d.recipes, help="default: %(default)s (bf16 always runs)")
    p.add_argument("--resolutions", type=_csv(int), default=d.resolutions, help="square sides, e.g. 512,1024,2048")
    p.add_argument("--refs", type=_csv(int), default=d.refs, help="reference images per cell, e.g. 0,1,4")
    p.add_argument("--steps", type=int, default=d.steps, help="sampling steps (default: 4 synthetic, preset's real)")
    p.add_argument("--tiers", type=_csv(str), default=d.tiers, help="tier slugs from gpu-tiers.csv, e.g. rtx4090")
    p.add_argument(
        "--prompts", default=d.prompts, help="text file, one prompt per line, each cell renders them as one batch"
    )
    p.add_argument("--typography-prompts", type=int, default=d.typography_prompts, help="suite prompts per recipe")
    p.add_argument("--anchors", action="store_true", help="also time diffusers / torchao / bitsandbytes (GPU)")
    p.add_argument("--out", default=d.out, help="run directory (default: runs/<UTC time>)")
    p.add_argument("--resume", metavar="DIR", default=d.resume, help="continue the run in DIR")
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--device", default=d.device, help="cuda or cpu (default: cuda when available)")


def bench_main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="flux2-bench",
        description="FLUX.2 at lower precision: fit, speed and fidelity. With no command, runs the "
        "embedded default `flux2-bench run` (tiny preset on CPU, FLUX.2-dev on a GPU, synthetic weights).",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    _add_run(sub)
    _add_forward(sub)
    _add_generate(sub)
    _add_report(sub)
    args = parser.parse_args(argv)
    if args.command is None:
        args = parser.parse_args(["run", *(argv or [])])
    if args.command == "run":
        from flux2_bench.bench import run_main

        return run_main(
            checkpoint=args.checkpoint,
            preset=args.preset,
            recipes=args.recipes,
            resolutions=args.resolutions,
            refs=args.refs,
            steps=args.steps,
            tiers=args.tiers,
            prompts=args.prompts,
            typography_prompts=args.typography_prompts,
            out=args.out,
            resume=args.resume,
            anchors=args.anchors,
            seed=args.seed,
            device=args.device,
        )
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
    elif args.command == "generate":
        from flux2_bench.pipeline import generate_to_file

        generate_to_file(
            prompt=args.prompt,
            out=args.out,
            refs=args.ref,
            checkpoint=args.checkpoint,
            preset=args.preset,
            width=args.width,
            height=args.height,
            steps=args.steps,
            guidance=args.guidance,
            seed=args.seed,
            device=args.device or _default_device(),
            dtype=args.dtype,
            offload=args.offload,
            tiled_vae=args.tiled_vae,
            cache_dir=args.cache_dir,
        )
    elif args.command == "report":
        from flux2_bench.report import write_report

        try:
            written = write_report(args.dir)
        except (FileNotFoundError, ValueError) as e:
            print(f"flux2-bench report: error: {e}", file=sys.stderr)
            return 1
        print(f"wrote {len(written)} files to {args.dir}: {', '.join(written)}")
        if args.readme:
            from flux2_bench.report import update_readme

            try:
                update_readme(args.readme, args.dir)
            except ValueError as e:
                print(f"flux2-bench report: error: {e}", file=sys.stderr)
                return 1
            print(f"updated the results block of {args.readme}")
    return 0


def _add_quantize_commands(sub) -> None:
    from flux2_bench.quantize.convert import convert
    from flux2_bench.quantize.recipes import Recipe

    d = convert.__kwdefaults__
    p = sub.add_parser(
        "convert",
        help="stream a bf16 checkpoint into an FP8 / 4-bit one",
        description="Convert a FLUX.2 transformer (BFL file, diffusers folder, sharded index) or a "
        "Mistral3/Qwen3 text encoder, one tensor at a time. Block linears are quantized; embedders, "
        "modulation, final layer and norms stay bf16 (text encoders: *_proj and mlp.* quantized).",
    )
    p.add_argument("src", help="source checkpoint: .safetensors file, folder or *.safetensors.index.json")
    p.add_argument("-o", "--out", required=True, help=".safetensors file (file input) or folder (folder input)")
    p.add_argument(
        "--recipe", default=str(d["recipe"]), choices=[r.value for r in Recipe], help="(default: %(default)s)"
    )
    p.add_argument("--comfy", action="store_true", help="ComfyUI markers (fp8-tensor, nvfp4): comfy_quant + header")
    p.add_argument("--double-quant", action="store_true", help="nf4: 8-bit quantized absmax (bnb double quant)")
    p.add_argument("--keep", action="append", default=list(d["keep"]), metavar="GLOB", help="keep matching layers bf16")
    p.add_argument("--only", action="append", default=list(d["only"]), metavar="GLOB", help="quantize only these")
    p.add_argument("--shard-size", default=d["shard_size"], help="e.g. 5GB: write shards + index (default: as input)")
    p.add_argument("--force", action="store_true", help="replace an existing output")
    p.add_argument("--no-progress", action="store_true")
    p = sub.add_parser("verify", help="per-layer SQNR of a converted checkpoint against its source")
    p.add_argument("out", help="the converted checkpoint")
    p.add_argument("--against", required=True, help="the source it was converted from")
    p.add_argument("--no-hash", action="store_true", help="skip re-hashing the source")
    p = sub.add_parser("inspect", help="format, recipe, layers and sizes of a checkpoint")
    p.add_argument("path")
    p.add_argument("--json", action="store_true", help="print JSON")


def _run_quantize_command(args) -> int:
    import json

    from flux2_bench.safetensors_io import CheckpointError

    try:
        if args.command == "convert":
            from flux2_bench.quantize.convert import convert, parse_size

            r = convert(
                args.src,
                args.out,
                recipe=args.recipe,
                comfy=args.comfy,
                double_quant=args.double_quant,
                keep=args.keep,
                only=args.only,
                shard_size=parse_size(args.shard_size) if args.shard_size else None,
                force=args.force,
                progress=not args.no_progress,
            )
            print(
                f"wrote {len(r.files)} file(s) to {r.out}: {r.recipe}, preset {r.preset}, {len(r.quantized)} layers "
                f"quantized, {len(r.kept)} kept; {r.bytes_in / 1e9:.3f} GB -> {r.bytes_out / 1e9:.3f} GB in "
                f"{r.seconds:.1f} s ({r.mb_per_s:.0f} MB/s of source, hashing {r.hash_seconds:.1f} s)"
            )
            return 0
        if args.command == "verify":
            from flux2_bench.quantize.verify import verify

            report = verify(args.out, against=args.against, check_hash=not args.no_hash)
            print(report.table())
            return 0 if report.ok else 1
        from flux2_bench.quantize.verify import format_inspect, inspect_checkpoint

        info = inspect_checkpoint(args.path)
        print(json.dumps(info, indent=2) if args.json else format_inspect(info))
        return 0
    except (CheckpointError, ValueError, FileExistsError, OSError) as e:
        print(f"flux2-quantize {args.command}: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"flux2-quantize {args.command}: interrupted; nothing was left behind", file=sys.stderr)
        return 130


def quantize_main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="flux2-quantize",
        description="Stream FLUX.2 checkpoints into FP8 and 4-bit safetensors (ComfyUI-, diffusers- and "
        "bitsandbytes-compatible where those formats exist), verify and inspect them.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    _add_quantize_commands(sub)
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    return _run_quantize_command(args)


if __name__ == "__main__":
    sys.exit(bench_main())
