"""GRPO and RLOO: group-baseline policy gradients without a value model: `cai train grpo`, `cai train rloo`.

Each prompt of an iteration is answered K = num_generations times (the K rows adjacent in the batch;
`RLTrainer.prompt_indices`), and an answer's advantage is its score against the other answers to the same
prompt; every token of the answer gets it. The policy is the starting model plus a LoRA adapter, the
reference the same weights with the adapter off (as in PPO, `cai.train.rl.ppo`). Phases 1-3 (sample, score,
evaluate) are `RLTrainer.rollout`'s; `update` here is 4-7, with r_i the score of answer i (after the
missing-EOS penalty), o_i its tokens, rho_it = pi(o_it) / pi_old(o_it) and beta = kl_coef:

4. score:      r_i <- r_i - beta * sum_t k1_it                      (kl_in "reward": RLOO, TRL's RLOOTrainer)
5. advantage:  A_i = (r_i - mean_group(r)) / (std_group(r) + eps)   (advantage "grpo", scale_rewards "group";
                                                                    Shao et al. 2024, DeepSeekMath)
               A_i = r_i - mean of the group's other K-1 scores      (advantage "rloo", scale_rewards "none";
                                                                    Ahmadian et al. 2024)
               scale_rewards "batch" divides by the batch's std, "none" (Dr. GRPO, Liu et al. 2025) by nothing;
6. loss, for `ppo_epochs` passes over `mini_batches` shuffled minibatches:
               l_it = -min(rho_it A_i, clip(rho_it, 1 - cliprange, 1 + cliprange_high) A_i)
                      + beta * k3_it                                 (kl_in "loss": GRPO's per-token KL term)
               L = (1/B) sum_i (1/|o_i|) sum_t l_it                  (loss_aggregation "sequence": GRPO)
                 = sum_it l_it / sum_i |o_i|                         ("token": DAPO, Yu et al. 2025)
                 = sum_it l_it / (B * response_length)               ("constant": Dr. GRPO)
7. the KL controller (fixed or adaptive) sees the batch's mean KL per answer.

The arithmetic is `cai.train.rl.group`'s (tested against hand computations there); k1 and k3 are
`cai.train.rl.math.kl_per_token`'s. `cai train rloo` is this trainer with RLOO's defaults (`RLOOJob`).

Several processes: the rollouts are gathered (as for PPO), so the advantages are the whole batch's; in
phase 6 each process takes every world-th row of a minibatch and divides by the whole minibatch's
denominator (`loss_denominator`), so the processes' losses add up to the one-process loss (times world,
since DDP averages gradients).

    cai train grpo --model runs/demo/sft/merged --reward runs/demo/rm/final --prompts donotanswer --out runs/grpo
    cai train rloo --model runs/demo/sft/merged --reward rule:length --prompts donotanswer --out runs/rloo
"""

from __future__ import annotations

from typing import Any

import torch

from cai.train.losses import token_logprobs
from cai.train.rl import metrics as M
from cai.train.rl.build import run_rl
from cai.train.rl.group import aggregate_loss, clipped_token_loss, group_advantages, loss_denominator
from cai.train.rl.math import at_temperature, entropy_from_logits, kl_per_token
from cai.train.rl.settings import GRPOJob
from cai.train.rl.trainer import RLTrainer, Rollout

LOSS_KL = "grpo/loss/kl"
"""beta * the k3 term of the loss (kl_in "loss"), aggregated as the policy loss."""
CLIPFRAC_LOW, CLIPFRAC_HIGH = "grpo/clipfrac_low", "grpo/clipfrac_high"
ADVANTAGE_STD = "grpo/advantage_std"
REWARD_STD_WITHIN_GROUP = "grpo/reward_std_within_group"
"""Mean over groups of the std of a group's K scores (after the missing-EOS penalty, before any KL)."""
GROUPS_ALL_EQUAL = "grpo/groups_all_equal"
"""Share of groups whose K scores are all equal: their advantages are 0, they teach nothing."""

BASELINE = {"grpo": "mean", "rloo": "leave_one_out"}


class GRPOTrainer(RLTrainer):
    """GRPO / RLOO: `RLTrainer`'s rollouts of K answers per prompt, group-baseline advantages and the clipped
    token loss (phases 4-7 of the module docstring)."""

    name = "grpo"
    has_value_head = False
    plot_keys = (M.SCORES, M.KL, M.LOSS_POLICY)
    cfg: GRPOJob

    @property
    def group_size(self) -> int:
        return self.cfg.num_generations

    def update(self, r: Rollout) -> tuple[dict[str, Any], list[dict]]:
        """Phases 4-7 on rollout `r`: the logged record and the sample rows."""
        cfg, k, agg, width = self.cfg, self.cfg.num_generations, self.cfg.loss_aggregation, self.cfg.response_length
        maskf = r.mask.float()
        kl = kl_per_token(r.logprobs, r.ref_logprobs, cfg.kl_estimator) * maskf  # (B, R)
        seq_kl = kl.sum(1)  # (B,)
        beta = self.kl_ctl.value

        # 4. the score each answer is judged by: with kl_in "reward" the KL penalty is folded into it.
        scores = r.scores - beta * seq_kl if cfg.kl_in == "reward" else r.scores  # (B,)

        # 5. advantages against the group: one per answer, shared by its tokens.
        advantages = group_advantages(scores, k, baseline=BASELINE[cfg.advantage], scale=cfg.scale_rewards)  # (B,)

        # 6. epochs over shuffled minibatches (eval mode: no dropout). Each process takes every world-th row of a
        # minibatch and divides by the whole minibatch's denominator, so the processes' losses sum to the minibatch's.
        stats: dict[str, list[float]] = {}
        for epoch in range(cfg.ppo_epochs):
            for whole in self.minibatches(r.iteration, epoch):
                mb = whole[self.rank::self.world]
                denominator = loss_denominator(maskf[whole], agg, max_tokens=width)
                share = maskf[mb].sum() / maskf[whole].sum().clamp(min=1.0)  # for the token means of the stats
                with self._autocast():
                    logits, _ = self.trained(r.full[mb], r.full_mask[mb], width)
                    resp_logits = at_temperature(logits, cfg.temperature)
                    del logits
                    new_logprobs = token_logprobs(resp_logits, r.responses[mb])  # (b, R)
                    per_token, pg_stats = clipped_token_loss(new_logprobs, r.logprobs[mb], advantages[mb], maskf[mb],
                                                             clip_low=cfg.cliprange, clip_high=cfg.cliprange_high or cfg.cliprange)
                    pg_loss = aggregate_loss(per_token, maskf[mb], agg, max_tokens=width, denominator=denominator)
                    kl_loss = torch.zeros((), device=self.device)
                    if cfg.kl_in == "loss" and beta > 0:
                        k3 = kl_per_token(new_logprobs, r.ref_logprobs[mb], "k3")
                        kl_loss = beta * aggregate_loss(k3, maskf[mb], agg, max_tokens=width, denominator=denominator)
                    with torch.set_grad_enabled(cfg.ent_coef > 0):  # else logged only: no softmax in the graph
                        entropy = aggregate_loss(entropy_from_logits(resp_logits), maskf[mb], agg, max_tokens=width,
                                                 denominator=denominator)
                    loss = pg_loss + kl_loss - cfg.ent_coef * entropy
                self.accelerator.backward(loss * self.world)  # DDP averages the processes' gradients
                self.accelerator.clip_grad_norm_(self.params, cfg.max_grad_norm)
                self.optimizer.step()
                self.optimizer.zero_grad(set_to_none=True)
                summed = torch.stack([pg_loss, kl_loss, loss, entropy]).detach().float()
                token_means = torch.stack([pg_stats[s] for s in ("clipfrac", "clipfrac_low", "clipfrac_high", "approxkl")])
                logged = torch.cat([summed, token_means.detach().float() * share])
                if self.world > 1:  # each process's share of the minibatch's values, summed
                    logged = self.accelerator.reduce(logged, "sum")
                names = (M.LOSS_POLICY, LOSS_KL, M.LOSS_TOTAL, M.POLICY_ENTROPY, M.CLIPFRAC, CLIPFRAC_LOW, CLIPFRAC_HIGH,
                         M.APPROXKL)
                for name, v in zip(names, logged.tolist()):
                    stats.setdefault(name, []).append(v)

        # 7. the KL controller sees this batch's mean KL per answer.
        self.kl_ctl.update(seq_kl.mean().item(), cfg.batch_size)

        grouped = r.scores.view(-1, k)  # (G, K)
        non_score = -beta * seq_kl
        record: dict[str, Any] = {
            "step": r.iteration + 1,
            M.KL: seq_kl.mean().item(),
            M.KL_COEF: beta,
            M.NON_SCORE_REWARD: non_score.mean().item(),
            M.RLHF_REWARD: (r.scores + non_score).mean().item(),
            **{name: sum(v) / len(v) for name, v in stats.items()},
            ADVANTAGE_STD: advantages.std().item(),
            REWARD_STD_WITHIN_GROUP: grouped.std(1).mean().item(),
            GROUPS_ALL_EQUAL: (grouped == grouped[:, :1]).all(1).float().mean().item(),
            **self.rollout_record(r),
        }
        return record, self.rollout_samples(r, seq_kl)


def run_grpo(cfg: GRPOJob) -> dict[str, Any]:
    """`cai train grpo` / `cai train rloo`: pin the settings, train, return the summary."""
    return run_rl(cfg, GRPOTrainer)
