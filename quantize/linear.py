"""QuantLinear: a bias-free linear layer whose weight is stored in one of flux2-quantize's recipes.

    QuantLinear.from_float(linear, "fp8-row")      quantize an nn.Linear
    swap_linears(model, "nf4")                     swap the FLUX.2 block linears in place
    print(model)                                   extra_repr names the recipe and the kernel

Kernel per recipe and device (chosen at call time from the input's device):
  fp8-tensor / fp8-row / fp8-block: Triton FP8 GEMM with fused activation quantization on sm_89+
      (RTX 40/50, H100); weight-only FP8 (e4m3 decoded in registers, bf16 MMA) on sm_80/86 (RTX 30)
  nf4 / int4-g128: on any CUDA GPU, for M >= DEQUANT_MIN_M rows a Triton kernel dequantizes the
      weight to a bf16 temporary, then cuBLAS multiplies (the fused W4A16 kernel reaches 0.61-0.69x
      cuBLAS time on FLUX.2's M=4096 shapes because Triton serializes dequant and MMA:
      reports/int4_matmul); below that, the fused W4A16 kernel (dequant in registers), which wins
      where the weight read dominates
  nvfp4: dequantize, then F.linear (FP4 MMA needs sm_100+; this project has no kernel for it)
  CPU, every recipe: dequantize, then F.linear

Runtime tensors (buffers) per recipe, converted from the file's form by `load_stored`:
  fp8-*:     weight e4m3 (N, K); weight_scale fp32 () | (N, 1) | (ceil N/128, ceil K/128)
  int4-g128: weight uint8 (N, K/2); weight_scale bf16 (N, K/128)
  nf4:       weight uint8 (N, K/2); weight_scale fp16 (N, K/64) = absmax (double quantization undone
             on load; fp16 instead of the file's fp32 saves 1/32 byte per weight, 0.9 GiB on FLUX.2-dev,
             for a relative scale rounding of at most 2^-11, against NF4's own ~10 % per weight);
             code fp32 (16,) = bitsandbytes' NF4 table
  nvfp4:     weight uint8 (N, K/2); weight_scale e4m3 (swizzled blocks); weight_scale_2 fp32 ()
"""

from __future__ import annotations

import fnmatch
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from flux2_bench.quantize import formats as QF
from flux2_bench.quantize.recipes import Recipe, dequantize_layer, get_recipe, parse_json_bytes, quantize_layer

# 4-bit: rows of x from which dequantize + cuBLAS beats the fused W4A16 kernel. Measured on the H100
# (reports/quant_runtime/h100_dequant_min_m.json): at FLUX.2's 512 text rows dequantize + cuBLAS wins
# for nf4 on every text shape (284 vs 453 us on txt.qkv) and for int4 on two of four; the FLUX.2-dev
# step at 1024² goes 475.0/476.2 -> 470.2/466.9 ms (nf4) and 465.8/468.1 -> 463.3/468.4 ms (int4)
# from 2048 to 512, at the same peak (the chunks stay <= DEQUANT_CHUNK_BYTES).
DEQUANT_MIN_M = 512
# 4-bit, dequantize + cuBLAS: bf16 weight bytes dequantized per GEMM (equal row chunks). Measured on the
# H100 (reports/quant_runtime/h100_dequant_chunks*.json, FLUX.2-dev 1024² step): 128 MB 477.6 / 484.1 ms
# (int4 / nf4) at 17.51 / 17.99 GiB peak, 512 MB 467.1 / 479.2 ms at 17.94 / 18.41 GiB: fewer, wider
# GEMMs against 0.4 GiB; the whole weight (680 MB for linear1) gains nothing more.
DEQUANT_CHUNK_BYTES = 512 << 20
FP8_GRANULARITY = {Recipe.FP8_TENSOR: "tensor", Recipe.FP8_ROW: "row", Recipe.FP8_BLOCK: "block"}
# The FLUX.2 block linears (BFL names): what flux2-quantize converts by default.
BLOCK_LINEARS = (
    "double_blocks.*.img_attn.qkv",
    "double_blocks.*.txt_attn.qkv",
    "double_blocks.*.img_attn.proj",
    "double_blocks.*.txt_attn.proj",
    "double_blocks.*.img_mlp.0",
    "double_blocks.*.img_mlp.2",
    "double_blocks.*.txt_mlp.0",
    "double_blocks.*.txt_mlp.2",
    "single_blocks.*.linear1",
    "single_blocks.*.linear2",
)


def is_block_linear(name: str) -> bool:
    return any(fnmatch.fnmatchcase(name, p) for p in BLOCK_LINEARS)


def runtime_layout(recipe: Recipe, n: int, k: int) -> dict[str, tuple[torch.dtype, tuple[int, ...]]]:
    """The buffers a QuantLinear of this recipe holds (see the module docstring)."""
    fp8, u8 = QF.FP8_DTYPE, torch.uint8
    if recipe is Recipe.FP8_TENSOR:
        return {"weight": (fp8, (n, k)), "weight_scale": (torch.float32, ())}
    if recipe is Recipe.FP8_ROW:
        return {"weight": (fp8, (n, k)), "weight_scale": (torch.float32, (n, 1))}
    if recipe is Recipe.FP8_BLOCK:
        b = QF.FP8_BLOCK
        return {"weight": (fp8, (n, k)), "weight_scale": (torch.float32, (-(-n // b), -(-k // b)))}
    if recipe is Recipe.INT4_G128:
        return {"weight": (u8, (n, k // 2)), "weight_scale": (torch.bfloat16, (n, k // QF.INT4_GROUP))}
    if recipe is Recipe.NF4:
        return {
            "weight": (u8, (n, k // 2)),
            "weight_scale": (torch.float16, (n, k // QF.NF4_BLOCK)),
            "code": (torch.float32, (16,)),
        }
    rows, cols = -(-n // 128) * 128, -(-(k // QF.NVFP4_BLOCK) // 4) * 4
    return {
        "weight": (u8, (n, k // 2)),
        "weight_scale": (fp8, (rows, cols)),
        "weight_scale_2": (torch.float32, ()),
    }


def detect_recipe(stored: dict[str, tuple[torch.dtype, tuple[int, ...]]]) -> Recipe | None:
    """A layer's recipe from its stored tensors (suffix -> (dtype, shape)); None for a plain weight.

    Reads this project's files, ComfyUI fp8 / nvfp4 (`weight_scale`, `weight_scale_2`, legacy
    `scale_weight`) and bitsandbytes nf4 as diffusers saves it.
    """
    if "weight.quant_state.bitsandbytes__nf4" in stored:
        return Recipe.NF4
    if any(s.startswith("weight.quant_state.") for s in stored):
        raise ValueError(f"unsupported bitsandbytes quant state: {sorted(stored)}")
    if "weight_scale_2" in stored:
        return Recipe.NVFP4
    scale = stored.get("weight_scale") or stored.get("scale_weight")
    wdt, wshape = stored["weight"]
    if scale is None:
        return None
    if wdt == QF.FP8_DTYPE:
        sdt, sshape = scale
        numel = 1
        for d in sshape:
            numel *= d
        if numel == 1:
            return Recipe.FP8_TENSOR
        if sshape in ((wshape[0], 1), (wshape[0],)):
            return Recipe.FP8_ROW
        return Recipe.FP8_BLOCK
    if wdt == torch.uint8 and scale[0] == torch.bfloat16:
        return Recipe.INT4_G128
    raise ValueError(f"unrecognized quantized layer: weight {wdt}{list(wshape)}, scale {scale}")


def to_runtime(recipe: Recipe, stored: dict[str, Tensor], n: int, k: int) -> dict[str, Tensor]:
    """File form (suffix -> tensor, as flux2-quantize / ComfyUI / bitsandbytes write it) -> buffers."""
    if "scale_weight" in stored and "weight_scale" not in stored:  # legacy ComfyUI spelling
        stored = {**stored, "weight_scale": stored["scale_weight"]}
    if recipe is Recipe.NF4:
        state = parse_json_bytes(stored["weight.quant_state.bitsandbytes__nf4"])
        if state.get("blocksize") != QF.NF4_BLOCK or state.get("quant_type") != "nf4":
            raise ValueError(f"nf4 layers must use blocksize {QF.NF4_BLOCK}, got quant state {state}")
        absmax = stored["weight.absmax"]
        if "nested_offset" in state:
            absmax = QF.dequantize_absmax_nested(
                absmax,
                stored["weight.nested_absmax"],
                stored["weight.nested_quant_map"],
                state["nested_offset"],
                state["nested_blocksize"],
            )
        absmax = absmax.float()
        if absmax.numel() and float(absmax.abs().max()) > torch.finfo(torch.float16).max:
            raise ValueError(f"nf4 absmax up to {float(absmax.abs().max()):.3g} does not fit the fp16 runtime scales")
        return {
            "weight": stored["weight"].reshape(n, k // 2),
            "weight_scale": absmax.to(torch.float16).reshape(n, k // QF.NF4_BLOCK),
            "code": stored["weight.quant_map"].float(),
        }
    out = {"weight": stored["weight"], "weight_scale": stored["weight_scale"]}
    if recipe is Recipe.FP8_TENSOR:
        out["weight_scale"] = out["weight_scale"].float().reshape(())
    elif recipe is Recipe.FP8_ROW:
        out["weight_scale"] = out["weight_scale"].float().reshape(n, 1)
    elif recipe is Recipe.NVFP4:
        out["weight_scale_2"] = stored["weight_scale_2"].float().reshape(())
    return out


class QuantLinear(nn.Module):
    """y = x · dequant(W)ᵀ, no bias (FLUX.2 has none), W stored in `recipe`."""

    def __init__(self, in_features: int, out_features: int, recipe: Recipe | str, *, device=None):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.recipe = Recipe(recipe)
        get_recipe(self.recipe).check_shape("QuantLinear", (out_features, in_features))
        for name, (dtype, shape) in runtime_layout(self.recipe, out_features, in_features).items():
            self.register_buffer(name, torch.empty(shape, dtype=dtype, device=device))
        self._code_is_standard: bool | None = None  # nf4: whether `code` is bitsandbytes' table (lazy)

    @classmethod
    def from_float(cls, linear: nn.Linear, recipe: Recipe | str) -> QuantLinear:
        """Quantize an nn.Linear's weight on its own device (the bf16 weight is not kept)."""
        if linear.bias is not None:
            raise ValueError("QuantLinear has no bias; FLUX.2's linears have none")
        n, k = linear.weight.shape
        q = cls(k, n, recipe, device=linear.weight.device)
        stored = quantize_layer(get_recipe(q.recipe), linear.weight.detach())
        q.load_stored(stored)
        return q

    def load_stored(self, stored: dict[str, Tensor]) -> None:
        """Fill the buffers from a layer's stored tensors (file form: suffix -> tensor), any device."""
        self.load_runtime(to_runtime(self.recipe, stored, self.out_features, self.in_features))

    @torch.no_grad()
    def load_runtime(self, runtime: dict[str, Tensor]) -> None:
        """Fill the buffers from runtime-form tensors (buffer name -> tensor), checking each."""
        for name, buf in self.named_buffers(recurse=False):
            src = runtime[name]
            if tuple(src.shape) != tuple(buf.shape) or src.dtype != buf.dtype:
                raise ValueError(
                    f"{self.recipe} {name}: stored {src.dtype}{list(src.shape)}, expected {buf.dtype}{list(buf.shape)}"
                )
            buf.copy_(src)
        self._code_is_standard = None

    def dequantize(self, dtype: torch.dtype = torch.bfloat16) -> Tensor:
        r, t = self.recipe, dict(self.named_buffers(recurse=False))
        if r is Recipe.NF4:
            n, k = self.out_features, self.in_features
            codes = QF.unpack_nibbles(t["weight"]).long()
            vals = t["code"][codes].view(n, k // QF.NF4_BLOCK, QF.NF4_BLOCK) * t["weight_scale"][..., None]
            return vals.view(n, k).to(dtype)
        return dequantize_layer(r, t, dtype)

    def kernel(self, device: torch.device) -> str:
        """The kernel a call on `device` uses (shown by extra_repr)."""
        if device.type != "cuda":
            return "torch (dequantize + F.linear)"
        if self.recipe in FP8_GRANULARITY:
            fp8_mma = torch.cuda.get_device_capability(device) >= (8, 9)
            return f"triton fp8_linear ({FP8_GRANULARITY[self.recipe]})" if fp8_mma else "triton fp8 weight-only"
        if self.recipe in (Recipe.NF4, Recipe.INT4_G128):
            if DEQUANT_MIN_M >= 1 << 40:
                return f"triton int4_matmul ({self.recipe})"
            return f"triton dequantize_4bit + cuBLAS for M>={DEQUANT_MIN_M}, else int4_matmul ({self.recipe})"
        return "torch (dequantize + F.linear)"

    def activation_quant(self, device: torch.device) -> str | None:
        """The FP8 activation granularity ("row" / "block") this layer's kernel takes already quantized
        from a fused producer (`kernels/fused_modulate.py`) on `device`; None: it takes bf16."""
        if self.recipe in (Recipe.FP8_ROW, Recipe.FP8_BLOCK) and self.kernel(device).startswith("triton fp8_linear"):
            return FP8_GRANULARITY[self.recipe]
        return None

    def forward(
        self, x: Tensor | tuple[Tensor, Tensor], residual: Tensor | None = None, gate: Tensor | None = None
    ) -> Tensor:
        """x @ Wᵀ, or FLUX.2's gated residual `residual + gate * (x @ Wᵀ)` when both are given.

        x: (..., K) activations, or a pair (x_fp8, x_scale) that a fused producer quantized with this
        layer's `activation_quant` granularity (quantize_fp8's shapes). gate: broadcastable to the
        output as (B, 1, N); with B == 1 the FP8 kernels apply it in their epilogue."""
        if (residual is None) != (gate is None):
            raise ValueError("residual without gate (or gate without residual): pass both for the gated residual")
        if isinstance(x, tuple):
            return self._forward_fp8_input(*x, residual=residual, gate=gate)
        kernel = self.kernel(x.device)
        if kernel.startswith("triton fp8_linear"):
            from flux2_bench.kernels.fp8_matmul import fp8_linear

            res, g = _epilogue_args(residual, gate, self.out_features)
            out = fp8_linear(
                x, self.weight, self.weight_scale, granularity=FP8_GRANULARITY[self.recipe], residual=res, gate=g
            )
            return out if res is not None or residual is None else torch.addcmul(residual, gate, out)
        if kernel.startswith("torch"):
            out = F.linear(x, self.dequantize(x.dtype))
        elif kernel == "triton fp8 weight-only":
            from flux2_bench.kernels.fp8_matmul import fp8_weight_only_linear

            out = fp8_weight_only_linear(x, self.weight, self.weight_scale)
        else:
            from flux2_bench.kernels.int4_matmul import int4_matmul

            code = self._kernel_code()
            if x.numel() // x.shape[-1] >= DEQUANT_MIN_M:
                out = self._dequantize_chunks_matmul(x, code)
            else:
                out = int4_matmul(x, self.weight, self.weight_scale, fmt=str(self.recipe), code=code)
        return out if residual is None else torch.addcmul(residual, gate, out)

    def _kernel_code(self) -> Tensor | None:
        """The NF4 codebook for the 4-bit kernels: None (their cached standard table) when it is
        bitsandbytes' NF4 table, checked once per loaded weight (one host sync), else the buffer."""
        if self.recipe is not Recipe.NF4:
            return None
        if self._code_is_standard is None:
            self._code_is_standard = torch.equal(self.code.cpu(), QF.NF4_CODE.to(torch.float32))
        return None if self._code_is_standard else self.code

    def _load_from_state_dict(self, *args, **kwargs):
        self._code_is_standard = None  # new buffers: check the codebook again
        super()._load_from_state_dict(*args, **kwargs)

    def _dequantize_chunks_matmul(self, x: Tensor, code: Tensor | None) -> Tensor:
        """x @ Wᵀ for a 4-bit W: dequantize at most DEQUANT_CHUNK_BYTES of bf16 rows of W at a time (equal
        chunks) and let cuBLAS write each chunk's output columns in place, so the temporary is bounded
        instead of the whole bf16 weight (680 MB for FLUX.2-dev's linear1): the 4-bit peak memory."""
        from flux2_bench.kernels.int4_matmul import dequantize_4bit

        x2 = x.reshape(-1, self.in_features)
        n = self.out_features
        # equal chunks (multiples of 128 rows): a small remainder chunk would be a GEMM with poor waves
        chunks = max(1, -(-n * self.in_features * 2 // DEQUANT_CHUNK_BYTES))
        rows = -(-n // chunks // 128) * 128 if chunks > 1 else n
        out = torch.empty(x2.shape[0], n, device=x.device, dtype=x.dtype)
        for n0 in range(0, n, rows):
            n1 = min(n, n0 + rows)
            w = dequantize_4bit(self.weight[n0:n1], self.weight_scale[n0:n1], fmt=str(self.recipe), code=code)
            torch.mm(x2, w.to(x.dtype).t(), out=out[:, n0:n1] if n1 - n0 < n else out)
        return out.reshape(*x.shape[:-1], n)

    def _forward_fp8_input(self, xq: Tensor, x_scale: Tensor, residual: Tensor | None, gate: Tensor | None):
        from flux2_bench.kernels.fp8_matmul import fp8_gemm

        if self.activation_quant(xq.device) is None:
            raise ValueError(f"{self.recipe} layer with kernel {self.kernel(xq.device)!r} takes no FP8 input")
        lead, k = xq.shape[:-1], xq.shape[-1]
        if k != self.in_features:
            raise ValueError(f"x has {k} features, this layer takes {self.in_features}")
        a, a_scale = xq.reshape(-1, k), x_scale.reshape(-1, x_scale.shape[-1])
        res, g = _epilogue_args(residual, gate, self.out_features)
        out = fp8_gemm(a, self.weight, a_scale, self.weight_scale, residual=res, gate=g).reshape(*lead, -1)
        return out if res is not None or residual is None else torch.addcmul(residual, gate, out)

    def extra_repr(self) -> str:
        dev = self.weight.device
        kernel = self.kernel(dev) if dev.type != "meta" else "n/a on meta"
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, recipe={self.recipe}, kernel={kernel}"
        )


def _epilogue_args(residual: Tensor | None, gate: Tensor | None, n: int) -> tuple[Tensor | None, Tensor | None]:
    """(residual (M, N), gate (N,)) for the FP8 GEMM epilogue, or (None, None) when the gate differs
    between batch entries (then the caller applies the residual in torch)."""
    if residual is None:
        return None, None
    if gate.numel() != n or residual.shape[-1] != n:
        return None, None
    return residual.reshape(-1, n), gate.reshape(n)


def replace_module(model: nn.Module, name: str, new: nn.Module) -> None:
    """Put `new` where the submodule called `name` (e.g. "single_blocks.3.linear1") was."""
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, new)


def swap_linears(model: nn.Module, recipe: Recipe | str, filter: Callable[[str], bool] | None = None) -> list[str]:
    """Replace every nn.Linear whose qualified name passes `filter` (default: the FLUX.2 block linears)
    by a QuantLinear, one layer at a time (each bf16 weight is freed once its layer is swapped).
    Returns the swapped names."""
    filter = filter or is_block_linear
    swapped = []
    for name, module in list(model.named_modules()):
        if isinstance(module, nn.Linear) and filter(name):
            replace_module(model, name, QuantLinear.from_float(module, recipe))
            swapped.append(name)
    return swapped
