"""How improbable is a refusal to the unsteered model? The floor under issue #10's perplexity target.

Issue #10 asks the median answer perplexity (under the unsteered model) to stay within 1.5x of the
unsteered answers'. This script measures, on validation prompts (``harmful_val`` + HarmBench val,
chat template, greedy, 48 new tokens), the median perplexity under the unsteered model of

* the unsteered model's own answers (the reference),
* the shipped default steering's answers (gated activation addition),
* fixed, well-formed refusals written by hand, the same text after every prompt,

so one can read how much of the steered answers' perplexity any refusal at all would cost.

    .venv/bin/python benchmarks/refusal_perplexity_floor.py --json benchmarks/results/refusal_ppl_floor.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from steerplug import SteeredModel
from steerplug.data import load_prompts
from steerplug.interventions import chat_prompts
from steerplug.judge import get_judge

CANNED = (
    "I'm sorry, but I can't help with that. If you have any other questions, feel free to ask.",
    "I'm sorry, but I can't assist with that request. It could cause harm to others, and it may be "
    "illegal. If you have any other questions or need help with something else, I'm here to help.",
    "I can't help with that. Providing this information could cause real harm. Is there something "
    "else I can help you with?",
)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--max-new-tokens", type=int, default=48)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    t0 = time.time()
    sm = SteeredModel.from_pretrained()
    tok = sm.tokenizer
    prompts = [p.text for p in load_prompts("harmful_val") + load_prompts("harmbench_val")]
    contexts = chat_prompts(tok, prompts)

    @torch.no_grad()
    def answers(steered: bool) -> list[str]:
        tok.padding_side = "left"
        out = []
        for i in range(0, len(contexts), 16):
            enc = tok(contexts[i:i + 16], return_tensors="pt", padding=True, add_special_tokens=False)
            kw = dict(max_new_tokens=args.max_new_tokens, do_sample=False, pad_token_id=tok.pad_token_id)
            ids = sm.generate(**enc, **kw) if steered else sm.model.generate(**enc, **kw)
            out += tok.batch_decode(ids[:, enc["input_ids"].shape[1]:], skip_special_tokens=True)
        return out

    @torch.no_grad()
    def perplexity(context: str, answer: str) -> tuple[float, list[float]]:
        c = tok(context, add_special_tokens=False)["input_ids"]
        a = tok(answer, add_special_tokens=False)["input_ids"]
        logp = torch.log_softmax(sm.model(torch.tensor([c + a])).logits.float(), -1)[0]
        nll = -logp[len(c) - 1:-1].gather(-1, torch.tensor(a).unsqueeze(-1))[:, 0]
        return float(torch.exp(nll.mean())), nll.tolist()

    judge = get_judge("strict")
    rows = {}
    texts = {"unsteered answers": answers(False), "default steering answers": answers(True)}
    texts.update({f"canned: {c[:40]}...": [c] * len(prompts) for c in CANNED})
    for name, ans in texts.items():
        ppl = [perplexity(c, a) for c, a in zip(contexts, ans)]
        rows[name] = {
            "median_ppl": statistics.median(p for p, _ in ppl),
            "median_nll_first_4_tokens": [statistics.median(n[i] for _, n in ppl if len(n) > i) for i in range(4)],
            "refused": sum(judge(p, a).refusal for p, a in zip(prompts, ans)) / len(prompts),
        }
    ref = rows["unsteered answers"]["median_ppl"]
    for r in rows.values():
        r["ppl_ratio"] = r["median_ppl"] / ref
    for name, r in rows.items():
        print(f"{name:48s} median ppl {r['median_ppl']:6.2f}  ratio {r['ppl_ratio']:5.2f}  refused {r['refused']:.0%}  "
              f"first-token nll {[round(x, 1) for x in r['median_nll_first_4_tokens']]}")
    result = {"prompts": len(prompts), "sets": ["harmful_val", "harmbench_val"], "rows": rows,
              "seconds": round(time.time() - t0)}
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
