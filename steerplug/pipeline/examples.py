"""Inputs of the pipeline: chat examples (a question and an answer, with labels) and plain texts.

An :class:`Example` is tokenised into ``token_ids`` plus a per-position role (``prompt``, ``answer``
or ``text``). Answers are either given (HH-RLHF dialogues) or generated greedily by the model,
optionally forced to start with a prefix ("Sure, here is" / "I can't help with that").
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from typing import Any, NamedTuple

import torch

ROLE_PROMPT, ROLE_ANSWER, ROLE_TEXT = 0, 1, 2
ROLE_NAMES = {ROLE_PROMPT: "prompt", ROLE_ANSWER: "answer", ROLE_TEXT: "text"}

COMPLY_PREFIX = "Sure, here is"
REFUSE_PREFIX = "I can't help with that."


@dataclass
class Example:
    """One sequence to run through the model: a conversation with an answer, or a plain text."""

    messages: list[dict[str, str]] | None = None
    """Chat turns up to (not including) the answer; None for a plain text."""
    answer: str | None = None
    """The assistant's answer (given, or filled in by :func:`generate_answers`)."""
    text: str | None = None
    """A plain text (no chat template); exclusive with ``messages``."""
    labels: dict[str, Any] = field(default_factory=dict)
    """Labels stored in the manifest: ``source``, ``category``, ``harmful``, ``answer_kind``."""

    def __post_init__(self) -> None:
        if (self.messages is None) == (self.text is None):
            raise ValueError("Example needs exactly one of messages= (a chat) or text= (plain text); "
                             f"got messages={self.messages!r}, text={self.text!r}.")


class Tokenized(NamedTuple):
    """An example as token ids and the role of each position."""

    token_ids: list[int]
    roles: list[int]


def tokenize_example(tokenizer: Any, ex: Example, max_length: int) -> Tokenized:
    """Token ids (chat template for conversations) and roles, truncated to ``max_length``."""
    if ex.text is not None:
        ids = tokenizer(ex.text, add_special_tokens=True)["input_ids"]
        return Tokenized(ids[:max_length], [ROLE_TEXT] * min(len(ids), max_length))
    prompt = tokenizer.apply_chat_template(ex.messages, add_generation_prompt=True, tokenize=False)
    p_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    a_ids = []
    if ex.answer is not None:
        a_ids = tokenizer(ex.answer + (tokenizer.eos_token or ""), add_special_tokens=False)["input_ids"]
    ids = (p_ids + a_ids)[:max_length]
    roles = ([ROLE_PROMPT] * len(p_ids) + [ROLE_ANSWER] * len(a_ids))[:max_length]
    return Tokenized(ids, roles)


def prompt_examples(prompts: list, system: str | None = None) -> list[Example]:
    """Examples (no answer yet) from :class:`steerplug.data.Prompt` objects."""
    out = []
    for p in prompts:
        msgs = ([{"role": "system", "content": system}] if system else []) + [
            {"role": "user", "content": p.text}]
        out.append(Example(messages=msgs, labels={"source": p.source, "category": p.category,
                                                  "harmful": bool(p.harmful)}))
    return out


_TURN_RE = re.compile(r"\n\n(Human|Assistant): ")


def hh_rlhf_examples(dialogues: list[dict[str, str]], key: str = "chosen") -> list[Example]:
    """HH-RLHF dialogues as chat examples: earlier turns are the prompt, the last assistant turn
    the (given) answer."""
    out = []
    for i, d in enumerate(dialogues):
        parts = _TURN_RE.split(d[key])[1:]  # [speaker, text, speaker, text, ...]
        turns = [{"role": "user" if s == "Human" else "assistant", "content": t.strip()}
                 for s, t in zip(parts[0::2], parts[1::2])]
        if len(turns) < 2 or turns[-1]["role"] != "assistant" or not turns[-1]["content"]:
            continue
        out.append(Example(messages=turns[:-1], answer=turns[-1]["content"],
                           labels={"source": f"hh_rlhf_{key}", "category": None, "harmful": None,
                                   "answer_kind": "given", "index": i}))
    return out


def text_examples(text: str, tokenizer: Any, chunk_tokens: int, limit: int | None = None,
                  source: str = "text") -> list[Example]:
    """Plain-text chunks of about ``chunk_tokens`` tokens (split on paragraph boundaries)."""
    paragraphs = [p.strip() for p in text.split("\n") if p.strip() and not p.strip().startswith("=")]
    out, buf, n = [], [], 0
    for p in paragraphs:
        buf.append(p)
        n += len(tokenizer(p, add_special_tokens=False)["input_ids"])
        if n >= chunk_tokens:
            out.append(Example(text="\n".join(buf), labels={"source": source}))
            buf, n = [], 0
            if limit is not None and len(out) >= limit:
                break
    return out


@torch.no_grad()
def generate_answers(model: Any, tokenizer: Any, examples: list[Example], *, max_new_tokens: int = 48,
                     batch_size: int = 16, prefix: str | None = None, answer_kind: str | None = None,
                     progress: bool = True) -> list[Example]:
    """Fill in each example's answer by greedy decoding (batched, left padding). With ``prefix``
    the answer is forced to start with it and the model continues."""
    from tqdm.auto import tqdm

    device = next(model.parameters()).device
    out: list[Example] = []
    side = tokenizer.padding_side
    tokenizer.padding_side = "left"
    try:
        for start in tqdm(range(0, len(examples), batch_size), desc="generate", disable=not progress):
            batch = examples[start:start + batch_size]
            texts = [tokenizer.apply_chat_template(e.messages, add_generation_prompt=True, tokenize=False)
                     + (prefix or "") for e in batch]
            enc = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False).to(device)
            gen = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False,
                                 pad_token_id=tokenizer.pad_token_id)
            for e, row in zip(batch, gen[:, enc["input_ids"].shape[1]:]):
                cont = tokenizer.decode(row, skip_special_tokens=True)
                labels = dict(e.labels, answer_kind=answer_kind or e.labels.get("answer_kind", "generated"))
                out.append(replace(e, answer=(prefix or "") + cont, labels=labels))
    finally:
        tokenizer.padding_side = side
    return out


def padded_batches(seqs: list[list[int]], bs: int, pad_id: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """``seqs`` in batches of ``bs``, right-padded with ``pad_id``: ``(ids, mask)``, each ``(B, T)``."""
    for s in range(0, len(seqs), bs):
        chunk = seqs[s:s + bs]
        T = max(len(c) for c in chunk)
        ids = torch.full((len(chunk), T), pad_id, dtype=torch.long)  # (B, T)
        mask = torch.zeros_like(ids)
        for r, c in enumerate(chunk):
            ids[r, :len(c)] = torch.tensor(c)
            mask[r, :len(c)] = 1
        yield ids, mask
