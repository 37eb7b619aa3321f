"""Drop new prompts whose word set is within Jaccard 0.5 of any test-split prompt (and, for training files, of any validation prompt).

    python benchmarks/dedupe_new_prompts.py FILE.jsonl train|val [MORE_VAL.jsonl ...]   # writes FILE.dedup.jsonl
"""
import sys, json
sys.path.insert(0, str(__import__("pathlib").Path(__file__).resolve().parents[1]))
from steerplug.pipeline.gate import gate_set, GATE_TEST_SETS, HARMFUL_VAL_SETS, HARMLESS_VAL_SETS, prompt_key
def words(t): return set(prompt_key(t).split())
test = [words(t) for s in GATE_TEST_SETS for t in gate_set(s)]
val = [words(t) for s in HARMFUL_VAL_SETS + HARMLESS_VAL_SETS for t in gate_set(s)]
extra_val = sys.argv[3:]  # more val files
for f in extra_val:
    val += [words(json.loads(l)["prompt"]) for l in open(f) if l.strip()]
src, kind = sys.argv[1], sys.argv[2]  # kind: train|val
rows = [json.loads(l) for l in open(src) if l.strip()]
ref = test + (val if kind == "train" else [])
from collections import defaultdict
idx = defaultdict(list)
for i, w in enumerate(ref):
    for x in w: idx[x].append(i)
keep, drop = [], []
for r in rows:
    w = words(r["prompt"])
    cand = {i for x in w for i in idx[x]}
    if any(len(w & ref[i]) / max(1, len(w | ref[i])) >= 0.5 for i in cand):
        drop.append(r["prompt"])
    else:
        keep.append(r)
out = src.replace(".jsonl", ".dedup.jsonl")
with open(out, "w") as f:
    for r in keep: f.write(json.dumps(r) + "\n")
print(src, "kept", len(keep), "dropped", len(drop)); [print("  -", d) for d in drop[:20]]
