"""The generation policy's transformers backend: a prompt's samples depend on the seed and the prompt only."""

from __future__ import annotations

from cai.policy import Policy
from cai.samples import SamplingConfig

PROMPTS = ["hello there", "what is two plus two, tell me at length", "x", "a much longer prompt about gardens and weeds"]


def texts(rows):
    return [[s.text for s in r] for r in rows]


def test_a_prompts_samples_do_not_depend_on_its_batch(tiny_model_dir):
    """Shards and chunk sizes regroup prompts into other batches; each prompt must still get the same samples."""
    config = SamplingConfig(max_new_tokens=12, temperature=0.7, top_p=0.95)
    alone, together = Policy(str(tiny_model_dir), batch_size=1), Policy(str(tiny_model_dir), batch_size=4)
    one_by_one = texts(alone.sample(PROMPTS, n=2, config=config, seed=3))
    assert texts(together.sample(PROMPTS, n=2, config=config, seed=3)) == one_by_one
    assert texts(together.sample(PROMPTS[::-1], n=2, config=config, seed=3))[::-1] == one_by_one
    assert texts(together.sample(PROMPTS[1:3], n=2, config=config, seed=3)) == one_by_one[1:3]
    assert all(a != b for a, b in one_by_one), "a prompt's n samples must differ"
    other_seed = texts(together.sample(PROMPTS, n=2, config=config, seed=4))
    assert sum(a != b for a, b in zip(other_seed, one_by_one)) >= 3


def test_temperature_zero_is_greedy_and_the_same_for_every_sample(tiny_model_dir):
    rows = Policy(str(tiny_model_dir), batch_size=4).sample(PROMPTS, n=2, config=SamplingConfig(max_new_tokens=8, temperature=0), seed=1)
    assert all(r[0].text == r[1].text for r in rows)
    assert texts(Policy(str(tiny_model_dir), batch_size=4).sample(PROMPTS, n=2, config=SamplingConfig(max_new_tokens=8, temperature=0),
                                                                  seed=9)) == texts(rows)
