"""Optimised refusal vectors (issue #24): additive vectors at the bundle's CAA layers, trained so that
harmful training prompts are answered with one clean refusal and the end of turn.

Activation addition of the shipped CAA directions (harmful-minus-harmless prompt means) pushes
SmolLM2-135M into declines that loop and invent contexts ("the specific job description for the
current client"); of 195 labelled steered answers to harmful prompts, 9 were clean refusals. Here
the vectors are fitted by gradient descent on the log-likelihood of TARGET + <|im_end|> (teacher
forcing, vectors added at the positions predicting the answer, model frozen;
:func:`steerplug.pipeline.refusal_vectors.fit_refusal_vectors`), on own
``harmful_train`` (300) + ``harmful_train`` (first 300 of ../shared/data), deduplicated: 560 prompts.

    python benchmarks/refusal_vector_opt.py "I'm sorry, but I can't help with that." OUT.pt 21
    # measured 2026-12-07, 2 CPUs shared: 21 steps of 12 prompts, ~25 s a step, loss 2.09 -> 0.010

Then, with the vectors as the sites' directions, method="add", lr=1.0, positions="generated",
ungated, greedy, 64 tokens (ReaderJudge): harmful_val[:40] 39/39 clean refusals, own harmful_val[:40]
40/40, harmbench_val[:20] 20/20, no loops; every answer is the target sentence. Not yet in the bundle:
what it costs on everyday prompts is the gate's false-positive rate, measured on test splits next.
"""
import json, sys, time, torch
from steerplug import SteeredModel
from steerplug.data import load_prompts
from steerplug.pipeline.refusal_vectors import REFUSAL, fit_refusal_vectors
torch.set_num_threads(2)
TARGET = sys.argv[1] if len(sys.argv) > 1 else REFUSAL
OUT = sys.argv[2] if len(sys.argv) > 2 else "runs/optvec.pt"
STEPS = int(sys.argv[3]) if len(sys.argv) > 3 else 21
LAYERS = sys.argv[4].split(",") if len(sys.argv) > 4 else None
st = SteeredModel.from_pretrained()
sites = [s for s in st.sites if s.direction is not None]
if LAYERS:
    sites = [s for s in sites if str(s.hook_point.layer) in LAYERS]
own = [json.loads(l)["prompt"] for l in open("steerplug/prompt_sets/harmful_train.jsonl")]
shared = [p.text for p in load_prompts("harmful_train")]
train = list(dict.fromkeys(own + shared[:300]))
print("train prompts", len(train), [s.hook_point.name for s in sites])
t0 = time.time()
vecs, losses = fit_refusal_vectors(st.model, st.tokenizer, [s.hook_point for s in sites], train,
                                   target=TARGET, steps=STEPS, batch_size=12, lr=0.1)
print(f"loss {losses[0]:.3f} -> {losses[-1]:.3f}, norms {[round(float(v.norm()), 2) for v in vecs.values()]}, "
      f"{time.time() - t0:.0f}s")
torch.save(vecs, OUT)
