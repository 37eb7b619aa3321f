"""``steerplug train``: the generic SAE training loop over stored activations.

Inputs are scaled by one constant ``s = sqrt(d_in) / mean ||x||`` (so E||s x||^2 ~ d_in) while
training; at the end the scale is folded into the weights (``W_enc * s``, ``W_dec / s``,
``b_dec / s``) so the saved SAE reads raw activations and its cfg says
``normalize_activations: none``. The data order is a function of ``seed`` and the step, so a run
resumed from a checkpoint continues exactly where it stopped.

Under ``torchrun`` the loop is data parallel (see :mod:`steerplug.distributed`): every rank reads
the same activations and draws the same global batch of ``batch_size`` rows; the trainer splits
the work on it over the ranks and exchanges what the step needs (see
:mod:`steerplug.pipeline.trainers`). The checkpoint holds
the global state only (weights, Adam moments, dead-latent counters, step), so a run resumes on
any number of ranks. Rank 0 alone writes checkpoints, the SAE, the log and the plot.

Output folder: ``cfg.json`` + ``sae_weights.safetensors`` (SAELens layout), ``training_log.json``,
``training_curves.png`` and, while training, ``checkpoint/``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, NamedTuple

import torch
from safetensors.torch import load_file, save_file

from steerplug._config import require_ints
from steerplug.distributed import Dist, setup
from steerplug.pipeline.trainers import EXCHANGES, SAETrainer, TrainerConfig, make_trainer
from steerplug.sae import SparseAutoencoder

CHECKPOINT_DIR = "checkpoint"
LOG_NAME = "training_log.json"
PLOT_NAME = "training_curves.png"


@dataclass
class TrainConfig:
    """The loop's settings (the algorithm's are in :class:`TrainerConfig`)."""

    batch_size: int = 1024
    """Tokens per optimiser step."""
    total_tokens: int = 2_000_000
    """Tokens seen in the whole run (epochs over the data as needed)."""
    normalize: bool = True
    """Scale inputs to E||x||^2 = d_in while training (folded into the saved weights)."""
    log_every: int = 25
    """Steps between log entries (and tqdm postfix updates)."""
    checkpoint_every: int = 200
    """Steps between checkpoints (0: never)."""
    seed: int = 0
    """Seed of the data order."""
    save_dtype: str = "float32"
    """Dtype of the saved SAE weights: float32, float16 or bfloat16."""
    progress: bool = True
    """Show a tqdm bar."""
    exchange: str = "auto"
    """TopK under ``torchrun``: what the ranks exchange each step, ``codes`` (all-gather the top-k
    codes, every rank computes the whole batch's sparse gradients), ``grads`` (all-reduce the
    gradients) or ``auto`` (codes for small batches); see :class:`~steerplug.pipeline.trainers.TopKTrainer`.
    Both give the one-process step, so it is not part of the checkpoint."""
    device: str | None = None
    """Where the SAE trains: ``cpu``, ``cuda``, ...; None: the CPU in one process, under ``torchrun``
    ``cuda:LOCAL_RANK`` when CUDA is available (the backend follows: nccl for CUDA, gloo for CPU)."""

    def __post_init__(self) -> None:
        require_ints(self, ("batch_size", "total_tokens", "log_every"))
        if self.checkpoint_every < 0:
            raise ValueError(f"TrainConfig.checkpoint_every={self.checkpoint_every!r}: expected >= 0.")
        if self.exchange not in EXCHANGES:
            raise ValueError(f"TrainConfig.exchange={self.exchange!r}: expected one of {EXCHANGES}.")
        if self.save_dtype not in ("float32", "float16", "bfloat16"):
            raise ValueError(f"TrainConfig.save_dtype={self.save_dtype!r}: expected float32, float16 or bfloat16.")

    @property
    def total_steps(self) -> int:
        return max(1, self.total_tokens // self.batch_size)


class TrainResult(NamedTuple):
    """What :func:`train_sae` returns."""

    sae: SparseAutoencoder
    """The trained SAE, reading raw (un-normalised) activations."""
    history: list[dict[str, float]]
    """Logged statistics (step, loss, mse, fve, l0, aux, dead_fraction, lr, tokens_per_s)."""
    scale: float
    """The input scale used while training (already folded into ``sae``)."""


def activation_scale(acts: torch.Tensor, n: int = 100_000, seed: int = 0) -> float:
    """``sqrt(d_in) / mean ||x||`` over a sample of ``n`` rows of ``acts (N, D)``."""
    g = torch.Generator().manual_seed(seed)
    idx = torch.randperm(acts.shape[0], generator=g)[:n]
    return math.sqrt(acts.shape[1]) / float(acts[idx].float().norm(dim=-1).mean())


@torch.no_grad()
def fold_scale(sae: SparseAutoencoder, scale: float) -> SparseAutoencoder:
    """An SAE trained on ``scale * x`` rewritten to read ``x`` and reconstruct ``x`` (in place)."""
    sae.W_enc.mul_(scale)
    sae.W_dec.div_(scale)
    sae.b_dec.div_(scale)
    if sae.threshold is not None:
        pass  # thresholds act on pre-activations, which do not change
    return sae


class _Batches:
    """Step -> batch indices: an independent permutation per epoch, seeded by (seed, epoch)."""

    def __init__(self, n: int, batch_size: int, seed: int):
        if n < batch_size:
            raise ValueError(f"Only {n} activation rows for batch_size={batch_size}: collect more or lower it.")
        self.n, self.bs, self.seed = n, batch_size, seed
        self.per_epoch = n // batch_size
        self._epoch, self._perm = -1, None

    def __call__(self, step: int) -> torch.Tensor:
        epoch, j = divmod(step, self.per_epoch)
        if epoch != self._epoch:
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            self._epoch, self._perm = epoch, torch.randperm(self.n, generator=g)
        return self._perm[j * self.bs:(j + 1) * self.bs]


def _save_checkpoint(folder: Path, trainer: SAETrainer, step: int, history: list, scale: float) -> None:
    tmp = folder.with_name(folder.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    save_file(trainer.state_tensors(), str(tmp / "state.safetensors"))
    (tmp / "state.json").write_text(json.dumps({
        "step": step, "scale": scale, "history": history, "scalars": trainer.state_scalars(),
        "trainer_config": asdict(trainer.cfg)}))
    shutil.rmtree(folder, ignore_errors=True)
    os.replace(tmp, folder)


def plot_history(history: list[dict[str, float]], path: str | Path, title: str = "") -> Path:
    """L0, MSE, FVE and dead fraction against the step, one panel each."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 4, figsize=(16, 3.4))
    steps = [h["step"] for h in history]
    for ax, key, label in zip(axes, ("l0", "mse", "fve", "dead_fraction"),
                              ("L0", "MSE (normalised)", "FVE", "dead fraction")):
        ax.plot(steps, [h[key] for h in history])
        ax.set_xlabel("step")
        ax.set_title(label)
        ax.grid(alpha=0.3)
    axes[1].set_yscale("log")
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return Path(path)


def train_sae(acts: torch.Tensor, trainer_cfg: TrainerConfig, cfg: TrainConfig | None = None,
              out_dir: str | Path | None = None, *, hook_name: str | None = None,
              model_name: str | None = None, metadata: dict[str, Any] | None = None,
              dist: Dist | None = None) -> TrainResult:
    """Train an SAE on ``acts (N, D)`` with the trainer ``trainer_cfg`` describes.

    With ``out_dir``: checkpoints every ``cfg.checkpoint_every`` steps (a later call with the same
    folder resumes, on any number of ranks), and at the end the SAE (SAELens folder), the log and
    the plot. ``dist``: this process's place in a data-parallel job; None: :func:`setup` (the
    ``torchrun`` group when there is one, else a single process). Every rank passes the same
    ``acts`` and gets the same SAE back.
    """
    from tqdm.auto import tqdm

    cfg = cfg or TrainConfig()
    dist = dist or setup(cfg.device)
    if cfg.batch_size < dist.world_size:
        raise ValueError(f"TrainConfig.batch_size={cfg.batch_size} is smaller than the {dist.world_size} ranks: "
                         "every rank needs at least one row of the global batch.")
    if acts.ndim != 2 or acts.shape[1] != trainer_cfg.d_in:
        raise ValueError(f"acts has shape {tuple(acts.shape)}; expected (N, d_in={trainer_cfg.d_in}).")
    if trainer_cfg.total_steps != cfg.total_steps:
        raise ValueError(f"TrainerConfig.total_steps={trainer_cfg.total_steps} differs from "
                         f"TrainConfig.total_steps={cfg.total_steps} (total_tokens // batch_size).")
    torch.manual_seed(cfg.seed)
    out = Path(out_dir) if out_dir is not None else None
    trainer = make_trainer(trainer_cfg, dist=dist, exchange=cfg.exchange)
    scale = activation_scale(acts, seed=cfg.seed) if cfg.normalize else 1.0
    batches = _Batches(acts.shape[0], cfg.batch_size, cfg.seed)
    history: list[dict[str, float]] = []
    start = 0
    ckpt = out / CHECKPOINT_DIR if out is not None else None
    if ckpt is not None and (ckpt / "state.json").is_file():
        state = json.loads((ckpt / "state.json").read_text())
        if state["trainer_config"] != asdict(trainer_cfg):
            raise ValueError(f"{ckpt} was written with another trainer config; use a fresh folder.")
        trainer.load_state(load_file(str(ckpt / "state.safetensors")), state["scalars"])
        start, scale, history = state["step"], state["scale"], state["history"]
    else:
        sample = acts[torch.randperm(acts.shape[0], generator=torch.Generator().manual_seed(cfg.seed))[:16384]]
        trainer.init_from_data(sample.float().to(dist.device) * scale)

    bar = tqdm(total=cfg.total_steps, initial=start, desc="train", unit="step",
               disable=not (cfg.progress and dist.is_main))
    t0, tok0 = time.perf_counter(), 0
    for step in range(start, cfg.total_steps):
        x = acts[batches(step)].to(dist.device).float() * scale  # (B, D) the global batch; the trainer splits it
        last = step == cfg.total_steps - 1
        logged = step % cfg.log_every == 0 or last
        stats = trainer.update(step, x, sync_stats=logged)
        tok0 += cfg.batch_size
        bar.update(1)
        if logged:
            dt = time.perf_counter() - t0
            entry = {"step": step, **stats._asdict(), "lr": trainer.cfg.learning_rate * trainer.lr_factor(step),
                     "tokens_per_s": tok0 / dt if dt > 0 else float("nan")}
            history.append(entry)
            bar.set_postfix(l0=f"{stats.l0:.1f}", fve=f"{stats.fve:.3f}", dead=f"{stats.dead_fraction:.3f}")
            if not all(math.isfinite(v) for v in stats):
                raise FloatingPointError(f"Training diverged at step {step}: {stats}. Lower lr.")
        if ckpt is not None and cfg.checkpoint_every and (step + 1) % cfg.checkpoint_every == 0 and not last:
            if dist.is_main:
                _save_checkpoint(ckpt, trainer, step + 1, history, scale)
            dist.barrier()
    bar.close()

    sae = fold_scale(trainer.sae.cpu(), scale)
    sae.cfg.hook_name = hook_name
    sae.cfg.model_name = model_name
    sae.cfg.metadata.update(metadata or {})
    sae.cfg.metadata["training"] = {"trainer": asdict(trainer_cfg), "loop": asdict(cfg),
                                    "input_scale_folded": scale, "n_rows": int(acts.shape[0]),
                                    "world_size": dist.world_size,
                                    "final": history[-1] if history else None}
    sae = sae.to(getattr(torch, cfg.save_dtype))
    if out is not None and dist.is_main:
        out.mkdir(parents=True, exist_ok=True)
        sae.save_pretrained(out)
        (out / LOG_NAME).write_text(json.dumps(history, indent=1))
        plot_history(history, out / PLOT_NAME, title=f"{trainer_cfg.architecture} SAE, d_sae={trainer_cfg.d_sae}"
                     + (f", k={trainer_cfg.k}" if trainer_cfg.architecture == "topk" else ""))
        shutil.rmtree(out / CHECKPOINT_DIR, ignore_errors=True)
    dist.barrier()  # the SAE is on disk before any rank returns
    return TrainResult(sae, history, scale)


# --- CLI ------------------------------------------------------------------------------------------
def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--acts", required=True, nargs="+",
                   help="activation folder(s) written by `steerplug collect` (concatenated)")
    p.add_argument("--out", required=True, help="output SAE folder (resumed from its checkpoint if any)")
    p.add_argument("--hook", default=None, help="which hook of the folder (default: its only one)")
    p.add_argument("--architecture", default="topk", choices=("topk", "relu"))
    p.add_argument("--d-sae", type=int, default=4608)
    p.add_argument("--k", type=int, default=32)
    p.add_argument("--lr", type=float, default=None)
    p.add_argument("--batch-size", type=int, default=1024)
    p.add_argument("--total-tokens", type=int, default=2_000_000)
    p.add_argument("--warmup-steps", type=int, default=100)
    p.add_argument("--decay-start", type=float, default=0.8)
    p.add_argument("--auxk-alpha", type=float, default=1 / 32)
    p.add_argument("--dead-tokens", type=int, default=100_000)
    p.add_argument("--l1-coeff", type=float, default=0.05)
    p.add_argument("--p-end", type=float, default=0.5)
    p.add_argument("--roles", default=None, help="comma-separated roles to train on (0 prompt, 1 answer, 2 text)")
    p.add_argument("--holdout-every", type=int, default=0,
                   help="hold out sequences with seq_id %% N == 0 (for evaluate-sae --heldout-acts); 0: none")
    p.add_argument("--keep-first", action="store_true", help="keep position 0 (attention sink); default drops it")
    p.add_argument("--max-norm-ratio", type=float, default=10.0,
                   help="drop rows whose norm exceeds this times the median (massive activations: a few "
                        "attention-sink tokens with 100x the usual norm); 0 keeps every row")
    p.add_argument("--save-dtype", default="float32", choices=("float32", "float16", "bfloat16"))
    p.add_argument("--checkpoint-every", type=int, default=200)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--exchange", default="auto", choices=EXCHANGES,
                   help="topk under torchrun: all-gather the top-k codes (codes) or all-reduce the gradients "
                        "(grads); auto: codes while batch-size x k <= 32 x d-sae (see BENCHMARKS.md, issue #14)")
    p.add_argument("--device", default=None,
                   help="cpu, cuda, ... (default: the CPU; under torchrun cuda:LOCAL_RANK when CUDA is available)")


def run(args: argparse.Namespace) -> int:
    """Under ``torchrun --nproc-per-node N``: data parallel over N ranks, global batch ``--batch-size``."""
    from steerplug.distributed import teardown
    from steerplug.pipeline.collect import load_activations, read_manifest

    roles = tuple(int(r) for r in args.roles.split(",")) if args.roles else None
    parts, hook, model_name = [], args.hook, None
    for folder in args.acts:
        man = read_manifest(folder)
        hook = hook or man["hooks"][0]
        if hook not in man["hooks"]:
            raise ValueError(f"{folder} has no activations of {hook!r} (it holds {man['hooks']}).")
        model_name = model_name or man.get("model_name")
        data = load_activations(folder, hook, skip_first=not args.keep_first, roles=roles)
        acts = data.acts
        if args.holdout_every:
            acts = acts[data.seq_ids % args.holdout_every != 0]
        parts.append(acts)
    acts = torch.cat(parts)
    n_massive = 0
    if args.max_norm_ratio:
        from steerplug.pipeline.recon import massive_mask

        big = massive_mask(acts.float().norm(dim=1), args.max_norm_ratio)
        n_massive = int(big.sum())
        acts = acts[~big]
    loop = TrainConfig(batch_size=args.batch_size, total_tokens=args.total_tokens, seed=args.seed,
                       checkpoint_every=args.checkpoint_every, save_dtype=args.save_dtype, device=args.device,
                       exchange=args.exchange)
    tcfg = TrainerConfig(d_in=acts.shape[1], d_sae=args.d_sae, total_steps=loop.total_steps,
                         architecture=args.architecture, k=args.k, lr=args.lr,
                         warmup_steps=args.warmup_steps, decay_start=args.decay_start,
                         auxk_alpha=args.auxk_alpha, dead_tokens=args.dead_tokens,
                         l1_coeff=args.l1_coeff, p_end=args.p_end, seed=args.seed)
    dist = setup(args.device)
    res = train_sae(acts, tcfg, loop, args.out, hook_name=hook, model_name=model_name,
                    metadata={"activations": [str(a) for a in args.acts], "n_train_tokens": int(acts.shape[0]),
                              "holdout_every": args.holdout_every, "max_norm_ratio": args.max_norm_ratio,
                              "massive_tokens_dropped": n_massive}, dist=dist)
    last = res.history[-1]
    if dist.is_main:
        print(f"saved {args.out}: L0 {last['l0']:.1f}, FVE {last['fve']:.3f}, dead {last['dead_fraction']:.3f} "
              f"(last training batch{f', {dist.world_size} ranks' if dist.active else ''})")
    teardown()
    return 0
