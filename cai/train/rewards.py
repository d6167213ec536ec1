"""What scores PPO's responses: a trained reward model, the judge's /v1/score, or a rule (for checks).

Every scorer takes the prompts and the decoded responses as text, so the reward model's tokenizer
can differ from the policy's. Specs, as `cai train ppo --reward` takes them:

- a folder written by `cai train rm` (its `final/` adapter, or a full sequence-classification model)
- `judge`: the judge server at `judge_url` scores each response under the constitution (direct RLAIF)
- `rule:length`: pays 1 per 100 characters (a reward that is easy to hack: shows verbosity drift)
- `rule:share=TEXT`: the share of the response's characters that are occurrences of TEXT

`first_row` is the position of the first of the given rows in the whole iteration's batch: with
several processes each scores its own share, and the judge seeds a row's principle with it, so a
row is scored under the same principle whatever the process count.

An empty (or blank) response, as when the policy's first token is EOS, is scored as the text
`judge_server.protocol.EMPTY_RESPONSE` by the reward model and the judge alike: what the policy
says never stops a run, and saying nothing gets whatever score the scorer gives to that.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

import torch

from cai.errors import ConfigError
from judge_server.protocol import or_placeholder

if TYPE_CHECKING:
    from cai.judge import SyncJudge
    from judge_server.protocol import ScoreRequest

logger = logging.getLogger(__name__)


class RewardSpecError(ConfigError):
    """A --reward value that names no scorer."""


class Scorer(Protocol):
    name: str

    def __call__(self, prompts: list[str], responses: list[str], *, first_row: int = 0) -> list[float]: ...


def load_scorer(spec: str, *, judge: SyncJudge | None = None, device: str = "cpu", max_length: int = 1024) -> Scorer:
    """The scorer `spec` names; reward 'judge' scores through `judge`, the run's connection to the judge."""
    if spec.startswith("rule:"):
        return RuleScorer(spec)
    if spec == "judge":
        if judge is None:
            raise RewardSpecError("reward 'judge' needs judge_url (the judge server's address, e.g. http://127.0.0.1:8000)")
        return JudgeScorer(judge)
    path = Path(spec)
    if path.is_dir():
        return RewardModelScorer(path, device=device, max_length=max_length)
    raise RewardSpecError(f"reward {spec!r}: not a reward-model folder, 'judge', 'rule:length' or 'rule:share=TEXT'")


class RuleScorer:
    def __init__(self, spec: str):
        self.name = spec
        if spec == "rule:length":
            self.rule, self.text = "length", ""
        elif spec.startswith("rule:share=") and len(spec) > len("rule:share="):
            self.rule, self.text = "share", spec[len("rule:share="):]
        else:
            raise RewardSpecError(f"unknown rule {spec!r}; use rule:length or rule:share=TEXT")

    def __call__(self, prompts: list[str], responses: list[str], *, first_row: int = 0) -> list[float]:
        if self.rule == "length":
            return [len(r) / 100.0 for r in responses]
        return [r.count(self.text) * len(self.text) / max(1, len(r)) for r in responses]


class RewardModelScorer:
    """A reward model from `cai train rm`: the prompt and response go through its own chat template."""

    def __init__(self, path: Path, *, device: str = "cpu", max_length: int = 1024, batch_size: int = 8):
        from transformers import AutoModelForSequenceClassification

        from cai.models import load_tokenizer

        self.name = str(path)
        self.device, self.max_length, self.batch_size = device, max_length, batch_size
        self.tokenizer = load_tokenizer(path)
        if (path / "adapter_config.json").exists():
            from peft import PeftModel

            base_path = json.loads((path / "adapter_config.json").read_text())["base_model_name_or_path"]
            base = AutoModelForSequenceClassification.from_pretrained(base_path, num_labels=1, dtype=torch.float32)
            base.config.pad_token_id = self.tokenizer.pad_token_id
            model = PeftModel.from_pretrained(base, path).merge_and_unload()
        else:
            model = AutoModelForSequenceClassification.from_pretrained(path, num_labels=1, dtype=torch.float32)
        model.config.pad_token_id = self.tokenizer.pad_token_id
        self.model = model.to(device).eval()

    @torch.no_grad()
    def __call__(self, prompts: list[str], responses: list[str], *, first_row: int = 0) -> list[float]:
        from cai.train.data import collate, tokenise_chat

        items = [tokenise_chat(self.tokenizer, [{"role": "user", "content": p}, {"role": "assistant", "content": or_placeholder(r)}],
                               "ppo response", self.max_length)
                 for p, r in zip(prompts, responses)]
        scores: list[float] = []
        for i in range(0, len(items), self.batch_size):
            b = collate(items[i:i + self.batch_size], self.tokenizer.pad_token_id)
            out = self.model(input_ids=b["input_ids"].to(self.device), attention_mask=b["attention_mask"].to(self.device))
            scores += out.logits.squeeze(-1).float().tolist()
        return scores


class JudgeScorer:
    """The judge server's /v1/score (expected 1-10 rating rescaled to [-1, 1]) for each response, through the run's
    one connection to the judge (`cai.judge.SyncJudge`), pinned to the constitution it served at the start."""

    def __init__(self, judge: SyncJudge):
        self.name, self.judge = f"judge:{judge.url}", judge

    def __call__(self, prompts: list[str], responses: list[str], *, first_row: int = 0) -> list[float]:
        from cai.judge import first_error

        results = self.judge.score_many(score_requests(prompts, responses, first_row=first_row))
        first_error(results)  # a reward needs every score: a judge outage stops the run, resumably
        return [r.score for r in results]


def score_requests(prompts: list[str], responses: list[str], *, first_row: int = 0) -> list[ScoreRequest]:
    """The judge's /v1/score requests for these rows; each is seeded with its row's position in the whole batch
    (`first_row` + i), from which the judge samples the row's principle."""
    from judge_server.protocol import ScoreRequest

    return [ScoreRequest(prompt=p, response=or_placeholder(r), seed=first_row + i)
            for i, (p, r) in enumerate(zip(prompts, responses))]
