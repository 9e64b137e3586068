"""Typography scorer: string metrics, the shipped suite, OCR on clean and corrupted renders, aggregation."""

from __future__ import annotations

import json
import random
import shutil

import numpy as np
import pytest
import torch
from PIL import Image, ImageFilter

from flux2_bench import typography as T
from flux2_bench.typography import (
    CATEGORIES,
    cer,
    delta_vs,
    exact_match,
    extract_target,
    load_suite,
    normalize,
    render_text,
    score_image,
    score_suite,
    word_accuracy,
)

# Clean 512×256 renders of the suite's targets (text ≥ 40 px high, no noise) are read exactly by
# both engines except for an occasional dropped space ("No.23"); a mean CER of 0.05 over six targets
# of 2-20 characters leaves room for one such slip and fails if the reader or the scorer is broken.
CLEAN_MEAN_CER_MAX = 0.05
# A corruption that destroys about half of the text must raise the mean CER by at least 0.3 (half of
# the ~0.5 expected): a scorer that ignored the image content could not pass.
CORRUPT_MIN_CER_GAIN = 0.3


@pytest.fixture(scope="module")
def rapid():
    # One model load per test module (about 1 s); get_engine also caches it for the process.
    return T.get_engine("rapidocr")


@pytest.fixture(scope="module")
def suite():
    return load_suite()


def _one_per_category(suite):
    return [next(p for p in suite if p.category == c) for c in CATEGORIES]


# ---------------------------------------------------------------------------------------------------
# String metrics


def test_normalize_case_space_unicode_keeps_punctuation():
    assert normalize("  Hello,\n  WORLD!\t") == "hello, world!"
    assert normalize("ＯＰＥＮ：２４／７") == "open:24/7"  # full-width OCR output → ASCII (NFKC)
    assert normalize("Straße") == "strasse"  # casefold, not lower
    assert normalize("No Parking!") != normalize("No Parking")


def test_cer_insertion_deletion_substitution():
    assert cer("OPEN", "OPEN") == 0.0
    assert cer("OPEN", "OPEN!") == pytest.approx(1 / 4)  # one insertion
    assert cer("OPEN", "OPN") == pytest.approx(1 / 4)  # one deletion
    assert cer("OPEN", "0PEN") == pytest.approx(1 / 4)  # one substitution
    assert cer("OPEN", "") == 1.0
    assert cer("OPEN", "OPEN OPEN") == pytest.approx(5 / 4)  # CER is not capped at 1
    assert cer("Open  Late", "OPEN LATE") == 0.0  # case and spaces are normalized away
    assert cer("kitten", "sitting") == pytest.approx(3 / 6)  # the textbook Levenshtein example
    with pytest.raises(ValueError, match="empty"):
        cer("   ", "x")


def test_word_accuracy_and_exact_match():
    assert word_accuracy("SAVE THE BEES", "save the bees") == 1.0
    assert word_accuracy("SAVE THE BEES", "SAVE BEES") == pytest.approx(2 / 3)
    assert word_accuracy("SAVE THE BEES", "BEES THE SAVE") == 1.0  # order ignored
    assert word_accuracy("THE THE", "THE") == 0.5  # each OCR word matches once
    assert word_accuracy("No Parking!", "No Parking") == 0.5  # punctuation is part of the word
    assert word_accuracy("FRESH EGGS", "") == 0.0
    assert exact_match("Hello,  World!", "hello, world!")
    assert not exact_match("Hello, World!", "Hello World")
    assert not exact_match("OPEN", "OPEN 24/7")


def test_extract_target():
    assert extract_target('A sign that reads "OPEN LATE" at night') == "OPEN LATE"
    assert extract_target('A bubble saying "Who\'s There?"') == "Who's There?"
    assert extract_target('Two signs: "LEFT" and "RIGHT"') == "LEFT RIGHT"  # joined in prompt order
    with pytest.raises(ValueError, match="double-quoted"):
        extract_target("a sign with no quoted text")
    with pytest.raises(ValueError, match="double-quoted"):
        extract_target('an empty quote ""')


# ---------------------------------------------------------------------------------------------------
# The shipped suite


def test_shipped_suite_is_valid(suite):
    assert len(suite) >= 30
    assert {p.category for p in suite} == set(CATEGORIES)
    assert len({p.id for p in suite}) == len(suite)
    for p in suite:
        assert 1 <= len(p.target.split()) <= 6, p
        assert extract_target(p.prompt) == p.target, p
        assert p.prompt.count('"') == 2, p
    # The categories must mean what they say.
    assert all(any(ch.isdigit() for ch in p.target) for p in suite if p.category == "digits")
    assert all(
        any(not ch.isalnum() and not ch.isspace() for ch in p.target) for p in suite if p.category == "punctuation"
    )
    for p in suite:
        if p.category == "mixed_case":
            words = p.target.split()
            assert any(w != w.lower() and w != w.upper() and w[1:] != w[1:].lower() for w in words), p


@pytest.mark.parametrize(
    "mutate, message",
    [
        (lambda e: e.update(target="OPEN"), "differs from the quoted text"),
        (lambda e: e.update(category="banner"), "unknown category"),
        (
            lambda e: e.update(
                prompt='a sign "ONE TWO THREE FOUR FIVE SIX SEVEN"', target="ONE TWO THREE FOUR FIVE SIX SEVEN"
            ),
            "has 7 words",
        ),
        (lambda e: e.pop("target"), "missing fields"),
    ],
)
def test_load_suite_rejects_bad_entries(tmp_path, mutate, message):
    entries = [{"id": "a", "category": "sign", "prompt": 'a sign "OPEN LATE"', "target": "OPEN LATE"}]
    mutate(entries[0])
    path = tmp_path / "suite.json"
    path.write_text(json.dumps({"prompts": entries}))
    with pytest.raises(ValueError, match=message):
        load_suite(path)


def test_load_suite_rejects_duplicate_ids(tmp_path):
    e = {"id": "a", "category": "sign", "prompt": 'a sign "OPEN"', "target": "OPEN"}
    path = tmp_path / "suite.json"
    path.write_text(json.dumps([e, e]))
    with pytest.raises(ValueError, match="duplicate id"):
        load_suite(path)


# ---------------------------------------------------------------------------------------------------
# OCR on renders


def test_available_engines_lists_rapidocr():
    names = T.available_engines()
    assert "rapidocr" in names  # a runtime dependency: its absence is an installation bug
    assert ("tesseract" in names) == (shutil.which("tesseract") is not None)
    with pytest.raises(ValueError, match="unknown OCR engine"):
        T.get_engine("nope")


def test_clean_renders_read_near_perfectly(rapid, suite):
    picks = _one_per_category(suite)
    scores = [score_image(render_text(p.target), p.target, [rapid])["rapidocr"] for p in picks]
    mean = float(np.mean([s["cer"] for s in scores]))
    report = [(p.target, s["text"], round(s["cer"], 3)) for p, s in zip(picks, scores, strict=True)]
    assert mean <= CLEAN_MEAN_CER_MAX, f"mean CER {mean:.3f} on clean renders: {report}"
    assert sum(s["exact_match"] for s in scores) >= len(scores) - 1, report


def test_input_conventions_read_the_same(rapid):
    im = render_text("FRESH EGGS")
    arr = np.array(im)
    as_tensor = torch.from_numpy(arr).permute(2, 0, 1).float() / 255  # pipeline "pt" output layout
    assert rapid.read(im) == rapid.read(arr) == rapid.read(as_tensor) == "FRESH EGGS"


def _replace_half(text: str, seed: int = 0) -> str:
    rng = random.Random(seed)
    chars = list(text)
    idx = [i for i, c in enumerate(chars) if c.isalnum()]
    for i in rng.sample(idx, len(idx) // 2):
        chars[i] = rng.choice([c for c in "QXZJKVW" if c != chars[i].upper()])
    return "".join(chars)


def test_corrupted_renders_score_clearly_worse(rapid):
    targets = ["SURF LESSONS TODAY", "CRUSHED TOMATOES", "LIVE JAZZ TONIGHT"]
    clean = np.mean([cer(t, rapid.read(render_text(t))) for t in targets])

    replaced = np.mean([cer(t, rapid.read(render_text(_replace_half(t)))) for t in targets])

    def blank_right_half(im: Image.Image) -> Image.Image:
        im = im.copy()
        im.paste((255, 255, 255), (im.width // 2, 0, im.width, im.height))
        return im

    halved = np.mean([cer(t, rapid.read(blank_right_half(render_text(t)))) for t in targets])
    blurred = np.mean([cer(t, rapid.read(render_text(t).filter(ImageFilter.GaussianBlur(12)))) for t in targets])
    for name, value in [
        ("half the letters replaced", replaced),
        ("right half blanked", halved),
        ("blur r=12", blurred),
    ]:
        assert value >= clean + CORRUPT_MIN_CER_GAIN, f"{name}: mean CER {value:.3f} vs clean {clean:.3f}"


def test_reading_order_rows_then_columns():
    def box(x0, y0, x1, y1):
        return [[x0, y0], [x1, y0], [x1, y1], [x0, y1]]

    boxes = np.array(
        [box(300, 100, 400, 130), box(10, 10, 200, 40), box(20, 98, 120, 128), box(250, 12, 300, 42)], float
    )
    assert T._reading_order(boxes, ["D", "A", "C", "B"]) == "A B C D"


@pytest.mark.skipif(
    shutil.which("tesseract") is None, reason="tesseract binary not installed (apt-get install tesseract-ocr)"
)
def test_tesseract_reads_clean_renders_and_scores_alongside_rapidocr(rapid, suite):
    picks = _one_per_category(suite)
    engines = [rapid, T.get_engine("tesseract")]
    scores = [score_image(render_text(p.target), p.target, engines) for p in picks]
    assert all(set(s) == {"rapidocr", "tesseract"} for s in scores)
    mean = float(np.mean([s["tesseract"]["cer"] for s in scores]))
    assert mean <= CLEAN_MEAN_CER_MAX, [(p.target, s["tesseract"]["text"]) for p, s in zip(picks, scores, strict=True)]
    blurred = T.get_engine("tesseract").read(render_text("CRUSHED TOMATOES").filter(ImageFilter.GaussianBlur(12)))
    assert cer("CRUSHED TOMATOES", blurred) >= CORRUPT_MIN_CER_GAIN, blurred


# ---------------------------------------------------------------------------------------------------
# Aggregation


def _row(recipe, pid, cer_value, wacc, exact):
    return {
        "recipe": recipe,
        "id": pid,
        "scores": {"rapidocr": {"text": "", "cer": cer_value, "word_accuracy": wacc, "exact_match": exact}},
    }


def test_score_suite_and_delta_vs_bf16():
    rows = [
        _row("bf16", "a", 0.0, 1.0, True),
        _row("bf16", "b", 0.2, 0.5, False),
        _row("fp8", "a", 0.1, 1.0, True),
        _row("fp8", "b", 0.5, 0.0, False),
    ]
    summary = score_suite(rows)
    assert summary["bf16"]["rapidocr"] == pytest.approx({"n": 2, "cer": 0.1, "word_accuracy": 0.75, "exact_match": 0.5})
    assert summary["fp8"]["rapidocr"] == pytest.approx({"n": 2, "cer": 0.3, "word_accuracy": 0.5, "exact_match": 0.5})
    d = delta_vs(summary)
    assert set(d) == {"fp8"}
    assert d["fp8"]["rapidocr"] == pytest.approx(
        {"cer": 0.2, "word_accuracy": -0.25, "exact_match": 0.0, "n": 2, "n_baseline": 2}
    )
    with pytest.raises(ValueError, match="baseline 'fp16' not in summary"):
        delta_vs(summary, baseline="fp16")
    with pytest.raises(ValueError, match="lacks 'recipe'"):
        score_suite([{"id": "a", "scores": {}}])


def test_self_check_on_clean_renders(rapid):
    result = T.self_check(engines=[rapid], n=3)
    assert set(result) == {"rapidocr"} and result["rapidocr"] <= CLEAN_MEAN_CER_MAX, result
