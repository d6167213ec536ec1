"""Rows as a generator's outputs, a JSONL file and a Hugging Face `datasets` folder, written in bounded memory.

`write_rows` reads its rows once, one at a time, and holds one batch of them (at most `BATCH_ROWS` rows or
`BATCH_BYTES` of JSON): (1) it writes the JSONL file and infers each column's Arrow type a batch at a time, widening
it across batches as `Dataset.from_list` does over the whole list (a column None in the first thousand rows and a
string later is a string column; ints and floats make a float column; a struct's keys are those of every row);
(2) it reads the JSONL file back a batch at a time into the `datasets` folder, the shards, `dataset_info.json` and
`state.json` that `Dataset.save_to_disk` writes, which `datasets.load_from_disk` reads.

One deliberate difference from `Dataset.from_list`: its columns are the keys of the first row, and a key that first
appears in a later row is dropped from the dataset (it stays in the JSONL). Here the columns are every row's keys in the
order first seen, None where a row lacks one, so the dataset holds what the JSONL holds.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Iterable, Iterator
from pathlib import Path

from cai.errors import CaiError

BATCH_ROWS = 1000
"""Most rows converted to Arrow at once (`datasets`' own writer batch size)."""

BATCH_BYTES = 8 * 2**20
"""Most bytes of JSON converted to Arrow at once: long rows make smaller batches."""


class RowTypeError(CaiError, ValueError):
    """Rows whose column holds values Arrow can't put in one column (a string in some rows, a number in others)."""


def write_rows(rows: Iterable[dict], path: Path, dataset_dir: Path) -> int:
    """`rows` as a JSONL file (written beside, then renamed) and, when there are any, a `datasets` folder (written beside,
    then put in the place of an older one); with none, an older folder is removed (a rerun may keep fewer rows, and a
    trainer must not read stale ones). Returns how many rows were written."""
    import pyarrow as pa

    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".jsonl.tmp")
    schema, count = None, 0
    with open(tmp, "w", encoding="utf-8") as f:
        def written() -> Iterator[tuple[dict, int]]:
            for row in rows:
                line = json.dumps(row, ensure_ascii=False) + "\n"
                f.write(line)
                yield row, len(line)

        for batch in _batches(written()):
            count += len(batch)
            seen = _batch_schema(batch, path)
            try:
                schema = seen if schema is None else pa.unify_schemas([schema, seen], promote_options="permissive")
            except (pa.ArrowInvalid, pa.ArrowTypeError) as e:
                raise RowTypeError(f"{path}: rows {count - len(batch) + 1}-{count} have a column of another type than the rows "
                                   f"before them ({e})") from None
    tmp.replace(path)
    if count:
        _write_dataset(path, schema, dataset_dir)
    elif dataset_dir.exists():
        shutil.rmtree(dataset_dir)
    return count


def _batches(sized: Iterable[tuple[dict, int]]) -> Iterator[list[dict]]:
    """Rows (each with its size in bytes) in lists of at most BATCH_ROWS rows or BATCH_BYTES bytes (at least one row)."""
    batch, size = [], 0
    for row, n in sized:
        batch.append(row)
        size += n
        if len(batch) == BATCH_ROWS or size >= BATCH_BYTES:
            yield batch
            batch, size = [], 0
    if batch:
        yield batch


def _batch_schema(batch: list[dict], path: Path):
    """Each column's Arrow type over `batch`, as `Dataset.from_list` infers it (through `datasets`' own typed sequence)."""
    import pyarrow as pa
    from datasets.arrow_writer import OptimizedTypedSequence

    fields = []
    for key in dict.fromkeys(k for row in batch for k in row):
        try:
            fields.append(pa.field(key, pa.array(OptimizedTypedSequence([row.get(key) for row in batch], col=key)).type))
        except (pa.ArrowInvalid, pa.ArrowTypeError) as e:
            raise RowTypeError(f"{path}: column {key!r} holds values of more than one type ({e})") from None
    return pa.schema(fields)


def _write_dataset(jsonl: Path, schema, dataset_dir: Path) -> None:
    """The rows of `jsonl`, read back a batch at a time, as the folder `Dataset.save_to_disk` writes: shards of at most
    `datasets.config.MAX_SHARD_SIZE` bytes, its `state.json` and `dataset_info.json`. Written beside, then renamed."""
    import pyarrow as pa
    from datasets import DatasetInfo, Features, config
    from datasets.arrow_writer import ArrowWriter
    from datasets.fingerprint import generate_random_fingerprint
    from datasets.utils.py_utils import asdict, convert_file_size_to_int

    features = Features.from_arrow_schema(schema)
    max_shard = convert_file_size_to_int(config.MAX_SHARD_SIZE)
    tmp = dataset_dir.with_name(f".{dataset_dir.name}.{os.getpid()}.partial")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    shards: list[Path] = []
    writer, shard_bytes = None, 0
    try:
        with open(jsonl, "rb") as f:
            for batch in _batches((json.loads(line), len(line)) for line in f):
                table = pa.Table.from_arrays([pa.array([row.get(c.name) for row in batch], type=c.type) for c in schema],
                                             schema=schema)
                if writer is None:
                    shards.append(tmp / f"shard-{len(shards)}.arrow")
                    writer, shard_bytes = ArrowWriter(features=features, path=str(shards[-1])), 0
                writer.write_table(table)
                shard_bytes += table.nbytes
                if shard_bytes >= max_shard:
                    writer.finalize()
                    writer.close()
                    writer = None
        if writer is not None:
            writer.finalize()
            writer.close()
            writer = None
        names = [f"data-{i:05d}-of-{len(shards):05d}.arrow" for i in range(len(shards))]
        for shard, name in zip(shards, names):
            shard.rename(tmp / name)
        # What save_to_disk writes of a Dataset made by Dataset.from_list: a random fingerprint, no format, no split.
        state = {"_data_files": [{"filename": name} for name in names], "_fingerprint": generate_random_fingerprint(),
                 "_format_columns": None, "_format_kwargs": {}, "_format_type": None, "_output_all_columns": False, "_split": None}
        (tmp / config.DATASET_STATE_JSON_FILENAME).write_text(json.dumps(state, indent=2, sort_keys=True), encoding="utf-8")
        info = asdict(DatasetInfo(features=features))
        (tmp / config.DATASET_INFO_FILENAME).write_text(json.dumps({k: info[k] for k in sorted(info)}, indent=2), encoding="utf-8")
        if dataset_dir.exists():
            shutil.rmtree(dataset_dir)
        tmp.rename(dataset_dir)
    finally:
        if writer is not None:
            writer.close()
        shutil.rmtree(tmp, ignore_errors=True)
