"""Issue #11: SAEs compared at long context, without re-running the model for each one.

WikiText-2 test's evaluation part in 16 chunks of 1,024 tokens (activations cached in
``--cache``), and the held-out sequences (``seq_id % 20 == 0``) of a chat activation folder: FVE
overall and per position bucket (0-127, 128-511, 512-1023; massive-activation tokens set apart,
:mod:`steerplug.pipeline.recon`), L0, and dead latents on each set and on both together.

    python benchmarks/sae_long_context.py --chat-acts runs/l11/acts_chat SAE_FOLDER [SAE_FOLDER ...]
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from steerplug.pipeline.evaluate import heldout_from_folder, wikitext_sequences
from steerplug.pipeline.recon import detailed_stats
from steerplug.sae import SparseAutoencoder


def wikitext_acts(cache: Path, hook: str, n: int = 16, length: int = 1024) -> tuple[torch.Tensor, torch.Tensor]:
    if cache.is_file():
        d = torch.load(cache)
        return d["acts"], d["pos"]
    from steerplug.layers import hidden_of, resolve_hook_point
    from steerplug.models import load_model

    model, tok = load_model(None)
    hp = resolve_hook_point(model, hook)
    store, acts = {}, []
    handle = hp.module.register_forward_hook(lambda m, a, o: store.__setitem__("h", hidden_of(o).detach()))
    try:
        for seq in wikitext_sequences(tok, n, length):
            with torch.no_grad():
                model(torch.tensor([seq]), use_cache=False)
            acts.append(store.pop("h")[0, 1:].float())
    finally:
        handle.remove()
    out = {"acts": torch.cat(acts), "pos": torch.arange(1, length).repeat(len(acts))}
    cache.parent.mkdir(parents=True, exist_ok=True)
    torch.save(out, cache)
    return out["acts"], out["pos"]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("saes", nargs="+")
    p.add_argument("--chat-acts", default=None, help="activation folder whose held-out sequences to score")
    p.add_argument("--holdout-every", type=int, default=20)
    p.add_argument("--cache", default="runs/l11/eval_acts_1024.pt")
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    sets = {}
    for path in args.saes:
        sae = SparseAutoencoder.from_pretrained(path)
        if not sets:
            sets["wikitext 16 x 1024"] = wikitext_acts(Path(args.cache), sae.cfg.hook_name)
            if args.chat_acts:
                sets["held-out chat"] = heldout_from_folder(args.chat_acts, args.holdout_every)
        fired = torch.zeros(sae.d_sae)
        for name, (acts, pos) in sets.items():
            st, freq = detailed_stats(sae, acts, pos)
            fired += freq * acts.shape[0]
            buckets = ", ".join(f"{b}: {v['fve_typical']:.3f}" for b, v in st["buckets"].items())
            print(f"{path} | {name} ({st['n_tokens']} tokens): L0 {st['l0']:.1f}, FVE {st['fve']:.3f} "
                  f"(typical {st['fve_typical']:.3f}; {buckets}), dead {st['dead_fraction']:.2%}")
        print(f"{path} | dead on all sets together: {float((fired == 0).float().mean()):.2%}")


if __name__ == "__main__":
    main()
