"""Drop new prompts whose word set is within Jaccard 0.5 of any test-split prompt (and, for training
files, of any validation prompt, including those of MORE_VAL files). Writes FILE.dedup.jsonl.

    python benchmarks/dedupe_new_prompts.py FILE.jsonl train|val [MORE_VAL.jsonl ...]
"""
import json
import sys
from collections import defaultdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from steerplug.pipeline.gate import GATE_TEST_SETS, HARMFUL_VAL_SETS, HARMLESS_VAL_SETS, gate_set, prompt_key


def words(text):
    return set(prompt_key(text).split())


def read(path):
    return [json.loads(line) for line in open(path, encoding="utf-8") if line.strip()]


def main(src, kind, *more_val):
    sets = GATE_TEST_SETS + (HARMFUL_VAL_SETS + HARMLESS_VAL_SETS if kind == "train" else ())
    ref = [words(t) for s in sets for t in gate_set(s)]
    if kind == "train":
        ref += [words(r["prompt"]) for f in more_val for r in read(f)]
    by_word = defaultdict(list)
    for i, w in enumerate(ref):
        for x in w:
            by_word[x].append(i)
    keep, drop = [], []
    for r in read(src):
        w = words(r["prompt"])
        near = any(len(w & ref[i]) / len(w | ref[i]) >= 0.5 for i in {i for x in w for i in by_word[x]})
        (drop if near else keep).append(r)
    with open(src.replace(".jsonl", ".dedup.jsonl"), "w", encoding="utf-8") as f:
        f.writelines(json.dumps(r) + "\n" for r in keep)
    print(src, "kept", len(keep), "dropped", len(drop))
    for r in drop[:20]:
        print("  -", r["prompt"])


if __name__ == "__main__":
    main(*sys.argv[1:])
