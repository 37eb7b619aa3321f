"""``steerplug collect``: per-token residual activations at one or more hook points.

The forward pass stops right after the deepest hooked module (a private exception raised from
its hook): the layers above it, the final norm and the LM head never run.

Output folder::

    manifest.json                    hooks, model, dtype, shards, per-sequence labels, progress
    examples.json                    the examples (with generated answers), cached for resume
    shard_00000.safetensors          acts.<hook> [N, D], token_ids [N], seq_ids [N],
                                     positions [N], roles [N] (0 prompt, 1 answer, 2 text)

Shards hold whole sequences and are written atomically; an interrupted run resumes after the last
complete shard. Sequences are batched by length (a deterministic order), so the result does not
depend on where a run was interrupted.

Under ``torchrun`` (see :mod:`steerplug.distributed`) every rank computes the same batches and
takes every ``world_size``-th of those not yet done; it writes its own shards and records them in
``progress.rank<R>.json``. After a barrier rank 0 lists all shards in the manifest (ordered by
their first batch), so ``train`` and ``evaluate-sae`` read the folder exactly as a one-process one.
Each shard records its batches, so an interrupted run resumes on any number of ranks. Answers
are generated the same way: each rank decodes every ``world_size``-th generation batch (the same
batches as one process), and the answers are gathered before collection starts.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from steerplug._config import require_ints
from steerplug.distributed import Dist, setup
from steerplug.layers import HookPoint, hidden_of, resolve_hook_point
from steerplug.pipeline.examples import (  # noqa: F401 (build_examples: re-exported)
    Example, TextDataset, _write_json_atomic, build_examples, tokenize_example)

MANIFEST_NAME = "manifest.json"
EXAMPLES_NAME = "examples.json"
SHARD_PATTERN = "shard_{:05d}.safetensors"
"""Formatted with the index of the shard's first batch (unique across ranks)."""
PROGRESS_PATTERN = "progress.rank{}.json"
_KIND_ORDER = {"hook_resid_pre": 0, "hook_mlp_out": 1, "hook_resid_post": 2}


class _StopForward(Exception):
    """Raised from the deepest hook to end the forward pass early (never escapes this module)."""


def _depth(hp: HookPoint) -> tuple[int, int]:
    """Execution order of hook points: layer, then resid_pre < mlp_out < resid_post."""
    kind = hp.name.rsplit(".", 1)[-1]
    return hp.layer, _KIND_ORDER.get(kind, 2 if hp.io == "output" else 0)


@torch.no_grad()
def capture_activations(model: nn.Module, hook_points: list[HookPoint], input_ids: torch.Tensor,
                        attention_mask: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    """Run ``model`` until the deepest of ``hook_points`` and return ``{hook name: (B, T, D)}``.

    Nothing above the deepest hooked module is computed.
    """
    if not hook_points:
        raise ValueError("capture_activations needs at least one hook point.")
    deepest = max(hook_points, key=_depth)
    captured: dict[str, torch.Tensor] = {}
    handles = []

    def make(hp: HookPoint):
        stop = hp is deepest
        if hp.io == "input":
            def pre_hook(module, args, kwargs):
                h = args[0] if args else kwargs["hidden_states"]
                captured[hp.name] = h.detach()
                if stop:
                    raise _StopForward
            return hp.module.register_forward_pre_hook(pre_hook, with_kwargs=True)

        def post_hook(module, args, output):
            captured[hp.name] = hidden_of(output).detach()
            if stop:
                raise _StopForward
        return hp.module.register_forward_hook(post_hook)

    try:
        for hp in hook_points:
            handles.append(make(hp))
        try:
            model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
        except _StopForward:
            pass
    finally:
        for h in handles:
            h.remove()
    missing = [hp.name for hp in hook_points if hp.name not in captured]
    if missing:
        raise RuntimeError(f"Hook point(s) {missing} never ran during the forward pass.")
    return captured


@dataclass
class CollectConfig:
    """How activations are collected and stored."""

    hooks: list[str] = field(default_factory=lambda: ["blocks.15.hook_resid_post"])
    """Hook names (``blocks.L.hook_resid_post`` / ``hook_resid_pre`` / ``hook_mlp_out``) or int layers."""
    max_length: int = 256
    """Sequences are truncated to this many tokens."""
    batch_size: int = 8
    """Sequences per forward pass."""
    shard_tokens: int = 65536
    """A shard is written once it holds at least this many tokens (whole sequences only)."""
    dtype: str = "float32"
    """Storage dtype of the activations: float32, float16 or bfloat16."""
    progress: bool = True
    """Show a tqdm bar."""

    def __post_init__(self) -> None:
        if isinstance(self.hooks, (str, int)):
            self.hooks = [self.hooks]
        if not self.hooks:
            raise ValueError("CollectConfig.hooks is empty: name at least one hook point.")
        require_ints(self, ("max_length", "batch_size", "shard_tokens"))
        if self.dtype not in ("float32", "float16", "bfloat16"):
            raise ValueError(f"CollectConfig.dtype={self.dtype!r}: expected float32, float16 or bfloat16.")


class CollectResult(NamedTuple):
    """What :func:`collect_activations` returns."""

    out_dir: Path
    n_tokens: int
    n_sequences: int
    n_shards: int


def _fingerprint(seqs: list[list[int]], hooks: list[str]) -> str:
    h = hashlib.sha256(json.dumps(hooks).encode())
    for s in seqs:
        h.update(len(s).to_bytes(4, "little"))
        h.update(torch.tensor(s, dtype=torch.int64).numpy().tobytes())
    return h.hexdigest()[:16]


def _rank_progress(out: Path) -> list[dict[str, Any]]:
    """Shards recorded by ranks of a multi-rank run that rank 0 has not yet merged."""
    return [sh for f in sorted(out.glob(PROGRESS_PATTERN.format("*")))
            for sh in json.loads(f.read_text())["shards"]]


def collect_activations(model: nn.Module, tokenizer: Any, examples: list[Example], out_dir: str | Path,
                        config: CollectConfig | None = None, *, layers_path: str | None = None,
                        model_name: str | None = None, dist: Dist | None = None) -> CollectResult:
    """Run ``model`` over ``examples`` and store the activations at ``config.hooks`` in ``out_dir``.

    Resumes from the complete shards of an earlier run on the same examples and hooks. ``dist``:
    this process's place in a data-parallel job (None: :func:`~steerplug.distributed.setup`);
    every rank passes the same ``examples`` and writes its share of the batches.
    """
    from tqdm.auto import tqdm

    cfg = config or CollectConfig()
    device = next(model.parameters()).device
    dist = dist or setup(device)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    points = [resolve_hook_point(model, h, layers_path) for h in cfg.hooks]
    names = [p.name for p in points]
    if len(set(names)) != len(names):
        raise ValueError(f"CollectConfig.hooks={cfg.hooks!r} names the same hook point twice.")
    toks = [tokenize_example(tokenizer, ex, cfg.max_length) for ex in examples]
    keep = [i for i, t in enumerate(toks) if len(t.token_ids) > 0]
    order = sorted(keep, key=lambda i: (len(toks[i].token_ids), i))  # length-bucketed, deterministic
    batches = [order[s:s + cfg.batch_size] for s in range(0, len(order), cfg.batch_size)]
    fp = _fingerprint([toks[i].token_ids for i in range(len(toks))], names)
    store_dtype = getattr(torch, cfg.dtype)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0

    manifest_path = out / MANIFEST_NAME
    if dist.is_main and not manifest_path.is_file():
        _write_json_atomic(manifest_path, {
            "format": "steerplug-activations-v1", "fingerprint": fp, "hooks": names,
            "d_model": None, "dtype": cfg.dtype, "model_name": model_name or getattr(
                getattr(model, "config", None), "name_or_path", None),
            "config": asdict(cfg), "roles": {"0": "prompt", "1": "answer", "2": "text"},
            "sequences": [dict(ex.labels, seq_id=i, n_tokens=len(toks[i].token_ids))
                          for i, ex in enumerate(examples)],
            "shards": [], "batches_done": 0, "complete": False,
        })
    dist.barrier()  # the manifest exists before any rank reads it
    manifest: dict[str, Any] = json.loads(manifest_path.read_text())
    if manifest.get("fingerprint") != fp:
        raise ValueError(f"{out} holds activations of other examples or hooks (fingerprint "
                         f"{manifest.get('fingerprint')} != {fp}); use a fresh folder.")
    done = {b for sh in manifest["shards"] + _rank_progress(out) for b in sh["batches"]}
    todo = [b for b in range(len(batches)) if b not in done]
    mine = todo[dist.rank::dist.world_size]
    # One process records its shards in the manifest itself; a rank of several in its own file.
    progress_path = out / PROGRESS_PATTERN.format(dist.rank) if dist.active else manifest_path
    progress = json.loads(progress_path.read_text()) if progress_path.is_file() else {"shards": []}
    buf: dict[str, list[torch.Tensor]] = {}
    buf_batches: list[int] = []
    buf_tokens = 0

    def flush() -> None:
        nonlocal buf, buf_batches, buf_tokens
        if buf_tokens:
            fname = SHARD_PATTERN.format(buf_batches[0])
            tensors = {k: torch.cat(v).contiguous() for k, v in buf.items()}
            tmp = out / (fname + ".tmp")
            save_file(tensors, str(tmp))
            os.replace(tmp, out / fname)
            progress["shards"].append({"file": fname, "n_tokens": buf_tokens, "batches": buf_batches,
                                       "rank": dist.rank, "world_size": dist.world_size,
                                       "n_sequences": int(tensors["seq_ids"].unique().numel())})
            progress["batches_done"] = sum(len(sh["batches"]) for sh in progress["shards"])
            _write_json_atomic(progress_path, progress)
        buf, buf_batches, buf_tokens = {}, [], 0

    bar = tqdm(total=sum(len(toks[i].token_ids) for b in mine for i in batches[b]), desc="collect",
               unit="tok", disable=not (cfg.progress and dist.is_main))
    d_model = manifest["d_model"]
    for b_idx in mine:
        batch = batches[b_idx]
        lens = [len(toks[i].token_ids) for i in batch]
        T = max(lens)
        ids = torch.full((len(batch), T), pad_id, dtype=torch.long)  # (B, T), right padding
        mask = torch.zeros((len(batch), T), dtype=torch.long)
        for r, i in enumerate(batch):
            ids[r, :lens[r]] = torch.tensor(toks[i].token_ids)
            mask[r, :lens[r]] = 1
        acts = capture_activations(model, points, ids.to(device), mask.to(device))
        valid = mask.bool()  # (B, T)
        d_model = int(next(iter(acts.values())).shape[-1])
        for name in names:
            buf.setdefault(f"acts.{name}", []).append(acts[name].cpu()[valid].to(store_dtype))  # (n, D)
        buf.setdefault("token_ids", []).append(ids[valid])
        buf.setdefault("seq_ids", []).append(torch.tensor(batch).repeat_interleave(torch.tensor(lens)))
        buf.setdefault("positions", []).append(torch.cat([torch.arange(n) for n in lens]))
        buf.setdefault("roles", []).append(torch.cat([torch.tensor(toks[i].roles, dtype=torch.int8)
                                                      for i in batch]))
        buf_batches.append(b_idx)
        buf_tokens += sum(lens)
        bar.update(sum(lens))
        if buf_tokens >= cfg.shard_tokens:
            flush()
    flush()
    bar.close()
    d_models = {d for d in dist.all_gather_object(d_model) if d is not None}
    dist.barrier()  # every rank's shards are on disk
    if dist.is_main:
        manifest = json.loads(manifest_path.read_text())
        shards = {sh["file"]: sh for sh in manifest["shards"] + _rank_progress(out)}
        manifest["shards"] = sorted(shards.values(), key=lambda sh: sh["batches"][0])
        manifest["batches_done"] = sum(len(sh["batches"]) for sh in manifest["shards"])
        manifest["d_model"] = manifest["d_model"] or (d_models.pop() if d_models else None)
        manifest["complete"] = True
        manifest["n_tokens"] = sum(sh["n_tokens"] for sh in manifest["shards"])
        _write_json_atomic(manifest_path, manifest)
        for f in out.glob(PROGRESS_PATTERN.format("*")):
            f.unlink()
    dist.barrier()  # the manifest is complete before any rank returns
    manifest = json.loads(manifest_path.read_text())
    return CollectResult(out, manifest["n_tokens"], len(order), len(manifest["shards"]))


class Activations(NamedTuple):
    """Activations of one hook point with their per-token annotations (all on CPU)."""

    acts: torch.Tensor
    """``(N, D)`` activations."""
    token_ids: torch.Tensor
    """``(N,)`` token ids."""
    seq_ids: torch.Tensor
    """``(N,)`` index of the sequence in the manifest's ``sequences``."""
    positions: torch.Tensor
    """``(N,)`` position in the sequence."""
    roles: torch.Tensor
    """``(N,)`` 0 prompt, 1 answer, 2 text."""


def read_manifest(folder: str | Path) -> dict[str, Any]:
    path = Path(folder) / MANIFEST_NAME
    if not path.is_file():
        raise FileNotFoundError(f"{folder} has no {MANIFEST_NAME}: not an activation folder (run `steerplug collect`).")
    return json.loads(path.read_text())


def load_activations(folder: str | Path, hook: str | None = None, *, skip_first: bool = True,
                     roles: tuple[int, ...] | None = None, dtype: torch.dtype = torch.float32,
                     max_tokens: int | None = None) -> Activations:
    """Read the shards of one hook point (the only one if ``hook`` is None). ``skip_first`` drops
    position 0 of every sequence (the attention sink); ``roles`` keeps only those roles."""
    folder = Path(folder)
    man = read_manifest(folder)
    if hook is None:
        if len(man["hooks"]) != 1:
            raise ValueError(f"{folder} holds hooks {man['hooks']}: name one with hook=.")
        hook = man["hooks"][0]
    if hook not in man["hooks"]:
        raise ValueError(f"hook={hook!r} is not in {folder} (it holds {man['hooks']}).")
    parts: dict[str, list[torch.Tensor]] = {k: [] for k in Activations._fields}
    n = 0
    for shard in man["shards"]:
        t = load_file(str(folder / shard["file"]))
        keep = torch.ones(t["token_ids"].shape[0], dtype=torch.bool)
        if skip_first:
            keep &= t["positions"] > 0
        if roles is not None:
            keep &= torch.isin(t["roles"].long(), torch.tensor(roles))
        parts["acts"].append(t[f"acts.{hook}"][keep].to(dtype))
        for k in ("token_ids", "seq_ids", "positions", "roles"):
            parts[k].append(t[k][keep])
        n += int(keep.sum())
        if max_tokens is not None and n >= max_tokens:
            break
    if not parts["acts"]:
        raise ValueError(f"{folder} has no shards yet.")
    res = Activations(*(torch.cat(parts[k]) for k in Activations._fields))
    if max_tokens is not None:
        res = Activations(*(x[:max_tokens] for x in res))
    return res


# --- CLI ------------------------------------------------------------------------------------------
def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", required=True, help="output folder (resumed if it exists)")
    p.add_argument("--model", default=None, help="Hub id or folder (default: offline SmolLM2-135M-Instruct)")
    p.add_argument("--hooks", nargs="+", default=["blocks.15.hook_resid_post"],
                   help="hook names, e.g. blocks.15.hook_resid_post (several allowed)")
    p.add_argument("--prompt-sets", nargs="*", default=["harmful_train", "harmless_train"],
                   help="named prompt sets (steerplug.data.PROMPT_SETS); answers are generated")
    p.add_argument("--limit-per-set", type=int, default=None, help="sample at most this many prompts per set")
    p.add_argument("--hh-rlhf", type=int, default=0, help="number of HH-RLHF dialogues (answers given)")
    p.add_argument("--hh-rlhf-text", type=int, default=0,
                   help="number of HH-RLHF dialogues as plain text (no chat template)")
    p.add_argument("--wikitext-chunks", type=int, default=0, help="chunks of WikiText-2 test's training part (the evaluation part is never collected)")
    p.add_argument("--text-dataset", default=None,
                   help="generic text in --chunk-tokens chunks from a Hugging Face dataset (streamed): a Hub id, "
                        "e.g. HuggingFaceFW/fineweb-edu, a local folder of data files, or one .txt/.jsonl/.parquet/.csv file")
    p.add_argument("--text-dataset-config", default=None, help="the --text-dataset's config (subset) name")
    p.add_argument("--text-split", default="train", help="the --text-dataset's split")
    p.add_argument("--text-column", default="text", help="the --text-dataset's column holding the text")
    p.add_argument("--text-chunks", type=int, default=1000, help="how many chunks of --text-dataset to collect")
    p.add_argument("--chunk-tokens", type=int, default=128,
                   help="about this many tokens per WikiText / --text-dataset chunk (split on paragraphs; "
                        "cut at --max-length)")
    p.add_argument("--no-generate", action="store_true", help="prompts only, no generated answers")
    p.add_argument("--max-new-tokens", type=int, default=48)
    p.add_argument("--max-length", type=int, default=256)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--shard-tokens", type=int, default=65536)
    p.add_argument("--dtype", default="float32", choices=("float32", "float16", "bfloat16"))
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--data-dir", default=None)
    p.add_argument("--device", default=None,
                   help="cpu, cuda, ... (default: the CPU; under torchrun cuda:LOCAL_RANK when CUDA is available)")


def run(args: argparse.Namespace) -> int:
    """Under ``torchrun --nproc-per-node N``: each of the N ranks generates and collects its share."""
    from steerplug.distributed import teardown
    from steerplug.models import load_model

    torch.manual_seed(args.seed)
    dist = setup(args.device)
    model, tok = load_model(args.model, device_map=None if dist.device.type == "cpu" else {"": dist.device})
    out = Path(args.out)
    examples = build_examples(model, tok, prompt_sets=args.prompt_sets, hh_rlhf=args.hh_rlhf,
                              hh_rlhf_text=args.hh_rlhf_text,
                              wikitext_chunks=args.wikitext_chunks, chunk_tokens=args.chunk_tokens,
                              text_dataset=TextDataset(args.text_dataset, args.text_chunks, args.text_split,
                                                       args.text_column, args.text_dataset_config)
                              if args.text_dataset else None,
                              limit_per_set=args.limit_per_set,
                              generate=not args.no_generate, max_new_tokens=args.max_new_tokens,
                              seed=args.seed, data=args.data_dir, cache=out / EXAMPLES_NAME, dist=dist)
    cfg = CollectConfig(hooks=args.hooks, max_length=args.max_length, batch_size=args.batch_size,
                        shard_tokens=args.shard_tokens, dtype=args.dtype)
    from steerplug.models import DEFAULT_MODEL_ID

    res = collect_activations(model, tok, examples, out, cfg, model_name=args.model or DEFAULT_MODEL_ID, dist=dist)
    if dist.is_main:
        print(f"collected {res.n_tokens} tokens of {res.n_sequences} sequences in {res.n_shards} shards -> {res.out_dir}"
              + (f" ({dist.world_size} ranks)" if dist.active else ""))
    teardown()
    return 0
