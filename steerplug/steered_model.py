"""``SteeredModel``: a Hugging Face causal LM with gradient steering through an SAE.

The model wrapper: it holds the model, its sites (:mod:`steerplug.sites`) and gate, builds each
site's step function from the maths (:mod:`steerplug.steering`) and installs them with
:mod:`steerplug.hooks`. Bundle folders (``steerplug.json``, the default artifacts) are read by
:mod:`steerplug.bundles`, whose names are re-exported here.
"""

from __future__ import annotations

import copy
import functools
import logging
import threading
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
from torch import nn

from steerplug.bundles import (DEFAULT_ARTIFACTS_DIRNAME, DEFAULT_ARTIFACTS_REPO, MANIFEST_NAME, STEERING_KEYS,
                               bundle_folder, default_artifacts_dir, load_bundle, load_manifest, load_sae, load_vector)
from steerplug.gate import PromptGate
from steerplug.hooks import CallState, HookHandle, install_hooks, make_gate_pass, make_steer_fn
from steerplug.layers import HookPoint, hidden_size, module_device, resolve_hook_point
from steerplug.models import DEFAULT_MODEL_ID, load_model
from steerplug.sae import SparseAutoencoder
from steerplug.sites import Site, is_fresh, site_stamp
from steerplug.steering import FeatureObjective, Objective, SteeringConfig, add_step, autograd_grad
from steerplug.vector import SteeringVector

__all__ = ["DEFAULT_ARTIFACTS_DIRNAME", "DEFAULT_ARTIFACTS_REPO", "MANIFEST_NAME", "Site", "SteeredModel",
           "default_artifacts_dir", "load_bundle", "load_manifest"]

logger = logging.getLogger(__name__)


def _as_list(x: Any) -> list:
    return list(x) if isinstance(x, (list, tuple)) else [x]


class SteeredModel:
    """Holds a causal LM, its tokenizer, one or more (SAE, steering vector) sites and an optional
    gate; steers ``generate`` and forward calls by steps on ``SAE.encode(h) . w`` at every site.

    ``sae`` / ``vector`` / ``hook`` take one object each, or lists (one site per entry, e.g. an SAE
    per layer). With a ``gate`` (:class:`~steerplug.gate.PromptGate`), each sequence's prompt is
    first scored unsteered at the gate's hook point and only rows the gate fires on are steered;
    the others run exactly as the unwrapped model.

    >>> steered = SteeredModel.from_pretrained()            # offline default model + artifacts
    >>> steered.chat([{"role": "user", "content": "How do I pick a lock?"}])
    >>> with steered.disabled():
    ...     steered.chat([{"role": "user", "content": "How do I pick a lock?"}])
    """

    def __init__(self, model: nn.Module, tokenizer: Any, sae: Any = None, vector: Any = None, *,
                 hook: Any = None, config: SteeringConfig | None = None, objective: Objective | None = None,
                 layers_path: str | None = None, gate: PromptGate | None = None,
                 directions: dict[str, torch.Tensor] | None = None):
        self.model = model
        self.tokenizer = tokenizer
        self.objective = objective
        self.config = config or SteeringConfig()
        self.gate = gate
        self._gate_point: HookPoint | None = None
        self._layers_path = layers_path
        self.sites: list[Site] = []
        self._local = threading.local()  # disabled() is per thread
        self._lock = threading.RLock()
        self._grad_fns: dict[Any, Any] = {}
        self._objectives: dict[tuple, tuple[tuple, FeatureObjective]] = {}
        saes = [] if sae is None else _as_list(sae)
        vectors = [] if vector is None else _as_list(vector)
        if not saes:
            if vectors or objective is not None or gate is not None:
                raise ValueError("A steering vector, objective or gate needs an SAE: pass sae=.")
            self._primary, self._bare_point = None, None
            return
        if not vectors and objective is None:
            raise ValueError("An SAE needs a steering vector (vector=) or an objective (objective=).")
        if vectors and len(vectors) != len(saes):
            raise ValueError(f"{len(saes)} SAEs but {len(vectors)} steering vectors: give one vector per SAE.")
        hooks = [None] * len(saes) if hook is None else _as_list(hook)
        if len(hooks) != len(saes):
            raise ValueError(f"{len(saes)} SAEs but {len(hooks)} hooks: give one hook per SAE (or none).")
        d_model = hidden_size(model)
        for i, (s, h) in enumerate(zip(saes, hooks)):
            v = vectors[i] if vectors else None
            self.sites.append(self._site(model, s, v, h, d_model, layers_path))
        names = [site.hook_point.name for site in self.sites]
        directions = dict(directions or {})
        for site in self.sites:
            key = site.sae.cfg.hook_name if site.sae.cfg.hook_name in directions else site.hook_point.name
            site.direction = directions.pop(key, None)
        for name, d in directions.items():  # directions elsewhere: sites that only method="add" uses
            point = resolve_hook_point(model, name, layers_path)
            if d.shape != (d_model,):
                raise ValueError(f"The direction for {name} has shape {tuple(d.shape)}; expected ({d_model},).")
            self.sites.append(Site(point, None, None, d))
            names.append(point.name)
        if len(set(names)) != len(names):
            raise ValueError(f"Two sites share a hook point ({names}): give each SAE its own hook.")
        primary = self.sites[0]
        if gate is not None and gate.reads == "residual":  # reads its own hook point (any layer), no SAE
            if gate.d_in != d_model:
                raise ValueError(f"The gate reads the residual stream of width {gate.d_in}, but the model's "
                                 f"hidden size is {d_model}: it was fitted on another model.")
        elif gate is not None:
            primary = next((site for site in self.sites if site.sae is not None and (
                site.sae.cfg.hook_name == gate.metadata.hook_name
                or site.hook_point.name == gate.metadata.hook_name)), None)
            if primary is None:
                raise ValueError(f"The gate reads {gate.metadata.hook_name!r}, but no SAE is hooked there "
                                 f"(sites: {names}): pass the SAE it was fitted on.")
            if gate.d_sae != primary.sae.d_sae:
                raise ValueError(f"The gate has d_sae={gate.d_sae} but the SAE at {primary.hook_point.name} "
                                 f"has d_sae={primary.sae.d_sae}: it was fitted on another SAE.")
        # The primary site: the gate's (if any), else the first; what tracing and the demo show.
        self._primary, self._bare_point = primary, None

    @property
    def sae(self) -> SparseAutoencoder | None:
        """The primary site's SAE (the gate's site if there is a gate, else the first)."""
        return self._primary.sae if self._primary else None

    @sae.setter
    def sae(self, value: SparseAutoencoder) -> None:
        self._primary.sae = value
        self.refresh()

    @property
    def vector(self) -> SteeringVector | None:
        """The primary site's steering vector."""
        return self._primary.vector if self._primary else None

    @vector.setter
    def vector(self, value: SteeringVector) -> None:
        self._primary.vector = value
        self.refresh()

    @property
    def hook_point(self) -> HookPoint | None:
        """The primary site's hook point (or one set by hand on a model without SAE, for baselines)."""
        return self._primary.hook_point if self._primary else self._bare_point

    @hook_point.setter
    def hook_point(self, value: HookPoint) -> None:
        if self._primary is not None:
            raise AttributeError("hook_point is the primary site's; build a new SteeredModel to move it.")
        self._bare_point = value

    @staticmethod
    def _site(model: nn.Module, sae: SparseAutoencoder, vector: SteeringVector | None, hook: Any,
              d_model: int, layers_path: str | None) -> Site:
        if sae.d_in != d_model:
            raise ValueError(
                f"The SAE reads d_in={sae.d_in} but {type(model).__name__} has hidden size {d_model}: "
                f"this SAE ({sae.cfg.hook_name or 'no hook recorded'}, model "
                f"{sae.cfg.model_name or 'unknown'}) was not trained on this model."
            )
        if vector is not None and vector.d_sae != sae.d_sae:
            raise ValueError(
                f"The steering vector has length d_sae={vector.d_sae} but the SAE has d_sae={sae.d_sae}."
            )
        if hook is None:
            hook = sae.cfg.hook_name
            if hook is None:
                raise ValueError("The SAE records no hook point: pass layer= or hook=.")
        elif sae.cfg.hook_name and isinstance(hook, int) and sae.cfg.layer not in (None, hook):
            warnings.warn(f"layer={hook} overrides the SAE's recorded hook {sae.cfg.hook_name!r}.",
                          stacklevel=3)
        return Site(resolve_hook_point(model, hook, layers_path), sae, vector)

    # --- construction ---------------------------------------------------------------------------
    @classmethod
    def from_pretrained(cls, model: Any = None, sae: Any = "default", vector: Any = "default", *,
                        layer: int | None = None, hook: str | None = None,
                        tokenizer: Any = None, sae_subfolder: str | None = None,
                        vector_subfolder: str | None = None, gate: Any = "default",
                        gate_subfolder: str | None = None, revision: str | None = None,
                        local_files_only: bool | None = None, cache_dir: str | Path | None = None,
                        objective: Objective | None = None,
                        layers_path: str | None = None, dtype: Any = None, device_map: Any = None,
                        model_kwargs: dict[str, Any] | None = None, **steering: Any) -> SteeredModel:
        """Load a model (Hub id, folder, built model, or None for the offline default) and wrap it.

        ``sae`` / ``vector`` / ``gate``: objects, folders or Hub repos (``*_subfolder`` picks one
        inside a repo); ``sae`` and ``vector`` may be lists, one per site. ``"default"`` means the
        artifacts steerplug ships for its default model (every site, the gate and the steering
        configuration they were measured with, from the folder's ``steerplug.json``), and nothing
        for any other model. A folder or repo holding a ``steerplug.json`` manifest may be given as
        ``sae=`` to load all of it (a folder, or a Hub repo through the cache or the Hub).
        Remaining keyword arguments are :class:`SteeringConfig` fields;
        they override the manifest's.
        """
        unknown = set(steering) - set(STEERING_KEYS)
        if unknown:
            raise TypeError(f"Unknown argument(s) {sorted(unknown)}; steering options are {STEERING_KEYS}.")
        is_default_model = model is None or model == DEFAULT_MODEL_ID
        hub = {"revision": revision, "local_files_only": local_files_only, "cache_dir": cache_dir}
        bundle_dir = None
        if isinstance(sae, (str, Path)) and sae_subfolder is None and sae != "default" and (
                found := bundle_folder(sae, **hub)) is not None:
            bundle_dir, sae = found, "default"
        elif "default" in (sae, vector, gate):
            bundle_dir = default_artifacts_dir() if is_default_model else None
            if is_default_model and bundle_dir is None:
                logger.warning("steerplug's default SAE and vector are not available here "
                               "(hub_artifacts/%s is missing): the model runs unsteered.",
                               DEFAULT_ARTIFACTS_DIRNAME)
        bundle = load_bundle(bundle_dir) if bundle_dir is not None else {}
        # The bundle's gate, directions and steering configuration belong to its SAEs: with other
        # SAEs (or sae=None) they are not used.
        own = bundle if sae == "default" else {}
        if sae == "default":
            sae = bundle.get("saes")
        if vector == "default":
            vector = bundle.get("vectors")
        if gate == "default":
            gate = own.get("gate")
        config = SteeringConfig(**{**own.get("steering", {}), **steering})
        sae_obj = None if sae is None else [load_sae(x, subfolder=sae_subfolder, **hub) for x in _as_list(sae)]
        vector_obj = (None if vector is None
                      else [load_vector(x, subfolder=vector_subfolder, **hub) for x in _as_list(vector)])
        gate_obj = (gate if gate is None or isinstance(gate, PromptGate)
                    else PromptGate.from_pretrained(gate, subfolder=gate_subfolder, **hub))
        model_kwargs = dict(model_kwargs or {})
        if local_files_only is not None:
            model_kwargs.setdefault("local_files_only", local_files_only)
        lm, tok = load_model(model, tokenizer, dtype=dtype, device_map=device_map,
                             revision=revision, cache_dir=cache_dir, **model_kwargs)
        where = hook if hook is not None else layer
        if where is not None and sae_obj is not None and len(sae_obj) > 1:
            raise ValueError("layer=/hook= picks the hook of a single SAE; this loads several. Drop it.")
        return cls(lm, tok, sae_obj, vector_obj, hook=where, config=config, objective=objective,
                   layers_path=layers_path, gate=gate_obj, directions=own.get("directions"))

    # --- state ----------------------------------------------------------------------------------
    @property
    def can_steer(self) -> bool:
        return self.hook_point is not None

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def _site_of(self, site: Site | None) -> Site:
        return site if site is not None else self._primary

    def feature_objective(self, device: torch.device | str | None = None,
                          site: Site | None = None) -> FeatureObjective:
        """The ``encode(h) . w`` objective of ``site`` (default: the primary one) on ``device`` (default:
        its layer's), built once per device and site; rebuilt when the site's SAE or vector changes."""
        site = self._site_of(site)
        device = torch.device(device) if device is not None else module_device(site.hook_point.module)
        key, stamp = (device, site.hook_point.name), site_stamp(site)
        entry = self._objectives.get(key)
        if not is_fresh(entry, stamp):
            entry = self._objectives[key] = (stamp, FeatureObjective(site.sae, site.vector, device))
        return entry[1]

    def refresh(self) -> None:
        """Forget every cached objective and step function (edits to a site also rebuild them)."""
        self._objectives.clear()
        self._grad_fns.clear()

    def _grad_fn(self, site: Site, config: SteeringConfig, device: torch.device):
        """The step function of ``site`` for ``config`` on ``device``, built once."""
        key, stamp = (site.hook_point.name, device, config.method, config.push_inactive), site_stamp(site)
        entry = self._grad_fns.get(key)
        if is_fresh(entry, stamp):
            return entry[1]
        if config.method == "add":  # _install only passes sites with a direction
            fn = add_step(site.direction)
        elif self.objective is not None:
            if config.push_inactive or config.method != "gradient":
                raise ValueError("push_inactive=True and method='target' apply to the encode(h) . w objective "
                                 "of a steering vector, not to a user objective=: drop one of them.")
            sae = site.sae
            if sae.W_enc.device != device or sae.W_enc.dtype != torch.float32:
                sae = copy.deepcopy(sae).to(device=device, dtype=torch.float32)  # the user's SAE stays as it is
            user = self.objective
            fn = lambda h: autograd_grad(h, lambda x: user(x, sae))  # noqa: E731
        else:
            objective = self.feature_objective(device, site)
            if config.method == "target":
                fn = objective.target_step
            elif config.push_inactive:
                fn = functools.partial(objective.grad, push_inactive=True)
            else:
                fn = objective.grad
        self._grad_fns[key] = (stamp, fn)
        return fn

    def _resolve_config(self, overrides: dict[str, Any]) -> SteeringConfig:
        given = {k: overrides.pop(k) for k in list(overrides) if k in STEERING_KEYS}
        return replace(self.config, **given) if given else self.config

    # --- hooks ----------------------------------------------------------------------------------
    def _active(self, config: SteeringConfig) -> bool:
        return getattr(self._local, "enabled", True) and self.can_steer and config.steps > 0

    def gate_pass(self, config: SteeringConfig | None = None):
        """The gate's pass for the hooks (None without a gate or with ``use_gate=False``)."""
        if self.gate is None or not (config or self.config).use_gate:
            return None
        return make_gate_pass(self.gate_point, self.gate_fires)

    def gate_fires(self, h: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
        """``(B,)`` bool, the rows fired on: ``h (B, T, D)`` at :attr:`gate_point`, ``keep (B, T)`` prompt."""
        return self.gate.fires(self.gate_inputs(h), keep)

    @property
    def gate_point(self) -> HookPoint | None:
        """Where the gate reads (its SAE's site, or its own hook for a residual gate); None without a gate."""
        if self.gate is None or self.gate.reads != "residual":
            return None if self.gate is None else self._site_of(None).hook_point
        if self._gate_point is None or self._gate_point.name != self.gate.metadata.hook_name:
            self._gate_point = resolve_hook_point(self.model, self.gate.metadata.hook_name, self._layers_path)
        return self._gate_point

    def gate_inputs(self, h: torch.Tensor) -> torch.Tensor:
        """``(B, T, D)`` at :attr:`gate_point` -> what the gate scores: SAE features, or the residual."""
        if self.gate.reads == "residual":
            return h.float()
        sae = self._gate_sae(h.device)
        B, T, D = h.shape
        return sae.encode(h.reshape(B * T, D).float()).reshape(B, T, -1)  # (B, T, F)

    def _gate_sae(self, device: torch.device) -> SparseAutoencoder:
        key = ("gate_sae", device)
        sae = self._grad_fns.get(key)
        if sae is None:
            sae = self.sae
            if sae.W_enc.device != device or sae.W_enc.dtype != torch.float32:
                sae = copy.deepcopy(sae).to(device=device, dtype=torch.float32)
            self._grad_fns[key] = sae
        return sae

    def _install(self, config: SteeringConfig, state: CallState) -> HookHandle:
        acting = [site for site in self.sites if site.acts_for(config.method)]
        if not acting:
            raise ValueError(f"method={config.method!r} has no site to act on: 'add' needs directions "
                             "(SteeredModel(..., directions={hook: tensor}) or a bundle with caa.safetensors).")
        sites = []
        for site in acting:
            # Looked up (and its cache stamp checked) once per device for this installation, not at
            # every layer call: edits to an SAE or vector take effect at the next call.
            fns: dict[torch.device, Any] = {}

            def grad_fn_for(device: torch.device, site: Site = site, fns: dict = fns) -> Any:
                fn = fns.get(device)
                if fn is None:
                    fn = fns[device] = self._grad_fn(site, config, device)
                return fn

            sites.append((site.hook_point, make_steer_fn(grad_fn_for, config, state, site.hook_point.name)))
        return install_hooks(self.model, sites, None, state, self.gate_pass(config))

    def hooks(self, state: CallState | None = None, **overrides: Any) -> HookHandle:
        """Install the steering hooks on ``self.model`` until ``handle.remove()`` (for use outside
        ``with``; prefer :meth:`steering`). ``state`` carries positions and per-row settings.
        Returns an empty handle when there is nothing to steer (no SAE, ``steps=0``, disabled)."""
        config = self._resolve_config(dict(overrides))
        if not self._active(config):
            return HookHandle([])
        return self._install(config, state or CallState())

    @contextmanager
    def steering(self, state: CallState | None = None, config: SteeringConfig | None = None,
                 **overrides: Any) -> Iterator[CallState]:
        """``with steered.steering(): model(...)`` steers the wrapped model's own calls (gated, if
        there is a gate). Calls from several threads take turns, unsteered ones too: hooks are per
        model, not per call, so an unsteered call running beside a steered one would be steered."""
        config = config or self._resolve_config(dict(overrides))
        state = state or CallState()
        with self._lock:
            if not self._active(config):
                yield state
                return
            with self._install(config, state):
                yield state

    @contextmanager
    def disabled(self) -> Iterator[None]:
        """Within this block (in this thread) the model runs exactly as unwrapped."""
        previous = getattr(self._local, "enabled", True)
        self._local.enabled = False
        try:
            yield
        finally:
            self._local.enabled = previous

    # --- the HF surface -------------------------------------------------------------------------
    def generate(self, input_ids: torch.Tensor | None = None, *,
                 row_lr: torch.Tensor | None = None, row_steps: torch.Tensor | None = None,
                 **kwargs: Any) -> torch.Tensor:
        """``model.generate`` with steering. Takes every HF argument (sampling, streamer, batches with
        left padding, ``use_cache``) plus per-call steering overrides (``steps=``, ``lr=``,
        ``positions=``, ...) and per-row ``row_lr`` / ``row_steps`` tensors of shape ``(B,)``."""
        config = self._resolve_config(kwargs)
        if input_ids is None:
            input_ids = kwargs.pop("inputs", None)
        if input_ids is None:
            raise ValueError("generate() needs input_ids.")
        prompt_len = input_ids.shape[1]
        state = CallState(gen_start=prompt_len - 1, prompt_end=prompt_len,
                          row_lr=row_lr, row_steps=row_steps)
        with self.steering(state, config):
            return self.model.generate(input_ids, **kwargs)

    def __call__(self, *args: Any, prompt_length: int | torch.Tensor | None = None, **kwargs: Any):
        """A forward pass with steering. ``prompt_length`` (int or per-row ``(B,)``) marks where the
        prompt ends; positions from ``prompt_length - 1`` on count as "generated". Without it the
        whole input is prompt."""
        config = self._resolve_config(kwargs)
        state = CallState()
        if prompt_length is not None:
            state.gen_start = (prompt_length - 1 if isinstance(prompt_length, int)
                               else torch.as_tensor(prompt_length) - 1)
            state.prompt_end = prompt_length
        with self.steering(state, config):
            return self.model(*args, **kwargs)

    forward = __call__

    def chat(self, messages: list[dict[str, str]] | str, *, max_new_tokens: int = 128,
             **kwargs: Any) -> str:
        """Answer a conversation (or one user message) through the chat template; greedy unless
        sampling arguments are given."""
        if isinstance(messages, str):
            messages = [{"role": "user", "content": messages}]
        enc = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True,
                                                 return_tensors="pt", return_dict=True)
        enc = {k: v.to(self.device) for k, v in enc.items()}
        kwargs.setdefault("do_sample", False)
        kwargs.setdefault("pad_token_id", self.tokenizer.pad_token_id)
        out = self.generate(**enc, max_new_tokens=max_new_tokens, **kwargs)
        return self.tokenizer.decode(out[0, enc["input_ids"].shape[1]:], skip_special_tokens=True)

    def __repr__(self) -> str:
        where = self.hook_point.name if self.hook_point else "nowhere (no SAE)"
        return (f"SteeredModel({type(self.model).__name__}, hook={where}, sae={self.sae!r}, "
                f"vector={self.vector!r}, config={self.config})")

