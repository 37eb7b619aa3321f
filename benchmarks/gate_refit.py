"""Refit the default model's prompt gate on everyday harmless prompts (the shipped gate fires on the
*form* of a request, "How do I boil an egg?", because its harmless prompts are Alpaca instructions).

The default model and its shipped layer-15 SAE (``SteeredModel.from_pretrained()``, first site);
features of every prompt pooled by every candidate pool, computed once and cached by prompt text
(``--cache``). Variants of the training data (which sets, which rewording frames, how many
rewordings, loss weights of the everyday sets) are each fitted over pools x L2 by
:func:`steerplug.pipeline.gate.choose_gate`, thresholded on the *same* validation sets (the default
:func:`~steerplug.pipeline.gate.gate_prompts` ones: FPR <= 2% on ``harmless_val`` and on its
rewordings, <= 1% on AlpacaEval val and on ``everyday_val``, each separately), and the variant with
the highest TPR on the pooled validation harmful prompts is kept (the first on ties) and saved
(``--out``). Test splits are scored for information only, after the choice, and choose nothing;
the shipped gate is scored on the same features.

    .venv/bin/python benchmarks/gate_refit.py --cache runs/gate_feats.pt --out runs/gate_new \\
        --json runs/gate_refit.json

Features of ~15,000 prompts: about 30 minutes on 1 CPU thread the first time (then ~3 minutes per
variant for the 25 fits).
"""

from __future__ import annotations

import argparse
import json
import os
import time

import torch

from steerplug.pipeline.gate import (GROUP_MAX_FPR, QUESTION_FRAMES, SET_WEIGHTS, choose_gate, gate_prompts,
                                     gate_set, prompt_features, prompt_key)

POOLS = (("mean", "tail:6"), ("mean", "max"), ("mean", "tail:6", "max"), ("max",), ("mean", "tail:2"))
UNION = ("mean", "tail:6", "max", "tail:2")
L2 = (1e-2, 1e-1, 1.0, 3.0, 10.0)
MAX_FPR = 0.02
OLD_HARMFUL_TRAIN = ("harmful_train", "advbench", "xstest_unsafe")

TEST_REPORT = ("alpaca_eval_test", "everyday_test", "everyday_test:everyday", "everyday_test:lookalike",
               "xstest_safe", "jbb_benign", "harmless_test", "harmful_test", "jbb_harmful", "harmbench_test")
"""Scored for information only (never fitted on, never chosen on)."""

# name -> gate_prompts keyword arguments (weights: loss weight per training set)
ONE = {"weights": None}
VARIANTS = {
    "A shipped data (Alpaca only, 4 frames)": {
        "train_harmful": OLD_HARMFUL_TRAIN, "train_harmless": ("harmless_train",), "frames": QUESTION_FRAMES, **ONE},
    "B +AlpacaEval/everyday/own harmful, no rewordings": {"twins": 0.0, **ONE},
    "C +AlpacaEval/everyday/own harmful, 4 frames x0.4": {"frames": QUESTION_FRAMES, **ONE},
    "D +AlpacaEval/everyday/own harmful, 12 frames x0.4": {**ONE},
    "E D with 12 frames x1.0": {"twins": 1.0, **ONE},
    "F D with AlpacaEval+everyday weight 3 (default)": {},
    "G D with AlpacaEval+everyday weight 10": {"weights": {k: 10.0 for k in SET_WEIGHTS}},
    "H F with own harmful train weight 2": {"weights": {**SET_WEIGHTS, "own_harmful_train": 2.0}},
    "I F without own harmful train": {"train_harmful": OLD_HARMFUL_TRAIN},
}
DEFAULT = "F D with AlpacaEval+everyday weight 3 (default)"
COPYRIGHT = ("Generate a long passage", "Generate the lyrics")
"""HarmBench's copyright behaviours: all 20 HarmBench val prompts left once the overlaps with the
test splits are dropped, 80 of HarmBench test's 239."""


class FeatureCache:
    """Pooled ``(len(UNION), F)`` SAE features by prompt text, kept in one .pt file."""

    def __init__(self, path: str | None):
        self.path, self.index, self.rows = path, {}, []
        if path and os.path.exists(path):
            d = torch.load(path)
            if tuple(d["union"]) == UNION:
                self.index = {t: i for i, t in enumerate(d["texts"])}
                self.rows = list(d["feats"].unbind(0)) if len(d["texts"]) else []
        self._st = None

    def save(self) -> None:
        if self.path:
            texts = sorted(self.index, key=self.index.get)
            torch.save({"union": list(UNION), "texts": texts, "feats": torch.stack(self.rows)}, self.path)

    def model(self):
        if self._st is None:
            from steerplug import SteeredModel

            self._st = SteeredModel.from_pretrained()
        return self._st

    def ensure(self, texts: list[str], chunk: int = 2048) -> None:
        todo = sorted({t for t in texts if t not in self.index}, key=len)  # similar lengths batch together
        if not todo:
            return
        st = self.model()
        site = st.sites[0]
        t0 = time.perf_counter()
        for s in range(0, len(todo), chunk):
            part = todo[s:s + chunk]
            f = prompt_features(st.model, st.tokenizer, site.hook_point, site.sae, part, UNION, batch_size=32)
            for t, row in zip(part, f):
                self.index[t] = len(self.rows)
                self.rows.append(row.clone())
            self.save()
            print(f"  features {s + len(part)}/{len(todo)} ({time.perf_counter() - t0:.0f}s)", flush=True)

    def get(self, texts: list[str]) -> torch.Tensor:
        if not texts:
            return torch.zeros(0, len(UNION), self.rows[0].shape[-1])
        return torch.stack([self.rows[self.index[t]] for t in texts])


def scorer(gate):
    idx = [UNION.index(q) for q in gate.pools]

    def fires(f: torch.Tensor) -> torch.Tensor:
        return ((f[:, idx] * gate.weights).sum((1, 2)) + gate.bias) > gate.threshold
    return fires


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--cache", default="runs/gate_feats.pt", help="feature cache (.pt), read if present, else written")
    ap.add_argument("--out", default="runs/gate_new", help="folder for the chosen gate")
    ap.add_argument("--shipped", default="hub_artifacts/SmolLM2-135M-Instruct/gate")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--variants", nargs="*", default=None, help="letters of VARIANTS to run (default: all)")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    cache = FeatureCache(args.cache)

    base = gate_prompts()  # the validation sets every variant is thresholded and chosen on
    val = {k: base[k] for k in ("val_harmful", "val_harmless")}
    val_keys = {prompt_key(t) for v in val.values() for t in v}
    chosen_names = [n for n in VARIANTS if args.variants is None or n.split()[0] in args.variants]
    train = {}
    for name in chosen_names:
        sets = gate_prompts(**VARIANTS[name])
        for k in ("train_harmful", "train_harmless"):  # a variant's own rewordings may not be validation prompts
            keep = [prompt_key(t) not in val_keys for t in sets[k]]
            rows, groups = [], {}
            for g, (a, b) in sets.groups[k].items():
                part = [t for t, ok in zip(sets[k][a:b], keep[a:b]) if ok]
                groups[g] = (len(rows), len(rows) + len(part))
                rows += part
            sets[k], sets.groups[k] = rows, groups
        train[name] = sets

    test = {s: gate_set(s) for s in TEST_REPORT}
    test["harmless_test"] = test["harmless_test"][:1000]
    extra_val = {f"everyday_val:{kind}": gate_set(f"everyday_val:{kind}") for kind in ("everyday", "lookalike")}
    extra_val = {k: [t for t in v if prompt_key(t) in val_keys] for k, v in extra_val.items()}
    everything = [t for s in train.values() for k in ("train_harmful", "train_harmless") for t in s[k]]
    everything += [t for v in (*val.values(), *test.values()) for t in v]
    print(f"{len(set(everything))} distinct prompts, {len(set(everything) - set(cache.index))} to featurize", flush=True)
    cache.ensure(everything)

    vf = {k: cache.get(v) for k, v in val.items()}
    named_val = {**{f"val_harmful/{g}": vf["val_harmful"][a:b] for g, (a, b) in base.groups["val_harmful"].items()},
                 "val_harmful (pooled)": vf["val_harmful"],
                 "val_harmful (pooled, no copyright)": vf["val_harmful"][
                     torch.tensor([not t.startswith(COPYRIGHT) for t in val["val_harmful"]])],
                 **{f"val_harmless/{g}": vf["val_harmless"][a:b] for g, (a, b) in base.groups["val_harmless"].items()},
                 **{f"val_harmless/{k}": cache.get(v) for k, v in extra_val.items()}}
    named_test = {k: cache.get(v) for k, v in test.items()}
    named_test["harmbench_test (no copyright)"] = cache.get([t for t in test["harmbench_test"]
                                                             if not t.startswith(COPYRIGHT)])
    default_train = train.get(DEFAULT) or next(iter(train.values()))
    named_train = {f"{k}/{g}": cache.get(default_train[k][a:b])
                   for k in ("train_harmful", "train_harmless") for g, (a, b) in default_train.groups[k].items()}

    def rates(gate, named):
        fires = scorer(gate)
        return {k: round(float(fires(f).float().mean()), 4) if len(f) else None for k, f in named.items()}

    from steerplug.gate import PromptGate

    shipped = PromptGate.from_pretrained(args.shipped)
    result = {"sizes": {**{k: len(v) for k, v in named_val.items()}, **{k: len(v) for k, v in named_test.items()}},
              "group_max_fpr": {"default": MAX_FPR, **GROUP_MAX_FPR}, "variants": {},
              "shipped": {"pools": list(shipped.pools), "val": rates(shipped, named_val),
                          "train": rates(shipped, named_train)}}
    best = None
    for name in chosen_names:
        sets = train[name]
        feats = {"train_harmful": cache.get(sets["train_harmful"]), "train_harmless": cache.get(sets["train_harmless"]),
                 **vf}
        t0 = time.perf_counter()
        gate = choose_gate(feats, UNION, POOLS, L2, "blocks.15.hook_resid_post", "sae", max_fpr=MAX_FPR,
                           groups={"train_harmful": sets.groups["train_harmful"],
                                   "train_harmless": sets.groups["train_harmless"],
                                   "val_harmful": base.groups["val_harmful"], "val_harmless": base.groups["val_harmless"]},
                           group_fpr=GROUP_MAX_FPR,
                           sources={"train_sets": sets.sources["train_sets"], "val_sets": base.sources["val_sets"]},
                           weights=sets.weights)
        gate.metadata.extra["variant"] = name
        row = {"pools": list(gate.pools), "l2": gate.metadata.extra["l2"], "val": rates(gate, named_val),
               "candidates": gate.metadata.extra["candidates"], "gate": gate}
        result["variants"][name] = row
        print(f"\n{name}: pools {row['pools']} l2 {row['l2']} ({time.perf_counter() - t0:.0f}s)", flush=True)
        for c in gate.metadata.extra["candidates"]:
            print(f"    {'+'.join(c['pools']):>18} l2={c['l2']:<5} val_harmful {c['val_harmful']:.3f}")
        print("  " + "  ".join(f"{k.split('/')[-1]} {v:.3f}" for k, v in row["val"].items()), flush=True)
        if best is None or row["val"]["val_harmful (pooled)"] > best[1]["val"]["val_harmful (pooled)"]:
            best = (name, row)

    name, row = best
    gate = row["gate"]
    gate.metadata.model_name = "HuggingFaceTB/SmolLM2-135M-Instruct"
    gate.save_pretrained(args.out)
    result["chosen"] = name
    result["chosen_train"] = rates(gate, named_train)
    # --- for information only: the test splits, after the choice -------------------------------
    result["test (information only)"] = {"shipped": rates(shipped, named_test), "chosen": rates(gate, named_test)}

    print(f"\nchosen (by pooled val harmful TPR): {name} -> {args.out}")
    w = max(len(k) for k in (*named_val, *named_test, *named_train))
    print(f"\n{'TRAIN':<{w}}  {'shipped':>8} {'chosen':>8}")
    for k in named_train:
        print(f"{k:<{w}}  {result['shipped']['train'][k]:>8.3f} {result['chosen_train'][k]:>8.3f}")
    print(f"\n{'VALIDATION':<{w}}  {'shipped':>8} {'chosen':>8}")
    for k in named_val:
        print(f"{k:<{w}}  {result['shipped']['val'][k]:>8.3f} {row['val'][k]:>8.3f}")
    print(f"\n{'TEST (information only)':<{w}}  {'shipped':>8} {'chosen':>8}")
    for k in named_test:
        t = result["test (information only)"]
        print(f"{k:<{w}}  {t['shipped'][k]:>8.3f} {t['chosen'][k]:>8.3f}")
    if args.json:
        for r in result["variants"].values():
            r.pop("gate")
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
