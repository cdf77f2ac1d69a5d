"""`eagle3 bench --batch-size 1,2,4,8`: throughput of plain decoding and EAGLE-3 at batch sizes, side by side.

For each batch size B, each method decodes the suites' first turns B at a time through the engine (continuous
batching: a finished row takes the next prompt at once), the methods taking turns in an order that rotates with
B. Metrics per method and B: throughput (generated tokens per second of the whole run), its ratio to plain
decoding at the same B, per-row latency (each prompt's wall time from its prefill to its last token: median and
90th percentile), tau; at temperature 0, how many outputs equal plain decoding's at B = 1, token for token.

Nothing lost: OUT/batch_run.json holds the run's configuration, OUT/cells.jsonl each finished (B, method) cell,
appended as it goes; `resume` skips the finished cells. batch.json, batch.md and throughput.png come last.
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch
from tqdm import tqdm

from eagle3.evaluation.bench import RUN_KEY_DEFAULTS, check_out, clear_out, fits_context, method_labels
from eagle3.methods.drafter import NoDrafter
from eagle3.decoding.engine import Engine, Request
from eagle3.files import atomic_path, end_torn_line, read_text, write_text
from eagle3.methods.pld import PromptLookupDrafter
from eagle3.decoding.sampling import SamplingParams
from eagle3.evaluation.suites import data_dir, read_suite
from eagle3.runtimes.target import Target, encode_messages
from eagle3.decoding.tree import PLAIN, TreeSpec

BATCH_METHODS = ("vanilla", "eagle3", "pld")
RUN_FILES = ("batch_run.json", "cells.jsonl", "batch.json")
FILES = (*RUN_FILES, "batch.md", "throughput.png")
# What makes a run the same run (--resume compares them).
RUN_KEYS = ("target", "draft", "draft_int8", "draft_window", "tree", "suites", "methods", "batch_sizes",
            "max_new_tokens", "limit", "temperature", "top_p", "top_k", "seed", "pld_tokens", "dtype", "device",
            "threads", "prompts", "runtime")  # fmt: skip


def engines(target: Target, labels: list[str], trees: list[TreeSpec], draft: str | Path | None, pld_tokens: int,
            draft_int8: bool | None, draft_window: int | None) -> dict[str, Engine]:  # fmt: skip
    """One engine per method (its batch size set per cell); an auto tree's policy lives for the whole run."""
    from eagle3.methods.drafter import load_drafter

    made: dict[str, Engine] = {}
    drafter = load_drafter(draft, target, draft_int8, draft_window) if any(l.startswith("eagle3") for l in labels) else None
    tree_of = dict(zip(method_labels(["eagle3"], trees), trees))
    for label in labels:
        if label == "vanilla":
            made[label] = Engine(target, NoDrafter(), PLAIN, method="vanilla")
        elif label == "pld":
            pld = PromptLookupDrafter(pld_tokens)
            made[label] = Engine(target, pld, pld.tree, method="pld")
        else:
            made[label] = Engine(target, drafter, tree_of[label], method=label)
    return made


def run_cell(engine: Engine, batch: int, prompts: list[list[int]], max_new_tokens: int, sampling: SamplingParams
             ) -> dict:  # fmt: skip
    """Every prompt through the engine, `batch` rows at a time: the cell's measurements and outputs."""
    engine.max_rows = batch
    requests = [Request(p, max_new_tokens, sampling) for p in prompts]
    start = time.perf_counter()
    results = engine.run(requests)
    wall = time.perf_counter() - start
    tokens = sum(r.new_tokens for r in results)
    latencies = sorted(r.wall_s for r in results)
    lengths = [n for r in results for n in r.accept_lengths]
    return {
        "batch": batch, "method": engine.method, "wall_s": wall, "new_tokens": tokens,
        "tokens_per_s": tokens / wall if wall > 0 else 0.0,
        "latency_median_s": statistics.median(latencies),
        "latency_p90_s": latencies[min(len(latencies) - 1, int(0.9 * len(latencies)))],
        "ms_per_token": 1000 * statistics.median(r.wall_s / max(1, r.new_tokens) for r in results),
        "tau": sum(lengths) / len(lengths) if lengths else None,
        "drafted": len(lengths) / max(1, len(lengths) + sum(r.plain_rounds for r in results)),
        "token_ids": [r.token_ids for r in results],
    }  # fmt: skip


def summarize(cells: list[dict], labels: list[str], batch_sizes: list[int], greedy: bool) -> dict:
    """summary[method][B]: tokens_per_s, speedup (over vanilla at the same B), latencies, tau, identical."""
    by = {(c["method"], c["batch"]): c for c in cells}
    reference = by.get(("vanilla", batch_sizes[0]))
    summary: dict = {}
    for label in labels:
        summary[label] = {}
        for b in batch_sizes:
            cell, base = by.get((label, b)), by.get(("vanilla", b))
            if cell is None:
                continue
            entry = {k: cell[k] for k in ("tokens_per_s", "latency_median_s", "latency_p90_s", "ms_per_token", "tau",
                                          "drafted", "new_tokens", "wall_s")}  # fmt: skip
            entry["speedup"] = cell["tokens_per_s"] / base["tokens_per_s"] if base and base["tokens_per_s"] else None
            if greedy and reference is not None:
                entry["identical"] = sum(a == b for a, b in zip(cell["token_ids"], reference["token_ids"]))
                entry["n"] = len(cell["token_ids"])
            summary[label][str(b)] = entry
    return summary


def markdown(summary: dict, config: dict) -> str:
    sizes = [str(b) for b in config["batch_sizes"]]

    def table(title: str, cell) -> list[str]:
        lines = [f"### {title}", "", "| method | " + " | ".join(f"B={b}" for b in sizes) + " |",
                 "|---" * (len(sizes) + 1) + "|"]  # fmt: skip
        for label, per in summary.items():
            lines.append(f"| {label} | " + " | ".join(cell(per[b]) if b in per else "-" for b in sizes) + " |")
        return lines + [""]

    def number(key: str, fmt: str):
        return lambda e: "-" if e.get(key) is None else fmt.format(e[key])

    head = [f"# eagle3 bench, batch sizes: {config['target']}", "",
            f"draft `{config['draft']}`, tree {config['tree']}, temperature {config['temperature']}, "
            f"max_new_tokens {config['max_new_tokens']}, {config['prompts']} prompts (first turns of "
            f"{', '.join(config['suites'])}), {config['threads']} threads, {config['device']}, {config['date']}", ""]  # fmt: skip
    body = table("Throughput (generated tokens per second over the run)", number("tokens_per_s", "{:.1f}"))
    body += table("Throughput over plain decoding at the same batch size", number("speedup", "{:.2f}x"))
    body += table("Per-row latency: median / 90th percentile (s)",
                  lambda e: f"{e['latency_median_s']:.2f} / {e['latency_p90_s']:.2f}")  # fmt: skip
    body += table("Time per output token, median over rows (ms)", number("ms_per_token", "{:.1f}"))
    body += table("tau (per drafted round) and share of rounds drafted",
                  lambda e: "-" if e.get("tau") is None else f"{e['tau']:.2f} ({e['drafted']:.0%})")  # fmt: skip
    if config["temperature"] == 0:
        body += table("Outputs identical to plain decoding at B=1",
                      lambda e: "-" if e.get("identical") is None else f"{e['identical']}/{e['n']}")  # fmt: skip
    return "\n".join(head + body)


def plot(summary: dict, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for label, per in summary.items():
        sizes = sorted(per, key=int)
        ax.plot([int(b) for b in sizes], [per[b]["tokens_per_s"] for b in sizes], marker="o", label=label)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("batch size")
    ax.set_ylabel("generated tokens per second")
    ax.set_title("throughput by batch size")
    ax.legend()
    fig.tight_layout()
    with atomic_path(out / "throughput.png") as temp:
        fig.savefig(temp, dpi=110, format="png")
    plt.close(fig)


def read_cells(path: Path) -> dict[tuple[int, str], dict]:
    """Finished cells by (batch, method); a torn last line is ignored."""
    cells = {}
    if path.is_file():
        for line in read_text(path)[0].split("\n"):
            try:
                cell = json.loads(line)
                cells[(int(cell["batch"]), str(cell["method"]))] = cell
            except (json.JSONDecodeError, KeyError, TypeError, ValueError):
                continue
    return cells


def run_batch_bench(
    target: Target, suites: list[str], methods: list[str], out: Path, batch_sizes: list[int],
    max_new_tokens: int = 256, limit: int | None = None, sampling: SamplingParams = SamplingParams(),
    trees: list[TreeSpec] = (), draft: str | Path | None = None, pld_tokens: int = 10,
    draft_int8: bool | None = None, draft_window: int | None = None, data: str | None = None,
    resume: bool = False, overwrite: bool = False,
) -> dict:  # fmt: skip
    """Benchmarks the methods at each batch size into OUT and returns batch.json's content (resume and
    overwrite as run_bench's)."""
    out = Path(out)
    check_out(out, resume, overwrite, RUN_FILES)
    unknown = [m for m in methods if m not in BATCH_METHODS]
    if unknown:
        raise ValueError(f"--batch-size runs {', '.join(BATCH_METHODS)}, not {', '.join(unknown)}")
    labels = method_labels(list(dict.fromkeys(["vanilla", *methods])), list(trees))
    folder = data_dir(data)
    questions = [q for name in suites for q in read_suite(name, folder, limit).questions]
    questions = [q for q in questions if fits_context(target, q, max_new_tokens)]
    if not questions:
        raise ValueError("no questions to run (none fits the context)")
    prompts = [encode_messages(target, [{"role": "user", "content": q.turns[0]}]) for q in questions]
    config = json.loads(json.dumps({
        "target": target.name, "draft": str(draft) if draft else None, "draft_int8": draft_int8,
        "draft_window": draft_window, "tree": " ".join(t.label for t in trees), "suites": suites, "methods": labels,
        "batch_sizes": batch_sizes, "max_new_tokens": max_new_tokens, "limit": limit,
        "temperature": sampling.temperature, "top_p": sampling.top_p, "top_k": sampling.top_k, "seed": sampling.seed,
        "pld_tokens": pld_tokens, "dtype": str(target.model.dtype), "device": str(target.model.device),
        "runtime": target.runtime, "threads": torch.get_num_threads(), "prompts": len(prompts), "torch": torch.__version__,
        "machine": platform.machine(), "date": time.strftime("%Y-%m-%d"),
    }))  # fmt: skip
    cells_path = out / "cells.jsonl"
    done: dict = {}
    if resume and (out / "batch_run.json").is_file():
        stored = json.loads(read_text(out / "batch_run.json")[0])
        differ = [k for k in RUN_KEYS if stored.get(k, RUN_KEY_DEFAULTS.get(k)) != config[k]]
        if differ:
            raise ValueError(f"--resume: {out / 'batch_run.json'} is another run (its {', '.join(differ)} differ); "
                             "rerun with the same options, or pass --overwrite to start over")  # fmt: skip
        done = read_cells(cells_path)
        end_torn_line(cells_path)
    else:
        if overwrite:
            clear_out(out, FILES)
        write_text(out / "batch_run.json", json.dumps(config, indent=1))
    todo = [(b, label) for i, b in enumerate(batch_sizes) for label in labels[i % len(labels):] + labels[: i % len(labels)]
            if (b, label) not in done]  # fmt: skip
    if todo:
        made = engines(target, labels, list(trees), draft, pld_tokens, draft_int8, draft_window)
        for engine in made.values():  # warm-up: first calls pay for allocations and kernel choice
            run_cell(engine, 1, prompts[:1], 8, sampling)
        try:
            for b, label in tqdm(todo, desc="cells", file=sys.stderr):
                done[(b, label)] = run_cell(made[label], b, prompts, max_new_tokens, sampling)
                with cells_path.open("a", encoding="utf-8") as f:
                    f.write(json.dumps(done[(b, label)]) + "\n")
                    f.flush()
                    os.fsync(f.fileno())
        except KeyboardInterrupt:
            raise KeyboardInterrupt(f"bench stopped after {len(done)} of {len(labels) * len(batch_sizes)} cells, "
                                    f"kept in {cells_path}; rerun the same command with --resume to continue") from None
    cells = list(done.values())
    summary = summarize(cells, labels, batch_sizes, sampling.greedy)
    results = {"config": config, "summary": summary, "cells": cells}
    write_text(out / "batch.json", json.dumps(results, indent=1))
    report = markdown(summary, config)
    write_text(out / "batch.md", report)
    plot(summary, out)
    print(report)
    return results
