"""collect: early stop, agreement with output_hidden_states, shards + manifest, resume."""

from __future__ import annotations

import json
import re

import pytest
import torch

from conftest import make_byte_tokenizer, make_tiny_model
from steerplug.layers import find_blocks, resolve_hook_point
from steerplug.pipeline import collect as C
from steerplug.pipeline.examples import ROLE_ANSWER, ROLE_PROMPT, ROLE_TEXT, Example


def _examples(n: int = 6) -> list[Example]:
    out = []
    for i in range(n):
        out.append(Example(messages=[{"role": "user", "content": f"question {i} " + "x" * (i * 3)}],
                           answer=f"answer {i}", labels={"harmful": i % 2 == 0, "category": f"c{i % 3}"}))
    out.append(Example(text="plain text example", labels={"source": "text"}))
    return out


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_capture_stops_after_deepest_hook(arch):
    model, tok = make_tiny_model(arch), make_byte_tokenizer()
    _, blocks = find_blocks(model)
    calls = {i: 0 for i in range(len(blocks))}
    handles = [b.register_forward_pre_hook(lambda m, a, i=i: calls.__setitem__(i, calls[i] + 1))
               for i, b in enumerate(blocks)]
    head_calls = []
    handles.append(model.get_output_embeddings().register_forward_pre_hook(lambda m, a: head_calls.append(1)))
    ids = torch.tensor([tok("hello world")["input_ids"]])
    points = [resolve_hook_point(model, "blocks.0.hook_resid_post"), resolve_hook_point(model, "blocks.1.hook_resid_post")]
    acts = C.capture_activations(model, points, ids)
    for h in handles:
        h.remove()
    assert calls == {0: 1, 1: 1, 2: 0, 3: 0}, calls  # the layers above layer 1 never ran
    assert not head_calls
    with torch.no_grad():
        hs = model(ids, output_hidden_states=True).hidden_states
    torch.testing.assert_close(acts["blocks.0.hook_resid_post"], hs[1])
    torch.testing.assert_close(acts["blocks.1.hook_resid_post"], hs[2])


def test_capture_resid_pre_stops_before_the_block():
    model, tok = make_tiny_model("llama"), make_byte_tokenizer()
    _, blocks = find_blocks(model)
    ran = []
    h = blocks[2].register_forward_hook(lambda m, a, o: ran.append(2))
    ids = torch.tensor([tok("abc")["input_ids"]])
    acts = C.capture_activations(model, [resolve_hook_point(model, "blocks.2.hook_resid_pre")], ids)
    h.remove()
    assert not ran
    with torch.no_grad():
        hs = model(ids, output_hidden_states=True).hidden_states
    torch.testing.assert_close(acts["blocks.2.hook_resid_pre"], hs[2])


def test_collect_manifest_roles_and_labels(tmp_path):
    model, tok = make_tiny_model("llama"), make_byte_tokenizer()
    exs = _examples()
    cfg = C.CollectConfig(hooks=["blocks.1.hook_resid_post", "blocks.0.hook_resid_post"], batch_size=3,
                          shard_tokens=50, progress=False)
    res = C.collect_activations(model, tok, exs, tmp_path, cfg)
    man = json.loads((tmp_path / C.MANIFEST_NAME).read_text())
    assert man["complete"] and res.n_shards == len(man["shards"]) > 1
    assert man["sequences"][0]["harmful"] is True and man["sequences"][1]["category"] == "c1"
    a = C.load_activations(tmp_path, "blocks.1.hook_resid_post", skip_first=False)
    assert a.acts.shape == (res.n_tokens, 64)
    assert set(a.roles.unique().tolist()) == {ROLE_PROMPT, ROLE_ANSWER, ROLE_TEXT}
    # every sequence is stored whole and in order, and matches a direct forward pass
    for sid in (0, 6):
        rows = a.seq_ids == sid
        assert a.positions[rows].tolist() == list(range(int(rows.sum())))
        ids = a.token_ids[rows].unsqueeze(0)
        with torch.no_grad():
            hs = model(ids, output_hidden_states=True).hidden_states[2]
        torch.testing.assert_close(a.acts[rows], hs[0], atol=1e-4, rtol=1e-4)
    assert a.roles[a.seq_ids == 6].unique().tolist() == [ROLE_TEXT]
    b = C.load_activations(tmp_path, "blocks.1.hook_resid_post", roles=(ROLE_ANSWER,))
    assert (b.positions > 0).all() and (b.roles == ROLE_ANSWER).all()
    with pytest.raises(ValueError, match="holds hooks"):
        C.load_activations(tmp_path)


def test_collect_resumes_after_interruption(tmp_path, monkeypatch):
    model, tok = make_tiny_model("llama"), make_byte_tokenizer()
    exs = _examples()
    cfg = C.CollectConfig(hooks=["blocks.1.hook_resid_post"], batch_size=2, shard_tokens=40, progress=False)
    C.collect_activations(model, tok, exs, tmp_path / "full", cfg)

    real, calls = C.capture_activations, []

    def flaky(*a, **k):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real(*a, **k)

    monkeypatch.setattr(C, "capture_activations", flaky)
    with pytest.raises(KeyboardInterrupt):
        C.collect_activations(model, tok, exs, tmp_path / "resumed", cfg)
    man = json.loads((tmp_path / "resumed" / C.MANIFEST_NAME).read_text())
    assert not man["complete"] and man["batches_done"] == 2
    monkeypatch.setattr(C, "capture_activations", real)
    C.collect_activations(model, tok, exs, tmp_path / "resumed", cfg)
    full = C.load_activations(tmp_path / "full", skip_first=False)
    again = C.load_activations(tmp_path / "resumed", skip_first=False)
    for x, y in zip(full, again):
        torch.testing.assert_close(x, y)
    with pytest.raises(ValueError, match="fingerprint"):
        C.collect_activations(model, tok, exs[:3], tmp_path / "resumed", cfg)


def test_collect_config_validation():
    with pytest.raises(ValueError, match="dtype"):
        C.CollectConfig(dtype="int8")
    with pytest.raises(ValueError, match="hooks"):
        C.CollectConfig(hooks=[])


def _write_docs(path, n: int = 40) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as f:
        for i in range(n):
            f.write(json.dumps({"id": i, "text": f"Document {i}.\n" + " ".join(f"w{i}_{j}" for j in range(12))}) + "\n")


def test_text_dataset_chunks_are_long_packed_and_read_lazily(tmp_path):
    from steerplug.pipeline.examples import TextDataset, text_examples

    tok = make_byte_tokenizer()
    _write_docs(tmp_path / "data" / "docs.jsonl")
    pulled: list[str] = []
    docs = (pulled.append(d) or d for d in TextDataset(str(tmp_path / "data" / "docs.jsonl")).documents())
    exs = text_examples(docs, tok, 150, limit=3, source="dataset:x")
    assert len(exs) == 3 and all(len(tok(e.text, add_special_tokens=False)["input_ids"]) >= 150 for e in exs)
    joined = "\n".join(e.text for e in exs)  # the documents, in order, packed across chunk borders
    assert joined.startswith("Document 0.\nw0_0 w0_1") and "Document 1.\nw1_0" in joined
    assert exs[0].labels == {"source": "dataset:x"}
    assert 3 < len(pulled) < 40  # it stopped reading once it had 3 chunks
    # a folder of data files reads the same records as the file
    folder = list(TextDataset(str(tmp_path / "data")).documents())
    assert folder == list(TextDataset(str(tmp_path / "data" / "docs.jsonl")).documents()) and len(folder) == 40
    with pytest.raises(ValueError, match=r"no column 'body'.*\['id', 'text'\].*--text-column"):
        next(TextDataset(str(tmp_path / "data"), column="body").documents())
    (tmp_path / "notes.xml").write_text("<a/>")
    with pytest.raises(ValueError, match=r"'\.xml'"):
        next(TextDataset(str(tmp_path / "notes.xml")).documents())
    with pytest.raises(ValueError, match="at least one chunk"):
        TextDataset("x", chunks=0)


def test_collect_cli_reads_a_hub_dataset_from_the_local_cache(tmp_path, monkeypatch, capsys):
    """``--text-dataset org/name`` offline: the dataset repo's files in the Hugging Face cache."""
    import huggingface_hub.constants

    from steerplug.cli import main

    sha = "0123456789abcdef0123456789abcdef01234567"
    repo = tmp_path / "hub" / "datasets--org--tiny-text"
    _write_docs(repo / "snapshots" / sha / "data" / "train.jsonl")
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(sha)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "datasets-cache"))
    model, tok = make_tiny_model("llama"), make_byte_tokenizer()
    model.save_pretrained(tmp_path / "model")
    tok.save_pretrained(tmp_path / "model")
    args = ["collect", "--model", str(tmp_path / "model"), "--hooks", "blocks.1.hook_resid_post", "--prompt-sets",
            "--text-chunks", "2", "--chunk-tokens", "120", "--max-length", "400"]
    assert main([*args, "--out", str(tmp_path / "acts"), "--text-dataset", "org/tiny-text"]) == 0
    man = json.loads((tmp_path / "acts" / C.MANIFEST_NAME).read_text())
    assert [s["source"] for s in man["sequences"]] == ["dataset:org/tiny-text"] * 2
    a = C.load_activations(tmp_path / "acts", skip_first=False)
    lengths = torch.bincount(a.seq_ids)
    assert len(lengths) == 2 and (lengths >= 120).all(), lengths
    assert tok.decode(a.token_ids[a.seq_ids == 0][:11]) == "Document 0."
    capsys.readouterr()
    assert main([*args, "--out", str(tmp_path / "acts2"), "--text-dataset", "org/absent"]) != 0
    assert re.search(r"'org/absent'.*not in the local Hugging Face cache.*hf download", capsys.readouterr().err)
