"""Request and response models of the judge HTTP API (shared by the server and `cai.judge_client`).

Every model forbids unknown fields, so a typo in a client is a 422 naming the field rather than a
silently ignored option. Text sizes are bounded here; token counts are checked by the service,
which knows the tokenizer.
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, StringConstraints, model_validator

API_KEY_ENV = "CAI_JUDGE_API_KEY"
"""Where the server and the client read the bearer key from, so it stays out of command lines."""
PARENT_PID_ENV = "CAI_JUDGE_PARENT_PID"
"""Set by a cai job that starts its own judge (LocalJudge): the server stops when that process is gone."""
MAX_TEXT_CHARS = 32_000
MAX_BATCH = 256
MAX_QUESTION_CHARS = 1000
MAX_PROPOSE_PAIRS = 8
PROPOSED_ID = "proposed"
"""The principle id a comparison under a question given in the request (CompareRequest.comparison) votes as."""

Text = Annotated[str, StringConstraints(max_length=MAX_TEXT_CHARS)]
NonEmpty = Annotated[str, StringConstraints(min_length=1, max_length=MAX_TEXT_CHARS)]
PrincipleId = Annotated[str, StringConstraints(min_length=1, max_length=64)]

EMPTY_RESPONSE = "(the assistant gave no response)"
"""What clients send in place of an empty or blank response: the API refuses empty text, and the judge
(or a reward model scoring PPO's rollouts) should see plainly that nothing was said."""


def or_placeholder(response: str) -> str:
    """`response`, or EMPTY_RESPONSE when it is empty or only whitespace."""
    return response if response.strip() else EMPTY_RESPONSE


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid")


class _Common(_Model):
    prompt: NonEmpty = Field(description="The user's message the response answers.")
    constitution_hash: str | None = Field(
        default=None, max_length=64, description="Require this constitution version (full hash or prefix); 409 if the server has another."
    )
    seed: int = Field(default=0, ge=0, le=2**31 - 1, description="Seeds principle sampling and any sampled generation.")


class GenerationOptions(_Model):
    max_tokens: int = Field(default=256, ge=1, le=4096, description="Upper bound on generated tokens (the server caps it).")
    temperature: float = Field(default=0.0, ge=0.0, le=2.0, description="0 is greedy.")


# -- critique / revise ---------------------------------------------------------------


class CritiqueRequest(_Common):
    response: NonEmpty
    principle_id: PrincipleId | None = Field(default=None, description="None: sampled from the constitution with `seed`.")
    generation: GenerationOptions = Field(default_factory=GenerationOptions)


class CritiqueResult(_Model):
    critique: str
    principle_id: str
    constitution_hash: str
    model: str
    prompt_tokens: int
    completion_tokens: int


class ReviseRequest(_Common):
    response: NonEmpty
    critique: Text = Field(description="The critique to act on (from /v1/critique); may be empty to revise directly.")
    principle_id: PrincipleId
    generation: GenerationOptions = Field(default_factory=GenerationOptions)


class ReviseResult(_Model):
    revision: str
    principle_id: str
    constitution_hash: str
    model: str
    prompt_tokens: int
    completion_tokens: int


# -- compare -------------------------------------------------------------------------


class CompareRequest(_Common):
    response_a: NonEmpty
    response_b: NonEmpty
    principle_ids: list[PrincipleId] | None = Field(
        default=None, max_length=32, description="Principles to ensemble over. None: `n_principles` sampled with `seed`."
    )
    n_principles: int = Field(default=1, ge=1, le=32)
    cot: bool = Field(default=False, description="Generate a rationale first, then read the option probabilities after it.")
    cot_max_tokens: int = Field(default=128, ge=1, le=1024)
    clamp: tuple[float, float] | None = Field(
        default=None, description="Clamp the final label to [lo, hi]. Default: (0.4, 0.6) with cot (as in the CAI paper), none without."
    )
    comparison: Annotated[str, StringConstraints(min_length=1, max_length=MAX_QUESTION_CHARS)] | None = Field(
        default=None, description=f"Judge by this comparison question instead of the constitution's principles: a proposed "
        f"principle under test (`cai constitution learn`), voting as {PROPOSED_ID!r}. principle_ids must then be left out.")

    @model_validator(mode="after")
    def _check_clamp(self) -> CompareRequest:
        if self.clamp is not None and not (0.0 <= self.clamp[0] <= self.clamp[1] <= 1.0):
            raise ValueError(f"clamp must satisfy 0 <= lo <= hi <= 1, got {list(self.clamp)}")
        if self.comparison is not None and self.principle_ids:
            raise ValueError("give comparison (a question under test) or principle_ids (the constitution's), not both")
        return self

    def effective_clamp(self) -> tuple[float, float] | None:
        if self.clamp is not None:
            return self.clamp
        return (0.4, 0.6) if self.cot else None


# -- propose (Inverse Constitutional AI) ---------------------------------------------


class PreferredPair(_Model):
    prompt: NonEmpty
    preferred: NonEmpty = Field(description="The response people preferred.")
    other: NonEmpty


class ProposeRequest(_Model):
    pairs: list[PreferredPair] = Field(min_length=1, max_length=MAX_PROPOSE_PAIRS, description="Pairs on which people "
                                       "preferred one response; the judge writes a comparison question that would explain it.")
    constitution_hash: str | None = Field(default=None, max_length=64, description="As in the other requests.")
    seed: int = Field(default=0, ge=0, le=2**31 - 1, description="Seeds the sampled generation.")
    generation: GenerationOptions = Field(default_factory=lambda: GenerationOptions(max_tokens=64, temperature=0.7))


class ProposeResult(_Model):
    text: str = Field(description="The judge's reply, as generated: parse it before use (it may be anything).")
    constitution_hash: str
    model: str
    prompt_tokens: int
    completion_tokens: int


class PrincipleVote(_Model):
    principle_id: str
    p_a: float = Field(description="P(response_a better), averaged over both orders.")
    p_a_shown_first: float = Field(description="P(response_a better) when it is shown as option (A).")
    p_a_shown_second: float = Field(description="P(response_a better) when it is shown as option (B).")
    option_mass: float = Field(description="Probability the judge put on the option tokens at all (format adherence), mean of both orders.")
    rationales: list[str] | None = None


class CompareResult(_Model):
    p_a: float = Field(description="Soft label: P(response_a is better), debiased over both orders, ensembled, clamped.")
    p_a_shown_first: float
    p_a_shown_second: float
    same_position: bool = Field(description="Both orders preferred the same position: a position-biased (inconsistent) judgement.")
    option_mass: float = Field(description="Probability the judge put on the option tokens at all, mean over the votes and orders.")
    votes: list[PrincipleVote]
    principle_ids: list[str]
    constitution_hash: str
    model: str


# -- score ---------------------------------------------------------------------------


class ScoreRequest(_Common):
    response: NonEmpty
    principle_id: PrincipleId | None = None


class ScoreResult(_Model):
    score: float = Field(description="Expected rating rescaled from [1, 10] to [-1, 1].")
    expected_rating: float
    rating_probs: list[float] = Field(description="P(rating = 1..10), normalised over the ten ratings.")
    option_mass: float
    unsplit_mass: float = Field(default=0.0, description="Probability of a first token '1' whose next token the judge could "
                                "not see (a top-20 read that did not show '0' after it): counted as rating 1, though it may be "
                                "10. 0 when every '1' was followed to its next token.")
    principle_id: str
    constitution_hash: str
    model: str


class ErrorBody(_Model):
    type: str = Field(description="Machine-readable kind: invalid_request, unauthorized, not_found, conflict, too_large, overloaded, "
                      "backend_error, backend_unavailable, internal.")
    message: str
    field: str | None = None


class ErrorResponse(_Model):
    error: ErrorBody


# -- batches -------------------------------------------------------------------------


class CritiqueBatch(_Model):
    items: list[CritiqueRequest] = Field(min_length=1, max_length=MAX_BATCH)


class ReviseBatch(_Model):
    items: list[ReviseRequest] = Field(min_length=1, max_length=MAX_BATCH)


class CompareBatch(_Model):
    items: list[CompareRequest] = Field(min_length=1, max_length=MAX_BATCH)


class ScoreBatch(_Model):
    items: list[ScoreRequest] = Field(min_length=1, max_length=MAX_BATCH)


class ProposeBatch(_Model):
    items: list[ProposeRequest] = Field(min_length=1, max_length=MAX_BATCH)


class CritiqueBatchResult(_Model):
    results: list[CritiqueResult | ErrorResponse] = Field(description="In item order; an item that failed on its own holds its error.")


class ReviseBatchResult(_Model):
    results: list[ReviseResult | ErrorResponse] = Field(description="In item order; an item that failed on its own holds its error.")


class CompareBatchResult(_Model):
    results: list[CompareResult | ErrorResponse] = Field(description="In item order; an item that failed on its own holds its error.")


class ScoreBatchResult(_Model):
    results: list[ScoreResult | ErrorResponse] = Field(description="In item order; an item that failed on its own holds its error.")


class ProposeBatchResult(_Model):
    results: list[ProposeResult | ErrorResponse] = Field(description="In item order; an item that failed on its own holds its error.")


# -- service -------------------------------------------------------------------------


class PrincipleInfo(_Model):
    id: str
    critique: str
    revision: str
    comparison: str
    weight: float


class ConstitutionInfo(_Model):
    name: str
    hash: str
    path: str
    principles: list[PrincipleInfo]
    reload_error: str | None = Field(default=None, description="Why the last edit of the file was not loaded (the last good version is served).")


class BackendState(_Model):
    backend: str = Field(description="'backend N (URL)', as logs and errors name it.")
    healthy: bool
    in_flight: int = Field(description="Requests sent to it and not yet answered.")
    requests: int = Field(description="Requests sent to it since start-up.")
    failures: int = Field(description="Times it was taken out.")


class Health(_Model):
    status: Literal["ok"]
    model: str
    constitution_hash: str
    queue_depth: int
    max_queue: int
    backends_up: int | None = Field(default=None, description="With --backend openai: the backends now healthy, of backends_total.")
    backends_total: int | None = None
