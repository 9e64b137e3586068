"""flux2-quantize convert / verify / inspect: conventions, interop (ComfyUI, diffusers + bitsandbytes),
bounded memory on a multi-GB file, kill safety, and every bad input."""

import dataclasses
import json
import os
import signal
import struct
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from flux2_bench.cli import quantize_main
from flux2_bench.model import Flux2, get_preset
from flux2_bench.quantize import convert as C
from flux2_bench.quantize.convert import convert, quantize_streaming
from flux2_bench.quantize.recipes import Recipe, dequantize_layer, get_recipe, quantize_layer
from flux2_bench.quantize.verify import inspect_checkpoint, verify
from flux2_bench.safetensors_io import SafetensorsReader, SafetensorsWriter, save_streaming
from flux2_bench.weights import save_transformer, synthetic_transformer

BIN = Path(sys.executable).parent


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    d = tmp_path_factory.mktemp("tiny")
    m = synthetic_transformer("tiny", dtype=torch.bfloat16, seed=1)
    save_transformer(m, d / "flux.safetensors")
    save_transformer(m, d / "diffusers", layout="diffusers")
    return d


def _listing(d: Path) -> list[str]:
    return sorted(p.name for p in d.iterdir())


@pytest.mark.parametrize("recipe", list(Recipe), ids=str)
def test_convert_bfl_verify_inspect(tiny, tmp_path, recipe):
    out = tmp_path / "q.safetensors"
    res = convert(tiny / "flux.safetensors", out, recipe=recipe, progress=False)
    assert res.files == [out] and _listing(tmp_path) == ["q.safetensors"], "no temporaries may remain"
    # 2 double blocks x 8 linears + 2 single blocks x 2; embedders, modulation, final layer kept
    assert len(res.quantized) == 20 and "img_in" in res.kept and "final_layer.linear" in res.kept
    r = SafetensorsReader(out)
    meta = r.metadata
    assert meta["flux2_bench.recipe"] == str(recipe) and meta["flux2_bench.preset"] == "tiny"
    assert meta["flux2_bench.format_version"] == "1" and meta["flux2_bench.tool_version"]
    assert json.loads(meta["flux2_bench.source_sha256"]).keys() == {"flux.safetensors"}
    assert "img_in" in json.loads(meta["flux2_bench.kept_layers"])
    assert r.tensors["img_in.weight"].dtype == torch.bfloat16  # BFL keys kept, embedder bf16
    assert "double_blocks.0.img_attn.qkv.weight" in r.tensors
    report = verify(out, against=tiny / "flux.safetensors")
    assert report.ok, report.table()
    assert min(c.sqnr_db for c in report.layers) < 40, "a lossy format cannot be that exact"
    info = inspect_checkpoint(out)
    assert info["recipe"] == str(recipe) and len(info["quantized_layers"]) == 20


def test_convert_diffusers_folder_keeps_convention_and_config(tiny, tmp_path):
    out = tmp_path / "fp8"
    convert(tiny / "diffusers", out, recipe="fp8-row", progress=False)
    assert _listing(out) == ["config.json", "diffusion_pytorch_model.safetensors"]
    assert json.loads((out / "config.json").read_text()) == json.loads((tiny / "diffusers" / "config.json").read_text())
    r = SafetensorsReader(out / "diffusion_pytorch_model.safetensors")
    assert r.tensors["transformer_blocks.0.attn.to_q.weight_scale"].shape == (128, 1)
    assert r.tensors["x_embedder.weight"].dtype == torch.bfloat16
    assert verify(out, against=tiny / "diffusers").ok


def test_sharded_output_with_index(tiny, tmp_path):
    out = tmp_path / "sh"
    res = convert(tiny / "diffusers", out, recipe="int4-g128", shard_size=400_000, progress=False)
    assert len(res.files) > 1
    index = json.loads((out / "diffusion_pytorch_model.safetensors.index.json").read_text())
    assert set(index["weight_map"].values()) == {f.name for f in res.files}
    # a layer's stored tensors never straddle two shards
    assert len({index["weight_map"][k] for k in index["weight_map"] if k.startswith("proj_out.")}) == 1
    assert verify(out, against=tiny / "diffusers").ok


def test_keep_and_only_globs(tiny, tmp_path):
    res = convert(tiny / "flux.safetensors", tmp_path / "a.safetensors", keep=["single_blocks.*"], progress=False)
    assert not any(layer.startswith("single_blocks") for layer in res.quantized) and len(res.quantized) == 16
    res = convert(tiny / "flux.safetensors", tmp_path / "b.safetensors", only=["*img_mlp.*", "img_in"], progress=False)
    assert sorted(res.quantized) == sorted(
        ["img_in"] + [f"double_blocks.{i}.img_mlp.{j}" for i in (0, 1) for j in (0, 2)]
    )
    with pytest.raises(ValueError, match="matches no linear"):
        convert(tiny / "flux.safetensors", tmp_path / "c.safetensors", only=["nope*"], progress=False)


@pytest.mark.parametrize("recipe", list(Recipe), ids=str)
def test_chunked_quantization_equals_whole(monkeypatch, recipe):
    """The converter quantizes big weights in row chunks; the result is bit-identical to one shot."""
    monkeypatch.setattr(C, "CHUNK_ELEMENTS", 1000)  # forces 128-row chunks and a ragged last one
    cfg = get_recipe(recipe, double_quant=recipe == Recipe.NF4)
    w = torch.randn(304, 256, dtype=torch.bfloat16)
    a, b = quantize_streaming(cfg, "w", w), quantize_layer(cfg, w)
    assert list(a) == list(b)
    for k in b:
        x, y = a[k], b[k]
        if x.dtype == torch.float8_e4m3fn:
            x, y = x.view(torch.uint8), y.view(torch.uint8)
        assert torch.equal(x, y), f"{recipe} {k}: {int((x != y).sum())} elements differ"


def test_comfy_fp8_tensor_matches_comfyui_spec(tiny, tmp_path):
    """quant-formats A2: fp8 weight, fp32 scalar weight_scale, uint8 JSON comfy_quant per layer, and the
    header `_quantization_metadata` listing the same layers."""
    out = tmp_path / "comfy.safetensors"
    res = convert(tiny / "flux.safetensors", out, recipe="fp8-tensor", comfy=True, progress=False)
    r = SafetensorsReader(out)
    header = json.loads(r.metadata["_quantization_metadata"])
    assert header["format_version"] == "1.0"
    assert header["layers"] == {layer: {"format": "float8_e4m3fn"} for layer in res.quantized}
    src = SafetensorsReader(tiny / "flux.safetensors")
    for key in src.keys():
        layer = key.removesuffix(".weight")
        if layer in res.quantized:
            assert r.tensors[key].dtype == torch.float8_e4m3fn and r.tensors[key].shape == src.tensors[key].shape
            s = r.tensors[f"{layer}.weight_scale"]
            assert s.dtype == torch.float32 and s.shape == ()
            cq = r.read(f"{layer}.comfy_quant")
            assert cq.dtype == torch.uint8 and cq.dim() == 1
            assert json.loads(bytes(cq.tolist()).decode()) == {"format": "float8_e4m3fn"}
            w = src.read(key).float()
            assert r.read(f"{layer}.weight_scale").item() == pytest.approx(w.abs().max().item() / 448, rel=1e-6)
        else:
            assert r.tensors[key].dtype == torch.bfloat16 and f"{layer}.comfy_quant" not in r.tensors
    # ComfyUI markers only exist for fp8-tensor and nvfp4
    assert quantize_main(["convert", str(tiny / "flux.safetensors"), "-o", str(tmp_path / "x.safetensors"),
                          "--recipe", "int4-g128", "--comfy", "--no-progress"]) == 1  # fmt: skip


@pytest.mark.parametrize("double_quant", [False, True])
def test_nf4_loads_in_diffusers_with_bitsandbytes(tiny, tmp_path, monkeypatch, double_quant):
    """The nf4 folder loads through diffusers + bitsandbytes on CPU (diffusers' GPU-presence check is
    bypassed: bnb 0.50 runs Linear4bit on CPU), and bnb's weights equal our dequantization."""
    pytest.importorskip("bitsandbytes")
    from bitsandbytes.functional import dequantize_4bit
    from diffusers import Flux2Transformer2DModel
    from diffusers.quantizers.bitsandbytes.bnb_quantizer import BnB4BitDiffusersQuantizer

    out = tmp_path / "nf4"
    res = convert(tiny / "diffusers", out, recipe="nf4", double_quant=double_quant, progress=False)
    qc = json.loads((out / "config.json").read_text())["quantization_config"]
    assert qc["quant_method"] == "bitsandbytes" and qc["load_in_4bit"] and qc["bnb_4bit_quant_type"] == "nf4"
    assert qc["bnb_4bit_use_double_quant"] == double_quant and qc["bnb_4bit_quant_storage"] == "uint8"
    assert "x_embedder" in qc["llm_int8_skip_modules"]
    monkeypatch.setattr(BnB4BitDiffusersQuantizer, "validate_environment", lambda self, *a, **k: None)
    model = Flux2Transformer2DModel.from_pretrained(out, torch_dtype=torch.bfloat16, device_map="cpu")
    r = SafetensorsReader(out / "diffusion_pytorch_model.safetensors")
    for layer in res.quantized:
        mod = model.get_submodule(layer)
        assert type(mod).__name__ == "Linear4bit", f"{layer} loaded as {type(mod).__name__}"
        theirs = dequantize_4bit(mod.weight.data, mod.weight.quant_state).float()
        stored = {k[len(layer) + 1 :]: r.read(k) for k in r.keys() if k.startswith(layer + ".")}
        ours = dequantize_layer(Recipe.NF4, stored).to(torch.bfloat16).float()
        assert torch.equal(theirs, ours), f"{layer}: max diff {(theirs - ours).abs().max()}"
    assert type(model.x_embedder).__name__ == "Linear"
    x = model(
        hidden_states=torch.randn(1, 16, 32, dtype=torch.bfloat16),
        encoder_hidden_states=torch.randn(1, 8, 96, dtype=torch.bfloat16),
        timestep=torch.tensor([0.5]),
        guidance=torch.tensor([4.0]),
        img_ids=torch.zeros(16, 4),
        txt_ids=torch.zeros(8, 4),
    ).sample
    assert torch.isfinite(x).all()


def test_text_encoder_qwen3(tmp_path):
    src = tmp_path / "te"
    src.mkdir()
    (src / "config.json").write_text(json.dumps({"model_type": "qwen3", "architectures": ["Qwen3ForCausalLM"]}))
    t = {
        "model.embed_tokens.weight": torch.randn(64, 128),
        "lm_head.weight": torch.randn(64, 128),
        "model.norm.weight": torch.ones(128),
    }
    for i in range(2):
        p = f"model.layers.{i}."
        for n in ("q_proj", "k_proj", "v_proj", "o_proj"):
            t[p + f"self_attn.{n}.weight"] = torch.randn(128, 128)
        t[p + "self_attn.q_norm.weight"] = torch.ones(16)
        for n in ("gate_proj", "up_proj", "down_proj"):
            t[p + f"mlp.{n}.weight"] = torch.randn(128, 128)
        t[p + "input_layernorm.weight"] = torch.ones(128)
    save_streaming(src / "model.safetensors", {k: v.to(torch.bfloat16) for k, v in t.items()})
    res = convert(src, tmp_path / "out", recipe="fp8-row", progress=False)
    assert len(res.quantized) == 14 and sorted(res.kept) == ["lm_head", "model.embed_tokens"]
    assert _listing(tmp_path / "out") == ["config.json", "model.safetensors"]
    assert SafetensorsReader(tmp_path / "out" / "model.safetensors").metadata["flux2_bench.architecture"] == "qwen3"
    assert verify(tmp_path / "out", against=src).ok


# ---------------------------------------------------------------------------------------------------
# Bad input: clear error, non-zero exit, nothing written


def _cli_convert(src, out, *extra) -> int:
    return quantize_main(["convert", str(src), "-o", str(out), "--no-progress", *extra])


def _assert_nothing_written(d: Path, allowed: set[str]):
    assert set(_listing(d)) <= allowed, f"left behind: {set(_listing(d)) - allowed}"


def test_bad_inputs(tiny, tmp_path, capsys):
    bad = tmp_path / "bad"
    bad.mkdir()
    good = (tiny / "flux.safetensors").read_bytes()
    (bad / "trunc.safetensors").write_bytes(good[: len(good) // 2])
    (bad / "corrupt.safetensors").write_bytes(struct.pack("<Q", 20) + b"{not json at all!!!!" + b"\0" * 64)
    (bad / "model.ckpt").write_bytes(b"\x80\x04pickle")
    save_streaming(bad / "other.safetensors", {"encoder.conv_in.weight": torch.randn(4, 3, 3, 3)})
    cases = {
        "trunc.safetensors": "truncated",
        "corrupt.safetensors": "corrupt safetensors header",
        "model.ckpt": "pickle",
        "other.safetensors": "unknown architecture",
    }
    for name, why in cases.items():
        assert _cli_convert(bad / name, tmp_path / "o.safetensors") == 1, name
        assert why in capsys.readouterr().err, name
    _assert_nothing_written(tmp_path, {"bad"})


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_non_finite_weight_aborts_naming_the_tensor(tmp_path, capsys, value):
    m = synthetic_transformer("tiny", dtype=torch.bfloat16)
    state = m.state_dict()
    state["single_blocks.1.linear2.weight"][3, 5] = value  # written late: conversion is under way
    state["txt_in.weight"][0, 0] = 1.0
    save_streaming(tmp_path / "nan.safetensors", state)
    assert _cli_convert(tmp_path / "nan.safetensors", tmp_path / "o.safetensors") == 1
    err = capsys.readouterr().err
    assert "single_blocks.1.linear2.weight" in err and "non-finite" in err
    _assert_nothing_written(tmp_path, {"nan.safetensors"})


def test_already_quantized_and_overwrite(tiny, tmp_path, capsys):
    out = tmp_path / "q.safetensors"
    assert _cli_convert(tiny / "flux.safetensors", out) == 0
    assert _cli_convert(out, tmp_path / "qq.safetensors") == 1
    assert "already quantized" in capsys.readouterr().err
    before = out.stat().st_mtime_ns
    assert _cli_convert(tiny / "flux.safetensors", out, "--recipe", "nf4") == 1
    assert "--force" in capsys.readouterr().err and out.stat().st_mtime_ns == before
    assert _cli_convert(tiny / "flux.safetensors", out, "--recipe", "nf4", "--force") == 0
    assert SafetensorsReader(out).metadata["flux2_bench.recipe"] == "nf4"
    _assert_nothing_written(tmp_path, {"q.safetensors"})


def test_verify_exits_nonzero_below_floor(tiny, tmp_path, capsys):
    out = tmp_path / "q.safetensors"
    convert(tiny / "flux.safetensors", out, recipe="fp8-tensor", progress=False)
    assert quantize_main(["verify", str(out), "--against", str(tiny / "flux.safetensors")]) == 0
    # a different source of the same shapes: every layer far below the floor
    other = tmp_path / "other.safetensors"
    save_transformer(synthetic_transformer("tiny", seed=7), other)
    capsys.readouterr()
    assert quantize_main(["verify", str(out), "--against", str(other)]) == 1
    assert "below" in capsys.readouterr().out


# ---------------------------------------------------------------------------------------------------
# A multi-GB checkpoint: bounded memory (child's peak RSS), kill safety, rerun


def _write_big(path: Path, depth: int, single: int) -> int:
    """klein-4b-wide blocks (hidden 3072); tensor by tensor with random bf16 (tiled from 32 MB)."""
    cfg = dataclasses.replace(get_preset("flux.2-klein-4b"), depth=depth, depth_single_blocks=single)
    with torch.device("meta"):
        shapes = {k: tuple(v.shape) for k, v in Flux2(cfg).state_dict().items()}
    base = (torch.randn(1 << 24, generator=torch.Generator().manual_seed(0)) * 0.02).to(torch.bfloat16)
    largest = 0
    with SafetensorsWriter(path, {k: (torch.bfloat16, s) for k, s in shapes.items()}) as w:
        for k, s in shapes.items():
            n = torch.Size(s).numel()
            largest = max(largest, 2 * n)
            reps = -(-n // base.numel())
            w.write(k, (base.repeat(reps)[:n] if reps > 1 else base[:n].clone()).view(s))
    return largest


def test_multi_gb_bounded_memory_and_kill_safety(tmp_path):
    # 1.1 GB by default to keep the suite fast on 2 cores; FLUX2_QUANT_BIG_GB=2.8 is the README's run
    gb = float(os.environ.get("FLUX2_QUANT_BIG_GB", "1.1"))
    single = max(1, round((gb - 0.33 - 0.49) / 0.245))  # top level 0.33 GB, a double 0.49, a single 0.245
    src = tmp_path / "big.safetensors"
    largest = _write_big(src, depth=1, single=single)
    assert src.stat().st_size > 1e9
    out = tmp_path / "out" / "big-fp8.safetensors"
    cmd = [str(BIN / "flux2-quantize"), "convert", str(src), "-o", str(out), "--recipe", "fp8-tensor", "--no-progress"]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}

    # SIGKILL once it writes: nothing that looks complete may remain
    p = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    stage = tmp_path / "out" / ".big-fp8.safetensors.flux2-quantize.partial"
    deadline = time.time() + 120
    while time.time() < deadline and p.poll() is None:
        if stage.is_dir() and any(f.stat().st_size > 50e6 for f in stage.iterdir()):
            break
        time.sleep(0.02)
    assert p.poll() is None, "the converter finished before it could be killed"
    os.kill(p.pid, signal.SIGKILL)
    p.wait()
    assert not out.exists(), "a killed run left a complete-looking output"
    assert all(n.startswith(".") for n in _listing(tmp_path / "out"))

    # the rerun succeeds (cleaning the stale staging folder); its peak RSS is bounded
    with open(tmp_path / "log.out", "w+") as fo, open(tmp_path / "log.err", "w+") as fe:
        p = subprocess.Popen(cmd, env=env, stdout=fo, stderr=fe)
        _, status, usage = os.wait4(p.pid, 0)  # this child's own rusage: ru_maxrss is its peak RSS
        p.returncode = os.waitstatus_to_exitcode(status)
    stdout, stderr = (tmp_path / "log.out").read_text(), (tmp_path / "log.err").read_text()
    assert p.returncode == 0, stderr[-2000:]
    # the bound is on the converter's working memory: subtract the resident size of the interpreter
    # with its imports loaded (steady state, not their transient peak), measured in the same environment
    steady = subprocess.run(
        [sys.executable, "-c", "import os, flux2_bench.cli, flux2_bench.quantize.convert;"
         "print(int(open('/proc/self/statm').read().split()[1]) * os.sysconf('SC_PAGE_SIZE'))"],
        env=env, capture_output=True, text=True, check=True,
    )  # fmt: skip
    imports = int(steady.stdout.strip())
    peak = usage.ru_maxrss * 1024 - imports  # ru_maxrss: KiB on Linux
    bound = 2 * largest + 512 * 2**20
    mib = 2**20
    print(
        f"\n{stdout.strip()}\npeak RSS {peak / mib:.0f} MiB over the imports' {imports / mib:.0f} MiB, "
        f"bound {bound / mib:.0f} MiB, largest {largest / mib:.0f}"
    )
    assert peak < bound, f"peak RSS {peak / mib:.0f} MiB >= 2 x largest tensor + 512 MiB = {bound / mib:.0f} MiB"
    assert _listing(tmp_path / "out") == ["big-fp8.safetensors"]
    r = SafetensorsReader(out)
    assert r.metadata["flux2_bench.preset"] == "custom"
    assert r.tensors["single_blocks.0.linear1.weight"].dtype == torch.float8_e4m3fn
