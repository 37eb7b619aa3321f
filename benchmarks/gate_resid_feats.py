"""Gate probes on raw residual features (issue #24): does a linear probe on the residual stream read
intent better than the shipped gate on SAE features? Step 1 of 2 (step 2: gate_resid_probe.py).

Needs gate_set/phrasing_twins from branch wip/gate-intent (checked out at /tmp/wip).
    python benchmarks/gate_resid_feats.py   # 7,376 prompts, 665 s on 2 CPUs, writes runs/resid_feats.pt
"""
# Cache pooled residual-stream features of chat-formatted prompts, for gate probes.
import sys, time, json, torch
sys.path.insert(0, "/tmp/wip")
from steerplug.pipeline.gate import gate_set, phrasing_twins, TWIN_FRAMES, prompt_key
from transformers import AutoModelForCausalLM, AutoTokenizer
torch.set_num_threads(2)
P = "/root/.cache/steerplug/models/SmolLM2-135M-Instruct"
tok = AutoTokenizer.from_pretrained(P)
model = AutoModelForCausalLM.from_pretrained(P, torch_dtype=torch.float32).eval()
LAYERS = [4, 6, 8, 10, 12, 14, 16, 18]
model.model.layers = model.model.layers[:max(LAYERS)]
TAIL = 6
sets = {}
test = ["harmful_test", "jbb_harmful", "harmbench_test", "jbb_benign", "xstest_safe", "harmless_test",
        "alpaca_eval_test", "everyday_test"]
for n in test: sets[n] = gate_set(n)
sets["harmless_test"] = sets["harmless_test"][:400]
tkeys = {prompt_key(p) for n in test for p in sets[n]}
other = ["harmful_train", "advbench", "xstest_unsafe", "own_harmful_train", "harmless_train", "alpaca_eval_train",
         "everyday_train", "harmful_val", "harmbench_val", "own_harmful_val", "harmless_val", "alpaca_eval_val", "everyday_val"]
for n in other:
    sets[n] = [p for p in gate_set(n) if prompt_key(p) not in tkeys]
sets["harmless_train"] = sets["harmless_train"][:1500]
sets["harmless_val"] = sets["harmless_val"][:600]
sets["harmless_train:twins"] = phrasing_twins(gate_set("harmless_train")[1500:3500], 1.0, TWIN_FRAMES)[:800]
sets["harmless_train:twins"] = [p for p in sets["harmless_train:twins"] if prompt_key(p) not in tkeys]
print({k: len(v) for k, v in sets.items()}, flush=True)
allp = sorted({p for v in sets.values() for p in v})
texts = [tok.apply_chat_template([{"role": "user", "content": p}], tokenize=False, add_generation_prompt=True) for p in allp]
order = sorted(range(len(texts)), key=lambda i: len(texts[i]))
feats = torch.zeros(len(allp), len(LAYERS), 1 + TAIL, 576, dtype=torch.float16)
t0 = time.time()
tok.padding_side = "right"
with torch.no_grad():
    for s in range(0, len(order), 32):
        idx = order[s:s + 32]
        enc = tok([texts[i] for i in idx], return_tensors="pt", padding=True, add_special_tokens=False)
        out = model(**enc, output_hidden_states=True)
        m = enc["attention_mask"].clone(); m[:, 0] = 0
        L = enc["attention_mask"].sum(1)
        for li, l in enumerate(LAYERS):
            h = out.hidden_states[l]  # after block l-1 = blocks.{l-1}.hook_resid_post
            mean = (h * m[..., None]).sum(1) / m.sum(1, keepdim=True)
            feats[idx, li, 0] = mean.half()
            for k in range(TAIL):
                feats[idx, li, 1 + k] = h[torch.arange(len(idx)), L - 1 - k].half()
        if s % 640 == 0: print(s, len(order), f"{time.time()-t0:.0f}s", flush=True)
torch.save({"prompts": allp, "sets": sets, "layers": LAYERS, "feats": feats}, "runs/resid_feats.pt")
print("done", time.time() - t0)
