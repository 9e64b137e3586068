"""Placement mechanisms on CPU (logic: transfer order, outputs unchanged, memory bound); GPU check marked."""

from __future__ import annotations

import pytest
import torch

from flux2_bench.offload import BlockStreamer, PinnedModule, offload_between_phases, to_pinned_host
from flux2_bench.sampling import image_ids, text_ids
from flux2_bench.weights import synthetic_transformer


def _inputs(cfg, device="cpu", dtype=torch.float32, n_txt=5):
    g = torch.Generator().manual_seed(1)
    img = torch.randn(1, 16, cfg.in_channels, generator=g, dtype=dtype).to(device)
    txt = torch.randn(1, n_txt, cfg.context_in_dim, generator=g, dtype=dtype).to(device)
    t = torch.tensor([0.7], dtype=dtype, device=device)
    guid = torch.tensor([4.0], dtype=dtype, device=device) if cfg.use_guidance_embed else None
    return img, image_ids(4, 4, device=device), txt, text_ids(n_txt, device=device), t, guid


def _first_mismatch(a, b) -> str:
    diff = (a != b).nonzero()
    return f"{len(diff)} of {a.numel()} differ; first at {diff[:3].tolist()}"


def test_pinned_module_round_trip_keeps_values_and_parks_on_host():
    lin = torch.nn.Sequential(torch.nn.Linear(7, 5), torch.nn.LayerNorm(5), torch.nn.BatchNorm1d(5))
    before = {k: v.clone() for k, v in lin.state_dict().items()}
    pm = PinnedModule(lin, pin=False)
    # 512-byte aligned pieces: every tensor starts at a multiple of 512 in one flat buffer
    assert all(off % 512 == 0 for *_, off, _ in pm.entries) and pm.nbytes == 512 * len(pm.entries)
    host_ptr = lin[0].weight.data_ptr()
    assert pm.host.data_ptr() <= host_ptr < pm.host.data_ptr() + pm.nbytes
    buf = pm.to_device("cpu")
    assert pm.on_device and buf.data_ptr() <= lin[0].weight.data_ptr() < buf.data_ptr() + pm.nbytes
    for k, v in lin.state_dict().items():  # buffers (running_mean, num_batches_tracked) travel too
        assert torch.equal(v, before[k]), k
    pm.to_host()
    assert not pm.on_device and lin[0].weight.data_ptr() == host_ptr
    assert isinstance(lin[0].weight, torch.nn.Parameter)  # parameters stay Parameters


def test_offload_between_phases_moves_for_the_body_only():
    lin = torch.nn.Linear(8, 8)
    x = torch.randn(2, 8)
    ref = lin(x)
    pm = to_pinned_host(lin)
    assert to_pinned_host(lin) is pm  # idempotent
    host_ptr = lin.weight.data_ptr()
    with offload_between_phases(lin, "cpu"):
        assert pm.on_device and lin.weight.data_ptr() != host_ptr
        assert torch.equal(lin(x), ref)
    assert not pm.on_device and lin.weight.data_ptr() == host_ptr


def test_block_streamer_order_and_outputs_on_cpu():
    model = synthetic_transformer("tiny", dtype=torch.float32, seed=3)
    inputs = _inputs(model.config)
    with torch.no_grad():
        ref = model(*inputs)
        with BlockStreamer(model, "cpu") as s:
            n = len(s.blocks)
            assert n == model.config.depth + model.config.depth_single_blocks == 4
            out1 = model(*inputs)
            out2 = model(*inputs)
    assert torch.equal(out1, ref), _first_mismatch(out1, ref)
    assert torch.equal(out2, ref), _first_mismatch(out2, ref)
    # step 1: block 0 is loaded on demand; every later block was prefetched while the previous one ran,
    # and the last block prefetches block 0 for the next step
    step1 = [("load", 0), ("prefetch", 1), ("release", 0)]
    for i in range(1, n):
        step1 += [("wait", i), ("prefetch", (i + 1) % n), ("release", i)]
    step2 = [("wait", 0), ("prefetch", 1), ("release", 0)] + step1[3:]
    assert s.log == step1 + step2, s.log
    assert s.max_on_device == 2
    assert not any(pm.on_device for pm in s.pinned)  # remove() parked block 0's prefetch too
    # hooks are gone: a further forward logs nothing and still matches
    with torch.no_grad():
        assert torch.equal(model(*inputs), ref)
    assert len(s.log) == 6 * n


def test_block_streamer_without_prefetch_loads_each_block_itself():
    model = synthetic_transformer("tiny", dtype=torch.float32, seed=3)
    inputs = _inputs(model.config)
    with torch.no_grad():
        ref = model(*inputs)
        with BlockStreamer(model, "cpu", prefetch=False) as s:
            out = model(*inputs)
    assert torch.equal(out, ref)
    assert s.log == [(e, i) for i in range(4) for e in ("load", "release")]
    assert s.max_on_device == 1
    assert s.block_bytes == [pm.nbytes for pm in s.pinned] and all(b > 0 for b in s.block_bytes)


def test_block_streamer_needs_blocks():
    class NoBlocks(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.double_blocks = torch.nn.ModuleList()
            self.single_blocks = torch.nn.ModuleList()

    with pytest.raises(ValueError, match="no double_blocks"):
        BlockStreamer(NoBlocks(), "cpu")


@pytest.mark.gpu
def test_block_streamer_bitwise_on_gpu():
    model = synthetic_transformer("tiny", device="cuda", dtype=torch.bfloat16, seed=3)
    inputs = _inputs(model.config, device="cuda", dtype=torch.bfloat16)
    with torch.no_grad():
        ref = model(*inputs)
        with BlockStreamer(model, "cuda") as s:
            assert all(pm.host.is_pinned() for pm in s.pinned)
            outs = [model(*inputs) for _ in range(3)]
    for out in outs:
        assert torch.equal(out, ref), _first_mismatch(out, ref)
    assert s.max_on_device == 2
