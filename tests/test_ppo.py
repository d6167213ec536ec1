"""PPO on the tiny model: settings, sampling with the policy's statistics read off generation, and real runs
(the arithmetic is in test_ppo_math.py)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from transformers import GenerationConfig, LogitsProcessorList

from cai.errors import ConfigError
from cai.pinning import RunMismatchError
from cai.settings_file import load_settings
from cai.train.losses import token_logprobs
from cai.train.rl.ppo import PPOJob, build_trainer, run_ppo
from cai.seeded_sampling import SeededSampler, seeded_uniforms
from cai.train.rl.sampling import merged_adapter, sample

# -- config --------------------------------------------------------------------------------


def test_config_errors_name_the_problem(tmp_path):
    base = dict(model="m", reward="rule:length", prompts="p", out="o")
    with pytest.raises(ConfigError, match=r"batch_size \(8\) must be divisible by mini_batches \(3\)"):
        load_settings(None, {**base, "batch_size": 8, "mini_batches": 3}, schema=PPOJob)
    with pytest.raises(ConfigError, match="judge_url is needed"):
        load_settings(None, {**base, "reward": "judge"}, schema=PPOJob)
    with pytest.raises(ConfigError, match="drop lm_head"):
        load_settings(None, {**base, "rollout_backend": "vllm", "lora_target_modules": ["lm_head", "q_proj"]}, schema=PPOJob)
    bad = tmp_path / "ppo.yaml"
    bad.write_text("model: m\nreward: rule:length\nprompts: p\nout: o\nkl_coeff: 0.1\n")
    with pytest.raises(ConfigError, match=r"ppo.yaml: kl_coeff: Extra inputs"):
        load_settings(bad, {}, schema=PPOJob)


# -- real runs on the tiny model -------------------------------------------------------------

PROMPTS = [f"Tell me about thing {i}." for i in range(16)]


@pytest.fixture(scope="module")
def prompt_file(tmp_path_factory) -> str:
    path = tmp_path_factory.mktemp("ppo-prompts") / "prompts.jsonl"
    path.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in PROMPTS))
    return str(path)


def ppo_cfg(tiny_model_dir, prompt_file, out, **kw) -> PPOJob:
    settings = dict(model=str(tiny_model_dir), reward="rule:share=e", prompts=prompt_file, out=str(out), batch_size=16, mini_batches=2,
                    ppo_epochs=4, response_length=8, lr=5e-3, kl_coef=0.01, missing_eos_penalty=None,
                    lora_target_modules=["lm_head", "q_proj", "v_proj"], seed=1)
    return PPOJob(**{**settings, **kw})


def metrics(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("merged,cache", [(False, "dynamic"), (True, "dynamic"), (True, "static")],
                         ids=["adapter", "merged", "merged-static-cache"])
def test_logprobs_and_values_read_off_generation_match_a_forward_pass(tmp_path, tiny_model_dir, prompt_file, merged, cache):
    """PPO takes the policy's log-probs and values from generate's own decoding steps instead of a
    second forward pass: they must equal that pass's on every response token (up to the KV cache's
    float error), and the hooks must not change what is sampled. With the adapter merged into a copy
    of the weights for sampling, the same holds up to the merge's rounding."""
    trainer = build_trainer(ppo_cfg(tiny_model_dir, prompt_file, tmp_path / "ppo", batch_size=6, response_length=12))
    assert_rollout_statistics_match_a_forward_pass(trainer, merged, cache)


def assert_rollout_statistics_match_a_forward_pass(trainer, merged: bool, cache: str) -> None:
    torch.manual_seed(3)
    with torch.no_grad():  # a non-zero adapter (lm_head included) and value head
        for p in trainer.params:
            p.add_(0.05 * torch.randn_like(p))
    trainer.model.eval()
    # A model's own generation config must not reshape PPO's sampling distribution.
    trainer.model.lm.get_base_model().generation_config.min_p = 0.9
    query, query_mask = trainer.batch_queries(trainer.prompt_indices(0))
    tok = trainer.tokenizer
    with torch.no_grad():
        generated, recorded = sample(trainer.model, query, query_mask, max_new_tokens=12, temperature=0.7,
                                     stop_ids=[tok.eos_token_id], pad_id=tok.pad_token_id, seed=11, merged=merged, cache=cache)
        assert trainer.model.lm.get_base_model().generation_config.min_p == 0.9  # put back
        base = trainer.model.lm.get_base_model()
        base.generation_config = GenerationConfig(max_new_tokens=12, do_sample=False, eos_token_id=tok.eos_token_id,
                                                  pad_token_id=tok.pad_token_id)
        plain = trainer.model.lm.generate(input_ids=query, attention_mask=query_mask, logits_processor=LogitsProcessorList(
            [SeededSampler(11, torch.arange(6), 0.7, query.shape[1])]))[:, query.shape[1]:]
        assert torch.equal(generated, plain)
        assert recorded is not None
        logprobs, values = recorded
        n = generated.shape[1]
        assert logprobs.shape == values.shape == (6, n)
        is_eos = generated == tok.eos_token_id
        first_eos = torch.where(is_eos.any(1), is_eos.int().argmax(1), n)
        mask = (torch.arange(n, device=generated.device).unsqueeze(0) <= first_eos.unsqueeze(1)).long()
        logits, expected_values = trainer.model(torch.cat([query, generated], 1), torch.cat([query_mask, mask], 1), n)
        expected = token_logprobs(logits.float() / 0.7, generated)
    on = mask.bool()
    assert on.sum() > 6
    torch.testing.assert_close(logprobs[on], expected[on], atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(values[on], expected_values[on], atol=1e-4, rtol=1e-4)
    assert logprobs[on].std() > 0.1 and values[on].std() > 1e-3  # a real spread, not constants that agree by accident


def tiny_family_model(folder: Path, family: str, tokenizer_dir: Path) -> Path:
    """A tiny random model of `family`, saved and loaded like a user's, with its logit transform made to bite:
    Granite divides the LM head's output by logits_scaling, Gemma-2 soft-caps it, Cohere multiplies it by
    logit_scale (all inside the causal LM's forward, after the head)."""
    from transformers import (AutoTokenizer, CohereConfig, CohereForCausalLM, Gemma2Config, Gemma2ForCausalLM, GraniteConfig,
                              GraniteForCausalLM, LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM)

    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    shape = dict(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2,
                 num_key_value_heads=2, head_dim=32, initializer_range=0.2, bos_token_id=tok.bos_token_id or tok.eos_token_id,
                 eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id, tie_word_embeddings=True)
    config_cls, model_cls, extra = {
        "llama": (LlamaConfig, LlamaForCausalLM, {}),
        "qwen2": (Qwen2Config, Qwen2ForCausalLM, {}),
        "gemma2": (Gemma2Config, Gemma2ForCausalLM, {"final_logit_softcapping": 2.0, "query_pre_attn_scalar": 32,
                                                     "sliding_window": 4}),
        "granite": (GraniteConfig, GraniteForCausalLM, {"logits_scaling": 8.0}),
        "cohere": (CohereConfig, CohereForCausalLM, {"logit_scale": 4.0}),
    }[family]
    if family == "cohere":
        shape.pop("head_dim")
    torch.manual_seed(0)
    model = model_cls(config_cls(**shape, **extra))
    model.generation_config.eos_token_id, model.generation_config.pad_token_id = tok.eos_token_id, tok.pad_token_id
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


@pytest.mark.parametrize("family", ["llama", "qwen2", "gemma2", "granite", "cohere"])
def test_rollout_statistics_of_models_that_transform_their_logits_match_a_forward_pass(tmp_path, tiny_model_dir, prompt_file,
                                                                                         family):
    """The old log-probs are those of the distribution the model's forward returns (and generate samples),
    after any transform of the LM head's output (issue 27, item 1)."""
    model = tiny_family_model(tmp_path / family, family, tiny_model_dir)
    trainer = build_trainer(ppo_cfg(model, prompt_file, tmp_path / "ppo", batch_size=6, response_length=12))
    assert_rollout_statistics_match_a_forward_pass(trainer, merged=True, cache="dynamic")


def test_seeded_sampler_draws_from_the_softmax_at_the_temperature():
    """Inverse-CDF draws from hashed uniforms: over 20,000 steps each token's frequency is within 4 standard
    errors of softmax(logits / T); a token of probability 0 is never drawn; the uniforms are flat and the
    draws of different rows, steps and seeds are uncorrelated."""
    logits = torch.tensor([[2.0, 1.0, 0.0, -1.0, -3.0, float("-inf")]])
    probs = torch.softmax(logits / 0.8, -1)[0]
    n = 20_000
    counts = torch.zeros(6)
    for step in range(n):
        out = SeededSampler(5, torch.tensor([3]), 0.8, 0)(torch.zeros(1, step, dtype=torch.long), logits)
        assert torch.isfinite(out).sum() == 1
        counts[out.argmax()] += 1
    se = (probs * (1 - probs) / n).sqrt()
    assert ((counts / n - probs).abs() <= 4 * se + 1e-9).all(), (counts / n, probs)
    assert counts[5] == 0 and counts[4] > 0
    u = seeded_uniforms(5, torch.arange(50_000), 0)
    assert 0 <= u.min() and u.max() < 1 and abs(u.mean().item() - 0.5) < 0.005 and abs(u.var().item() - 1 / 12) < 0.002
    others = [seeded_uniforms(5, torch.arange(50_000), 1), seeded_uniforms(6, torch.arange(50_000), 0),
              seeded_uniforms(5, torch.arange(1, 50_001), 0)]
    assert all(abs(torch.corrcoef(torch.stack([u, o]))[0, 1].item()) < 0.02 for o in others)


def test_a_rows_sample_does_not_depend_on_the_rest_of_its_batch(tmp_path, tiny_model_dir, prompt_file):
    """What lets several processes split a batch: rows 3-5 sampled alone (with their keys) are the rows 3-5
    of the whole batch, and the same seed samples the same tokens again."""
    trainer = build_trainer(ppo_cfg(tiny_model_dir, prompt_file, tmp_path / "ppo", batch_size=6, response_length=10))
    every = trainer.prompt_indices(0)
    width = max(len(trainer.queries[i]) for i in every)
    tok = trainer.tokenizer
    kw = dict(max_new_tokens=10, temperature=1.0, stop_ids=[tok.eos_token_id], pad_id=tok.pad_token_id, seed=4)
    with torch.no_grad():
        whole, _ = sample(trainer.model, *trainer.batch_queries(every, width), **kw)
        again, _ = sample(trainer.model, *trainer.batch_queries(every, width), **kw)
        part, _ = sample(trainer.model, *trainer.batch_queries(every[3:], width), row_keys=torch.arange(3, 6), **kw)
        other, _ = sample(trainer.model, *trainer.batch_queries(every, width), **{**kw, "seed": 5})
    assert torch.equal(whole, again)
    assert torch.equal(whole[3:, :part.shape[1]], part)
    assert not torch.equal(whole, other)


def test_merged_adapter_samples_the_policy_and_gives_the_weights_back_untouched(tmp_path, tiny_model_dir, prompt_file):
    trainer = build_trainer(ppo_cfg(tiny_model_dir, prompt_file, tmp_path / "ppo"))
    lm = trainer.model.lm
    torch.manual_seed(0)
    with torch.no_grad():
        for p in trainer.params:
            p.add_(0.05 * torch.randn_like(p))
    before = {n: (p, p.detach().clone()) for n, p in lm.named_parameters()}
    ids = torch.randint(5, 500, (3, 9), device=trainer.device)
    with torch.no_grad():
        with_adapter = lm(input_ids=ids).logits
        with lm.disable_adapter():
            base = lm(input_ids=ids).logits
        with merged_adapter(lm) as ok:
            merged = lm(input_ids=ids).logits
        with pytest.raises(RuntimeError, match="boom"), merged_adapter(lm):
            raise RuntimeError("boom")
    assert ok
    torch.testing.assert_close(merged, with_adapter, atol=1e-5, rtol=1e-5)
    assert (merged - base).abs().max() > 0.1
    # The same Parameter objects (the optimiser holds the LoRA ones), bit for bit, the adapter on again.
    after = dict(lm.named_parameters())
    assert after.keys() == before.keys()
    for name, (param, value) in before.items():
        assert after[name] is param and torch.equal(param, value), name
    with torch.no_grad():
        assert torch.equal(lm(input_ids=ids).logits, with_adapter)


def test_merged_adapter_leaves_an_adapter_it_cannot_merge_alone(tiny_model_dir):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    lm = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_model_dir),
                        LoraConfig(task_type="CAUSAL_LM", r=4, target_modules=["q_proj"], use_dora=True))
    weights = {n: p for n, p in lm.named_parameters()}
    with merged_adapter(lm) as ok:
        assert not ok
        assert {n: p for n, p in lm.named_parameters()} == weights


def test_no_dropout_in_the_update_so_the_first_ratio_is_one(tmp_path, tiny_model_dir, prompt_file):
    """A model with attention dropout and a LoRA dropout: PPO's passes run without either, so on the
    first (and here only) minibatch of the first epoch pi/pi_old is 1 on every token."""
    import shutil

    from transformers import AutoConfig

    dropout_model = tmp_path / "dropout-model"
    shutil.copytree(tiny_model_dir, dropout_model)
    config = AutoConfig.from_pretrained(dropout_model)
    config.attention_dropout = 0.5
    config.save_pretrained(dropout_model)
    out = tmp_path / "ppo"
    run_ppo(ppo_cfg(dropout_model, prompt_file, out, iterations=1, batch_size=8, mini_batches=1, ppo_epochs=1, lora_dropout=0.5))
    (row,) = metrics(out)
    tolerance = 1e-8 if not torch.cuda.is_available() else 1e-4  # bf16 autocast on a GPU: sampling and update differ in rounding
    assert row["ppo/policy/clipfrac"] == 0.0 and row["ppo/policy/approxkl"] < tolerance, row


def test_under_bf16_autocast_the_frozen_base_is_bf16_and_what_trains_float32(tmp_path, tiny_model_dir, prompt_file):
    """A GPU's default (bf16 autocast), forced on the CPU: the frozen base (and reference) weights load in bf16,
    the LoRA adapter and value head stay float32 (and so their AdamW state), and an iteration, merged
    rollouts included, runs: finite metrics, a trained adapter that moved, ratio near one on the first minibatch."""
    trainer = build_trainer(ppo_cfg(tiny_model_dir, prompt_file, tmp_path / "ppo", precision="bf16", iterations=2, batch_size=8,
                                    mini_batches=1, ppo_epochs=1))
    frozen = {p.dtype for p in trainer.model.parameters() if not p.requires_grad}
    trained = {p.dtype for p in trainer.model.parameters() if p.requires_grad}
    assert frozen == {torch.bfloat16} and trained == {torch.float32}
    before = [p.detach().clone() for p in trainer.params]
    trainer.train()
    rows = metrics(tmp_path / "ppo")
    assert len(rows) == 2 and all(math.isfinite(v) for r in rows for v in r.values() if isinstance(v, float))
    assert rows[0]["ppo/policy/approxkl"] < 1e-3
    assert any(not torch.equal(b, p) for b, p in zip(before, trainer.params))
    assert {p.dtype for p in trainer.params} == {torch.float32}
    assert all(s["exp_avg"].dtype == torch.float32 for s in trainer.optimizer.state_dict()["state"].values())
    trainer.close()
    ppo_fp32 = build_trainer(ppo_cfg(tiny_model_dir, prompt_file, tmp_path / "fp32"))
    assert {p.dtype for p in ppo_fp32.model.parameters()} == {torch.float32}  # fp32 on a CPU (precision auto)


@pytest.mark.slow
def test_score_rises_while_kl_stays_bounded(tmp_path, tiny_model_dir, prompt_file):
    # Reward: the share of the response's characters that are "e". The random tiny model starts
    # near 0.1; seeds 1 and 2 reached 0.23-0.26 over the last 10 of 50 iterations when this test
    # was written, with KL at 11-20 nats per 8-token response.
    out = tmp_path / "ppo"
    run_ppo(ppo_cfg(tiny_model_dir, prompt_file, out, iterations=50))
    rows = metrics(out)
    first = sum(r["objective/scores"] for r in rows[:10]) / 10
    last = sum(r["objective/scores"] for r in rows[-10:]) / 10
    assert last > first + 0.05, (first, last)
    assert max(r["objective/kl"] for r in rows) < 40.0
    assert {"objective/kl", "objective/entropy", "ppo/policy/clipfrac", "ppo/val/vpred", "response/length_mean",
            "objective/rlhf_reward"} <= set(rows[-1])
    # The adapter, the value head and the tokenizer are saved and load back through peft.
    from peft import AutoPeftModelForCausalLM

    AutoPeftModelForCausalLM.from_pretrained(out / "final")
    assert (out / "final" / "value_head.pt").exists() and (out / "loss.png").exists()
    samples = [json.loads(line) for line in (out / "samples.jsonl").read_text().splitlines()]
    assert samples and {"prompt", "response", "score", "kl", "step"} <= set(samples[0])


@pytest.mark.slow
def test_adaptive_controller_raises_the_coefficient_when_kl_overshoots(tmp_path, tiny_model_dir, prompt_file):
    out = tmp_path / "ppo"
    run_ppo(ppo_cfg(tiny_model_dir, prompt_file, out, iterations=12, adaptive_kl=True, kl_target=0.5, kl_horizon=50))
    coefs = [r["objective/kl_coef"] for r in metrics(out)]
    assert coefs[0] == pytest.approx(0.01) and coefs[-1] > coefs[0] * 1.3  # at most 1.064x per iteration


@pytest.mark.slow
def test_resume_after_a_crash_equals_an_uninterrupted_run(tmp_path, tiny_model_dir, prompt_file):
    straight = ppo_cfg(tiny_model_dir, prompt_file, tmp_path / "straight", iterations=5, checkpoint_every=2, adaptive_kl=True,
                       kl_target=1.0, kl_horizon=100)
    run_ppo(straight)
    assert_crash_and_resume_repeat(straight, crash_at_iteration=4)


def assert_crash_and_resume_repeat(straight: PPOJob, crash_at_iteration: int) -> None:
    """Run `straight` again in another folder, crash it while scoring iteration `crash_at_iteration`,
    rerun it as a user would, and require every logged metric of the finished run to equal the
    uninterrupted run's (`straight`, already run)."""
    from cai.train.settings import pin_trainer_settings
    from cai.train.rewards import RuleScorer

    checkpointed = (crash_at_iteration - 1) // straight.checkpoint_every * straight.checkpoint_every
    assert 0 < checkpointed < crash_at_iteration - 1  # so the rerun resumes and repeats logged iterations

    crashy = straight.model_copy(update={"out": str(Path(straight.out).with_name("crashy"))})
    rule, calls = RuleScorer(straight.reward), {"n": 0}

    def crashing(prompts, responses, *, first_row=0):
        calls["n"] += 1
        if calls["n"] == crash_at_iteration:
            raise RuntimeError("simulated crash")
        return rule(prompts, responses, first_row=first_row)

    crashing.name = rule.name  # the same reward, logged under the same part name (reward/<name>)
    pin_trainer_settings(crashy, Path(crashy.out))
    trainer = build_trainer(crashy, scorer=crashing)
    try:
        with pytest.raises(RuntimeError, match="simulated crash"):
            trainer.train()
    finally:
        trainer.close()
    assert len(metrics(Path(crashy.out))) == crash_at_iteration - 1  # logged past the checkpoint, then lost with the crash
    run_ppo(crashy)  # a fresh process would do the same: resumes from the checkpoint
    timing = {"seconds", "time/rollout_s", "time/score_s", "time/evaluate_s", "time/update_s"}
    strip = [{k: v for k, v in r.items() if k not in timing} for r in metrics(Path(straight.out))]
    got = [{k: v for k, v in r.items() if k not in timing} for r in metrics(Path(crashy.out))]
    assert [r["step"] for r in got] == list(range(1, straight.iterations + 1))
    for a, b in zip(strip, got):
        assert a.keys() == b.keys()
        for k in a:
            assert b[k] == pytest.approx(a[k], rel=1e-4, abs=1e-6), (a["step"], k)


@pytest.mark.slow
def test_changed_settings_refuse_to_resume(tmp_path, tiny_model_dir, prompt_file):
    c = ppo_cfg(tiny_model_dir, prompt_file, tmp_path / "ppo", iterations=1)
    run_ppo(c)
    with pytest.raises(RunMismatchError, match=r"other settings \(lr: was 0\.005, now 0\.001\)"):
        run_ppo(c.model_copy(update={"lr": 1e-3}))
    # A run made before a setting existed (its run.json lacks it) resumes under that setting's default,
    # and is still refused when the setting is given another value.
    saved = Path(c.out) / "run.json"
    saved.write_text(json.dumps({k: v for k, v in json.loads(saved.read_text()).items() if k != "merged_rollouts"}))
    assert "merged_rollouts" not in saved.read_text()
    with pytest.raises(RunMismatchError, match=r"other settings \(merged_rollouts: was True, now False\)"):
        run_ppo(c.model_copy(update={"merged_rollouts": False}))
    run_ppo(c)


@pytest.fixture(scope="module")
def reward_model(tmp_path_factory, tiny_model_dir) -> Path:
    """A reward model trained for two steps by `cai train rm`, as its final/ folder."""
    from cai.train.settings import TrainJob
    from cai.train.run import run_training

    folder = tmp_path_factory.mktemp("rm")
    pairs = folder / "pairs.jsonl"
    pairs.write_text("".join(json.dumps({"prompt": p, "chosen": "Sure, here is a calm answer.", "rejected": "No."}) + "\n"
                             for p in PROMPTS))
    run_training(TrainJob(kind="rm", model=str(tiny_model_dir), data=str(pairs), out=str(folder / "rm"), max_steps=2,
                             eval_fraction=0.0, batch_size=4))
    return folder / "rm" / "final"


@pytest.mark.slow
def test_reward_model_from_cai_train_rm_scores_the_rollouts(tmp_path, tiny_model_dir, prompt_file, reward_model):
    out = tmp_path / "ppo"
    run_ppo(ppo_cfg(tiny_model_dir, prompt_file, out, reward=str(reward_model), iterations=2, batch_size=4))
    rows = metrics(out)
    assert len(rows) == 2 and all(math.isfinite(r["objective/scores"]) for r in rows)
    # Same texts through the scorer again give the logged scores (the reward model is deterministic).
    from cai.train.rewards import load_scorer

    samples = [json.loads(line) for line in (out / "samples.jsonl").read_text().splitlines()]
    again = load_scorer(str(reward_model))([s["prompt"] for s in samples], [s["response"] for s in samples])
    assert again == pytest.approx([s["score"] for s in samples], abs=1e-4)


def test_the_reward_model_scores_at_the_runs_precision(tmp_path, tiny_model_dir, prompt_file, reward_model):
    """Under bf16 (a GPU's `auto`) the reward model holds its weights in bfloat16 and scores under the policy's autocast,
    as TRL's reward models do: its scores then differ from float32's by rounding only. At fp32 it is float32 throughout."""
    from cai.train.rewards import load_scorer

    texts = ["Sure, here is a calm answer.", "No.", "I would rather not say.", "Here are three steps you can take."]
    prompts = PROMPTS[:len(texts)]
    scorers = {}
    for precision in ("fp32", "bf16"):
        trainer = build_trainer(ppo_cfg(tiny_model_dir, prompt_file, tmp_path / precision, reward=str(reward_model),
                                        precision=precision))
        scorers[precision] = trainer.scorer
        assert {p.dtype for p in trainer.scorer.model.parameters()} == {torch.float32 if precision == "fp32" else torch.bfloat16}
    full, half = (scorers[p](prompts, texts) for p in ("fp32", "bf16"))
    assert full == pytest.approx(load_scorer(str(reward_model))(prompts, texts), abs=1e-6)  # the default is float32
    spread = max(full) - min(full)
    assert spread > 0 and half != full  # bf16 did run, and there are scores to tell apart
    assert half == pytest.approx(full, abs=0.05 * spread + 1e-3)


@pytest.mark.slow
def test_a_policy_that_says_nothing_is_scored_not_a_crash(tmp_path, tiny_model_dir, prompt_file, reward_model):
    """Every rollout starts with EOS (the LM head is pushed to it), so every decoded answer is empty:
    the reward model scores the documented placeholder, and the run (and a rerun of it) finishes."""
    from cai.train.settings import pin_trainer_settings
    from cai.train.rewards import load_scorer
    from judge_server.protocol import EMPTY_RESPONSE

    cfg = ppo_cfg(tiny_model_dir, prompt_file, tmp_path / "ppo", reward=str(reward_model), iterations=2, batch_size=4,
                  checkpoint_every=1, log_samples_every=1)
    pin_trainer_settings(cfg, Path(cfg.out))
    trainer = build_trainer(cfg)
    eos = trainer.tokenizer.eos_token_id

    def say_nothing(module, args, logits):
        return logits.index_add(-1, torch.tensor([eos], device=logits.device), torch.full_like(logits[..., :1], 1e4))

    trainer.model.lm.get_base_model().get_output_embeddings().register_forward_hook(say_nothing)
    trainer.train()
    rows, samples = metrics(Path(cfg.out)), [json.loads(line) for line in (Path(cfg.out) / "samples.jsonl").read_text().splitlines()]
    assert [r["response/length_mean"] for r in rows] == [1.0, 1.0] and all(r["response/eos_rate"] == 1.0 for r in rows)
    assert samples and {s["response"] for s in samples} == {""}
    placeholder = load_scorer(str(reward_model))([s["prompt"] for s in samples], [EMPTY_RESPONSE] * len(samples))
    assert [s["score"] for s in samples] == pytest.approx(placeholder, abs=1e-4)
    run_ppo(cfg)  # the finished run reruns as a no-op, from its checkpoint


@pytest.mark.slow
def test_judge_as_reward_and_gold_score_over_http(tmp_path, tiny_model_dir, prompt_file, judge, monkeypatch):
    from tests.conftest import JUDGE_KEY

    monkeypatch.setenv("CAI_JUDGE_API_KEY", JUDGE_KEY)
    out = tmp_path / "ppo"
    run_ppo(ppo_cfg(tiny_model_dir, prompt_file, out, reward="judge", judge_url=judge.url, gold_judge_every=1, iterations=2,
                    batch_size=4))
    rows = metrics(out)
    for r in rows:
        assert -1.0 <= r["objective/scores"] <= 1.0
        assert r["eval/judge_score"] == pytest.approx(r["objective/scores"], abs=1e-6)  # same judge, same samples


@pytest.mark.slow
def test_a_reward_that_pays_for_length_trips_the_verbosity_monitor(tmp_path, tiny_model_dir, prompt_file):
    """A real run built to fail: SFT teaches the tiny model to stop after a few words, then PPO
    with `rule:length` pays per character. The verbosity monitor reads the run's metrics.jsonl
    (as `cai eval` does) and flags it; the same monitor on the `rule:share=e` run above, whose
    responses already use the whole budget, does not."""
    from cai.evaluate import training_history
    from cai.monitors import verbosity
    from cai.train.merge import merge_lora
    from cai.train.run import run_training
    from cai.train.settings import TrainJob

    short = tmp_path / "short.jsonl"
    short.write_text("".join(json.dumps({"messages": [{"role": "user", "content": p}, {"role": "assistant", "content": "Ok, sure thing."}]}) + "\n"
                             for p in PROMPTS))
    run_training(TrainJob(kind="sft", model=str(tiny_model_dir), data=str(short), out=str(tmp_path / "sft"), epochs=30, lr=1e-3,
                             batch_size=8, eval_fraction=0.0, lora_target_modules=["lm_head", "q_proj", "v_proj"]))
    sft_model = merge_lora(tmp_path / "sft" / "final", tmp_path / "sft" / "merged")
    out = tmp_path / "ppo"
    run_ppo(ppo_cfg(sft_model, prompt_file, out, reward="rule:length", response_length=32, iterations=20, kl_coef=0.01))
    lengths, _ = training_history(out)
    assert lengths[0]["length_mean"] < 16, lengths[0]  # the SFT model stops early (12.6 of 24 tokens when written)
    verdict = verbosity(lengths)
    assert verdict.flagged, verdict.message
    assert verdict.figures["growth"] > 1.5

    clean = tmp_path / "clean"
    run_ppo(ppo_cfg(tiny_model_dir, prompt_file, clean, iterations=10, response_length=8))
    quiet = verbosity(training_history(clean)[0])
    assert not quiet.flagged and not quiet.figures["insufficient"], quiet.message


@pytest.mark.slow
def test_vllm_rollouts_sample_from_the_synced_adapter(tmp_path, tiny_model_dir, prompt_file):
    """vLLM loads the base once and each iteration's adapter by path: greedy answers with a (random,
    non-zero) adapter match transformers + peft with the same adapter and differ from the base's.
    The model's generation_config lists a second EOS id (as Qwen2.5-Instruct's does): both backends
    stop on either and end on the token they sampled, with nothing appended after it.
    Then a short PPO run samples through vLLM end to end, and a crash and rerun repeat it exactly."""
    import shutil

    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from cai.models import stop_token_ids
    from cai.train.rl.vllm_rollouts import VllmRollouts
    from tests.conftest import needs_vllm

    needs_vllm()

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    eos = tok.eos_token_id
    torch.manual_seed(0)
    peft_model = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32),
                                LoraConfig(r=8, lora_alpha=16, target_modules="all-linear", init_lora_weights=False)).eval()
    queries = [tok.apply_chat_template([{"role": "user", "content": p}], tokenize=True, add_generation_prompt=True)
               for p in PROMPTS[:6]]
    queries = [q["input_ids"] if isinstance(q, dict) or hasattr(q, "keys") else q for q in queries]

    def transformers_greedy(stops: list[int]) -> list[list[int]]:
        with torch.no_grad():
            return [peft_model.generate(input_ids=torch.tensor([q]), max_new_tokens=8, do_sample=False, eos_token_id=stops,
                                        pad_token_id=tok.pad_token_id)[0, len(q):].tolist() for q in queries]

    # The second EOS id: a token that some greedy answer samples first at a position k >= 1, so it must stop there.
    plain = transformers_greedy([eos])
    row, k = next((r, k) for r, ids in enumerate(plain) for k in range(1, len(ids)) if ids[k] != eos and ids[k] not in ids[:k])
    second = plain[row][k]
    model = tmp_path / "two-eos"
    shutil.copytree(tiny_model_dir, model)
    generation = GenerationConfig.from_pretrained(model)
    generation.eos_token_id = [eos, second]
    generation.save_pretrained(model)
    stops = stop_token_ids(tok, GenerationConfig.from_pretrained(model))
    assert stops == sorted({eos, second})
    expected = transformers_greedy(stops)
    assert expected[row] == plain[row][:k + 1]

    rollouts = VllmRollouts(str(model), lora_rank=8, max_len=256, seed=0, kv_cache_gib=0.25)
    try:
        adapter = rollouts.sync_adapter(peft_model.save_pretrained, tmp_path / "adapters", 0)
        greedy = dict(max_tokens=8, temperature=0.0, stop_ids=stops, seed=0)
        with_adapter = rollouts.generate(queries, adapter, 0, **greedy)
        base = rollouts.generate(queries, None, 1, **greedy)
    finally:
        rollouts.close()
    agree = sum(a == b for x, y in zip(with_adapter, expected) for a, b in zip(x, y))
    assert agree >= 0.9 * sum(len(y) for y in expected), (with_adapter, expected)
    assert with_adapter != base
    assert with_adapter[row] == expected[row]  # stopped on the second EOS id, which it sampled; no EOS appended
    for ids in with_adapter + base:  # a stop id only ever as the last token
        assert not any(t in stops for t in ids[:-1]), ids

    # A short PPO run samples through vLLM end to end, and a crashed copy of it resumes exactly.
    out = tmp_path / "straight"
    cfg = ppo_cfg(model, prompt_file, out, iterations=4, batch_size=4, rollout_backend="vllm",
                  lora_target_modules="all-linear", checkpoint_every=2)
    run_ppo(cfg)
    rows = metrics(out)
    assert len(rows) == 4 and all(math.isfinite(r["objective/kl"]) and r["response/length_mean"] > 0 for r in rows)
    assert_crash_and_resume_repeat(cfg, crash_at_iteration=4)


def assert_vllm_rollouts_follow_the_trained_adapter(trainer_cls, cfg) -> None:
    """Any RL trainer on `cfg` (rollout_backend 'vllm') trains its `iterations` through vLLM's samples, then one more
    rollout syncs the adapter those updates made. vLLM's copy is the trained adapter tensor for tensor, its greedy
    answers through it are the trained policy's under transformers + peft (which the updates moved off the base
    model's), and the rows of one prompt (a group, a pair) are distinct samples."""
    from peft import get_peft_model_state_dict
    from safetensors.torch import load_file

    from cai.train.rl.build import build_rl_trainer
    from tests.conftest import needs_vllm

    needs_vllm()
    trainer = build_rl_trainer(trainer_cls, cfg)
    lm, k = trainer.model.lm, trainer.group_size
    try:
        trainer.train()
        rows = metrics(trainer.out)
        assert len(rows) == cfg.iterations and all(math.isfinite(r["objective/kl"]) and r["response/length_mean"] > 0 for r in rows)
        r = trainer.rollout(cfg.iterations)  # syncs the adapter after the last update
        adapter = trainer.out / "rollout-adapter" / f"iteration-{cfg.iterations}"
        synced, trained = load_file(adapter / "adapter_model.safetensors"), get_peft_model_state_dict(lm)
        assert synced.keys() == trained.keys() and all(torch.equal(synced[name], trained[name].cpu()) for name in synced)
        assert all(len(set(r.texts[i:i + k])) > 1 for i in range(0, cfg.batch_size, k)), r.texts

        queries = trainer.queries[:6]
        greedy = {"max_tokens": 8, "temperature": 0.0, "stop_ids": trainer.stop_ids, "seed": 0}
        through_vllm = trainer.vllm.generate(queries, adapter, cfg.iterations, **greedy)
        base_vllm = trainer.vllm.generate(queries, None, cfg.iterations + 1, **greedy)
    finally:
        trainer.close()

    def transformers_greedy() -> list[list[int]]:
        with torch.no_grad():
            return [lm.generate(input_ids=torch.tensor([q], device=trainer.device), max_new_tokens=8, do_sample=False,
                                eos_token_id=trainer.stop_ids, pad_token_id=trainer.tokenizer.pad_token_id)[0, len(q):].tolist()
                    for q in queries]

    expected = transformers_greedy()
    with lm.disable_adapter():
        base = transformers_greedy()
    assert expected != base  # the updates moved the greedy answers, so the comparison can tell the adapters apart
    agree = sum(a == b for x, y in zip(through_vllm, expected) for a, b in zip(x, y))
    assert agree >= 0.9 * sum(len(y) for y in expected), (through_vllm, expected)
    assert through_vllm != base_vllm


# -- several processes ----------------------------------------------------------------------



@pytest.mark.slow
@pytest.mark.parametrize("sharding", ["ddp", "fsdp"])
def test_two_processes_train_like_one_and_resume_after_a_crash(tmp_path, tiny_model_dir, prompt_file, sharding):
    """`cai train ppo` with 2 CPU processes (gloo), under torchrun's DDP or accelerate's FSDP2 with
    examples/accelerate/fsdp.yaml (weights sharded; tests/fsdp_on_cpu.py): each process samples and scores
    half of the batch, the whole batch is gathered for rewards, whitening and the KL controller, and each
    minibatch's gradient is the one-process one. So the sampled tokens and scores are the same as one
    process's, and the KL, coefficients and losses agree up to float error. Then a 2-process run that
    crashes at iteration 4 (checkpoint at 2) and is rerun with the same command finishes like them."""
    import sys

    from tests.fsdp_on_cpu import crash_in_iteration, launch, run_ok

    settings = dict(model=str(tiny_model_dir), reward="rule:share=e", prompts=prompt_file, batch_size=8, mini_batches=2,
                    ppo_epochs=2, response_length=8, iterations=5, lr=5e-3, kl_coef=0.01, adaptive_kl=True, kl_target=1.0,
                    kl_horizon=100, lora_target_modules=["q_proj", "v_proj"], checkpoint_every=2, seed=1)
    flags = [f"--{k.replace('_', '-')}={','.join(v) if isinstance(v, list) else v}" for k, v in settings.items()
             if k != "adaptive_kl"] + ["--adaptive-kl"]
    fsdp = sharding == "fsdp"

    def run(cmd, out):
        run_ok([*cmd, "--out", str(out)])

    run([sys.executable, "-m", "cai.cli", "train", "ppo", *flags], tmp_path / "one")
    run(launch(["train", "ppo", *flags], fsdp=fsdp), tmp_path / "two")

    crashy = tmp_path / "crashy"
    crash_in_iteration(tmp_path, settings, crashy, 4, "cai.train.rl.settings:PPOJob", "cai.train.rl.ppo:PPOTrainer", fsdp=fsdp)
    assert len(metrics(crashy)) == 3  # iteration 3 was logged past the checkpoint at 2, then lost with the crash
    run(launch(["train", "ppo", *flags], fsdp=fsdp), crashy)  # resumes from the checkpoint
    summary = json.loads((tmp_path / "two" / "summary.json").read_text())
    assert (summary["distributed"], summary["sharded"]) == (("FSDP", True) if fsdp else ("MULTI_CPU", False))
    assert (summary["fsdp_units"] >= 4) if fsdp else (summary["fsdp_units"] == 0)

    one, two, resumed = metrics(tmp_path / "one"), metrics(tmp_path / "two"), metrics(crashy)
    assert {r["processes"] for r in one} == {1} and {r["processes"] for r in two} == {r["processes"] for r in resumed} == {2}
    for rows in (two, resumed):
        assert [r["step"] for r in rows] == [1, 2, 3, 4, 5]
        assert [r["tokens"] for r in rows] == [r["tokens"] for r in one]  # the same responses
        for a, b in zip(one, rows):
            for k in ("objective/scores", "response/length_mean", "response/eos_rate"):
                assert b[k] == a[k], (a["step"], k)
            for k in ("objective/kl", "objective/kl_coef", "objective/entropy", "ppo/loss/policy", "ppo/loss/value",
                      "ppo/policy/approxkl", "ppo/val/vpred", "ppo/returns/mean"):
                assert b[k] == pytest.approx(a[k], rel=1e-4, abs=1e-5), (a["step"], k)  # 1e-6 when written
    assert one[-1]["objective/kl"] > 0.01 and one[-1]["objective/kl_coef"] != one[0]["objective/kl_coef"]  # it trained
    from safetensors.torch import load_file

    final = tmp_path / "two" / "final"
    adapter, value_head = load_file(final / "adapter_model.safetensors"), torch.load(final / "value_head.pt")
    assert sum("lora_B" in k for k in adapter) == 4 and all(v.abs().sum() > 0 for k, v in adapter.items() if "lora_B" in k)  # trained
    assert set(value_head) == {"weight", "bias"} and value_head["weight"].shape == (1, 128)  # whole, not a shard
    def samples(out):
        rows = map(json.loads, (out / "samples.jsonl").read_text().splitlines())
        return [(s["step"], s["prompt"], s["response"]) for s in rows]

    assert samples(tmp_path / "two") == samples(tmp_path / "one") and len(samples(tmp_path / "one")) == 4


GATHER_COUNT = '''
import json, sys
from pathlib import Path
import torch.distributed as dist
from cai.train.checkpoint import sharded_units
from cai.train.rl.ppo import PPOJob, build_trainer

trainer = build_trainer(PPOJob(**json.loads(Path(sys.argv[1]).read_text())))
real, calls = dist.all_gather_single, {"n": 0}

def counted(*args, **kwargs):  # the collective FSDP2 gathers a unit's weights with
    calls["n"] += 1
    return real(*args, **kwargs)

dist.all_gather_single = counted
out = {"units": sharded_units(trainer.model)}
for gather in (True, False):
    trainer.cfg = trainer.cfg.model_copy(update={"gather_for_generation": gather})
    calls["n"] = 0
    rollout = trainer.rollout(0)
    out[str(gather)] = {"gathers": calls["n"], "responses": rollout.responses.tolist(), "values": rollout.values.tolist(),
                      "lengths": rollout.mask.sum(1).tolist()}
if dist.get_rank() == 0:
    Path(sys.argv[2]).write_text(json.dumps(out))
'''


@pytest.mark.slow
def test_under_fsdp_each_layer_is_a_unit_gathered_once_per_rollout(tmp_path, tiny_model_dir, prompt_file):
    """Under FSDP the policy's decoder layers, embeddings and LM head are units of their own (the policy
    wrapper once hid the model's `_no_split_modules`, so the whole model was one unit, gathered whole for
    every forward). With `gather_for_generation` (the default) each unit is gathered once per rollout, not
    at each of its 16 decoding steps, and the rollout is the same."""
    from tests.fsdp_on_cpu import launch, run_ok

    settings = dict(model=str(tiny_model_dir), reward="rule:share=e", prompts=prompt_file, out=str(tmp_path / "run"), batch_size=8,
                    mini_batches=2, response_length=16, lora_target_modules=["q_proj", "v_proj"], seed=1)
    (tmp_path / "cfg.json").write_text(json.dumps(settings))
    (tmp_path / "count.py").write_text(GATHER_COUNT)
    run_ok(launch([str(tmp_path / "count.py"), str(tmp_path / "cfg.json"), str(tmp_path / "out.json")], fsdp=True))
    out = json.loads((tmp_path / "out.json").read_text())
    layers = [u for u in out["units"] if ".layers." in u]
    assert len(layers) == 2 and any(u.endswith("embed_tokens") for u in out["units"]) and "" in out["units"]
    kept, per_step = out["True"], out["False"]
    assert kept["responses"] == per_step["responses"] and kept["values"] == per_step["values"]
    assert max(kept["lengths"]) == 16  # generate ran all 16 decoding steps
    # 35 against 8 all-gathers when written
    assert per_step["gathers"] >= len(layers) * 16 and kept["gathers"] * 4 <= per_step["gathers"], (kept["gathers"], per_step["gathers"])


def test_a_batch_the_processes_cannot_share_is_refused(tmp_path, tiny_model_dir, prompt_file):
    from cai.train.rl.trainer import check_processes

    check_processes(ppo_cfg(tiny_model_dir, prompt_file, tmp_path, batch_size=8, mini_batches=2), 2, False)
    with pytest.raises(ConfigError, match=r"batch_size \(6\) must be divisible by the 4 processes"):
        check_processes(ppo_cfg(tiny_model_dir, prompt_file, tmp_path, batch_size=6, mini_batches=2), 4, False)
    with pytest.raises(ConfigError, match=r"batch_size / mini_batches = 2\) of at least 4 rows"):
        check_processes(ppo_cfg(tiny_model_dir, prompt_file, tmp_path, batch_size=8, mini_batches=4), 4, False)
    with pytest.raises(ConfigError, match="'vllm' runs in one process"):
        check_processes(ppo_cfg(tiny_model_dir, prompt_file, tmp_path), 2, True)


@pytest.mark.slow
@pytest.mark.parametrize("command", ["ppo", "grpo", "online-dpo"])
def test_every_rl_command_refuses_vllm_rollouts_across_processes(tmp_path, tiny_model_dir, prompt_file, command):
    """vLLM rollouts run in one process: `cai train ppo|grpo|online-dpo --rollout-backend vllm` launched in 2 processes
    stops with the config error, before vLLM starts (no engine log in the output folder)."""
    import subprocess

    from cai.engine_logs import POLICY_ENGINE_LOG
    from tests.fsdp_on_cpu import cpu_env, launch

    out = tmp_path / "run"
    flags = ["--model", str(tiny_model_dir), "--reward", "rule:length", "--prompts", prompt_file, "--batch-size", "8",
             "--lora-target-modules", "q_proj,v_proj", "--rollout-backend", "vllm", "--out", str(out)]
    done = subprocess.run(launch(["train", command, *flags], fsdp=False), env=cpu_env(), capture_output=True, text=True,
                          check=False)
    said = " ".join(done.stderr.split())  # the console wraps long lines
    assert done.returncode != 0 and "rollout_backend 'vllm' runs in one process; this launch has 2" in said, done.stderr[-3000:]
    assert not (out / POLICY_ENGINE_LOG).exists()


# -- sampling edge cases (issue 27, items 10) ---------------------------------------------------------

ROW_NEXT_TO_ONE = 6_875_368  # with seed 0 at step 0 its 53 random bits are within 2**-25 of 1 (found by a search)


def test_a_uniform_next_to_one_never_takes_a_zero_probability_last_token():
    """The uniform is built from its 53 bits in integers, then float64: strictly below 1 even where a float32
    would round it to 1.0, so the draw stays inside the cumulative softmax and a last token of probability
    zero (here -inf, and one that underflows to 0) is never taken."""
    rows = torch.tensor([ROW_NEXT_TO_ONE] * 3)
    u = seeded_uniforms(0, rows, 0)
    assert u.dtype == torch.float64 and (u < 1.0).all() and (u.float() == 1.0).all()  # the case float32 got wrong
    logits = torch.tensor([[0.0, 1.0, 2.0, float("-inf")], [3.0, -1.0, 0.5, -200.0], [1.0, 1.0, 1.0, float("-inf")]])
    out = SeededSampler(0, rows, 1.0, 0)(torch.zeros(3, 0, dtype=torch.long), logits)
    assert out.argmax(1).tolist() == [2, 2, 2]  # the last token of non-zero probability, as u is next to 1


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_logits_stop_sampling_with_a_typed_error_naming_the_row_and_step(bad):
    from cai.seeded_sampling import NonFiniteLogitsError

    logits = torch.tensor([[0.0, 1.0, 2.0], [0.5, bad, 1.0]])
    sampler = SeededSampler(0, torch.tensor([7, 9]), 1.0, 2)
    with pytest.raises(NonFiniteLogitsError, match=r"batch row 9 \(this process's row 1\) at response step 3"):
        sampler(torch.zeros(2, 5, dtype=torch.long), logits)
    all_masked = torch.tensor([[0.0, 1.0, 2.0], [float("-inf")] * 3])  # no token left to sample
    with pytest.raises(NonFiniteLogitsError, match="batch row 9"):
        sampler(torch.zeros(2, 2, dtype=torch.long), all_masked)


# -- the judge's principle of a row (issue 27, item 9) --------------------------------------------------


def test_a_rows_judge_request_is_seeded_by_its_place_in_the_whole_batch():
    """The judge samples each score's principle from the request's seed: a row's seed is its position in the
    whole iteration's batch, so the second of two processes (its rows start at 2) sends for its rows what one
    process sends for rows 2 and 3."""
    from cai.train.rewards import score_requests

    prompts, responses = [f"p{i}" for i in range(4)], ["a", "", "c", "d"]
    whole = score_requests(prompts, responses)
    second_half = score_requests(prompts[2:], responses[2:], first_row=2)
    assert [r.seed for r in whole] == [0, 1, 2, 3]
    assert second_half == whole[2:]


def test_the_trainer_tells_the_scorer_where_its_rows_start(tmp_path, tiny_model_dir, prompt_file):
    """The trainer passes each process's first row to the scorer (and the gold scorer): the second of two
    processes on a batch of 4 scores rows 2-3 (the process count and rank set by hand on one process,
    where accelerate's gathers return their input)."""
    seen = []

    def recording(prompts, responses, *, first_row=0):
        seen.append((prompts, first_row))
        return [0.0] * len(prompts)

    trainer = build_trainer(ppo_cfg(tiny_model_dir, prompt_file, tmp_path / "ppo", batch_size=4, response_length=2), scorer=recording,
                            gold_scorer=recording)
    trainer.cfg = trainer.cfg.model_copy(update={"gold_judge_every": 1})
    trainer.world, trainer.rank = 2, 1
    trainer.rollout(0)
    every = [trainer.prompts[i] for i in trainer.prompt_indices(0)]
    assert seen == [(every[2:], 2), (every[2:], 2)]


# -- merged rollouts under bf16 (issue 27, item 2) ----------------------------------------------------


def test_under_bf16_merged_rollouts_keep_the_whole_adapter(tmp_path, tiny_model_dir, prompt_file):
    """Under bf16 autocast (forced on the CPU) a merged W + BA would be rounded to bf16 at the matmul, and an
    adapter small next to W (|BA| / |W| about 4e-3, as early in training) rounded partly away: sampling would
    run another policy than the one the update trains. So `merged_adapter` leaves the adapter unmerged there,
    and what is sampled is the policy itself, bit for bit."""
    trainer = build_trainer(ppo_cfg(tiny_model_dir, prompt_file, tmp_path / "ppo", precision="bf16", batch_size=4,
                                    lora_target_modules=["q_proj", "v_proj"]))
    lm = trainer.model.lm
    torch.manual_seed(0)
    with torch.no_grad():  # lora_B from zero to a delta of |BA| / |W| ~ 4e-3
        for name, p in lm.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn_like(p) * 3e-4)
        layer = lm.base_model.model.model.layers[0].self_attn.q_proj
        ratio = (layer.get_delta_weight("default").norm() / layer.base_layer.weight.float().norm()).item()
    assert 1e-3 < ratio < 1e-2, ratio
    ids = torch.randint(5, 500, (3, 9), device=trainer.device)
    with torch.no_grad(), trainer._autocast():
        with_adapter = lm(input_ids=ids).logits.float()
        with lm.disable_adapter():
            base = lm(input_ids=ids).logits.float()
        with merged_adapter(lm) as ok:
            merged = lm(input_ids=ids).logits.float()
    assert (with_adapter - base).abs().max() > 1e-3  # the adapter does something
    assert not ok and torch.equal(merged, with_adapter), ((merged - with_adapter).norm() / (with_adapter - base).norm()).item()
    assert trainer.cfg.merged_rollouts  # on by default; under fp32 the same call merges (tests above)


@pytest.mark.slow
def test_under_bf16_the_first_minibatch_ratio_stays_one_after_updates(tmp_path, tiny_model_dir, prompt_file):
    """bf16 forced on the CPU, merged rollouts asked for: after 3 updates that move the adapter, the first (here
    only) minibatch of each iteration has no clipped token and a ratio within bf16's rounding of 1 (generate's
    KV-cached steps and the update's forward round differently in bf16: about 1e-2 nats at most per token)."""
    from cai.train.rl.ppo import PPOTrainer

    trainer = build_trainer(ppo_cfg(tiny_model_dir, prompt_file, tmp_path / "ppo", precision="bf16", batch_size=8, mini_batches=1,
                                    ppo_epochs=1, lr=2e-2))
    for i in range(3):
        trainer.ppo_iteration(i)
    moved = max(p.abs().max().item() for n, p in trainer.model.named_parameters() if "lora_B" in n)
    assert moved > 1e-3, moved
    r = trainer.rollout(3)
    with torch.no_grad(), trainer._autocast():
        logits, _ = trainer.trained(r.full, r.full_mask, trainer.cfg.response_length)
    new = PPOTrainer._response_logprobs(trainer, logits, r.responses)
    ratio = (new - r.logprobs)[r.mask.bool()].exp()
    assert (ratio - 1).abs().max() < 0.03, ratio
    record, _ = trainer.update(r)
    assert record["ppo/policy/clipfrac"] == 0.0 and record["ppo/policy/approxkl"] < 1e-4, record
