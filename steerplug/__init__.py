"""steerplug: inference-time steering of Hugging Face chat models through sparse autoencoders."""

from steerplug._version import __version__  # noqa: E402,F401

from steerplug.hooks import CallState, HookHandle  # noqa: E402
from steerplug.layers import HookPoint, HookPointError, find_blocks, resolve_hook_point  # noqa: E402
from steerplug.models import DEFAULT_MODEL_ID, load_model  # noqa: E402
from steerplug.sae import SAEConfig, SparseAutoencoder  # noqa: E402
from steerplug.steered_model import SteeredModel  # noqa: E402
from steerplug.steering import FeatureObjective, SteeringConfig, SteeringError, gradient_steer  # noqa: E402
from steerplug.vector import SteeringVector, VectorMetadata  # noqa: E402

__all__ = [
    "DEFAULT_MODEL_ID", "CallState", "FeatureObjective", "HookHandle", "HookPoint", "HookPointError",
    "SAEConfig", "SparseAutoencoder", "SteeredModel", "SteeringConfig", "SteeringError",
    "SteeringVector", "VectorMetadata", "__version__", "find_blocks", "gradient_steer",
    "load_model", "resolve_hook_point",
]
