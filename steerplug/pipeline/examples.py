"""Inputs of the pipeline: chat examples (a question and an answer, with labels) and plain texts.

An :class:`Example` is tokenised into ``token_ids`` plus a per-position role (``prompt``, ``answer``
or ``text``). Answers are either given (HH-RLHF dialogues) or generated greedily by the model,
optionally forced to start with a prefix ("Sure, here is" / "I can't help with that").
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, NamedTuple

import torch

from steerplug.distributed import Dist

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


def text_examples(text: str | Iterable[str], tokenizer: Any, chunk_tokens: int, limit: int | None = None,
                  source: str = "text") -> list[Example]:
    """Plain-text chunks of about ``chunk_tokens`` tokens, cut at paragraph (line) boundaries;
    ``text`` is one text or an iterable of documents (packed one after another, so a chunk can
    span several short documents; read lazily, so a streamed dataset is read only as far as
    ``limit`` chunks need). Lines starting with ``=`` (WikiText's headings) are left out."""
    docs = [text] if isinstance(text, str) else text
    paragraphs = (p.strip() for doc in docs for p in doc.split("\n") if p.strip() and not p.strip().startswith("="))
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


TEXT_FILE_BUILDERS = {".txt": "text", ".json": "json", ".jsonl": "json", ".parquet": "parquet", ".csv": "csv"}


@dataclass(frozen=True)
class TextDataset:
    """Generic text for long-context collection: a Hugging Face dataset, streamed (so only the
    documents that ``chunks`` chunks need are read). ``path``: a Hub id (``HuggingFaceFW/fineweb-edu``;
    offline, from the local Hugging Face cache like any Hub dataset), a local folder of data files,
    or one ``.txt`` / ``.json(l)`` / ``.parquet`` / ``.csv`` file. ``name``: the dataset's config."""

    path: str
    chunks: int = 1000
    split: str = "train"
    column: str = "text"
    name: str | None = None

    def __post_init__(self) -> None:
        if self.chunks < 1:
            raise ValueError(f"TextDataset.chunks={self.chunks}: ask for at least one chunk.")

    def documents(self) -> Iterator[str]:
        """The ``column`` of each record, in the dataset's order."""
        try:
            import datasets
        except ImportError as err:
            raise ImportError("Reading a text dataset needs the `datasets` package: "
                              "pip install 'steerplug[train]' (or pip install datasets).") from err

        local = Path(self.path)
        if local.is_file():
            builder = TEXT_FILE_BUILDERS.get(local.suffix.lower())
            if builder is None:
                raise ValueError(f"{local}: cannot read {local.suffix!r} files as text; use one of "
                                 f"{sorted(TEXT_FILE_BUILDERS)}, a folder of them, or a Hub dataset id.")
            ds = datasets.load_dataset(builder, data_files=str(local), split=self.split, streaming=True)
        else:
            try:
                ds = datasets.load_dataset(self.path, self.name, split=self.split, streaming=True)
            except ConnectionError as err:  # offline or unreachable: the repo's files in the local cache
                ds = datasets.load_dataset(_cached_dataset_snapshot(self.path, err), self.name, split=self.split,
                                           streaming=True)
        for i, record in enumerate(ds):
            if self.column not in record:
                raise ValueError(f"{self.path} (split {self.split!r}) has no column {self.column!r}: its records have "
                                 f"{sorted(record)}. Name the text column with --text-column.")
            text = record[self.column]
            if not isinstance(text, str):
                raise ValueError(f"{self.path}: record {i}'s {self.column!r} is a {type(text).__name__}, not text.")
            yield text


def _cached_dataset_snapshot(repo_id: str, err: Exception) -> str:
    """The local folder of Hub dataset ``repo_id``'s files in the Hugging Face cache (``datasets``
    itself reads only its own processed cache offline, not the Hub cache ``hf download`` fills)."""
    from steerplug.hub import ArtifactNotFoundError, resolve_folder

    try:
        return str(resolve_folder(repo_id, local_files_only=True, repo_type="dataset"))
    except ArtifactNotFoundError:
        raise ConnectionError(f"Dataset {repo_id!r} is not reachable ({err}) and not in the local Hugging Face cache: "
                              f"connect once, or `hf download {repo_id} --repo-type dataset`, or pass a local "
                              "file or folder.") from err


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


def _write_json_atomic(path: Path, obj: Any) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(obj, indent=1))
    os.replace(tmp, path)


# --- building the example list (shared with the CLI and the artifacts builder) ------------------
def build_examples(model: Any, tokenizer: Any, *, prompt_sets: list[str] = (), hh_rlhf: int = 0,
                   hh_rlhf_text: int = 0, wikitext_chunks: int = 0, chunk_tokens: int = 128,
                   text_dataset: TextDataset | None = None, limit_per_set: int | None = None,
                   generate: bool = True, max_new_tokens: int = 48, gen_batch_size: int = 16,
                   seed: int = 0, data: str | None = None, cache: str | Path | None = None,
                   progress: bool = True, dist: Dist | None = None) -> list[Example]:
    """Examples from named prompt sets (answers generated greedily), HH-RLHF dialogues (answers
    given; ``hh_rlhf_text`` more of them as plain "Human: / Assistant:" text without the chat
    template, sampled independently with ``seed + 1``), chunks of WikiText-2 test's training part
    (disjoint from the articles ``evaluate-sae`` scores) and the first ``text_dataset.chunks`` chunks
    of a text dataset (both ``chunk_tokens`` long). ``limit_per_set`` samples each prompt set with
    ``seed``. With ``cache`` (a JSON path) the list, with its generated answers, is reused.
    Under several ranks (``dist``) the generation batches are shared out and every rank returns
    the whole list; rank 0 writes the cache."""
    from steerplug import data as D

    dist = dist or Dist()

    if cache is not None and Path(cache).is_file():
        return [Example(**e) for e in json.loads(Path(cache).read_text())]
    g = torch.Generator().manual_seed(seed)
    examples: list[Example] = []
    for name in prompt_sets:
        prompts = D.load_prompts(name, data)
        if limit_per_set is not None and len(prompts) > limit_per_set:
            pick = torch.randperm(len(prompts), generator=g)[:limit_per_set].sort().values
            prompts = [prompts[int(i)] for i in pick]
        exs = prompt_examples(prompts)
        if generate:
            exs = _generate_shared(model, tokenizer, exs, dist, max_new_tokens=max_new_tokens,
                                   batch_size=gen_batch_size, progress=progress and dist.is_main)
        examples += exs
    if hh_rlhf:
        dialogues = D.hh_rlhf_harmless_test(data)
        pick = torch.randperm(len(dialogues), generator=g)[:hh_rlhf].sort().values
        examples += hh_rlhf_examples([dialogues[int(i)] for i in pick])
    if hh_rlhf_text:
        dialogues = D.hh_rlhf_harmless_test(data)
        pick = torch.randperm(len(dialogues), generator=torch.Generator().manual_seed(seed + 1))[:hh_rlhf_text]
        examples += [Example(text=dialogues[int(i)]["chosen"].strip(),
                             labels={"source": "hh_rlhf_text", "index": int(i)}) for i in pick.sort().values]
    if wikitext_chunks:
        # Only the training part: the evaluation part stays held out (steerplug.data.wikitext_test).
        examples += text_examples(D.wikitext_test(data, part="train"), tokenizer, chunk_tokens,
                                  limit=wikitext_chunks, source="wikitext2_test_train_part")
    if text_dataset is not None:
        examples += text_examples(text_dataset.documents(), tokenizer, chunk_tokens, limit=text_dataset.chunks,
                                  source=f"dataset:{text_dataset.path}")
    if cache is not None and dist.is_main:
        Path(cache).parent.mkdir(parents=True, exist_ok=True)
        _write_json_atomic(Path(cache), [asdict(e) for e in examples])
    return examples


def _generate_shared(model: Any, tokenizer: Any, examples: list[Example], dist: Dist, *, batch_size: int,
                     **kwargs: Any) -> list[Example]:
    """``generate_answers`` with every ``world_size``-th batch of ``batch_size`` examples on each
    rank: the batches are the ones one process would decode, so the answers are the same."""
    starts = list(range(0, len(examples), batch_size))[dist.rank::dist.world_size]
    mine = [e for s in starts for e in examples[s:s + batch_size]]  # whole batches; a short one only last
    answered = generate_answers(model, tokenizer, mine, batch_size=batch_size, **kwargs) if mine else []
    if not dist.active:
        return answered
    by_start: dict[int, list[Example]] = {}
    for rank, part in enumerate(dist.all_gather_object(answered)):
        for j, s in enumerate(range(0, len(examples), batch_size)[rank::dist.world_size]):
            by_start[s] = part[j * batch_size:(j + 1) * batch_size]
    return [e for s in sorted(by_start) for e in by_start[s]]
