"""The online RL trainers' settings in one place: `KLSettings` (the KL penalty, one typed piece),
`RLSettings` (what every algorithm shares: prompts, batch, sampling, clipping, rollout backend,
checkpoints), `RLJob` (a run's starting policy, reward, prompts and output), and per algorithm its
settings (`PPOSettings`, what a `cai run` config's `rl.ppo:` section holds) and its job, the two joined:
`class PPOJob(PPOSettings, RLJob)`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from cai.train.rewards import asks_judge
from cai.train.settings import ComputeSettings, LoraSettings, OptimiserSettings, TrackingSettings

if TYPE_CHECKING:
    from cai.train.rl.math import AdaptiveKLController, FixedKLController


class KLSettings(BaseModel):
    """The KL penalty against the reference policy: its estimator and coefficient, fixed or adaptive."""

    model_config = ConfigDict(extra="forbid")

    kl_coef: float = Field(default=0.05, ge=0, description="Initial KL penalty coefficient.")
    kl_estimator: Literal["k1", "k3"] = Field(default="k1", description="Per-token KL estimator folded into the rewards.")
    adaptive_kl: bool = Field(default=False, description="Adapt kl_coef towards kl_target (Ziegler et al.).",
                              json_schema_extra={"cli": "--adaptive-kl/--fixed-kl"})
    kl_target: float = Field(default=6.0, gt=0, description="Target KL per sequence (nats) for adaptive_kl.")
    kl_horizon: int = Field(default=10000, ge=1, description="Adaptive controller's horizon in samples.")

    def controller(self) -> FixedKLController | AdaptiveKLController:
        """The coefficient's controller: adaptive towards kl_target (Ziegler et al.) or fixed at kl_coef."""
        from cai.train.rl.math import AdaptiveKLController, FixedKLController

        if self.adaptive_kl:
            return AdaptiveKLController(self.kl_coef, self.kl_target, self.kl_horizon)
        return FixedKLController(self.kl_coef)


class RLSettings(TrackingSettings, OptimiserSettings, LoraSettings, ComputeSettings, KLSettings):
    """What every online RL algorithm sets; every setting with its default. The LoRA and optimiser settings
    are those the other trainers share; LoRA dropout, like the model's own dropout, is off in every pass,
    so the update's ratio pi/pi_old is 1 before the first step.
    """

    gold_judge_every: int = Field(default=0, ge=0, description="Every N iterations also score the samples with the judge "
                                  "(eval/judge_score) to watch for reward hacking; 0 = never.")
    max_prompts: int | None = Field(default=None, ge=1, description="Use at most this many prompts.")
    max_prompt_length: int = Field(default=256, ge=8, description="Prompt tokens kept (the end of longer prompts).")
    iterations: int = Field(default=100, ge=1, description="PPO iterations (rollout + updates).")
    batch_size: int = Field(default=8, ge=1, description="Answers (rows) sampled per iteration, as TRL's generation batch "
                            "counts: with K answers per prompt (grpo/rloo's num_generations) that is batch_size / K prompts.")
    mini_batches: int = Field(default=2, ge=1, description="Minibatches per PPO epoch; must divide batch_size.")
    ppo_epochs: int = Field(default=1, ge=1, description="Passes over each batch of rollouts.")
    forward_batch_size: int | None = Field(default=None, ge=1, description="Rows per no-grad pass (the reference's; also the "
                                           "policy's after vLLM rollouts); default the whole batch. Lower it when those "
                                           "passes run out of memory.")
    response_length: int = Field(default=64, ge=1, description="Most tokens per response.")
    temperature: float = Field(default=1.0, gt=0, description="Sampling temperature (log-probs use the same).")
    cliprange: float = Field(default=0.2, gt=0, description="Policy ratio clip epsilon.")
    ent_coef: float = Field(default=0.0, ge=0, description="Weight of the entropy bonus.")
    missing_eos_penalty: float | None = Field(default=1.0, description="Subtracted from the score of responses cut at "
                                              "response_length without EOS; null = no penalty.")
    lr: float = Field(default=5e-5, gt=0, description="AdamW learning rate (adapter and value head).")
    checkpoint_every: int = Field(default=10, ge=1, description="Iterations between checkpoints (resumable).")
    log_samples_every: int = Field(default=10, ge=1, description="Iterations between sample rows in samples.jsonl and the log.")
    rollout_backend: Literal["transformers", "vllm"] = Field(default="transformers", description="Who samples the rollouts: "
                                                             "transformers' generate, or vLLM with the current LoRA adapter synced "
                                                             "each iteration (pays off for long responses and large batches).")
    vllm_gpu_memory_utilization: float = Field(default=0.3, gt=0, le=0.95, description="With vLLM rollouts on a GPU: the share of "
                                               "the GPU's memory vLLM takes at start (its weights and KV cache; training uses the "
                                               "rest, and a judge on the same GPU needs its own share). TRL's name. On a CPU "
                                               "the KV cache is a fixed 0.5 GiB.")
    merged_rollouts: bool = Field(default=True, description="With transformers rollouts, sample with the adapter merged into a "
                                  "temporary copy of the adapted weights (15% faster on CPU; the copy costs those layers' "
                                  "memory again while sampling). Off: sample through the unmerged adapter. Never merged under "
                                  "FSDP, nor in bf16, where the merged sum would be rounded to bf16 and part of the adapter "
                                  "lost.")
    gather_for_generation: bool = Field(default=True, description="Under FSDP: keep each layer's gathered weights across the "
                                        "decoding steps of a rollout (one all-gather per layer per rollout instead of per "
                                        "step; the whole model then sits on every process while sampling, like TRL's "
                                        "ds3_gather_for_generation). Off: the least memory, for a model one device cannot hold.")
    rollout_cache: Literal["dynamic", "static"] = Field(default="dynamic", description="KV cache of transformers rollouts: "
                                                        "dynamic (grows per step), or static (preallocated for prompt + "
                                                        "response_length; on CUDA transformers then compiles the decoding step, "
                                                        "the first iteration paying the compile). Static is not yet measured on a GPU.")
    seed: int = Field(default=0, description="Seeds initialisation, prompt order, sampling and minibatch order.")

    @model_validator(mode="after")
    def _consistent(self) -> RLSettings:
        if self.batch_size % self.mini_batches:
            raise ValueError(f"batch_size ({self.batch_size}) must be divisible by mini_batches ({self.mini_batches})")
        targets = [self.lora_target_modules] if isinstance(self.lora_target_modules, str) else self.lora_target_modules
        if self.rollout_backend == "vllm" and "lm_head" in targets:
            raise ValueError("rollout_backend 'vllm' serves adapters on the transformer layers only; drop lm_head from lora_target_modules")
        return self


class RLJob(RLSettings):
    """What one run of any RL trainer starts from and writes to; an algorithm's job is its settings plus these."""

    model: str = Field(description="Starting policy (usually the merged SFT model): folder, hub id or embedded name.")
    reward: str = Field(description="Reward-model folder (cai train rm), 'judge', 'judge:pairwise[?method=bt|win_rate&max_pairs=N]', 'rule:length', 'rule:share=TEXT', or a weighted sum WEIGHT*SPEC,WEIGHT*SPEC (README: Rewards).")
    prompts: str = Field(description="Prompt set: built-in name or file (as `cai prompts` reads).")
    out: str = Field(description="Output folder: adapter, value head, checkpoints, metrics.jsonl, samples.jsonl.")
    judge_url: str | None = Field(default=None, description="Judge server for reward 'judge' and for gold_judge_every.")

    @model_validator(mode="after")
    def _judge_given(self) -> RLJob:
        if (asks_judge(self.reward) or self.gold_judge_every) and not self.judge_url:
            raise ValueError("judge_url is needed when the reward asks the judge ('judge', 'judge:pairwise') or gold_judge_every > 0")
        return self


class PPOSettings(RLSettings):
    """How PPO trains: the shared settings plus the critic's (GAE, the clipped value loss)."""

    gamma: float = Field(default=1.0, ge=0, le=1, description="Discount over the response tokens.")
    lam: float = Field(default=0.95, ge=0, le=1, description="GAE lambda.")
    cliprange_value: float = Field(default=0.2, gt=0, description="Value prediction clip around the old values.")
    vf_coef: float = Field(default=0.1, ge=0, description="Weight of the value loss.")
    whiten_rewards: bool = Field(default=False, description="Whiten per-token rewards before GAE.")


class PPOJob(PPOSettings, RLJob):
    """One `cai train ppo` run."""


class OnlineDPOSettings(RLSettings):
    """How online DPO trains (Guo et al. 2024): two answers per prompt from the current policy, labelled, then the
    DPO loss on the batch's pairs. The shared settings, with beta, rpo_alpha and one step per batch by default."""

    beta: float = Field(default=0.1, gt=0, description="DPO's beta: the strength of the implicit KL to the reference "
                        "(the adapter switched off); kl_coef is not used.")
    rpo_alpha: float = Field(default=0.0, ge=0, description="Weight of the preferred answers' NLL added to the loss (RPO, "
                             "as `cai train dpo`): a token mean over each minibatch's preferred answers.")
    mini_batches: int = Field(default=1, ge=1, description="Minibatches of pairs per epoch; must divide the batch's "
                              "batch_size / 2 pairs. 1 (with ppo_epochs 1) is one gradient step per batch, as TRL's "
                              "OnlineDPOTrainer takes.")

    UNUSED: ClassVar[dict[str, str]] = {
        "kl_coef": "beta is the strength of the KL to the reference",
        "adaptive_kl": "beta is fixed", "kl_target": "beta is fixed", "kl_horizon": "beta is fixed",
        "cliprange": "the DPO loss has no ratio to clip", "ent_coef": "the DPO loss has no entropy bonus",
    }
    """Shared RL settings online DPO has no use for, with why; a value other than the default is refused (not ignored)."""

    @property
    def num_generations(self) -> int:
        """Answers sampled per prompt: a pair (GRPO's setting of the same name, fixed here)."""
        return 2

    @model_validator(mode="after")
    def _whole_pairs(self) -> OnlineDPOSettings:
        for name, why in self.UNUSED.items():
            if getattr(self, name) != type(self).model_fields[name].default:
                raise ValueError(f"online DPO does not use {name} ({getattr(self, name)!r}): {why}; leave it out")
        if self.batch_size % 2 or (self.batch_size // 2) % self.mini_batches:
            raise ValueError(f"batch_size ({self.batch_size}) counts answers, two per prompt: it must be even, and its "
                             f"{self.batch_size // 2} pairs divisible by mini_batches ({self.mini_batches})")
        return self


class OnlineDPOJob(OnlineDPOSettings, RLJob):
    """One `cai train online-dpo` run."""

    reward: str = Field(default="judge:pairwise", description="Who labels each pair: 'judge:pairwise' (the judge compares "
                        "the two answers in both orders: a soft label; needs judge_url), or any reward `cai train ppo` "
                        "takes (a reward-model folder, 'judge', a rule), whose higher-scored answer is preferred.")


class GRPOSettings(RLSettings):
    """How GRPO and RLOO train (`cai.train.rl.grpo`): K answers per prompt, each answer's advantage its score
    against the others of its group, no value model. The names are TRL's where TRL has one."""

    num_generations: int = Field(default=4, ge=2, description="K: answers sampled per prompt, the group each answer is "
                                 "compared with; batch_size counts answers, so an iteration has batch_size / K prompts.")
    advantage: Literal["grpo", "rloo"] = Field(default="grpo", description="The baseline an answer's score is compared "
                                               "with: grpo, its group's mean (Shao et al. 2024); rloo, the mean of the "
                                               "other K-1 (Ahmadian et al. 2024).")
    scale_rewards: Literal["group", "batch", "none"] = Field(default="group", description="Divide each advantage by the "
                                                            "std of its group's scores (GRPO), of the batch's, or by "
                                                            "nothing (Dr. GRPO, Liu et al. 2025; RLOO).")
    loss_aggregation: Literal["sequence", "token", "constant"] = Field(default="sequence", description="How token losses "
                                                                       "make the loss: sequence, the mean of each answer's "
                                                                       "token mean (GRPO paper); token, the mean over all "
                                                                       "tokens (DAPO); constant, the sum over tokens / "
                                                                       "(answers * response_length) (Dr. GRPO).")
    kl_in: Literal["loss", "reward"] = Field(default="loss", description="Where the KL penalty (kl_coef) goes: loss, "
                                             "kl_coef * k3 added to every token's loss (GRPO paper); reward, kl_coef * "
                                             "the answer's summed KL (kl_estimator) subtracted from its score before the "
                                             "advantages (RLOO, as TRL's RLOOTrainer). kl_coef 0: no penalty.")
    cliprange_high: float | None = Field(default=None, gt=0, description="Upper clip of the ratio, 1 + cliprange_high "
                                         "(DAPO's clip-higher, e.g. 0.28); null = cliprange.")

    @model_validator(mode="after")
    def _whole_groups(self) -> GRPOSettings:
        if self.batch_size % self.num_generations:
            raise ValueError(f"batch_size ({self.batch_size}) counts answers and must be divisible by num_generations "
                             f"({self.num_generations}), the answers per prompt")
        if self.cliprange >= 1:
            raise ValueError(f"cliprange ({self.cliprange}) must be below 1: the ratio's lower clip is 1 - cliprange")
        return self


class GRPOJob(GRPOSettings, RLJob):
    """One `cai train grpo` run."""


class RLOOJob(GRPOJob):
    """One `cai train rloo` run: the GRPO trainer with RLOO's defaults (leave-one-out baseline, no scaling, the KL
    folded into the score), as Ahmadian et al. 2024 and TRL's RLOOTrainer."""

    advantage: Literal["grpo", "rloo"] = Field(default="rloo", description=GRPOSettings.model_fields["advantage"].description)
    scale_rewards: Literal["group", "batch", "none"] = Field(default="none",
                                                            description=GRPOSettings.model_fields["scale_rewards"].description)
    kl_in: Literal["loss", "reward"] = Field(default="reward", description=GRPOSettings.model_fields["kl_in"].description)
