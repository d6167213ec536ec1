"""Append-only row logs (`cai.rowlog`): what a killed run leaves, and what a rerun does with it."""

from __future__ import annotations

import pytest

from cai.rowlog import RowLog


def test_rowlog_resumes_drops_partial_line_and_keeps_last(tmp_path):
    path = tmp_path / "progress.jsonl"
    with RowLog.open(path) as log:
        log.append({"id": "a", "status": "ok"})
        log.append({"id": "b", "status": "judge_failed"})
    with open(path, "a") as f:
        f.write('{"id": "c", "sta')  # killed mid-write
    with RowLog.open(path) as log:
        assert log.done_ids() == {"a"}  # b failed: retried on resume; c never finished
        log.append({"id": "b", "status": "ok"})
        assert [r["status"] for r in log.final_rows()] == ["ok", "ok"]
    assert path.read_text().count("\n") == 3 and '"id": "c"' not in path.read_text()


def test_rowlog_rejects_foreign_files(tmp_path):
    path = tmp_path / "progress.jsonl"
    path.write_text('{"id": "a"}\nnot json\n')
    with pytest.raises(ValueError, match=r"progress.jsonl, line 2"):
        RowLog.open(path)
