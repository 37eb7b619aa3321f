"""Cache gate features (mean, tail:1, tail:2 at residual layers 15/18/21) of every gate prompt: see gate_mlp_variants.py."""
import sys, json, time, torch
sys.path.insert(0, str(__import__("pathlib").Path(__file__).resolve().parents[1]))
torch.set_num_threads(2)
from steerplug.pipeline.gate import gate_prompts, gate_set, GATE_TEST_SETS, prompt_key
from steerplug.pipeline.refusals import chat_texts
from steerplug.gate import pool_features
from transformers import AutoModelForCausalLM, AutoTokenizer
LAY = [15, 18, 21]   # hidden_states index (18 = output of block 17)
POOLS = ("mean", "tail:1", "tail:2")
out = sys.argv[1]
extra = sys.argv[2:]
gp = gate_prompts()
prompts = [p for v in gp.values() for p in v]
for f in extra:
    prompts += [json.loads(l)["prompt"] for l in open(f) if l.strip()]
try:
    cache = torch.load(out)
except FileNotFoundError:
    cache = {}
need = [p for p in dict.fromkeys(prompts) if p not in cache]
print("need", len(need), "cached", len(cache), flush=True)
P = "/root/.cache/steerplug/models/SmolLM2-135M-Instruct"
tok = AutoTokenizer.from_pretrained(P); tok.padding_side = "right"
model = AutoModelForCausalLM.from_pretrained(P, torch_dtype=torch.float32).eval()
model.model.layers = model.model.layers[:max(LAY)]
t0 = time.time()
need.sort(key=len)
with torch.no_grad():
    texts = chat_texts(tok, need)
    for s in range(0, len(need), 32):
        enc = tok(texts[s:s+32], return_tensors="pt", padding=True, add_special_tokens=False)
        hs = model.model(**enc, output_hidden_states=True).hidden_states
        f = torch.stack([pool_features(hs[l].float(), enc["attention_mask"], POOLS) for l in LAY], 1)  # B, L, P, D
        for j, p in enumerate(need[s:s+32]):
            cache[p] = f[j].half()
        if s % 640 == 0:
            print(s, len(need), f"{time.time()-t0:.0f}s", flush=True)
torch.save(cache, out)
print("done", len(cache), time.time() - t0)
