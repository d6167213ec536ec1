"""The three trainers as `Task`s for the shared loop: SFT, reward model, DPO.

- sft: causal LM, loss on the assistant tokens only (a mean over all the step's tokens); saves a peft
  adapter (or the model).
- rm: sequence-classification head (one score) on a LoRA backbone, Bradley-Terry on soft labels;
  held-out accuracy, mean margin and calibration (ECE, Brier) in the summary.
- dpo: sigmoid DPO with soft labels; the reference log-probs come from the same weights before
  training (adapter disabled), so no second model copy is held. They are computed inside the
  loop, on the training device and under the same autocast as the policy, so at step 0 the
  policy's and the reference's log-probs are the same numbers and the implicit reward margin is 0.
  With rpo_alpha, the preferred answers' NLL is pooled over the step's tokens (`dpo_loss`).

Each loss is a share of its optimiser step (`Task.loss`): divided by the step's counts (`Task.counts`).
"""

from __future__ import annotations

import logging
import os
import random
from pathlib import Path

import torch

from cai.models import load_tokenizer, resolve_model
from cai.train.checkpoint import is_sharded
from cai.train.data import Pair, collate, load_rows, tokenise_pairs, tokenise_sft
from cai.train.loop import Task
from cai.train.losses import bradley_terry_loss, dpo_loss, sequence_logprobs, sft_loss
from cai.train.settings import TrainJob

logger = logging.getLogger(__name__)


def build_task(cfg: TrainJob, out: Path) -> Task:
    path = resolve_model(cfg.model).path
    tokenizer = load_tokenizer(path)
    rows = load_rows(cfg.data)
    rng = random.Random(cfg.seed)
    order = list(range(len(rows)))
    rng.shuffle(order)
    n_eval = int(len(rows) * cfg.eval_fraction)
    eval_rows, train_rows = [rows[i] for i in order[:n_eval]], [rows[i] for i in order[n_eval:]]
    build = {"sft": _sft, "rm": _rm, "dpo": _dpo}[cfg.kind]
    torch.manual_seed(cfg.seed)  # LoRA's A matrices and the reward head start from the seed
    task = build(cfg, path, tokenizer, train_rows, eval_rows, out)
    if cfg.gradient_checkpointing:
        from cai.train.recompute import recompute_layers

        recompute_layers(task.model)
    return task


def _lora(cfg: TrainJob, model, task_type: str):
    from peft import get_peft_model

    from cai.train.precision import trainable_in_fp32

    if not cfg.lora:
        return model
    return trainable_in_fp32(get_peft_model(model, cfg.peft_config(task_type)))


def _base_dtype(cfg: TrainJob) -> torch.dtype:
    """bf16 for LoRA's frozen base under bf16 autocast on this machine's device type; float32 otherwise
    (`cai.train.precision`). Not accelerate's PartialState: made here, before the loop's Accelerator, it would
    fix the launch's distributed state without the loop's settings."""
    from cai.train.precision import base_dtype

    return base_dtype(cfg.precision, torch.device("cuda" if torch.cuda.is_available() else "cpu"), frozen=cfg.lora)


def _device_batch(model, items, pad_id):
    batch = collate(items, pad_id)
    device = next(model.parameters()).device
    return {k: v.to(device) for k, v in batch.items()}


# -- SFT ----------------------------------------------------------------------------------


def _sft(cfg, path, tokenizer, train_rows, eval_rows, out) -> Task:
    from transformers import AutoModelForCausalLM

    model = _lora(cfg, AutoModelForCausalLM.from_pretrained(path, dtype=_base_dtype(cfg)), "CAUSAL_LM")
    train_items = tokenise_sft(train_rows, tokenizer, cfg.data, cfg.max_length)
    eval_items = tokenise_sft(eval_rows, tokenizer, cfg.data, cfg.max_length) if eval_rows else []
    pad = tokenizer.pad_token_id

    def counts(items):
        return {"tokens": float(sum(t.n_targets for t in items))}

    def loss(model, items, counts):
        b = _device_batch(model, items, pad)
        logits = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"], use_cache=False).logits
        return sft_loss(logits, b["input_ids"], b["loss_mask"], counts["tokens"]), {}

    def evaluate(model):
        if not eval_items:
            return {}
        whole = counts(eval_items)  # the held-out token mean, pooled over the chunks
        chunks = [eval_items[i:i + cfg.batch_size] for i in range(0, len(eval_items), cfg.batch_size)]
        return {"eval_loss": sum(loss(model, chunk, whole)[0].item() for chunk in chunks), "eval_rows": len(eval_items)}

    return Task(model, train_items, loss, tokenizer, evaluate, tokens=lambda items: sum(len(t.input_ids) for t in items),
                counts=counts)


# -- reward model ---------------------------------------------------------------------------


def _rm(cfg, path, tokenizer, train_rows, eval_rows, out) -> Task:
    from transformers import AutoModelForSequenceClassification
    from transformers.utils import logging as hf_logging

    level = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # the score head is new by design: transformers' "MISSING score.weight" report is no news
    try:
        base = AutoModelForSequenceClassification.from_pretrained(path, num_labels=1, dtype=_base_dtype(cfg))
    finally:
        hf_logging.set_verbosity(level)
    base.config.pad_token_id = tokenizer.pad_token_id
    model = _lora(cfg, base, "SEQ_CLS")  # SEQ_CLS keeps the new score head trainable
    train_items = tokenise_pairs(train_rows, tokenizer, cfg.data, cfg.max_length)
    eval_items = tokenise_pairs(eval_rows, tokenizer, cfg.data, cfg.max_length) if eval_rows else []
    pad = tokenizer.pad_token_id

    def rewards(model, items: list[Pair]) -> tuple[torch.Tensor, torch.Tensor]:
        b = _device_batch(model, [p.chosen for p in items] + [p.rejected for p in items], pad)
        r = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"], use_cache=False).logits.squeeze(-1).float()  # (2B,)
        return r[:len(items)], r[len(items):]

    def loss(model, items, counts):
        rc, rr = rewards(model, items)
        p = torch.tensor([it.p_chosen for it in items], device=rc.device)
        margin, n = (rc - rr).detach(), counts["pairs"]
        return bradley_terry_loss(rc, rr, p, n), {"accuracy": (margin > 0).sum().item() / n, "margin": margin.sum().item() / n}

    def evaluate(model):
        if not eval_items:
            return {}
        margins = []
        for i in range(0, len(eval_items), cfg.batch_size):
            rc, rr = rewards(model, eval_items[i:i + cfg.batch_size])
            margins += (rc - rr).tolist()
        return rm_metrics(margins, [p.p_chosen for p in eval_items], seed=cfg.seed)

    return Task(model, train_items, loss, tokenizer, evaluate,
                tokens=lambda items: sum(len(p.chosen.input_ids) + len(p.rejected.input_ids) for p in items),
                counts=lambda items: {"pairs": float(len(items))})


def rm_metrics(margins: list[float], p_chosen: list[float], seed: int = 0, bins: int = 5) -> dict[str, float]:
    """Held-out accuracy, mean margin, and calibration of sigmoid(margin) against the labels.

    Each pair is shown in a random orientation (seeded) so outcomes are both 0 and 1; the
    outcome is the label p_chosen (or 1 - p_chosen when flipped). ECE over `bins` equal-width bins.
    """
    rng = random.Random(seed)
    preds, outcomes = [], []
    for m, p in zip(margins, p_chosen):
        q = 1 / (1 + pow(2.718281828459045, -m))
        if rng.random() < 0.5:
            q, p = 1 - q, 1 - p
        preds.append(q)
        outcomes.append(p)
    n = len(preds)
    ece = 0.0
    for b in range(bins):
        idx = [i for i, q in enumerate(preds) if b / bins <= q < (b + 1) / bins or (b == bins - 1 and q == 1.0)]
        if idx:
            ece += len(idx) / n * abs(sum(preds[i] for i in idx) / len(idx) - sum(outcomes[i] for i in idx) / len(idx))
    return {
        "eval_pairs": n,
        # A tie (equal rewards) counts as half right, as a coin flip would.
        "accuracy": sum(0.5 if m == 0 else float((m > 0) == (p >= 0.5)) for m, p in zip(margins, p_chosen)) / n,
        "mean_margin": sum(margins) / n,
        "ece": ece,
        "brier": sum((q - o) ** 2 for q, o in zip(preds, outcomes)) / n,
    }


# -- DPO ------------------------------------------------------------------------------------


def _dpo(cfg, path, tokenizer, train_rows, eval_rows, out) -> Task:
    from transformers import AutoModelForCausalLM

    model = _lora(cfg, AutoModelForCausalLM.from_pretrained(path, dtype=_base_dtype(cfg)), "CAUSAL_LM")
    train_items = tokenise_pairs(train_rows, tokenizer, cfg.data, cfg.max_length)
    eval_items = tokenise_pairs(eval_rows, tokenizer, cfg.data, cfg.max_length) if eval_rows else []
    pad = tokenizer.pad_token_id

    def logps(model, items: list[Pair]) -> tuple[torch.Tensor, torch.Tensor]:
        b = _device_batch(model, [p.chosen for p in items] + [p.rejected for p in items], pad)
        lp = sequence_logprobs(model(input_ids=b["input_ids"], attention_mask=b["attention_mask"], use_cache=False).logits, b["input_ids"],
                               b["loss_mask"])
        return lp[:len(items)], lp[len(items):]

    reference = _Reference(cfg, logps, train_items + eval_items, out / "ref_logprobs.pt")

    def counts(items):
        return {"pairs": float(len(items)), "nll_tokens": float(sum(it.preferred.n_targets for it in items))}

    def loss(model, items, counts):
        pc, pr = logps(model, items)
        rc, rr = reference(model, items)
        p = torch.tensor([it.p_chosen for it in items], device=pc.device)
        tc = torch.tensor([it.chosen.n_targets for it in items], device=pc.device)
        tr = torch.tensor([it.rejected.n_targets for it in items], device=pc.device)
        value, metrics = dpo_loss(pc, pr, rc.to(pc.device), rr.to(pc.device), cfg.beta, p, cfg.rpo_alpha, tc, tr,
                                  pairs_total=counts["pairs"], nll_tokens_total=counts["nll_tokens"])
        return value, {k: v.item() for k, v in metrics.items()}

    def evaluate(model):
        if not eval_items:
            return {}
        whole = counts(eval_items)  # held-out means over all pairs (and NLL tokens), pooled over the chunks
        sums: dict[str, float] = {}
        for i in range(0, len(eval_items), cfg.batch_size):
            _, metrics = loss(model, eval_items[i:i + cfg.batch_size], whole)
            for k, v in metrics.items():
                sums[k] = sums.get(k, 0.0) + v
        return {f"eval_{k}": v for k, v in sums.items()}

    return Task(model, train_items, loss, tokenizer, evaluate,
                tokens=lambda items: sum(len(p.chosen.input_ids) + len(p.rejected.input_ids) for p in items), counts=counts)


class _Reference:
    """log ref(y) per pair: the same weights before any training, without a second model copy.

    Computed by the model the loop hands to the loss, inside the loop's autocast, so the reference
    runs on the same device at the same precision as the policy. With LoRA the reference is the
    base with the adapter disabled, which training never changes, so it is computed lazily for the
    pairs a batch needs. Training all weights changes the reference's own weights, so then every
    pair is computed at the first call, before the first optimiser step, and saved to `path` (a
    resumed run reads it back rather than recomputing from trained weights).
    """

    def __init__(self, cfg, logps, items: list[Pair], path: Path):
        self.cfg, self.logps, self.items, self.path = cfg, logps, items, path
        self.index = {id(p): i for i, p in enumerate(items)}
        self.values: dict[int, tuple[float, float]] = {}
        if not cfg.lora and path.exists() and len(saved := torch.load(path, weights_only=True)) == len(items):
            self.values = {i: tuple(v) for i, v in enumerate(saved.tolist())}

    def _compute(self, model, items: list[Pair], sharded: bool) -> None:
        from contextlib import nullcontext

        from cai.train.adapters import adapter_disabled

        base = getattr(model, "module", model)  # unwrap DDP under accelerate launch
        chunks = [items[i:i + self.cfg.batch_size] for i in range(0, len(items), self.cfg.batch_size)]
        if sharded:
            chunks += self._filler(base, len(chunks))
        was_training = base.training
        base.eval()
        with torch.no_grad(), (adapter_disabled(base) if self.cfg.lora else nullcontext()):
            for chunk in chunks:
                c, r = self.logps(base, chunk)
                for p, a, b in zip(chunk, c.tolist(), r.tolist()):
                    self.values[self.index[id(p)]] = (a, b)
        base.train(was_training)

    def _filler(self, model, mine: int) -> list[list[Pair]]:
        """Under FSDP each forward pass gathers the weights with the other processes, so every process
        runs as many reference passes as the busiest one (the pairs a process needs depend on which ones
        its earlier batches held). The extra passes fill the cache with pairs not yet computed."""
        import torch.distributed as dist

        count = torch.tensor([mine], device=next(model.parameters()).device)
        dist.all_reduce(count, op=dist.ReduceOp.MAX)
        todo = [p for p in self.items if self.index[id(p)] not in self.values] or self.items
        size = self.cfg.batch_size
        return [todo[(i * size) % len(todo):][:size] for i in range(int(count.item()) - mine)]

    def __call__(self, model, items: list[Pair]) -> tuple[torch.Tensor, torch.Tensor]:
        sharded = is_sharded(model)
        if not self.cfg.lora and not self.values:  # the first call, before any step: every pair, saved
            # This batch first and on its own: the same shapes as the policy's pass, so the same kernels.
            self._compute(model, items, sharded)
            self._compute(model, [p for p in self.items if self.index[id(p)] not in self.values], sharded)
            self.path.parent.mkdir(parents=True, exist_ok=True)
            tmp = self.path.with_name(f"{self.path.name}.{os.getpid()}.tmp")  # each process of a launch writes its own
            torch.save(torch.tensor([self.values[i] for i in range(len(self.items))]), tmp)
            os.replace(tmp, self.path)
        missing = [p for p in items if self.index[id(p)] not in self.values]
        if missing or sharded:  # under FSDP every process joins, with or without pairs of its own
            self._compute(model, missing, sharded)
        pairs = [self.values[self.index[id(p)]] for p in items]
        return torch.tensor([a for a, _ in pairs]), torch.tensor([b for _, b in pairs])
