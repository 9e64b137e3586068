"""Recipes: an enum of names plus frozen, validated configs. The CLI's choices come from `Recipe`.

Each config says how one linear weight `<layer>.weight` becomes stored tensors, and how they are read
back (`quantize_layer` / `dequantize_layer`, both keyed by the suffix after `<layer>.`). The SQNR floor
is what `flux2-quantize verify` requires of every quantized layer; it is set a few dB under what each
format reaches on Gaussian weights (fp8 e4m3 ~31.5 dB: 3 mantissa bits; nf4 ~20.7 dB; int4 absmax/7
~18.6 dB; nvfp4 ~20.4 dB, measured on 1024x1024 N(0,1), see tests/test_quant_formats.py). Real
weights have heavier tails than a Gaussian, which costs the per-tensor and 4-bit formats a few dB.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from enum import StrEnum

import torch

from flux2_bench.quantize import formats as F


class Recipe(StrEnum):
    FP8_TENSOR = "fp8-tensor"
    FP8_ROW = "fp8-row"
    FP8_BLOCK = "fp8-block"
    NF4 = "nf4"
    INT4_G128 = "int4-g128"
    NVFP4 = "nvfp4"


COMFY_FP8 = {"format": "float8_e4m3fn"}
COMFY_NVFP4 = {"format": "nvfp4"}


def json_bytes(obj, length: int | None = None) -> torch.Tensor:
    """A JSON object as a uint8 tensor of its UTF-8 bytes (ComfyUI `comfy_quant`, bnb quant_state).

    `length` pads with trailing spaces (still valid JSON): the file header declares every tensor's
    shape before the data is known, and a float field (nf4's nested_offset) varies in length.
    """
    raw = json.dumps(obj, separators=(",", ":")).encode()
    if length is not None:
        if len(raw) > length:
            raise AssertionError(f"JSON longer than its reserved {length} bytes: {raw!r}")
        raw = raw.ljust(length)
    return torch.tensor(list(raw), dtype=torch.uint8)


def parse_json_bytes(t: torch.Tensor):
    return json.loads(bytes(t.to(torch.uint8).tolist()).decode())


@dataclass(frozen=True)
class RecipeConfig:
    """How one recipe stores a linear weight. Build with `get_recipe`, which validates."""

    recipe: Recipe
    comfy: bool = False  # ComfyUI markers (`comfy_quant` tensors + `_quantization_metadata` header)
    double_quant: bool = False  # nf4 only: 8-bit quantized absmax
    sqnr_floor_db: float = 0.0
    row_multiple: int = 1  # row chunks fed to the primitives must be multiples of this

    def __post_init__(self):
        if not isinstance(self.recipe, Recipe):
            raise TypeError(f"recipe must be a Recipe, got {self.recipe!r}")
        if self.comfy and self.recipe not in (Recipe.FP8_TENSOR, Recipe.NVFP4):
            raise ValueError(
                f"--comfy markers exist for fp8-tensor and nvfp4 only (ComfyUI has no {self.recipe} format)"
            )
        if self.double_quant and self.recipe is not Recipe.NF4:
            raise ValueError(f"double quantization applies to nf4 only, not {self.recipe}")
        if self.sqnr_floor_db <= 0:
            raise ValueError(f"sqnr_floor_db must be positive, got {self.sqnr_floor_db}")

    @property
    def name(self) -> str:
        return self.recipe.value

    @property
    def is_4bit(self) -> bool:
        return self.recipe in (Recipe.NF4, Recipe.INT4_G128, Recipe.NVFP4)

    def needs_amax(self) -> bool:
        """Per-tensor statistic computed over the whole weight before the chunked pass."""
        return self.recipe in (Recipe.FP8_TENSOR, Recipe.NVFP4)

    def check_shape(self, name: str, shape: tuple[int, ...]) -> None:
        """Raise ValueError when this recipe cannot store a weight of this shape."""
        if len(shape) != 2:
            raise ValueError(f"{name}: only 2-D linear weights are quantized, got shape {list(shape)}")
        n, k = shape
        if self.recipe is Recipe.INT4_G128 and k % F.INT4_GROUP:
            raise ValueError(f"{name}: int4-g128 needs K divisible by {F.INT4_GROUP}, got shape {list(shape)}")
        if self.recipe is Recipe.NVFP4 and (n % F.NVFP4_BLOCK or k % F.NVFP4_BLOCK):
            raise ValueError(f"{name}: nvfp4 needs N and K divisible by 16, got shape {list(shape)}")
        if self.recipe is Recipe.NF4 and (n * k) % F.NF4_BLOCK:
            raise ValueError(f"{name}: nf4 needs numel divisible by 64, got shape {list(shape)}")

    def layout(self, shape: tuple[int, int], src_dtype: torch.dtype) -> dict[str, tuple[torch.dtype, tuple[int, ...]]]:
        """Stored tensors of one layer: suffix (after `<layer>.`) -> (dtype, shape), in file order."""
        n, k = shape
        r = self.recipe
        u8 = torch.uint8
        if r is Recipe.FP8_TENSOR:
            out = {"weight": (F.FP8_DTYPE, (n, k)), "weight_scale": (torch.float32, ())}
            if self.comfy:
                out["comfy_quant"] = (u8, (len(json_bytes(COMFY_FP8)),))
            return out
        if r is Recipe.FP8_ROW:
            return {"weight": (F.FP8_DTYPE, (n, k)), "weight_scale": (torch.float32, (n, 1))}
        if r is Recipe.FP8_BLOCK:
            b = F.FP8_BLOCK
            return {"weight": (F.FP8_DTYPE, (n, k)), "weight_scale": (torch.float32, (-(-n // b), -(-k // b)))}
        if r is Recipe.INT4_G128:
            return {"weight": (u8, (n, k // 2)), "weight_scale": (torch.bfloat16, (n, k // F.INT4_GROUP))}
        if r is Recipe.NVFP4:
            rows, cols = -(-n // 128) * 128, -(-(k // F.NVFP4_BLOCK) // 4) * 4
            out = {
                "weight": (u8, (n, k // 2)),
                "weight_scale": (F.FP8_DTYPE, (rows, cols)),
                "weight_scale_2": (torch.float32, ()),
            }
            if self.comfy:
                out["comfy_quant"] = (u8, (len(json_bytes(COMFY_NVFP4)),))
            return out
        # nf4
        blocks = n * k // F.NF4_BLOCK
        out = {"weight": (u8, (n * k // 2, 1))}
        if self.double_quant:
            nested = -(-blocks // F.NF4_NESTED_BLOCK)
            out["weight.absmax"] = (u8, (blocks,))
            out["weight.nested_absmax"] = (torch.float32, (nested,))
            out["weight.nested_quant_map"] = (torch.float32, (256,))
        else:
            out["weight.absmax"] = (torch.float32, (blocks,))
        out["weight.quant_map"] = (torch.float32, (16,))
        out["weight.quant_state.bitsandbytes__nf4"] = (u8, (self._nf4_state_len((n, k), src_dtype),))
        return out

    def _nf4_state_len(self, shape: tuple[int, int], src_dtype: torch.dtype) -> int:
        # room for the longest float repr the offset can take
        return len(json.dumps(self._nf4_state(shape, src_dtype, 0.0), separators=(",", ":"))) + (
            24 if self.double_quant else 0
        )

    def _nf4_state(self, shape: tuple[int, int], src_dtype: torch.dtype, offset: float) -> dict:
        # field order and spelling of bitsandbytes' QuantState.as_dict(packed=True)
        state = {
            "quant_type": "nf4",
            "blocksize": F.NF4_BLOCK,
            "dtype": str(src_dtype).removeprefix("torch."),
            "shape": list(shape),
        }
        if self.double_quant:
            state.update({"nested_blocksize": F.NF4_NESTED_BLOCK, "nested_dtype": "float32", "nested_offset": offset})
        return state


# Floors in dB (see the module docstring for where the numbers come from).
_FLOORS = {
    Recipe.FP8_TENSOR: 28.0,
    Recipe.FP8_ROW: 28.0,
    Recipe.FP8_BLOCK: 28.0,
    Recipe.NF4: 17.0,
    Recipe.INT4_G128: 16.0,
    Recipe.NVFP4: 17.0,
}


def get_recipe(name: str | Recipe, *, comfy: bool = False, double_quant: bool = False) -> RecipeConfig:
    """The validated config for a recipe name; unknown names fail listing the valid ones."""
    try:
        recipe = Recipe(name)
    except ValueError:
        raise ValueError(f"unknown recipe {name!r}; valid: {[r.value for r in Recipe]}") from None
    return RecipeConfig(recipe, comfy=comfy, double_quant=double_quant, sqnr_floor_db=_FLOORS[recipe])


# ---------------------------------------------------------------------------------------------------
# One layer at a time


def quantize_layer(cfg: RecipeConfig, w: torch.Tensor, w_amax: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    """Quantize a whole 2-D weight: suffix -> stored tensor (same keys and order as `cfg.layout`)."""
    r = cfg.recipe
    if r is Recipe.FP8_TENSOR:
        q, s = F.quantize_fp8_tensor(w, w_amax)
        out = {"weight": q, "weight_scale": s}
        if cfg.comfy:
            out["comfy_quant"] = json_bytes(COMFY_FP8)
        return out
    if r is Recipe.FP8_ROW:
        q, s = F.quantize_fp8_row(w)
        return {"weight": q, "weight_scale": s}
    if r is Recipe.FP8_BLOCK:
        q, s = F.quantize_fp8_block(w)
        return {"weight": q, "weight_scale": s}
    if r is Recipe.INT4_G128:
        q, s = F.quantize_int4_g128(w)
        return {"weight": q, "weight_scale": s}
    if r is Recipe.NVFP4:
        q, bs, s2 = F.quantize_nvfp4(w, w_amax)
        out = {"weight": q, "weight_scale": bs, "weight_scale_2": s2}
        if cfg.comfy:
            out["comfy_quant"] = json_bytes(COMFY_NVFP4)
        return out
    q, absmax = F.quantize_nf4(w)
    return nf4_tensors(cfg, q, absmax, tuple(w.shape), w.dtype)


def nf4_tensors(
    cfg: RecipeConfig, packed: torch.Tensor, absmax: torch.Tensor, shape: tuple[int, int], src_dtype: torch.dtype
) -> dict[str, torch.Tensor]:
    out = {"weight": packed}
    offset = 0.0
    if cfg.double_quant:
        codes, nested_absmax, code, offset = F.quantize_absmax_nested(absmax)
        out.update({"weight.absmax": codes, "weight.nested_absmax": nested_absmax, "weight.nested_quant_map": code})
    else:
        out["weight.absmax"] = absmax
    out["weight.quant_map"] = F.NF4_CODE.clone()
    state = cfg._nf4_state(shape, src_dtype, offset)
    out["weight.quant_state.bitsandbytes__nf4"] = json_bytes(state, cfg._nf4_state_len(shape, src_dtype))
    return out


def dequantize_layer(recipe: Recipe, t: dict[str, torch.Tensor], dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Inverse of `quantize_layer` from the stored tensors (suffix -> tensor)."""
    r = Recipe(recipe)
    if r in (Recipe.FP8_TENSOR, Recipe.FP8_ROW):
        return F.dequantize_fp8_row(t["weight"], t["weight_scale"], dtype)
    if r is Recipe.FP8_BLOCK:
        return F.dequantize_fp8_block(t["weight"], t["weight_scale"], dtype)
    if r is Recipe.INT4_G128:
        return F.dequantize_int4_g128(t["weight"], t["weight_scale"], dtype)
    if r is Recipe.NVFP4:
        return F.dequantize_nvfp4(t["weight"], t["weight_scale"], t["weight_scale_2"], dtype)
    state = parse_json_bytes(t["weight.quant_state.bitsandbytes__nf4"])
    absmax = t["weight.absmax"]
    if "nested_offset" in state:
        absmax = F.dequantize_absmax_nested(
            absmax,
            t["weight.nested_absmax"],
            t["weight.nested_quant_map"],
            state["nested_offset"],
            state["nested_blocksize"],
        )
    if not torch.equal(t["weight.quant_map"].float(), F.NF4_CODE):
        raise ValueError("nf4 quant_map differs from bitsandbytes' NF4 codebook")
    return F.dequantize_nf4(t["weight"], absmax, tuple(state["shape"]), dtype, state["blocksize"])
