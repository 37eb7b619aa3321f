"""Greedy generation under a configuration override, shared by the judge label pool scripts."""
from dataclasses import replace

import torch

from steerplug.pipeline.refusals import chat_texts


@torch.no_grad()
def generate_with(st, prompts, overrides, max_new_tokens=64, batch_size=32):
    """``st``'s greedy answers to ``prompts`` with ``st.config`` changed by ``overrides`` for the call."""
    tok = st.tokenizer
    old, st.config = st.config, replace(st.config, **overrides)
    side, tok.padding_side = tok.padding_side, "left"
    try:
        texts = chat_texts(tok, prompts)
        order = sorted(range(len(texts)), key=lambda i: len(texts[i]))
        out = [""] * len(texts)
        for s in range(0, len(order), batch_size):
            idx = order[s:s + batch_size]
            enc = tok([texts[i] for i in idx], return_tensors="pt", padding=True, add_special_tokens=False)
            gen = st.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=tok.pad_token_id)
            for j, i in enumerate(idx):
                out[i] = tok.decode(gen[j, enc["input_ids"].shape[1]:], skip_special_tokens=True)
        return out
    finally:
        st.config, tok.padding_side = old, side
