"""The shared RL trainer (`cai.train.rl.trainer`) as an algorithm without a critic uses it: a policy with no
value head, and each prompt taken K times in adjacent rows (PPO's own use is tests/test_ppo.py)."""

from __future__ import annotations

import json

import pytest
import torch

from cai.train.losses import token_logprobs
from cai.train.rl.build import build_rl_trainer
from cai.train.rl.sampling import sample
from cai.train.rl.settings import PPOJob
from cai.train.rl.trainer import RLTrainer

K = 4


class Criticless(RLTrainer):
    """The rollouts of an algorithm without a value head, each prompt K times (GRPO's shape)."""

    def prompt_indices(self, iteration: int) -> list[int]:
        groups = self.cfg.batch_size // K
        order = torch.randperm(len(self.prompts), generator=torch.Generator().manual_seed(self.cfg.seed + iteration))
        return [i for i in order[:groups].tolist() for _ in range(K)]


@pytest.fixture
def trainer(tmp_path, tiny_model_dir):
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": f"Tell me about thing {i}."}) + "\n" for i in range(6)))
    cfg = PPOJob(model=str(tiny_model_dir), reward="rule:share=e", prompts=str(prompts), out=str(tmp_path / "out"), batch_size=8,
                 mini_batches=1, response_length=8, missing_eos_penalty=None, lora_target_modules=["q_proj", "v_proj"], seed=1)
    made = build_rl_trainer(Criticless, cfg)
    yield made
    made.close()


def test_a_policy_without_a_value_head_samples_and_evaluates_log_probs_only(trainer):
    assert trainer.model.value_head is None
    assert not any("value_head" in name for name, _ in trainer.model.named_parameters())
    torch.manual_seed(3)
    with torch.no_grad():  # a non-zero adapter, so the policy is not the reference
        for p in trainer.params:
            p.add_(0.05 * torch.randn_like(p))
    query, query_mask = trainer.batch_queries(trainer.prompt_indices(0))
    tok = trainer.tokenizer
    with torch.no_grad():
        generated, recorded = sample(trainer.model, query, query_mask, max_new_tokens=8, temperature=1.0, stop_ids=[tok.eos_token_id],
                                     pad_id=tok.pad_token_id, seed=5)
        assert recorded is not None, "the log-probs must be read off the sampling steps without a value head too"
        logprobs, values = recorded
        assert values is None
        logits, no_values = trainer.model(torch.cat([query, generated], 1), torch.cat([query_mask, torch.ones_like(generated)], 1),
                                          generated.shape[1])
    assert no_values is None
    torch.testing.assert_close(logprobs, token_logprobs(logits.float(), generated), atol=1e-4, rtol=1e-4)

    r = trainer.rollout(0)
    assert r.values is None
    assert r.logprobs.shape == r.ref_logprobs.shape == r.mask.shape == (8, 8)
    on = r.mask.bool()
    assert (r.logprobs - r.ref_logprobs)[on].abs().max() > 1e-3  # the adapter's policy, against the reference's


def test_each_prompt_k_times_in_adjacent_rows_samples_distinct_answers(trainer):
    r = trainer.rollout(0)
    groups = [r.prompts[g * K:(g + 1) * K] for g in range(len(r.prompts) // K)]
    assert all(len(set(g)) == 1 for g in groups) and len({g[0] for g in groups}) == len(groups)
    answers = [r.responses[g * K:(g + 1) * K] for g in range(len(groups))]
    # a row's sampling key is its place in the batch, not its prompt: a group's K answers differ
    assert all(len({tuple(a.tolist()) for a in group}) == K for group in answers), answers
