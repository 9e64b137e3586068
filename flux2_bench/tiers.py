"""GPU tiers: specs from `data/gpu-tiers.csv`, placement (what fits where) and latency projection.

The harness measures on the GPU it has. For another tier it (1) emulates the tier's memory on that GPU
(`measure.emulate_vram`), (2) picks the fastest placement that fits (`choose_placement`) and (3) projects
the step time from kernel efficiencies measured here and the tier's roofline (`project_step_ms`).
Everything here is a pure function of the CSV and a `WorkloadFigures` record; nothing touches a GPU.

Units: bytes, FLOPs, milliseconds; the CSV's `vram_gb` is read as GiB (a "24 GB" RTX 4090 has
24 GiB of GDDR6X; NVML reports 24564 MiB of it), rates as 10^12 FLOP/s, bandwidths as 10^9 B/s.

The projection model (`project_step_ms`), term by term:

- compute, one term per FLOP kind: ``flops / (tier rate for the kind x efficiency measured for the kind)``.
  Rates are the CSV's FP32-accumulate columns (our GEMMs and attention accumulate in fp32), which on
  GeForce cards are already half the FP16-accumulate rate. FP8 kinds use the FP8 rate only on sm_89+;
  below that FP8 GEMMs run the weight-only path (bf16 tensor rate + a dequant term) and FP8 attention
  falls back to bf16 attention; the projection says so in its notes. 4-bit weights always run at the
  bf16 rate (dequantized in registers, bf16 MMA).
- memory: ``memory_bytes / (tier bandwidth x measured bandwidth efficiency)`` for the memory-bound
  kernels (norms, elementwise, RoPE, casts); kernels run one after another, so terms add.
- dequant (FP8 weight-only path only): one extra read of the FP8 weight bytes at the tier's
  bandwidth, added serially: an upper bound for an in-register dequant that does not hide.
- PCIe (streamed blocks only): block i+1 is copied while block i computes (one block ahead, wrapping
  to block 0 for the next step), so a step takes ``sum_i max(c_i, p_{i+1 mod n})`` where ``c_i`` is the
  block's share of the on-GPU time (split by weight bytes: every block linear does 2 FLOPs per weight
  per token) and ``p_i = block bytes / (PCIe rate x measured host-to-device efficiency)``. The term
  reported is the exposed part, that sum minus the on-GPU time. The copy engine's own HBM/GDDR traffic
  is ignored (a few % of bandwidth).
"""

from __future__ import annotations

import csv
import re
from dataclasses import dataclass, field
from importlib import resources

GIB = 2**30

# Device-level use the caching allocator does not hold: what NVML counts before CUDA starts, the CUDA
# context, cuBLAS/cuDNN workspaces. Measured on the H100 (reports/offload/offload_h100.json): 0.47 GiB
# in use before CUDA init, 1.15 GiB after init + the first GEMM and SDPA, 1.36 GiB once FLUX.2 had run
# (`emulated_cap.context_overhead_bytes`). A desktop RTX card also drives a display (0.3-1 GiB on
# Windows); pass a measured figure where there is one.
DEFAULT_CONTEXT_OVERHEAD_GIB = 1.5

# FLOP kinds of one step. Efficiency of a kind = achieved FLOP/s / the measuring GPU's CSV rate for
# that kind (`Tier.rate_tflops`), so tier rate x efficiency is the projected achieved rate.
FLOP_KINDS = ("gemm_bf16", "gemm_fp8", "gemm_4bit", "attention_bf16", "attention_fp8")

# Placements, cheapest first (ties in projected time go to the earlier one).
CANDIDATES = ("resident", "offload_text_encoder", "stream_blocks")


def _pcie_lane_gbs(gen: int) -> float:
    """GB/s per lane per direction: 2.5/5 GT/s with 8b/10b, 8/16/32/64 GT/s with 128b/130b."""
    gts = {1: 2.5, 2: 5.0, 3: 8.0, 4: 16.0, 5: 32.0, 6: 64.0}
    if gen not in gts:
        raise ValueError(f"unknown PCIe generation {gen}")
    encoding = 8 / 10 if gen <= 2 else 128 / 130
    return gts[gen] * encoding / 8


@dataclass(frozen=True)
class Tier:
    """One row of gpu-tiers.csv. Rates in TFLOP/s (dense), bandwidth in GB/s, None where the GPU lacks it."""

    name: str
    slug: str
    architecture: str
    compute_capability: tuple[int, int]
    vram_gb: float
    bandwidth_gbs: float
    bf16_tflops: float  # FP32 accumulate (half rate on GeForce)
    fp16_tflops_fp16acc: float
    fp8_tflops: float | None  # FP32 accumulate
    fp8_tflops_fp16acc: float | None
    fp4_tflops: float | None
    int4_tops: float | None
    pcie_gen: int
    pcie_lanes: int
    is_geforce: bool

    @property
    def vram_bytes(self) -> int:
        return int(self.vram_gb * GIB)

    @property
    def has_fp8(self) -> bool:
        """FP8 tensor cores: sm_89 (Ada) and later, and the CSV lists a rate."""
        return self.compute_capability >= (8, 9) and self.fp8_tflops is not None

    @property
    def pcie_gbs(self) -> float:
        """Host link, one direction, after line encoding (PCIe 4.0 x16: 31.5 GB/s)."""
        return self.pcie_lanes * _pcie_lane_gbs(self.pcie_gen)

    def rate_tflops(self, kind: str) -> tuple[float, str | None]:
        """(tensor rate used for a FLOP kind, note when it falls back to another path)."""
        if kind in ("gemm_bf16", "attention_bf16"):
            return self.bf16_tflops, None
        if kind == "gemm_4bit":
            return self.bf16_tflops, None
        if kind in ("gemm_fp8", "attention_fp8"):
            if self.has_fp8:
                return self.fp8_tflops, None
            path = "weight-only FP8 (bf16 MMA + dequant)" if kind == "gemm_fp8" else "bf16 attention"
            sm = "sm_{}{}".format(*self.compute_capability)
            return self.bf16_tflops, f"{kind}: {sm} has no FP8 tensor cores; projected through {path}"
        raise ValueError(f"unknown FLOP kind {kind!r}; valid kinds: {', '.join(FLOP_KINDS)}")


def _slug(name: str) -> str:
    """'GeForce RTX 4070 Ti SUPER 16GB' -> 'rtx4070tisuper', 'H100 SXM5 80GB' -> 'h100'."""
    words = [w for w in name.split() if not re.fullmatch(r"\d+GB|GeForce|Generation|Workstation|SXM\d?", w)]
    return re.sub(r"[^a-z0-9]", "", "".join(words).lower())


def _rate(cell: str) -> float | None:
    cell = cell.strip()
    try:
        return float(cell)
    except ValueError:
        return None  # "none", "n/a (...)"


def _parse_row(row: dict[str, str]) -> Tier:
    name = row["gpu"].strip()
    cc = re.match(r"(\d+)\.(\d+)", row["compute_capability"])
    pcie = re.match(r"PCIe (\d)\.0 x(\d+)", row["pcie"])
    if cc is None or pcie is None:
        raise ValueError(
            f"{name}: cannot parse compute_capability {row['compute_capability']!r} or pcie {row['pcie']!r}"
        )
    bf16 = _rate(row["bf16_dense_tflops_fp32acc"])
    fp16 = _rate(row["fp16_dense_tflops_fp16acc"])
    if bf16 is None or fp16 is None:
        raise ValueError(f"{name}: the CSV must give bf16 and fp16 rates")
    return Tier(
        name=name,
        slug=_slug(name),
        architecture=row["architecture"].strip(),
        compute_capability=(int(cc.group(1)), int(cc.group(2))),
        vram_gb=float(row["vram_gb"]),
        bandwidth_gbs=float(row["memory_bandwidth_gbs"]),
        bf16_tflops=bf16,
        fp16_tflops_fp16acc=fp16,
        fp8_tflops=_rate(row["fp8_dense_tflops_fp32acc"]),
        fp8_tflops_fp16acc=_rate(row["fp8_dense_tflops_fp16acc"]),
        fp4_tflops=_rate(row["fp4_dense_tflops"]),
        int4_tops=_rate(row["int4_dense_tops"]),
        pcie_gen=int(pcie.group(1)),
        pcie_lanes=int(pcie.group(2)),
        is_geforce=name.startswith("GeForce"),
    )


def load_tiers(path=None) -> dict[str, Tier]:
    """All tiers by slug, in CSV order, from the shipped copy of reference/gpu-tiers.csv (or `path`)."""
    if path is None:
        text = resources.files("flux2_bench").joinpath("data/gpu-tiers.csv").read_text(encoding="utf-8")
    else:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    tiers = [_parse_row(r) for r in csv.DictReader(text.splitlines())]
    by_slug = {t.slug: t for t in tiers}
    if len(by_slug) != len(tiers):
        raise ValueError(f"duplicate tier slugs in the CSV: {[t.slug for t in tiers]}")
    return by_slug


def get_tier(slug: str) -> Tier:
    """Exact look-up by slug (`rtx4090`, `h100`); an unknown slug fails listing the valid ones."""
    tiers = load_tiers()
    if slug not in tiers:
        raise ValueError(f"unknown tier {slug!r}; valid tiers: {', '.join(tiers)}")
    return tiers[slug]


# -- workload figures ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class WorkloadFigures:
    """What one configuration (preset x precision x resolution) needs, measured on the GPU at hand.

    Bytes are allocator bytes (no context). Per-phase weights: the text encoder, the transformer split
    into its streamable blocks (execution order: double then single) and the rest (embedders,
    modulation, final layer), the VAE. Activation peaks per phase = that phase's allocator peak minus
    its resident weights. `flops` is one step by kind (`FLOP_KINDS`, see `count_step_flops`);
    `efficiency[kind]` = achieved / the measuring GPU's CSV rate for the kind; an optional
    `efficiency["gemm_fp8_weight_only"]` is used for FP8 GEMMs on tiers without FP8 (else the bf16
    efficiency). `memory_bytes`: per-step traffic of the memory-bound kernels; `memory_efficiency`:
    their achieved / peak bandwidth; `fp8_weight_bytes`: FP8 GEMM weight bytes (dequant term);
    `h2d_efficiency`: pinned host-to-device GB/s measured / the measuring GPU's PCIe rate.
    """

    transformer_block_bytes: tuple[int, ...]
    transformer_other_bytes: int
    flops: dict[str, float]
    efficiency: dict[str, float]
    text_encoder_bytes: int = 0
    vae_bytes: int = 0
    text_encoder_activation_bytes: int = 0
    transformer_activation_bytes: int = 0
    vae_activation_bytes: int = 0
    memory_bytes: float = 0.0
    memory_efficiency: float = 1.0
    fp8_weight_bytes: int = 0
    h2d_efficiency: float = 1.0
    measured_on: str = ""  # tier slug of the GPU that measured the figures

    def __post_init__(self):
        for kind, n in self.flops.items():
            if kind not in FLOP_KINDS:
                raise ValueError(f"unknown FLOP kind {kind!r}; valid kinds: {', '.join(FLOP_KINDS)}")
            if n < 0:
                raise ValueError(f"flops[{kind!r}] = {n} is negative")
            if n > 0 and kind not in self.efficiency:
                raise ValueError(f"flops[{kind!r}] > 0 needs a measured efficiency[{kind!r}]")
        for kind, e in self.efficiency.items():
            if not 0 < e <= 1.5:  # > 1 only if the GPU boosts above the clock the CSV assumes
                raise ValueError(f"efficiency[{kind!r}] = {e} must be in (0, 1.5]")
        for name in ("memory_efficiency", "h2d_efficiency"):
            if not 0 < getattr(self, name) <= 1.5:
                raise ValueError(f"{name} = {getattr(self, name)} must be in (0, 1.5]")
        if not self.transformer_block_bytes:
            raise ValueError("transformer_block_bytes is empty")

    @property
    def transformer_bytes(self) -> int:
        return sum(self.transformer_block_bytes) + self.transformer_other_bytes


def count_step_flops(
    config, n_img: int, n_txt: int, *, gemm: str = "gemm_bf16", attention: str = "attention_bf16", batch: int = 1
) -> dict[str, float]:
    """FLOPs of one transformer forward: GEMM 2·M·N·K over every linear, attention 4·B·H·L²·D per block.

    `config` is a `model.Flux2Config`. All linears are counted under `gemm` (the modulation and
    embedder linears run at M = batch and are a rounding error). FLUX.2-dev at 1024² (4096 + 512
    tokens) gives 253.4 TFLOP of GEMM and 29.2 of attention (reference/method.md).
    """
    if gemm not in ("gemm_bf16", "gemm_fp8", "gemm_4bit") or attention not in ("attention_bf16", "attention_fp8"):
        raise ValueError(f"gemm must be a gemm_* kind and attention an attention_* kind, got {gemm!r}, {attention!r}")
    h, mlp, L = config.hidden_size, config.mlp_hidden, n_img + n_txt
    per_stream = 3 * h * h + h * h + h * 2 * mlp + mlp * h  # qkv, proj, mlp in (SwiGLU x2), mlp out
    single = h * (3 * h + 2 * mlp) + (h + mlp) * h  # linear1, linear2
    lin = 2 * config.depth * L * per_stream + 2 * config.depth_single_blocks * L * single
    lin += 2 * n_img * config.in_channels * h * 2 + 2 * n_txt * config.context_in_dim * h  # img_in, final, txt_in
    n_vec = 2 if config.use_guidance_embed else 1
    vec_params = n_vec * (256 * h + h * h) + (6 + 6 + 3) * h * h + h * 2 * h  # time/guidance, modulations, adaLN
    lin = batch * (lin + 2 * vec_params)
    att = batch * 4 * config.num_heads * L * L * config.head_dim * (config.depth + config.depth_single_blocks)
    return {gemm: float(lin), attention: float(att)}


def kernel_efficiency(achieved_tflops: float, measured_on: Tier, kind: str) -> float:
    """Achieved TFLOP/s over the measuring GPU's CSV rate for `kind`: the number `WorkloadFigures` wants."""
    rate, _ = measured_on.rate_tflops(kind)
    return achieved_tflops / rate


# -- placement -------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Placement:
    """Where the weights live. `allocator_bytes`: peak the caching allocator needs; `device_bytes`: that
    plus the context overhead, the figure a tier's VRAM is compared with."""

    name: str
    allocator_bytes: int
    device_bytes: int
    streamed_bytes_per_step: int  # host -> device per step (stream_blocks)
    swap_bytes_per_image: int  # host -> device per generated image (components moved in for their phase)


def placement_memory(figures: WorkloadFigures, name: str) -> tuple[int, int, int]:
    """(allocator peak, streamed bytes per step, swapped bytes per image) of one candidate.

    resident:              everything on the GPU; peak = all weights + the largest activation peak.
    offload_text_encoder:  the text encoder is on the GPU only while encoding (the transformer and
                           VAE move in afterwards and stay): peak = max(TE + its activations,
                           transformer + VAE + the larger of their activations).
    stream_blocks:         as above, but the transformer blocks stay in pinned host memory and two
                           are on the GPU at a time (the one computing, the one prefetched).
    """
    f = figures
    te = f.text_encoder_bytes + f.text_encoder_activation_bytes
    act = max(f.transformer_activation_bytes, f.vae_activation_bytes)
    if name == "resident":
        all_act = max(act, f.text_encoder_activation_bytes)
        return f.text_encoder_bytes + f.transformer_bytes + f.vae_bytes + all_act, 0, 0
    if name == "offload_text_encoder":
        peak = max(te, f.transformer_bytes + f.vae_bytes + act)
        return peak, 0, f.text_encoder_bytes + f.transformer_bytes + f.vae_bytes
    if name == "stream_blocks":
        in_flight = (
            2 * max(f.transformer_block_bytes) if len(f.transformer_block_bytes) > 1 else f.transformer_block_bytes[0]
        )
        peak = max(te, f.transformer_other_bytes + in_flight + f.vae_bytes + act)
        return peak, sum(f.transformer_block_bytes), f.text_encoder_bytes + f.transformer_other_bytes + f.vae_bytes
    raise ValueError(f"unknown placement {name!r}; valid placements: {', '.join(CANDIDATES)}")


def make_placement(
    figures: WorkloadFigures, name: str, context_overhead_gib: float = DEFAULT_CONTEXT_OVERHEAD_GIB
) -> Placement:
    alloc, streamed, swapped = placement_memory(figures, name)
    return Placement(name, alloc, alloc + int(context_overhead_gib * GIB), streamed, swapped)


def choose_placement(
    figures: WorkloadFigures,
    tier: Tier,
    candidates: tuple[str, ...] = CANDIDATES,
    *,
    context_overhead_gib: float = DEFAULT_CONTEXT_OVERHEAD_GIB,
) -> Placement | None:
    """The fastest candidate whose device-level peak (allocator peak + context overhead) fits the tier's
    VRAM; None when none fits. Fastest = lowest projected step time; candidates within 2 % of it count
    as equally fast (the projection is not that precise), and among those the one that streams fewer
    bytes per step, then swaps fewer per image, then comes first wins: a compute-bound step hides
    streaming in the model, but resident weights need no PCIe at all."""
    fitting = []
    for order, name in enumerate(candidates):
        p = make_placement(figures, name, context_overhead_gib)
        if p.device_bytes <= tier.vram_bytes:
            ms = project_step_ms(figures, tier, p).step_ms
            fitting.append((ms, p.streamed_bytes_per_step, p.swap_bytes_per_image, order, p))
    if not fitting:
        return None
    fastest = min(f[0] for f in fitting)
    return min((f for f in fitting if f[0] <= fastest * 1.02), key=lambda f: f[1:4])[4]


# -- projection ------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Projection:
    """Projected time of one step on a tier; `terms` add up to `step_ms`."""

    tier: str
    placement: str
    step_ms: float
    terms: dict[str, float]
    pcie_ms: float  # all streamed transfers of a step, hidden or not
    swap_ms_per_image: float  # moving components in for their phases, once per image
    notes: tuple[str, ...] = field(default_factory=tuple)
    label: str = "projected"


def project_step_ms(figures: WorkloadFigures, tier: Tier, placement: Placement) -> Projection:
    """Step time on `tier` under `placement` from the measured efficiencies (model in the module docstring)."""
    f = figures
    terms: dict[str, float] = {}
    notes: list[str] = []
    for kind in FLOP_KINDS:
        n = f.flops.get(kind, 0.0)
        if n == 0:
            continue
        rate, note = tier.rate_tflops(kind)
        eff = f.efficiency[kind]
        if note is not None:
            notes.append(note)
            fallback = "gemm_fp8_weight_only" if kind == "gemm_fp8" else "attention_bf16"
            if fallback in f.efficiency:
                eff = f.efficiency[fallback]
            elif kind == "gemm_fp8" and "gemm_bf16" in f.efficiency:
                eff = f.efficiency["gemm_bf16"]
                notes.append("gemm_fp8: weight-only efficiency not measured; used the bf16 GEMM efficiency")
            else:
                notes.append(f"{kind}: no efficiency measured for the fallback; kept the {kind} one")
        terms[f"compute_{kind}"] = n / (rate * 1e12 * eff) * 1e3
        if kind == "gemm_fp8" and note is not None:
            terms["dequant"] = f.fp8_weight_bytes / (tier.bandwidth_gbs * 1e9 * f.memory_efficiency) * 1e3
    if f.memory_bytes:
        terms["memory"] = f.memory_bytes / (tier.bandwidth_gbs * 1e9 * f.memory_efficiency) * 1e3
    on_gpu = sum(terms.values())

    link = tier.pcie_gbs * 1e9 * f.h2d_efficiency  # B/s
    pcie_ms = 0.0
    if placement.streamed_bytes_per_step:
        blocks = f.transformer_block_bytes
        total = sum(blocks)
        c = [on_gpu * b / total for b in blocks]
        p = [b / link * 1e3 for b in blocks]
        n = len(blocks)
        streamed = sum(max(c[i], p[(i + 1) % n]) for i in range(n))
        terms["pcie_exposed"] = streamed - on_gpu
        pcie_ms = sum(p)
        notes.append(f"blocks streamed over PCIe {tier.pcie_gen}.0 x{tier.pcie_lanes} at {link / 1e9:.1f} GB/s")
    return Projection(
        tier=tier.slug,
        placement=placement.name,
        step_ms=sum(terms.values()),
        terms=terms,
        pcie_ms=pcie_ms,
        swap_ms_per_image=placement.swap_bytes_per_image / link * 1e3,
        notes=tuple(notes),
    )
