"""Agreement of :class:`steerplug.judge.ReaderJudge` with answers labelled by reading them.

The labels (``tests/data/judge_labels.jsonl``, issue #24): 854 answers of SmolLM2-135M-Instruct to
train/val prompts, greedy, 64 new tokens, each read and labelled ``clean_refusal`` / ``bad_refusal``
(declines, but loops, invents a context, offers the request after all or is garbled) / ``complies`` /
``neither``, plus whether it repeats itself (rules: ``benchmarks/judge_label_rules.md``).

* Batch 1 (414, ``j000``-``j413``; ``benchmarks/judge_label_pool.py``): harmful ``harmful_val[24:40]``,
  ``harmbench_val[:8]``, own ``harmful_val[:16]``; everyday own ``everyday_val[:40]``,
  ``alpaca_eval_val[:20]``; unsteered and under six steered configurations of the earlier bundle
  (the looping, context-inventing declines of issue #24), labelled by a person reading them.
* Batch 2 (440, ``j2000``-``j2439``, field ``batch: 2``; ``benchmarks/judge_label_pool2.py``): harmful
  ``harmful_val[:24]``, ``harmbench_val[8:40]``, own ``harmful_val[16:60]`` unsteered, shipped (gated)
  and ungated at lr 1.25; everyday own ``everyday_val[40:80]``, ``alpaca_eval_val[20:50]`` unsteered
  and ungated at the shipped lr; the rebuilt bundle (fitted directions). Labelled blind to
  configuration and to the judge by two reading assistants following the rules file, 220 each;
  20 of them labelled again, independently, by the author of this script: 20 of 20 the same.

Prompts from ``../shared/data`` are referenced by set and index, never copied. Rows of split ``dev``
were used to write the judge's rules; ``holdout`` rows were not looked at while writing them
(batch 2: split at random, seed 24; no rule was changed after it).

    python benchmarks/judge_agreement.py [--data-dir ../shared/data] [--show]
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from steerplug.judge import ReaderJudge

LABELS = Path(__file__).resolve().parents[1] / "tests" / "data" / "judge_labels.jsonl"
OWN = Path(__file__).resolve().parents[1] / "steerplug" / "prompt_sets"


def load_labels(data_dir: str | None = None) -> list[dict]:
    """The labelled rows with their prompts resolved."""
    from steerplug.data import data_dir as resolve_data_dir, load_prompts

    cache: dict[str, Any] = {}
    rows = [json.loads(line) for line in LABELS.read_text().splitlines()]
    for r in rows:
        ref = r["prompt_ref"]
        s = ref["set"]
        if s.startswith("own_"):
            if s not in cache:
                lines = (OWN / f"{s[4:]}.jsonl").read_text().splitlines()
                cache[s] = {p["id"]: p["prompt"] for p in map(json.loads, lines)}
            r["prompt"] = cache[s][ref["prompt_id"]]
        else:
            if s not in cache:
                if s == "alpaca_eval_val":
                    path = Path(resolve_data_dir(data_dir)) / "alpaca_eval" / "alpaca_eval_val.jsonl"
                    cache[s] = [json.loads(line)["prompt"] for line in path.read_text().splitlines()]
                else:
                    cache[s] = [p.text for p in load_prompts(s, data_dir)]
            r["prompt"] = cache[s][ref["index"]]
    return rows


def agreement(rows: list[dict], judge: ReaderJudge | None = None) -> dict[str, dict[str, float]]:
    """Per call (declines, clean, loops): the share of labelled positives the judge calls positive
    and of labelled negatives it calls negative."""
    judge = judge or ReaderJudge()
    out: dict[str, list[int]] = {k: [0, 0, 0, 0] for k in ("declines", "clean", "loops")}
    for r in rows:
        rd = judge.read(r["prompt"], r["answer"])
        gold = {"declines": r["label"] in ("clean_refusal", "bad_refusal"), "clean": r["label"] == "clean_refusal",
                "loops": r["loops"]}
        got = {"declines": rd.declines, "clean": rd.clean, "loops": rd.looping}
        for k in out:
            out[k][(0 if gold[k] else 2) + (0 if got[k] == gold[k] else 1)] += 1
    return {k: {"positives": v[0] / max(1, v[0] + v[1]), "negatives": v[2] / max(1, v[2] + v[3]),
                "n_pos": v[0] + v[1], "n_neg": v[2] + v[3]} for k, v in out.items()}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data-dir", default=None)
    args = p.parse_args()
    rows = load_labels(args.data_dir)
    for split in ("dev", "holdout", None):
        part = [r for r in rows if split is None or r["split"] == split]
        for k, v in agreement(part).items():
            print(f"{split or 'all':8s} {k:9s} positives {v['positives']:.3f} (n={v['n_pos']})  "
                  f"negatives {v['negatives']:.3f} (n={v['n_neg']})")


if __name__ == "__main__":
    main()
