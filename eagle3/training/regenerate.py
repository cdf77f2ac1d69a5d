"""`eagle3 regenerate`: replace the assistant turns of training conversations with the target's own answers
(the EAGLE-3 paper trains on target-generated responses), appending ShareGPT-format JSONL as it goes.

Answers come from the target in process, or from any OpenAI-compatible server (vLLM, SGLang, llama.cpp
server) with --endpoint, so users with big targets use their own serving stack. --batch-size conversations go
together: one batched forward pass in process, that many concurrent requests to a server. Resumable: conversations already in the output file (by source index) are skipped.
Each assistant turn is regenerated given the conversation so far, earlier turns already regenerated.
"""

from __future__ import annotations

import json
import sys
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from typing import Callable

from tqdm import tqdm

from eagle3 import options
from eagle3.files import end_torn_line, read_text

# Conversations so far (each ending with a user turn) -> one assistant text per conversation, None where it
# failed (the conversation fills the context, the server refused): the failure is reported and counted.
AnswerMany = Callable[[list[list[dict]]], list[str | None]]
SHAREGPT_ROLES = {"user": "human", "assistant": "gpt", "system": "system"}


def local_answerer(target, max_new_tokens: int, temperature: float = 0.0, seed: int = 0) -> AnswerMany:
    """Answers from the target in process, a batch of conversations per forward pass (generate_batch)."""
    from eagle3.decoding.generate import generate_batch
    from eagle3.decoding.sampling import SamplingParams

    sampling = SamplingParams(temperature=temperature, seed=seed if temperature > 0 else None)
    templated = bool(getattr(target.tokenizer, "chat_template", None))

    def answer_many(conversations: list[list[dict]]) -> list[str | None]:
        prompts = [target.encode_chat(m) if templated else target.encode("\n".join(x["content"] for x in m))
                   for m in conversations]  # fmt: skip
        fits = [i for i, p in enumerate(prompts) if len(p) < target.context]
        for i in set(range(len(prompts))) - set(fits):
            print(f"skipped: a conversation of {len(prompts[i])} tokens fills the context", file=sys.stderr)
        results = generate_batch(target, [prompts[i] for i in fits], max_new_tokens, sampling)
        answers: list[str | None] = [None] * len(prompts)
        for i, result in zip(fits, results):
            answers[i] = result.text
        return answers

    return answer_many


def endpoint_answerer(url: str, model: str, max_new_tokens: int, temperature: float = 0.0, timeout: float = 600,
                      concurrency: int = 8) -> AnswerMany:  # fmt: skip
    """Answers from an OpenAI-compatible /v1/chat/completions endpoint, `concurrency` requests in flight."""
    endpoint = url.rstrip("/")
    if not endpoint.endswith("/chat/completions"):
        endpoint += "/chat/completions" if endpoint.endswith("/v1") else "/v1/chat/completions"

    def answer(messages: list[dict]) -> str | None:
        body = json.dumps({"model": model, "messages": messages, "max_tokens": max_new_tokens,
                           "temperature": temperature}).encode()  # fmt: skip
        request = urllib.request.Request(endpoint, body, {"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(request, timeout=timeout) as response:
                reply = json.loads(response.read())
            return reply["choices"][0]["message"]["content"]
        except (OSError, ValueError) as err:
            print(f"request failed: {err}", file=sys.stderr)
        except (KeyError, IndexError, TypeError):
            print(f"unexpected reply from {endpoint}: {str(reply)[:200]}", file=sys.stderr)
        return None

    def answer_many(conversations: list[list[dict]]) -> list[str | None]:
        with ThreadPoolExecutor(max_workers=max(1, concurrency)) as pool:
            return list(pool.map(answer, conversations))

    return answer_many


def regenerate_conversations(batch: list[list[dict]], answer_many: AnswerMany) -> list[list[dict] | None]:
    """Each conversation with its assistant turns replaced, turn by turn: the k-th answers of the whole batch
    are asked together, each given its conversation so far (earlier answers already regenerated)."""
    outs: list[list[dict] | None] = [[] for _ in batch]
    cursors = [0] * len(batch)
    while True:
        waiting = []
        for i, messages in enumerate(batch):
            out = outs[i]
            while out is not None and cursors[i] < len(messages) and messages[cursors[i]]["role"] != "assistant":
                out.append(dict(messages[cursors[i]]))
                cursors[i] += 1
            if out is not None and cursors[i] < len(messages):
                waiting.append(i)
        if not waiting:
            return outs
        for i, text in zip(waiting, answer_many([outs[i] for i in waiting])):
            if text is None:
                outs[i] = None  # failed: the whole conversation is dropped
            else:
                outs[i].append({"role": "assistant", "content": text})
                cursors[i] += 1


def done_ids(path: Path) -> set[int]:
    """Source indices already written (a torn last line from an interrupted run is ignored)."""
    ids = set()
    if path.is_file():
        for line in read_text(path)[0].splitlines():
            try:
                ids.add(int(json.loads(line)["source_index"]))
            except (json.JSONDecodeError, KeyError, TypeError, ValueError):
                continue
    return ids


def regenerate(conversations: list[list[dict]], answer_many: AnswerMany, out: Path, batch_size: int = 8,
               progress: bool = True) -> dict[str, int]:  # fmt: skip
    """Appends regenerated conversations to `out` (JSONL, ShareGPT format), skipping those already there.
    Conversations go batch_size at a time, similar lengths together (less padding in a local batch)."""
    out.parent.mkdir(parents=True, exist_ok=True)
    skip = done_ids(out)
    todo = sorted((i for i in range(len(conversations)) if i not in skip),
                  key=lambda i: sum(len(m["content"]) for m in conversations[i]))  # fmt: skip
    counts = {"done_before": len(skip), "written": 0, "failed": 0}
    end_torn_line(out)
    bar = tqdm(total=len(todo), desc="regenerate", disable=not progress, file=sys.stderr)
    with out.open("a") as f, _resume_hint(out, counts):
        for first in range(0, len(todo), max(1, batch_size)):
            indices = todo[first : first + max(1, batch_size)]
            for index, messages in zip(indices, regenerate_conversations([conversations[i] for i in indices], answer_many)):
                if messages is None:
                    counts["failed"] += 1
                    continue
                turns = [{"from": SHAREGPT_ROLES[m["role"]], "value": m["content"]} for m in messages]
                f.write(json.dumps({"source_index": index, "conversations": turns}) + "\n")
                counts["written"] += 1
            f.flush()
            bar.update(len(indices))
    bar.close()
    return counts


@contextmanager
def _resume_hint(out: Path, counts: dict[str, int]):
    """An interrupt says what is kept and how to continue."""
    try:
        yield
    except KeyboardInterrupt:
        raise KeyboardInterrupt(f"regenerate stopped after {counts['written']} more conversations, kept in {out}; "
                                "rerun the same command to continue") from None  # fmt: skip


def add_regenerate_parser(sub) -> None:
    p = sub.add_parser("regenerate", help="replace assistant turns of training data with the target's own answers")
    p.add_argument("--target", default="smollm2-135m", help="answers come from this model (unless --endpoint)")
    p.add_argument("--data", nargs="*", default=None, help="conversation files (default: as `eagle3 train`)")
    p.add_argument("--out", required=True, help="JSONL output (appended; rerun to resume)")
    p.add_argument("--limit", type=options.count, default=None)
    p.add_argument("--max-new-tokens", type=options.count, default=512)
    p.add_argument("--temperature", type=options.temperature, default=0.0)
    p.add_argument("--endpoint", default=None, help="OpenAI-compatible server URL, e.g. http://127.0.0.1:8000")
    p.add_argument("--model", default=None, help="model name to send to the endpoint (default: --target)")
    p.add_argument("--batch-size", type=options.integer(1, 4096), default=8,
                   help="conversations answered together: one batched forward pass locally, concurrent requests "
                        "to an endpoint")  # fmt: skip
    p.add_argument("--concurrency", type=options.integer(1, 4096), default=None,
                   help="alias of --batch-size for endpoints")  # fmt: skip
    options.add_runtime_arguments(p)


def regenerate_command(args) -> int:
    from eagle3.training.data import default_sources, read_conversations

    out = Path(args.out)
    if out.is_dir():
        raise ValueError(f"--out {out} is a folder; regenerate appends to a JSONL file")
    sources = [Path(p) for p in args.data] if args.data else default_sources()
    conversations, stats = read_conversations(sources, args.limit)
    batch_size = args.concurrency or args.batch_size
    if args.endpoint:
        answer_many = endpoint_answerer(args.endpoint, args.model or args.target, args.max_new_tokens,
                                        args.temperature, concurrency=batch_size)  # fmt: skip
    else:
        from eagle3.runtimes.target import load_target

        options.apply_threads(args)
        target = load_target(args.target, dtype=args.dtype, device=args.device, runtime=args.runtime)
        answer_many = local_answerer(target, args.max_new_tokens, args.temperature)
    counts = regenerate(conversations, answer_many, out, batch_size)
    print(json.dumps({"read": stats.read, "skipped": stats.skipped, "replaced_bytes": stats.replaced, **counts}))
    return 0
