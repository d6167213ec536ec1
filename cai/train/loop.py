"""The one training loop SFT, reward model and DPO share, with exact resume.

1. Data order: epoch e visits the rows in `randperm(n, seed + e)`; micro-batch k of the run is
   therefore a pure function of (seed, k), so a resumed run sees exactly the batches it missed.
2. Each optimiser step accumulates `grad_accum` micro-batches, clips, steps. Its loss is the mean over
   all the step's tokens (SFT; pairs for rm/dpo), not a mean of micro-batch means: each micro-batch's
   loss is its share, its sum divided by the whole step's count (`Task.counts`).
3. Every `checkpoint_every` steps a checkpoint (`cai.train.checkpoint`) goes to OUT/checkpoint; a
   restarted run loads it and goes on, with the same losses as an uninterrupted run.
4. Metrics per step to OUT/metrics.jsonl, and to the experiment trackers of `report_to` (`cai.train.trackers`);
   the loss curve to OUT/loss.png at the end.

Runs on CPU (float32) and GPU (bfloat16 autocast; `precision`) from the same code; under `accelerate launch`
each process takes every world_size-th row of a micro-batch, its share of the step's count as above, and
scales it by world_size because DDP averages the gradients: the average is then the one-process
gradient, whatever the rows' lengths. A process with no row in a micro-batch still runs forward and
backward (DDP and FSDP need every process in the collectives), on one row at zero weight.
Under accelerate's FSDP (examples/accelerate/fsdp.yaml) the same loop shards the weights: every
process then gathers checkpoints and the final artefact with the others and evaluates with them.
"""

from __future__ import annotations

import json
import logging
import math
import random
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from cai.train.checkpoint import is_sharded, launch_record, resume, save_checkpoint, save_final, trainable_state
from cai.train.precision import autocast
from cai.train.settings import TrainJob
from cai.train.trackers import Trackers

logger = logging.getLogger(__name__)


@dataclass
class Task:
    """What a trainer supplies to the loop."""

    model: torch.nn.Module
    train_items: list
    loss: Callable[[torch.nn.Module, list, dict[str, float]], tuple[torch.Tensor, dict[str, float]]]
    """(model, micro-batch items, counts) -> (loss, metrics); items are collated inside. `counts` are the whole
    step's (`counts` of all its rows): loss and metrics are these items' shares, sums divided by them, so
    the shares of all micro-batches and processes add up to the step's means."""
    tokenizer: Any
    """The model's tokenizer, saved with the final artefact in OUT/final (`save_final`)."""
    evaluate: Callable[[torch.nn.Module], dict[str, float]] | None = None
    tokens: Callable[[list], int] = len
    counts: Callable[[list], dict[str, float]] = lambda items: {"rows": float(len(items))}
    """items -> what the loss averages over, summed (SFT: target tokens; rm: pairs; dpo: pairs and NLL tokens)."""


def micro_batches(n_items: int, cfg: TrainJob) -> list[list[int]]:
    """Every micro-batch of the run, in order: a pure function of the config (exact resume)."""
    out = []
    for epoch in range(cfg.epochs):
        order = torch.randperm(n_items, generator=torch.Generator().manual_seed(cfg.seed + epoch)).tolist()
        out += [order[i:i + cfg.batch_size] for i in range(0, n_items, cfg.batch_size)]
    return out


def total_steps(n_items: int, cfg: TrainJob) -> int:
    steps = math.ceil(len(micro_batches(n_items, cfg)) / cfg.grad_accum)
    return min(steps, cfg.max_steps) if cfg.max_steps else steps


def train(cfg: TrainJob, task: Task, out: Path) -> dict[str, Any]:
    from accelerate import Accelerator

    from cai.progress import progress_bar

    # Autocast is cai's own (cfg.precision), not accelerate's process-wide mixed_precision: stages of
    # one `cai run` may differ, and DPO's reference must run under exactly the policy's autocast.
    accelerator = Accelerator(mixed_precision="no")
    torch.manual_seed(cfg.seed)
    random.seed(cfg.seed)
    optimizer = torch.optim.AdamW([p for p in task.model.parameters() if p.requires_grad], lr=cfg.lr, weight_decay=cfg.weight_decay)
    model, optimizer = accelerator.prepare(task.model, optimizer)
    # Read after prepare: FSDP replaces the parameters by their shards (and the optimiser's with them).
    params = [p for p in model.parameters() if p.requires_grad]
    sharded = is_sharded(model)

    out.mkdir(parents=True, exist_ok=True)
    batches = micro_batches(len(task.train_items), cfg)
    steps = total_steps(len(task.train_items), cfg)
    ckpt = out / "checkpoint"
    metrics_path = out / "metrics.jsonl"
    step = resume(ckpt, accelerator.unwrap_model(model), optimizer, (metrics_path,), write=accelerator.is_main_process)[0]
    if step:
        logger.info("resuming from step %d of %d (%s)", step, steps, ckpt)

    model.train()
    with Trackers(cfg, out) as trackers, progress_bar("steps", disable=not accelerator.is_main_process) as bar:
        task_id = bar.add_task(f"{cfg.kind} steps", total=steps, completed=step, info="")
        while step < steps:
            step_started = time.perf_counter()
            window = batches[step * cfg.grad_accum:(step + 1) * cfg.grad_accum]
            # Every process holds every row, so each knows the whole step's counts without a collective.
            counts = task.counts([task.train_items[i] for ids in window for i in ids])
            sums: dict[str, float] = {}
            tokens = 0
            for ids in window:
                # Under accelerate launch each process takes its share of the micro-batch; one with none runs
                # a row at zero weight, since DDP/FSDP need every process's forward and backward.
                mine = ids[accelerator.process_index::accelerator.num_processes]
                weight = 1.0 if mine else 0.0
                items = [task.train_items[i] for i in mine or ids[:1]]
                with autocast(cfg.precision, accelerator.device):
                    loss, logged = task.loss(model, items, counts)
                accelerator.backward(loss * (weight * accelerator.num_processes))  # DDP averages: times world sums the shares
                for k, v in {"loss": loss.item(), **logged}.items():
                    sums[k] = sums.get(k, 0.0) + v * weight
                tokens += task.tokens(items) if mine else 0
            if accelerator.num_processes > 1:
                # Each process holds its shares of the step: their sums are the whole step's tokens and means.
                totals = accelerator.reduce(torch.tensor([float(tokens), *sums.values()], dtype=torch.float64,
                                                        device=accelerator.device), "sum")
                tokens = int(totals[0].item())
                sums = dict(zip(sums, totals[1:].tolist()))
            grad_norm = accelerator.clip_grad_norm_(params, cfg.max_grad_norm)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            record = {"step": step, **{k: round(v, 6) for k, v in sums.items()}, "grad_norm": round(float(grad_norm), 6),
                      "tokens": tokens, "seconds": round(time.perf_counter() - step_started, 4), "lr": cfg.lr,
                      "processes": accelerator.num_processes}
            if accelerator.is_main_process:
                with open(metrics_path, "a", encoding="utf-8") as f:
                    f.write(json.dumps(record) + "\n")
                trackers.log(record, step)
            bar.update(task_id, completed=step, info=f"loss {sums['loss']:.4f}")
            if step % cfg.checkpoint_every == 0 or step == steps:
                accelerator.wait_for_everyone()
                save_checkpoint(ckpt, accelerator.unwrap_model(model), optimizer, step, write=accelerator.is_main_process)

    accelerator.wait_for_everyone()
    summary: dict[str, Any] = {"steps": steps, **launch_record(accelerator, model)}
    unwrapped = accelerator.unwrap_model(model)
    unwrapped.eval()
    # Sharded weights: every process runs the evaluation's forward passes (they gather the layers together)
    # and the gathering of the trained weights; the main process alone writes.
    if task.evaluate is not None and (sharded or accelerator.is_main_process):
        with torch.no_grad(), autocast(cfg.precision, accelerator.device):  # evaluated as trained
            summary["eval"] = task.evaluate(unwrapped)
    weights = trainable_state(unwrapped) if sharded else None
    if accelerator.is_main_process:
        save_final(out / "final", unwrapped, task.tokenizer, weights)
        summary["loss_plot"] = str(plot_losses(metrics_path, out / "loss.png"))
        (out / "summary.json").write_text(json.dumps(summary, indent=2))
    return summary


def plot_losses(metrics_path: Path, png: Path, keys: tuple[str, ...] = ("loss",)) -> Path:
    """One panel per metric key (those present), against the step."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [json.loads(line) for line in metrics_path.read_text(encoding="utf-8").splitlines() if line.strip()]
    keys = tuple(k for k in keys if any(k in r for r in rows)) or ("loss",)
    fig, axes = plt.subplots(1, len(keys), figsize=(6 * len(keys), 3.5), squeeze=False)
    for ax, key in zip(axes[0], keys):
        have = [r for r in rows if key in r]
        ax.plot([r["step"] for r in have], [r[key] for r in have])
        ax.set_xlabel("step")
        ax.set_ylabel(key)
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(png, dpi=100)
    plt.close(fig)
    return png
