"""The ``steerplug`` lm-eval model: equal to plain HFLM when steering is off, different when on,
"generated" positions in loglikelihood as in generation, and the evals/ tasks end to end."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

pytest.importorskip("lm_eval")

from conftest import make_byte_tokenizer, make_tiny_model  # noqa: E402
from lm_eval.api.instance import Instance  # noqa: E402
from lm_eval.models.huggingface import HFLM  # noqa: E402

from steerplug import SparseAutoencoder, SteeredModel, SteeringVector  # noqa: E402
from steerplug.lm_eval_plugin import SteerplugLM, _keyed_cache_argv, config_hash  # noqa: E402

EVALS = Path(__file__).resolve().parent.parent / "evals"

LL_PAIRS = [("hello there", " world"), ("a", " bcd efg"), ("the cat sat on", " the mat"),
            ("xyz", "0"), ("one two three four five", " six")]
PROMPTS = ["hi there", "what is it", "q"]


@pytest.fixture(scope="module")
def parts():
    model = make_tiny_model("llama")
    tok = make_byte_tokenizer()
    sae = SparseAutoencoder.random(64, 128, hook_name="blocks.2.hook_resid_post", seed=1)
    vec = SteeringVector(128, torch.arange(0, 128, 4), torch.ones(32))
    return model, tok, sae, vec


def _lm(parts, **kw):
    model, tok, sae, vec = parts
    kw.setdefault("batch_size", 3)
    return SteerplugLM(pretrained=model, tokenizer=tok, sae=kw.pop("sae", sae),
                       vector=kw.pop("vector", vec), **kw)


def _ll(lm, pairs=LL_PAIRS):
    return lm.loglikelihood([Instance("loglikelihood", {}, p, i) for i, p in enumerate(pairs)],
                            disable_tqdm=True)


def _gen(lm, prompts=PROMPTS, n=8):
    return lm.generate_until([Instance("generate_until", {}, (p, {"max_gen_toks": n, "until": []}), i)
                              for i, p in enumerate(prompts)], disable_tqdm=True)


@pytest.fixture(scope="module")
def plain(parts):
    model, tok, _, _ = parts
    return HFLM(pretrained=model, tokenizer=tok, batch_size=3, device="cpu")


@pytest.mark.parametrize("off", [{"steps": 0}, {"sae": None, "vector": None},
                                 {"intervention": "add", "add_vector": torch.ones(64), "add_scale": 0.0,
                                  "layer": 2}])
def test_off_equals_plain_hflm(parts, plain, off):
    lm = _lm(parts, **off)
    assert not lm.active
    assert _ll(lm) == _ll(plain)
    assert _gen(lm) == _gen(plain)


def test_steering_on_changes_loglikelihood_and_generation(parts, plain):
    lm = _lm(parts, steps=3, lr=0.5)
    assert lm.active
    on, base = _ll(lm), _ll(plain)
    assert len(on) == len(base)
    assert any(abs(a[0] - b[0]) > 1e-4 for a, b in zip(on, base))
    assert _gen(lm, n=12) != _gen(plain, n=12)
    # the hooks are gone afterwards: the raw model is untouched
    assert _ll(plain) == base


def _reference_loglikelihoods(parts, lm, **steering):
    """Each LL_PAIRS continuation's log-prob from a SteeredModel forward with prompt_length = len(context)."""
    model, tok, sae, vec = parts
    steered = SteeredModel(model, tok, sae, vec)
    want = []
    for ctx, cont in LL_PAIRS:
        c, x = lm.tok_encode(ctx), lm.tok_encode(cont)
        ids = torch.tensor([c + x])[:, :-1]
        with torch.no_grad():
            logits = steered(ids, prompt_length=len(c), **steering).logits
        logp = torch.log_softmax(logits[0, len(c) - 1:], -1)  # positions predicting the continuation
        want.append(float(logp.gather(-1, torch.tensor(x).unsqueeze(-1)).sum()))
    return want


@pytest.mark.parametrize("positions", ["generated", "prompt", "all"])
def test_loglikelihood_steers_as_generation_would(parts, positions):
    """Each continuation's log-prob equals a SteeredModel forward with prompt_length = len(context)."""
    lm = _lm(parts, steps=2, lr=0.5, positions=positions, batch_size=4)
    got = [ll for ll, _ in _ll(lm)]
    want = _reference_loglikelihoods(parts, lm, steps=2, lr=0.5, positions=positions)
    assert got == pytest.approx(want, abs=1e-4)


@pytest.mark.parametrize("positions", ["generated", "all"])
@pytest.mark.parametrize("n", [1, 3])
def test_loglikelihood_answer_tokens_steers_the_first_n_continuation_predictions(parts, positions, n):
    """``answer_tokens=N``: the continuation is the answer; each log-prob equals a SteeredModel
    forward with prompt_length = len(context) and the same answer_tokens (the positions predicting
    the continuation's first N tokens), and differs from steering the whole continuation."""
    lm = _lm(parts, steps=2, lr=0.5, positions=positions, answer_tokens=str(n), batch_size=4)
    assert lm.steering_config.answer_tokens == n
    got = [ll for ll, _ in _ll(lm)]
    whole = [ll for ll, _ in _ll(_lm(parts, steps=2, lr=0.5, positions=positions, batch_size=4))]
    want = _reference_loglikelihoods(parts, lm, steps=2, lr=0.5, positions=positions, answer_tokens=n)
    assert got == pytest.approx(want, abs=1e-4)
    for (ctx, cont), a, b in zip(LL_PAIRS, got, whole):
        if len(lm.tok_encode(cont)) <= n:  # the whole continuation is within the first n tokens
            assert a == pytest.approx(b, abs=1e-5), cont
    assert any(abs(a - b) > 1e-4 for a, b in zip(got, whole))


def test_generate_with_answer_tokens_matches_steered_model_generate(parts):
    model, tok, sae, vec = parts
    lm = _lm(parts, steps=3, lr=0.5, answer_tokens=2, batch_size=1)
    steered = SteeredModel(model, tok, sae, vec)
    ids = torch.tensor([lm.tok_encode("hi there")])
    kw = dict(max_new_tokens=8, do_sample=False, steps=3, lr=0.5, pad_token_id=tok.pad_token_id)
    out = steered.generate(ids, answer_tokens=2, **kw)
    want = tok.decode(out[0, ids.shape[1]:], skip_special_tokens=True)
    assert _gen(lm, ["hi there"])[0] == want
    assert not torch.equal(out, steered.generate(ids, **kw))  # the cut changed this answer


def test_answer_tokens_argument(parts):
    assert _lm(parts, steps=2).steering_config.answer_tokens is None
    assert _lm(parts, steps=2, answer_tokens="none").steering_config.answer_tokens is None
    assert "answer_tokens" in _lm(parts, steps=2, answer_tokens=4).describe()["steering"]
    for bad in ("many", "1.5", "0", -1):
        with pytest.raises(ValueError, match="answer_tokens"):
            _lm(parts, steps=2, answer_tokens=bad)


def test_generate_matches_steered_model_generate(parts):
    model, tok, sae, vec = parts
    lm = _lm(parts, steps=3, lr=0.5, batch_size=1)
    steered = SteeredModel(model, tok, sae, vec)
    ids = torch.tensor([lm.tok_encode("hi there")])
    out = steered.generate(ids, max_new_tokens=8, do_sample=False, steps=3, lr=0.5,
                           pad_token_id=tok.pad_token_id)
    want = tok.decode(out[0, ids.shape[1]:], skip_special_tokens=True)
    assert _gen(lm, ["hi there"])[0] == want


def test_interventions_and_gate(parts, plain):
    base = _ll(plain)
    add = _lm(parts, intervention="add", add_vector=torch.ones(64), add_scale=2.0, positions="all")
    assert _ll(add) != base
    clamp = _lm(parts, intervention="clamp", positions="all")
    assert _ll(clamp) != base
    closed = _lm(parts, steps=3, lr=0.5, gate_threshold=1e9)  # never fires: plain model
    assert _ll(closed) == base
    opened = _lm(parts, steps=3, lr=0.5, gate_threshold=-1e9)  # always fires: ungated steering
    ungated = [ll for ll, _ in _ll(_lm(parts, steps=3, lr=0.5))]
    assert [ll for ll, _ in _ll(opened)] == pytest.approx(ungated, abs=1e-5)


def test_cli_arguments_are_coerced(parts):
    lm = _lm(parts, steps="2", lr="0.1", normalize="false", max_delta="none", positions="all")
    assert lm.steering_config.steps == 2 and lm.steering_config.lr == 0.1
    assert lm.steering_config.normalize is False and lm.steering_config.max_delta is None


def test_cache_path_is_keyed_on_model_args(tmp_path):
    base = str(tmp_path / "cache" / "x")

    def keyed(args: str) -> str:
        return _keyed_cache_argv(["--model", "steerplug", "--model_args", args, "--use_cache", base])[-1]

    a, b, c = keyed("steps=3,lr=0.25"), keyed("lr=0.25,steps=3"), keyed("steps=4,lr=0.25")
    assert a == b and a != c
    assert a.startswith(base + "-")
    assert _keyed_cache_argv([f"--use_cache={base}", "--model_args", "steps=3,lr=0.25",
                              "--model", "steerplug"])[0] == f"--use_cache={a}"
    assert config_hash({"steps": 3}) != config_hash({"steps": 4})
    assert _keyed_cache_argv(["--model", "steerplug"]) == ["--model", "steerplug"]


def test_tasks_run_end_to_end(parts):
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    from steerplug.data import data_dir

    try:
        data_dir()
    except FileNotFoundError:
        pytest.skip("no ../shared/data here")
    lm = _lm(parts, steps=2, lr=0.5, batch_size=4)
    tm = TaskManager(include_path=str(EVALS), include_defaults=False)
    tasks = ["steerplug_hellaswag", "steerplug_jbb_harmful", "steerplug_harmless_test"]
    out = simple_evaluate(model=lm, tasks=tasks, task_manager=tm, limit=2, bootstrap_iters=0,
                          gen_kwargs="max_gen_toks=4", apply_chat_template=True, log_samples=True)
    res, samples = out["results"], out["samples"]
    # Every reported figure is the mean of its per-document values, which exist and are in range.
    hs = [d["acc_norm"] for d in samples["steerplug_hellaswag"]]
    assert len(hs) == 2 and set(hs) <= {0.0, 1.0}
    assert res["steerplug_hellaswag"]["acc_norm,none"] == pytest.approx(sum(hs) / 2)
    from steerplug.judge import get_judge

    judge = get_judge()
    for t in tasks[1:]:
        assert res[t]["sample_len"] == 2 and len(samples[t]) == 2
        for m in ("refusal", "clean_refusal", "raw_refusal", "looping", "coherent", "repetition", "distinct2"):
            per_doc = [float(d[m]) for d in samples[t]]
            assert all(0.0 <= v <= 1.0 for v in per_doc)
            assert res[t][f"{m},none"] == pytest.approx(sum(per_doc) / 2), (t, m)
        for d in samples[t]:  # the refusal figure is the judge's verdict on the answer that was generated
            answer = d["filtered_resps"][0] if isinstance(d["filtered_resps"][0], str) else d["filtered_resps"][0][0]
            v = judge(d["doc"].get("prompt", ""), answer)
            assert float(v.refusal) == float(d["refusal"]) and float(v.clean) == float(d["clean_refusal"]), (t, answer)


def test_every_task_yaml_is_indexed():
    from lm_eval.tasks import TaskManager

    tm = TaskManager(include_path=str(EVALS), include_defaults=False)
    names = {p.stem for p in EVALS.glob("steerplug_*.yaml")}
    assert names <= set(tm.all_tasks)
    assert {"steerplug_harmful", "steerplug_harmless", "steerplug_safety"} <= set(tm.all_tasks)


def test_steerplug_eval_cli_end_to_end(parts, tmp_path):
    """``steerplug-eval --model steerplug --model_args ...`` parses string arguments like lm_eval."""
    import subprocess
    import sys

    from steerplug.data import data_dir

    try:
        data_dir()
    except FileNotFoundError:
        pytest.skip("no ../shared/data here")
    model, tok, sae, vec = parts
    model.save_pretrained(tmp_path / "model")
    tok.save_pretrained(tmp_path / "model")
    sae.save_pretrained(tmp_path / "sae")
    vec.save_pretrained(tmp_path / "vector")
    args = (f"pretrained={tmp_path / 'model'},sae={tmp_path / 'sae'},vector={tmp_path / 'vector'},"
            "steps=2,lr=0.5,max_delta=none,dtype=float32")
    cmd = [sys.executable, "-c", "from steerplug.lm_eval_plugin import cli_main; cli_main()",
           "--model", "steerplug", "--model_args", args, "--tasks", "steerplug_jbb_harmful",
           "--include_path", str(EVALS), "--limit", "1", "--apply_chat_template",
           "--gen_kwargs", "max_gen_toks=2", "--device", "cpu", "--output_path", str(tmp_path / "out"),
           "--use_cache", str(tmp_path / "cache" / "run")]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300,
                          env={**__import__("os").environ, "HF_HUB_OFFLINE": "1"})
    assert done.returncode == 0, done.stderr[-3000:]
    assert "steerplug_jbb_harmful" in done.stdout and "refusal" in done.stdout
    assert list((tmp_path / "cache").glob("run-*_rank0.db"))  # keyed on the model arguments
    assert list((tmp_path / "out").rglob("results_*.json"))
