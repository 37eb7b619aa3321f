"""SteeredModel on tiny random models of several families: exactness when off, cache equivalence,
positions, hook hygiene, errors."""

from __future__ import annotations

import pytest
import torch
from conftest import ARCHS, HIDDEN, N_LAYERS, make_byte_tokenizer, make_tiny_model

from steerplug import (
    CallState,
    HookPointError,
    SparseAutoencoder,
    SteeredModel,
    SteeringConfig,
    SteeringError,
    SteeringVector,
)

F = 256
LAYER = 2


def _artifacts(arch="relu", layer=LAYER, d_in=HIDDEN):
    sae = SparseAutoencoder.random(d_in, F, arch, k=16 if arch == "topk" else None, seed=3,
                                   hook_name=f"blocks.{layer}.hook_resid_post")
    vec = SteeringVector.from_dense(torch.randn(F, generator=torch.Generator().manual_seed(4)), top_k=32)
    return sae, vec


def _steered(arch_name: str, sae_arch="relu", **cfg) -> SteeredModel:
    sae, vec = _artifacts(sae_arch)
    return SteeredModel(make_tiny_model(arch_name), make_byte_tokenizer(), sae, vec,
                        config=SteeringConfig(**{"lr": 0.5, **cfg}))


def _ids(seed=0, batch=1, length=12):
    return torch.randint(0, 250, (batch, length), generator=torch.Generator().manual_seed(seed))


def _hook_count(model) -> int:
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())


@pytest.mark.parametrize("arch", ARCHS)
def test_off_is_bit_identical_and_on_differs(arch):
    steered = _steered(arch, positions="all")
    ids = _ids()
    plain_logits = steered.model(ids).logits
    plain_gen = steered.model.generate(ids, max_new_tokens=6, do_sample=False)
    with steered.disabled():
        assert torch.equal(steered(ids).logits, plain_logits)
        assert torch.equal(steered.generate(ids, max_new_tokens=6, do_sample=False), plain_gen)
    assert torch.equal(steered(ids, steps=0).logits, plain_logits)
    assert torch.equal(steered.generate(ids, max_new_tokens=6, do_sample=False, steps=0), plain_gen)
    assert not torch.allclose(steered(ids).logits, plain_logits)  # steering does something
    assert _hook_count(steered.model) == 0


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("positions", ["generated", "all"])
def test_kv_cache_equals_no_cache(arch, positions):
    steered = _steered(arch, positions=positions)
    ids = _ids(1, batch=2)
    with_cache = steered.generate(ids, max_new_tokens=8, do_sample=False, use_cache=True)
    without = steered.generate(ids, max_new_tokens=8, do_sample=False, use_cache=False)
    assert torch.equal(with_cache, without)
    with steered.disabled():
        plain = steered.generate(ids, max_new_tokens=8, do_sample=False)
    assert not torch.equal(with_cache, plain), "steering should change this random model's output"


@pytest.mark.parametrize("positions", ["generated", "all", "prompt"])
def test_kv_cache_equals_no_cache_with_left_padding(positions):
    """Left-padded rows of different lengths: the cache must not shift which positions (and which
    mask columns) each decode step steers."""
    steered = _steered("llama", positions=positions, lr=1.0)
    ids = _ids(5, batch=2, length=9)
    mask = torch.ones_like(ids)
    pad = steered.model.generation_config.pad_token_id or 0
    ids[0, :4], mask[0, :4] = pad, 0  # row 0: 5 real tokens after 4 pads
    kw = dict(attention_mask=mask, max_new_tokens=8, do_sample=False, pad_token_id=pad,
              return_dict_in_generate=True, output_logits=True)
    with_cache = steered.generate(ids, use_cache=True, **kw)
    without = steered.generate(ids, use_cache=False, **kw)
    assert torch.equal(with_cache.sequences, without.sequences)
    for a, b in zip(with_cache.logits, without.logits):  # every step's logits, not just the argmax
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)
    with steered.disabled():
        plain = steered.generate(ids, **kw)
    assert not all(torch.allclose(a, b, atol=1e-4) for a, b in zip(with_cache.logits, plain.logits))


def test_positions_select_the_right_tokens():
    steered = _steered("llama")
    ids = _ids(2, batch=2, length=10)
    counts = {}
    for positions in ("generated", "prompt", "all"):
        state = CallState(gen_start=9, prompt_end=10)
        with steered.steering(state, positions=positions):
            steered.model.generate(ids, max_new_tokens=4, do_sample=False, min_new_tokens=4)
        counts[positions] = state.steered_positions
    # 4 new tokens are predicted from positions 9, 10, 11, 12 (the last is never fed back).
    assert counts == {"generated": 2 * 4, "prompt": 2 * 10, "all": 2 * 13}


def test_generated_positions_in_a_plain_forward():
    steered = _steered("llama", positions="generated")
    ids = _ids(3, batch=2, length=10)
    plain = steered.model(ids).logits
    out = steered(ids, prompt_length=torch.tensor([6, 8])).logits
    # Row 0 is steered from position 5 on, row 1 from 7 on; earlier positions are exact.
    assert torch.equal(out[0, :5], plain[0, :5]) and not torch.allclose(out[0, 5:], plain[0, 5:])
    assert torch.equal(out[1, :7], plain[1, :7]) and not torch.allclose(out[1, 7:], plain[1, 7:])
    assert torch.equal(steered(ids).logits, plain)  # no prompt_length: all prompt, nothing steered


def test_left_padded_batch_rows_match_single_runs():
    steered = _steered("llama")
    tok = steered.tokenizer
    tok.padding_side = "left"
    prompts = ["hello there", "a much longer prompt than the first"]
    batch = tok(prompts, return_tensors="pt", padding=True)
    out = steered.generate(**batch, max_new_tokens=6, do_sample=False, pad_token_id=tok.pad_token_id)
    for i, p in enumerate(prompts):
        single = tok(p, return_tensors="pt")
        alone = steered.generate(**single, max_new_tokens=6, do_sample=False, pad_token_id=tok.pad_token_id)
        assert out[i, -6:].tolist() == alone[0, -6:].tolist()


def test_sampling_and_streamer_pass_through():
    from transformers import TextIteratorStreamer

    steered = _steered("llama")
    ids = _ids(4)
    torch.manual_seed(0)
    a = steered.generate(ids, max_new_tokens=5, do_sample=True, top_k=20)
    torch.manual_seed(0)
    b = steered.generate(ids, max_new_tokens=5, do_sample=True, top_k=20)
    assert torch.equal(a, b)
    streamer = TextIteratorStreamer(steered.tokenizer, skip_prompt=True)
    out = steered.generate(ids, max_new_tokens=5, do_sample=False, streamer=streamer)
    assert "".join(streamer) == steered.tokenizer.decode(out[0, ids.shape[1]:])


def test_chat_uses_the_template():
    steered = _steered("qwen2", positions="all")
    msgs = [{"role": "user", "content": "hi"}]
    ids = steered.tokenizer.apply_chat_template(msgs, add_generation_prompt=True, return_tensors="pt",
                                                return_dict=True)["input_ids"]
    out = steered.generate(ids, max_new_tokens=5, do_sample=False)
    assert steered.chat(msgs, max_new_tokens=5) == steered.tokenizer.decode(out[0, ids.shape[1]:],
                                                                            skip_special_tokens=True)
    with steered.disabled():
        plain = steered.chat("hi", max_new_tokens=5)  # a string is one user message
        want = steered.model.generate(ids, max_new_tokens=5, do_sample=False)
    assert plain == steered.tokenizer.decode(want[0, ids.shape[1]:], skip_special_tokens=True)


def test_no_hook_remains_after_exceptions_and_many_calls():
    from transformers import StoppingCriteria, StoppingCriteriaList

    steered = _steered("llama")
    ids = _ids(5)
    before = _hook_count(steered.model)

    class Boom(StoppingCriteria):
        def __call__(self, input_ids, scores, **kw):
            raise KeyboardInterrupt("stop mid-generation")

    with pytest.raises(KeyboardInterrupt):
        steered.generate(ids, max_new_tokens=5, stopping_criteria=StoppingCriteriaList([Boom()]))
    assert _hook_count(steered.model) == before
    for _ in range(1000):
        steered.generate(ids[:, :3], max_new_tokens=1, do_sample=False)
    assert _hook_count(steered.model) == before == 0
    handle = steered.hooks()
    assert _hook_count(steered.model) == 3  # the call-state pre-hook, the finite check, the site
    handle.remove()
    handle.remove()  # idempotent
    assert _hook_count(steered.model) == 0


@pytest.mark.parametrize("sae_arch", ["relu", "jumprelu", "topk"])
def test_each_sae_architecture_steers(sae_arch):
    steered = _steered("llama", sae_arch=sae_arch, positions="all")
    ids = _ids(6)
    with steered.disabled():
        plain = steered(ids).logits
    assert not torch.allclose(steered(ids).logits, plain)


def test_resid_pre_and_mlp_out_hooks():
    model = make_tiny_model("llama")
    sae, vec = _artifacts()
    ids = _ids(7)
    plain = model(ids).logits
    for hook in ("blocks.1.hook_resid_pre", "blocks.1.hook_mlp_out"):
        steered = SteeredModel(model, make_byte_tokenizer(), sae, vec, hook=hook,
                               config=SteeringConfig(positions="all"))
        assert steered.hook_point.name == hook
        assert not torch.allclose(steered(ids).logits, plain)
    assert _hook_count(model) == 0


def test_user_objective_takes_the_autograd_path():
    model = make_tiny_model("llama")
    sae, vec = _artifacts()
    w = vec.dense()
    ids = _ids(8)
    closed = SteeredModel(model, make_byte_tokenizer(), sae, vec, config=SteeringConfig(positions="all"))
    auto = SteeredModel(model, make_byte_tokenizer(), sae, objective=lambda h, s: s.encode(h) @ w,
                        config=SteeringConfig(positions="all"))
    with torch.inference_mode():
        torch.testing.assert_close(closed(ids).logits, auto(ids).logits, rtol=1e-4, atol=1e-4)
    with pytest.raises(ValueError, match="push_inactive"):
        auto(ids, push_inactive=True)


def test_transformers4_tuple_outputs_are_handled():
    from steerplug.hooks import _output_hook

    hook = _output_hook(lambda h: h + 1)
    out = hook(None, (), (torch.zeros(1, 2, 3), "cache"))
    assert isinstance(out, tuple) and out[1] == "cache" and torch.equal(out[0], torch.ones(1, 2, 3))


# --- bad input ------------------------------------------------------------------------------------
def test_d_in_mismatch_names_both_sizes():
    sae, vec = _artifacts(d_in=HIDDEN * 2)
    with pytest.raises(ValueError, match=rf"d_in={HIDDEN * 2}.*hidden size {HIDDEN}"):
        SteeredModel(make_tiny_model("llama"), make_byte_tokenizer(), sae, vec)


def test_layer_out_of_range():
    sae, vec = _artifacts(layer=N_LAYERS + 3)
    with pytest.raises(HookPointError, match=rf"Layer {N_LAYERS + 3} is out of range.*{N_LAYERS} blocks"):
        SteeredModel(make_tiny_model("llama"), make_byte_tokenizer(), sae, vec)


def test_vector_length_mismatch():
    sae, _ = _artifacts()
    with pytest.raises(ValueError, match=f"d_sae=10 but the SAE has d_sae={F}"):
        SteeredModel(make_tiny_model("llama"), make_byte_tokenizer(), sae,
                     SteeringVector(10, weights=torch.ones(10)))


def test_unknown_hook_says_how_to_name_the_module():
    sae, vec = _artifacts()
    with pytest.raises(HookPointError, match="model.layers.12"):
        SteeredModel(make_tiny_model("llama"), make_byte_tokenizer(), sae, vec, hook="blocks.1.hook_attn_z")


def test_nan_in_steered_activations_raises():
    sae, vec = _artifacts()
    bad = SteeringVector(vec.d_sae, vec.indices, vec.values)
    bad.values[0] = float("nan")  # bypass the constructor's check: simulate a corrupted vector
    steered = SteeredModel(make_tiny_model("llama"), make_byte_tokenizer(), sae, bad,
                           config=SteeringConfig(positions="all", normalize=False, max_delta=None))
    with pytest.raises(SteeringError, match="NaN or inf"):
        steered(_ids(9))
    assert _hook_count(steered.model) == 0


def test_float16_overflow_after_the_cast_raises_with_one_check_per_call():
    """A finite float32 step that overflows float16 on the cast back is caught; the check runs once
    per forward call (a post-hook on the model), not once per steered layer."""
    sae, vec = _artifacts()
    model = make_tiny_model("llama").to(torch.float16)
    steered = SteeredModel(model, make_byte_tokenizer(), sae, vec,
                           directions={f"blocks.{LAYER}.hook_resid_post": torch.full((HIDDEN,), 1e5)},
                           config=SteeringConfig(method="add", steps=1, lr=1.0, normalize=False, max_delta=None,
                                                 positions="all"))
    with pytest.raises(SteeringError, match="after the cast"):
        steered(_ids(9))
    assert _hook_count(steered.model) == 0
    steered.config.lr = 1e-3  # 100 per coordinate: fine in float16
    steered(_ids(9))


def test_missing_vector_or_sae():
    sae, vec = _artifacts()
    with pytest.raises(ValueError, match="needs a steering vector"):
        SteeredModel(make_tiny_model("llama"), make_byte_tokenizer(), sae)
    with pytest.raises(ValueError, match="needs an SAE"):
        SteeredModel(make_tiny_model("llama"), make_byte_tokenizer(), None, vec)


def test_push_inactive_reaches_the_hook_and_equals_its_one_step_edit():
    steered = _steered("llama", sae_arch="topk", positions="all", steps=1, normalize=False, max_delta=None,
                       lr=0.1)
    ids = _ids()
    obj = steered.feature_objective()
    pushed, plain = steered(ids, push_inactive=True).logits, steered(ids).logits
    assert not torch.allclose(pushed, plain)
    # The same edit by hand: one step of 0.1 along the push_inactive gradient at every position.
    edit = lambda m, a, o: o - 0.1 * obj.grad(o[0].float(), push_inactive=True).unsqueeze(0)  # noqa: E731
    handle = steered.hook_point.module.register_forward_hook(edit)
    try:
        with steered.disabled():
            by_hand = steered(ids).logits
    finally:
        handle.remove()
    torch.testing.assert_close(pushed, by_hand, rtol=1e-4, atol=1e-4)


def test_generate_from_several_threads_equals_each_call_alone():
    """Hooks are per model: concurrent calls with different settings must not share hooks or state."""
    import threading

    s = _steered("llama", steps=3, lr=0.5, positions="all")
    ids = _ids(seed=3, batch=2, length=10)
    settings = [{"steps": 0}, {"steps": 3, "lr": 0.5}, {"steps": 1, "lr": 2.0}, {"steps": 5, "lr": 0.2}] * 3
    alone = [s.generate(ids, max_new_tokens=6, do_sample=False, **kw) for kw in settings[:4]]
    assert len({tuple(a.flatten().tolist()) for a in alone}) > 1  # the settings really differ
    out: dict[int, torch.Tensor] = {}
    barrier = threading.Barrier(len(settings))

    def work(i: int) -> None:
        barrier.wait()
        if i % 4 == 0 and i:  # disabled() in one thread is not disabled() in the others
            with s.disabled():
                out[i] = s.generate(ids, max_new_tokens=6, do_sample=False, steps=3, lr=0.5)
            return
        out[i] = s.generate(ids, max_new_tokens=6, do_sample=False, **settings[i])

    threads = [threading.Thread(target=work, args=(i,)) for i in range(len(settings))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert sorted(out) == list(range(len(settings)))
    for i, got in out.items():
        assert torch.equal(got, alone[i % 4]), settings[i]


def test_in_place_edits_of_the_sae_or_vector_take_effect_without_refresh():
    sae, vec = _artifacts()
    model, tok = make_tiny_model("llama"), make_byte_tokenizer()
    s = SteeredModel(model, tok, sae, vec, config=SteeringConfig(lr=0.5, positions="all"))
    ids = _ids(4)
    first = s(ids).logits
    with torch.no_grad():
        sae.W_enc.mul_(-1.0)  # in place: the cached objective is now stale
        vec.values.mul_(3.0)
    fresh = SteeredModel(model, tok, sae, vec, config=SteeringConfig(lr=0.5, positions="all"))
    want = fresh(ids).logits
    assert not torch.allclose(first, want)
    assert torch.equal(s(ids).logits, want)


def test_hooks_installs_nothing_when_there_is_nothing_to_steer():
    steered = _steered("llama")
    handle = steered.hooks(steps=0)
    assert not handle.active and _hook_count(steered.model) == 0
    bare = SteeredModel(make_tiny_model("llama"), make_byte_tokenizer())  # no SAE, no vector
    handle = bare.hooks()
    assert not handle.active and _hook_count(bare.model) == 0
    handle.remove()
