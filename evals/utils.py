"""Dataset loaders and scorers for steerplug's lm-eval tasks (``--include_path evals``).

Data paths: task ``metadata`` (``data_dir``, ``hellaswag_path``; pass through ``--metadata`` or
``TaskManager(metadata=...)``), else ``$STEERPLUG_DATA``, else ``../shared/data`` beside the
checkout (see :func:`steerplug.data.data_dir`). Always absolute: lm-eval's own ``data_files``
resolve against the working directory. HellaSwag falls back to lm-eval's Hub dataset
(``Rowan/hellaswag``) when no local copy is found.

The answers are judged by :func:`steerplug.judge.get_judge` (``$STEERPLUG_JUDGE``; default:
:class:`~steerplug.judge.ReaderJudge`): ``refusal`` is a decline of any kind, ``clean_refusal`` one a
person accepts as a refusal (judges that do not tell: a coherent decline), ``looping`` an answer that
repeats a sentence or clause.
"""

from __future__ import annotations

import functools
import json
import re
from pathlib import Path
from typing import Any

import datasets

_JUDGE = None


# --- HellaSwag --------------------------------------------------------------------------------
def _preprocess(text: str) -> str:
    """lm-eval's HellaSwag cleaning (WikiHow bracket artefacts)."""
    text = text.strip().replace(" [title]", ". ")
    text = re.sub("\\[.*?\\]", "", text)
    return text.replace("  ", " ")


def load_hellaswag(hellaswag_path: str | None = None, data_dir: str | None = None,
                   **_: Any) -> datasets.DatasetDict:
    """The HellaSwag validation split, as docs with ``query``, ``choices``, ``gold``: from the
    local klosax JSONL (``ctx``, ``endings``, ``label``) if present, else ``Rowan/hellaswag`` from
    the Hub (``ctx = ctx_a + " " + ctx_b.capitalize()``, as lm-eval's own task).

    The klosax ``ctx`` joins ``ctx_a`` and ``ctx_b`` without capitalising ``ctx_b``, so queries differ
    from upstream lm-eval's in that one letter; accuracies are close but not identical.
    Loaded once per process and path (sweeps evaluate many configurations).
    """
    return _load_hellaswag(hellaswag_path, data_dir)


@functools.lru_cache(maxsize=4)
def _load_hellaswag(hellaswag_path: str | None, data_dir: str | None) -> datasets.DatasetDict:
    raw = _read_hellaswag(hellaswag_path, data_dir)
    docs = [process_hellaswag_doc(d) for d in raw]
    return datasets.DatasetDict({"validation": datasets.Dataset.from_list(docs)})


def _read_hellaswag(hellaswag_path: str | None, data_dir: str | None) -> list[dict]:
    path: Path | None = Path(hellaswag_path).expanduser().resolve() if hellaswag_path else None
    if path is None:
        try:
            from steerplug.data import hellaswag_path as local_path

            path = local_path(data_dir).resolve()
        except FileNotFoundError:
            path = None
    if path is not None and path.is_file():
        with open(path, encoding="utf-8") as f:
            return [json.loads(line) for line in f if line.strip()]
    hub = datasets.load_dataset("Rowan/hellaswag", split="validation")
    return [{"activity_label": d["activity_label"], "ctx": d["ctx_a"] + " " + d["ctx_b"].capitalize(),
             "endings": d["endings"], "label": d["label"]} for d in hub]


def process_hellaswag_doc(d: dict) -> dict:
    """lm-eval's HellaSwag doc: ``query`` = "activity: context", cleaned ``choices``, ``gold``."""
    label = d.get("activity_label") or ""
    return {"query": _preprocess(f"{label}: {d['ctx']}" if label else d["ctx"]),
            "choices": [_preprocess(e) for e in d["endings"]],
            "gold": int(d["label"])}


# --- refusal tasks ----------------------------------------------------------------------------
def load_prompt_set(prompt_set: str, data_dir: str | None = None, shuffle_seed: int | None = 1234,
                    **_: Any) -> datasets.DatasetDict:
    """One of :data:`steerplug.data.PROMPT_SETS` as a ``test`` split (``prompt``, ``category``, ``source``).

    The files are sorted by category, so the rows are shuffled with a fixed seed (``shuffle_seed``
    in the task metadata; None keeps file order): ``--limit N`` then takes a seeded random sample.
    """
    import random

    from steerplug.data import load_prompts

    rows = [{"prompt": p.text, "category": p.category or "", "source": p.source, "harmful": p.harmful}
            for p in load_prompts(prompt_set, data_dir)]
    if shuffle_seed is not None:
        random.Random(int(shuffle_seed)).shuffle(rows)
    return datasets.DatasetDict({"test": datasets.Dataset.from_list(rows)})


def judge():
    global _JUDGE
    if _JUDGE is None:
        from steerplug.judge import get_judge

        _JUDGE = get_judge()
    return _JUDGE


def process_results(doc: dict, results: list[str]) -> dict[str, float]:
    """Refusal, clean refusal, raw refusal, looping, coherence and fluency of one answer (module docstring)."""
    from steerplug.judge import good_and_looping

    answer = results[0]
    v = judge()(doc["prompt"], answer)
    clean, loops = good_and_looping(v, answer)
    return {"refusal": float(v.refusal), "clean_refusal": float(clean), "raw_refusal": float(v.raw_refusal),
            "looping": float(loops), "coherent": float(v.coherent), "repetition": v.repetition,
            "distinct2": v.distinct2}
