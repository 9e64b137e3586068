"""The FLUX.2 flow transformer, written from the architecture spec with the official parameter names.

Module attribute names equal the keys of BFL's `flux2-dev.safetensors` (`double_blocks.3.img_attn.qkv`,
`single_blocks.7.linear1`, ...), so the official file loads with strict checks and no renaming.

One forward is one sampling step:

    velocity = model(img, img_ids, txt, txt_ids, timesteps, guidance=None)

    img      (B, N_img, in_channels)   packed latent tokens (target tokens, then reference tokens)
    img_ids  (B, N_img, 4)             (t, h, w, l) position ids
    txt      (B, N_txt, context_in_dim) text-encoder features
    txt_ids  (B, N_txt, 4)
    timesteps (B,) in [0, 1]; guidance (B,) or None (required when the preset embeds guidance)
    returns  (B, N_img, in_channels)   the caller keeps the first N_target tokens
"""

from __future__ import annotations

import contextlib
import math
import os
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from flux2_bench.attention import attend, attention

# Fused elementwise kernels (kernels/fused_modulate.py, kernels/qk_rope.py) in the blocks: None = on
# CUDA tensors (the default), True = everywhere (CPU runs them in Triton's interpreter: tests), False =
# never (the plain PyTorch ops, as BFL writes them). FLUX2_FUSED=0/1 sets it for a process.
_FUSED_ENV = os.environ.get("FLUX2_FUSED", "").strip()
_fused: bool | None = None if _FUSED_ENV in ("", "auto") else _FUSED_ENV not in ("0", "false", "off")


def set_fused(mode: bool | None) -> None:
    """Choose the blocks' elementwise path: None (fused on CUDA), True (always fused), False (never)."""
    global _fused
    if mode not in (None, True, False):
        raise ValueError(f"fused mode must be None, True or False, got {mode!r}")
    _fused = mode


@contextlib.contextmanager
def use_fused(mode: bool | None):
    """Temporarily choose the elementwise path: `with use_fused(False): model(...)`."""
    previous = _fused
    set_fused(mode)
    try:
        yield
    finally:
        set_fused(previous)


def fused_active(x: Tensor) -> bool:
    return x.is_cuda if _fused is None else _fused


@dataclass(frozen=True)
class Flux2Config:
    in_channels: int = 128
    context_in_dim: int = 15360
    hidden_size: int = 6144
    num_heads: int = 48
    depth: int = 8  # double-stream blocks
    depth_single_blocks: int = 48
    mlp_ratio: float = 3.0
    axes_dim: tuple[int, ...] = (32, 32, 32, 32)
    theta: int = 2000
    use_guidance_embed: bool = True
    # sampling defaults, kept beside the architecture they belong to
    default_steps: int = 50
    default_guidance: float | None = 4.0
    text_layers: tuple[int, ...] = (10, 20, 30)

    def __post_init__(self):
        if self.hidden_size % self.num_heads:
            raise ValueError(f"hidden_size {self.hidden_size} is not divisible by num_heads {self.num_heads}")
        if sum(self.axes_dim) != self.head_dim:
            raise ValueError(f"axes_dim {self.axes_dim} must sum to the head dim {self.head_dim}")
        if any(d % 2 for d in self.axes_dim):
            raise ValueError(f"every RoPE axis needs an even dim, got {self.axes_dim}")

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def mlp_hidden(self) -> int:
        return int(self.hidden_size * self.mlp_ratio)


PRESETS: dict[str, Flux2Config] = {
    "flux.2-dev": Flux2Config(
        in_channels=128,
        context_in_dim=15360,
        hidden_size=6144,
        num_heads=48,
        depth=8,
        depth_single_blocks=48,
        mlp_ratio=3.0,
        axes_dim=(32, 32, 32, 32),
        theta=2000,
        use_guidance_embed=True,
        default_steps=50,
        default_guidance=4.0,
        text_layers=(10, 20, 30),
    ),
    "flux.2-klein-9b": Flux2Config(
        in_channels=128,
        context_in_dim=12288,
        hidden_size=4096,
        num_heads=32,
        depth=8,
        depth_single_blocks=24,
        mlp_ratio=3.0,
        axes_dim=(32, 32, 32, 32),
        theta=2000,
        use_guidance_embed=False,
        default_steps=4,
        default_guidance=None,
        text_layers=(9, 18, 27),
    ),
    "flux.2-klein-4b": Flux2Config(
        in_channels=128,
        context_in_dim=7680,
        hidden_size=3072,
        num_heads=24,
        depth=5,
        depth_single_blocks=20,
        mlp_ratio=3.0,
        axes_dim=(32, 32, 32, 32),
        theta=2000,
        use_guidance_embed=False,
        default_steps=4,
        default_guidance=None,
        text_layers=(9, 18, 27),
    ),
    # CPU-sized: same block design, runs a forward in milliseconds. in_channels 32 = a tiny VAE's 8
    # latent channels x 2x2 patch; context 96 = three hidden-state layers of a 32-wide text encoder.
    "tiny": Flux2Config(
        in_channels=32,
        context_in_dim=96,
        hidden_size=128,
        num_heads=4,
        depth=2,
        depth_single_blocks=2,
        mlp_ratio=3.0,
        axes_dim=(8, 8, 8, 8),
        theta=2000,
        use_guidance_embed=True,
        default_steps=4,
        default_guidance=4.0,
        text_layers=(1, 2, 3),
    ),
}


def get_preset(name: str) -> Flux2Config:
    """Exact look-up; an unknown name fails with the list of valid ones."""
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; valid presets: {', '.join(PRESETS)}")
    return PRESETS[name]


def timestep_embedding(t: Tensor, dim: int = 256, max_period: float = 10000.0, time_factor: float = 1000.0):
    """cos-first sinusoidal embedding of 1000*t (BFL `timestep_embedding`)."""
    t = time_factor * t
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = t[:, None].float() * freqs[None]
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    return emb.to(t.dtype) if torch.is_floating_point(t) else emb


def rope(pos: Tensor, dim: int, theta: int) -> Tensor:
    """Rotation matrices (..., N, dim/2, 2, 2) for one axis: angle = pos * theta^(-2j/dim)."""
    f64 = pos.device.type != "mps"
    scale = torch.arange(0, dim, 2, dtype=torch.float64 if f64 else torch.float32, device=pos.device) / dim
    omega = 1.0 / (theta**scale)
    out = pos.to(omega.dtype)[..., None] * omega
    out = torch.stack([torch.cos(out), -torch.sin(out), torch.sin(out), torch.cos(out)], dim=-1)
    return out.unflatten(-1, (2, 2)).float()


class EmbedND(nn.Module):
    """RoPE tables for 4-axis ids (t, h, w, l): (B, 1, N, head_dim/2, 2, 2), axes concatenated in order."""

    def __init__(self, theta: int, axes_dim: tuple[int, ...]):
        super().__init__()
        self.theta = theta
        self.axes_dim = axes_dim

    def forward(self, ids: Tensor) -> Tensor:
        emb = torch.cat([rope(ids[..., i], d, self.theta) for i, d in enumerate(self.axes_dim)], dim=-3)
        return emb.unsqueeze(1)


class MLPEmbedder(nn.Module):
    def __init__(self, in_dim: int, hidden_dim: int):
        super().__init__()
        self.in_layer = nn.Linear(in_dim, hidden_dim, bias=False)
        self.silu = nn.SiLU()
        self.out_layer = nn.Linear(hidden_dim, hidden_dim, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        return self.out_layer(self.silu(self.in_layer(x)))


class RMSNorm(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.scale = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        # F.rms_norm upcasts to fp32, normalizes and casts back (as BFL's x.float()*rrms).to(dtype)), in
        # one kernel instead of five passes over Q and K
        return F.rms_norm(x, (x.shape[-1],), eps=1e-6) * self.scale


class QKNorm(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.query_norm = RMSNorm(dim)
        self.key_norm = RMSNorm(dim)

    def forward(self, q: Tensor, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        return self.query_norm(q).to(v), self.key_norm(k).to(v)


class SiLUActivation(nn.Module):
    """SwiGLU: SiLU on the first half (gate), times the second half (value)."""

    def forward(self, x: Tensor) -> Tensor:
        gate, value = x.chunk(2, dim=-1)
        return F.silu(gate) * value


class SelfAttention(nn.Module):
    def __init__(self, dim: int, num_heads: int):
        super().__init__()
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, dim * 3, bias=False)
        self.norm = QKNorm(dim // num_heads)
        self.proj = nn.Linear(dim, dim, bias=False)


class Modulation(nn.Module):
    """Shared modulation: one linear for all blocks of a kind, 6 (double) or 3 (single) chunks."""

    def __init__(self, dim: int, double: bool):
        super().__init__()
        self.multiplier = 6 if double else 3
        self.lin = nn.Linear(dim, self.multiplier * dim, bias=False)

    def forward(self, vec: Tensor) -> tuple[Tensor, ...]:
        return self.lin(F.silu(vec))[:, None, :].chunk(self.multiplier, dim=-1)


def _split_heads(qkv: Tensor, num_heads: int) -> tuple[Tensor, Tensor, Tensor]:
    """(B, L, 3*H*D) laid out [Q | K | V], head-major -> three (B, H, L, D)."""
    q, k, v = qkv.unflatten(-1, (3, num_heads, -1)).permute(2, 0, 3, 1, 4)
    return q, k, v


def _modulate(x: Tensor, shift: Tensor, scale: Tensor) -> Tensor:
    return torch.addcmul(shift, x, 1 + scale)


# --- the fused path's plumbing: a linear may take its input FP8-quantized by the producer kernel --------


def _act_quant(layer: nn.Module, x: Tensor) -> str | None:
    """ "row"/"block" when `layer` (a QuantLinear with an FP8 kernel) takes FP8 activations, else None."""
    get = getattr(layer, "activation_quant", None)
    return get(x.device) if get is not None else None


def _project(layer: nn.Module, x, residual: Tensor | None = None, gate: Tensor | None = None) -> Tensor:
    """layer(x), then FLUX.2's gated residual `residual + gate * out` (fused in the FP8 GEMM epilogue
    when the layer is a QuantLinear). x: a tensor, or (x_fp8, scale) for a layer with `_act_quant`."""
    if isinstance(layer, nn.Linear):
        out = layer(x)
        return out if residual is None else torch.addcmul(residual, gate, out)
    return layer(x, residual=residual, gate=gate)


def _norm_modulate_for(layer: nn.Module, x: Tensor, shift: Tensor, scale: Tensor):
    from flux2_bench.kernels.fused_modulate import norm_modulate

    return norm_modulate(x, shift, scale, eps=1e-6, quant=_act_quant(layer, x))


def _swiglu_for(layer: nn.Module, x: Tensor, prefix: Tensor | None = None):
    from flux2_bench.kernels.fused_modulate import swiglu

    return swiglu(x, prefix=prefix, quant=_act_quant(layer, x))


class DoubleStreamBlock(nn.Module):
    def __init__(self, hidden_size: int, num_heads: int, mlp_ratio: float):
        super().__init__()
        mlp_hidden = int(hidden_size * mlp_ratio)
        self.num_heads = num_heads
        self.img_norm1 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.img_attn = SelfAttention(hidden_size, num_heads)
        self.img_norm2 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.img_mlp = nn.Sequential(
            nn.Linear(hidden_size, 2 * mlp_hidden, bias=False),
            SiLUActivation(),
            nn.Linear(mlp_hidden, hidden_size, bias=False),
        )
        self.txt_norm1 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.txt_attn = SelfAttention(hidden_size, num_heads)
        self.txt_norm2 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.txt_mlp = nn.Sequential(
            nn.Linear(hidden_size, 2 * mlp_hidden, bias=False),
            SiLUActivation(),
            nn.Linear(mlp_hidden, hidden_size, bias=False),
        )

    def forward(self, img: Tensor, txt: Tensor, pe: Tensor, mod_img, mod_txt, rope=None) -> tuple[Tensor, Tensor]:
        """rope: (cos, sin) from `kernels.qk_rope.rope_cos_sin(pe)` selects the fused path."""
        if rope is not None:
            return self._forward_fused(img, txt, rope, mod_img, mod_txt)
        i_shift1, i_scale1, i_gate1, i_shift2, i_scale2, i_gate2 = mod_img
        t_shift1, t_scale1, t_gate1, t_shift2, t_scale2, t_gate2 = mod_txt

        img_q, img_k, img_v = _split_heads(
            self.img_attn.qkv(_modulate(self.img_norm1(img), i_shift1, i_scale1)), self.num_heads
        )
        img_q, img_k = self.img_attn.norm(img_q, img_k, img_v)
        txt_q, txt_k, txt_v = _split_heads(
            self.txt_attn.qkv(_modulate(self.txt_norm1(txt), t_shift1, t_scale1)), self.num_heads
        )
        txt_q, txt_k = self.txt_attn.norm(txt_q, txt_k, txt_v)

        # joint attention, text first
        q = torch.cat((txt_q, img_q), dim=2)
        k = torch.cat((txt_k, img_k), dim=2)
        v = torch.cat((txt_v, img_v), dim=2)
        attn = attention(q, k, v, pe)
        n_txt = txt.shape[1]
        txt_attn, img_attn = attn[:, :n_txt], attn[:, n_txt:]

        img = torch.addcmul(img, i_gate1, self.img_attn.proj(img_attn))
        img = torch.addcmul(img, i_gate2, self.img_mlp(_modulate(self.img_norm2(img), i_shift2, i_scale2)))
        txt = torch.addcmul(txt, t_gate1, self.txt_attn.proj(txt_attn))
        txt = torch.addcmul(txt, t_gate2, self.txt_mlp(_modulate(self.txt_norm2(txt), t_shift2, t_scale2)))
        return img, txt

    def _forward_fused(self, img: Tensor, txt: Tensor, rope, mod_img, mod_txt) -> tuple[Tensor, Tensor]:
        """The same block with fused kernels: LayerNorm + modulate (+ FP8 quantization) in one pass,
        QK-norm + RoPE written straight into the joint Q/K/V buffers (no torch.cat), SwiGLU (+ FP8
        quantization) in one pass, and the gated residual in the FP8 GEMM epilogue."""
        from flux2_bench.kernels.qk_rope import joint_buffers, qk_norm_rope

        cos, sin = rope
        n_txt = txt.shape[1]
        B, H = img.shape[0], self.num_heads
        q, k, v = joint_buffers(
            B, H, n_txt + img.shape[1], img.shape[-1] // H, dtype=img.dtype, device=img.device, with_v=True
        )
        streams = (
            (txt, self.txt_attn, mod_txt, slice(0, n_txt)),
            (img, self.img_attn, mod_img, slice(n_txt, None)),
        )
        for x, attn, mod, part in streams:
            qkv = _project(attn.qkv, _norm_modulate_for(attn.qkv, x, mod[0], mod[1]))
            xq, xk, xv = _split_heads(qkv, H)
            qk_norm_rope(
                xq, xk, attn.norm.query_norm.scale, attn.norm.key_norm.scale, cos[:, part], sin[:, part],
                eps=1e-6, v=xv, out=(q[:, :, part], k[:, :, part], v[:, :, part]),
            )  # fmt: skip
        o = attend(q, k, v).transpose(1, 2).flatten(2)  # (B, L, H*D); free when o is (B, L, H, D) in memory
        del q, k, v, qkv, xq, xk, xv

        outs = []
        for x, o_part, attn, mlp, mod in (
            (img, o[:, n_txt:], self.img_attn, self.img_mlp, mod_img),
            (txt, o[:, :n_txt], self.txt_attn, self.txt_mlp, mod_txt),
        ):
            x = _project(attn.proj, o_part, residual=x, gate=mod[2])
            h = _project(mlp[0], _norm_modulate_for(mlp[0], x, mod[3], mod[4]))
            outs.append(_project(mlp[2], _swiglu_for(mlp[2], h), residual=x, gate=mod[5]))
        return outs[0], outs[1]


class SingleStreamBlock(nn.Module):
    """Parallel attention + MLP: linear1 fuses QKV and the SwiGLU input, linear2 their outputs."""

    def __init__(self, hidden_size: int, num_heads: int, mlp_ratio: float):
        super().__init__()
        self.hidden_size = hidden_size
        self.num_heads = num_heads
        self.mlp_hidden = int(hidden_size * mlp_ratio)
        self.linear1 = nn.Linear(hidden_size, 3 * hidden_size + 2 * self.mlp_hidden, bias=False)
        self.linear2 = nn.Linear(hidden_size + self.mlp_hidden, hidden_size, bias=False)
        self.norm = QKNorm(hidden_size // num_heads)
        self.pre_norm = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.mlp_act = SiLUActivation()

    def forward(self, x: Tensor, pe: Tensor, mod, rope=None) -> Tensor:
        """rope: (cos, sin) from `kernels.qk_rope.rope_cos_sin(pe)` selects the fused path."""
        if rope is not None:
            return self._forward_fused(x, rope, mod)
        shift, scale, gate = mod
        qkv, mlp = self.linear1(_modulate(self.pre_norm(x), shift, scale)).split(
            [3 * self.hidden_size, 2 * self.mlp_hidden], dim=-1
        )
        q, k, v = _split_heads(qkv, self.num_heads)
        q, k = self.norm(q, k, v)
        attn = attention(q, k, v, pe)
        return torch.addcmul(x, gate, self.linear2(torch.cat((attn, self.mlp_act(mlp)), dim=-1)))

    def _forward_fused(self, x: Tensor, rope, mod) -> Tensor:
        """Fused kernels as in DoubleStreamBlock._forward_fused; SwiGLU also writes the attention output
        in front of its result, so linear2's input is built (and FP8-quantized) in one pass, no torch.cat."""
        from flux2_bench.kernels.qk_rope import qk_norm_rope

        shift, scale, gate = mod
        h = _project(self.linear1, _norm_modulate_for(self.linear1, x, shift, scale))
        qkv, mlp = h.split([3 * self.hidden_size, 2 * self.mlp_hidden], dim=-1)
        q, k, v = _split_heads(qkv, self.num_heads)
        q, k = qk_norm_rope(q, k, self.norm.query_norm.scale, self.norm.key_norm.scale, *rope, eps=1e-6)
        o = attend(q, k, v).transpose(1, 2)  # (B, L, H, D)
        del q, k, v, qkv, h  # mlp (a view) keeps linear1's output alive until SwiGLU has read it
        a = _swiglu_for(self.linear2, mlp, prefix=o)
        del mlp, o  # frees linear1's output before linear2 (peak memory of the 4-bit models)
        return _project(self.linear2, a, residual=x, gate=gate)


class LastLayer(nn.Module):
    def __init__(self, hidden_size: int, out_channels: int):
        super().__init__()
        self.norm_final = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.linear = nn.Linear(hidden_size, out_channels, bias=False)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 2 * hidden_size, bias=False))

    def forward(self, x: Tensor, vec: Tensor) -> Tensor:
        shift, scale = self.adaLN_modulation(vec).chunk(2, dim=-1)  # BFL order: shift first
        return self.linear(_modulate(self.norm_final(x), shift[:, None], scale[:, None]))


class Flux2(nn.Module):
    def __init__(self, config: Flux2Config):
        super().__init__()
        self.config = config
        h = config.hidden_size
        self.pe_embedder = EmbedND(config.theta, config.axes_dim)
        self.img_in = nn.Linear(config.in_channels, h, bias=False)
        self.time_in = MLPEmbedder(256, h)
        if config.use_guidance_embed:
            self.guidance_in = MLPEmbedder(256, h)
        self.txt_in = nn.Linear(config.context_in_dim, h, bias=False)
        self.double_blocks = nn.ModuleList(
            DoubleStreamBlock(h, config.num_heads, config.mlp_ratio) for _ in range(config.depth)
        )
        self.single_blocks = nn.ModuleList(
            SingleStreamBlock(h, config.num_heads, config.mlp_ratio) for _ in range(config.depth_single_blocks)
        )
        self.double_stream_modulation_img = Modulation(h, double=True)
        self.double_stream_modulation_txt = Modulation(h, double=True)
        self.single_stream_modulation = Modulation(h, double=False)
        self.final_layer = LastLayer(h, config.in_channels)

    def forward(
        self,
        img: Tensor,
        img_ids: Tensor,
        txt: Tensor,
        txt_ids: Tensor,
        timesteps: Tensor,
        guidance: Tensor | None = None,
    ) -> Tensor:
        cfg = self.config
        if img.ndim != 3 or img.shape[-1] != cfg.in_channels:
            raise ValueError(f"img must be (B, N, {cfg.in_channels}), got {tuple(img.shape)}")
        if txt.ndim != 3 or txt.shape[-1] != cfg.context_in_dim:
            raise ValueError(f"txt must be (B, N, {cfg.context_in_dim}), got {tuple(txt.shape)}")
        if img_ids.shape[:2] != img.shape[:2] or txt_ids.shape[:2] != txt.shape[:2]:
            raise ValueError(
                f"ids must match their tokens: img {tuple(img.shape)} vs img_ids {tuple(img_ids.shape)}, "
                f"txt {tuple(txt.shape)} vs txt_ids {tuple(txt_ids.shape)}"
            )

        vec = self.time_in(timestep_embedding(timesteps, 256))
        if cfg.use_guidance_embed:
            if guidance is None:
                raise ValueError("this preset embeds guidance: pass guidance=(B,) tensor, e.g. 4.0")
            vec = vec + self.guidance_in(timestep_embedding(guidance, 256))

        mod_img = self.double_stream_modulation_img(vec)
        mod_txt = self.double_stream_modulation_txt(vec)
        mod_single = self.single_stream_modulation(vec)

        img = self.img_in(img)
        txt = self.txt_in(txt)
        pe = self.pe_embedder(torch.cat((txt_ids, img_ids), dim=1))  # text first, as the sequence

        rope = None
        if fused_active(img):
            from flux2_bench.kernels.qk_rope import rope_cos_sin

            rope = rope_cos_sin(pe)
        for block in self.double_blocks:
            img, txt = block(img, txt, pe, mod_img, mod_txt, rope=rope)
        n_txt = txt.shape[1]
        x = torch.cat((txt, img), dim=1)
        for block in self.single_blocks:
            x = block(x, pe, mod_single, rope=rope)
        return self.final_layer(x[:, n_txt:], vec)


def num_parameters(config: Flux2Config) -> int:
    """Parameter count from the config alone (no allocation)."""
    with torch.device("meta"):
        return sum(p.numel() for p in Flux2(config).parameters())
