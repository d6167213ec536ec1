"""Constitution loading, validation errors (file, line, field), hashing and sampling."""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest
from typer.testing import CliRunner

from cai.cli import app
from cai.constitution import ConstitutionError, bundled_constitutions, load_constitution, parse_constitution

GOOD = textwrap.dedent(
    """\
    name: demo
    description: A small constitution for tests.
    principles:
      - id: harmless
        critique: Identify ways the response is harmful.
        revision: Rewrite the response to remove harmful content.
        comparison: Which response is less harmful?
      - id: honest
        critique: Identify false claims in the response.
        revision: Rewrite the response to be accurate.
        comparison: Which response is more honest?
        weight: 3
    """
)


def write(tmp_path: Path, text: str, name: str = "c.yaml") -> Path:
    p = tmp_path / name
    p.write_text(text, encoding="utf-8")
    return p


def problems_of(path: Path) -> list:
    with pytest.raises(ConstitutionError) as info:
        load_constitution(path)
    return info.value.problems


def test_good_file_loads(tmp_path):
    c = load_constitution(write(tmp_path, GOOD))
    assert c.name == "demo"
    assert [p.id for p in c.principles] == ["harmless", "honest"]
    assert c.principle("honest").weight == 3.0
    assert len(c.hash) == 64


def test_missing_field_names_file_line_and_field(tmp_path):
    path = write(tmp_path, GOOD.replace("    comparison: Which response is more honest?\n", ""))
    (p,) = problems_of(path)
    assert p.path == str(path)
    assert p.field == "principles[1].comparison"
    assert p.line == 8  # the line of the principle that lacks it
    assert "missing" in p.message
    assert str(path) in str(p) and ":8:" in str(p)


def test_duplicate_ids(tmp_path):
    path = write(tmp_path, GOOD.replace("id: honest", "id: harmless"))
    (p,) = problems_of(path)
    assert p.field == "principles[1].id"
    assert p.line == 8
    assert "duplicate principle id 'harmless'" in p.message


def test_empty_text(tmp_path):
    path = write(tmp_path, GOOD.replace("revision: Rewrite the response to be accurate.", 'revision: "   "'))
    (p,) = problems_of(path)
    assert p.field == "principles[1].revision"
    assert p.line == 10
    assert "must not be empty" in p.message


def test_unknown_key(tmp_path):
    path = write(tmp_path, GOOD.replace("    weight: 3\n", "    wieght: 3\n"))
    (p,) = problems_of(path)
    assert p.field == "principles[1].wieght"
    assert p.line == 12
    assert "unknown key" in p.message


def test_wrong_types(tmp_path):
    path = write(tmp_path, GOOD.replace("weight: 3", "weight: heavy").replace("name: demo", "name: 42"))
    found = {p.field: p for p in problems_of(path)}
    assert set(found) == {"name", "principles[1].weight"}
    assert found["name"].line == 1 and "expected text" in found["name"].message
    assert found["principles[1].weight"].line == 12


def test_principles_must_be_a_non_empty_list(tmp_path):
    path = write(tmp_path, "name: x\ndescription: y\nprincipes: []\n")
    found = {p.field: p.message for p in problems_of(path)}
    assert "principles" in found and "missing" in found["principles"]
    assert "principes" in found and "unknown key" in found["principes"]


def test_non_utf8(tmp_path):
    path = tmp_path / "latin1.yaml"
    path.write_bytes(GOOD.replace("harmful.", "harmful \xe9.").encode("latin-1"))
    (p,) = problems_of(path)
    assert p.line == 5
    assert "UTF-8" in p.message


def test_yaml_syntax_error_has_line(tmp_path):
    path = write(tmp_path, GOOD + "  - id: [unclosed\n")
    (p,) = problems_of(path)
    assert p.line is not None and p.line >= 13
    assert "YAML syntax error" in p.message


def test_duplicate_yaml_key_is_refused(tmp_path):
    path = write(tmp_path, GOOD.replace("name: demo\n", "name: demo\nname: other\n"))
    (p,) = problems_of(path)
    assert (p.field, p.line) == ("name", 2)
    assert "duplicate key" in p.message


def test_example_must_name_known_principle(tmp_path):
    text = GOOD + textwrap.dedent(
        """\
        examples:
          - prompt: hi
            response: hello
            critique: fine
            revision: hello
            principle: nope
        """
    )
    (p,) = problems_of(write(tmp_path, text))
    assert p.field == "examples[0].principle"
    assert p.line == 18
    assert "unknown principle id 'nope'" in p.message


def test_empty_and_missing_files(tmp_path):
    (p,) = problems_of(write(tmp_path, ""))
    assert "empty" in p.message
    (p,) = problems_of(tmp_path / "absent.yaml")
    assert "not found" in p.message


def test_hash_ignores_formatting_but_not_content(tmp_path):
    a = load_constitution(write(tmp_path, GOOD, "a.yaml"))
    b = load_constitution(write(tmp_path, "# a comment\n" + GOOD.replace("name: demo", "name:   demo  "), "b.yaml"))
    c = load_constitution(write(tmp_path, GOOD.replace("less harmful", "least harmful"), "c.yaml"))
    assert a.hash == b.hash
    assert a.hash != c.hash


def test_sampling_is_seeded_and_weighted():
    c = parse_constitution(GOOD)
    draws = [c.sample_principles(1, seed=f"run:{i}")[0].id for i in range(2000)]
    assert draws == [c.sample_principles(1, seed=f"run:{i}")[0].id for i in range(2000)]
    share_honest = draws.count("honest") / len(draws)
    assert 0.70 < share_honest < 0.80  # weight 3 vs 1 -> 0.75
    both = c.sample_principles(2, seed=7)
    assert {p.id for p in both} == {"harmless", "honest"}
    with pytest.raises(ValueError):
        c.sample_principles(3, seed=7)


def test_unknown_principle_lookup_lists_known():
    c = parse_constitution(GOOD)
    with pytest.raises(KeyError, match="harmless, honest"):
        c.principle("kind")


def test_shipped_constitutions_are_valid():
    shipped = bundled_constitutions()
    assert {"harmless-helpful", "anti-sycophancy", "concise"} <= set(shipped)
    sizes = {name: len(load_constitution(path).principles) for name, path in shipped.items()}
    assert sizes["harmless-helpful"] >= 12


def test_cli_lint_reports_every_problem_and_exits_1(tmp_path):
    bad = write(tmp_path, GOOD.replace("name: demo", "name: 42").replace("weight: 3", "weight: -1"), "bad.yaml")
    good = write(tmp_path, GOOD, "good.yaml")
    result = CliRunner().invoke(app, ["constitution", "lint", str(good), str(bad)])
    assert result.exit_code == 1
    out = result.output
    assert f"{good}: ok" in out
    assert f"{bad}:1: name: expected text" in out
    assert f"{bad}:12: principles[1].weight: Input should be greater than 0" in out
    assert "1 of 2 file(s) have problems" in out


def test_cli_lint_ok_and_show():
    runner = CliRunner()
    result = runner.invoke(app, ["constitution", "lint", "harmless-helpful", "concise", "anti-sycophancy"])
    assert result.exit_code == 0, result.output
    result = runner.invoke(app, ["constitution", "show", "concise", "--json"])
    assert result.exit_code == 0
    assert '"name": "concise"' in result.output
