"""PPO with a KL penalty against the reference policy: `cai train ppo`.

The policy is the starting model (usually the SFT model) plus a fresh LoRA adapter; the reference
is the same weights with the adapter disabled, so no second copy is held. A value head (one linear
layer) reads the policy's last hidden state, so the critic shares the policy's forward pass
(`cai.train.rl.policy`). `run_ppo` builds the collaborators (policy, tokenizer, prompts, scorer,
the judge for gold scores, a vLLM engine) and hands them to `PPOTrainer`.

Each iteration, in this order (the numbered phases; `rollout` is 1-3, `update` 4-7):
1. rollout: sample `batch_size` responses with transformers' generate (in float32 the adapter merged
   into a temporary copy of the weights meanwhile) or vLLM, both stopping on the same EOS ids; cut each at
   its first EOS;
2. score: decode and score with the reward model, the judge or a rule; responses with no EOS
   lose `missing_eos_penalty`;
3. evaluate the samples: log-probs and values (adapter on; read off generate's own steps with
   transformers rollouts, a forward pass after vLLM's), reference log-probs (adapter off);
4. rewards: per-token -kl_coef * KL (k1 or k3), plus the score on the last token;
5. advantages: GAE, then whitened over the batch's response tokens;
6. `ppo_epochs` passes over `mini_batches` shuffled minibatches: clipped policy loss, clipped
   value loss, optional entropy bonus (dropout off throughout);
7. the KL controller (fixed or adaptive) sees the batch's KL.

Exact resume: iteration i's prompts, sampling seed and minibatch order are pure functions of
(seed, i), and a row's sampled tokens depend on its own position and query only (`SeededSampler`);
a checkpoint holds the trainable weights, optimiser, KL controller and RNG states.

Several processes (`accelerate launch` / `torchrun`; accelerate's DDP): each process samples, scores
and evaluates a contiguous share of the batch (phases 1-3), then the rollouts are gathered, so phases
4, 5 and 7 (rewards, whitening, KL controller) and the logged metrics see the whole batch, as one
process would. In phase 6 each process takes its share of every minibatch and scales its token mean
by its share of the minibatch's tokens, so the gradients DDP averages are exactly the one-process
minibatch's. Only the main process writes metrics, samples and checkpoints; a checkpoint does not
depend on the process count.

Under accelerate's FSDP (examples/accelerate/fsdp.yaml) the weights are sharded across the processes
and the same phases run: sampling gathers each layer as generate reaches it (the adapter is then not
merged; generate keeps stepping until every process's rows have ended, since each step is a
collective), and checkpoints and the final adapter are gathered whole (`cai.train.checkpoint`).

    cai train ppo --model runs/demo/sft/merged --reward runs/demo/rm/final --prompts donotanswer --out runs/ppo
    # on a GPU node the same command runs in bfloat16 autocast (precision: auto).
"""

from __future__ import annotations

import contextlib
import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from cai.train.rl import metrics as M
from cai.train.adapters import adapter_disabled
from cai.train.checkpoint import is_sharded, launch_record, resume, save_checkpoint, save_final, trainable_state
from cai.train.losses import masked_mean, token_logprobs
from cai.train.rl.math import entropy_from_logits, gae, kl_penalised_rewards, kl_per_token, masked_whiten, policy_loss, value_loss
from cai.train.rl.policy import PolicyWithValue
from cai.train.rl.sampling import sample
from cai.train.rl.settings import PPOJob
from cai.train.precision import autocast, uses_bf16
from cai.train.rewards import Scorer

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
    values: torch.Tensor  # (B, R)
    ref_logprobs: torch.Tensor  # (B, R)
    gold: float | None  # the judge's mean score of these samples, when asked for this iteration
    started: float
    rollout_s: float
    score_s: float


class PPOTrainer:
    """PPO over `prompts` for `policy`, scored by `scorer`; everything it needs is passed in (see `run_ppo`)."""

    def __init__(self, cfg: PPOJob, *, policy: PolicyWithValue, tokenizer, prompts: list[str], scorer: Scorer,
                 gold_scorer: Scorer | None = None, vllm=None, accelerator=None):
        from accelerate import Accelerator

        from cai.models import stop_token_ids

        self.cfg, self.out = cfg, Path(cfg.out)
        # Autocast is cai's own (cfg.precision), as in the SFT/RM/DPO loop.
        self.accelerator = accelerator or Accelerator(mixed_precision="no")
        self.world, self.rank = self.accelerator.num_processes, self.accelerator.process_index
        check_processes(cfg, self.world, vllm is not None)
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
            logger.info("ppo: weights sharded (FSDP) or in bf16: rollouts sample through the unmerged adapter")
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

    def prompt_indices(self, iteration: int) -> list[int]:
        """The prompts of iteration `iteration` (0-based): epochs of seeded permutations, read in order."""
        n, b = len(self.prompts), self.cfg.batch_size
        out = []
        for k in range(iteration * b, (iteration + 1) * b):
            epoch, pos = divmod(k, n)
            out.append(torch.randperm(n, generator=torch.Generator().manual_seed(self.cfg.seed + epoch))[pos].item())
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

    # -- one iteration ---------------------------------------------------------------------
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

    def ppo_iteration(self, iteration: int) -> tuple[dict[str, float], list[dict]]:
        """Phases 1-7: the logged record and a few (prompt, response, score, kl) samples."""
        return self.update(self.rollout(iteration))

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
        recorded = None  # (log-probs, values) read off generate's own decoding steps
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
        raw_scores = torch.tensor(self.scorer(prompts, texts, first_row=rows.start), dtype=torch.float32, device=self.device)
        scores = raw_scores.clone()
        if cfg.missing_eos_penalty is not None:
            scores = scores - cfg.missing_eos_penalty * (~has_eos).float()
        gold = None
        if self.gold_scorer is not None and iteration % cfg.gold_judge_every == 0:
            gold = torch.tensor(self.gold_scorer(prompts, texts, first_row=rows.start), dtype=torch.float32, device=self.device)
        score_s = time.perf_counter() - started - rollout_s

        # 3. log-probs and values of the samples under the policy (adapter on) and the reference (off).
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
                    values.append(v)
                with adapter_disabled(self.model):
                    ref_logits, _ = self.model(full[mb], full_mask[mb], cfg.response_length)
                ref_logprobs.append(self._response_logprobs(ref_logits, responses[mb]))
            ref_logprobs = torch.cat(ref_logprobs)
            if recorded is None:
                logprobs, values = torch.cat(logprobs), torch.cat(values)
            else:  # positions past the last generated step are masked; zeros fill them
                logprobs, values = torch.zeros_like(ref_logprobs), torch.zeros_like(ref_logprobs)
                logprobs[:, :recorded[0].shape[1]], values[:, :recorded[1].shape[1]] = recorded

        if self.world > 1:  # the whole batch on every process, rows in batch order
            from accelerate.utils import gather_object

            gather = self.accelerator.gather
            texts = gather_object(texts)
            full, full_mask, responses, mask = gather(full), gather(full_mask), gather(responses), gather(mask)
            has_eos = gather(has_eos.long()).bool()
            raw_scores, scores = gather(raw_scores), gather(scores)
            logprobs, values, ref_logprobs = gather(logprobs), gather(values), gather(ref_logprobs)
            gold = gather(gold) if gold is not None else None
        gold_mean = None if gold is None else gold.mean().item()
        return Rollout(iteration, [self.prompts[i] for i in every], texts, full, full_mask, responses, mask, has_eos, raw_scores,
                       scores, logprobs, values, ref_logprobs, gold_mean, started, rollout_s, score_s)

    def update(self, r: Rollout) -> tuple[dict[str, float], list[dict]]:
        cfg, iteration = self.cfg, r.iteration
        logprobs, values, ref_logprobs, scores = r.logprobs, r.values, r.ref_logprobs, r.scores
        full, full_mask, responses = r.full, r.full_mask, r.responses
        maskf = r.mask.float()

        # 4. per-token rewards: KL penalty on every token, the score on the last.
        kl = kl_per_token(logprobs, ref_logprobs, cfg.kl_estimator) * maskf  # (B, R)
        kl_coef = self.kl_ctl.value
        rewards = kl_penalised_rewards(scores, kl, maskf, kl_coef)
        if cfg.whiten_rewards:
            rewards = masked_whiten(rewards, maskf, shift_mean=False)

        # 5. advantages: GAE over each response, whitened over the batch's tokens.
        advantages, returns = gae(rewards, values, maskf, cfg.gamma, cfg.lam)
        advantages = masked_whiten(advantages, maskf)

        # 6. PPO epochs over shuffled minibatches (the model stays in eval mode: no dropout). Across processes
        # each takes every world-th row of a minibatch; its token means are scaled by its share of the
        # minibatch's tokens (`weight`), so the sum over processes is the minibatch's token mean: DDP
        # averages gradients, hence the loss times world.
        stats: dict[str, list[float]] = {}
        for epoch in range(cfg.ppo_epochs):
            for whole in self._minibatches(iteration, epoch):
                mb = whole[self.rank::self.world]
                weight = maskf[mb].sum() / maskf[whole].sum() if self.world > 1 else 1.0
                with self._autocast():
                    logits, vpred = self.trained(full[mb], full_mask[mb], cfg.response_length)
                    resp_logits = logits.float() / cfg.temperature
                    new_logprobs = token_logprobs(resp_logits, responses[mb])
                    pg_loss, pg_stats = policy_loss(new_logprobs, logprobs[mb], advantages[mb], maskf[mb], cfg.cliprange)
                    vf_loss, vf_stats = value_loss(vpred, values[mb], returns[mb], maskf[mb], cfg.cliprange_value)
                    if cfg.ent_coef > 0:
                        entropy = masked_mean(entropy_from_logits(resp_logits), maskf[mb])
                    else:  # logged only: keep the full-vocabulary softmax out of the backward graph
                        with torch.no_grad():
                            entropy = masked_mean(entropy_from_logits(resp_logits), maskf[mb])
                    loss = pg_loss + cfg.vf_coef * vf_loss - cfg.ent_coef * entropy
                self.accelerator.backward(loss * (weight * self.world))
                self.accelerator.clip_grad_norm_(self.params, cfg.max_grad_norm)
                self.optimizer.step()
                self.optimizer.zero_grad(set_to_none=True)
                logged = {M.LOSS_POLICY: pg_loss, M.LOSS_VALUE: vf_loss, M.LOSS_TOTAL: loss, M.POLICY_ENTROPY: entropy,
                          M.CLIPFRAC: pg_stats["clipfrac"], M.APPROXKL: pg_stats["approxkl"],
                          M.VALUE_CLIPFRAC: vf_stats["clipfrac"], M.VALUE_ERROR: vf_stats["error"],
                          M.VPRED: masked_mean(vpred, maskf[mb])}
                values_now = torch.stack([v.detach().float() for v in logged.values()]) * weight
                if self.world > 1:  # each process's share of the minibatch's token means, summed
                    values_now = self.accelerator.reduce(values_now, "sum")
                for k, v in zip(logged, values_now.tolist()):
                    stats.setdefault(k, []).append(v)

        # 7. the KL controller sees this batch's mean KL per sequence.
        seq_kl = kl.sum(1)
        self.kl_ctl.update(seq_kl.mean().item(), cfg.batch_size)

        non_score = (-kl_coef * kl).sum(1)
        tokens = int(full_mask.sum())
        record: dict[str, Any] = {
            "step": iteration + 1,
            M.KL: seq_kl.mean().item(),
            M.KL_COEF: kl_coef,
            M.ENTROPY: (-logprobs * maskf).sum(1).mean().item(),
            M.NON_SCORE_REWARD: non_score.mean().item(),
            M.SCORES: r.raw_scores.mean().item(),
            M.SCORES_PENALISED: scores.mean().item(),
            M.RLHF_REWARD: (scores + non_score).mean().item(),
            **{k: sum(v) / len(v) for k, v in stats.items()},
            M.RETURNS_MEAN: masked_mean(returns, maskf).item(),
            M.VALUES_MEAN: masked_mean(values, maskf).item(),
            M.LENGTH_MEAN: maskf.sum(1).mean().item(),
            M.EOS_RATE: r.has_eos.float().mean().item(),
            "tokens": tokens,
            "processes": self.world,
            "time/rollout_s": round(r.rollout_s, 4),
            "time/score_s": round(r.score_s, 4),
            "seconds": round(time.perf_counter() - r.started, 4),
        }
        if r.gold is not None:
            record[M.JUDGE_SCORE] = r.gold
            record[M.PROXY_SCORE] = r.raw_scores.mean().item()
        samples = [{"step": iteration + 1, "prompt": p, "response": t, "score": s, "kl": k}
                   for p, t, s, k in zip(r.prompts, r.texts, r.raw_scores.tolist(), seq_kl.tolist())]
        return record, samples

    def _response_logprobs(self, logits: torch.Tensor, responses: torch.Tensor) -> torch.Tensor:
        """log pi(response_t | query, response_<t) at the sampling temperature. (B, R, V) -> (B, R)"""
        return token_logprobs(logits.float() / self.cfg.temperature, responses)

    def _minibatches(self, iteration: int, epoch: int) -> list[torch.Tensor]:
        """The shuffled minibatches of one PPO epoch: a function of (seed, iteration, epoch), for exact resume."""
        b, size = self.cfg.batch_size, self.cfg.batch_size // self.cfg.mini_batches
        order = torch.randperm(b, generator=torch.Generator().manual_seed(self.cfg.seed * 7919 + iteration * 131 + epoch))
        return [order[i:i + size].to(self.device) for i in range(0, b, size)]

    # -- the run -----------------------------------------------------------------------------
    def train(self) -> dict[str, Any]:
        from cai.progress import progress_bar
        from cai.train.loop import plot_losses

        cfg, out = self.cfg, self.out
        out.mkdir(parents=True, exist_ok=True)
        ckpt = out / "checkpoint"
        metrics_path, samples_path = out / "metrics.jsonl", out / "samples.jsonl"
        main = self.accelerator.is_main_process  # the one that writes; every process computes the same record
        start, extra = resume(ckpt, self.model, self.optimizer, (metrics_path, samples_path), write=main)
        if start:
            self.kl_ctl.load_state_dict(extra["kl_ctl"])
            logger.info("resuming PPO from iteration %d of %d (%s)", start, cfg.iterations, ckpt)
        with progress_bar("iterations", disable=not main) as bar:
            task = bar.add_task("ppo iterations", total=cfg.iterations, completed=start, info="")
            for iteration in range(start, cfg.iterations):
                record, samples = self.ppo_iteration(iteration)
                if main:
                    with open(metrics_path, "a", encoding="utf-8") as f:
                        f.write(json.dumps({k: (round(v, 6) if isinstance(v, float) else v) for k, v in record.items()}) + "\n")
                    if (iteration + 1) % cfg.log_samples_every == 0 or iteration == 0:
                        with open(samples_path, "a", encoding="utf-8") as f:
                            for s in samples[:4]:
                                f.write(json.dumps(s, ensure_ascii=False) + "\n")
                        for s in samples[:2]:
                            logger.info("iteration %d  score %.3f  kl %.3f\n  prompt: %s\n  response: %s", s["step"], s["score"],
                                        s["kl"], s["prompt"][:200], s["response"][:300])
                    bar.update(task, completed=iteration + 1,
                               info=f"score {record[M.SCORES]:.3f} kl {record[M.KL]:.3f}")
                if (iteration + 1) % cfg.checkpoint_every == 0 or iteration + 1 == cfg.iterations:
                    # called by every process (under FSDP the state is gathered from all); the main one writes
                    save_checkpoint(ckpt, self.model, self.optimizer, iteration + 1, extra={"kl_ctl": self.kl_ctl.state_dict()},
                                    write=main)
        self.accelerator.wait_for_everyone()
        weights = trainable_state(self.model) if self.sharded else None  # a collective under FSDP
        if not main:
            return {"iterations": cfg.iterations, "process": self.rank}
        save_final(out / "final", self.model.lm, self.tokenizer, weights, value_head=self.model.value_head)
        plot_losses(metrics_path, out / "loss.png", keys=(M.SCORES, M.KL, M.LOSS_POLICY))
        rows = [json.loads(line) for line in metrics_path.read_text(encoding="utf-8").splitlines() if line.strip()]
        summary = {"iterations": cfg.iterations, **launch_record(self.accelerator, self.model),
                   "first": rows[0] if rows else None, "last": rows[-1] if rows else None}
        (out / "summary.json").write_text(json.dumps(summary, indent=2))
        return summary


def check_processes(cfg: PPOJob, world: int, vllm: bool) -> None:
    """Refuse, before any model loads, a batch that `world` processes cannot share (or vLLM rollouts across processes)."""
    from cai.errors import ConfigError

    if world == 1:
        return
    if vllm:
        raise ConfigError(f"rollout_backend 'vllm' runs in one process; this launch has {world}. Use rollout_backend "
                               "'transformers' across processes, or launch one process")
    size = cfg.batch_size // cfg.mini_batches
    if cfg.batch_size % world or size < world:
        raise ConfigError(f"batch_size ({cfg.batch_size}) must be divisible by the {world} processes, with minibatches "
                               f"(batch_size / mini_batches = {size}) of at least {world} rows: each process takes its share")


def build_trainer(cfg: PPOJob, *, scorer: Scorer | None = None, gold_scorer: Scorer | None = None) -> PPOTrainer:
    """The trainer and its collaborators for `cfg`: policy and tokenizer, prompts, the reward's scorer (or
    `scorer`), the judge for gold scores and, with vLLM rollouts, the engine."""
    from cai.models import resolve_model
    from cai.prompts import PromptSourceError, load_prompts
    from cai.judge import SyncJudge
    from cai.train.rl.policy import load_policy_with_value
    from cai.train.rewards import JudgeScorer, load_scorer

    # The prompts first: a bad prompt file is refused before a model loads or the judge is connected.
    prompts = [p.text for p in load_prompts(cfg.prompts, limit=cfg.max_prompts)]
    if not prompts:
        raise PromptSourceError(f"prompts {cfg.prompts!r}: no prompts to train on")
    from accelerate import Accelerator

    accelerator = Accelerator(mixed_precision="no")  # one process, or this one's place in a launch
    check_processes(cfg, accelerator.num_processes, cfg.rollout_backend == "vllm")
    device = accelerator.device
    policy, tokenizer = load_policy_with_value(cfg, device)
    # One connection to the judge for the run, for the reward and the gold score alike; the API key comes
    # from $CAI_JUDGE_API_KEY in the client, the one place that reads it.
    needs_judge = (cfg.reward == "judge" and scorer is None) or (cfg.gold_judge_every and gold_scorer is None)
    judge = SyncJudge(cfg.judge_url) if needs_judge and cfg.judge_url else None
    scorer = scorer or load_scorer(cfg.reward, judge=judge, device=str(device))
    gold_scorer = gold_scorer or (JudgeScorer(judge) if cfg.gold_judge_every else None)
    vllm = None
    if cfg.rollout_backend == "vllm":
        from cai.engine_logs import POLICY_ENGINE_LOG
        from cai.train.rl.vllm_rollouts import VllmRollouts

        vllm = VllmRollouts(resolve_model(cfg.model).path, lora_rank=cfg.lora_r,
                            max_len=cfg.max_prompt_length + cfg.response_length + 16, seed=cfg.seed,
                            gpu_memory_utilization=cfg.vllm_gpu_memory_utilization, log_path=Path(cfg.out) / POLICY_ENGINE_LOG)
    return PPOTrainer(cfg, policy=policy, tokenizer=tokenizer, prompts=prompts, scorer=scorer, gold_scorer=gold_scorer, vllm=vllm,
                      accelerator=accelerator)


def run_ppo(cfg: PPOJob) -> dict[str, Any]:
    from cai.train.settings import pin_trainer_settings

    out = Path(cfg.out)
    pin_trainer_settings(cfg, out)
    trainer = build_trainer(cfg)
    logger.info("ppo: %d prompts, %d trainable parameters, output %s", len(trainer.prompts),
                sum(p.numel() for p in trainer.params), out)
    try:
        return trainer.train()
    finally:
        trainer.close()
