"""Online DPO from AI feedback (Guo et al. 2024, "Direct language model alignment from online AI feedback"):
`cai train online-dpo`.

Offline DPO learns from pairs sampled once, by another model; the policy soon drifts away from them.
Online DPO samples its pairs from the current policy at every step and has an AI annotator label them,
so the preference data stays on-policy. Each iteration, in this order (phases 1-3 are `RLTrainer.rollout`,
shared with PPO; `update`, here, is 4-6):
1. rollout: for each of batch_size / 2 prompts, two answers a and b from the current policy (adjacent
   rows: `group_size` 2), cut at their first EOS;
2. score: the reward scores each answer (or, for `judge:pairwise`, the judge compares the two);
3. evaluate: the answers' log-probs under the reference (the adapter switched off);
4. label: p = p(a > b). From the judge's pairwise comparison, in both orders, a soft label; from a
   reward model, the judge's score or a rule, the hard label 1[r_a > r_b] (0.5 on a tie) on the scores
   after the missing-EOS penalty, as TRL's OnlineDPOTrainer labels with a reward model (TRL breaks a tie
   for the first answer; 0.5 here keeps a tie a tie). Each pair is then written preferred-first
   (p >= 0.5), which leaves the loss unchanged and makes the logged `rewards/chosen` the preferred answer's;
5. `ppo_epochs` passes over `mini_batches` shuffled minibatches of pairs, each one gradient step of the
   DPO loss (`cai.train.losses.dpo_loss`, soft labels, `rpo_alpha`) on the pairs' summed response
   log-probs under the policy (with grad) and the reference:
       h = beta [(log pi(y_c) - log ref(y_c)) - (log pi(y_r) - log ref(y_r))]
       loss = - mean over pairs of [p log sigmoid(h) + (1 - p) log sigmoid(-h)]  (+ rpo_alpha * NLL)
   The defaults (one minibatch, one epoch) take one gradient step per batch, as TRL does;
6. log: the DPO metrics `cai train dpo` logs (rewards/chosen, rewards/rejected, rewards/margins,
   rewards/accuracy, nll/preferred), TRL's objective/kl, non_score_reward (-beta * KL) and rlhf_reward,
   the label's mean and entropy, and the rollout metrics every RL trainer logs.

Log-probs are taken at the sampling temperature, the reference's as the shared rollout computes them and
the policy's the same way; at temperature 1 (the default) they are the model's own, as TRL's. A pair is
never split: across processes (`accelerate launch`) each process takes whole pairs of every minibatch,
and its loss is its share of the minibatch's mean (`pairs_total`), so the gradients DDP averages are the
one-process minibatch's. Exact resume as every RL trainer (`cai.train.rl.trainer`): the minibatch order is
a function of (seed, iteration, epoch).

    cai train online-dpo --model runs/demo/sft/merged --judge-url http://127.0.0.1:8000 --prompts donotanswer --out runs/odpo
    cai train online-dpo --model runs/demo/sft/merged --reward runs/demo/rm/final --prompts donotanswer --out runs/odpo
"""

from __future__ import annotations

from typing import Any

import torch

from cai.errors import ConfigError
from cai.train.losses import dpo_loss, preferred_tokens, token_logprobs
from cai.train.rl import metrics as M
from cai.train.rl.build import run_rl
from cai.train.rl.math import at_temperature, kl_per_token
from cai.train.rl.settings import OnlineDPOJob
from cai.train.rl.trainer import RLTrainer, Rollout

LOSS = "loss"
"""The minibatches' mean DPO loss: offline DPO's name, so the report's DPO panels read both."""
LOGPS_CHOSEN, LOGPS_REJECTED = "logps/chosen", "logps/rejected"
"""Mean summed log-probs of the preferred and the other answer under the policy, before the update (TRL's names)."""
LABEL_MEAN, LABEL_ENTROPY = "label/mean", "label/entropy"
"""Mean p(a > b) over the pairs (near 0.5: a and b are two samples of the same policy), and the labels' mean binary
entropy in nats (0 for hard labels, log 2 = 0.693 for a tie or a label of 0.5: how sure the labeller is)."""
SCORES_MARGIN = "objective/scores_margin"
"""Mean score of the preferred answer minus the other's (TRL's name)."""


def hard_labels(scores_a: torch.Tensor, scores_b: torch.Tensor) -> torch.Tensor:
    """p(a > b) from two answers' scores: 1 where a scores higher, 0 where lower, 0.5 on a tie. (P,), (P,) -> (P,)"""
    return (scores_a > scores_b).float() + 0.5 * (scores_a == scores_b).float()


def label_entropy(p: torch.Tensor) -> torch.Tensor:
    """Binary entropy -p log p - (1 - p) log(1 - p) of each label, in nats, 0 at p in {0, 1}. (P,) -> (P,)"""
    return -(torch.special.xlogy(p, p) + torch.special.xlogy(1 - p, 1 - p))


class PairLabels:
    """A pairwise judge (`cai.train.rewards.GroupPairwiseScorer`) as online DPO's scorer: each answer's score is the
    judge's p(it beats the other answer to its prompt), both orders debiased, so a pair's first score is its label.
    One judge call per pair, made in the rollout's phase 2 on each process's own share of the batch."""

    def __init__(self, comparer: Any):
        self.comparer, self.name = comparer, comparer.name
        self.judge = comparer.judge  # the run's connection, which the trainer closes

    def __call__(self, prompts: list[str], responses: list[str], *, first_row: int = 0) -> list[float]:
        p = self.comparer.pair_probabilities(prompts, responses, first_row=first_row)[:, 0]  # (G,) p(a > b)
        return torch.stack([p, 1 - p], 1).flatten().tolist()


class OnlineDPOTrainer(RLTrainer):
    """Online DPO: `RLTrainer`'s rollouts of two answers per prompt, labelled, then the DPO loss on the pairs (phases 4-6)."""

    name = "online_dpo"
    plot_keys = (M.SCORES, M.KL, LOSS)
    cfg: OnlineDPOJob

    def __init__(self, cfg: OnlineDPOJob, **collaborators):
        accelerator = collaborators.get("accelerator")
        world = accelerator.num_processes if accelerator is not None else 1
        if cfg.batch_size // 2 // cfg.mini_batches < world:
            raise ConfigError(f"online DPO: minibatches of batch_size / 2 / mini_batches = {cfg.batch_size // 2 // cfg.mini_batches} "
                              f"pairs cannot give each of the {world} processes a whole pair; raise batch_size or lower mini_batches")
        if getattr(collaborators["scorer"], "pairwise", False):
            collaborators["scorer"] = PairLabels(collaborators["scorer"])
        super().__init__(cfg, **collaborators)

    @property
    def group_size(self) -> int:
        """Two answers per prompt, in adjacent rows: pair i is rows 2i and 2i + 1."""
        return self.cfg.num_generations

    def labels(self, r: Rollout) -> torch.Tensor:
        """p(a > b) of each pair (P,), a = rows 0, 2, 4..., b = rows 1, 3, 5... (phase 4): the judge's own probability
        (`PairLabels` scored a with it), else the hard label of the scores."""
        if isinstance(self.scorer, PairLabels):
            return r.raw_scores[0::2]
        return hard_labels(r.scores[0::2], r.scores[1::2])

    def pair_minibatches(self, iteration: int, epoch: int) -> list[torch.Tensor]:
        """The `mini_batches` shuffled minibatches of pair indices of one epoch: a function of (seed, iteration, epoch)."""
        pairs = self.cfg.batch_size // 2
        size = pairs // self.cfg.mini_batches
        order = torch.randperm(pairs, generator=torch.Generator().manual_seed(self.cfg.seed * 7919 + iteration * 131 + epoch))
        return [order[i:i + size].to(self.device) for i in range(0, pairs, size)]

    def update(self, r: Rollout) -> tuple[dict[str, Any], list[dict]]:
        """Phases 4-6 on rollout `r`: the logged record and the sample rows."""
        cfg, iteration = self.cfg, r.iteration
        maskf = r.mask.float()

        # 4. labels, and each pair written preferred-first: chosen/rejected rows (P,) and p(chosen > rejected) >= 0.5.
        p_a = self.labels(r).to(self.device)
        a, b = torch.arange(0, cfg.batch_size, 2, device=self.device), torch.arange(1, cfg.batch_size, 2, device=self.device)
        first = p_a >= 0.5
        chosen, rejected = torch.where(first, a, b), torch.where(first, b, a)
        p_chosen = torch.where(first, p_a, 1 - p_a)
        ref = (r.ref_logprobs * maskf).sum(1)  # (B,)
        lengths = maskf.sum(1)  # (B,)

        # 5. epochs over minibatches of whole pairs. Each process takes every world-th pair of a minibatch, and dpo_loss
        # divides by the minibatch's pairs (and preferred tokens), so the processes' losses sum to the minibatch's mean:
        # DDP averages gradients, hence the loss times world. The metrics are shares in the same way, summed below.
        stats: dict[str, list[float]] = {}
        for epoch in range(cfg.ppo_epochs):
            for whole in self.pair_minibatches(iteration, epoch):
                mine = whole[self.rank::self.world]
                rows = torch.cat([chosen[mine], rejected[mine]])  # (2p,) the preferred answers, then the others
                with self._autocast():
                    logits, _ = self.trained(r.full[rows], r.full_mask[rows], cfg.response_length)
                    logprobs = token_logprobs(at_temperature(logits, cfg.temperature), r.responses[rows])
                    del logits
                    policy_c, policy_r = (logprobs * maskf[rows]).sum(1).chunk(2)
                    loss, logged = dpo_loss(policy_c, policy_r, ref[chosen[mine]], ref[rejected[mine]], cfg.beta, p_chosen[mine],
                                            cfg.rpo_alpha, lengths[chosen[mine]], lengths[rejected[mine]], pairs_total=len(whole),
                                            nll_tokens_total=preferred_tokens(p_chosen[whole], lengths[chosen[whole]],
                                                                              lengths[rejected[whole]]).sum())
                self.accelerator.backward(loss * self.world)
                self.accelerator.clip_grad_norm_(self.params, cfg.max_grad_norm)
                self.optimizer.step()
                self.optimizer.zero_grad(set_to_none=True)
                logged = {LOSS: loss.detach(), **logged}
                values = torch.stack([v.float() for v in logged.values()])
                if self.world > 1:  # each process's share of the minibatch's means, summed
                    values = self.accelerator.reduce(values, "sum")
                for k, v in zip(logged, values.tolist()):
                    stats.setdefault(k, []).append(v)

        # 6. the record: DPO's metrics averaged over the minibatches, KL to the reference, the labels, the rollout's.
        seq_kl = (kl_per_token(r.logprobs, r.ref_logprobs, cfg.kl_estimator) * maskf).sum(1)  # (B,)
        non_score = -cfg.beta * seq_kl
        old = (r.logprobs * maskf).sum(1)  # (B,) the policy's, at sampling
        record: dict[str, Any] = {
            "step": iteration + 1,
            **{k: sum(v) / len(v) for k, v in stats.items()},
            LOGPS_CHOSEN: old[chosen].mean().item(),
            LOGPS_REJECTED: old[rejected].mean().item(),
            LABEL_MEAN: p_a.mean().item(),
            LABEL_ENTROPY: label_entropy(p_a).mean().item(),
            SCORES_MARGIN: (r.scores[chosen] - r.scores[rejected]).mean().item(),
            M.KL: seq_kl.mean().item(),
            M.NON_SCORE_REWARD: non_score.mean().item(),
            M.RLHF_REWARD: (r.scores + non_score).mean().item(),
            "beta": cfg.beta,
            **self.rollout_record(r),
        }
        return record, self.rollout_samples(r, seq_kl)

    def progress_info(self, record: dict[str, Any]) -> str:
        """Score, KL and the DPO loss after an iteration."""
        return f"score {record[M.SCORES]:.3f} kl {record[M.KL]:.3f} loss {record[LOSS]:.3f}"


def run_online_dpo(cfg: OnlineDPOJob) -> dict[str, Any]:
    """`cai train online-dpo`: pin the settings, train, return the summary."""
    return run_rl(cfg, OnlineDPOTrainer)

