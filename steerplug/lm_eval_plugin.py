"""lm-evaluation-harness model ``steerplug``: any HF causal LM, steered while lm-eval scores it.

The only steerplug module that imports ``lm_eval`` (``pip install 'steerplug[eval]'``).

Command line (``steerplug-eval`` registers the model, then runs lm-eval's own CLI)::

    steerplug-eval --model steerplug --model_args steps=3,lr=0.25 \\
        --tasks steerplug_hellaswag --include_path evals --limit 100
    steerplug-eval --model steerplug --model_args pretrained=ORG/MODEL,sae=REPO,vector=REPO,steps=3 \\
        --tasks steerplug_harmful --include_path evals --apply_chat_template

Python::

    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager
    from steerplug.lm_eval_plugin import SteerplugLM

    lm = SteerplugLM(steps=3, lr=0.25, batch_size=8)          # offline default model + artifacts
    tm = TaskManager(include_path="evals", include_defaults=False)
    out = simple_evaluate(model=lm, tasks=["steerplug_hellaswag"], task_manager=tm, limit=100)

Model arguments: ``pretrained`` (default: steerplug's offline SmolLM2-135M-Instruct), ``sae``,
``sae_subfolder``, ``vector``, ``vector_subfolder`` (default: steerplug's artifacts for the default
model, nothing for any other), ``layer``, and the :class:`~steerplug.steering.SteeringConfig`
fields ``steps``, ``lr``, ``positions``, ``normalize``, ``max_delta``, ``answer_tokens``
(``none``: the whole answer). Baselines and gating
(:mod:`steerplug.interventions`): ``intervention=gradient|add|clamp``, ``add_vector`` (a
``.safetensors`` file holding ``vector``), ``add_scale``, ``clamp_value``, ``gate_threshold``.
Every other argument goes to lm-eval's ``HFLM`` unchanged (``batch_size``, ``device``, ``dtype``,
``parallelize``, ``max_length``, ...).

What "generated" means when lm-eval scores loglikelihoods
------------------------------------------------------------
``HFLM._model_call`` receives only the right-padded token batch, not where each context ends.
With ``positions="generated"`` this model steers, in each row, exactly the positions that predict
continuation tokens: from the last context token to the second-to-last continuation token. That is
what ``generate`` steers when the model produces the same continuation itself (the last prompt
position, then every new position), so a HellaSwag ending is scored under the same intervention
the model would apply while writing it; the context stays unsteered as the prompt does. The
context lengths come from the requests themselves (``_loglikelihood_tokens`` indexes every
request's input tokens); a batch this index does not know (``batch_size=auto`` probing) is steered
at every position. When lm-eval's logits cache merges requests sharing ``context + continuation[:-1]``
the longest continuation decides the steered span. ``positions="prompt"`` steers the context only,
``"all"`` every position.

``answer_tokens=N`` treats the continuation as the answer: only the positions predicting its first
``N`` tokens are steered (the last context token and the first ``N - 1`` continuation tokens;
with ``positions="all"`` also the context before them), as ``generate`` steers its first ``N``
new tokens. In ``generate_until`` the answer is the generated text, as in
:meth:`~steerplug.SteeredModel.generate`.

Caching: lm-eval's ``--use_cache`` keys on requests, not on model arguments. ``steerplug-eval``
appends a hash of the model arguments to the ``--use_cache`` path, so results are reused only
for the same model and steering configuration (:func:`config_hash`).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch

try:
    from lm_eval.api.registry import register_model
    from lm_eval.models.huggingface import HFLM
except ImportError as e:  # pragma: no cover - depends on the environment
    raise ImportError(
        "steerplug.lm_eval_plugin needs lm-evaluation-harness: pip install 'steerplug[eval]' "
        "(or: pip install 'lm-eval[hf]')."
    ) from e

from steerplug.distributed import env_world_size
from steerplug.hooks import CallState
from steerplug.interventions import Intervention, intervene, is_active
from steerplug.layers import resolve_hook_point
from steerplug.models import DEFAULT_MODEL_ID
from steerplug.sae import SparseAutoencoder
from steerplug.gate import PromptGate
from steerplug.steered_model import SteeredModel, default_artifacts_dir, load_bundle
from steerplug.steering import SteeringConfig
from steerplug.vector import SteeringVector

logger = logging.getLogger(__name__)

MODEL_NAME = "steerplug"  # lm-eval already owns "steered"
STEERING_ARGS = ("sae", "sae_subfolder", "vector", "vector_subfolder", "gate", "layer", "steps", "lr",
                 "positions", "normalize", "max_delta", "answer_tokens", "method", "use_gate", "intervention", "add_vector", "add_scale",
                 "clamp_value", "gate_threshold")


def _none(value: Any) -> Any:
    return None if isinstance(value, str) and value.lower() in ("none", "null", "") else value


def _bool(value: Any) -> bool:
    if isinstance(value, str):
        return value.strip().lower() in ("1", "true", "yes", "on")
    return bool(value)


def _int_or_none(name: str, value: Any) -> int | None:
    """A model argument that is an integer or none (``"3"`` from the command line is 3)."""
    value = _none(value)
    if value is None or isinstance(value, int) and not isinstance(value, bool):
        return value
    try:
        return int(str(value).strip())
    except ValueError:
        raise ValueError(f"{name}={value!r}: expected an integer >= 1, or none.") from None


def _default_pretrained() -> str:
    """The default model's Hub id if the HF cache has it, else steerplug's offline conversion."""
    from steerplug.models import default_model_ref

    return str(default_model_ref())


def _load_add_vector(value: Any) -> torch.Tensor | None:
    if value is None or isinstance(value, torch.Tensor):
        return value
    from safetensors.torch import load_file

    tensors = load_file(str(value))
    if "vector" not in tensors:
        raise ValueError(f"add_vector={value!r}: the file holds {sorted(tensors)}, expected 'vector'.")
    return tensors["vector"]


@register_model(MODEL_NAME)
class SteerplugLM(HFLM):
    """lm-eval's ``HFLM`` with steerplug steering (or a baseline intervention) on every model call."""

    def __init__(self, pretrained: Any = None, *, sae: Any = "default", sae_subfolder: str | None = None,
                 vector: Any = "default", vector_subfolder: str | None = None, gate: Any = "default",
                 layer: int | str | None = None, steps: int | None = None, lr: float | None = None,
                 positions: str | None = None, normalize: Any = None, max_delta: Any = "default",
                 answer_tokens: Any = "default",
                 method: str | None = None, use_gate: Any = None,
                 intervention: str = "gradient", add_vector: Any = None, add_scale: float = 1.0,
                 clamp_value: float | None = None, gate_threshold: float | None = None,
                 **kwargs: Any):
        pretrained = _none(pretrained)
        is_default = pretrained is None or pretrained == DEFAULT_MODEL_ID
        if is_default and isinstance(pretrained, (str, type(None))):
            pretrained = _default_pretrained()
        if "device" not in kwargs and not kwargs.get("parallelize"):
            kwargs["device"] = "cuda" if torch.cuda.is_available() else "cpu"
        on_cpu_ranks = (env_world_size() > 1 and isinstance(pretrained, str)
                        and str(kwargs.get("device", "cpu")).startswith("cpu"))
        if on_cpu_ranks:  # HFLM's Accelerator then joins the torchrun group over gloo (MULTI_CPU)
            os.environ.setdefault("ACCELERATE_USE_CPU", "true")
        super().__init__(pretrained=pretrained, **kwargs)
        if on_cpu_ranks:
            self._share_work_on_cpu()

        sae, vector, gate = _none(sae), _none(vector), _none(gate)
        bundle: dict[str, Any] = {}
        if "default" in (sae, vector, gate):
            artifacts = default_artifacts_dir() if is_default else None
            if is_default and artifacts is None:
                logger.warning("steerplug's default SAE and vector are not available "
                               "(hub_artifacts/ is empty): the model runs unsteered.")
            bundle = load_bundle(artifacts) if artifacts is not None else {}
        sae_obj = bundle.get("saes") if sae == "default" else (
            sae if isinstance(sae, SparseAutoencoder) or sae is None
            else SparseAutoencoder.from_pretrained(sae, subfolder=_none(sae_subfolder)))
        vec_obj = bundle.get("vectors") if vector == "default" else (
            vector if isinstance(vector, SteeringVector) or vector is None
            else SteeringVector.from_pretrained(vector, subfolder=_none(vector_subfolder)))
        own = bundle if sae == "default" else {}  # the bundle's gate, directions and config belong to its SAEs
        gate_obj = own.get("gate") if gate == "default" else (
            gate if isinstance(gate, PromptGate) or gate is None else PromptGate.from_pretrained(gate))
        layer = _none(layer)
        given = {"steps": None if steps is None else int(steps), "lr": None if lr is None else float(lr),
                 "positions": None if positions is None else str(positions),
                 "normalize": None if normalize is None else _bool(normalize),
                 "method": None if method is None else str(method),
                 "use_gate": None if use_gate is None else _bool(use_gate)}
        if max_delta != "default":
            given["max_delta"] = None if _none(max_delta) is None else float(max_delta)
        if answer_tokens != "default":
            given["answer_tokens"] = _int_or_none("answer_tokens", answer_tokens)
        self.steering_config = SteeringConfig(**{**own.get("steering", {}), **{
            k: v for k, v in given.items() if v is not None or k in ("max_delta", "answer_tokens")}})
        self.default_steering = self.steering_config
        """The configuration this model was built with (the bundle's, with any arguments given)."""
        self.intervention = Intervention(
            kind=str(intervention), add_vector=_load_add_vector(_none(add_vector)),
            add_scale=float(add_scale),
            clamp_value=None if _none(clamp_value) is None else float(clamp_value),
            gate_threshold=None if _none(gate_threshold) is None else float(gate_threshold))
        self.steered = SteeredModel(self.model, self.tokenizer, sae_obj, vec_obj, hook=layer,
                                    config=self.steering_config, gate=gate_obj,
                                    directions=own.get("directions"))
        if self.steered.hook_point is None and layer is not None:  # activation addition needs no SAE
            self.steered.hook_point = resolve_hook_point(self.model, layer)
        self._references = {"pretrained": pretrained if isinstance(pretrained, str) else
                            getattr(getattr(pretrained, "config", None), "name_or_path", None),
                            "sae": str(sae) if sae is not None else None, "sae_subfolder": sae_subfolder,
                            "vector": str(vector) if vector is not None else None,
                            "vector_subfolder": vector_subfolder, "layer": layer,
                            "gate": None if gate_obj is None else str(gate)}
        self._ll_index: dict[tuple[int, ...], int] | None = None
        if not self.active:
            logger.info("steerplug: steering is off (no SAE/vector or steps=0); this is plain HFLM.")

    def _share_work_on_cpu(self) -> None:
        """Data parallel on CPUs under ``torchrun``: each rank scores its share of the requests.

        lm-eval's ``HFLM`` shares requests between processes only when it counts several GPUs
        (``accelerate launch``); on CPUs every process would evaluate every request. Here each
        rank takes its share as ``HFLM`` does on GPUs, and lm-eval gathers the results over the
        process group. The steering state is per process, so per rank.
        """
        acc = getattr(self, "accelerator", None)
        if acc is not None and acc.num_processes > 1 and self._world_size == 1:
            self._rank, self._world_size = acc.process_index, acc.num_processes

    # --- state ----------------------------------------------------------------------------------
    @property
    def active(self) -> bool:
        return is_active(self.steered, self.steering_config, self.intervention)

    def describe(self) -> dict[str, Any]:
        """Model, artifacts and steering settings (what :func:`config_hash` hashes)."""
        from dataclasses import asdict

        return {"model": self._references, "hook": self.steered.hook_point.name
                if self.steered.hook_point else None,
                "steering": asdict(self.steering_config), "intervention": self.intervention.describe(),
                "active": self.active}

    def set_steering(self, config: SteeringConfig | None = None,
                     intervention: Intervention | None = None) -> None:
        """Switch to another steering configuration without reloading the model (for sweeps)."""
        self.steering_config = config or SteeringConfig(steps=0)
        self.intervention = intervention or Intervention()

    @contextmanager
    def _steer(self, state: CallState) -> Iterator[CallState]:
        if not self.active:
            yield state
            return
        with intervene(self.steered, state, self.steering_config, self.intervention):
            yield state

    # --- loglikelihood --------------------------------------------------------------------------
    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, override_bs=None):
        """Index every request's model input by its first continuation-predicting position."""
        if self.active and self.backend == "causal":
            index: dict[tuple[int, ...], int] = {}
            for _, ctx, cont in requests:
                inp = (ctx + cont)[-(self.max_length + 1):][:-1]
                start = max(len(inp) - len(cont), 0)
                key = tuple(inp)
                index[key] = min(start, index.get(key, start))
            self._ll_index = index
        try:
            return super()._loglikelihood_tokens(requests, disable_tqdm=disable_tqdm,
                                                 override_bs=override_bs)
        finally:
            self._ll_index = None

    def _row_starts(self, inps: torch.Tensor) -> torch.Tensor:
        """``(B,)`` first continuation-predicting position of each right-padded row (0 if unknown)."""
        starts = []
        index = self._ll_index or {}
        for row in inps.tolist():
            start = None
            while True:
                start = index.get(tuple(row))
                if start is not None or not row or row[-1] != 0:
                    break
                row.pop()  # right padding is zeros (lm-eval's pad_and_concat)
            starts.append(0 if start is None else start)
        return torch.tensor(starts, dtype=torch.long)

    def _model_call(self, inps: torch.Tensor, attn_mask: torch.Tensor | None = None,
                    labels: torch.Tensor | None = None) -> torch.Tensor:
        if not self.active or attn_mask is not None:  # seq2seq models are not steered
            return super()._model_call(inps, attn_mask=attn_mask, labels=labels)
        starts = self._row_starts(inps).to(inps.device)  # (B,)
        state = CallState(gen_start=starts, prompt_end=starts + 1)
        with self._steer(state):
            return super()._model_call(inps)

    # --- generation -----------------------------------------------------------------------------
    def _model_generate(self, context: torch.Tensor, max_length: int, stop: list[str],
                        **generation_kwargs: Any) -> torch.Tensor:
        T = context.shape[1]  # left-padded: every prompt ends at column T
        state = CallState(gen_start=T - 1, prompt_end=T)
        with self._steer(state):
            return super()._model_generate(context, max_length, stop, **generation_kwargs)


def config_hash(model_args: dict[str, Any] | str) -> str:
    """A short stable hash of a model-argument dict or ``k=v,...`` string (order-insensitive)."""
    if isinstance(model_args, str):
        from lm_eval.utils import simple_parse_args_string

        model_args = simple_parse_args_string(model_args)
    canon = json.dumps({k: str(v) for k, v in sorted(model_args.items())}, sort_keys=True)
    return hashlib.sha256(canon.encode()).hexdigest()[:16]


def _keyed_cache_argv(argv: list[str]) -> list[str]:
    """Append ``-<model>-<hash of model_args>`` to ``--use_cache PATH`` so configs never share a cache."""
    argv = list(argv)

    def value_of(flag: str) -> tuple[int, str] | None:
        for i, a in enumerate(argv):
            if a == flag and i + 1 < len(argv):
                return i + 1, argv[i + 1]
            if a.startswith(flag + "="):
                return i, a.split("=", 1)[1]
        return None

    cache = value_of("--use_cache")
    if cache is None:
        return argv
    model = value_of("--model")
    args = value_of("--model_args")
    key = config_hash(f"model={model[1] if model else 'hf'}," + (args[1] if args else ""))
    i, path = cache
    keyed = f"{path}-{key}"
    argv[i] = keyed if argv[i] == path else f"--use_cache={keyed}"
    Path(keyed).parent.mkdir(parents=True, exist_ok=True)
    return argv


def cli_main() -> None:
    """``steerplug-eval``: lm-eval's CLI with the ``steerplug`` model registered."""
    sys.argv = [sys.argv[0]] + _keyed_cache_argv(sys.argv[1:])
    from lm_eval.__main__ import cli_evaluate

    cli_evaluate()


if __name__ == "__main__":
    cli_main()
