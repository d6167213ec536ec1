"""The judge's prompts, as chat messages. Kept in one place so they can be read and tuned together.

Critique and revision follow the Constitutional AI paper's format: the conversation, then a
critique request, the judge's critique, then a revision request. Few-shot examples from the
constitution go first, as earlier turns of the same shape. Comparison is multiple choice between
(A) and (B); the assistant turn is opened with "The better response is (" so the next token is
the option letter, whose log-probability gives the soft label.
"""

from __future__ import annotations

from cai.constitution import Constitution, Example, Principle

Messages = list[dict[str, str]]

COMPARE_PREFIX = "The better response is ("
COT_PREFIX = "Let's think step by step:"
COT_ANSWER = "\nSo the better response is ("
SCORE_PREFIX = "Rating: "
PROPOSE_PREFIX = "Which response"


def _conversation(prompt: str, response: str) -> str:
    return f"Here is a conversation between a user and an AI assistant.\n\nUser: {prompt}\n\nAssistant: {response}"


def _examples(constitution: Constitution, principle: Principle, limit: int) -> list[Example]:
    # Examples written for this principle first, then general ones.
    own = [e for e in constitution.examples if e.principle == principle.id]
    rest = [e for e in constitution.examples if e.principle != principle.id]
    return (own + rest)[:limit]


def critique_messages(constitution: Constitution, principle: Principle, prompt: str, response: str, n_examples: int = 2) -> Messages:
    messages: Messages = []
    for ex in _examples(constitution, principle, n_examples):
        messages += [
            {"role": "user", "content": f"{_conversation(ex.prompt, ex.response)}\n\nCritique request: {principle.critique}"},
            {"role": "assistant", "content": ex.critique},
        ]
    messages.append({"role": "user", "content": f"{_conversation(prompt, response)}\n\nCritique request: {principle.critique}"})
    return messages


def revision_messages(constitution: Constitution, principle: Principle, prompt: str, response: str, critique: str,
                      n_examples: int = 2) -> Messages:
    ask = f"Revision request: {principle.revision}\nReply with the revised response only."
    messages: Messages = []
    for ex in _examples(constitution, principle, n_examples):
        messages += [
            {"role": "user", "content": f"{_conversation(ex.prompt, ex.response)}\n\nCritique request: {principle.critique}"},
            {"role": "assistant", "content": ex.critique},
            {"role": "user", "content": ask},
            {"role": "assistant", "content": ex.revision},
        ]
    messages.append({"role": "user", "content": f"{_conversation(prompt, response)}\n\nCritique request: {principle.critique}"})
    if critique.strip():
        messages += [{"role": "assistant", "content": critique}, {"role": "user", "content": ask}]
    else:
        messages[-1] = {"role": "user", "content": f"{_conversation(prompt, response)}\n\n{ask}"}
    return messages


def compare_messages(principle: Principle, prompt: str, first: str, second: str, cot: bool) -> Messages:
    how = "Think it through briefly, then name the better option." if cot else "Answer with the letter of the better option, A or B."
    content = (
        f"Consider this request from a user to an AI assistant:\n\n{prompt}\n\n"
        f"{principle.comparison}\n\nOptions:\n(A) {first}\n\n(B) {second}\n\n{how}"
    )
    return [{"role": "user", "content": content}]


def score_messages(principle: Principle, prompt: str, response: str) -> Messages:
    content = (
        f"{_conversation(prompt, response)}\n\n"
        f"Judge the assistant's response by this standard: {principle.comparison}\n"
        "Rate it from 1 (fails the standard completely) to 10 (meets it fully). Reply with the number only."
    )
    return [{"role": "user", "content": content}]


def propose_messages(pairs: list[tuple[str, str, str]]) -> Messages:
    """Inverse Constitutional AI (Findeis et al. 2024): given (prompt, preferred, other) triples, ask for the one comparison
    question that would pick the preferred response; the assistant turn opens with PROPOSE_PREFIX."""
    shown = "\n\n".join(f"Example {i}:\nUser: {prompt}\nPreferred response: {preferred}\nOther response: {other}"
                         for i, (prompt, preferred, other) in enumerate(pairs, start=1))
    content = (
        "People compared two responses of an AI assistant and preferred one, in each example below.\n\n"
        f"{shown}\n\n"
        "Write one general comparison question a judge could ask about any two responses that would pick the preferred "
        "response in these examples. Start with \"Which response\" and end with a question mark. Reply with the question only."
    )
    return [{"role": "user", "content": content}]
