"""The SAE pipeline: collect activations, train an SAE, evaluate it, find steering features.

Each step is a library function with a ``steerplug <step>`` subcommand:

- :mod:`~steerplug.pipeline.examples` — chat examples (question + given or generated answer) and texts
- :mod:`~steerplug.pipeline.collect` — per-token residual activations as sharded safetensors
- :mod:`~steerplug.pipeline.trainers` — TopK (+AuxK) and ReLU+L1 (p-annealing) SAE trainers
- :mod:`~steerplug.pipeline.train` — the generic training loop, normalisation, checkpoints
- :mod:`~steerplug.pipeline.evaluate` — L0 / FVE / dead latents / CE recovered / HellaSwag / probes
- :mod:`~steerplug.pipeline.features` — ranking features and building a steering vector
- :mod:`~steerplug.pipeline.artifacts` — the one command that builds the default artifacts
"""
