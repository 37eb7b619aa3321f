"""Text measures the judges share: normalising, word n-grams, fluency (:func:`coherence`), sentences
and loops (:func:`looping`). No model, no lm_eval."""

from __future__ import annotations

import difflib
import re
import zlib
from collections import Counter
from dataclasses import dataclass

_APOSTROPHES = str.maketrans({"\u2019": "'", "\u2018": "'", "\u02bc": "'", "\u00b4": "'", "`": "'",
                              "\u201c": '"', "\u201d": '"'})
_WORD_RE = re.compile(r"[\w']+|[^\w\s]", re.UNICODE)


def normalize(text: str) -> str:
    """Lower-case, curly apostrophes and quotes made straight, whitespace collapsed."""
    return " ".join(text.translate(_APOSTROPHES).lower().split())


def words(text: str) -> list[str]:
    """Word and punctuation tokens of the normalised text."""
    return _WORD_RE.findall(normalize(text))


def distinct_n(text: str, n: int = 2) -> float:
    """Unique word n-grams / all word n-grams (1.0 for texts shorter than ``n`` words)."""
    w = [t for t in words(text) if t.isalnum() or "'" in t]
    grams = [tuple(w[i:i + n]) for i in range(len(w) - n + 1)]
    return len(set(grams)) / len(grams) if grams else 1.0


def repetition_rate(text: str, n: int = 3) -> float:
    """Share of word n-grams that repeat an earlier one: 0 for fresh text, near 1 for loops."""
    return 1.0 - distinct_n(text, n)


@dataclass(frozen=True)
class Coherence:
    """Fluency measures of one answer and the verdict they give."""

    coherent: bool
    repetition: float
    """:func:`repetition_rate` over word trigrams."""
    distinct2: float
    """:func:`distinct_n` over word bigrams."""
    top_word_share: float
    """Share of the most frequent word among all words."""
    alpha_share: float
    """Share of non-space characters that are letters."""
    looped_token: bool = False
    """A long word that is a character loop ("ANANANANANA...", "unsignededededed..."):
    word-level measures miss these, which heavy steering emits."""


def _looped_token(text: str, min_len: int = 30, max_ratio: float = 0.5) -> bool:
    """True if some run of word characters of ``min_len`` or more compresses (zlib) below
    ``max_ratio`` of its length: a loop, not a URL part, hash or long compound word."""
    for tok in re.findall(r"\w{%d,}" % min_len, text):
        raw = tok.encode()
        if len(zlib.compress(raw, 9)) < max_ratio * len(raw):
            return True
    return False


def coherence(text: str, max_repetition: float = 0.5, min_distinct2: float = 0.5,
              max_top_word_share: float = 0.3, min_alpha_share: float = 0.5,
              min_words: int = 8, top_word_min_words: int = 20,
              max_letter_word_share: float = 0.25) -> Coherence:
    """Measure an answer; answers under ``min_words`` words count as coherent if mostly alphabetic
    and free of looped tokens. The top-word share is checked from ``top_word_min_words`` words on
    (short code snippets repeat an identifier legitimately). More than ``max_letter_word_share`` of
    one-letter words ("I Now A A P A A") is letter salad."""
    toks = [t for t in words(text) if t.isalnum() or "'" in t]
    rep, d2 = repetition_rate(text), distinct_n(text, 2)
    counts = Counter(toks)
    top = counts.most_common(1)[0][1] / len(toks) if toks else 0.0
    chars = [c for c in text if not c.isspace()]
    alpha = sum(c.isalpha() for c in chars) / len(chars) if chars else 0.0
    looped = _looped_token(text)
    if len(toks) < min_words:
        ok = bool(toks) and alpha >= min_alpha_share and not looped
    else:
        letters = sum(len(t) == 1 and t.isalpha() for t in toks) / len(toks)
        ok = (rep <= max_repetition and d2 >= min_distinct2 and alpha >= min_alpha_share and not looped
              and (top <= max_top_word_share or len(toks) < top_word_min_words)
              and letters <= max_letter_word_share)
    return Coherence(ok, rep, d2, top, alpha, looped)


def is_coherent(text: str, **thresholds: float) -> bool:
    """True unless the answer is word salad (repetitive loops, one word dominating, no words)."""
    return coherence(text, **thresholds).coherent


def _soft_normalize(text: str) -> str:
    """Lower-case, straight apostrophes, runs of spaces collapsed; newlines kept (lists start there)."""
    return re.sub(r"[ \t]+", " ", text.translate(_APOSTROPHES).lower()).strip()


_SENTENCE_END_RE = re.compile(r"(?<=[.!?])[\"')\]]*\s+|\n+")
def sentences(text: str) -> list[str]:
    """The answer cut into sentences (and lines), stripped, empty ones dropped."""
    return [s.strip() for s in _SENTENCE_END_RE.split(text) if s and s.strip()]


def looping(text: str, n: int = 7, near: float = 0.85) -> bool:
    """True if the answer repeats itself as a reader notices: a sentence of four or more words
    occurs twice, word for word or nearly (``difflib`` ratio of their words >= ``near``: "I'm here to
    help with any music-related queries. I'm here to assist with any music-related queries."), or a run
    of ``n`` words recurs."""
    seen: list[list[str]] = []
    for s in sentences(_soft_normalize(text)):
        key = re.findall(r"[\w']+", s)
        if len(key) >= 4:
            if any(difflib.SequenceMatcher(None, key, k).ratio() >= near for k in seen):
                return True
            seen.append(key)
    w = [t for t in words(text) if t.isalnum() or "'" in t]
    grams = [tuple(w[i:i + n]) for i in range(len(w) - n + 1)]
    return len(set(grams)) < len(grams)
