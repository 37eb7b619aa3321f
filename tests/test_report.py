"""``steerplug report`` on a tiny random model: every method runs, files are written, results
are cached per configuration and only per configuration."""

from __future__ import annotations

import json

import pytest
import torch

pytest.importorskip("lm_eval")

from conftest import make_byte_tokenizer, make_tiny_model  # noqa: E402

from steerplug import SparseAutoencoder, SteeringVector  # noqa: E402
from steerplug.interventions import choose_threshold  # noqa: E402
from steerplug.report import Method, default_methods, method_key, run_report, summarise  # noqa: E402


@pytest.fixture(scope="module")
def lm():
    from steerplug.data import data_dir
    from steerplug.lm_eval_plugin import SteerplugLM

    try:
        data_dir()
    except FileNotFoundError:
        pytest.skip("no ../shared/data here")
    sae = SparseAutoencoder.random(64, 128, hook_name="blocks.2.hook_resid_post", seed=1)
    vec = SteeringVector(128, torch.arange(0, 128, 4), torch.cat([torch.ones(16), -torch.ones(16)]))
    return SteerplugLM(pretrained=make_tiny_model("llama"), tokenizer=make_byte_tokenizer(),
                       sae=sae, vector=vec, steps=0, batch_size=4)


def test_default_methods_cover_the_sweep():
    ms = default_methods([0.1, 0.5], steps=3, caa_scales=[1.0, 2.0])
    fams = [m.family for m in ms]
    assert fams.count("steerplug") == 2 and fams.count("caa") == 2
    assert {"unsteered", "system_prompt", "clamp", "conditional"} <= set(fams)
    assert next(m for m in ms if m.family == "conditional").steering["lr"] == 0.5
    assert all("max_delta" not in m.steering for m in ms)  # SteeringConfig's default bound

    from steerplug.steering import SteeringConfig

    for bound, tag in ((1.0, " max_delta=1"), (None, " unbounded")):
        grad = [m for m in default_methods([0.5], max_delta=bound) if m.family in ("steerplug", "conditional")]
        assert grad and all(m.steering["max_delta"] == bound and m.name.endswith(tag) for m in grad)
        assert SteeringConfig(**grad[0].steering).max_delta == bound


def test_report_runs_caches_and_writes(lm, tmp_path):
    methods = default_methods([0.5], steps=2)
    assert {m.family for m in methods} == {"unsteered", "system_prompt", "caa", "clamp", "steerplug",
                                           "conditional", "caa_gated"}
    kw = dict(limit=2, hellaswag_limit=2, max_new_tokens=3, harm_sets=["jbb_harmful", "jbb_benign"],
              calib_n=4, cache_dir=tmp_path / "cache")
    out = run_report(lm, methods, tmp_path / "r1", **kw)
    rows = {r["method"]: r for r in out["rows"]}
    assert set(rows) == {m.name for m in methods}
    assert not any(r["cached"] for r in out["rows"])
    base = rows["unsteered"]
    assert base["harmless_unchanged"] == 1.0 and base["hellaswag_delta"] == 0.0
    for r in rows.values():
        assert r["n:steerplug_jbb_harmful"] == 2 and r["n:hellaswag"] == 2
        assert 0.0 <= r["harmful_refusal"] <= 1.0 and 0.0 <= r["harmless_refusal"] <= 1.0
        assert r["median_ppl"] is None or r["median_ppl"] > 0
    for name in ("results.json", "results.md", "samples.json", "pareto.png"):
        assert (tmp_path / "r1" / name).is_file()
    saved = json.loads((tmp_path / "r1" / "results.json").read_text())
    assert saved["meta"]["n"]["steerplug_jbb_benign"] == 2
    assert "gate" in saved["meta"]["prepared"] and "caa_vector_norm" in saved["meta"]["prepared"]
    gate = saved["meta"]["prepared"]["gate"]
    assert gate["max_fpr"] == 0.05 and gate["val_fpr"] <= 0.05 and gate["features"] == 32
    md = (tmp_path / "r1" / "results.md").read_text()
    assert "| unsteered |" in md and "n=2" in md
    # Second run: every configuration comes from its cache file, with the same numbers.
    again = run_report(lm, default_methods([0.5], steps=2), tmp_path / "r2", **kw)
    assert all(r["cached"] for r in again["rows"])
    assert [r["harmful_refusal"] for r in again["rows"]] == [r["harmful_refusal"] for r in out["rows"]]


def test_cache_key_changes_with_every_setting(lm):
    s = {"limit": 2}
    a = method_key(lm, Method("x", "steerplug", {"steps": 3, "lr": 0.25}), s)
    assert a == method_key(lm, Method("renamed", "steerplug", {"steps": 3, "lr": 0.25}), s)
    assert a != method_key(lm, Method("x", "steerplug", {"steps": 3, "lr": 0.5}), s)
    assert a != method_key(lm, Method("x", "steerplug", {"steps": 3, "lr": 0.25}), {"limit": 3})
    assert a != method_key(lm, Method("x", "steerplug", {"steps": 3, "lr": 0.25},
                                      system_prompt="be safe"), s)
    assert a != method_key(lm, Method("x", "steerplug", {"steps": 3, "lr": 0.25},
                                      {"gate_threshold": 0.3}), s)
    caa = Method("c", "caa", {"steps": 1, "positions": "all"}, {"kind": "add", "add_vector": torch.ones(64)})
    assert method_key(lm, caa, s) != method_key(
        lm, Method("c", "caa", {"steps": 1, "positions": "all"},
                   {"kind": "add", "add_vector": torch.ones(64), "add_scale": 2.0}), s)


def test_cache_key_depends_on_artifacts_only_where_used(lm):
    """Unsteered / system-prompt rows do not read the SAE or vector; steering rows do."""
    s = {"limit": 2}
    plain, steer = Method("u", "unsteered"), Method("x", "steerplug", {"steps": 3, "lr": 0.25})
    before = (method_key(lm, plain, s), method_key(lm, steer, s))
    old = lm.steered.vector
    try:
        lm.steered.vector = old.scaled(2.0)
        assert method_key(lm, plain, s) == before[0]
        assert method_key(lm, steer, s) != before[1]
    finally:
        lm.steered.vector = old


def test_summary_unchanged_share_against_unsteered():
    def res(name, family, responses, refusals):
        samples = [{"doc_id": i, "response": r, "refusal": f, "coherent": 1.0, "repetition": 0.0}
                   for i, (r, f) in enumerate(zip(responses, refusals))]
        return {"method": {"name": name, "family": family}, "seconds": 1.0, "cached": False,
                "tasks": {"steerplug_jbb_benign": {"metrics": {"refusal": sum(refusals) / len(refusals),
                                                               "raw_refusal": 0.0}, "n": 2,
                                                   "samples": samples}}}
    rows = summarise([res("u", "unsteered", ["a", "b"], [0, 0]), res("s", "steerplug", ["a", "c"], [0, 1])],
                     ["steerplug_jbb_benign"])
    assert rows[0]["harmless_unchanged"] == 1.0
    assert rows[1]["harmless_unchanged"] == 0.5 and rows[1]["harmless_refusal"] == 0.5


def test_choose_threshold_separates():
    thr = choose_threshold(torch.tensor([2.0, 3.0, 4.0]), torch.tensor([0.0, 1.0, 2.5]))
    assert 1.0 <= thr < 2.0 or 2.5 <= thr < 3.0


def test_rejudge_recomputes_verdicts_and_means():
    from steerplug.judge import PhraseJudge
    from steerplug.report import rejudge

    samples = [{"doc_id": 0, "context": "c", "response": "I'm sorry, but I can't help with that.",
                "refusal": 0.0}, {"doc_id": 1, "context": "c", "response": "Sure, here it is: step one.",
                                  "refusal": 1.0}]
    results = [{"tasks": {"steerplug_jbb_harmful": {"metrics": {"refusal": 0.5}, "n": 2, "samples": samples},
                          "steerplug_hellaswag": {"metrics": {"acc_norm": 0.3}, "n": 1, "samples": [{}]}}}]
    rejudge(results, PhraseJudge())
    assert [s["refusal"] for s in samples] == [1.0, 0.0]
    assert results[0]["tasks"]["steerplug_jbb_harmful"]["metrics"]["refusal"] == 0.5
    assert results[0]["tasks"]["steerplug_hellaswag"]["metrics"] == {"acc_norm": 0.3}


def test_pareto_front():
    from steerplug.report import pareto_front

    rows = [{"method": m, "harmful_refusal": h, "harmless_refusal": b}
            for m, h, b in [("a", 0.0, 0.0), ("b", 0.5, 0.1), ("c", 0.4, 0.2), ("d", 0.9, 0.5)]]
    assert [r["method"] for r in pareto_front(rows)] == ["a", "b", "d"]


def test_frontier_summary_names_what_meets_and_what_dominates():
    from steerplug.report import HARMLESS_SETS, frontier_markdown, frontier_summary

    benign = f"refusal:{HARMLESS_SETS['jbb_benign']}"

    def row(method, family, harmful, harmless, changed=None, delta=0.0):
        return {"method": method, "family": family, "harmful_refusal": harmful, "harmless_refusal": harmless,
                "raw_harmful_refusal": harmful, "harmful_changed": changed, benign: harmless,
                "hellaswag_delta": delta}

    rows = [row("unsteered", "unsteered", 0.03, 0.0),
            row("gated CAA", "caa_gated", 0.10, 0.02),
            row("CAA", "caa", 0.40, 0.30),
            row("cond", "conditional", 0.06, 0.02, changed=0.9),
            row("steer", "steerplug", 0.95, 0.04, changed=0.97, delta=-0.02)]
    s = frontier_summary(rows)
    assert s["meets_all"] == []  # "steer" loses 2 HellaSwag points
    assert s["best_within_harmless_budget"]["steerplug"]["misses"] == ["HellaSwag within 1 point"]
    assert s["gradient_dominated_by"] == {"cond": ["gated CAA"]}
    assert s["pareto_front"] == ["unsteered", "gated CAA", "steer"]
    assert s["gradient_best"]["method"] == "steer"

    rows[-1]["hellaswag_delta"] = -0.005
    s = frontier_summary(rows)
    assert s["meets_all"] == ["steer"]
    del rows[-1]
    text = "\n".join(frontier_markdown(frontier_summary(rows)))
    assert "**none**" in text and "cond (by gated CAA)" in text and "not the gate or the reach" in text
