"""Tier table, placement choice and latency projection: pure functions, checked against hand-worked examples.

Every expected number below is worked out in the comments from the CSV figures, not by calling the code.
"""

from __future__ import annotations

import csv
from pathlib import Path

import pytest

from flux2_bench.model import get_preset
from flux2_bench.tiers import (
    CANDIDATES,
    GIB,
    WorkloadFigures,
    choose_placement,
    count_step_flops,
    get_tier,
    kernel_efficiency,
    load_tiers,
    make_placement,
    placement_memory,
    project_step_ms,
)

REFERENCE_CSV = Path("/work/shared/reference/gpu-tiers.csv")
SHIPPED_CSV = Path(__file__).resolve().parents[1] / "flux2_bench" / "data" / "gpu-tiers.csv"


# -- the table ---------------------------------------------------------------------------------------------


def test_table_parses_every_row_with_unique_slugs():
    tiers = load_tiers()
    with open(SHIPPED_CSV, encoding="utf-8") as f:
        n_rows = sum(1 for _ in csv.DictReader(f))
    assert len(tiers) == n_rows == 17
    assert {"rtx3060", "rtx4060ti", "rtx4070tisuper", "rtx4090", "rtx5090", "rtx6000ada", "h100", "h200"} <= set(tiers)


@pytest.mark.skipif(not REFERENCE_CSV.exists(), reason="the shared reference folder is only on the dev machines")
def test_shipped_csv_is_the_reference_copy():
    assert SHIPPED_CSV.read_bytes() == REFERENCE_CSV.read_bytes()


def test_rtx4090_row():
    t = get_tier("rtx4090")
    assert t.name == "GeForce RTX 4090 24GB" and t.is_geforce
    assert t.compute_capability == (8, 9) and t.has_fp8
    assert (t.vram_gb, t.bandwidth_gbs, t.bf16_tflops, t.fp8_tflops) == (24, 1008, 165.2, 330.3)
    assert t.vram_bytes == 24 * 2**30
    # PCIe 4.0 x16: 16 GT/s x 128/130 / 8 = 1.9692 GB/s per lane, x16 = 31.508 GB/s
    assert t.pcie_gbs == pytest.approx(31.508, abs=1e-3)


def test_fp8_availability_follows_compute_capability():
    tiers = load_tiers()
    for t in tiers.values():
        assert t.has_fp8 == (t.compute_capability >= (8, 9)), t.slug
    assert not get_tier("rtx3090").has_fp8 and get_tier("rtx3090").fp8_tflops is None
    assert get_tier("rtx5090").compute_capability == (12, 0) and get_tier("rtx5090").has_fp8
    assert get_tier("h100").fp4_tflops is None and get_tier("rtx5090").fp4_tflops == 1676.0


def test_geforce_bf16_fp32acc_is_half_the_fp16acc_rate():
    # the CSV's *_fp32acc column must carry the GeForce half rate (4090: 165.2 vs 330.3); workstation and
    # data-center parts run FP32 accumulate at full rate (RTX 6000 Ada: 364.2 = 364.2)
    for t in load_tiers().values():
        ratio = t.bf16_tflops / t.fp16_tflops_fp16acc
        assert ratio == pytest.approx(0.5 if t.is_geforce else 1.0, rel=2e-3), (t.slug, ratio)


def test_pcie_lanes_and_generations():
    # 4060 Ti: PCIe 4.0 x8 = 8 x 1.9692 = 15.754 GB/s; 5090: PCIe 5.0 x16 = 16 x 3.9385 = 63.015 GB/s
    assert get_tier("rtx4060ti").pcie_gbs == pytest.approx(15.754, abs=1e-3)
    assert get_tier("rtx5090").pcie_gbs == pytest.approx(63.015, abs=1e-3)
    assert get_tier("h100").pcie_gbs == pytest.approx(63.015, abs=1e-3)  # host link only; NVLink is GPU-GPU


def test_get_tier_is_exact_and_lists_valid_slugs():
    with pytest.raises(ValueError, match="valid tiers: rtx3060, rtx3080") as e:
        get_tier("RTX4090")
    assert "rtx4090" in str(e.value)
    with pytest.raises(ValueError, match="unknown tier"):
        get_tier("4090")


def test_unknown_flop_kind_is_refused():
    with pytest.raises(ValueError, match="unknown FLOP kind 'gemm_int8'"):
        get_tier("h100").rate_tflops("gemm_int8")
    with pytest.raises(ValueError, match="unknown FLOP kind"):
        WorkloadFigures((1,), 0, flops={"gemm_int8": 1.0}, efficiency={"gemm_int8": 0.5})
    with pytest.raises(ValueError, match="needs a measured efficiency"):
        WorkloadFigures((1,), 0, flops={"gemm_bf16": 1.0}, efficiency={})
    with pytest.raises(ValueError, match="must be in"):
        WorkloadFigures((1,), 0, flops={}, efficiency={"gemm_bf16": 0.0})


# -- FLOP count ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "n_img, gemm_tflop, attn_tflop",
    [(4096, 253.4, 29.2), (8192, 478.5, 104.3), (16384, 928.8, 392.9)],  # reference/method.md "Count first"
)
def test_step_flops_match_the_method_table(n_img, gemm_tflop, attn_tflop):
    f = count_step_flops(get_preset("flux.2-dev"), n_img, 512)
    assert f["gemm_bf16"] / 1e12 == pytest.approx(gemm_tflop, abs=0.05)
    assert f["attention_bf16"] / 1e12 == pytest.approx(attn_tflop, abs=0.05)


def test_kernel_efficiency_is_achieved_over_the_csv_rate():
    # the H100 anchor bf16 GEMM 8192^3 at 764 TFLOP/s over the CSV's 989.4: 764 / 989.4 = 0.7722
    assert kernel_efficiency(764.0, get_tier("h100"), "gemm_bf16") == pytest.approx(0.7722, abs=1e-4)
    # FP8 _scaled_mm 1378 over 1978.9 = 0.6963
    assert kernel_efficiency(1378.0, get_tier("h100"), "gemm_fp8") == pytest.approx(0.6963, abs=1e-4)


# -- placement ----------------------------------------------------------------------------------------------


def _figures(**kw) -> WorkloadFigures:
    base = dict(
        transformer_block_bytes=(4 * GIB,) * 4,  # 16 GiB of blocks
        transformer_other_bytes=1 * GIB,
        text_encoder_bytes=8 * GIB,
        vae_bytes=GIB // 2,
        text_encoder_activation_bytes=1 * GIB,
        transformer_activation_bytes=2 * GIB,
        vae_activation_bytes=3 * GIB,
        flops={"gemm_bf16": 8.26e12},
        efficiency={"gemm_bf16": 0.5},
        h2d_efficiency=0.8,
    )
    base.update(kw)
    return WorkloadFigures(**base)


def test_placement_memory_by_hand():
    f = _figures()
    # resident: TE 8 + transformer (16 + 1) + VAE 0.5 + largest activation max(1, 2, 3) = 3 -> 28.5 GiB
    assert placement_memory(f, "resident") == (int(28.5 * GIB), 0, 0)
    # TE offloaded: max(TE 8 + 1, transformer 17 + VAE 0.5 + max(2, 3)) = max(9, 20.5) = 20.5 GiB;
    # every image moves TE + transformer + VAE in once: 8 + 17 + 0.5 = 25.5 GiB
    assert placement_memory(f, "offload_text_encoder") == (int(20.5 * GIB), 0, int(25.5 * GIB))
    # streamed: max(9, other 1 + two blocks 8 + VAE 0.5 + 3) = 12.5 GiB; 16 GiB streamed per step;
    # per image: TE 8 + other 1 + VAE 0.5 = 9.5 GiB
    assert placement_memory(f, "stream_blocks") == (int(12.5 * GIB), 16 * GIB, int(9.5 * GIB))
    with pytest.raises(ValueError, match="valid placements: resident"):
        placement_memory(f, "disk")


@pytest.mark.parametrize(
    "slug, overhead_gib, expected",
    [
        ("rtx5090", 1.0, "resident"),  # 28.5 + 1 = 29.5 <= 32: resident; same step time, nothing swapped
        ("rtx4090", 1.0, "offload_text_encoder"),  # 29.5 > 24; 20.5 + 1 = 21.5 <= 24
        ("rtx4090", 4.0, "stream_blocks"),  # 20.5 + 4 = 24.5 > 24; 12.5 + 4 = 16.5 <= 24
        ("rtx4080", 1.0, "stream_blocks"),  # 21.5 > 16; 13.5 <= 16
        ("rtx4060ti", 3.5, "stream_blocks"),  # 12.5 + 3.5 = 16.0 <= 16: the boundary fits
        ("rtx4060ti", 3.6, None),  # 16.1 > 16: nothing fits
        ("rtx3060", 1.0, None),  # 13.5 > 12: nothing fits -> "does not fit" recorded, no crash
    ],
)
def test_choose_placement(slug, overhead_gib, expected):
    p = choose_placement(_figures(), get_tier(slug), context_overhead_gib=overhead_gib)
    assert (p.name if p else None) == expected
    if p is not None:
        assert p.device_bytes == p.allocator_bytes + int(overhead_gib * GIB)


def test_choose_placement_respects_the_candidate_list():
    f = _figures()
    assert choose_placement(f, get_tier("rtx4080"), ("resident", "offload_text_encoder")) is None
    assert choose_placement(f, get_tier("rtx5090"), ("stream_blocks",)).name == "stream_blocks"


def test_choose_placement_prefers_the_faster_when_both_fit():
    # on an H100 (80 GiB) everything fits: resident wins over streaming because streaming exposes PCIe
    # time (below) and over TE offload because it swaps nothing per image
    assert choose_placement(_figures(), get_tier("h100")).name == "resident"


def test_choose_placement_keeps_weights_resident_when_streaming_is_hidden():
    # compute-bound: 1 GB blocks stream in 39.7 ms each behind 100 ms of compute per block, so
    # resident and streamed project the same 400 ms; resident moves nothing over PCIe and wins
    # (the first H100 harness run picked streaming on such ties)
    f = _figures(transformer_block_bytes=(10**9,) * 4, flops={"gemm_bf16": 4 * 8.26e12}, text_encoder_bytes=0)
    tier = get_tier("rtx4090")
    times = {c: project_step_ms(f, tier, make_placement(f, c)).step_ms for c in ("resident", "stream_blocks")}
    assert times["resident"] == pytest.approx(times["stream_blocks"])
    assert choose_placement(f, tier).name == "resident"


# -- projection: worked examples ----------------------------------------------------------------------------


def test_projection_compute_and_memory_terms_rtx4090():
    f = _figures(
        flops={"gemm_bf16": 100e12, "attention_bf16": 10e12},
        efficiency={"gemm_bf16": 0.5, "attention_bf16": 0.4},
        memory_bytes=20e9,
        memory_efficiency=0.8,
    )
    p = project_step_ms(f, get_tier("rtx4090"), make_placement(f, "resident"))
    # GEMM: 100e12 / (165.2e12 x 0.5) = 1.210654 s = 1210.654 ms
    assert p.terms["compute_gemm_bf16"] == pytest.approx(1210.654, abs=1e-3)
    # attention: 10e12 / (165.2e12 x 0.4) = 0.151332 s = 151.332 ms
    assert p.terms["compute_attention_bf16"] == pytest.approx(151.332, abs=1e-3)
    # memory-bound: 20e9 B / (1008e9 B/s x 0.8) = 24.802 ms
    assert p.terms["memory"] == pytest.approx(24.802, abs=1e-3)
    # summed, nothing streamed: 1210.654 + 151.332 + 24.802 = 1386.788 ms
    assert p.step_ms == pytest.approx(1386.788, abs=2e-3)
    assert set(p.terms) == {"compute_gemm_bf16", "compute_attention_bf16", "memory"}
    assert p.label == "projected" and p.tier == "rtx4090" and p.placement == "resident" and p.notes == ()


def test_projection_fp8_on_sm89_uses_the_fp8_rate():
    f = _figures(flops={"gemm_fp8": 100e12}, efficiency={"gemm_fp8": 0.6, "gemm_bf16": 0.5}, fp8_weight_bytes=32e9)
    p = project_step_ms(f, get_tier("rtx4090"), make_placement(f, "resident"))
    # 100e12 / (330.3e12 x 0.6) = 0.504592 s; FP8 tensor cores on sm_89: no dequant term
    assert p.terms == {"compute_gemm_fp8": pytest.approx(504.592, abs=1e-3)}


def test_projection_fp8_on_ampere_goes_through_the_weight_only_path():
    f = _figures(
        flops={"gemm_fp8": 100e12},
        efficiency={"gemm_fp8": 0.6, "gemm_bf16": 0.5},
        fp8_weight_bytes=32e9,
        memory_efficiency=0.8,
    )
    p = project_step_ms(f, get_tier("rtx3090"), make_placement(f, "resident"))
    # sm_86 has no FP8: bf16 rate 71.2 with the bf16 efficiency 0.5: 100e12 / (71.2e12 x 0.5) = 2.808989 s
    assert p.terms["compute_gemm_fp8"] == pytest.approx(2808.989, abs=1e-3)
    # dequant: one read of 32e9 FP8 weight bytes at 936 GB/s x 0.8: 32e9 / 748.8e9 = 42.735 ms
    assert p.terms["dequant"] == pytest.approx(42.735, abs=1e-3)
    assert p.step_ms == pytest.approx(2851.724, abs=2e-3)
    assert any("sm_86 has no FP8 tensor cores" in n and "weight-only" in n for n in p.notes), p.notes
    # a measured weight-only efficiency takes precedence: 100e12 / (71.2e12 x 0.4) = 3.511236 s
    f2 = _figures(flops={"gemm_fp8": 100e12}, efficiency={"gemm_fp8": 0.6, "gemm_fp8_weight_only": 0.4})
    assert project_step_ms(f2, get_tier("rtx3090"), make_placement(f2, "resident")).terms[
        "compute_gemm_fp8"
    ] == pytest.approx(3511.236, abs=1e-3)


def test_projection_4bit_and_fp8_attention():
    f = _figures(
        flops={"gemm_4bit": 50e12, "attention_fp8": 10e12},
        efficiency={"gemm_4bit": 0.4, "attention_fp8": 0.5, "attention_bf16": 0.45},
    )
    # 4-bit weights: bf16 rate on every tier. RTX 5090: 50e12 / (209.5e12 x 0.4) = 0.596659 s
    p = project_step_ms(f, get_tier("rtx5090"), make_placement(f, "resident"))
    assert p.terms["compute_gemm_4bit"] == pytest.approx(596.659, abs=1e-3)
    # FP8 attention on sm_120 at the FP8 rate: 10e12 / (419.0e12 x 0.5) = 47.733 ms
    assert p.terms["compute_attention_fp8"] == pytest.approx(47.733, abs=1e-3)
    # RTX 3060 (sm_86): attention falls back to bf16 with the bf16 efficiency: 10e12 / (25.5e12 x 0.45) = 871.460 ms
    q = project_step_ms(f, get_tier("rtx3060"), make_placement(f, "resident"))
    assert q.terms["compute_attention_fp8"] == pytest.approx(871.460, abs=1e-3)
    assert any("bf16 attention" in n for n in q.notes)


def test_projection_streaming_is_pcie_bound():
    # on-GPU time: 8.26e12 / (165.2e12 x 0.5) = 100 ms, 25 ms per 4 GiB block
    f = _figures(transformer_block_bytes=(10**9,) * 4)
    p = project_step_ms(f, get_tier("rtx4090"), make_placement(f, "stream_blocks"))
    # link: 31.508 GB/s x 0.8 = 25.206 GB/s; a 1e9-byte block takes 1e9 / 25.206e9 = 39.673 ms
    # each block: max(25, 39.673) = 39.673; 4 x 39.673 = 158.692 ms; exposed = 158.692 - 100 = 58.692
    assert p.terms["compute_gemm_bf16"] == pytest.approx(100.0, abs=1e-9)
    assert p.terms["pcie_exposed"] == pytest.approx(58.692, abs=1e-3)
    assert p.step_ms == pytest.approx(158.692, abs=1e-3)
    assert p.pcie_ms == pytest.approx(158.692, abs=1e-3)
    # the per-image swap of TE + other + VAE = 8 + 1 + 0.5 GiB = 10200547328 B / 25.206e9 = 404.68 ms
    assert p.swap_ms_per_image == pytest.approx(404.68, abs=0.01)


def test_projection_streaming_hides_behind_compute():
    # 400 ms on GPU = 100 ms per block > 39.673 ms per copy: fully hidden, exposed 0
    f = _figures(transformer_block_bytes=(10**9,) * 4, flops={"gemm_bf16": 4 * 8.26e12})
    p = project_step_ms(f, get_tier("rtx4090"), make_placement(f, "stream_blocks"))
    assert p.terms["pcie_exposed"] == pytest.approx(0.0, abs=1e-9)
    assert p.step_ms == pytest.approx(400.0, abs=1e-9)


def test_projection_streaming_uneven_blocks():
    # blocks 2e9, 1e9, 1e9 bytes; 200 ms on GPU split by bytes: c = (100, 50, 50) ms
    # copies at 25.206 GB/s: p = (79.346, 39.673, 39.673) ms
    # block 0 computes while block 1 copies: max(100, 39.673) = 100
    # block 1 while block 2 copies:          max(50, 39.673)  = 50
    # block 2 while block 0 (next step):     max(50, 79.346)  = 79.346
    # step = 229.346 ms, exposed 29.346 ms
    f = _figures(transformer_block_bytes=(2 * 10**9, 10**9, 10**9), flops={"gemm_bf16": 2 * 8.26e12})
    p = project_step_ms(f, get_tier("rtx4090"), make_placement(f, "stream_blocks"))
    assert p.terms["pcie_exposed"] == pytest.approx(29.346, abs=1e-3)
    assert p.step_ms == pytest.approx(229.346, abs=1e-3)


def test_every_candidate_is_projected():
    f = _figures()
    for name in CANDIDATES:
        p = project_step_ms(f, get_tier("rtx4090"), make_placement(f, name))
        assert p.step_ms > 0 and p.label == "projected"
