"""Constitutions: the plain-text files of principles that steer the AI judge.

A constitution is a YAML file (or a plain `.txt`/`.md` list of principles, see
`cai.constitution.text`):

    name: harmless-helpful          # short identifier, letters/digits/-/_
    description: >                  # one paragraph for humans
      ...
    principles:
      - id: avoid-harm              # unique within the file
        critique: ...               # asks the judge to critique a response
        revision: ...               # asks the judge to rewrite it
        comparison: ...             # the question for A/B preference labels
        weight: 1.0                 # optional sampling weight (default 1)
    examples:                       # optional few-shot critique/revision demos
      - prompt: ...
        response: ...
        critique: ...
        revision: ...
        principle: avoid-harm       # optional, must name a principle above

`load_constitution` validates it and reports every problem with the file path,
the line and the field, so a person editing the file can fix it in one pass.
"""

from cai.constitution.files import (
    DEFAULT_CONSTITUTION,
    bundled_constitutions,
    find_constitution,
    load_constitution,
)
from cai.constitution.model import (
    Constitution,
    ConstitutionError,
    Example,
    Principle,
    Problem,
    UnknownPrincipleError,
    parse_constitution,
)
from cai.constitution.text import TEXT_SUFFIXES, parse_text_constitution, to_yaml

__all__ = [
    "DEFAULT_CONSTITUTION", "TEXT_SUFFIXES", "Constitution", "ConstitutionError", "Example", "Principle", "Problem",
    "UnknownPrincipleError", "bundled_constitutions", "find_constitution", "load_constitution", "parse_constitution",
    "parse_text_constitution", "to_yaml",
]
