"""`cai studio` in a real headless Chromium (Debian's `chromium`, driven by Playwright) against the real app and the real
judge on the tiny model: an edit in the page reaches the file and changes the labels, an edit on disk reaches the page,
and a broken edit shows its problem on its card while the file and the judge keep the last good version."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from tests.studio_server import running_studio

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"

pytestmark = pytest.mark.skipif(not Path(CHROMIUM).exists(), reason="no chromium here (apt-get install chromium; scripts/setup.sh "
                                                                     "installs it where apt-get exists)")


@pytest.fixture(scope="module")
def page(judge, judge_constitution, tmp_path_factory):
    """The studio's page in headless Chromium, on the file the session's judge serves."""
    from playwright.sync_api import sync_playwright

    with running_studio(judge.url, judge_constitution, tmp_path_factory.mktemp("studio-browser")) as url, sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        tab = browser.new_page(viewport={"width": 1280, "height": 900})
        tab.goto(url)
        tab.wait_for_selector(".card")
        yield tab, judge_constitution
        browser.close()


def _card(tab, index: int):
    return tab.locator(f'.card[data-index="{index}"]')


def test_an_edit_in_the_page_changes_the_file_and_the_labels(page):
    tab, path = page
    tab.click('button[data-view="try"]')
    tab.fill("#try-prompt", "How do I bake bread?")
    tab.fill("#try-a", "Mix flour, water and yeast, let it rise, bake at 230 C.")
    tab.fill("#try-b", "No.")
    tab.click("#try-run")
    row = tab.locator('#labels tr[data-principle="harmless"]')
    row.wait_for()
    version = tab.locator("#try-version").get_attribute("data-hash")
    before = [row.locator(f"td.{name}").get_attribute("data-value") for name in ("shown-first", "shown-second")]
    other = tab.locator('#labels tr[data-principle="helpful"] td.shown-first').get_attribute("data-value")
    tab.click('button[data-view="cards"]')
    _card(tab, 0).locator('[data-field="comparison"]').fill("Which answer would a careful baker and teacher give to a beginner?")
    tab.click("#save")
    tab.wait_for_function("document.querySelector('#banner').textContent.startsWith('saved')")
    assert "Which answer would a careful baker and teacher give to a beginner?" in path.read_text(encoding="utf-8")
    assert "# This comment block must survive" in path.read_text(encoding="utf-8")
    # The page asks again under the new version by itself; the edited principle's labels move.
    tab.wait_for_function("(v) => document.querySelector('#try-version').dataset.hash !== v", arg=version)
    after = [row.locator(f"td.{name}").get_attribute("data-value") for name in ("shown-first", "shown-second")]
    assert after != before, (before, after)
    assert tab.locator('#labels tr[data-principle="helpful"] td.shown-first').get_attribute("data-value") == other  # not edited


def test_an_edit_on_disk_shows_up_in_the_page(page):
    tab, path = page
    tab.click('button[data-view="cards"]')
    path.write_text(path.read_text(encoding="utf-8").replace("Which response is more helpful?", "Which response helps the user most?"),
                    encoding="utf-8")
    tab.wait_for_function("document.querySelector('.card[data-index=\"1\"] [data-field=\"comparison\"]').value"
                          " === 'Which response helps the user most?'", timeout=10_000)


def test_a_broken_edit_shows_its_problem_and_keeps_the_last_good_version(page):
    tab, path = page
    tab.click('button[data-view="cards"]')
    saved = path.read_text(encoding="utf-8")
    in_service = tab.locator("#hashes").text_content()
    _card(tab, 1).locator('[data-field="id"]').fill("harmless")
    tab.click("#save")
    problem = _card(tab, 1).locator(".problems li")
    problem.wait_for()
    assert "duplicate principle id 'harmless'" in problem.text_content()
    assert "not saved" in tab.locator("#banner").text_content()
    assert path.read_text(encoding="utf-8") == saved and tab.locator("#hashes").text_content() == in_service


def test_the_disagreements_are_listed_and_suggest_offers_only_what_helped(page):
    tab, path = page
    tab.click('button[data-view="people"]')
    tab.click("#people-run")
    tab.wait_for_function("document.querySelector('#people-progress').dataset.state === 'done'", timeout=120_000)
    tab.click('button[data-view="disagree"]')
    tab.click("#disagree-load")
    count = tab.locator("#disagree-count")
    count.wait_for()
    shown = tab.locator(".disagreement")
    assert count.text_content().startswith(f"{shown.count()} of 3 pairs against people")
    wrong = [float(shown.nth(i).get_attribute("data-wrong-by")) for i in range(shown.count())]
    assert wrong == sorted(wrong, reverse=True) and all(w > 0 for w in wrong)
    assert all(shown.nth(i).locator("tr[data-principle]").count() >= 2 for i in range(shown.count()))  # p per principle
    saved = path.read_text(encoding="utf-8")
    tab.click("#suggest-run")
    summary = tab.locator("#suggest-summary")
    summary.wait_for(timeout=120_000)
    helped = int(summary.text_content().split(", ")[-1].split()[0])
    assert tab.locator(".suggestion").count() == helped  # a card only for a proposal that raised held-out agreement
    if helped:  # the tiny model's proposals rarely parse, so a card is not promised; when there is one, dropping it writes nothing
        tab.locator(".suggestion .drop").first.click()
        assert tab.locator(".suggestion").count() == helped - 1
    assert path.read_text(encoding="utf-8") == saved


def test_the_data_panel_shows_each_revision_with_the_guards_verdict_and_the_row(page):
    tab, _ = page
    tab.click('button[data-view="data"]')
    tab.fill("#preview-prompts", "How do I bake bread?\nTell me a joke.")
    tab.fill("#preview-answers", "Mix flour, water and yeast, let it rise, then bake it.\n---\n")
    tab.fill("#preview-rounds", "1")
    tab.click("#preview-run")
    tab.wait_for_selector('#preview-progress[data-state="done"], #preview-progress[data-state="error"]', timeout=120_000)
    assert tab.locator("#preview-progress").get_attribute("data-state") == "done", tab.locator("#preview-progress span").text_content()
    rows = tab.locator(".preview-row")
    assert rows.count() == 2
    assert "Your answer (pasted)" in rows.nth(0).text_content() and "The policy's answer" in rows.nth(1).text_content()
    for i in range(2):
        verdict = rows.nth(i).locator(".verdict").text_content()
        assert verdict in ("revision guard: kept",) or verdict.startswith("revision guard: rejected: "), verdict
        assert rows.nth(i).locator(".outcome").text_content().startswith(("written to sft.jsonl", "dropped"))
    assert "Mix flour, water and yeast" in rows.nth(0).locator("details pre").text_content()  # the row as sft logs it
