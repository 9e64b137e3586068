"""The anchors a speed claim is measured against, built in the same process on the same GPU.

diffusers' `Flux2Transformer2DModel` carrying the same weights as our model (q/k/v as views of our
fused qkv, so no second copy of the 64 GB), optionally quantized the way its users quantize it:
torchao FP8 row-wise with dynamic activations (eager), or bitsandbytes NF4 on every block linear.
diffusers, torchao and bitsandbytes are optional: each builder raises ImportError naming the package.
"""

from __future__ import annotations

import torch
from torch import nn

from flux2_bench.weights import diffusers_config, transformer_state

ANCHORS = ("diffusers-bf16", "diffusers-torchao-fp8-row", "diffusers-bnb-nf4")


def diffusers_view(model) -> nn.Module:
    """diffusers' transformer sharing `model`'s weight storage."""
    from diffusers import Flux2Transformer2DModel

    cfg = {k: v for k, v in diffusers_config(model.config).items() if not k.startswith("_")}
    with torch.device("meta"):
        dmodel = Flux2Transformer2DModel(**cfg)
    dmodel.load_state_dict(transformer_state(model, "diffusers"), assign=True, strict=True)
    return dmodel.eval()


def diffusers_forward(dmodel: nn.Module):
    """A callable with our model's signature: (img, img_ids, txt, txt_ids, t, guidance) -> velocity."""

    def forward(img, img_ids, txt, txt_ids, t, guidance=None):
        return dmodel(
            hidden_states=img,
            encoder_hidden_states=txt,
            timestep=t,
            img_ids=img_ids[0],
            txt_ids=txt_ids[0],
            guidance=guidance,
            return_dict=False,
        )[0]

    return forward


def is_block_linear(module: nn.Module, fqn: str) -> bool:
    """diffusers' block linears (what the quantized anchors quantize)."""
    return isinstance(module, nn.Linear) and fqn.startswith(("transformer_blocks.", "single_transformer_blocks."))


def quantize_torchao_fp8_row(dmodel: nn.Module) -> nn.Module:
    """torchao Float8DynamicActivationFloat8Weight, per-row, on every block linear (in place)."""
    from torchao.quantization import Float8DynamicActivationFloat8WeightConfig, PerRow, quantize_

    quantize_(dmodel, Float8DynamicActivationFloat8WeightConfig(granularity=PerRow()), filter_fn=is_block_linear)
    return dmodel


def quantize_bnb_nf4(dmodel: nn.Module) -> nn.Module:
    """bitsandbytes Linear4bit (nf4, blocksize 64, bf16 compute) on every block linear, quantized on
    the GPU layer by layer (in place)."""
    import bitsandbytes as bnb
    import bitsandbytes.functional as bf

    from flux2_bench.quantize.linear import replace_module

    # names first: holding every old module (list(named_modules())) would keep all bf16 weights alive
    names = [fqn for fqn, m in dmodel.named_modules() if is_block_linear(m, fqn)]
    for fqn in names:
        m = dmodel.get_submodule(fqn)
        packed, state = bf.quantize_4bit(m.weight.data, blocksize=64, quant_type="nf4", compress_statistics=False)
        new = bnb.nn.Linear4bit(
            m.in_features, m.out_features, bias=False, compute_dtype=torch.bfloat16, quant_type="nf4", device="meta"
        )
        new.weight = bnb.nn.Params4bit(
            packed, requires_grad=False, quant_state=state, blocksize=64, quant_type="nf4", bnb_quantized=True
        )
        replace_module(dmodel, fqn, new)
        del m
    return dmodel
