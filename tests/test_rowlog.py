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


def test_rowlog_reads_the_last_row_of_each_id_one_at_a_time(tmp_path):
    """The end of a job reads every row; the log holds an index (id -> offset of its last line), not the rows: reading
    2,000 rows of 4 KB back peaks under 100 KB (the rows are 8 MB). A retried id keeps its first place and gives its last
    row; a partial last line (a killed run) is no row, and `RowLog.read` leaves it in the file."""
    import json
    import tracemalloc

    path = tmp_path / "progress.jsonl"
    with RowLog.open(path) as log:
        for i in range(2000):  # rows 1500-1999 retry ids 0-499
            log.append({"id": f"row-{i % 1500}", "status": "ok" if i >= 500 else "judge_failed", "text": f"{i:04d}" * 1000})
    with open(path, "a") as f:
        f.write('{"id": "row-1500", "sta')
    expected: dict[str, dict] = {}
    for line in path.read_text().splitlines()[:-1]:
        row = json.loads(line)
        expected[row["id"]] = row
    log = RowLog.read(path)
    assert len(log) == 1500 and list(log.ids()) == list(expected)
    tracemalloc.start()
    try:
        rows = 0
        for row, want in zip(log, expected.values(), strict=True):
            assert row == want
            rows += 1
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert rows == 1500 and next(iter(log))["text"] == "1500" * 1000
    assert peak < 100_000, f"reading the rows back peaked at {peak} bytes"
    assert path.read_text().endswith('"sta') and log.done_ids() == set(expected)


def test_rowlog_keeps_rows_whose_text_holds_unicode_line_breaks(tmp_path):
    """JSON leaves U+2028, U+0085 and U+001C unescaped in a string; a line is what ends in \\n, so such a row reads back
    (the log was split with str.splitlines, which broke such a row in two and refused the log as not cai's)."""
    path = tmp_path / "progress.jsonl"
    text = "one\u2028two\x85three\x1cfour"
    with RowLog.open(path) as log:
        log.append({"id": "a", "status": "ok", "text": text})
    with RowLog.open(path) as log:
        assert log.final_rows() == [{"id": "a", "status": "ok", "text": text}]


def test_rowlog_names_a_line_that_is_not_utf8(tmp_path):
    path = tmp_path / "progress.jsonl"
    path.write_bytes(b'{"id": "a"}\n\n{"id": "\xff"}\n')
    with pytest.raises(ValueError, match=r"progress.jsonl, line 3: not a row written by cai"):
        RowLog.open(path)
