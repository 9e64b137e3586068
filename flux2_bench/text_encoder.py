"""Text-encoder glue (spec §6): prompt → (B, 512, 3·hidden) FLUX.2 context via transformers.

FLUX.2 [dev]: Mistral-Small-3.x (`Mistral3ForConditionalGeneration`), system message + user prompt
through the processor's chat template, padded/truncated to 512 tokens, hidden states 10/20/30
concatenated per token as [layer10 | layer20 | layer30]. FLUX.2 [klein]: Qwen3, a single user
message with `enable_thinking=False`, hidden states 9/18/27. Exactly the recipe of diffusers'
`Flux2Pipeline` / `Flux2KleinPipeline`, which the tests use as the oracle.

`EmbeddingCache` stores embeddings on disk keyed by encoder identity (path + config hash + layers)
and prompt, so a benchmark encodes its prompts once, frees the 24B encoder, and never loads it again.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import torch
from torch import Tensor

from flux2_bench.safetensors_io import SafetensorsReader, save_streaming

# BFL `system_messages.py` SYSTEM_MESSAGE; the line break after "object" is part of the text.
SYSTEM_MESSAGE = (
    "You are an AI that reasons about image descriptions. You give structured responses focusing on "
    "object relationships, object\nattribution and actions without speculation."
)
MAX_LENGTH = 512
LAYERS = {"mistral": (10, 20, 30), "qwen3": (9, 18, 27)}


def _kind_of(config) -> str:
    mt = getattr(config, "model_type", "")
    if mt in ("mistral3", "mistral"):
        return "mistral"
    if mt in ("qwen3",):
        return "qwen3"
    raise ValueError(f"unsupported text encoder model_type {mt!r}; FLUX.2 uses mistral3 (dev) or qwen3 (klein)")


class TextEncoder:
    """A transformers model + tokenizer/processor that turns prompts into FLUX.2 context tokens.

    The encoder may live on its own device and dtype; `encode` returns the embeddings there, the
    pipeline moves them. `unload()` drops the weights (the cache still answers known prompts).
    """

    def __init__(
        self,
        model,
        tokenizer,
        *,
        kind: str | None = None,
        layers: tuple[int, ...] | None = None,
        max_length: int = MAX_LENGTH,
        identity: str | None = None,
    ):
        self.model = model
        self.tokenizer = tokenizer
        self.kind = kind or _kind_of(model.config)
        if self.kind not in LAYERS:
            raise ValueError(f"kind must be one of {list(LAYERS)}, got {self.kind!r}")
        self.layers = tuple(layers or LAYERS[self.kind])
        self.max_length = max_length
        cfg_hash = hashlib.sha256(model.config.to_json_string(use_diff=False).encode()).hexdigest()[:16]
        self.identity = f"{identity or type(model).__name__}|config={cfg_hash}|layers={self.layers}|L={max_length}"

    @classmethod
    def from_pretrained(
        cls,
        folder: str | os.PathLike,
        *,
        tokenizer_folder: str | os.PathLike | None = None,
        device: str | torch.device = "cpu",
        dtype: torch.dtype = torch.bfloat16,
        layers: tuple[int, ...] | None = None,
    ) -> TextEncoder:
        """Load from a local folder (never the hub). The tokenizer/processor comes from
        `tokenizer_folder` (diffusers layout: `tokenizer/`) or the model folder itself."""
        from transformers import AutoConfig, AutoProcessor, AutoTokenizer

        folder = Path(folder)
        if not (folder / "config.json").is_file():
            raise FileNotFoundError(f"{folder}: no config.json; expected a transformers text-encoder folder")
        config = AutoConfig.from_pretrained(folder, local_files_only=True)
        kind = _kind_of(config)
        tok_dir = Path(tokenizer_folder) if tokenizer_folder else folder
        if kind == "mistral" and (tok_dir / "processor_config.json").is_file():
            tokenizer = AutoProcessor.from_pretrained(tok_dir, local_files_only=True)
        else:
            tokenizer = AutoTokenizer.from_pretrained(tok_dir, local_files_only=True)
        if kind == "mistral":
            from transformers import Mistral3ForConditionalGeneration as Model

            if config.model_type == "mistral":
                from transformers import MistralForCausalLM as Model
        else:
            from transformers import Qwen3ForCausalLM as Model
        model = Model.from_pretrained(folder, dtype=dtype, local_files_only=True).to(device).eval()
        return cls(model, tokenizer, kind=kind, layers=layers, identity=str(folder.resolve()))

    @property
    def device(self) -> torch.device:
        if self.model is None:
            raise RuntimeError("text encoder was unloaded")
        return next(self.model.parameters()).device

    def tokenize(self, prompts: list[str]) -> dict[str, Tensor]:
        """input_ids and attention_mask, (B, max_length), exactly as diffusers builds them."""
        if self.kind == "mistral":
            messages = [
                [
                    {"role": "system", "content": [{"type": "text", "text": SYSTEM_MESSAGE}]},
                    {"role": "user", "content": [{"type": "text", "text": p.replace("[IMG]", "")}]},
                ]
                for p in prompts
            ]
            out = self.tokenizer.apply_chat_template(
                messages,
                add_generation_prompt=False,
                tokenize=True,
                return_dict=True,
                return_tensors="pt",
                padding="max_length",
                truncation=True,
                max_length=self.max_length,
            )
            return {"input_ids": out["input_ids"], "attention_mask": out["attention_mask"]}
        ids, masks = [], []
        for p in prompts:
            text = self.tokenizer.apply_chat_template(
                [{"role": "user", "content": p}], tokenize=False, add_generation_prompt=True, enable_thinking=False
            )
            t = self.tokenizer(
                text, return_tensors="pt", padding="max_length", truncation=True, max_length=self.max_length
            )
            ids.append(t["input_ids"])
            masks.append(t["attention_mask"])
        return {"input_ids": torch.cat(ids), "attention_mask": torch.cat(masks)}

    @torch.no_grad()
    def encode_ids(self, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        """(B, L) token ids → (B, L, len(layers)·hidden), layers concatenated per token."""
        out = self.model(
            input_ids=input_ids.to(self.device),
            attention_mask=attention_mask.to(self.device),
            output_hidden_states=True,
            use_cache=False,
        )
        hs = torch.stack([out.hidden_states[k] for k in self.layers], dim=1)  # (B, 3, L, H)
        b, n, length, h = hs.shape
        return hs.permute(0, 2, 1, 3).reshape(b, length, n * h)

    def encode(self, prompts: str | list[str]) -> Tensor:
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        return self.encode_ids(**self.tokenize(prompts))

    def unload(self) -> None:
        """Drop the weights (and free their device memory)."""
        dev = None if self.model is None else self.device
        self.model = None
        if dev is not None and dev.type == "cuda":
            torch.cuda.empty_cache()


class EmbeddingCache:
    """On-disk prompt-embedding cache: one safetensors file per (encoder identity, prompt)."""

    def __init__(self, folder: str | os.PathLike):
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        self.hits = 0
        self.misses = 0

    def _path(self, identity: str, prompt: str) -> Path:
        key = hashlib.sha256(json.dumps([identity, prompt]).encode()).hexdigest()
        return self.folder / f"{key}.safetensors"

    def get(self, identity: str, prompt: str) -> Tensor | None:
        path = self._path(identity, prompt)
        if not path.is_file():
            return None
        r = SafetensorsReader(path)
        if r.metadata.get("identity") != identity or r.metadata.get("prompt") != prompt:
            return None  # hash collision or foreign file: treat as a miss
        return r.read("prompt_embeds")

    def put(self, identity: str, prompt: str, embeds: Tensor) -> None:
        meta = {"identity": identity, "prompt": prompt}
        save_streaming(self._path(identity, prompt), {"prompt_embeds": embeds.detach().cpu().contiguous()}, meta)

    def encode(self, encoder: TextEncoder, prompts: str | list[str]) -> Tensor:
        """(B, L, D) embeddings (CPU) for `prompts`, encoding only the ones not cached yet."""
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        found = [self.get(encoder.identity, p) for p in prompts]
        todo = [p for p, e in zip(prompts, found, strict=True) if e is None]
        self.hits += len(prompts) - len(todo)
        self.misses += len(todo)
        if todo:
            new = encoder.encode(todo).cpu()
            for p, e in zip(todo, new, strict=True):
                self.put(encoder.identity, p, e[None])
            it = iter(new)
            found = [e if e is not None else next(it)[None] for e in found]
        return torch.cat(found)
