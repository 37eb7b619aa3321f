"""Test helper, run under ``torchrun``: ``steerplug`` with a crash injected at a training step.

``python tests/dist_crash.py STEP train --acts ...`` runs ``steerplug train ...`` whose trainer
raises at optimiser step ``STEP`` on every rank, as a machine lost mid-run would end it.
"""

from __future__ import annotations

import sys

from steerplug.cli import main
from steerplug.pipeline import trainers


def _crash_at(step: int):
    real = trainers.TopKTrainer.update

    def update(self, s, x, **kwargs):
        if s == step:
            raise RuntimeError(f"injected crash at step {s}")
        return real(self, s, x, **kwargs)

    trainers.TopKTrainer.update = update


if __name__ == "__main__":
    _crash_at(int(sys.argv[1]))
    sys.exit(main(sys.argv[2:]))
