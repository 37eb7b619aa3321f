"""Model cards and ``steerplug push``: HfApi.create_repo / upload_folder are replaced by recorders,
so nothing here reaches the network; we check the card and exactly what would be uploaded."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml
from huggingface_hub import HfApi
from huggingface_hub.utils import filter_repo_objects

from steerplug import cli
from steerplug.push import IGNORE_PATTERNS, artifact_kind, push_to_hub, write_model_card
from steerplug.sae import SparseAutoencoder
from steerplug.vector import SteeringVector, VectorMetadata

MODEL = "HuggingFaceTB/SmolLM2-135M-Instruct"
HOOK = "blocks.15.hook_resid_post"
REPORT = {"fve": 0.8312, "l0": 31.25, "ce_loss_recovered": 0.912,
          "probe": {"harmful_auc": 0.97}, "notes": "held-out split"}


def _sae(folder: Path, d_sae: int = 32) -> Path:
    sae = SparseAutoencoder.random(16, d_sae, architecture="topk", k=4, seed=0, hook_name=HOOK,
                                   model_name=MODEL,
                                   metadata={"dataset": "HuggingFaceFW/fineweb-edu",
                                             "training": {"steps": 2000, "lr": 0.0004, "tokens": 8_000_000}})
    return sae.save_pretrained(folder)


def _vector(folder: Path, d_sae: int = 32, hook: str = HOOK) -> Path:
    meta = VectorMetadata(model_name=MODEL, hook_name=hook, sae="steerplug/sae-repo",
                          extra={"method": "mean difference", "training_data": "org/harmful-prompts"})
    return SteeringVector(d_sae, torch.tensor([1, 5, 7]), torch.tensor([0.5, -1.0, 2.0]),
                          metadata=meta).save_pretrained(folder)


def _front_matter(text: str) -> tuple[dict, str]:
    assert text.startswith("---\n")
    head, body = text[4:].split("\n---\n", 1)
    return yaml.safe_load(head), body


class _Recorder:
    """Stands in for the two HfApi calls push makes; records them and what would be uploaded."""

    def __init__(self, monkeypatch):
        self.calls: list[tuple[str, dict]] = []
        rec = self

        def create_repo(self, repo_id, **kw):
            rec.calls.append(("create_repo", {"repo_id": repo_id, **kw}))
            return f"https://huggingface.co/{repo_id}"

        def upload_folder(self, **kw):
            root = Path(kw["folder_path"])
            files = sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file())
            kw["uploaded"] = sorted(filter_repo_objects(files, allow_patterns=kw.get("allow_patterns"),
                                                        ignore_patterns=kw.get("ignore_patterns")))
            kw["card"] = (root / "README.md").read_text() if (root / "README.md").is_file() else None
            rec.calls.append(("upload_folder", kw))

            class Info:
                commit_url = f"https://huggingface.co/{kw['repo_id']}/commit/abc"
            return Info()

        monkeypatch.setattr(HfApi, "create_repo", create_repo)
        monkeypatch.setattr(HfApi, "upload_folder", upload_folder)


def test_sae_card(tmp_path):
    folder = _sae(tmp_path / "sae")
    (folder / "report.json").write_text(json.dumps(REPORT))
    text = write_model_card(folder, "me/smol-sae").read_text()
    meta, body = _front_matter(text)
    assert meta["library_name"] == "steerplug"
    assert meta["license"] == "apache-2.0" and meta["base_model"] == MODEL
    assert {"steerplug", "sparse-autoencoder", "sae_lens", "topk"} <= set(meta["tags"])
    assert "steering-vector" not in meta["tags"]
    assert meta["datasets"] == ["HuggingFaceFW/fineweb-edu"]
    assert f"`{HOOK}`" in body and "topk (k=4)" in body and "16 → 32" in body
    # training configuration, from cfg.json metadata
    assert '"steps": 2000' in body and '"lr": 0.0004' in body
    # metrics, from report.json, nested keys dotted
    assert "From `report.json` in this repo." in body
    assert "| fve | 0.8312 |" in body and "| l0 | 31.25 |" in body
    assert "| probe.harmful_auc | 0.97 |" in body and "| notes | held-out split |" in body
    # loading: steerplug and SAELens
    assert 'SparseAutoencoder.from_pretrained("me/smol-sae")' in body
    assert 'snapshot_download("me/smol-sae")' in body and "SAE.load_from_disk(path" in body


def test_vector_card_without_report(tmp_path):
    folder = _vector(tmp_path / "vec")
    meta, body = _front_matter(write_model_card(folder, "me/vec", license="mit").read_text())
    assert meta["license"] == "mit" and meta["base_model"] == MODEL
    assert {"steerplug", "steering-vector"} <= set(meta["tags"]) and "sae_lens" not in meta["tags"]
    assert meta["datasets"] == ["org/harmful-prompts"]
    assert "3 non-zero of 32 features" in body and "harmful - safe" in body
    assert "## Metrics" not in body
    assert 'SteeringVector.from_pretrained("me/vec")' in body
    assert 'sae="steerplug/sae-repo"' in body and "sae_lens" not in body


def test_bundle_card(tmp_path):
    _sae(tmp_path / "sae")
    _vector(tmp_path / "vector")
    (tmp_path / "report.json").write_text(json.dumps({"refusal_rate": {"steered": 0.9, "plain": 0.2}}))
    assert artifact_kind(tmp_path) == "bundle"
    meta, body = _front_matter(write_model_card(tmp_path, "me/bundle", base_model="other/base",
                                                tags=["safety"]).read_text())
    assert meta["base_model"] == "other/base"
    assert {"steerplug", "sparse-autoencoder", "steering-vector", "safety"} <= set(meta["tags"])
    assert set(meta["datasets"]) == {"HuggingFaceFW/fineweb-edu", "org/harmful-prompts"}
    assert "| refusal_rate.steered | 0.9 |" in body
    assert 'sae_subfolder="sae", vector_subfolder="vector"' in body
    assert 'snapshot_download("me/bundle") + "/sae"' in body
    # with a steerplug.json manifest the card shows what it ships and loads it whole
    (tmp_path / "steerplug.json").write_text(json.dumps({
        "sites": [{"sae": "sae", "vector": "vector"}], "gate": "gate", "caa": "caa.safetensors",
        "steering": {"method": "add", "lr": 0.3}, "built": {"seconds": 12.0, "gate": {"pools": ["mean"],
                                                                                 "fire_rates": {"val_harmful": 0.8}}}}))
    _, body = _front_matter(write_model_card(tmp_path, "me/bundle").read_text())
    assert 'SteeredModel.from_pretrained("' in body and 'sae="me/bundle")' in body
    assert '"method": "add"' in body and "val_harmful" in body and "| 0 | `sae` | `vector` |" in body


def test_card_with_an_explicit_report_outside_the_folder(tmp_path):
    folder = _vector(tmp_path / "vec")
    (tmp_path / "eval").mkdir()
    (tmp_path / "eval" / "eval_report.json").write_text(json.dumps({"wikitext2_test": {"fve": 0.7}}))
    (folder / "report.json").write_text(json.dumps({"fve": 0.1}))  # overridden by report=
    _, body = _front_matter(write_model_card(folder, "me/v", report=tmp_path / "eval" / "eval_report.json")
                            .read_text())
    assert "From `eval_report.json`." in body and "| wikitext2_test.fve | 0.7 |" in body
    assert "| fve | 0.1 |" not in body
    with pytest.raises(FileNotFoundError, match="missing.json"):
        write_model_card(folder, report="missing.json")


def test_not_an_artifact(tmp_path):
    (tmp_path / "x.bin").write_bytes(b"0")
    with pytest.raises(ValueError, match="not a steerplug artifact.*x.bin"):
        write_model_card(tmp_path)


def test_push_uploads_folder_with_card(tmp_path, monkeypatch):
    rec = _Recorder(monkeypatch)
    folder = _sae(tmp_path / "sae")
    (folder / "report.json").write_text(json.dumps(REPORT))
    (folder / ".cache" / "huggingface").mkdir(parents=True)
    (folder / ".cache" / "huggingface" / "x.lock").write_text("")
    (folder / "__pycache__").mkdir()
    (folder / "__pycache__" / "m.pyc").write_bytes(b"")
    url = push_to_hub(folder, "me/smol-sae", private=True, token="hf_fake")
    assert url == "https://huggingface.co/me/smol-sae/commit/abc"
    (name1, create), (name2, upload) = rec.calls
    assert (name1, name2) == ("create_repo", "upload_folder")
    assert create["repo_id"] == "me/smol-sae" and create["exist_ok"] is True and create["private"] is True
    assert upload["repo_id"] == "me/smol-sae" and Path(upload["folder_path"]) == folder
    assert upload["ignore_patterns"] == IGNORE_PATTERNS
    assert upload["uploaded"] == ["README.md", "cfg.json", "report.json", "sae_weights.safetensors"]
    meta, body = _front_matter(upload["card"])
    assert meta["library_name"] == "steerplug" and "| fve | 0.8312 |" in body
    assert 'from_pretrained("me/smol-sae")' in body


def test_push_keeps_an_existing_card_unless_asked(tmp_path, monkeypatch):
    rec = _Recorder(monkeypatch)
    folder = _vector(tmp_path / "vec")
    (folder / "README.md").write_text("hand written\n")
    push_to_hub(folder, "me/vec")
    assert rec.calls[-1][1]["card"] == "hand written\n"
    push_to_hub(folder, "me/vec", overwrite_card=True)
    card = rec.calls[-1][1]["card"]
    assert card.startswith("---\n") and "library_name: steerplug" in card


def test_push_refuses_a_broken_artifact_before_touching_the_hub(tmp_path, monkeypatch):
    rec = _Recorder(monkeypatch)
    folder = _sae(tmp_path / "sae")
    cfg = json.loads((folder / "cfg.json").read_text())
    cfg["d_sae"] = 99
    (folder / "cfg.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="shape"):
        push_to_hub(folder, "me/broken")
    # a bundle whose vector does not fit its SAE
    _sae(tmp_path / "b" / "sae", d_sae=32)
    _vector(tmp_path / "b" / "vector", d_sae=64)
    with pytest.raises(ValueError, match="d_sae=64.*d_sae=32"):
        push_to_hub(tmp_path / "b", "me/broken")
    # ... or that reads another hook point
    _sae(tmp_path / "c" / "sae")
    _vector(tmp_path / "c" / "vector", hook="blocks.3.hook_resid_post")
    with pytest.raises(ValueError, match="different hook points"):
        push_to_hub(tmp_path / "c", "me/broken")
    assert rec.calls == []


def test_cli_push_and_card_only(tmp_path, monkeypatch, capsys):
    rec = _Recorder(monkeypatch)
    folder = _sae(tmp_path / "sae")
    assert cli.main(["push", str(folder), "me/cli-sae", "--card-only", "--license", "mit"]) == 0
    assert rec.calls == [] and "license: mit" in (folder / "README.md").read_text()
    assert cli.main(["push", str(folder), "me/cli-sae", "--overwrite-card", "--tag", "demo",
                     "--revision", "dev", "--commit-message", "first"]) == 0
    upload = rec.calls[-1][1]
    assert upload["revision"] == "dev" and upload["commit_message"] == "first"
    assert "- demo" in upload["card"] and "license: apache-2.0" in upload["card"]
    assert "commit/abc" in capsys.readouterr().out


def test_push_to_hub_methods_delegate(monkeypatch):
    rec = _Recorder(monkeypatch)
    sae = SparseAutoencoder.random(16, 32, seed=1, hook_name=HOOK, model_name=MODEL)
    sae.push_to_hub("me/m-sae")
    vec = SteeringVector(32, weights=torch.linspace(-1, 1, 32), metadata=VectorMetadata(model_name=MODEL))
    vec.push_to_hub("me/m-vec")
    uploads = [kw for name, kw in rec.calls if name == "upload_folder"]
    assert uploads[0]["uploaded"] == ["README.md", "cfg.json", "sae_weights.safetensors"]
    assert uploads[1]["uploaded"] == ["README.md", "steering_vector.json", "steering_vector.safetensors"]
    assert "sparse-autoencoder" in uploads[0]["card"] and "steering-vector" in uploads[1]["card"]


@pytest.mark.parametrize("env", [{"HF_HUB_OFFLINE": "1"}, {"HF_HUB_OFFLINE": "0", "HF_ENDPOINT": "http://127.0.0.1:9"}])
def test_push_without_a_network_ends_in_one_line_not_a_traceback(tmp_path, env):
    """Offline mode and an unreachable Hub: exit 1 and one line that says what failed and what to do."""
    import os
    import subprocess
    import sys

    folder = SparseAutoencoder.random(16, 32, hook_name="blocks.1.hook_resid_post").save_pretrained(tmp_path / "sae")
    r = subprocess.run([sys.executable, "-m", "steerplug.cli", "push", str(folder), "me/x", "--token", "hf_fake"],
                       capture_output=True, text=True, env={**os.environ, **env}, timeout=120)
    assert r.returncode == 1, r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("steerplug push: ") and "Traceback" not in r.stderr, r.stderr
    assert ("offline mode" in lines[0]) if env["HF_HUB_OFFLINE"] == "1" else ("could not reach" in lines[0])
