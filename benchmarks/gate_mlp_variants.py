"""Gate variants on cached residual features (issue #24): choose on validation only.

    python benchmarks/gate_feature_cache.py runs/g2/cache.pt [extra.jsonl ...]   # features first
    python benchmarks/gate_mlp_variants.py EXPERIMENTS.py                          # run(...) lines

Prints, per variant, validation TPR at everyday budgets 0.5/1/1.5/2/3% (their mean: "meanTPR") and
at the per-set budgets of the bundle builder. Results: BENCHMARKS.md, "Issue #24: the gate as three
dropout-trained MLPs" (its two-hidden-layer row came from an earlier version of this script with
its own dropout MLP, commit ef4a5a4; the one-layer dropout MLP is now steerplug's ``fit_mlp``).
"""
import sys, json, time, itertools, torch
sys.path.insert(0, str(__import__("pathlib").Path(__file__).resolve().parents[1]))
torch.set_num_threads(2)
from steerplug.pipeline.gate import gate_prompts, fit_mlp, fit_logistic, threshold_for_groups, GROUP_MAX_FPR, SET_WEIGHTS, prompt_key, gate_set, GATE_TEST_SETS
LAY = [15, 18, 21]; POOLS = ("mean", "tail:1", "tail:2")
cache = torch.load("runs/g2/cache.pt")
gp = gate_prompts()
G = {k: dict(v) for k, v in gp.groups.items()}
def add_extra(path, key, name):
    test = {prompt_key(t) for s in GATE_TEST_SETS for t in gate_set(s)}
    seen = {prompt_key(p) for v in gp.values() for p in v}
    new = []
    for l in open(path):
        p = json.loads(l)["prompt"]
        if prompt_key(p) not in seen and p in cache:
            seen.add(prompt_key(p)); new.append(p)
    a = len(gp[key]); gp[key] = list(gp[key]) + new; G[key][name] = (a, len(gp[key]))
    print("extra", name, len(new))
def feats(layers, pools):
    li = [LAY.index(l) for l in layers]; pi = [POOLS.index(p) for p in pools]
    return {k: torch.stack([cache[p][li][:, pi].float().flatten() for p in v]) for k, v in gp.items()}
def weights(W):
    parts = []
    for k in ("train_harmful", "train_harmless"):
        wk = torch.ones(len(gp[k]))
        for name, (a, b) in G[k].items():
            wk[a:b] = float(W.get(name, 1.0))
        parts.append(wk)
    return torch.cat(parts)
def run(tag, layers=(18,), pools=("mean", "tail:1"), hidden=256, l2=1e-3, seeds=(0,), W=SET_WEIGHTS, epochs=300, lr=3e-3, budgets=(0.015, 0.01), drop=0.0):
    t = time.time()
    F = feats(layers, pools)
    x = torch.cat([F["train_harmful"], F["train_harmless"]]); y = torch.cat([torch.ones(len(F["train_harmful"])), torch.zeros(len(F["train_harmless"]))])
    row = weights(W)
    sc = {k: 0 for k in F}
    for s in seeds:
        if hidden:
            (w1, b1), w2, b2 = fit_mlp(x, y, hidden, l2=l2, weight=row, seed=s, epochs=epochs, lr=lr, dropout=drop)
            for k, v in F.items(): sc[k] = sc[k] + (torch.relu(v @ w1.T + b1) @ w2 + b2) / len(seeds)
        else:
            w, b = fit_logistic(x, y, l2=l2, weight=row, per_feature=True, seed=s)
            for k, v in F.items(): sc[k] = sc[k] + (v @ w + b) / len(seeds)
    res = []
    for bud in budgets:
        gf = dict(GROUP_MAX_FPR); gf.update({"alpaca_eval_val": bud, "everyday_val": bud})
        thr = threshold_for_groups(sc["val_harmful"], sc["val_harmless"], G["val_harmless"], 0.02, gf)
        per = {n: round(float((sc["val_harmful"][a:b] > thr).float().mean()), 3) for n, (a, b) in G["val_harmful"].items()}
        fp = {n[:8]: round(float((sc["val_harmless"][a:b] > thr).float().mean()), 3) for n, (a, b) in G["val_harmless"].items()}
        res.append(f"@{bud}: TPR {float((sc['val_harmful'] > thr).float().mean()):.3f} {per} {fp}")
    ev = torch.cat([sc["val_harmless"][a:b] for n, (a, b) in G["val_harmless"].items() if n in ("alpaca_eval_val", "everyday_val")])
    hv = torch.cat([sc["val_harmless"][a:b] for n, (a, b) in G["val_harmless"].items() if n.startswith("harmless_val")])
    evs = ev.sort(descending=True).values
    tp = []
    for f in (0.005, 0.01, 0.015, 0.02, 0.03):
        th = max(float(evs[int(len(evs) * f)]), float(hv.sort(descending=True).values[int(len(hv) * 0.01)]))
        tp.append(float((sc["val_harmful"] > th).float().mean()))
    print(f"{tag:40s} {time.time()-t:4.0f}s meanTPR {sum(tp)/len(tp):.3f} " + " ".join(f"{x:.3f}" for x in tp) + "  || " + " | ".join(res), flush=True)
    return sc
if __name__ == "__main__":
    exec(open(sys.argv[1]).read())
