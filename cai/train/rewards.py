"""What scores the RL trainers' responses: a trained reward model, the judge, a rule (for checks), or a weighted sum.

Every scorer takes the prompts and the decoded responses as text, so the reward model's tokenizer
can differ from the policy's. Specs, as `cai train ppo --reward` takes them:

- a folder written by `cai train rm` (its `final/` adapter, or a full sequence-classification model)
- `judge`: the judge server at `judge_url` scores each response under the constitution (direct RLAIF)
- `judge:pairwise`: the judge compares the answers to one prompt with each other, both orders, and each
  answer's reward is its strength in its group (`cai.train.rl.pairwise`); options after `?`, joined by
  `&`: `method=bt` (Bradley-Terry, the default) or `method=win_rate`, `max_pairs=N` (default 16)
- `rule:length`: pays 1 per 100 characters (a reward that is easy to hack: shows verbosity drift)
- `rule:share=TEXT`: the share of the response's characters that are occurrences of TEXT
- `WEIGHT*SPEC,WEIGHT*SPEC,...`: the weighted sum of those rewards, e.g. `0.7*runs/rm/final,0.3*judge:pairwise`
  (every term weighted; a path or TEXT holding a comma can only be a reward on its own)

`score_parts` gives a reward's parts beside its total: each term of a weighted sum (unweighted), and for
the judge's rewards each principle (`NAME/principle/ID`), NaN in the rows not judged under it.

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
import math
import re
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

from cai.errors import ConfigError
from cai.train.precision import Precision
from judge_server.protocol import or_placeholder

if TYPE_CHECKING:
    import torch

    from cai.judge import SyncJudge
    from judge_server.protocol import CompareResult, ScoreRequest

logger = logging.getLogger(__name__)


PAIRWISE = "judge:pairwise"
WEIGHTED_TERM = re.compile(r"\s*([-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?)\s*\*(.*)", re.DOTALL)

Parts = dict[str, list[float]]


class RewardSpecError(ConfigError):
    """A --reward value that names no scorer."""


class GroupLayoutError(ConfigError):
    """Rows given to a group scorer that are not whole groups of one prompt's answers."""


class Scorer(Protocol):
    name: str

    def __call__(self, prompts: list[str], responses: list[str], *, first_row: int = 0) -> list[float]: ...


def reward_terms(spec: str) -> list[tuple[float, str]] | None:
    """The (weight, spec) terms of a weighted reward `WEIGHT*SPEC,WEIGHT*SPEC,...`; None for a single reward."""
    if WEIGHTED_TERM.match(spec) is None:
        return None
    terms = []
    for term in spec.split(","):
        found = WEIGHTED_TERM.fullmatch(term)
        if found is None or not found.group(2).strip():
            raise RewardSpecError(f"reward {spec!r}: term {term!r} is not WEIGHT*SPEC; a weighted reward weights every term, "
                                  "e.g. 0.7*runs/rm/final,0.3*judge:pairwise (a path with a comma can only be a reward on its own)")
        weight = float(found.group(1))
        if not math.isfinite(weight):
            raise RewardSpecError(f"reward {spec!r}: weight {found.group(1)!r} of term {term!r} is not a finite number")
        terms.append((weight, found.group(2).strip()))
    specs = [s for _, s in terms]
    if len(set(specs)) < len(specs):
        raise RewardSpecError(f"reward {spec!r}: a reward appears twice; give each once with the sum of its weights")
    return terms


def asks_judge(spec: str) -> bool:
    """Whether reward `spec` (or a term of it) is scored by the judge server, so a run needs judge_url."""
    terms = reward_terms(spec)
    return any(s == "judge" or s.split("?")[0] == PAIRWISE for s in ([s for _, s in terms] if terms else [spec]))


def load_scorer(spec: str, *, judge: SyncJudge | None = None, device: str = "cpu", max_length: int = 1024,
                group_size: int = 1, precision: Precision = "fp32") -> Scorer:
    """The scorer `spec` names; the judge's rewards go through `judge`, the run's connection to the judge. `group_size`
    is the number of answers sampled per prompt (adjacent rows), which `judge:pairwise` compares with each other;
    a reward model runs at the run's `precision`."""
    terms = reward_terms(spec)
    if terms is not None:
        return WeightedScorer([(w, load_scorer(s, judge=judge, device=device, max_length=max_length, group_size=group_size,
                                               precision=precision))
                               for w, s in terms])
    if spec.startswith("rule:"):
        return RuleScorer(spec)
    if spec == "judge" or spec.split("?")[0] == PAIRWISE:
        if judge is None:
            raise RewardSpecError(f"reward {spec!r} needs judge_url (the judge server's address, e.g. http://127.0.0.1:8000)")
        return JudgeScorer(judge) if spec == "judge" else GroupPairwiseScorer(judge, spec, group_size=group_size)
    path = Path(spec)
    if path.is_dir():
        return RewardModelScorer(path, device=device, max_length=max_length, precision=precision)
    raise RewardSpecError(f"reward {spec!r}: not a reward-model folder, 'judge', 'judge:pairwise[?method=bt|win_rate&max_pairs=N]', "
                          "'rule:length', 'rule:share=TEXT' or a weighted list WEIGHT*SPEC,WEIGHT*SPEC")


def score_parts(scorer: Scorer | Callable[..., list[float]], prompts: list[str], responses: list[str], *,
                first_row: int = 0) -> tuple[list[float], Parts]:
    """The rewards of these rows and their parts by name, for any scorer: a weighted sum's terms (each unweighted) and
    the judge's per-principle parts (`NAME/principle/ID`, NaN in a row not judged under that principle); a scorer
    with neither has one part, itself, named as the scorer."""
    own = getattr(scorer, "score_parts", None)
    if own is not None:
        return own(prompts, responses, first_row=first_row)
    totals = scorer(prompts, responses, first_row=first_row)
    return totals, {getattr(scorer, "name", "reward"): totals}


class WeightedScorer:
    """The weighted sum of several rewards, each reported as a part (unweighted) with its own parts."""

    def __init__(self, terms: list[tuple[float, Scorer]]):
        self.terms = terms
        self.name = ",".join(f"{w:g}*{s.name}" for w, s in terms)
        names = [s.name for _, s in terms]
        if len(set(names)) < len(names):
            raise RewardSpecError(f"reward {self.name!r}: two terms are the same reward; give it once with the sum of its weights")

    def __call__(self, prompts: list[str], responses: list[str], *, first_row: int = 0) -> list[float]:
        return self.score_parts(prompts, responses, first_row=first_row)[0]

    def score_parts(self, prompts: list[str], responses: list[str], *, first_row: int = 0) -> tuple[list[float], Parts]:
        totals, parts = [0.0] * len(prompts), {}
        for weight, scorer in self.terms:
            values, own = score_parts(scorer, prompts, responses, first_row=first_row)
            totals = [t + weight * v for t, v in zip(totals, values)]
            parts.update(own)
        return totals, parts


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
    """A reward model from `cai train rm`: the prompt and response go through its own chat template.

    At `precision` (`cai.train.precision`): under bf16 autocast, as the policy's passes run, its weights load in
    bfloat16 (none of them trains here) and its forward runs under the same autocast; otherwise float32."""

    def __init__(self, path: Path, *, device: str = "cpu", max_length: int = 1024, batch_size: int = 8,
                 precision: Precision = "fp32"):
        import torch
        from transformers import AutoModelForSequenceClassification

        from cai.models import load_tokenizer
        from cai.train.precision import base_dtype

        self.name = str(path)
        self.device, self.max_length, self.batch_size, self.precision = device, max_length, batch_size, precision
        dtype = base_dtype(precision, torch.device(device), frozen=True)
        self.tokenizer = load_tokenizer(path)
        if (path / "adapter_config.json").exists():
            from peft import PeftModel

            base_path = json.loads((path / "adapter_config.json").read_text())["base_model_name_or_path"]
            base = AutoModelForSequenceClassification.from_pretrained(base_path, num_labels=1, dtype=dtype)
            base.config.pad_token_id = self.tokenizer.pad_token_id
            model = PeftModel.from_pretrained(base, path).merge_and_unload()
        else:
            model = AutoModelForSequenceClassification.from_pretrained(path, num_labels=1, dtype=dtype)
        model.config.pad_token_id = self.tokenizer.pad_token_id
        self.model = model.to(device).eval()

    def __call__(self, prompts: list[str], responses: list[str], *, first_row: int = 0) -> list[float]:
        import torch

        from cai.train.data import collate, tokenise_chat
        from cai.train.precision import autocast

        items = [tokenise_chat(self.tokenizer, [{"role": "user", "content": p}, {"role": "assistant", "content": or_placeholder(r)}],
                               "ppo response", self.max_length)
                 for p, r in zip(prompts, responses)]
        scores: list[float] = []
        for i in range(0, len(items), self.batch_size):
            b = collate(items[i:i + self.batch_size], self.tokenizer.pad_token_id)
            with torch.no_grad(), autocast(self.precision, torch.device(self.device)):
                out = self.model(input_ids=b["input_ids"].to(self.device), attention_mask=b["attention_mask"].to(self.device),
                                 use_cache=False)
            scores += out.logits.squeeze(-1).float().tolist()
        return scores


class JudgeScorer:
    """The judge server's /v1/score (expected 1-10 rating rescaled to [-1, 1]) for each response, through the run's
    one connection to the judge (`cai.judge.SyncJudge`), pinned to the constitution it served at the start."""

    def __init__(self, judge: SyncJudge):
        self.name, self.judge = "judge", judge

    def __call__(self, prompts: list[str], responses: list[str], *, first_row: int = 0) -> list[float]:
        return self.score_parts(prompts, responses, first_row=first_row)[0]

    def score_parts(self, prompts: list[str], responses: list[str], *, first_row: int = 0) -> tuple[list[float], Parts]:
        """The scores, and each principle's: a row's score under the principle it was judged by, NaN under the others."""
        from cai.judge import first_error

        results = self.judge.score_many(score_requests(prompts, responses, first_row=first_row))
        first_error(results)  # a reward needs every score: a judge outage stops the run, resumably
        scores = [r.score for r in results]
        parts = {self.name: scores}
        for principle in sorted({r.principle_id for r in results}):
            parts[f"{self.name}/principle/{principle}"] = [r.score if r.principle_id == principle else math.nan for r in results]
        return scores, parts


class GroupPairwiseScorer:
    """Group-pairwise AI feedback: the judge's /v1/compare on pairs of the answers to one prompt (each pair judged in
    both orders by the judge itself), and each answer's reward its strength in its group (`cai.train.rl.pairwise`:
    Bradley-Terry or mean win probability). A preference used as a reward, with no reward model, and immune to how
    the judge calibrates absolute scores.

    Rows come in groups of `group_size` adjacent answers to the same prompt; the pairs compared are
    `pair_schedule(group_size, max_pairs)`, the same in every group. Per principle, a row's part is how decided the
    judge was, |2 p - 1| (0 a coin toss, 1 certain), averaged over its pairs judged under that principle.
    """

    pairwise = True
    """Marks a scorer whose judgements are pair probabilities (`pair_probabilities`), as online DPO reads them."""

    def __init__(self, judge: SyncJudge, spec: str = PAIRWISE, *, group_size: int):
        from cai.train.rl.pairwise import DEFAULT_MAX_PAIRS, METHODS, pair_schedule

        self.name, self.judge, self.group_size = spec, judge, group_size
        options = dict(option.partition("=")[::2] for option in spec.partition("?")[2].split("&") if option)
        unknown = set(options) - {"method", "max_pairs"}
        if unknown:
            raise RewardSpecError(f"reward {spec!r}: unknown option(s) {sorted(unknown)}; {PAIRWISE} takes method and max_pairs")
        self.method = options.get("method", "bt")
        if self.method not in METHODS:
            raise RewardSpecError(f"reward {spec!r}: method must be one of {list(METHODS)}, got {self.method!r}")
        max_pairs = options.get("max_pairs", str(DEFAULT_MAX_PAIRS))
        if not max_pairs.isdigit() or int(max_pairs) < 1:
            raise RewardSpecError(f"reward {spec!r}: max_pairs must be a whole number >= 1, got {max_pairs!r}")
        if group_size < 2:
            raise RewardSpecError(f"reward {spec!r} compares the answers to each prompt with each other: it needs at least 2 "
                                  f"answers per prompt (--num-generations 2 or more), got {group_size}")
        try:
            self.pairs = pair_schedule(group_size, max_pairs=int(max_pairs))
        except ValueError as e:
            raise RewardSpecError(f"reward {spec!r}: {e}") from e

    def __call__(self, prompts: list[str], responses: list[str], *, first_row: int = 0) -> list[float]:
        return self.score_parts(prompts, responses, first_row=first_row)[0]

    def pair_probabilities(self, prompts: list[str], responses: list[str], *, first_row: int = 0) -> torch.Tensor:
        """(G, P) float64: [g, n] = p(answer pairs[n][0] of group g beats answer pairs[n][1]), debiased over both orders;
        with 2 answers per prompt, [:, 0] is p(the group's first answer beats its second)."""
        return self._probabilities(self._compare(prompts, responses, first_row))

    def score_parts(self, prompts: list[str], responses: list[str], *, first_row: int = 0) -> tuple[list[float], Parts]:
        """The rows' strengths in their groups, and per principle how decided the judge was (see the class)."""
        from cai.train.rl.pairwise import group_rewards

        results = self._compare(prompts, responses, first_row)
        rewards = group_rewards(self.group_size, self.pairs, self._probabilities(results), method=self.method).tolist()
        decided: dict[str, list[list[float]]] = {}  # principle -> per row, |2p - 1| of each of its pairs judged under it
        for index, result in enumerate(results):
            group, n = divmod(index, len(self.pairs))
            for vote in result.votes:
                rows = decided.setdefault(vote.principle_id, [[] for _ in prompts])
                for answer in self.pairs[n]:
                    rows[group * self.group_size + answer].append(abs(2 * vote.p_a - 1))
        parts = {self.name: rewards}
        for principle in sorted(decided):
            parts[f"{self.name}/principle/{principle}"] = [sum(v) / len(v) if v else math.nan for v in decided[principle]]
        return rewards, parts

    def _probabilities(self, results: list[CompareResult]) -> torch.Tensor:
        import torch

        return torch.tensor([r.p_a for r in results], dtype=torch.float64).view(-1, len(self.pairs))

    def _compare(self, prompts: list[str], responses: list[str], first_row: int) -> list[CompareResult]:
        """The judge's results for every scheduled pair of every group, group by group."""
        from cai.judge import first_error
        from judge_server.protocol import CompareRequest

        k = self.group_size
        if first_row % k or len(prompts) % k:
            raise GroupLayoutError(f"reward {self.name!r}: rows {first_row}..{first_row + len(prompts) - 1} are not whole groups of "
                                   f"{k} answers; each process must score whole groups (batch_size a multiple of {k} per process)")
        requests = []
        for start in range(0, len(prompts), k):
            if len(set(prompts[start:start + k])) > 1:
                raise GroupLayoutError(f"reward {self.name!r}: rows {first_row + start}..{first_row + start + k - 1} should be {k} "
                                       "answers to one prompt, but their prompts differ")
            # The seed, from the group's place in the whole batch, picks the pair's principle whatever the process count.
            requests += [CompareRequest(prompt=prompts[start], response_a=or_placeholder(responses[start + i]),
                                        response_b=or_placeholder(responses[start + j]), seed=(first_row + start) * len(self.pairs) + n)
                         for n, (i, j) in enumerate(self.pairs)]
        results = self.judge.compare_many(requests)
        first_error(results)  # a reward needs every comparison: a judge outage stops the run, resumably
        return results


def score_requests(prompts: list[str], responses: list[str], *, first_row: int = 0) -> list[ScoreRequest]:
    """The judge's /v1/score requests for these rows; each is seeded with its row's position in the whole batch
    (`first_row` + i), from which the judge samples the row's principle."""
    from judge_server.protocol import ScoreRequest

    return [ScoreRequest(prompt=p, response=or_placeholder(r), seed=first_row + i)
            for i, (p, r) in enumerate(zip(prompts, responses))]
