"""PPO with a KL penalty against the reference policy: `cai train ppo`.

The policy is the starting model (usually the SFT model) plus a fresh LoRA adapter; the reference
is the same weights with the adapter disabled, so no second copy is held. A value head (one linear
layer) reads the policy's last hidden state, so the critic shares the policy's forward pass
(`cai.train.rl.policy`). `run_ppo` builds the collaborators (policy, tokenizer, prompts, scorer,
the judge for gold scores, a vLLM engine; `cai.train.rl.build`) and hands them to `PPOTrainer`.

Each iteration, in this order (the numbered phases; `rollout` is 1-3, shared by every algorithm in
`cai.train.rl.trainer`; `update`, here, is 4-7):
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

from typing import Any

import torch

from cai.train.losses import masked_mean, token_logprobs
from cai.train.rewards import Scorer
from cai.train.rl import metrics as M
from cai.train.rl.build import build_rl_trainer, run_rl
from cai.train.rl.math import at_temperature, entropy_from_logits, kl_penalised_rewards, kl_per_token, masked_whiten, policy_loss
from cai.train.rl.settings import PPOJob
from cai.train.rl.trainer import RLTrainer, Rollout


def gae(rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float, lam: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalised advantage estimation over each response. rewards, values, mask: (B, T).

    delta_t = r_t + gamma V_{t+1} - V_t, A_t = delta_t + gamma lam A_{t+1}, with V and A zero past
    the end of the response (masked positions). Returns (advantages, returns = A + V), masked.
    """
    values = values * mask
    advantages = torch.zeros_like(rewards)
    next_value = torch.zeros_like(rewards[:, 0])
    next_advantage = torch.zeros_like(rewards[:, 0])
    for t in reversed(range(rewards.shape[1])):
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        next_advantage = (delta + gamma * lam * next_advantage) * mask[:, t]
        advantages[:, t] = next_advantage
        next_value = values[:, t]
    return advantages, (advantages + values) * mask


def value_loss(vpreds: torch.Tensor, old_values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor,
               cliprange_value: float) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """0.5 * mean over tokens of max((V - R)^2, (V_clipped - R)^2), V_clipped within old V +- e. All (B, T)."""
    clipped = old_values + torch.clamp(vpreds - old_values, -cliprange_value, cliprange_value)
    unclipped_error, clipped_error = (vpreds - returns) ** 2, (clipped - returns) ** 2
    loss = 0.5 * masked_mean(torch.maximum(unclipped_error, clipped_error), mask)
    return loss, {"clipfrac": masked_mean((clipped_error > unclipped_error).float(), mask),
                  "error": masked_mean(unclipped_error, mask)}


class PPOTrainer(RLTrainer):
    """PPO: `RLTrainer`'s rollouts, then GAE over a value head and clipped policy and value losses (phases 4-7)."""

    name = "ppo"
    has_value_head = True
    plot_keys = (M.SCORES, M.KL, M.LOSS_POLICY)
    cfg: PPOJob

    def ppo_iteration(self, iteration: int) -> tuple[dict[str, Any], list[dict]]:
        """Phases 1-7: the logged record and a few (prompt, response, score, kl) samples."""
        return self.update(self.rollout(iteration))

    def update(self, r: Rollout) -> tuple[dict[str, Any], list[dict]]:
        """Phases 4-7 on rollout `r`: the logged record and the sample rows."""
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
            for whole in self.minibatches(iteration, epoch):
                mb = whole[self.rank::self.world]
                weight = maskf[mb].sum() / maskf[whole].sum() if self.world > 1 else 1.0
                with self._autocast():
                    logits, vpred = self.trained(full[mb], full_mask[mb], cfg.response_length)
                    resp_logits = at_temperature(logits, cfg.temperature)
                    del logits
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
        record: dict[str, Any] = {
            "step": iteration + 1,
            M.KL: seq_kl.mean().item(),
            M.KL_COEF: kl_coef,
            M.NON_SCORE_REWARD: non_score.mean().item(),
            M.RLHF_REWARD: (scores + non_score).mean().item(),
            **{k: sum(v) / len(v) for k, v in stats.items()},
            M.RETURNS_MEAN: masked_mean(returns, maskf).item(),
            M.VALUES_MEAN: masked_mean(values, maskf).item(),
            **self.rollout_record(r),
        }
        return record, self.rollout_samples(r, seq_kl)


def build_trainer(cfg: PPOJob, *, scorer: Scorer | None = None, gold_scorer: Scorer | None = None) -> PPOTrainer:
    """A `PPOTrainer` and its collaborators for `cfg` (`build_rl_trainer`); `scorer` / `gold_scorer` replace the
    reward's and the judge's."""
    return build_rl_trainer(PPOTrainer, cfg, scorer=scorer, gold_scorer=gold_scorer)


def run_ppo(cfg: PPOJob) -> dict[str, Any]:
    """`cai train ppo`: pin the settings, train, return the summary."""
    return run_rl(cfg, PPOTrainer)
