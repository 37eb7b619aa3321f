"""Shared fixtures: tiny random-init models of several families, a byte-level tokenizer with a
chat template, tiny SAEs and vectors, and (marked slow) the real offline default model."""

from __future__ import annotations

import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

HIDDEN = 64
N_LAYERS = 4
VOCAB = 300  # 256 bytes + specials + spare


_IDS = {"bos_token_id": 256, "eos_token_id": 257, "pad_token_id": 258}  # make_byte_tokenizer's specials


def _llama_like(cls_name: str, **extra):
    import transformers

    cfg_cls = getattr(transformers, cls_name)
    return cfg_cls(vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=128,
                   num_hidden_layers=N_LAYERS, num_attention_heads=4, num_key_value_heads=2,
                   max_position_embeddings=256, **_IDS, **extra)


def tiny_config(arch: str):
    """A transformers config of ``arch`` with hidden size 64 and 4 layers."""
    import transformers

    if arch == "llama":
        return _llama_like("LlamaConfig")
    if arch == "mistral":
        return _llama_like("MistralConfig", sliding_window=None)
    if arch == "qwen2":
        return _llama_like("Qwen2Config")
    if arch == "gemma2":
        return _llama_like("Gemma2Config", head_dim=16, sliding_window=8)
    if arch == "gemma3":
        return _llama_like("Gemma3TextConfig", head_dim=16, sliding_window=8)
    if arch == "phi3":
        return transformers.Phi3Config(vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=128,
                                       num_hidden_layers=N_LAYERS, num_attention_heads=4,
                                       num_key_value_heads=2, max_position_embeddings=256, **_IDS)
    if arch == "gpt2":
        return transformers.GPT2Config(vocab_size=VOCAB, n_embd=HIDDEN, n_layer=N_LAYERS, n_head=4,
                                       n_positions=256, **_IDS)
    if arch == "gpt_neox":
        return transformers.GPTNeoXConfig(vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=128,
                                          num_hidden_layers=N_LAYERS, num_attention_heads=4,
                                          max_position_embeddings=256, **_IDS)
    raise ValueError(arch)


ARCHS = ("llama", "mistral", "qwen2", "gemma2", "gemma3", "phi3", "gpt2", "gpt_neox")


def make_tiny_model(arch: str, seed: int = 0):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    cfg = tiny_config(arch)
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    for key, value in _IDS.items():
        setattr(model.generation_config, key, value)
    return model.eval()


def make_byte_tokenizer():
    """A byte-level tokenizer (256 byte tokens + specials) with a ChatML template, built offline."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {ch: i for i, ch in enumerate(alphabet)}
    specials = ["<|pad|>", "<|im_start|>", "<|im_end|>", "<|endoftext|>"]
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<|pad|>", eos_token="<|im_end|>",
                                   bos_token="<|endoftext|>")
    fast.add_special_tokens({"additional_special_tokens": ["<|im_start|>"]})
    fast.chat_template = (
        "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
        "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
    )
    return fast


@pytest.fixture(scope="session")
def byte_tokenizer():
    return make_byte_tokenizer()


@pytest.fixture(params=ARCHS)
def tiny_model(request):
    return make_tiny_model(request.param)


@pytest.fixture(scope="session")
def default_model():
    """The real SmolLM2-135M-Instruct (offline), loaded once per session."""
    from steerplug.models import load_model

    return load_model(None)
