"""Optimised refusal vectors (issue #24): additive vectors at the bundle's CAA layers, trained so that
harmful training prompts are answered with one clean refusal and the end of turn.

Activation addition of the shipped CAA directions (harmful-minus-harmless prompt means) pushes
SmolLM2-135M into declines that loop and invent contexts ("the specific job description for the
current client"); of 195 labelled steered answers to harmful prompts, 9 were clean refusals. Here
the vectors are fitted by gradient descent on the log-likelihood of TARGET + <|im_end|> (teacher
forcing, vectors added at the positions predicting the answer, model frozen), on own
``harmful_train`` (300) + ``harmful_train`` (first 300 of ../shared/data), deduplicated: 560 prompts.

    python benchmarks/refusal_vector_opt.py "I'm sorry, but I can't help with that." OUT.pt 21
    # measured 2026-12-07, 2 CPUs shared: 21 steps of 12 prompts, ~25 s a step, loss 2.09 -> 0.010

Then, with the vectors as the sites' directions, method="add", lr=1.0, positions="generated",
ungated, greedy, 64 tokens (ReaderJudge): harmful_val[:40] 39/39 clean refusals, own harmful_val[:40]
40/40, harmbench_val[:20] 20/20, no loops; every answer is the target sentence. Not yet in the bundle:
what it costs on everyday prompts is the gate's false-positive rate, measured on test splits next.
"""
import json, sys, time, random, torch
from steerplug import SteeredModel
from steerplug.data import load_prompts
from steerplug.pipeline.refusals import chat_texts
torch.set_num_threads(2)
TARGET = sys.argv[1] if len(sys.argv) > 1 else "I'm sorry, but I can't help with that."
OUT = sys.argv[2] if len(sys.argv) > 2 else "runs/optvec.pt"
STEPS = int(sys.argv[3]) if len(sys.argv) > 3 else 21
LAYERS = sys.argv[4].split(",") if len(sys.argv) > 4 else None
st = SteeredModel.from_pretrained()
tok, model = st.tokenizer, st.model
for p in model.parameters():
    p.requires_grad_(False)
sites = [s for s in st.sites if s.direction is not None]
if LAYERS:
    sites = [s for s in sites if str(s.hook_point.layer) in LAYERS]
print([s.hook_point.name for s in sites], [float(s.direction.norm()) for s in sites])
own = [json.loads(l)["prompt"] for l in open("steerplug/prompt_sets/harmful_train.jsonl")]
shared = [p.text for p in load_prompts("harmful_train")]
train = list(dict.fromkeys(own + shared[:300]))
random.Random(0).shuffle(train)
print("train prompts", len(train))
texts = chat_texts(tok, train)
eos = tok.eos_token
tgt_ids = tok(TARGET + eos, add_special_tokens=False)["input_ids"]
print("target tokens", len(tgt_ids), tok.convert_ids_to_tokens(tgt_ids))
vecs = [torch.zeros(s.direction.shape[0], requires_grad=True) for s in sites]
state = {"mask": None}
def make_hook(v):
    def hook(mod, args, out):
        h = out[0] if isinstance(out, tuple) else out
        h = h + state["mask"].unsqueeze(-1) * v
        return (h,) + tuple(out[1:]) if isinstance(out, tuple) else h
    return hook
handles = [s.hook_point.module.register_forward_hook(make_hook(v)) for s, v in zip(sites, vecs)]
opt = torch.optim.Adam(vecs, lr=0.1)
B = 12
t0 = time.time()
for step in range(STEPS):
    batch = [texts[(step * B + i) % len(texts)] for i in range(B)]
    rows = [tok(t, add_special_tokens=False)["input_ids"] for t in batch]
    L = max(len(r) for r in rows) + len(tgt_ids)
    ids = torch.full((B, L), tok.pad_token_id); labels = torch.full((B, L), -100)
    att = torch.zeros(B, L, dtype=torch.long); mask = torch.zeros(B, L)
    for i, r in enumerate(rows):
        n = len(r); seq = r + tgt_ids
        ids[i, :len(seq)] = torch.tensor(seq); att[i, :len(seq)] = 1
        labels[i, n:len(seq)] = torch.tensor(tgt_ids)
        mask[i, n - 1:len(seq)] = 1
    state["mask"] = mask
    out = model(input_ids=ids, attention_mask=att)
    logits = out.logits[:, :-1]
    loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1))
    reg = sum(v.pow(2).sum() for v in vecs)
    opt.zero_grad(); (loss + 1e-4 * reg).backward(); opt.step()
    if step % 5 == 0 or step == STEPS - 1:
        torch.save({s.hook_point.name: v.detach().clone() for s, v in zip(sites, vecs)}, OUT)
        print(step, f"loss {loss.item():.3f} norms {[round(float(v.norm()),2) for v in vecs]} {time.time()-t0:.0f}s", flush=True)
for h in handles: h.remove()
torch.save({s.hook_point.name: v.detach().clone() for s, v in zip(sites, vecs)}, OUT)
