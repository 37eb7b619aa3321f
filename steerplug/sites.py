"""A steering site: one hook point with the SAE read there, the vector over its features and an
activation-addition direction; and the stamp that tells when something built from it is stale.

:class:`~steerplug.steered_model.SteeredModel` holds a list of sites and caches, per site and
device, the objective and step function it builds from them; :func:`site_stamp` and :func:`is_fresh`
decide when such a cached entry must be rebuilt.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from steerplug.layers import HookPoint
from steerplug.sae import SparseAutoencoder
from steerplug.vector import SteeringVector


@dataclass
class Site:
    """One place steering acts: a hook point with the SAE read there and the vector over its features."""

    hook_point: HookPoint
    sae: SparseAutoencoder | None
    """None at a site that only carries an activation-addition direction."""
    vector: SteeringVector | None
    direction: torch.Tensor | None = None
    """``(D,)`` residual direction for ``method="add"`` (activation addition), if any."""

    def acts_for(self, method: str) -> bool:
        """Whether this site steers under ``method``: ``add`` needs a direction, the others an SAE."""
        return self.direction is not None if method == "add" else self.sae is not None


def site_stamp(site: Site) -> tuple:
    """What a cached objective or step function of ``site`` was built from: the SAE, vector and
    direction objects (compared by identity, so a reused ``id()`` cannot match) and the version
    counters of their tensors (so an in-place edit invalidates it)."""
    tensors = []
    if site.sae is not None:
        tensors += list(site.sae.parameters())
    if site.vector is not None:
        tensors += [t for t in (site.vector.indices, site.vector.values, getattr(site.vector, "_dense", None))
                    if isinstance(t, torch.Tensor)]
    if site.direction is not None:
        tensors.append(site.direction)
    return (site.sae, site.vector, site.direction), tuple(t._version for t in tensors)


def is_fresh(entry: tuple | None, stamp: tuple) -> bool:
    if entry is None:
        return False
    (objs, versions), _ = entry
    return all(a is b for a, b in zip(objs, stamp[0])) and versions == stamp[1]
