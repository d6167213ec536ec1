"""Training data: load what `cai generate` writes (or any dataset with the same columns) and tokenise it.

SFT rows need `messages` (a list of {role, content}, ending with the assistant turn to learn).
Pair rows need `prompt`, `chosen`, `rejected` and optionally `p_chosen` (soft label; 1.0 if absent).
Problems name the file, the row and the column.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

from cai.errors import CaiError


class DatasetError(CaiError, ValueError):
    """Training data that can't be used as given."""


def load_rows(source: str | Path) -> list[dict]:
    """Rows from a `datasets` folder (save_to_disk), a .jsonl (or .jsonl.gz) or a .json file."""
    path = Path(source)
    if not path.exists():
        raise DatasetError(f"{path}: no such file or folder (expected a datasets folder, .jsonl or .json)")
    if path.is_dir():
        from datasets import load_from_disk

        try:
            ds = load_from_disk(str(path))
        except FileNotFoundError as e:
            raise DatasetError(f"{path}: not a folder written by datasets' save_to_disk ({e})") from None
        if hasattr(ds, "keys"):
            raise DatasetError(f"{path} holds several splits ({', '.join(ds.keys())}); pass one split's folder")
        return list(ds)
    if path.suffix == ".jsonl" or path.name.endswith(".jsonl.gz"):
        import gzip

        text = gzip.decompress(path.read_bytes()).decode("utf-8") if path.suffix == ".gz" else path.read_text(encoding="utf-8")
        rows = []
        for n, line in enumerate(text.splitlines(), start=1):
            if line.strip():
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError as e:
                    raise DatasetError(f"{path}, line {n}: invalid JSON ({e.msg})") from None
        return rows
    if path.suffix == ".json":
        rows = json.loads(path.read_text(encoding="utf-8"))
        if not isinstance(rows, list):
            raise DatasetError(f"{path}: expected a JSON list of rows")
        return rows
    raise DatasetError(f"{path}: unsupported file type; use a datasets folder, .jsonl, .jsonl.gz or .json")


def load_hh_pairs(path: str | Path) -> list[dict]:
    """Anthropic HH-RLHF rows ("chosen"/"rejected" transcripts, .jsonl or .jsonl.gz) as prompt/chosen/rejected."""
    return hh_pairs_from_rows(load_rows(path))


def hh_pairs_from_rows(rows: list[dict]) -> list[dict]:
    """HH-RLHF transcript rows as prompt/chosen/rejected.

    The prompt is the conversation before the final assistant turn (earlier turns kept as text);
    pairs whose contexts differ, or whose final replies are empty or equal, are skipped.
    """
    import re

    out = []
    for row in rows:
        cut_c, cut_r = row["chosen"].rfind("\n\nAssistant:"), row["rejected"].rfind("\n\nAssistant:")
        context = row["chosen"][:cut_c]
        chosen, rejected = row["chosen"][cut_c + 12:].strip(), row["rejected"][cut_r + 12:].strip()
        if context != row["rejected"][:cut_r] or not chosen or not rejected or chosen == rejected:
            continue
        prompt = re.sub(r"^\s*Human:\s*", "", context.strip())
        prompt = prompt.replace("\n\nHuman:", "\nUser:").replace("\n\nAssistant:", "\nAssistant:")
        out.append({"prompt": prompt, "chosen": chosen, "rejected": rejected})
    return out


def _where(source: str, i: int) -> str:
    return f"{source}, row {i + 1}"


@dataclass
class Tokenised:
    input_ids: list[int]
    loss_mask: list[int]  # 1 on the response tokens

    @property
    def n_targets(self) -> int:
        """Response tokens the losses learn or score: masked ones after position 0 (which nothing predicts)."""
        return sum(self.loss_mask[1:])


def tokenise_chat(tokenizer, messages: list[dict], where: str, max_length: int) -> Tokenised:
    """A conversation ending with the assistant turn to learn or score, masked to that turn."""
    if not isinstance(messages, list) or not messages or messages[-1].get("role") != "assistant":
        raise DatasetError(f"{where}, column 'messages': must be a non-empty list ending with an assistant turn")
    if not str(messages[-1].get("content", "")).strip():
        raise DatasetError(f"{where}, column 'messages': the assistant turn is empty")
    return _prompt_and_answers(tokenizer, messages[:-1], [str(messages[-1]["content"])], where, max_length)[0]


def _prompt_and_answers(tokenizer, history: list[dict], answers: list[str], where: str, max_length: int) -> list[Tokenised]:
    """Each answer after the same `history`, tokenised with the chat template and fitted into max_length.

    Too long: the start of the prompt is cut first (the answer is what is learned or compared),
    down to a quarter of max_length, then the end of an answer that still overflows. The prompt is
    cut once for all the answers, by the longest, so a pair's chosen and rejected are conditioned on
    the same prompt tokens (as TRL does): DPO and the reward model compare log p(y_c | x) with
    log p(y_r | x), never with a differently truncated x.
    """
    prompt = tokenizer.apply_chat_template(history, tokenize=False, add_generation_prompt=True)
    p_ids = tokenizer.encode(prompt, add_special_tokens=False)
    r_ids = []
    for answer in answers:
        full = tokenizer.apply_chat_template([*history, {"role": "assistant", "content": answer}], tokenize=False)
        if not full.startswith(prompt):
            raise DatasetError(f"{where}: the chat template does not extend the prompt with the answer; cannot mask the prompt")
        r_ids.append(tokenizer.encode(full[len(prompt):], add_special_tokens=False))
    keep = min(len(p_ids), max(max_length // 4, max_length - max(len(r) for r in r_ids)))  # prompt tokens kept
    p_ids = p_ids[len(p_ids) - keep:]
    fitted = [r[:max_length - keep] for r in r_ids]
    return [Tokenised(p_ids + r, [0] * keep + [1] * len(r)) for r in fitted]


def tokenise_sft(rows: list[dict], tokenizer, source: str, max_length: int) -> list[Tokenised]:
    if rows and "messages" not in rows[0]:
        raise DatasetError(f"{source}: SFT data needs a 'messages' column; it has {sorted(rows[0])}")
    out = []
    for i, row in enumerate(rows):
        if "messages" not in row:
            raise DatasetError(f"{_where(source, i)}: missing column 'messages'")
        out.append(tokenise_chat(tokenizer, row["messages"], _where(source, i), max_length))
    if not out:
        raise DatasetError(f"{source}: no rows")
    return out


@dataclass
class Pair:
    chosen: Tokenised
    rejected: Tokenised
    p_chosen: float

    @property
    def preferred(self) -> Tokenised:
        """The answer the label prefers (RPO's NLL target): chosen when p_chosen >= 0.5, else rejected."""
        return self.chosen if self.p_chosen >= 0.5 else self.rejected


def tokenise_pairs(rows: list[dict], tokenizer, source: str, max_length: int) -> list[Pair]:
    need = ("prompt", "chosen", "rejected")
    if rows and any(c not in rows[0] for c in need):
        missing = [c for c in need if c not in rows[0]]
        raise DatasetError(f"{source}: preference data needs columns prompt, chosen, rejected; missing {missing}, has {sorted(rows[0])}")
    out = []
    for i, row in enumerate(rows):
        where = _where(source, i)
        for col in need:
            if not isinstance(row.get(col), str) or not row[col].strip():
                raise DatasetError(f"{where}, column '{col}': missing or empty")
        p = row.get("p_chosen", 1.0)
        if p is None or not (0.0 <= float(p) <= 1.0):
            raise DatasetError(f"{where}, column 'p_chosen': must be a probability in [0, 1], got {p!r}")
        chosen, rejected = _prompt_and_answers(tokenizer, [{"role": "user", "content": row["prompt"]}], [row["chosen"], row["rejected"]],
                                               where, max_length)
        out.append(Pair(chosen, rejected, float(p)))
    if not out:
        raise DatasetError(f"{source}: no rows")
    return out


def collate(items: list[Tokenised], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad into (B, T) tensors: input_ids, attention_mask, loss_mask."""
    width = max(len(t.input_ids) for t in items)
    ids = torch.full((len(items), width), pad_id, dtype=torch.long)
    attn = torch.zeros((len(items), width), dtype=torch.long)
    mask = torch.zeros((len(items), width), dtype=torch.long)
    for i, t in enumerate(items):
        n = len(t.input_ids)
        ids[i, :n] = torch.tensor(t.input_ids)
        attn[i, :n] = 1
        mask[i, :n] = torch.tensor(t.loss_mask)
    return {"input_ids": ids, "attention_mask": attn, "loss_mask": mask}
