"""`eagle3 regenerate`: replace the assistant turns of training conversations with the target's own answers
(the EAGLE-3 paper trains on target-generated responses), appending ShareGPT-format JSONL as it goes.

Answers come from the target in process, or from any OpenAI-compatible server (vLLM, SGLang, llama.cpp
server) with --endpoint, so users with big targets use their own serving stack; requests to a server run
--concurrency at a time. Resumable: conversations already in the output file (by source index) are skipped.
Each assistant turn is regenerated given the conversation so far, earlier turns already regenerated.
"""

from __future__ import annotations

import json
import sys
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Callable

from tqdm import tqdm

Answer = Callable[[list[dict]], str]  # conversation so far (ending with a user turn) -> assistant text
SHAREGPT_ROLES = {"user": "human", "assistant": "gpt", "system": "system"}


def local_answerer(target, max_new_tokens: int, temperature: float = 0.0, seed: int = 0) -> Answer:
    from eagle3.generate import generate
    from eagle3.sampling import SamplingParams

    sampling = SamplingParams(temperature=temperature, seed=seed if temperature > 0 else None)
    templated = bool(getattr(target.tokenizer, "chat_template", None))

    def answer(messages: list[dict]) -> str:
        ids = target.encode_chat(messages) if templated else target.encode("\n".join(m["content"] for m in messages))
        budget = min(max_new_tokens, target.context - len(ids))
        if budget < 1:
            raise ValueError("the conversation fills the context")
        return generate(target, ids, budget, sampling).text

    return answer


def endpoint_answerer(url: str, model: str, max_new_tokens: int, temperature: float = 0.0, timeout: float = 600) -> Answer:
    """Answers from an OpenAI-compatible /v1/chat/completions endpoint."""
    endpoint = url.rstrip("/")
    if not endpoint.endswith("/chat/completions"):
        endpoint += "/chat/completions" if endpoint.endswith("/v1") else "/v1/chat/completions"

    def answer(messages: list[dict]) -> str:
        body = json.dumps({"model": model, "messages": messages, "max_tokens": max_new_tokens,
                           "temperature": temperature}).encode()  # fmt: skip
        request = urllib.request.Request(endpoint, body, {"Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=timeout) as response:
            reply = json.loads(response.read())
        try:
            return reply["choices"][0]["message"]["content"]
        except (KeyError, IndexError, TypeError):
            raise ValueError(f"unexpected reply from {endpoint}: {str(reply)[:200]}") from None

    return answer


def regenerate_conversation(messages: list[dict], answer: Answer) -> list[dict]:
    """The conversation with each assistant turn replaced by answer(conversation so far)."""
    out: list[dict] = []
    for message in messages:
        if message["role"] == "assistant":
            out.append({"role": "assistant", "content": answer(out)})
        else:
            out.append(dict(message))
    return out


def done_ids(path: Path) -> set[int]:
    """Source indices already written (a torn last line from an interrupted run is ignored)."""
    ids = set()
    if path.is_file():
        for line in path.read_text().splitlines():
            try:
                ids.add(int(json.loads(line)["source_index"]))
            except (json.JSONDecodeError, KeyError, TypeError, ValueError):
                continue
    return ids


def regenerate(conversations: list[list[dict]], answer: Answer, out: Path, concurrency: int = 1,
               progress: bool = True) -> dict[str, int]:  # fmt: skip
    """Appends regenerated conversations to `out` (JSONL, ShareGPT format), skipping those already there."""
    out.parent.mkdir(parents=True, exist_ok=True)
    skip = done_ids(out)
    todo = [(i, c) for i, c in enumerate(conversations) if i not in skip]
    counts = {"done_before": len(skip), "written": 0, "failed": 0}
    # A torn last line (killed mid-write) would glue onto the next record: start on a fresh line.
    if out.is_file() and out.stat().st_size and not out.read_bytes().endswith(b"\n"):
        with out.open("a") as f:
            f.write("\n")

    def work(item: tuple[int, list[dict]]) -> tuple[int, list[dict] | None]:
        index, messages = item
        try:
            return index, regenerate_conversation(messages, answer)
        except (ValueError, OSError) as err:  # a conversation too long, a server error: count and go on
            print(f"conversation {index}: {err}", file=sys.stderr)
            return index, None

    with out.open("a") as f, ThreadPoolExecutor(max_workers=max(1, concurrency)) as pool:
        for index, messages in tqdm(pool.map(work, todo), total=len(todo), desc="regenerate", disable=not progress,
                                    file=sys.stderr):  # fmt: skip
            if messages is None:
                counts["failed"] += 1
                continue
            turns = [{"from": SHAREGPT_ROLES[m["role"]], "value": m["content"]} for m in messages]
            f.write(json.dumps({"source_index": index, "conversations": turns}) + "\n")
            f.flush()
            counts["written"] += 1
    return counts


def add_regenerate_parser(sub) -> None:
    p = sub.add_parser("regenerate", help="replace assistant turns of training data with the target's own answers")
    p.add_argument("--target", default="smollm2-135m", help="answers come from this model (unless --endpoint)")
    p.add_argument("--data", nargs="*", default=None, help="conversation files (default: as `eagle3 train`)")
    p.add_argument("--out", required=True, help="JSONL output (appended; rerun to resume)")
    p.add_argument("--limit", type=int, default=None)
    p.add_argument("--max-new-tokens", type=int, default=512)
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--endpoint", default=None, help="OpenAI-compatible server URL, e.g. http://127.0.0.1:8000")
    p.add_argument("--model", default=None, help="model name to send to the endpoint (default: --target)")
    p.add_argument("--concurrency", type=int, default=8, help="requests in flight to the endpoint")


def regenerate_command(args) -> int:
    from eagle3.data import default_sources, read_conversations

    if args.max_new_tokens < 1:
        raise ValueError(f"max-new-tokens must be >= 1, got {args.max_new_tokens}")
    sources = [Path(p) for p in args.data] if args.data else default_sources()
    conversations, stats = read_conversations(sources, args.limit)
    if args.endpoint:
        answer = endpoint_answerer(args.endpoint, args.model or args.target, args.max_new_tokens, args.temperature)
        concurrency = args.concurrency
    else:
        from eagle3.target import load_target

        answer = local_answerer(load_target(args.target), args.max_new_tokens, args.temperature)
        concurrency = 1  # one model in process: requests would only queue behind each other
    counts = regenerate(conversations, answer, Path(args.out), concurrency)
    print(json.dumps({"read": stats.read, "skipped": stats.skipped, **counts}))
    return 0
