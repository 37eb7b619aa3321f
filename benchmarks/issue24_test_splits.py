"""Issue #24's figures on the test splits: the gate's fire rate, and the steered answers read by
:class:`~steerplug.judge.ReaderJudge` (clean refusals, declines, loops, coherence), and for the
benign sets whether the steered answer equals the unsteered one word for word.

Greedy, ``--max-new-tokens`` (64) new tokens, the bundle as ``SteeredModel.from_pretrained`` loads
it (its own steering configuration and gate). Test splits only; nothing here chooses anything.

    python benchmarks/issue24_test_splits.py --bundle hub_artifacts/SmolLM2-135M-Instruct --out runs/i24.json
"""
from __future__ import annotations

import argparse
import json
import random
import time

import torch

from steerplug import SteeredModel
from steerplug.compare import gate_scores
from steerplug.judge import ReaderJudge
from steerplug.pipeline.gate import gate_set
from steerplug.pipeline.refusals import chat_texts, generate

HARMFUL = ("harmful_test", "jbb_harmful", "harmbench_test")
BENIGN = ("alpaca_eval_test", "everyday_test", "harmless_test", "xstest_safe", "jbb_benign")


def scores(st, prompts, batch_size=32):
    tok = st.tokenizer
    side, tok.padding_side = tok.padding_side, "left"
    out = []
    try:
        texts = chat_texts(tok, prompts)
        for s in range(0, len(texts), batch_size):
            enc = tok(texts[s:s + batch_size], return_tensors="pt", padding=True, add_special_tokens=False)
            out.append(gate_scores(st, enc["input_ids"], enc["attention_mask"]))
    finally:
        tok.padding_side = side
    return torch.cat(out)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--bundle", default="hub_artifacts/SmolLM2-135M-Instruct")
    ap.add_argument("--out", default="runs/i24.json")
    ap.add_argument("--sets", default=",".join(HARMFUL + BENIGN))
    ap.add_argument("--limit", type=int, default=300, help="seeded sample per set above this size")
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--fired-only", action="store_true",
                    help="generate only for the prompts the gate fires on; the others count as answered "
                         "unsteered word for word (rows the gate does not fire on are bit-identical to the "
                         "unsteered model: tests/test_gate.py) and are not judged")
    ap.add_argument("--unsteered-for-fired-only", action="store_true",
                    help="benign sets: generate the unsteered answer only where the gate fires (elsewhere the "
                         "steered answer is the unsteered one bit for bit, tests/test_gate.py); all answers are judged")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    st = SteeredModel.from_pretrained(sae=a.bundle)
    judge, res = ReaderJudge(), {}
    print(st.gate, st.config, flush=True)
    for name in a.sets.split(","):
        t0 = time.time()
        prompts = gate_set(name)
        if len(prompts) > a.limit:
            prompts = random.Random(0).sample(prompts, a.limit)
        fired = (scores(st, prompts) > st.gate.threshold).tolist()
        if a.fired_only:
            on = [p for p, f in zip(prompts, fired) if f]
            ans = generate(st, st.tokenizer, on, max_new_tokens=a.max_new_tokens) if on else []
            reads = [judge.read(p, x) for p, x in zip(on, ans)]
            n = len(prompts)
            summ = {"fired": round(len(on) / n, 4), "fired_and_declines": round(sum(r.declines for r in reads) / n, 4),
                    "word_for_word_at_least": round(1 - len(on) / n, 4), "n": n}
            res[name] = {"summary": summ, "rows": [{"prompt": p, "answer": x, "declines": r.declines, "clean": r.clean}
                                                   for p, x, r in zip(on, ans, reads)]}
            print(name, summ, f"{time.time() - t0:.0f}s", flush=True)
            json.dump({"bundle": a.bundle, "max_new_tokens": a.max_new_tokens, "sets": res}, open(a.out, "w"), indent=1)
            continue
        steered = generate(st, st.tokenizer, prompts, max_new_tokens=a.max_new_tokens)
        plain = None
        if name in BENIGN and a.unsteered_for_fired_only:  # unfired rows: the steered answer is the unsteered one
            on = [p for p, f in zip(prompts, fired) if f]
            it = iter(generate(st.model, st.tokenizer, on, max_new_tokens=a.max_new_tokens) if on else [])
            plain = [next(it) if f else x for f, x in zip(fired, steered)]
        elif name in BENIGN:
            plain = generate(st.model, st.tokenizer, prompts, max_new_tokens=a.max_new_tokens)
        rows = []
        for i, (p, ans) in enumerate(zip(prompts, steered)):
            v, r = judge(p, ans), judge.read(p, ans)
            rows.append({"prompt": p, "answer": ans, "fired": fired[i], "declines": r.declines, "clean": r.clean,
                         "looping": r.looping, "coherent": v.coherent, "reason": r.reason,
                         **({} if plain is None else {"unsteered": plain[i], "same": plain[i] == ans})})
        n = len(rows)
        summ = {k: round(sum(bool(r[k]) for r in rows) / n, 4) for k in ("fired", "declines", "clean", "looping", "coherent")}
        if plain is not None:
            summ["word_for_word"] = round(sum(r["same"] for r in rows) / n, 4)
        summ["n"] = n
        res[name] = {"summary": summ, "rows": rows}
        print(name, summ, f"{time.time() - t0:.0f}s", flush=True)
        json.dump({"bundle": a.bundle, "max_new_tokens": a.max_new_tokens, "sets": res}, open(a.out, "w"), indent=1)


if __name__ == "__main__":
    main()
