"""Building an RL trainer and running it: `build_rl_trainer` makes the collaborators of any `RLTrainer`
subclass from its job (prompts first, then the accelerator, the policy, the judge connection, the scorers
and, with vLLM rollouts, the engine) and `run_rl` pins the run's settings (run.json) and trains.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, TypeVar

from cai.train.rewards import Scorer
from cai.train.rl.settings import RLJob
from cai.train.rl.trainer import RLTrainer, check_processes

logger = logging.getLogger(__name__)

T = TypeVar("T", bound=RLTrainer)


def build_rl_trainer(trainer_cls: type[T], cfg: RLJob, *, scorer: Scorer | None = None, gold_scorer: Scorer | None = None) -> T:
    """A `trainer_cls` and its collaborators for `cfg`: policy (with a value head when `trainer_cls.has_value_head`)
    and tokenizer, prompts, the reward's scorer (or `scorer`), the judge for gold scores (or `gold_scorer`)
    and, with vLLM rollouts, the engine."""
    from accelerate import Accelerator

    from cai.judge import SyncJudge
    from cai.models import resolve_model
    from cai.prompts import PromptSourceError, load_prompts
    from cai.train.rewards import JudgeScorer, asks_judge, load_scorer
    from cai.train.rl.policy import load_policy

    # The prompts first: a bad prompt file is refused before a model loads or the judge is connected.
    prompts = [p.text for p in load_prompts(cfg.prompts, limit=cfg.max_prompts)]
    if not prompts:
        raise PromptSourceError(f"prompts {cfg.prompts!r}: no prompts to train on")
    accelerator = Accelerator(mixed_precision="no")  # one process, or this one's place in a launch
    group_size = getattr(cfg, "num_generations", 1)  # answers per prompt: grpo/rloo's K, online DPO's 2
    check_processes(cfg, accelerator.num_processes, cfg.rollout_backend == "vllm", group_size)
    device = accelerator.device
    policy, tokenizer = load_policy(cfg, device, value_head=trainer_cls.has_value_head)
    # One connection to the judge for the run, for the reward and the gold score alike; the API key comes
    # from $CAI_JUDGE_API_KEY in the client, the one place that reads it.
    needs_judge = (asks_judge(cfg.reward) and scorer is None) or (cfg.gold_judge_every and gold_scorer is None)
    judge = SyncJudge(cfg.judge_url) if needs_judge and cfg.judge_url else None
    scorer = scorer or load_scorer(cfg.reward, judge=judge, device=str(device), group_size=group_size, precision=cfg.precision)
    gold_scorer = gold_scorer or (JudgeScorer(judge) if cfg.gold_judge_every else None)
    vllm = None
    if cfg.rollout_backend == "vllm":
        from cai.engine_logs import POLICY_ENGINE_LOG
        from cai.train.rl.vllm_rollouts import VllmRollouts

        vllm = VllmRollouts(resolve_model(cfg.model).path, lora_rank=cfg.lora_r,
                            max_len=cfg.max_prompt_length + cfg.response_length + 16, seed=cfg.seed,
                            gpu_memory_utilization=cfg.vllm_gpu_memory_utilization, log_path=Path(cfg.out) / POLICY_ENGINE_LOG)
    return trainer_cls(cfg, policy=policy, tokenizer=tokenizer, prompts=prompts, scorer=scorer, gold_scorer=gold_scorer, vllm=vllm,
                       accelerator=accelerator)


def run_rl(cfg: RLJob, trainer_cls: type[RLTrainer]) -> dict[str, Any]:
    """One run of `trainer_cls` on job `cfg`: the settings pinned in the output folder (a resumed run must match),
    the trainer built, trained, closed; returns the summary."""
    from cai.train.settings import pin_trainer_settings

    out = Path(cfg.out)
    pin_trainer_settings(cfg, out)
    trainer = build_rl_trainer(trainer_cls, cfg)
    logger.info("%s: %d prompts, %d trainable parameters, output %s", trainer.name, len(trainer.prompts),
                sum(p.numel() for p in trainer.params), out)
    try:
        return trainer.train()
    finally:
        trainer.close()
