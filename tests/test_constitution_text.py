"""Plain-text constitutions (.txt/.md, one principle per paragraph) and `cai constitution convert`."""

from __future__ import annotations

from pathlib import Path

import yaml
from typer.testing import CliRunner

from cai.cli import app
from cai.constitution import find_constitution, load_constitution
from cai.constitution.text import CRITIQUE_TEMPLATE, MAX_PRINCIPLE_CHARS, REVISION_TEMPLATE
from tests.test_constitution import problems_of, write

EXAMPLE = Path(__file__).resolve().parent.parent / "examples" / "plain-constitution.md"


def test_paragraphs_and_list_items_are_principles_with_templated_requests():
    c = load_constitution(EXAMPLE)
    assert c.name == "harmless-and-honest-assistant"
    assert c.description == "Harmless and honest assistant"
    assert [p.id for p in c.principles] == ["p1", "p2", "p3", "no-flattery"]
    first = c.principles[0]
    # A paragraph over two lines is one principle, its line break a space.
    assert first.comparison == ("Please choose the response that is less harmful: the one that does not help anyone hurt "
                                "themselves or other people, and that explains why when it declines.")
    assert first.critique == CRITIQUE_TEMPLATE.format(principle=first.comparison)
    assert first.revision == REVISION_TEMPLATE.format(principle=first.comparison)
    assert c.principles[2].comparison.startswith("Please choose the response that a thoughtful")
    assert c.principles[3].comparison == "Please choose the response that answers the question instead of praising it."
    assert all(p.weight == 1.0 for p in c.principles) and c.examples == []


def test_without_a_heading_the_name_is_the_file_stem(tmp_path):
    c = load_constitution(write(tmp_path, "Choose the kinder response.\n\n\nChoose the more accurate response.\n", "My Rules.txt"))
    assert c.name == "my-rules"
    assert [p.comparison for p in c.principles] == ["Choose the kinder response.", "Choose the more accurate response."]
    assert find_constitution(tmp_path / "My Rules.txt") == tmp_path / "My Rules.txt"


def test_hash_is_of_the_content_not_the_layout(tmp_path):
    a = load_constitution(write(tmp_path, "# Rules\nChoose the kinder response.\n\nChoose the more accurate response.\n", "a.md"))
    b = load_constitution(write(tmp_path, "# Rules\n\n- Choose the kinder\n  response.\n- Choose the more accurate response.\n", "b.md"))
    c = load_constitution(write(tmp_path, "# Rules\nChoose the kindest response.\n\nChoose the more accurate response.\n", "c.md"))
    assert a.hash == b.hash
    assert a.hash != c.hash


def test_problems_name_the_file_and_line(tmp_path):
    path = write(tmp_path, "# Rules\n\nChoose the kinder response.\n\nSomething else.\n\nChoose the kinder response.\n\n[x]\n", "c.txt")
    problems = problems_of(path)
    assert [str(p) for p in problems] == [
        f"{path}:9: principle [x] has no text after its id",
        f"{path}:7: principles[2]: the same principle as line 3",
    ]
    (p,) = problems_of(write(tmp_path, "# Only a heading\n", "empty.md"))
    assert "no principles found" in p.message
    (p,) = problems_of(write(tmp_path, "Short.\n\n" + "word " * (MAX_PRINCIPLE_CHARS // 5 + 10), "long.txt"))
    assert p.line == 3 and f"the limit is {MAX_PRINCIPLE_CHARS}" in p.message
    problems = problems_of(write(tmp_path, "[a] One.\n\n[a] Two.\n\n[bad id!] Three.\n", "ids.txt"))
    assert any(q.line == 3 and "duplicate principle id 'a'" in q.message for q in problems), problems
    (p,) = problems_of(write(tmp_path, "[-x] One.\n", "badid.txt"))
    assert p.line == 1 and p.field == "principles[0].id"


def test_cli_convert_writes_yaml_that_loads_to_the_same_hash(tmp_path):
    source = write(tmp_path, EXAMPLE.read_text(encoding="utf-8"), "mine.md")
    runner = CliRunner()
    result = runner.invoke(app, ["constitution", "convert", str(source)])
    assert result.exit_code == 0, result.output
    converted = tmp_path / "mine.yaml"
    assert f"wrote {converted}" in result.output
    text = converted.read_text(encoding="utf-8")
    assert text.startswith("# harmless-and-honest-assistant: converted from mine.md")
    assert load_constitution(converted).hash == load_constitution(source).hash
    assert yaml.safe_load(text)["principles"][3]["id"] == "no-flattery"
    # An existing file is not overwritten without --force; a YAML input is refused with the reason.
    again = runner.invoke(app, ["constitution", "convert", str(source)])
    assert again.exit_code == 1 and "pass --force" in again.output
    assert runner.invoke(app, ["constitution", "convert", str(source), "--force"]).exit_code == 0
    not_text = runner.invoke(app, ["constitution", "convert", str(converted)])
    assert not_text.exit_code == 1 and "reads .txt or .md" in not_text.output
    # lint and show read plain text as they read YAML.
    lint = runner.invoke(app, ["constitution", "lint", str(source)])
    assert lint.exit_code == 0 and "4 principles" in lint.output


def test_cli_lint_reports_plain_text_problems_with_lines(tmp_path):
    bad = write(tmp_path, "Choose the kinder response.\n\nChoose the kinder response.\n", "bad.txt")
    result = CliRunner().invoke(app, ["constitution", "lint", str(bad)])
    assert result.exit_code == 1
    assert f"{bad}:3: principles[1]: the same principle as line 1" in result.output
