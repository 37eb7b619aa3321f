"""Readers for the public prompt sets steerplug builds and evaluates on.

Data are never copied into the repository: they are read from ``$STEERPLUG_DATA`` (default: the
``shared/data`` folder beside this checkout, i.e. ``../shared/data``). Convention: build on
``*_train``, choose on ``*_val``, report on ``*_test``.
"""

from __future__ import annotations

import csv
import gzip
import json
import os
import re
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Prompt:
    """One user request with its labels."""

    text: str
    harmful: bool
    category: str | None
    source: str


def data_dir(override: str | os.PathLike | None = None) -> Path:
    """``override``, else ``$STEERPLUG_DATA``, else ``../shared/data`` next to this checkout / the CWD."""
    if override is not None:
        path = Path(override)
    elif os.environ.get("STEERPLUG_DATA"):
        path = Path(os.environ["STEERPLUG_DATA"])
    else:
        beside_checkout = Path(__file__).resolve().parents[2] / "shared" / "data"
        path = beside_checkout if beside_checkout.is_dir() else Path("../shared/data")
    if not path.is_dir():
        raise FileNotFoundError(
            f"Data folder {path} not found. Set STEERPLUG_DATA (or pass --data-dir) to the folder "
            "holding refusal_direction_splits/, jailbreakbench/, hellaswag/, ..."
        )
    return path


def _csv(path: Path) -> list[dict[str, str]]:
    with open(path, newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


# name -> (reader, description). Each reader takes the data folder and returns prompts.
def _refusal_split(kind: str, split: str):
    def read(root: Path) -> list[Prompt]:
        rows = json.loads((root / "refusal_direction_splits" / f"{kind}_{split}.json").read_text())
        return [Prompt(r["instruction"], kind == "harmful", r.get("category"), f"refusal_{kind}_{split}")
                for r in rows]
    return read


def _jbb(kind: str):
    def read(root: Path) -> list[Prompt]:
        rows = _csv(root / "jailbreakbench" / f"{kind}-behaviors.csv")
        return [Prompt(r["goal"], kind == "harmful", r["category"], f"jbb_{kind}") for r in rows]
    return read


def _harmbench(split: str):
    def read(root: Path) -> list[Prompt]:
        rows = _csv(root / "harmbench" / f"harmbench_behaviors_text_{split}.csv")
        # Contextual behaviours need their context string; keep the standard, self-contained ones.
        return [Prompt(r["Behavior"], True, r["SemanticCategory"], f"harmbench_{split}")
                for r in rows if not r.get("ContextString")]
    return read


def _advbench(root: Path) -> list[Prompt]:
    rows = _csv(root / "advbench" / "harmful_behaviors.csv")
    return [Prompt(r["goal"], True, None, "advbench") for r in rows]


def _xstest(label: str):
    def read(root: Path) -> list[Prompt]:
        rows = _csv(root / "xstest" / "xstest_prompts.csv")
        return [Prompt(r["prompt"], label == "unsafe", r["type"], f"xstest_{label}")
                for r in rows if r["label"] == label]
    return read


PROMPT_SETS = {
    **{f"{k}_{s}": _refusal_split(k, s) for k in ("harmful", "harmless") for s in ("train", "val", "test")},
    "jbb_harmful": _jbb("harmful"),
    "jbb_benign": _jbb("benign"),
    "harmbench_val": _harmbench("val"),
    "harmbench_test": _harmbench("test"),
    "advbench": _advbench,
    "xstest_safe": _xstest("safe"),
    "xstest_unsafe": _xstest("unsafe"),
}


def load_prompts(name: str, data: str | os.PathLike | None = None, limit: int | None = None) -> list[Prompt]:
    """Prompts of one named set (see :data:`PROMPT_SETS`), in file order, at most ``limit``."""
    if name not in PROMPT_SETS:
        raise KeyError(f"Unknown prompt set {name!r}; known: {sorted(PROMPT_SETS)}.")
    prompts = PROMPT_SETS[name](data_dir(data))
    return prompts[:limit] if limit is not None else prompts


WIKITEXT_EVAL_FRACTION = 0.25
"""The first quarter of WikiText-2 test (whole articles) is the SAE evaluation text; the rest may be
used for training. Only the test split is available offline, so this split keeps the two disjoint."""


def wikitext_test(data: str | os.PathLike | None = None, part: str = "all") -> str:
    """WikiText-2 raw test text (generic English).

    ``part``: ``"all"``; ``"eval"``, the articles in the first :data:`WIKITEXT_EVAL_FRACTION` of the
    file (held-out SAE evaluation); ``"train"``, the remaining articles (never overlapping ``eval``).
    """
    if part not in ("all", "eval", "train"):
        raise ValueError(f"wikitext_test(part={part!r}): expected 'all', 'eval' or 'train'.")
    text = (data_dir(data) / "wikitext2_raw_test" / "wiki.test.raw").read_text(encoding="utf-8")
    if part == "all":
        return text
    # Split at the first top-level article heading (" = Title = ") after the eval fraction.
    heading = re.compile(r"^ = [^=].* = $", re.MULTILINE)
    m = heading.search(text, int(len(text) * WIKITEXT_EVAL_FRACTION))
    cut = m.start() if m else len(text)
    return text[:cut] if part == "eval" else text[cut:]


def hh_rlhf_harmless_test(data: str | os.PathLike | None = None) -> list[dict[str, str]]:
    """Anthropic HH-RLHF harmless-base test dialogues (``chosen`` / ``rejected`` strings)."""
    path = data_dir(data) / "hh_rlhf_harmless_base_test" / "test.jsonl.gz"
    with gzip.open(path, "rt", encoding="utf-8") as f:
        return [json.loads(line) for line in f]


def hellaswag_path(data: str | os.PathLike | None = None) -> Path:
    """The local HellaSwag validation JSONL (klosax conversion: ``ctx``, ``endings``, ``label``)."""
    return data_dir(data) / "hellaswag" / "hellaswag_val_klosax.jsonl"
