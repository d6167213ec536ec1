"""What every online RL algorithm shares. `RLTrainer.rollout` runs phases 1-3 of an iteration (sample the
batch and cut each response at its first EOS, score it, evaluate it under the policy and the reference; the
phases are spelled out in `cai.train.rl.ppo`); `RLTrainer.train` runs the loop around it: resume,
metrics.jsonl and samples.jsonl, checkpoints, the final adapter, the summary and the loss plot. An algorithm
subclasses it and writes `update`, the phases that turn a `Rollout` into a step of the policy.

Exact resume: iteration i's prompts and sampling seed are pure functions of (seed, i), and a row's sampled
tokens depend on its own position and query only (`SeededSampler`); a checkpoint holds the trainable
weights, optimiser and RNG states, and the algorithm's own state (`checkpoint_state`: the KL controller's).

Across processes (`accelerate launch` / `torchrun`, DDP or FSDP) each process samples, scores and
evaluates a contiguous share of the batch (`shard`), then the rollouts are gathered, so `update` and the
logged metrics see the whole batch, as one process would; only the main process writes files.
"""

from __future__ import annotations

import contextlib
import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from cai.train.adapters import adapter_disabled
from cai.train.checkpoint import is_sharded, launch_record, resume, save_checkpoint, save_final, trainable_state
from cai.train.losses import token_logprobs
from cai.train.precision import autocast, uses_bf16
from cai.train.rewards import Scorer, score_parts
from cai.train.rl import metrics as M
from cai.train.rl.math import at_temperature
from cai.train.rl.policy import Policy
from cai.train.rl.sampling import sample
from cai.train.rl.settings import RLJob, RLSettings

logger = logging.getLogger(__name__)


@dataclass
class Rollout:
    """One iteration's samples, their scores, and the policy's and reference's view of them (phases 1-3)."""

    iteration: int
    prompts: list[str]
    texts: list[str]  # the decoded responses, as scored
    full: torch.Tensor  # (B, Tq + R) left-padded query, then response
    full_mask: torch.Tensor  # (B, Tq + R)
    responses: torch.Tensor  # (B, R), padded after the first EOS
    mask: torch.Tensor  # (B, R) 1 up to and including EOS
    has_eos: torch.Tensor  # (B,)
    raw_scores: torch.Tensor  # (B,) the scorer's
    scores: torch.Tensor  # (B,) after the missing-EOS penalty
    logprobs: torch.Tensor  # (B, R) old log-probs, at the sampling temperature
    values: torch.Tensor | None  # (B, R), when the policy has a value head
    ref_logprobs: torch.Tensor  # (B, R)
    gold: float | None  # the judge's mean score of these samples, when asked for this iteration
    started: float
    rollout_s: float  # phase 1, sampling
    score_s: float  # phase 2
    evaluate_s: float  # phase 3, and the gather across processes
    parts: dict[str, torch.Tensor] = field(default_factory=dict)  # name -> (B,) the reward's parts (`score_parts`), NaN where none


class RLTrainer:
    """Online RL over `prompts` for `policy`, scored by `scorer`; everything it needs is passed in
    (`cai.train.rl.build.build_rl_trainer`). A subclass writes `update` and sets the class attributes below."""

    name = "rl"
    """The algorithm, as the progress bar and the log name it."""
    has_value_head = False
    """Whether the algorithm's policy carries a value head (PPO's critic)."""
    plot_keys: tuple[str, ...] = (M.SCORES, M.KL)
    """The metrics drawn in loss.png."""

    def __init__(self, cfg: RLJob, *, policy: Policy, tokenizer, prompts: list[str], scorer: Scorer,
                 gold_scorer: Scorer | None = None, vllm=None, accelerator=None):
        from accelerate import Accelerator

        from cai.models import stop_token_ids

        self.cfg, self.out = cfg, Path(cfg.out)
        # Autocast is cai's own (cfg.precision), as in the SFT/RM/DPO loop.
        self.accelerator = accelerator or Accelerator(mixed_precision="no")
        self.world, self.rank = self.accelerator.num_processes, self.accelerator.process_index
        check_processes(cfg, self.world, vllm is not None, self.group_size)
        self.model, self.tokenizer, self.prompts = policy, tokenizer, prompts
        self.scorer, self.gold_scorer, self.vllm = scorer, gold_scorer, vllm
        self.device = next(policy.parameters()).device
        self.stop_ids = stop_token_ids(tokenizer, policy.lm.generation_config)  # both rollout backends stop on these
        # `self.model` is the policy itself (sampling, no-grad passes, saving); `self.trained` the module the
        # update runs through: the same one in one process, accelerate's DDP wrapper of it in several (under
        # FSDP the policy itself, its weights replaced by shards).
        optimizer = torch.optim.AdamW([p for p in policy.parameters() if p.requires_grad], lr=cfg.lr, eps=1e-5)
        self.trained, self.optimizer = self.accelerator.prepare(policy, optimizer)
        self.params = [p for p in self.trained.parameters() if p.requires_grad]  # after prepare: FSDP's shards
        self.sharded = is_sharded(self.model)
        if cfg.merged_rollouts and (self.sharded or uses_bf16(cfg.precision, self.device)):  # see sampling.merged_adapter
            logger.info("%s: weights sharded (FSDP) or in bf16: rollouts sample through the unmerged adapter", self.name)
        self.kl_ctl = cfg.controller()
        self.queries = [self._encode_query(p) for p in prompts]

    def close(self) -> None:
        """Stop the vLLM engine and close the judge connection, if any."""
        if self.vllm is not None:
            self.vllm.close()
            self.vllm = None
        for scorer in (self.scorer, self.gold_scorer):
            judge = getattr(scorer, "judge", None)
            if judge is not None:
                judge.close()

    def _encode_query(self, prompt: str) -> list[int]:
        text = self.tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True)
        return self.tokenizer.encode(text, add_special_tokens=False)[-self.cfg.max_prompt_length:]

    @property
    def group_size(self) -> int:
        """Answers sampled per prompt, in adjacent rows of the batch (a group-baseline algorithm's K); 1 here."""
        return 1

    def prompt_indices(self, iteration: int) -> list[int]:
        """The prompts of iteration `iteration` (0-based), one per row of the batch: batch_size / group_size prompts,
        read in order from epochs of seeded permutations, each repeated group_size times in adjacent rows. A row's
        sampling key is its position in this list, so a group's rows still sample distinct responses."""
        n, k = len(self.prompts), self.group_size
        g = self.cfg.batch_size // k
        out = []
        for i in range(iteration * g, (iteration + 1) * g):
            epoch, pos = divmod(i, n)
            out += [torch.randperm(n, generator=torch.Generator().manual_seed(self.cfg.seed + epoch))[pos].item()] * k
        return out

    def shard(self) -> slice:
        """This process's rows of every batch: a contiguous share, in process order (as `gather` concatenates)."""
        share = self.cfg.batch_size // self.world
        return slice(self.rank * share, (self.rank + 1) * share)

    def batch_queries(self, idx: list[int], width: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """The queries of prompts `idx`, left-padded to `width` (default the longest): ids and attention mask, (B, Tq) each."""
        width = width or max(len(self.queries[i]) for i in idx)
        query = torch.full((len(idx), width), self.tokenizer.pad_token_id, dtype=torch.long)
        query_mask = torch.zeros_like(query)
        for row, i in enumerate(idx):
            q = self.queries[i]
            query[row, width - len(q):] = torch.tensor(q)
            query_mask[row, width - len(q):] = 1
        return query.to(self.device), query_mask.to(self.device)

    def _autocast(self):
        return autocast(self.cfg.precision, self.device)

    # -- phases 1-3 ------------------------------------------------------------------------
    @contextlib.contextmanager
    def _gathered_for_sampling(self):
        """Under FSDP, while generate runs: the root unit's weights (embeddings, final norm, LM and value
        heads) gathered, since generate calls the LM directly and bypasses the root's own forward, which
        would gather them. With `gather_for_generation` every decoder layer also stays gathered after its
        first step (one all-gather per layer per rollout, not per decoding step), and all are freed after."""
        if not self.sharded:
            yield
            return
        from torch.distributed.fsdp import FSDPModule

        # FSDP takes the first unit to run a forward as its root; generate's first would be the embeddings'.
        self.model._get_fsdp_state()._lazy_init()  # a no-op once the root has run (torch has no public call)
        kept: dict[FSDPModule, bool] = {}
        if self.cfg.gather_for_generation:
            for unit in self.model.modules():
                if isinstance(unit, FSDPModule) and unit is not self.model:
                    # torch has no public getter for the flag; the setter below is public
                    kept[unit] = any(g._reshard_after_forward for g in unit._get_fsdp_state()._fsdp_param_groups)
                    unit.set_reshard_after_forward(False, recurse=False)
        self.model.unshard()
        try:
            yield
        finally:
            for unit, flag in kept.items():
                unit.reshard()
                unit.set_reshard_after_forward(flag, recurse=False)
            self.model.reshard()

    def rollout(self, iteration: int) -> Rollout:
        """Phases 1-3 on this process's share of the batch, then the whole batch gathered on every process."""
        cfg, tok = self.cfg, self.tokenizer
        started = time.perf_counter()
        every = self.prompt_indices(iteration)
        rows = self.shard()
        idx = every[rows]
        pad = tok.pad_token_id
        # 1. rollout: left-padded queries (B, Tq), padded to the whole batch's width so that every process's
        # rows line up; responses (B, R) cut after their first EOS. Row keys are positions in the whole batch.
        query, query_mask = self.batch_queries(idx, width=max(len(self.queries[i]) for i in every))
        sampling_seed = cfg.seed * 1_000_003 + iteration  # sampling is a function of (seed, iteration)
        responses = torch.full((len(idx), cfg.response_length), pad, dtype=torch.long, device=self.device)
        recorded = None  # (log-probs, values or None) read off generate's own decoding steps
        if self.vllm is not None:
            adapter = self.vllm.sync_adapter(self.model.lm.save_pretrained, self.out / "rollout-adapter", iteration)
            sampled = self.vllm.generate([self.queries[i] for i in idx], adapter, iteration, max_tokens=cfg.response_length,
                                         temperature=cfg.temperature, stop_ids=self.stop_ids, seed=sampling_seed + rows.start)
            for row, ids in enumerate(sampled):
                responses[row, :len(ids)] = torch.tensor(ids, dtype=torch.long)
        else:
            with torch.no_grad(), self._autocast(), self._gathered_for_sampling():
                generated, recorded = sample(self.model, query, query_mask, max_new_tokens=cfg.response_length,
                                             temperature=cfg.temperature, stop_ids=self.stop_ids, pad_id=pad, seed=sampling_seed,
                                             row_keys=torch.arange(rows.start, rows.stop),
                                             merged=cfg.merged_rollouts and not self.sharded, cache=cfg.rollout_cache,
                                             synced=self.sharded)
            responses[:, :generated.shape[1]] = generated
        is_eos = torch.isin(responses, torch.tensor(self.stop_ids, device=self.device))  # (B, R): any of the model's EOS ids
        has_eos = is_eos.any(1)
        first_eos = torch.where(has_eos, is_eos.int().argmax(1), cfg.response_length)  # (B,), R when there is none
        positions = torch.arange(cfg.response_length, device=self.device).unsqueeze(0)
        mask = (positions <= first_eos.unsqueeze(1)).long()  # (B, R): 1 up to and including EOS
        responses = torch.where(mask.bool(), responses, torch.full_like(responses, pad))
        rollout_s = time.perf_counter() - started

        # 2. score the decoded responses (text, so the reward model may use another tokenizer).
        texts = [tok.decode(r[m.bool()].tolist(), skip_special_tokens=True).strip() for r, m in zip(responses, mask)]
        prompts = [self.prompts[i] for i in idx]
        # first_row: the judge seeds a row's principle with its place in the whole batch, not in this process's share
        totals, parts = score_parts(self.scorer, prompts, texts, first_row=rows.start)
        raw_scores = torch.tensor(totals, dtype=torch.float32, device=self.device)
        scores = raw_scores.clone()
        if cfg.missing_eos_penalty is not None:
            scores = scores - cfg.missing_eos_penalty * (~has_eos).float()
        gold = None
        if self.gold_scorer is not None and iteration % cfg.gold_judge_every == 0:
            gold = torch.tensor(self.gold_scorer(prompts, texts, first_row=rows.start), dtype=torch.float32, device=self.device)
        score_s = time.perf_counter() - started - rollout_s

        # 3. log-probs (and values) of the samples under the policy (adapter on) and the reference (off).
        # With transformers rollouts the policy's come from the sampling steps themselves.
        full = torch.cat([query, responses], 1)
        full_mask = torch.cat([query_mask, mask], 1)
        with torch.no_grad(), self._autocast():
            logprobs, values, ref_logprobs = [], [], []
            n = len(idx)
            step = cfg.forward_batch_size or n  # fewer, larger no-grad passes are cheaper
            for mb in [torch.arange(i, min(i + step, n), device=self.device) for i in range(0, n, step)]:
                if recorded is None:
                    logits, v = self.model(full[mb], full_mask[mb], cfg.response_length)
                    logprobs.append(self._response_logprobs(logits, responses[mb]))
                    if v is not None:
                        values.append(v)
                with adapter_disabled(self.model):
                    ref_logits, _ = self.model(full[mb], full_mask[mb], cfg.response_length)
                ref_logprobs.append(self._response_logprobs(ref_logits, responses[mb]))
            ref_logprobs = torch.cat(ref_logprobs)
            if recorded is None:
                logprobs, values = torch.cat(logprobs), torch.cat(values) if values else None
            else:  # positions past the last generated step are masked; zeros fill them
                logprobs = torch.zeros_like(ref_logprobs)
                logprobs[:, :recorded[0].shape[1]] = recorded[0]
                values = None
                if recorded[1] is not None:
                    values = torch.zeros_like(ref_logprobs)
                    values[:, :recorded[1].shape[1]] = recorded[1]

        if self.world > 1:  # the whole batch on every process, rows in batch order
            from accelerate.utils import gather_object

            gather = self.accelerator.gather
            texts = gather_object(texts)
            full, full_mask, responses, mask = gather(full), gather(full_mask), gather(responses), gather(mask)
            has_eos = gather(has_eos.long()).bool()
            raw_scores, scores = gather(raw_scores), gather(scores)
            logprobs, ref_logprobs = gather(logprobs), gather(ref_logprobs)
            values = gather(values) if values is not None else None
            gold = gather(gold) if gold is not None else None
            parts = gathered_parts(gather_object([parts]), self.cfg.batch_size // self.world)
        gold_mean = None if gold is None else gold.mean().item()
        evaluate_s = time.perf_counter() - started - rollout_s - score_s
        return Rollout(iteration, [self.prompts[i] for i in every], texts, full, full_mask, responses, mask, has_eos, raw_scores,
                       scores, logprobs, values, ref_logprobs, gold_mean, started, rollout_s, score_s, evaluate_s,
                       {name: torch.tensor(v, dtype=torch.float32) for name, v in parts.items()})


    def _response_logprobs(self, logits: torch.Tensor, responses: torch.Tensor) -> torch.Tensor:
        """log pi(response_t | query, response_<t) at the sampling temperature. (B, R, V) -> (B, R)"""
        return token_logprobs(at_temperature(logits, self.cfg.temperature), responses)

    def minibatches(self, iteration: int, epoch: int) -> list[torch.Tensor]:
        """The `mini_batches` shuffled minibatches (rows of the whole batch) of one epoch of updates: a function of
        (seed, iteration, epoch), for exact resume. Each process takes its share of every one (PPO's phase 6)."""
        b, size = self.cfg.batch_size, self.cfg.batch_size // self.cfg.mini_batches
        order = torch.randperm(b, generator=torch.Generator().manual_seed(self.cfg.seed * 7919 + iteration * 131 + epoch))
        return [order[i:i + size].to(self.device) for i in range(0, b, size)]

    # -- what an algorithm writes ----------------------------------------------------------
    def update(self, r: Rollout) -> tuple[dict[str, Any], list[dict]]:
        """Train on rollout `r`: the record logged to metrics.jsonl (`rollout_record` in it) and the sample rows
        (`rollout_samples`)."""
        raise NotImplementedError(f"{type(self).__name__} must define update(rollout)")

    def rollout_record(self, r: Rollout) -> dict[str, Any]:
        """The metrics every algorithm logs of rollout `r`: scores, entropy, lengths, timings, the gold score.
        Called at the end of `update`, so `seconds` spans the whole iteration; the four `time/` entries split it
        into the phases (sampling, scoring, the policy's and reference's no-grad passes, the update)."""
        maskf = r.mask.float()
        seconds = time.perf_counter() - r.started
        record: dict[str, Any] = {
            M.ENTROPY: (-r.logprobs * maskf).sum(1).mean().item(),
            M.SCORES: r.raw_scores.mean().item(),
            M.SCORES_PENALISED: r.scores.mean().item(),
            M.LENGTH_MEAN: maskf.sum(1).mean().item(),
            M.EOS_RATE: r.has_eos.float().mean().item(),
            "tokens": int(r.full_mask.sum()),
            "processes": self.world,
            "time/rollout_s": round(r.rollout_s, 4),
            "time/score_s": round(r.score_s, 4),
            "time/evaluate_s": round(r.evaluate_s, 4),
            "time/update_s": round(seconds - r.rollout_s - r.score_s - r.evaluate_s, 4),
            "seconds": round(seconds, 4),
        }
        for name, values in r.parts.items():  # a part no row has this iteration (a principle not drawn) is absent
            record[f"reward/{name}"] = values.nanmean().item()
        if r.gold is not None:
            record[M.JUDGE_SCORE] = r.gold
            record[M.PROXY_SCORE] = r.raw_scores.mean().item()
        return record

    def rollout_samples(self, r: Rollout, seq_kl: torch.Tensor) -> list[dict]:
        """samples.jsonl's rows of rollout `r`: step, prompt, response, score and the response's KL (`seq_kl`, (B,))."""
        return [{"step": r.iteration + 1, "prompt": p, "response": t, "score": s, "kl": k}
                for p, t, s, k in zip(r.prompts, r.texts, r.raw_scores.tolist(), seq_kl.tolist())]

    def progress_info(self, record: dict[str, Any]) -> str:
        """What the progress bar shows after an iteration."""
        return f"score {record[M.SCORES]:.3f} kl {record[M.KL]:.3f}"

    def checkpoint_state(self) -> dict[str, Any]:
        """The algorithm's state a checkpoint holds beside the weights and optimiser (a subclass adds to it)."""
        return {"kl_ctl": self.kl_ctl.state_dict()}

    def load_checkpoint_state(self, state: dict[str, Any]) -> None:
        """Restore what `checkpoint_state` saved."""
        self.kl_ctl.load_state_dict(state["kl_ctl"])

    # -- the run -----------------------------------------------------------------------------
    def train(self) -> dict[str, Any]:
        """`iterations` of rollout then update, from the checkpoint in out/checkpoint when there is one; returns the summary."""
        from cai.progress import progress_bar
        from cai.train.loop import plot_losses
        from cai.train.trackers import Trackers

        cfg, out = self.cfg, self.out
        out.mkdir(parents=True, exist_ok=True)
        ckpt = out / "checkpoint"
        metrics_path, samples_path = out / "metrics.jsonl", out / "samples.jsonl"
        main = self.accelerator.is_main_process  # the one that writes; every process computes the same record
        start, extra = resume(ckpt, self.model, self.optimizer, (metrics_path, samples_path), write=main)
        if start:
            self.load_checkpoint_state(extra)
            logger.info("resuming %s from iteration %d of %d (%s)", self.name, start, cfg.iterations, ckpt)
        with Trackers(cfg, out) as trackers, progress_bar("iterations", disable=not main) as bar:
            task = bar.add_task(f"{self.name} iterations", total=cfg.iterations, completed=start, info="")
            for iteration in range(start, cfg.iterations):
                record, samples = self.update(self.rollout(iteration))
                if main:
                    with open(metrics_path, "a", encoding="utf-8") as f:
                        f.write(json.dumps({k: (round(v, 6) if isinstance(v, float) else v) for k, v in record.items()}) + "\n")
                    trackers.log(record, iteration + 1)
                    if (iteration + 1) % cfg.log_samples_every == 0 or iteration == 0:
                        with open(samples_path, "a", encoding="utf-8") as f:
                            f.writelines(json.dumps(s, ensure_ascii=False) + "\n" for s in samples[:4])
                        for s in samples[:2]:
                            logger.info("iteration %d  score %.3f  kl %.3f\n  prompt: %s\n  response: %s", s["step"], s["score"],
                                        s["kl"], s["prompt"][:200], s["response"][:300])
                    bar.update(task, completed=iteration + 1, info=self.progress_info(record))
                if (iteration + 1) % cfg.checkpoint_every == 0 or iteration + 1 == cfg.iterations:
                    # called by every process (under FSDP the state is gathered from all); the main one writes
                    save_checkpoint(ckpt, self.model, self.optimizer, iteration + 1, extra=self.checkpoint_state(), write=main)
        self.accelerator.wait_for_everyone()
        weights = trainable_state(self.model) if self.sharded else None  # a collective under FSDP
        if not main:
            return {"iterations": cfg.iterations, "process": self.rank}
        save_final(out / "final", self.model.lm, self.tokenizer, weights, value_head=self.model.value_head)
        plot_losses(metrics_path, out / "loss.png", keys=self.plot_keys)
        rows = [json.loads(line) for line in metrics_path.read_text(encoding="utf-8").splitlines() if line.strip()]
        summary = {"iterations": cfg.iterations, **launch_record(self.accelerator, self.model),
                   "first": rows[0] if rows else None, "last": rows[-1] if rows else None}
        (out / "summary.json").write_text(json.dumps(summary, indent=2))
        return summary


def check_processes(cfg: RLSettings, world: int, vllm: bool, group_size: int = 1) -> None:
    """Refuse, before any model loads, a batch that `world` processes cannot share (or vLLM rollouts across processes),
    or one that does not split into whole groups of `group_size` answers, on each process too."""
    from cai.errors import ConfigError

    if cfg.batch_size % group_size:
        raise ConfigError(f"batch_size ({cfg.batch_size}) counts answers and must be divisible by the {group_size} answers "
                          "sampled per prompt (--num-generations of grpo/rloo): change either")
    if world == 1:
        return
    if vllm:
        raise ConfigError(f"rollout_backend 'vllm' runs in one process; this launch has {world}. Use rollout_backend "
                               "'transformers' across processes, or launch one process")
    size = cfg.batch_size // cfg.mini_batches
    if cfg.batch_size % world or size < world:
        raise ConfigError(f"batch_size ({cfg.batch_size}) must be divisible by the {world} processes, with minibatches "
                               f"(batch_size / mini_batches = {size}) of at least {world} rows: each process takes its share")
    if (cfg.batch_size // world) % group_size:
        raise ConfigError(f"each of the {world} processes samples batch_size / {world} = {cfg.batch_size // world} answers, "
                          f"not whole groups of {group_size} answers per prompt: make batch_size a multiple of "
                          f"{world * group_size}")


def gathered_parts(shares: list[dict[str, list[float]]], rows: int) -> dict[str, list[float]]:
    """Every process's reward parts (`shares`, in process order, `rows` rows each) as parts of the whole batch: a part
    that some process lacks (a principle none of its rows was judged under) is NaN in that process's rows."""
    names = dict.fromkeys(name for share in shares for name in share)
    return {name: [v for share in shares for v in share.get(name, [float("nan")] * rows)] for name in names}
