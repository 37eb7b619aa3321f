"""``SteeredModel``: a Hugging Face causal LM with gradient steering through an SAE."""

from __future__ import annotations

import copy
import functools
import logging
import os
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
from torch import nn

from steerplug.hooks import CallState, HookHandle, hooks_installed, install_hooks, make_steer_fn
from steerplug.layers import HookPoint, hidden_size, module_device, resolve_hook_point
from steerplug.models import DEFAULT_MODEL_ID, load_model
from steerplug.sae import SparseAutoencoder
from steerplug.steering import FeatureObjective, Objective, SteeringConfig, autograd_grad
from steerplug.vector import SteeringVector

logger = logging.getLogger(__name__)

# The artifacts this project trains for its default model (see hub_artifacts/README.md).
DEFAULT_ARTIFACTS_REPO = "steerplug/SmolLM2-135M-Instruct-safety"
DEFAULT_ARTIFACTS_DIRNAME = "SmolLM2-135M-Instruct"
_STEERING_KEYS = tuple(SteeringConfig.__dataclass_fields__)


def default_artifacts_dir() -> Path | None:
    """The default model's SAE + vector folder: ``$STEERPLUG_ARTIFACTS``, else this checkout's
    ``hub_artifacts/``, else the Hugging Face cache of :data:`DEFAULT_ARTIFACTS_REPO`; None if absent."""
    candidates = []
    if os.environ.get("STEERPLUG_ARTIFACTS"):
        candidates.append(Path(os.environ["STEERPLUG_ARTIFACTS"]))
    candidates.append(Path(__file__).resolve().parent.parent / "hub_artifacts" / DEFAULT_ARTIFACTS_DIRNAME)
    for c in candidates:
        if (c / "sae").is_dir() and (c / "vector").is_dir():
            return c
    try:
        from steerplug.hub import resolve_folder

        return resolve_folder(DEFAULT_ARTIFACTS_REPO, local_files_only=True)
    except (OSError, ValueError):
        return None


def _load_sae(sae: Any, **kw: Any) -> SparseAutoencoder | None:
    if sae is None or isinstance(sae, SparseAutoencoder):
        return sae
    return SparseAutoencoder.from_pretrained(sae, **kw)


def _load_vector(vector: Any, **kw: Any) -> SteeringVector | None:
    if vector is None or isinstance(vector, SteeringVector):
        return vector
    if isinstance(vector, torch.Tensor):
        return SteeringVector(vector.numel(), weights=vector)
    return SteeringVector.from_pretrained(vector, **kw)


class SteeredModel:
    """Holds a causal LM, its tokenizer, an SAE and a steering vector; steers ``generate`` and
    forward calls at one hook point by gradient steps on ``SAE.encode(h) . w``.

    >>> steered = SteeredModel.from_pretrained()            # offline default model + artifacts
    >>> steered.chat([{"role": "user", "content": "How do I pick a lock?"}])
    >>> with steered.disabled():
    ...     steered.chat([{"role": "user", "content": "How do I pick a lock?"}])
    """

    def __init__(self, model: nn.Module, tokenizer: Any, sae: SparseAutoencoder | None = None,
                 vector: SteeringVector | None = None, *, hook: str | int | None = None,
                 config: SteeringConfig | None = None, objective: Objective | None = None,
                 layers_path: str | None = None):
        self.model = model
        self.tokenizer = tokenizer
        self.sae = sae
        self.vector = vector
        self.objective = objective
        self.config = config or SteeringConfig()
        self.hook_point: HookPoint | None = None
        self._enabled = True
        self._grad_fns: dict[Any, Any] = {}
        self._objectives: dict[tuple, FeatureObjective] = {}
        if sae is None:
            if vector is not None or objective is not None:
                raise ValueError("A steering vector or objective needs an SAE: pass sae=.")
            return
        if vector is None and objective is None:
            raise ValueError("An SAE needs a steering vector (vector=) or an objective (objective=).")
        d_model = hidden_size(model)
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
                          stacklevel=2)
        self.hook_point = resolve_hook_point(model, hook, layers_path)

    # --- construction ---------------------------------------------------------------------------
    @classmethod
    def from_pretrained(cls, model: Any = None, sae: Any = "default", vector: Any = "default", *,
                        layer: int | None = None, hook: str | None = None,
                        tokenizer: Any = None, sae_subfolder: str | None = None,
                        vector_subfolder: str | None = None, revision: str | None = None,
                        local_files_only: bool | None = None, cache_dir: str | Path | None = None,
                        objective: Objective | None = None,
                        layers_path: str | None = None, dtype: Any = None, device_map: Any = None,
                        model_kwargs: dict[str, Any] | None = None, **steering: Any) -> SteeredModel:
        """Load a model (Hub id, folder, built model, or None for the offline default) and wrap it.

        ``sae`` / ``vector``: objects, folders or Hub repos (``sae_subfolder`` / ``vector_subfolder``
        pick one inside a repo). ``"default"`` means the artifacts steerplug ships for its default
        model, and nothing for any other model. Remaining keyword arguments are
        :class:`SteeringConfig` fields (``steps``, ``lr``, ``positions``, ``normalize``, ``max_delta``).
        """
        unknown = set(steering) - set(_STEERING_KEYS)
        if unknown:
            raise TypeError(f"Unknown argument(s) {sorted(unknown)}; steering options are {_STEERING_KEYS}.")
        config = SteeringConfig(**steering)
        is_default_model = model is None or model == DEFAULT_MODEL_ID
        if sae == "default" or vector == "default":
            artifacts = default_artifacts_dir() if is_default_model else None
            if is_default_model and artifacts is None:
                logger.warning("steerplug's default SAE and vector are not available here "
                               "(hub_artifacts/%s is missing): the model runs unsteered.",
                               DEFAULT_ARTIFACTS_DIRNAME)
            if sae == "default":
                sae, sae_subfolder = (artifacts, "sae") if artifacts else (None, None)
            if vector == "default":
                vector, vector_subfolder = (artifacts, "vector") if artifacts else (None, None)
        hub = {"revision": revision, "local_files_only": local_files_only, "cache_dir": cache_dir}
        sae_obj = _load_sae(sae, subfolder=sae_subfolder, **hub)
        vector_obj = _load_vector(vector, subfolder=vector_subfolder, **hub)
        model_kwargs = dict(model_kwargs or {})
        if local_files_only is not None:
            model_kwargs.setdefault("local_files_only", local_files_only)
        lm, tok = load_model(model, tokenizer, dtype=dtype, device_map=device_map,
                             revision=revision, cache_dir=cache_dir, **model_kwargs)
        return cls(lm, tok, sae_obj, vector_obj, hook=hook if hook is not None else layer,
                   config=config, objective=objective, layers_path=layers_path)

    # --- state ----------------------------------------------------------------------------------
    @property
    def can_steer(self) -> bool:
        return self.hook_point is not None

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def _grad_fn_for(self, device: torch.device, push_inactive: bool = False):
        """The gradient function on ``device``, built once (the SAE maths runs in float32 there)."""
        if self.objective is None:
            grad = self.feature_objective(device).grad
            if not push_inactive:
                return grad
            key = (device, "push_inactive")
            if self._grad_fns.get(key) is None or self._grad_fns[key].func != grad:  # built once per objective
                self._grad_fns[key] = functools.partial(grad, push_inactive=True)
            return self._grad_fns[key]
        fn = self._grad_fns.get(device)
        if fn is None:
            sae = self.sae
            if sae.W_enc.device != device or sae.W_enc.dtype != torch.float32:
                sae = copy.deepcopy(sae).to(device=device, dtype=torch.float32)  # the user's SAE stays as it is
            user = self.objective
            fn = lambda h: autograd_grad(h, lambda x: user(x, sae))  # noqa: E731
            self._grad_fns[device] = fn
        return fn

    def _grad_fn_for_config(self, config: SteeringConfig):
        if not config.push_inactive:
            return self._grad_fn_for
        if self.objective is not None:
            raise ValueError("push_inactive=True applies to the encode(h) . w objective of a steering "
                             "vector, not to a user objective=: drop one of them.")
        return lambda device: self._grad_fn_for(device, push_inactive=True)

    def feature_objective(self, device: torch.device | str | None = None) -> FeatureObjective:
        """The ``encode(h) . w`` objective on ``device`` (default: the hooked layer's), built once
        per device, SAE and vector, and reused (by the hook, and for diagnostics)."""
        device = torch.device(device) if device is not None else module_device(self.hook_point.module)
        key = (device, id(self.sae), id(self.vector))
        objective = self._objectives.get(key)
        if objective is None:
            objective = self._objectives[key] = FeatureObjective(self.sae, self.vector, device)
        return objective

    def _resolve_config(self, overrides: dict[str, Any]) -> SteeringConfig:
        given = {k: overrides.pop(k) for k in list(overrides) if k in _STEERING_KEYS}
        return replace(self.config, **given) if given else self.config

    # --- hooks ----------------------------------------------------------------------------------
    def _active(self, config: SteeringConfig) -> bool:
        return self._enabled and self.can_steer and config.steps > 0

    def hooks(self, state: CallState | None = None, **overrides: Any) -> HookHandle:
        """Install the steering hooks on ``self.model`` until ``handle.remove()`` (for use outside
        ``with``; prefer :meth:`steering`). ``state`` carries positions and per-row settings."""
        config = self._resolve_config(dict(overrides))
        state = state or CallState()
        steer = make_steer_fn(self._grad_fn_for_config(config), config, state, self.hook_point.name)
        return install_hooks(self.model, self.hook_point, steer, state)

    @contextmanager
    def steering(self, state: CallState | None = None, config: SteeringConfig | None = None,
                 **overrides: Any) -> Iterator[CallState]:
        """``with steered.steering(): model(...)`` steers the wrapped model's own calls."""
        config = config or self._resolve_config(dict(overrides))
        state = state or CallState()
        if not self._active(config):
            yield state
            return
        steer = make_steer_fn(self._grad_fn_for_config(config), config, state, self.hook_point.name)
        with hooks_installed(self.model, self.hook_point, steer, state):
            yield state

    @contextmanager
    def disabled(self) -> Iterator[None]:
        """Within this block the model runs exactly as unwrapped."""
        previous, self._enabled = self._enabled, False
        try:
            yield
        finally:
            self._enabled = previous

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

