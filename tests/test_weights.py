"""Loading, saving and synthesizing transformer weights; every loader error has a case."""

import json
import subprocess
import sys
import textwrap
from dataclasses import replace

import pytest
import torch

from flux2_bench.model import PRESETS
from flux2_bench.safetensors_io import CheckpointError, SafetensorsReader, SafetensorsWriter, save_streaming
from flux2_bench.weights import (
    COMFY_PREFIX,
    load_transformer,
    save_transformer,
    synthetic_transformer,
    transformer_state,
)


@pytest.fixture(scope="module")
def tiny():
    return synthetic_transformer("tiny", dtype=torch.float32, seed=7)


def _same_weights(a, b) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert torch.equal(sa[k], sb[k]), k


def test_bfl_round_trip_is_exact(tmp_path, tiny):
    save_transformer(tiny, tmp_path / "flux.safetensors")
    back = load_transformer(tmp_path / "flux.safetensors", dtype=torch.float32, progress=False)
    assert back.config == tiny.config
    _same_weights(tiny, back)


def test_diffusers_round_trip_is_exact_and_readable_by_diffusers(tmp_path, tiny):
    from diffusers import Flux2Transformer2DModel

    save_transformer(tiny, tmp_path / "transformer", layout="diffusers")
    back = load_transformer(tmp_path / "transformer", dtype=torch.float32, progress=False)
    _same_weights(tiny, back)
    theirs = Flux2Transformer2DModel.from_pretrained(tmp_path / "transformer")
    want = transformer_state(tiny, "diffusers")
    got = theirs.state_dict()
    assert got.keys() == want.keys()
    assert all(torch.equal(got[k], want[k]) for k in want)
    # BFL -> diffusers -> BFL through files
    save_transformer(back, tmp_path / "again.safetensors")
    _same_weights(tiny, load_transformer(tmp_path / "again.safetensors", dtype=torch.float32, progress=False))


def test_comfy_prefix_and_sharded_index(tmp_path, tiny):
    state = {COMFY_PREFIX + k: v for k, v in tiny.state_dict().items()}
    save_streaming(tmp_path / "comfy.safetensors", state)
    _same_weights(tiny, load_transformer(tmp_path / "comfy.safetensors", dtype=torch.float32, progress=False))

    keys = list(tiny.state_dict())
    shards = {"model-00001-of-00002.safetensors": keys[::2], "model-00002-of-00002.safetensors": keys[1::2]}
    sd = tiny.state_dict()
    for name, ks in shards.items():
        save_streaming(tmp_path / "sharded" / name, {k: sd[k] for k in ks})
    index = {"metadata": {}, "weight_map": {k: n for n, ks in shards.items() for k in ks}}
    (tmp_path / "sharded" / "model.safetensors.index.json").write_text(json.dumps(index))
    _same_weights(tiny, load_transformer(tmp_path / "sharded", dtype=torch.float32, progress=False))


def test_loads_in_target_dtype_and_infers_preset(tmp_path, tiny):
    save_transformer(tiny, tmp_path / "f.safetensors")
    m = load_transformer(tmp_path / "f.safetensors", dtype=torch.bfloat16, progress=False)
    assert m.config == PRESETS["tiny"]
    assert all(p.dtype == torch.bfloat16 for p in m.parameters())
    with pytest.raises(CheckpointError, match="not 'flux.2-klein-4b'.*hidden_size: 3072 vs 128"):
        load_transformer(tmp_path / "f.safetensors", preset="flux.2-klein-4b", progress=False)


def test_truncated_file(tmp_path, tiny):
    save_transformer(tiny, tmp_path / "f.safetensors")
    data = (tmp_path / "f.safetensors").read_bytes()
    (tmp_path / "cut.safetensors").write_bytes(data[: len(data) - 1000])
    with pytest.raises(CheckpointError, match="truncated"):
        load_transformer(tmp_path / "cut.safetensors", progress=False)
    (tmp_path / "tiny.safetensors").write_bytes(data[:5])
    with pytest.raises(CheckpointError, match="no header"):
        load_transformer(tmp_path / "tiny.safetensors", progress=False)


def test_corrupt_header(tmp_path):
    (tmp_path / "bad.safetensors").write_bytes((64).to_bytes(8, "little") + b"{not json" + b" " * 100)
    with pytest.raises(CheckpointError, match="corrupt safetensors header"):
        load_transformer(tmp_path / "bad.safetensors", progress=False)


def test_missing_unexpected_and_wrong_shape_are_listed_together(tmp_path, tiny):
    sd = dict(tiny.state_dict())
    del sd["single_blocks.1.linear2.weight"]
    del sd["img_in.weight"]
    sd["double_blocks.0.img_attn.proj.weight"] = torch.zeros(128, 64)
    sd["extra.weight"] = torch.zeros(3)
    save_streaming(tmp_path / "f.safetensors", sd)
    with pytest.raises(CheckpointError) as e:
        load_transformer(tmp_path / "f.safetensors", progress=False)
    msg = str(e.value)
    # img_in is gone, so the architecture cannot be inferred: name it, and with a preset list all
    assert "img_in.weight" in msg
    with pytest.raises(CheckpointError) as e:
        sd["img_in.weight"] = torch.zeros(128, 32)
        save_streaming(tmp_path / "g.safetensors", sd)
        load_transformer(tmp_path / "g.safetensors", preset="tiny", progress=False)
    msg = str(e.value)
    assert "missing key: single_blocks.1.linear2.weight" in msg
    assert "unexpected key: extra.weight" in msg
    assert "shape mismatch: double_blocks.0.img_attn.proj.weight is [128, 64], expected [128, 128]" in msg
    assert "3 problem(s)" in msg


def test_wrong_dtype_is_refused(tmp_path, tiny):
    sd = dict(tiny.state_dict())
    sd["img_in.weight"] = sd["img_in.weight"].to(torch.float8_e4m3fn)
    save_streaming(tmp_path / "f.safetensors", sd)
    with pytest.raises(CheckpointError, match="dtype mismatch: img_in.weight is torch.float8_e4m3fn"):
        load_transformer(tmp_path / "f.safetensors", progress=False)


@pytest.mark.parametrize("suffix", [".pt", ".ckpt", ".bin"])
def test_pickle_is_refused(tmp_path, suffix):
    path = tmp_path / f"model{suffix}"
    torch.save({"x": torch.zeros(1)}, path)
    with pytest.raises(CheckpointError, match="refusing to read a pickle"):
        load_transformer(path, progress=False)


def test_folder_with_only_pickles_says_why(tmp_path):
    torch.save({"x": torch.zeros(1)}, tmp_path / "diffusion_pytorch_model.bin")
    with pytest.raises(CheckpointError, match="only safetensors are read"):
        load_transformer(tmp_path, progress=False)


def test_unknown_format(tmp_path):
    (tmp_path / "model.gguf").write_bytes(b"GGUF....")
    with pytest.raises(CheckpointError, match="unknown checkpoint format '.gguf'"):
        load_transformer(tmp_path / "model.gguf", progress=False)
    save_streaming(tmp_path / "other.safetensors", {"encoder.conv_in.weight": torch.zeros(4, 3, 3, 3)})
    with pytest.raises(CheckpointError, match="unknown architecture"):
        load_transformer(tmp_path / "other.safetensors", progress=False)
    with pytest.raises(CheckpointError, match="no such file"):
        load_transformer(tmp_path / "nope.safetensors", progress=False)


def test_writer_leaves_nothing_on_failure(tmp_path):
    layout = {"a": (torch.float32, (4,)), "b": (torch.float32, (2,))}
    with (
        pytest.raises(RuntimeError, match="1 declared tensors unwritten"),
        SafetensorsWriter(tmp_path / "x.safetensors", layout) as w,
    ):
        w.write("a", torch.ones(4))
    assert list(tmp_path.iterdir()) == []
    with SafetensorsWriter(tmp_path / "x.safetensors", layout, {"k": "v"}) as w:
        w.write("a", torch.ones(4))
        w.write("b", torch.zeros(2))
    r = SafetensorsReader(tmp_path / "x.safetensors")
    assert r.metadata == {"k": "v"} and torch.equal(r.read("a"), torch.ones(4))
    from safetensors.torch import load_file  # the reference implementation reads our files

    assert torch.equal(load_file(tmp_path / "x.safetensors")["b"], torch.zeros(2))


LOAD_AND_MEASURE = textwrap.dedent(
    """
    import json, resource, sys, torch
    from flux2_bench.weights import load_transformer, model_bytes
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    m = load_transformer(sys.argv[1], device="cpu", dtype=torch.bfloat16, progress=False)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    print(json.dumps({"base": base, "peak": peak, "model": model_bytes(m)}))
    """
)


def test_loading_streams_with_bounded_host_memory(tmp_path):
    """A 2.3 GB bf16 checkpoint loads to CPU with host memory beyond the model itself bounded by
    2 x largest tensor + 512 MB (the model's own bytes are the destination, not overhead)."""
    cfg = replace(PRESETS["flux.2-klein-4b"], depth=1, depth_single_blocks=6, context_in_dim=3072, in_channels=128)
    with torch.device("meta"):
        from flux2_bench.model import Flux2

        shapes = {k: tuple(v.shape) for k, v in Flux2(cfg).state_dict().items()}
    layout = {k: (torch.bfloat16, s) for k, s in shapes.items()}
    path = tmp_path / "big.safetensors"
    with SafetensorsWriter(path, layout) as w:
        for k, s in shapes.items():
            w.write(k, torch.full(s, 0.01, dtype=torch.bfloat16))
    size = path.stat().st_size
    largest = max(torch.Size(s).numel() * 2 for s in shapes.values())
    assert size > 2e9
    out = subprocess.run([sys.executable, "-c", LOAD_AND_MEASURE, str(path)], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-2000:]
    r = json.loads(out.stdout.strip().splitlines()[-1])
    overhead = r["peak"] - r["base"] - r["model"]
    bound = 2 * largest + 512 * 2**20
    assert overhead < bound, (
        f"loading a {size / 1e9:.2f} GB file used {overhead / 2**20:.0f} MiB beyond the model, "
        f"bound {bound / 2**20:.0f} MiB"
    )
