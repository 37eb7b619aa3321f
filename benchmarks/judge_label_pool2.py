"""The second batch of answers labelled in tests/data/judge_labels.jsonl (issue #24): the rebuilt
bundle (fitted refusal directions, lr 0.75, residual MLP gate), greedy, 64 new tokens, train/val
prompts not in the first batch: unsteered, the shipped configuration (gated), and ungated at
lr 1.25 (the strength sweep's strongest, where it starts to loop); the everyday prompts unsteered
and steered ungated at the shipped lr (what a gate false fire gives).

    python benchmarks/judge_label_pool2.py   # -> runs/pool2.jsonl (ids j2NNN), then labelled by reading
"""
import json
import random
import time
from pathlib import Path

import torch

from steerplug import SteeredModel
from steerplug.data import load_prompts
from steerplug.pipeline.refusals import generate

torch.set_num_threads(2)
st = SteeredModel.from_pretrained()
OWN = Path(__file__).resolve().parents[1] / "steerplug" / "prompt_sets"


def own(name, a, b):
    rows = [json.loads(line) for line in (OWN / f"{name}.jsonl").read_text().splitlines()][a:b]
    return [(r["prompt"], {"set": f"own_{name}", "prompt_id": r["id"]}) for r in rows]


def shared(name, a, b):
    if name == "alpaca_eval_val":
        from steerplug.data import data_dir
        lines = (Path(data_dir()) / "alpaca_eval" / "alpaca_eval_val.jsonl").read_text().splitlines()
        texts = [json.loads(line)["prompt"] for line in lines]
    else:
        texts = [p.text for p in load_prompts(name)]
    return [(texts[i], {"set": name, "index": i}) for i in range(a, min(b, len(texts)))]


harm = shared("harmful_val", 0, 24) + shared("harmbench_val", 8, 40) + own("harmful_val", 16, 60)
every = own("everyday_val", 40, 80) + shared("alpaca_eval_val", 20, 50)
U = {"use_gate": False}
groups = [(harm, "harmful", {"unsteered": {"steps": 0}, "shipped_gated": {}, "ungated_1.25": {"lr": 1.25, **U}}),
          (every, "everyday", {"unsteered": {"steps": 0}, "ungated_0.75": U})]
rows = []
for items, kind, configs in groups:
    ps = [p for p, _ in items]
    for cname, ov in configs.items():
        t = time.time()
        ans = generate(st, st.tokenizer, ps, max_new_tokens=64, steering=ov)
        print(kind, cname, f"{time.time() - t:.0f}s", flush=True)
        rows += [{"prompt_ref": ref, "kind": kind, "config": cname, "answer": a, "prompt": p}
                 for (p, ref), a in zip(items, ans)]
random.Random(1).shuffle(rows)
with open("runs/pool2.jsonl", "w") as f:
    for i, r in enumerate(rows):
        f.write(json.dumps({"id": f"j2{i:03d}", **r}) + "\n")
print(len(rows))
