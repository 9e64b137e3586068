"""Typography: can a precision still draw the text a prompt asks for? OCR, then CER / word accuracy.

    suite = load_suite()                               # 36 prompts, target text in double quotes
    engines = available_engines()                      # ["rapidocr", "tesseract"] when installed
    s = score_image(image, suite[0].target, engines)   # {"rapidocr": {"text", "cer", ...}, ...}
    rows = [{"recipe": "fp8", "id": p.id, "scores": s}, ...]
    summary = score_suite(rows)                        # {recipe: {engine: {n, cer, word_accuracy, exact_match}}}
    deltas = delta_vs(summary, baseline="bf16")        # {recipe: {engine: {cer: Δ, ...}}}

Normalization (`normalize`): Unicode NFKC (full-width OCR output such as "：" becomes ":"),
case-folded, whitespace runs collapsed to one space, stripped. Punctuation is KEPT: it is one of the
suite's categories, so "No Parking" read for "No Parking!" is an error.

Metrics, all on normalized text:
- `cer`: character edit distance (Levenshtein) / len(target). 0 is perfect; it can exceed 1 when
  the OCR reads more text than the target has.
- `word_accuracy`: fraction of target words that occur in the OCR words (each OCR word matches at
  most once, order ignored: a sign's lines may be read in another order).
- `exact_match`: the normalized OCR text equals the normalized target.

OCR engines read the whole image and join the detected lines in reading order (top to bottom, then
left to right within a line). Engine objects are cached per process: `get_engine(name)` loads the
models once. rapidocr runs PP-OCR (models shipped in its wheel) on onnxruntime; tesseract is used
only when its binary is installed.
"""

from __future__ import annotations

import functools
import importlib.util
import json
import re
import shutil
import unicodedata
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from flux2_bench.fidelity import as_batch

SCORE_KEYS = ("cer", "word_accuracy", "exact_match")
CATEGORIES = ("sign", "label", "poster", "digits", "punctuation", "mixed_case")
MAX_TARGET_WORDS = 6
_QUOTED = re.compile(r'"([^"]*)"')


# ---------------------------------------------------------------------------------------------------
# The prompt suite


@dataclass(frozen=True)
class TypographyPrompt:
    id: str
    category: str
    prompt: str
    target: str


def extract_target(prompt: str) -> str:
    """The text a prompt asks for: its double-quoted span(s), joined by one space in prompt order."""
    spans = [s.strip() for s in _QUOTED.findall(prompt)]
    spans = [s for s in spans if s]
    if not spans:
        raise ValueError(f"prompt has no non-empty double-quoted text: {prompt!r}")
    return " ".join(spans)


def load_suite(path: str | Path | None = None) -> list[TypographyPrompt]:
    """The shipped suite (`flux2_bench/data/typography_prompts.json`) or another file of that format.

    Validates every entry: unique ids, a known category, a 1-6 word target equal to the prompt's
    double-quoted text. Raises ValueError naming the first bad entry.
    """
    if path is None:
        text = resources.files("flux2_bench").joinpath("data/typography_prompts.json").read_text("utf-8")
        where = "flux2_bench/data/typography_prompts.json"
    else:
        text, where = Path(path).read_text("utf-8"), str(path)
    data = json.loads(text)
    prompts = data["prompts"] if isinstance(data, dict) else data
    out, seen = [], set()
    for i, entry in enumerate(prompts):
        missing = {"id", "category", "prompt", "target"} - set(entry)
        if missing:
            raise ValueError(f"{where} entry {i}: missing fields {sorted(missing)}")
        p = TypographyPrompt(**{k: entry[k] for k in ("id", "category", "prompt", "target")})
        if p.id in seen:
            raise ValueError(f"{where}: duplicate id {p.id!r}")
        seen.add(p.id)
        if p.category not in CATEGORIES:
            raise ValueError(f"{where} {p.id}: unknown category {p.category!r}; valid: {', '.join(CATEGORIES)}")
        quoted = extract_target(p.prompt)
        if quoted != p.target:
            raise ValueError(f"{where} {p.id}: target {p.target!r} differs from the quoted text {quoted!r}")
        n_words = len(p.target.split())
        if not 1 <= n_words <= MAX_TARGET_WORDS:
            raise ValueError(f"{where} {p.id}: target {p.target!r} has {n_words} words; expected 1-{MAX_TARGET_WORDS}")
        out.append(p)
    return out


# ---------------------------------------------------------------------------------------------------
# String metrics


def normalize(text: str) -> str:
    """NFKC, case-fold, collapse whitespace, strip. Punctuation is kept."""
    return " ".join(unicodedata.normalize("NFKC", text).casefold().split())


def levenshtein(a: Sequence, b: Sequence) -> int:
    """Edit distance (insertions, deletions, substitutions; each costs 1) between two sequences."""
    if len(a) < len(b):
        a, b = b, a
    prev = list(range(len(b) + 1))
    for i, x in enumerate(a, 1):
        cur = [i]
        for j, y in enumerate(b, 1):
            cur.append(min(prev[j] + 1, cur[j - 1] + 1, prev[j - 1] + (x != y)))
        prev = cur
    return prev[-1]


def cer(target: str, hyp: str) -> float:
    """Character error rate: Levenshtein(normalize(target), normalize(hyp)) / len(normalize(target))."""
    t, h = normalize(target), normalize(hyp)
    if not t:
        raise ValueError(f"target text is empty after normalization: {target!r}")
    return levenshtein(t, h) / len(t)


def word_accuracy(target: str, hyp: str) -> float:
    """Fraction of target words found among the OCR words (multiset match, order ignored)."""
    t, h = normalize(target).split(), normalize(hyp).split()
    if not t:
        raise ValueError(f"target text is empty after normalization: {target!r}")
    pool: dict[str, int] = {}
    for w in h:
        pool[w] = pool.get(w, 0) + 1
    hits = 0
    for w in t:
        if pool.get(w, 0) > 0:
            pool[w] -= 1
            hits += 1
    return hits / len(t)


def exact_match(target: str, hyp: str) -> bool:
    """True when the normalized texts are equal."""
    return normalize(target) == normalize(hyp)


# ---------------------------------------------------------------------------------------------------
# OCR engines


def _to_pil(image) -> Image.Image:
    """PIL / uint8 HWC numpy / CHW float tensor in [0, 1] (the `fidelity` convention) → RGB PIL."""
    if isinstance(image, Image.Image):
        return image.convert("RGB")
    x = as_batch(image)[0]
    if x.shape[0] == 1:
        x = x.expand(3, -1, -1)
    arr = (x.clamp(0, 1).permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
    return Image.fromarray(arr)


def _reading_order(boxes: np.ndarray, texts: Sequence[str]) -> str:
    """Join detected lines top-to-bottom, left-to-right: boxes whose vertical centers lie within half
    a line height of a row's first box belong to that row."""
    items = []
    for box, text in zip(boxes, texts, strict=True):
        ys, xs = box[:, 1], box[:, 0]
        items.append(((ys.min() + ys.max()) / 2, max(ys.max() - ys.min(), 1.0), xs.min(), text))
    items.sort(key=lambda it: it[0])
    rows: list[list] = []
    for it in items:
        if rows and abs(it[0] - rows[-1][0][0]) <= 0.5 * rows[-1][0][1]:
            rows[-1].append(it)
        else:
            rows.append([it])
    return " ".join(it[3] for row in rows for it in sorted(row, key=lambda it: it[2]))


class RapidOcrEngine:
    """PP-OCR (detection + recognition) through rapidocr/onnxruntime, models from rapidocr's wheel.

    `det_limit_side_len`: the detector resizes the image so its LONGER side is at most this many
    pixels. rapidocr's default (shorter side at least 736) upscales a 512×256 render to 1472×736 and
    takes ~5 s per image on 2 CPU cores; longest side ≤ 960 takes ~0.5 s and reads better.
    """

    name = "rapidocr"

    def __init__(self, det_limit_side_len: int = 960):
        from rapidocr import RapidOCR

        self._ocr = RapidOCR(
            params={
                "Global.log_level": "error",  # an image without text is a result, not a warning
                "Det.limit_type": "max",
                "Det.limit_side_len": det_limit_side_len,
            }
        )

    def read(self, image) -> str:
        """All text in the image, lines joined by one space in reading order ('' when none)."""
        r = self._ocr(np.asarray(_to_pil(image)))
        if r.txts is None or len(r.txts) == 0:
            return ""
        return _reading_order(np.asarray(r.boxes, dtype=np.float64), r.txts)


class TesseractEngine:
    """Tesseract 5 through pytesseract (English model, automatic page segmentation)."""

    name = "tesseract"

    def __init__(self, lang: str = "eng"):
        if shutil.which("tesseract") is None:
            raise RuntimeError("tesseract binary not found on PATH (Debian: apt-get install tesseract-ocr)")
        import pytesseract

        self._tess = pytesseract
        self.lang = lang

    def read(self, image) -> str:
        """All text in the image; tesseract already emits lines in reading order."""
        return " ".join(self._tess.image_to_string(_to_pil(image), lang=self.lang).split())


ENGINES = {"rapidocr": RapidOcrEngine, "tesseract": TesseractEngine}


def available_engines() -> list[str]:
    """Names of the engines whose packages (and, for tesseract, binary) are installed."""
    names = []
    if importlib.util.find_spec("rapidocr") and importlib.util.find_spec("onnxruntime"):
        names.append("rapidocr")
    if importlib.util.find_spec("pytesseract") and shutil.which("tesseract"):
        names.append("tesseract")
    return names


@functools.cache
def get_engine(name: str):
    """The process-wide engine object for `name` (models load once)."""
    if name not in ENGINES:
        raise ValueError(f"unknown OCR engine {name!r}; valid: {', '.join(ENGINES)}")
    return ENGINES[name]()


def _engines(engines: Iterable | None) -> list:
    if engines is None:
        engines = available_engines()
        if not engines:
            raise RuntimeError("no OCR engine available: install rapidocr + onnxruntime (or tesseract)")
    return [get_engine(e) if isinstance(e, str) else e for e in engines]


# ---------------------------------------------------------------------------------------------------
# Scoring


def score_text(target: str, text: str) -> dict:
    """{"text", "cer", "word_accuracy", "exact_match"} of one OCR reading against the target."""
    return {
        "text": text,
        "cer": cer(target, text),
        "word_accuracy": word_accuracy(target, text),
        "exact_match": exact_match(target, text),
    }


def score_image(image, target: str, engines: Iterable | None = None) -> dict[str, dict]:
    """OCR `image` with each engine (names or engine objects; default: all available) and score it.

    Returns {engine name: {"text", "cer", "word_accuracy", "exact_match"}}.
    """
    return {e.name: score_text(target, e.read(image)) for e in _engines(engines)}


def score_suite(results: Iterable[dict]) -> dict[str, dict[str, dict]]:
    """Aggregate per-image scores into means per recipe and engine.

    `results`: rows {"recipe": str, "id": str, "scores": score_image(...)}.
    Returns {recipe: {engine: {"n", "cer", "word_accuracy", "exact_match"}}} where cer and
    word_accuracy are means and exact_match is the fraction of exact matches.
    """
    acc: dict[str, dict[str, list[dict]]] = {}
    for row in results:
        for key in ("recipe", "id", "scores"):
            if key not in row:
                raise ValueError(f"result row lacks {key!r}: {row!r}")
        for engine, s in row["scores"].items():
            acc.setdefault(row["recipe"], {}).setdefault(engine, []).append(s)
    return {
        recipe: {
            engine: {"n": len(ss), **{k: float(np.mean([float(s[k]) for s in ss])) for k in SCORE_KEYS}}
            for engine, ss in by_engine.items()
        }
        for recipe, by_engine in acc.items()
    }


def delta_vs(summary: dict[str, dict[str, dict]], baseline: str = "bf16") -> dict[str, dict[str, dict]]:
    """Per-recipe differences (recipe − baseline) of every score, per engine both have.

    A positive CER delta is worse than the baseline; positive word-accuracy / exact-match deltas are
    better. `n` and `n_baseline` say how many images each mean covers.
    """
    if baseline not in summary:
        raise ValueError(f"baseline {baseline!r} not in summary; recipes: {', '.join(summary) or 'none'}")
    base = summary[baseline]
    out = {}
    for recipe, by_engine in summary.items():
        if recipe == baseline:
            continue
        out[recipe] = {
            engine: {
                **{k: s[k] - base[engine][k] for k in SCORE_KEYS},
                "n": s["n"],
                "n_baseline": base[engine]["n"],
            }
            for engine, s in by_engine.items()
            if engine in base
        }
    return out


# ---------------------------------------------------------------------------------------------------
# Clean renders (tests and the harness's self-check)


def render_text(text: str, size: tuple[int, int] = (512, 256)) -> Image.Image:
    """Black text centered on white with Pillow's bundled TrueType font, as large as fits 90% of the
    width (at most 40% of the height)."""
    w, h = size
    canvas = Image.new("RGB", (w, h), "white")
    draw = ImageDraw.Draw(canvas)
    font_size = max(int(0.4 * h), 8)
    while True:
        font = ImageFont.load_default(size=font_size)
        left, top, right, bottom = draw.textbbox((0, 0), text, font=font)
        if right - left <= 0.9 * w or font_size <= 8:
            break
        font_size = max(int(font_size * 0.9), 8)
    x = (w - (right - left)) / 2 - left
    y = (h - (bottom - top)) / 2 - top
    draw.text((x, y), text, fill="black", font=font)
    return canvas


def self_check(engines: Iterable | None = None, n: int = 6) -> dict[str, float]:
    """Mean CER per engine on clean renders of the first `n` suite targets (one per category first).

    A healthy engine reads these near-perfectly; the harness runs this before trusting OCR scores.
    """
    suite = load_suite()
    firsts = [next(p for p in suite if p.category == c) for c in CATEGORIES]
    picks = (firsts + [p for p in suite if p not in firsts])[:n]
    per: dict[str, list[float]] = {}
    for p in picks:
        for name, s in score_image(render_text(p.target), p.target, engines).items():
            per.setdefault(name, []).append(s["cer"])
    return {name: float(np.mean(v)) for name, v in per.items()}
