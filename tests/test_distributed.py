"""``steerplug collect`` and ``steerplug train`` under ``torchrun`` (CPU, gloo, 2 processes, tiny
model): the same rows as one process, the same quality from the same seed and global batch, and
runs that resume on another number of ranks."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from steerplug.pipeline import collect as C
from steerplug.sae import SparseAutoencoder
from conftest import make_byte_tokenizer, make_tiny_model
from test_pipeline_train import planted

if not torch.distributed.is_available():  # pragma: no cover - builds without distributed support
    pytest.skip("torch.distributed is not available", allow_module_level=True)

ROOT = Path(__file__).resolve().parent.parent
HOOK = "blocks.1.hook_resid_post"


def _run(nproc: int, *args: str, script: list[str] | None = None, check: bool = True) -> subprocess.CompletedProcess:
    """``torchrun --standalone --nproc-per-node nproc`` of ``steerplug args`` (or of ``script``)."""
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false",
               PYTHONPATH=str(ROOT))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
           *(script or ["-m", "steerplug.cli"]), *args]
    res = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    if check and res.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} failed ({res.returncode}):\n{res.stdout[-3000:]}\n{res.stderr[-6000:]}")
    return res


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory):
    """A tiny random Llama and the byte tokenizer, saved as a model folder."""
    folder = tmp_path_factory.mktemp("tiny-llama")
    make_tiny_model("llama").save_pretrained(folder)
    make_byte_tokenizer().save_pretrained(folder)
    return folder


def _rows(folder: Path):
    """The rows of an activation folder, sorted by (sequence, position)."""
    a = C.load_activations(folder, HOOK, skip_first=False)
    order = sorted(range(len(a.seq_ids)), key=lambda i: (int(a.seq_ids[i]), int(a.positions[i])))
    idx = torch.tensor(order)
    return {k: getattr(a, k)[idx] for k in a._fields}


COLLECT = ["--hooks", HOOK, "--prompt-sets", "harmful_train", "harmless_train", "--limit-per-set", "20",
           "--max-new-tokens", "4", "--wikitext-chunks", "3", "--batch-size", "4", "--shard-tokens", "300",
           "--max-length", "96"]


def test_collect_on_two_ranks_gives_the_rows_of_one(tiny_folder, tmp_path):
    _run(1, "collect", "--model", str(tiny_folder), "--out", str(tmp_path / "one"), *COLLECT)
    _run(2, "collect", "--model", str(tiny_folder), "--out", str(tmp_path / "two"), *COLLECT)
    one, two = (json.loads((tmp_path / d / C.MANIFEST_NAME).read_text()) for d in ("one", "two"))
    assert two["complete"] and one["complete"]
    assert not list((tmp_path / "two").glob("progress.rank*.json"))
    # the answers were generated in shared batches and are the ones one process generates
    assert (json.loads((tmp_path / "one" / C.EXAMPLES_NAME).read_text())
            == json.loads((tmp_path / "two" / C.EXAMPLES_NAME).read_text()))
    assert two["sequences"] == one["sequences"] and two["n_tokens"] == one["n_tokens"]
    # each rank wrote its own shards, of every 2nd batch from its rank on; together each batch once
    assert {sh["rank"] for sh in two["shards"]} == {0, 1}
    assert all(b % 2 == sh["rank"] for sh in two["shards"] for b in sh["batches"])
    batches = [b for sh in two["shards"] for b in sh["batches"]]
    assert sorted(batches) == list(range(one["batches_done"]))
    a, b = _rows(tmp_path / "one"), _rows(tmp_path / "two")
    for k in a:
        torch.testing.assert_close(a[k], b[k], msg=k)


def test_collect_interrupted_on_one_rank_resumes_on_two(tiny_folder, tmp_path, monkeypatch):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(tiny_folder).eval()
    tok = AutoTokenizer.from_pretrained(tiny_folder)
    args = ["--hooks", HOOK, "--prompt-sets", "harmless_train", "--limit-per-set", "12", "--no-generate",
            "--wikitext-chunks", "4", "--batch-size", "2", "--shard-tokens", "100", "--max-length", "96"]
    _run(1, "collect", "--model", str(tiny_folder), "--out", str(tmp_path / "full"), *args)
    examples = [C.Example(**e) for e in json.loads((tmp_path / "full" / C.EXAMPLES_NAME).read_text())]
    (tmp_path / "resumed").mkdir()
    (tmp_path / "resumed" / C.EXAMPLES_NAME).write_text((tmp_path / "full" / C.EXAMPLES_NAME).read_text())
    cfg = C.CollectConfig(hooks=[HOOK], batch_size=2, shard_tokens=100, max_length=96, progress=False)
    real, calls = C.capture_activations, []

    def flaky(*a, **k):
        calls.append(1)
        if len(calls) == 4:
            raise KeyboardInterrupt
        return real(*a, **k)

    monkeypatch.setattr(C, "capture_activations", flaky)
    with pytest.raises(KeyboardInterrupt):
        C.collect_activations(model, tok, examples, tmp_path / "resumed", cfg,
                              model_name=json.loads((tmp_path / "full" / C.MANIFEST_NAME).read_text())["model_name"])
    partial = json.loads((tmp_path / "resumed" / C.MANIFEST_NAME).read_text())
    assert not partial["complete"] and 0 < partial["batches_done"] < 4
    _run(2, "collect", "--model", str(tiny_folder), "--out", str(tmp_path / "resumed"), *args)
    man = json.loads((tmp_path / "resumed" / C.MANIFEST_NAME).read_text())
    assert man["complete"] and man["shards"][0] == partial["shards"][0]  # the first run's shard was kept
    a, b = _rows(tmp_path / "full"), _rows(tmp_path / "resumed")
    for k in a:
        torch.testing.assert_close(a[k], b[k], msg=k)


# --- training ------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def planted_folder(tmp_path_factory):
    """An activation folder (the layout ``collect`` writes) holding planted sparse data."""
    folder = tmp_path_factory.mktemp("planted")
    x = planted()
    n = x.shape[0]
    save_file({f"acts.{HOOK}": x.contiguous(), "token_ids": torch.zeros(n, dtype=torch.long),
               "seq_ids": torch.arange(n) // 50, "positions": torch.arange(n) % 50 + 1,
               "roles": torch.full((n,), 2, dtype=torch.int8)}, str(folder / "shard_00000.safetensors"))
    (folder / C.MANIFEST_NAME).write_text(json.dumps({
        "format": "steerplug-activations-v1", "hooks": [HOOK], "d_model": 32, "model_name": None,
        "shards": [{"file": "shard_00000.safetensors", "n_tokens": n, "batches": [0]}], "complete": True}))
    return folder, x


TRAIN = ["--d-sae", "128", "--k", "4", "--lr", "2e-3", "--batch-size", "127", "--total-tokens", str(127 * 60),
         "--warmup-steps", "5", "--dead-tokens", "300", "--checkpoint-every", "10"]
# (an odd batch: the ranks' shares differ by a row; dead latents: the AuxK term is active at times)


@torch.no_grad()
def _fve(folder: Path, x: torch.Tensor) -> float:
    sae = SparseAutoencoder.from_pretrained(folder)
    x_hat = sae(x).reconstruction
    return float(1 - (x_hat - x).pow(2).sum() / (x - x.mean(0)).pow(2).sum())


def test_training_on_two_ranks_matches_one_and_resumes_on_another_count(planted_folder, tmp_path):
    acts, x = planted_folder
    _run(1, "train", "--acts", str(acts), "--out", str(tmp_path / "one"), *TRAIN)
    one = SparseAutoencoder.from_pretrained(tmp_path / "one")
    f1 = _fve(tmp_path / "one", x)
    assert f1 > 0.6, f1  # it learned
    log1 = json.loads((tmp_path / "one" / "training_log.json").read_text())
    # codes: the ranks all-gather the top-k codes, each computes the whole batch's gradients, so the
    # step is the one-process step up to float rounding; grads: each rank's gradients are summed
    for exchange, atol in (("codes", 1e-5), ("grads", 2e-3)):
        out = tmp_path / exchange
        _run(2, "train", "--acts", str(acts), "--out", str(out), *TRAIN, "--exchange", exchange)
        assert abs(f1 - _fve(out, x)) <= 0.01, (exchange, f1, _fve(out, x))
        two = SparseAutoencoder.from_pretrained(out)
        assert two.cfg.metadata["training"]["world_size"] == 2
        for name in ("W_dec", "W_enc", "b_enc", "b_dec"):  # the same optimisation, not merely the same quality
            torch.testing.assert_close(getattr(two, name), getattr(one, name), atol=atol, rtol=0,
                                       msg=f"{exchange}: {name}")
        log2 = json.loads((out / "training_log.json").read_text())
        assert [h["step"] for h in log1] == [h["step"] for h in log2]  # only rank 0 wrote a log
        assert any(h["aux"] > 0 for h in log2)  # the AuxK term (dead latents) was part of it
        for a, b in zip(log1, log2):  # the logged statistics are the whole batch's
            assert a["fve"] == pytest.approx(b["fve"], abs=50 * atol) and a["l0"] == pytest.approx(b["l0"], abs=0.1)
            assert a["aux"] == pytest.approx(b["aux"], abs=50 * atol)

    # interrupted on 2 ranks after the step-20 checkpoint, resumed on 1
    out = tmp_path / "resumed"
    crashed = _run(2, "train", "--acts", str(acts), "--out", str(out), *TRAIN,
                   script=[str(ROOT / "tests" / "dist_crash.py"), "25"], check=False)
    assert crashed.returncode != 0 and "injected crash at step 25" in crashed.stderr + crashed.stdout
    state = json.loads((out / "checkpoint" / "state.json").read_text())
    assert state["step"] == 20 and not (out / "cfg.json").exists()
    _run(1, "train", "--acts", str(acts), "--out", str(out), *TRAIN)
    assert not (out / "checkpoint").exists()
    assert abs(_fve(out, x) - f1) <= 0.01


# --- evaluation ----------------------------------------------------------------------------------
def _samples(out: Path) -> dict[tuple[str, int], list]:
    rows = {}
    for f in out.rglob("samples_*.jsonl"):
        task = f.name[len("samples_"):].rsplit("_", 1)[0]
        for line in f.read_text().splitlines():
            r = json.loads(line)
            rows[(task, r["doc_id"])] = r["filtered_resps"]
    return rows


def test_lm_eval_on_two_cpu_ranks_shares_the_requests_and_scores_as_one(tiny_folder, tmp_path):
    """``torchrun --nproc-per-node 2 steerplug-eval ...`` on CPUs: each rank takes its share
    (lm-eval's HFLM would have both ranks do everything) and the gathered answers are one process's."""
    pytest.importorskip("lm_eval")
    from steerplug.data import data_dir
    from steerplug.vector import SteeringVector

    try:
        data_dir()
    except FileNotFoundError:
        pytest.skip("no ../shared/data here")
    script = Path(sys.executable).with_name("steerplug-eval")
    if not script.is_file():
        pytest.skip("the steerplug-eval entry point is not installed")
    SparseAutoencoder.random(64, 128, hook_name="blocks.2.hook_resid_post", seed=1).save_pretrained(tmp_path / "sae")
    SteeringVector(128, torch.arange(0, 128, 4), torch.ones(32)).save_pretrained(tmp_path / "vector")
    args = ["--model", "steerplug", "--model_args",
            f"pretrained={tiny_folder},sae={tmp_path / 'sae'},vector={tmp_path / 'vector'},steps=2,lr=0.5,dtype=float32",
            "--tasks", "steerplug_jbb_harmful,steerplug_hellaswag", "--include_path", str(ROOT / "evals"),
            "--limit", "6", "--gen_kwargs", "max_gen_toks=3", "--device", "cpu", "--log_samples"]
    one = _run(1, *args, "--output_path", str(tmp_path / "one"), script=[str(script)])
    two = _run(2, *args, "--output_path", str(tmp_path / "two"), script=[str(script)])
    assert "on rank 1" in two.stderr + two.stdout and "on rank 1" not in one.stderr + one.stdout
    a, b = _samples(tmp_path / "one"), _samples(tmp_path / "two")
    assert len(a) == 12 and a == b


def test_report_on_two_cpu_ranks_shares_the_generations_and_writes_one_report(tiny_folder, tmp_path):
    """``torchrun --nproc-per-node 2 steerplug report ...``: the rows of a one-process report."""
    pytest.importorskip("lm_eval")
    from steerplug.data import data_dir
    from steerplug.vector import SteeringVector

    try:
        data_dir()
    except FileNotFoundError:
        pytest.skip("no ../shared/data here")
    SparseAutoencoder.random(64, 128, hook_name="blocks.2.hook_resid_post", seed=1).save_pretrained(tmp_path / "sae")
    SteeringVector(128, torch.arange(0, 128, 4), torch.ones(32)).save_pretrained(tmp_path / "vector")
    args = ["report", "--model", str(tiny_folder), "--sae", str(tmp_path / "sae"), "--vector", str(tmp_path / "vector"),
            "--limit", "4", "--hellaswag-limit", "4", "--sets", "jbb_harmful,harmless_test", "--methods", "gradient",
            "--gradient-lrs", "0.5", "--no-ungated", "--max-new-tokens", "3", "--batch-size", "2", "--device", "cpu"]
    one = _run(1, *args, "--out", str(tmp_path / "one"))
    two = _run(2, *args, "--out", str(tmp_path / "two"))
    # 2 sets x 4 prompts per row: one process generates all 8, each of two ranks 4
    assert "generate_until requests: 100%|██████████| 8/8" in one.stderr
    assert "generate_until requests: 100%|██████████| 4/4" in two.stderr
    assert "generate_until requests: 100%|██████████| 8/8" not in two.stderr
    assert two.stdout.count("# steerplug report") == 1  # rank 0 alone writes and prints
    a, b = (json.loads((tmp_path / d / "samples.json").read_text()) for d in ("one", "two"))
    assert a.keys() == b.keys() and len(a) >= 2
    for row in a:  # the same answers, verdicts and perplexities, prompt by prompt (gathered rank by rank)
        assert a[row].keys() == b[row].keys()
        for task in a[row]:
            sa, sb = (sorted(x[row][task], key=lambda s: s["doc_id"]) for x in (a, b))
            assert [{**s, "ppl": None} for s in sa] == [{**s, "ppl": None} for s in sb]
            assert [s["ppl"] for s in sb] == pytest.approx([s["ppl"] for s in sa], rel=1e-4)
    ra, rb = (json.loads((tmp_path / d / "results.json").read_text()) for d in ("one", "two"))
    assert rb["meta"]["ranks"] == 2
    drop = ("seconds", "cached", "key")
    assert ([{k: v for k, v in r.items() if k not in drop} for r in ra["rows"]]
            == [{k: v for k, v in r.items() if k not in drop} for r in rb["rows"]])
