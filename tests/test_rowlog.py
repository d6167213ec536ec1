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


def test_rowlog_does_not_hold_rows_in_memory(tmp_path):
    """A long job's memory must not grow with its rows (they were held, about 4 KiB each): 2,000 rows of 4 KB leave
    less than 100 KB behind, and every row is still read back."""
    import tracemalloc

    with RowLog.open(tmp_path / "progress.jsonl") as log:
        log.append({"id": "warm-up", "status": "ok"})
        tracemalloc.start()
        try:
            before = tracemalloc.get_traced_memory()[0]
            for i in range(2000):
                log.append({"id": f"row-{i}", "status": "ok", "text": f"{i:04d}" * 1000})
            grown = tracemalloc.get_traced_memory()[0] - before
        finally:
            tracemalloc.stop()
        rows = log.final_rows()
    assert grown < 100_000, f"the log holds {grown} bytes after 2,000 rows"
    assert len(rows) == 2001 and rows[-1] == {"id": "row-1999", "status": "ok", "text": "1999" * 1000}
