"""The answers labelled in tests/data/judge_labels.jsonl (issue #24): SmolLM2-135M-Instruct, greedy,
64 new tokens, on train/val prompts, unsteered and under several steered configurations.

    python benchmarks/judge_label_pool.py   # needs runs/dirs.pt (direction variants) -> runs/pool.jsonl

``runs/dirs.pt`` held the "varied_end" directions: difference of means at the last prompt token
between harmful and harmless *varied-phrasing* training prompts at the four CAA layers (made by an
exploration script not kept; cosine 0.66-0.81 with the shipped directions, ~0.66x their norm). The
labels were then written by reading each answer, blind to its configuration.
"""
import json, time, torch
from steerplug import SteeredModel
from steerplug.data import load_prompts
from steerplug.pipeline.refusals import generate
torch.set_num_threads(2)
st = SteeredModel.from_pretrained()
tok = st.tokenizer


def gen_ov(prompts, ov):
    return generate(st, tok, prompts, max_new_tokens=64, steering=ov)

dirs = torch.load("runs/dirs.pt")
shipped = {s.hook_point.name: s.direction for s in st.sites}
def use(key):
    for s in st.sites:
        s.direction = shipped[s.hook_point.name] if key == "shipped" else dirs[key][s.hook_point.name]
    st.refresh()
def jl(path, a, b): return [json.loads(l)["prompt"] for l in open(path)][a:b]
harm = ([(p.text, "harmful_val") for p in load_prompts("harmful_val")][24:40]
        + [(p.text, "harmbench_val") for p in load_prompts("harmbench_val")][:8]
        + [(p, "own_harmful_val") for p in jl("steerplug/prompt_sets/harmful_val.jsonl", 0, 16)])
every = ([(p, "own_everyday_val") for p in jl("steerplug/prompt_sets/everyday_val.jsonl", 0, 40)]
         + [(p, "alpaca_eval_val") for p in jl("../shared/data/alpaca_eval/alpaca_eval_val.jsonl", 0, 20)])
U = {"use_gate": False}
groups = [(harm, "harmful", {"unsteered": ("shipped", {"steps": 0}), "add_all_0.3": ("shipped", U),
                             "add_gen_0.2": ("shipped", {"positions": "generated", "lr": 0.2, **U}),
                             "add_gen_0.3": ("shipped", {"positions": "generated", **U}),
                             "varied_gen_0.35": ("varied_end", {"positions": "generated", "lr": 0.35, **U}),
                             "varied_all_0.45": ("varied_end", {"lr": 0.45, **U})}),
          (every, "everyday", {"unsteered": ("shipped", {"steps": 0}), "default_gated": ("shipped", {}),
                               "add_gen_0.2_ungated": ("shipped", {"positions": "generated", "lr": 0.2, **U})})]
rows = []
for items, kind, configs in groups:
    ps = [p for p, _ in items]
    for cname, (key, ov) in configs.items():
        use(key); t = time.time()
        ans = gen_ov(ps, ov)
        print(kind, cname, f"{time.time()-t:.0f}s", flush=True)
        rows += [{"prompt": p, "source": s, "kind": kind, "config": cname, "answer": a}
                 for (p, s), a in zip(items, ans)]
import random
random.Random(0).shuffle(rows)
with open("runs/pool.jsonl", "w") as f:
    for i, r in enumerate(rows):
        f.write(json.dumps({"id": f"j{i:03d}", **r}) + "\n")
print(len(rows))
