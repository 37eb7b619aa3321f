"""Model cards for artifact folders, written from their files and plain dicts; and the push.

:func:`write_model_card` writes ``README.md`` (YAML front matter + body) into an SAE,
steering-vector or bundle folder without uploading anything; :func:`push_folder` writes the card
when the folder has none and uploads the folder (:func:`steerplug.hub.upload_folder`). Metrics
come from a report JSON in the folder if there is one (:data:`REPORT_NAMES`).

Everything here reads the folder's JSON files; the SAE's ``cfg.json`` goes through
:class:`~steerplug.sae_config.SAEConfig` (plain data), so this module imports no torch and no
artifact class, and ``SparseAutoencoder.push_to_hub`` / ``SteeringVector.push_to_hub`` can use it.
``steerplug push``, which first loads the folder through those classes, is :mod:`steerplug.push`.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from steerplug.hub import (BUNDLE_SAE_DIR, BUNDLE_VECTOR_DIR, CARD_NAME, MANIFEST_NAME, SAE_CONFIG_NAME,
                           SAE_WEIGHTS_NAME, VECTOR_CONFIG_NAME, artifact_kind, upload_folder)
from steerplug.sae_config import SAEConfig

REPORT_NAMES = ("report.json", "eval_report.json", "metrics.json")
"""Report files searched for metrics, in this order (in the folder, then in ``sae/``, ``vector/``)."""
DEFAULT_LICENSE = "apache-2.0"
_MAX_METRIC_ROWS = 60


@dataclass
class CardInfo:
    """What a model card says about one folder, gathered from its config files."""

    kind: str
    """``sae``, ``steering-vector`` or ``bundle``."""
    model_name: str | None = None
    hook_name: str | None = None
    sae: dict[str, Any] | None = None
    """The SAE's cfg.json (SAELens 6), if the folder has an SAE."""
    vector: dict[str, Any] | None = None
    """The vector's steering_vector.json, if the folder has a vector."""
    report: dict[str, Any] | None = None
    report_name: str | None = None
    """Where the report came from, as the card names it."""
    datasets: list[str] = field(default_factory=list)
    """Hub dataset ids found in the training metadata."""
    manifest: dict[str, Any] | None = None
    """A bundle's ``steerplug.json`` (sites, gate, steering configuration), if it has one."""


# --- gathering ------------------------------------------------------------------------------------
def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{path} is not valid JSON: {e}") from e
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a JSON object, got {type(data).__name__}.")
    return data


def _find_report(folder: Path, report: str | Path | None) -> tuple[dict[str, Any] | None, str | None]:
    if report is not None:
        path = Path(report) if Path(report).is_absolute() or Path(report).exists() else folder / report
        if not path.is_file():
            raise FileNotFoundError(f"Report {report} not found (looked at {path}).")
        try:  # a report inside the folder is uploaded with it; one outside is only quoted
            name = f"`{path.resolve().relative_to(folder.resolve())}` in this repo"
        except ValueError:
            name = f"`{path.name}`"
        return _read_json(path), name
    for sub in ("", BUNDLE_SAE_DIR, BUNDLE_VECTOR_DIR):
        for name in REPORT_NAMES:
            if (folder / sub / name).is_file():
                return _read_json(folder / sub / name), f"`{Path(sub) / name}` in this repo"
    return None, None


_DATASET_KEYS = ("dataset", "datasets", "dataset_path", "training_data", "train_dataset")


def _datasets(*metas: dict[str, Any] | None) -> list[str]:
    """Hub dataset ids (``org/name``) named under a dataset-like key anywhere in the metadata."""
    found: list[str] = []

    def walk(obj: Any, key: str = "") -> None:
        if isinstance(obj, dict):
            for k, v in obj.items():
                walk(v, str(k))
        elif isinstance(obj, list | tuple):
            for v in obj:
                walk(v, key)
        elif isinstance(obj, str) and key in _DATASET_KEYS:
            ref = obj.split(":")[0].strip()
            if ref.count("/") == 1 and " " not in ref and not ref.startswith((".", "/")) and ref not in found:
                found.append(ref)

    for meta in metas:
        walk(meta or {})
    return found


def gather_card_info(folder: str | Path, report: str | Path | None = None) -> CardInfo:
    """Read the configs (and a report JSON) of an artifact folder."""
    folder = Path(folder)
    kind = artifact_kind(folder)
    sae_dir = {"sae": folder, "bundle": folder / BUNDLE_SAE_DIR}.get(kind)
    vec_dir = {"steering-vector": folder, "bundle": folder / BUNDLE_VECTOR_DIR}.get(kind)
    sae = _read_json(sae_dir / SAE_CONFIG_NAME) if sae_dir else None
    vec = _read_json(vec_dir / VECTOR_CONFIG_NAME) if vec_dir else None
    sae_meta = (sae or {}).get("metadata") or {}
    info = CardInfo(kind=kind, sae=sae, vector=vec,
                    model_name=sae_meta.get("model_name") or (vec or {}).get("model_name"),
                    hook_name=sae_meta.get("hook_name") or (vec or {}).get("hook_name"))
    if kind == "bundle" and (folder / MANIFEST_NAME).is_file():
        info.manifest = _read_json(folder / MANIFEST_NAME)
    info.report, info.report_name = _find_report(folder, report)
    info.datasets = _datasets(sae_meta, (vec or {}).get("extra"), info.report)
    return info


# --- rendering -----------------------------------------------------------------------------------
def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v).replace("|", "\\|").replace("\n", " ")


def _flatten(obj: Any, prefix: str = "") -> list[tuple[str, Any]]:
    """Scalar leaves of a nested dict as ``(dotted.key, value)``; lists of scalars kept short."""
    rows: list[tuple[str, Any]] = []
    if isinstance(obj, dict):
        for k, v in obj.items():
            rows += _flatten(v, f"{prefix}.{k}" if prefix else str(k))
    elif isinstance(obj, list):
        if all(isinstance(v, int | float | str | bool) or v is None for v in obj) and len(obj) <= 8:
            rows.append((prefix, ", ".join(_fmt(v) for v in obj)))
    elif obj is not None:
        rows.append((prefix, obj))
    return rows


def _metrics_section(info: CardInfo) -> list[str]:
    if not info.report:
        return []
    rows = _flatten(info.report)
    lines = ["## Metrics", "", f"From {info.report_name}.", "", "| metric | value |",
             "|---|---|"]
    lines += [f"| {_fmt(k)} | {_fmt(v)} |" for k, v in rows[:_MAX_METRIC_ROWS]]
    if len(rows) > _MAX_METRIC_ROWS:
        lines.append(f"| ... | {len(rows) - _MAX_METRIC_ROWS} more in {info.report_name} |")
    return lines + [""]


_STANDARD_META = {"model_name", "hook_name", "hook_head_index", "prepend_bos",
                  "sae_lens_training_version", "steerplug_version"}


def _training_section(info: CardInfo) -> list[str]:
    meta = {k: v for k, v in ((info.sae or {}).get("metadata") or {}).items()
            if k not in _STANDARD_META and v is not None}
    extra = (info.vector or {}).get("extra") or {}
    if not (meta or extra or info.datasets):
        return []
    lines = ["## Training data and configuration", ""]
    if info.datasets:
        links = (f"[{d}](https://huggingface.co/datasets/{d})" for d in info.datasets)
        lines += ["Data: " + ", ".join(links), ""]
    if meta:
        lines += ["SAE (`cfg.json` metadata):", "", "```json",
                  json.dumps(meta, indent=2, default=str), "```", ""]
    if extra:
        lines += ["Steering vector (`steering_vector.json` extra):", "", "```json",
                  json.dumps(extra, indent=2, default=str), "```", ""]
    return lines


def _summary(info: CardInfo) -> list[str]:
    rows: list[tuple[str, Any]] = []
    model = info.model_name
    rows.append(("model", f"[{model}](https://huggingface.co/{model})" if model else "unknown"))
    rows.append(("hook point", f"`{info.hook_name}`" if info.hook_name else "unknown"))
    if info.sae:
        cfg = SAEConfig.from_saelens_dict(info.sae)
        rows += [("SAE architecture", cfg.architecture + (f" (k={cfg.k})" if cfg.k else "")),
                 ("d_in → d_sae", f"{cfg.d_in} → {cfg.d_sae}"), ("dtype", cfg.dtype),
                 ("subtracts b_dec from input", cfg.apply_b_dec_to_input)]
    if info.vector:
        v = info.vector
        rows += [("steering vector", f"{v.get('format', '?')}, {v.get('nnz', '?')} non-zero of "
                                     f"{v.get('d_sae', '?')} features"),
                 ("objective", v.get("objective")), ("sign convention", v.get("sign_convention"))]
        if v.get("sae"):
            rows.append(("vector's SAE", f"`{v['sae']}`"))
    return ["| | |", "|---|---|"] + [f"| {k} | {_fmt(v)} |" for k, v in rows if v is not None] + [""]


def _manifest_section(info: CardInfo) -> list[str]:
    """What a bundle's steerplug.json ships: its sites, gate and steering configuration."""
    man = info.manifest
    if not man:
        return []
    lines = ["## Steering bundle (`steerplug.json`)", "",
             "| site | SAE | vector |", "|---|---|---|"]
    lines += [f"| {i} | `{s.get('sae')}` | `{s.get('vector')}` |" for i, s in enumerate(man.get("sites", []))]
    built = man.get("built") or {}
    gate = built.get("gate") or {}
    facts = [f"- steering: `{json.dumps(man.get('steering', {}))}`"]
    if man.get("caa"):
        d = built.get("directions") or {}
        how = ""
        if d.get("kind") == "fitted":
            sweep = ", ".join(f"lr {r['lr']}: {r['clean']:.0%} clean, {r['looping']:.0%} looping"
                              for r in d.get("sweep", []))
            how = (f" (fitted to answer {d.get('target')!r}; strength lr {d.get('chosen_lr')} chosen on "
                   f"{d.get('val_prompts')} validation harmful prompts: {sweep})")
        facts.append(f"- activation-addition directions: `{man['caa']}`{how}")
    if man.get("gate"):
        reads = gate.get("reads", "sae")
        kind = f"MLP ({gate['hidden']} hidden)" if gate.get("hidden") else "logistic"
        if gate.get("hidden") and gate.get("ensemble", 1) > 1:
            kind = (f"mean of {gate['ensemble']} MLPs ({gate['hidden']} hidden each, dropout "
                    f"{gate.get('dropout', 0)} while training)")
        facts.append(f"- gate: `{man['gate']}`, {kind} on the {'residual stream' if reads == 'residual' else 'SAE features'}, "
                     f"pools {gate.get('pools')}, fire rates {gate.get('fire_rates')}")
        if gate.get("group_fire_rates"):
            val = {k.split("/", 1)[1]: v for k, v in gate["group_fire_rates"].items() if k.startswith("val_")}
            facts.append(f"- gate fire rates per validation set: {val}")
    if built.get("seconds"):
        facts.append(f"- built in {built['seconds']} s")
    return lines + [""] + facts + [""]


def _usage(info: CardInfo, repo_id: str) -> list[str]:
    sub_sae = f', subfolder="{BUNDLE_SAE_DIR}"' if info.kind == "bundle" else ""
    sub_vec = f', subfolder="{BUNDLE_VECTOR_DIR}"' if info.kind == "bundle" else ""
    model = info.model_name or "<model id>"
    lines = ["## How to load", "", "With steerplug:", "", "```python"]
    if info.manifest is not None:
        lines += ["from steerplug import SteeredModel", "",
                  "# every site, the gate and the steering configuration of steerplug.json",
                  f'steered = SteeredModel.from_pretrained("{model}", sae="{repo_id}")',
                  'print(steered.chat("How do I pick a lock?"))',
                  "print(steered.config)  # the shipped steering; keyword arguments override it"]
    elif info.kind == "bundle":
        lines += ["from steerplug import SteeredModel", "",
                  "steered = SteeredModel.from_pretrained(",
                  f'    "{model}", sae="{repo_id}", vector="{repo_id}",',
                  f'    sae_subfolder="{BUNDLE_SAE_DIR}", vector_subfolder="{BUNDLE_VECTOR_DIR}")',
                  'print(steered.chat("How do I pick a lock?"))']
    elif info.kind == "sae":
        lines += ["from steerplug import SparseAutoencoder", "",
                  f'sae = SparseAutoencoder.from_pretrained("{repo_id}")',
                  "features = sae.encode(hidden_states)  # (..., d_in) -> (..., d_sae)"]
    else:
        sae_ref = (info.vector or {}).get("sae") or "<SAE repo or folder>"
        lines += ["from steerplug import SteeredModel, SteeringVector", "",
                  f'vector = SteeringVector.from_pretrained("{repo_id}")',
                  f'steered = SteeredModel.from_pretrained("{model}", sae="{sae_ref}", vector=vector)',
                  'print(steered.chat("How do I pick a lock?"))']
    lines += ["```", ""]
    if info.kind in ("sae", "bundle"):
        lines += [f"The SAE is stored in SAELens 6 layout (`{SAE_CONFIG_NAME}` + `{SAE_WEIGHTS_NAME}`), "
                  "so SAELens reads it directly:", "", "```python",
                  "from huggingface_hub import snapshot_download", "from sae_lens import SAE", "",
                  f'path = snapshot_download("{repo_id}")'
                  + (f' + "/{BUNDLE_SAE_DIR}"' if info.kind == "bundle" else ""),
                  'sae = SAE.load_from_disk(path, device="cpu")', "```", ""]
    if info.kind == "bundle":
        lines += ["Each part loads alone too: "
                  f'`SparseAutoencoder.from_pretrained("{repo_id}"{sub_sae})`, '
                  f'`SteeringVector.from_pretrained("{repo_id}"{sub_vec})`.', ""]
    return lines


def render_model_card(info: CardInfo, repo_id: str, *, license: str = DEFAULT_LICENSE,
                      base_model: str | None = None, title: str | None = None,
                      description: str | None = None, tags: list[str] | None = None,
                      datasets: list[str] | None = None) -> str:
    """The README.md text: YAML front matter (rendered by huggingface_hub) + a markdown body."""
    from huggingface_hub import ModelCardData

    base_model = base_model or info.model_name
    kind_tags = {"sae": ["sparse-autoencoder", "sae_lens", "sae_lens-compatible"],
                 "steering-vector": ["steering-vector"],
                 "bundle": ["sparse-autoencoder", "steering-vector", "sae_lens", "sae_lens-compatible"]}
    all_tags = ["steerplug", *kind_tags[info.kind]]
    if info.sae:
        all_tags.append(SAEConfig.from_saelens_dict(info.sae).architecture)
    all_tags += [t for t in tags or [] if t not in all_tags]
    data = ModelCardData(library_name="steerplug", license=license, base_model=base_model,
                         tags=all_tags, datasets=(datasets or info.datasets) or None)
    what = {"sae": "A sparse autoencoder", "steering-vector": "A steering vector over SAE features",
            "bundle": "A sparse autoencoder and a steering vector over its features"
                      + (", with a prompt gate and the steering configuration to use them with"
                         if info.manifest else "")}[info.kind]
    hook = f" at `{info.hook_name}`" if info.hook_name else ""
    of_model = f" of [{base_model}](https://huggingface.co/{base_model})" if base_model else ""
    body = [f"# {title or repo_id.split('/')[-1]}", "",
            description or f"{what}{hook}{of_model}, made with steerplug: inference-time "
                           "steering of chat models by gradient steps on SAE features.", "",
            *_summary(info), *_manifest_section(info), *_training_section(info), *_metrics_section(info),
            *_usage(info, repo_id)]
    return f"---\n{data.to_yaml()}\n---\n\n" + "\n".join(body).rstrip() + "\n"


def write_model_card(folder: str | Path, repo_id: str | None = None, *,
                     license: str = DEFAULT_LICENSE, base_model: str | None = None,
                     title: str | None = None, description: str | None = None,
                     tags: list[str] | None = None, datasets: list[str] | None = None,
                     report: str | Path | None = None) -> Path:
    """Write ``folder/README.md`` for the artifact in ``folder``; uploads nothing.

    ``repo_id`` is used in the loading snippets (default: ``<your-name>/<folder name>``);
    ``report`` names a JSON of metrics (default: the first of :data:`REPORT_NAMES` found).
    """
    folder = Path(folder)
    info = gather_card_info(folder, report)
    text = render_model_card(info, repo_id or f"<your-name>/{folder.resolve().name}", license=license,
                             base_model=base_model, title=title, description=description,
                             tags=tags, datasets=datasets)
    path = folder / CARD_NAME
    path.write_text(text)
    return path


def push_folder(folder: str | Path, repo_id: str, *, private: bool | None = None,
                token: str | bool | None = None, revision: str | None = None,
                commit_message: str | None = None, create_pr: bool = False,
                overwrite_card: bool = False, **card_kwargs: Any) -> str:
    """Upload the artifact folder ``folder`` to the Hub model repo ``repo_id`` (created if absent).

    A ``README.md`` is written when the folder has none (or with ``overwrite_card=True``);
    ``card_kwargs`` go to :func:`write_model_card`. Nothing here loads the artifact: callers check
    that first (:func:`steerplug.push.push_to_hub`, the classes' ``push_to_hub``). Returns the
    commit URL.
    """
    folder = Path(folder)
    kind = artifact_kind(folder)
    if overwrite_card or not (folder / CARD_NAME).is_file():
        write_model_card(folder, repo_id, **card_kwargs)
    return upload_folder(folder, repo_id, kind=kind, private=private, token=token, revision=revision,
                         commit_message=commit_message, create_pr=create_pr)
