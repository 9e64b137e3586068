"""Text-encoder glue against diffusers' Flux2Pipeline / Flux2KleinPipeline prompt encoders.

Tiny random Mistral3 and Qwen3 models and a word-level tokenizer are built offline here; the
tokenizer's chat template renders the Mistral format `<s>[SYSTEM_PROMPT]…[/SYSTEM_PROMPT][INST]…[/INST]`
(the real processor's template is not available offline) and a Qwen3-style template.
"""

import pytest
import torch

from flux2_bench.text_encoder import SYSTEM_MESSAGE, EmbeddingCache, TextEncoder

transformers = pytest.importorskip("transformers")
pytest.importorskip("diffusers")
from diffusers.pipelines.flux2.pipeline_flux2 import Flux2Pipeline as HFPipe  # noqa: E402
from diffusers.pipelines.flux2.pipeline_flux2_klein import Flux2KleinPipeline as HFKlein  # noqa: E402

WORDS = [
    "a",
    "an",
    "the",
    "cat",
    "dog",
    "red",
    "blue",
    "sign",
    "says",
    "hello",
    "world",
    "you",
    "are",
    "ai",
    "that",
    "reasons",
    "about",
    "image",
    "descriptions",
    "give",
    "structured",
    "responses",
    "focusing",
    "on",
    "object",
    "relationships",
    "attribution",
    "and",
    "actions",
    "without",
    "speculation",
]
MISTRAL_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}{% if m['content'] is string %}{% set text = m['content'] %}"
    "{% else %}{% set text = m['content'] | selectattr('type', 'equalto', 'text') | map(attribute='text') "
    "| join('') %}{% endif %}{% if m['role'] == 'system' %}[SYSTEM_PROMPT]{{ text }}[/SYSTEM_PROMPT]"
    "{% elif m['role'] == 'user' %}[INST]{{ text }}[/INST]{% endif %}{% endfor %}"
)
QWEN_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }} {{ m['content'] }}<|im_end|> {% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant {% if enable_thinking is defined and not "
    "enable_thinking %}<think> </think> {% endif %}{% endif %}"
)


def tiny_tokenizer(kind: str):
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers

    if kind == "mistral":
        special = ["<unk>", "<s>", "</s>", "<pad>", "[INST]", "[/INST]", "[SYSTEM_PROMPT]", "[/SYSTEM_PROMPT]"]
    else:
        special = ["<unk>", "<|endoftext|>", "<|im_start|>", "<|im_end|>", "<think>", "</think>"]
    vocab = {w: i for i, w in enumerate(special + WORDS + ["user", "assistant", "system"])}
    tk = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tk.normalizer = normalizers.Lowercase()
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    if kind == "mistral":
        tok = transformers.PreTrainedTokenizerFast(
            tokenizer_object=tk, bos_token="<s>", eos_token="</s>", unk_token="<unk>", pad_token="<pad>",
            padding_side="left", additional_special_tokens=special[4:],
        )  # fmt: skip
        tok.chat_template = MISTRAL_TEMPLATE
    else:
        tok = transformers.PreTrainedTokenizerFast(
            tokenizer_object=tk, eos_token="<|im_end|>", unk_token="<unk>", pad_token="<|endoftext|>",
            padding_side="right", additional_special_tokens=special[2:],
        )  # fmt: skip
        tok.chat_template = QWEN_TEMPLATE
    return tok


def tiny_mistral3(vocab: int = 64, seed: int = 0):
    torch.manual_seed(seed)
    text = transformers.MistralConfig(
        vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
        num_key_value_heads=2, head_dim=8, max_position_embeddings=1024,
    )  # fmt: skip
    vision = transformers.PixtralVisionConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, image_size=32,
        patch_size=16, head_dim=16,
    )  # fmt: skip
    cfg = transformers.Mistral3Config(
        text_config=text, vision_config=vision, image_token_index=vocab - 1, spatial_merge_size=1
    )
    return transformers.Mistral3ForConditionalGeneration(cfg).eval()


def tiny_qwen3(vocab: int = 64, seed: int = 0):
    torch.manual_seed(seed)
    cfg = transformers.Qwen3Config(
        vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
        num_key_value_heads=2, head_dim=8, max_position_embeddings=1024,
    )  # fmt: skip
    return transformers.Qwen3ForCausalLM(cfg).eval()


def tiny_text_encoder(kind: str = "mistral") -> TextEncoder:
    model = tiny_mistral3() if kind == "mistral" else tiny_qwen3()
    return TextEncoder(model, tiny_tokenizer(kind), layers=(1, 2, 3))


PROMPTS = ["a red cat says hello", "the blue dog [IMG] sign"]


def test_system_message_is_verbatim():
    assert "object relationships, object\nattribution and actions" in SYSTEM_MESSAGE
    from diffusers.pipelines.flux2.system_messages import SYSTEM_MESSAGE as HF

    assert SYSTEM_MESSAGE == HF


def test_mistral_embeddings_match_diffusers():
    te = tiny_text_encoder("mistral")
    got = te.encode(PROMPTS)
    ref = HFPipe._get_mistral_3_small_prompt_embeds(
        te.model, te.tokenizer, PROMPTS, hidden_states_layers=(1, 2, 3), max_sequence_length=512
    )
    assert got.shape == (2, 512, 96)
    assert torch.equal(got, ref)  # same calls, same order: bit-identical
    ids = te.tokenize(PROMPTS[:1])["input_ids"][0]
    text = te.tokenizer.decode(ids[ids != te.tokenizer.pad_token_id]).replace(" ", "")
    assert text.startswith("<s>[SYSTEM_PROMPT]youareanai") and text.endswith("[/INST]"), text
    assert (ids == te.tokenizer.pad_token_id).sum() > 400 and ids[-1] != te.tokenizer.pad_token_id  # left pad
    # the layout is [layer1 | layer2 | layer3] per token, no final norm
    out = te.model(**{k: v for k, v in te.tokenize(PROMPTS).items()}, output_hidden_states=True)
    assert torch.equal(got[..., 32:64], out.hidden_states[2])


def test_qwen3_embeddings_match_diffusers():
    te = tiny_text_encoder("qwen3")
    got = te.encode(PROMPTS)
    ref = HFKlein._get_qwen3_prompt_embeds(te.model, te.tokenizer, PROMPTS, hidden_states_layers=(1, 2, 3))
    assert got.shape == (2, 512, 96)
    assert torch.equal(got, ref)


def test_default_layers_and_bad_kind():
    te = TextEncoder(tiny_qwen3(), tiny_tokenizer("qwen3"))
    assert te.layers == (9, 18, 27)
    with pytest.raises(ValueError, match="kind must be one of"):
        TextEncoder(tiny_qwen3(), tiny_tokenizer("qwen3"), kind="t5")


def test_from_pretrained_folder(tmp_path):
    te = tiny_text_encoder("mistral")
    te.model.save_pretrained(tmp_path / "text_encoder")
    te.tokenizer.save_pretrained(tmp_path / "tokenizer")
    te2 = TextEncoder.from_pretrained(
        tmp_path / "text_encoder", tokenizer_folder=tmp_path / "tokenizer", dtype=torch.float32, layers=(1, 2, 3)
    )
    assert te2.kind == "mistral"
    assert torch.allclose(te2.encode(PROMPTS[0]), te.encode(PROMPTS[0]), atol=1e-6)
    with pytest.raises(FileNotFoundError, match="config.json"):
        TextEncoder.from_pretrained(tmp_path)


def test_cache_encodes_once_and_keys_by_identity(tmp_path):
    te = tiny_text_encoder("mistral")
    calls = []
    orig = te.encode_ids
    te.encode_ids = lambda *a, **k: calls.append(1) or orig(*a, **k)
    cache = EmbeddingCache(tmp_path)
    first = cache.encode(te, PROMPTS)
    assert len(calls) == 1 and cache.misses == 2
    ident = te.identity
    te.unload()
    with pytest.raises(RuntimeError, match="unloaded"):
        te.encode(PROMPTS)
    again = cache.encode(te, PROMPTS)  # answered from disk with the encoder gone
    assert torch.equal(again, first) and cache.hits == 2
    # another encoder (different weights config) misses
    other = TextEncoder(tiny_mistral3(vocab=65), tiny_tokenizer("mistral"), layers=(1, 2, 3))
    assert other.identity != ident
    assert cache.get(other.identity, PROMPTS[0]) is None
    assert cache.get(ident, "never seen") is None
