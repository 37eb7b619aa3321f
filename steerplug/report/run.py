"""Running the report's rows through lm-eval, with a cache that a changed input never reuses."""

from __future__ import annotations

import hashlib
import json
import logging
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch

from steerplug._version import __version__
from steerplug.report.methods import HARMFUL_SETS, HARMLESS_SETS, HELLASWAG_TASK, Method
from steerplug.report.render import markdown, pareto_plot
from steerplug.report.summary import frontier_summary, rejudge, summarise

logger = logging.getLogger(__name__)
EVALS_DIR = Path(__file__).resolve().parent.parent.parent / "evals"
SEED = 1234
DATA_FOLDERS = ("jailbreakbench", "harmbench", "refusal_direction_splits", "xstest", "hellaswag")
"""The data folders the report's tasks read (hashed into the cache key)."""


def _hash_tensors(h: Any, tensors: list[torch.Tensor]) -> None:
    for t in tensors:
        h.update(t.detach().float().cpu().contiguous().numpy().tobytes())


def artifacts_digest(steered: Any) -> str:
    """A content hash of everything the steering reads: every site's hook, SAE weights, vector and
    direction, and the gate (so an in-place edit of any of them changes it)."""
    h = hashlib.sha256()
    for site in steered.sites:
        h.update(site.hook_point.name.encode())
        if site.sae is not None:
            _hash_tensors(h, list(site.sae.parameters()))
        if site.vector is not None:
            _hash_tensors(h, [site.vector.dense()])
        if site.direction is not None:
            _hash_tensors(h, [site.direction])
    gate = steered.gate
    if gate is not None:
        h.update(json.dumps([gate.pools, gate.reads, gate.bias, gate.threshold, gate.metadata.hook_name]).encode())
        _hash_tensors(h, [gate.weights, *(gate.hidden or ())])
    return h.hexdigest()[:16]


def files_digest(paths: list[Path]) -> str:
    """A content hash of files and folders (missing ones count by name)."""
    h = hashlib.sha256()
    for p in paths:
        h.update(str(p.name).encode())
        for f in sorted(p.rglob("*") if p.is_dir() else [p] if p.exists() else []):
            if f.is_file() and "__pycache__" not in f.parts:
                h.update(str(f.relative_to(p.parent)).encode())
                h.update(f.read_bytes())
    return h.hexdigest()[:16]


def code_and_data_digest(data_dir: str | None = None) -> dict[str, str]:
    """The steerplug version, the evals/ task files and the data the tasks read, hashed."""
    from steerplug.data import data_dir as resolve

    root = resolve(data_dir)
    return {"steerplug": __version__, "evals": files_digest([EVALS_DIR]),
            "data": files_digest([root / d for d in DATA_FOLDERS])}


def method_key(lm: Any, m: Method, settings: dict[str, Any], digests: dict[str, str] | None = None) -> str:
    """The cache key: the model, the steerplug version, the evals/ and data files, the task
    settings, the system prompt, and, for a row that steers, the resolved steering configuration
    and the content of every artifact it reads (all sites and the gate)."""
    from steerplug.interventions import Intervention

    config = m.config(lm.default_steering)
    spec = Intervention(**m.intervention)
    steers = config.steps > 0 and lm.steered.can_steer
    refs = {k: v for k, v in lm._references.items() if k not in ("sae", "vector", "gate")}  # noqa: SLF001
    refs["pretrained"] = str(refs.get("pretrained"))
    payload = {"model": refs, "digests": digests if digests is not None else code_and_data_digest(),
               "artifacts": artifacts_digest(lm.steered) if steers else None,
               "steering": asdict(config) if steers else None,
               "intervention": spec.describe() if steers else None,
               "system_prompt": m.system_prompt, "hellaswag": m.hellaswag, "settings": settings}
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()[:20]


def _is_main(lm: Any) -> bool:
    """Rank 0 of a report run under ``torchrun`` (lm-eval gathers every result there)."""
    return getattr(lm, "rank", 0) == 0


def _agree(lm: Any, value: bool) -> bool:
    """Rank 0's ``value`` on every rank (each rank must take the same branch into lm-eval)."""
    if getattr(lm, "world_size", 1) <= 1:
        return value
    import torch.distributed as dist

    box = [value]
    dist.broadcast_object_list(box, src=0)
    return bool(box[0])


def _evaluate(lm: Any, tasks: list[str], task_manager: Any, limit: int, *, chat: bool,
              system_prompt: str | None, max_new_tokens: int) -> dict[str, Any]:
    """lm-eval's results and samples of ``tasks``; ``{}`` on a rank other than 0 (it did its
    share of the requests, rank 0 holds the gathered results)."""
    from lm_eval import simple_evaluate

    out = simple_evaluate(model=lm, tasks=tasks, task_manager=task_manager, limit=limit,
                          bootstrap_iters=0, log_samples=True, apply_chat_template=chat,
                          system_instruction=system_prompt,
                          gen_kwargs=f"max_gen_toks={max_new_tokens}" if chat else None,
                          random_seed=SEED, numpy_random_seed=SEED, torch_random_seed=SEED,
                          fewshot_random_seed=SEED)
    if out is None:  # not rank 0
        return {}
    res = {}
    for t in tasks:
        metrics = {k.split(",")[0]: v for k, v in out["results"][t].items()
                   if k.endswith(",none") and "_stderr" not in k}
        samples = [{"doc_id": s["doc_id"], "context": s["arguments"][0][0] if chat else None,
                    "response": s["resps"][0][0] if chat else None,
                    **({k: s[k] for k in ("refusal", "raw_refusal", "coherent", "repetition")}
                       if chat else {})}
                   for s in out["samples"][t]]
        res[t] = {"metrics": metrics, "n": len(out["samples"][t]), "samples": samples}
    return res


@torch.no_grad()
def answer_perplexity(lm: Any, contexts: list[str], answers: list[str], batch_size: int = 8
                      ) -> list[float | None]:
    """Perplexity of each answer given its (chat-templated) context under the *unsteered* model."""
    model = lm.steered.model
    out: list[float | None] = []
    for i in range(0, len(answers), batch_size):
        seqs, spans = [], []
        for ctx, ans in zip(contexts[i:i + batch_size], answers[i:i + batch_size]):
            c = lm.tok_encode(ctx)
            a = lm.tok_encode(ans, add_special_tokens=False) if ans else []
            ids = (c + a)[-lm.max_length:]
            seqs.append(ids)
            spans.append(min(len(a), len(ids) - 1))
        T = max(len(s) for s in seqs)
        ids = torch.zeros(len(seqs), T, dtype=torch.long)
        mask = torch.zeros(len(seqs), T, dtype=torch.long)
        for r, s in enumerate(seqs):
            ids[r, :len(s)] = torch.tensor(s)
            mask[r, :len(s)] = 1
        logits = model(input_ids=ids.to(lm.device), attention_mask=mask.to(lm.device)).logits.float()
        logp = torch.log_softmax(logits, -1)  # (B, T, V)
        for r, (s, n) in enumerate(zip(seqs, spans)):
            if n <= 0:
                out.append(None)
                continue
            L = len(s)
            tgt = torch.tensor(s[L - n:], device=logp.device)  # (n,)
            nll = -logp[r, L - n - 1:L - 1].gather(-1, tgt.unsqueeze(-1)).mean()
            out.append(float(torch.exp(nll)))
    return out


def run_method(lm: Any, m: Method, *, harm_tasks: list[str], task_manager: Any, limit: int,
               hellaswag_limit: int, max_new_tokens: int, cache_dir: Path | None,
               settings: dict[str, Any], digests: dict[str, str] | None = None,
               perplexity: bool = True) -> dict[str, Any] | None:
    """Evaluate one row (or load it from its cache file). Under ``torchrun`` every rank generates
    its share; rank 0 alone measures perplexity, writes the cache and gets the row (others: None)."""
    from steerplug.interventions import Intervention

    key = method_key(lm, m, settings, digests)
    path = cache_dir / f"{key}.json" if cache_dir else None
    if _agree(lm, path is not None and path.is_file()):
        if not _is_main(lm):
            return None
        cached = json.loads(path.read_text())
        cached["cached"] = True
        cached["method"] = {**cached["method"], "name": m.name, "family": m.family}
        return cached
    config = m.config(lm.default_steering)
    lm.set_steering(config, Intervention(**m.intervention))
    t0 = time.perf_counter()
    tasks: dict[str, Any] = {}
    try:
        if harm_tasks and limit > 0:
            tasks.update(_evaluate(lm, harm_tasks, task_manager, limit, chat=True,
                                   system_prompt=m.system_prompt, max_new_tokens=max_new_tokens))
        if hellaswag_limit > 0 and m.hellaswag:
            tasks.update(_evaluate(lm, [HELLASWAG_TASK], task_manager, hellaswag_limit, chat=False,
                                   system_prompt=m.system_prompt, max_new_tokens=max_new_tokens))
    finally:
        lm.set_steering(None, None)  # perplexity is measured by the unsteered model
    if not _is_main(lm):
        return None
    if perplexity:
        for t in harm_tasks:
            if t in tasks:
                ss = tasks[t]["samples"]
                ppl = answer_perplexity(lm, [s["context"] for s in ss], [s["response"] for s in ss])
                for s, p in zip(ss, ppl):
                    s["ppl"] = p
    result = {"key": key, "method": asdict(m) | {"config": asdict(config),
                                                "intervention": Intervention(**m.intervention).describe()},
              "tasks": tasks, "seconds": time.perf_counter() - t0, "cached": False}
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(result, default=str))
        tmp.replace(path)
    return result


def run_report(lm: Any, methods: list[Method], out_dir: str | Path, *, limit: int = 100,
               hellaswag_limit: int = 200, max_new_tokens: int = 48,
               harm_sets: list[str] | None = None, cache_dir: str | Path | None = None,
               targets: dict[str, float] | None = None, perplexity: bool = True,
               data_dir: str | None = None, command: str | None = None,
               metadata: dict[str, Any] | None = None) -> dict[str, Any]:
    """Run every row, write ``results.json``, ``results.md``, ``samples.json``, ``pareto.png``.

    Under ``torchrun`` (``lm`` a :class:`~steerplug.lm_eval_plugin.SteerplugLM` of several ranks)
    each rank generates its share of every row; rank 0 writes the outputs and gets the result,
    the other ranks get ``{}``."""
    from lm_eval.tasks import TaskManager

    from steerplug.judge import get_judge

    t0 = time.perf_counter()
    torch.manual_seed(SEED)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    cache = Path(cache_dir) if cache_dir else out_dir / "cache"
    sets = harm_sets or [*HARMFUL_SETS, *HARMLESS_SETS]
    unknown = set(sets) - {*HARMFUL_SETS, *HARMLESS_SETS}
    if unknown:
        raise ValueError(f"Unknown prompt set(s) {sorted(unknown)}; known: {[*HARMFUL_SETS, *HARMLESS_SETS]}.")
    harm_tasks = [{**HARMFUL_SETS, **HARMLESS_SETS}[s] for s in sets]
    tm = TaskManager(include_path=str(EVALS_DIR), include_defaults=False, metadata=metadata or {})
    judge = type(get_judge()).__name__
    digests = code_and_data_digest(data_dir)
    settings = {"tasks": harm_tasks, "limit": limit, "hellaswag_limit": hellaswag_limit,
                "max_new_tokens": max_new_tokens, "seed": SEED, "perplexity": perplexity,
                "prompt_order": "shuffled, seed 1234"}
    results = []
    for m in methods:
        logger.warning("report: %s", m.name)
        results.append(run_method(lm, m, harm_tasks=harm_tasks, task_manager=tm, limit=limit,
                                  hellaswag_limit=hellaswag_limit, max_new_tokens=max_new_tokens,
                                  cache_dir=cache, settings=settings, digests=digests, perplexity=perplexity))
    if not _is_main(lm):
        return {}
    rejudge(results, get_judge())
    rows = summarise(results, harm_tasks)
    n = {t: next((r["tasks"][t]["n"] for r in results if t in r["tasks"]), None)
         for t in harm_tasks + [HELLASWAG_TASK]}
    steered = lm.steered
    meta = {"model": lm._references.get("pretrained"), "command": command or "run_report(...)",  # noqa: SLF001
            "sites": [s.hook_point.name + ("" if s.sae is not None else " (direction only)") for s in steered.sites],
            "gate": None if steered.gate is None else {"hook": steered.gate.metadata.hook_name,
                                                        "pools": list(steered.gate.pools)},
            "default_steering": asdict(lm.default_steering), "digests": digests,
            "max_new_tokens": max_new_tokens, "limit": limit, "hellaswag_limit": hellaswag_limit,
            "n": {k: v for k, v in n.items() if v is not None}, "judge": judge,
            "seconds": time.perf_counter() - t0, "device": str(lm.device), "seed": SEED,
            "ranks": getattr(lm, "world_size", 1)}
    meta["frontier"] = frontier_summary(rows, targets)
    (out_dir / "results.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=2, default=str))
    (out_dir / "samples.json").write_text(json.dumps(
        {r["method"]["name"]: {t: v["samples"] for t, v in r["tasks"].items() if t != HELLASWAG_TASK}
         for r in results}, indent=1, default=str))
    (out_dir / "results.md").write_text(markdown(rows, meta, harm_tasks))
    plot = pareto_plot(rows, out_dir / "pareto.png")
    return {"meta": meta, "rows": rows, "results": results, "plot": plot}
