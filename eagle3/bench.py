"""`eagle3 bench`: eagle3 against plain decoding and the methods users would pick instead, side by side.

Every method decodes the same chat-templated prompts with the same token budget, stop tokens and threads.
After a warm-up, the methods take turns per question in an order that rotates with the question, so machine
noise hits all alike. MT-bench's second turn follows each method's own first answer.

Metrics per method and suite: tokens/s; speed-up over `vanilla` as the mean of per-question ratios (as
EAGLE's speed.py) and as the ratio of totals; tau (mean accepted draft tokens + 1 per round); acceptance rate
by tree depth; at temperature 0, how many questions' outputs equal vanilla's token for token.
"""

from __future__ import annotations

import json
import platform
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
from tqdm import tqdm

from eagle3.draft import int8_supported
from eagle3.drafter import DEFAULT_PROMPT_WINDOW, add_drafter_arguments, drafter_options
from eagle3.generate import generate
from eagle3.pld import PromptLookupDrafter
from eagle3.sampling import SamplingParams
from eagle3.speculative import speculative_generate
from eagle3.suites import Question, data_dir, load_suite, parse_suites
from eagle3.target import Target
from eagle3.tree import TreeSpec

METHODS = ("vanilla", "eagle3", "pld", "hf", "hf-pld", "hf-assisted")
LOSSLESS = set(METHODS)  # every method here is lossless: greedy outputs must equal vanilla's


@dataclass
class TurnOutput:
    token_ids: list[int]
    text: str
    wall_s: float
    accept_lengths: list[int] = field(default_factory=list)  # speculative methods only, drafted rounds
    plain_rounds: int = 0  # rounds an auto tree ran without a draft


# A method answers a conversation (a list of chat messages ending with a user turn).
Method = Callable[[list[dict]], TurnOutput]


def encode_messages(target: Target, messages: list[dict]) -> list[int]:
    """The chat template when the tokenizer has one; otherwise the turns' text, one per line."""
    if getattr(target.tokenizer, "chat_template", None):
        return target.encode_chat(messages)
    return target.encode("\n".join(m["content"] for m in messages))


def make_methods(
    target: Target,
    names: list[str],
    max_new_tokens: int,
    sampling: SamplingParams,
    trees: list[TreeSpec],
    draft_path: str | Path | None,
    assistant: str | None,
    pld_tokens: int,
    draft_int8: bool | None = None,
    draft_window: int | None = DEFAULT_PROMPT_WINDOW,
) -> dict[str, Method]:
    """One callable per method, all with the same budget, stop tokens and sampling parameters. With several
    trees, eagle3 becomes one method per tree, labelled "eagle3 TREE" (see method_labels)."""
    methods: dict[str, Method] = {}

    def ours(run: Callable[[list[int]], object]) -> Method:
        def answer(messages: list[dict]) -> TurnOutput:
            result = run(encode_messages(target, messages))
            return TurnOutput(result.token_ids, result.text, result.wall_s, getattr(result, "accept_lengths", []),
                              getattr(result, "plain_rounds", 0))  # fmt: skip
        return answer

    for name in names:
        if name == "vanilla":
            methods[name] = ours(lambda ids: generate(target, ids, max_new_tokens, sampling))
        elif name == "eagle3":
            if draft_path is None:
                raise ValueError("method eagle3 needs a draft: pass --draft PATH (no draft is shipped for this target)")
            from eagle3.autotree import auto_tree
            from eagle3.drafter import load_drafter

            drafter = load_drafter(draft_path, target, draft_int8, draft_window)
            for tree, label in zip(trees, eagle3_labels(trees)):
                # One policy per tree for the whole run, so its acceptance corrections carry over questions.
                policy = auto_tree(target, drafter, tree) if tree.auto else None
                methods[label] = ours(lambda ids, d=drafter, t=tree, p=policy: speculative_generate(
                    target, d, ids, max_new_tokens, sampling, tree=t, policy=p))  # fmt: skip
        elif name == "pld":
            pld = PromptLookupDrafter(pld_tokens)
            methods[name] = ours(lambda ids, d=pld: speculative_generate(
                target, d, ids, max_new_tokens, sampling, tree=d.tree, method="pld"))  # fmt: skip
        elif name in ("hf", "hf-pld", "hf-assisted"):
            methods[name] = _hf_method(target, name, max_new_tokens, sampling, assistant, pld_tokens)
        else:
            raise ValueError(f"unknown method {name!r}; choose from {', '.join(METHODS)}")
    return methods


def eagle3_labels(trees: list[TreeSpec]) -> list[str]:
    return ["eagle3"] if len(trees) == 1 else [f"eagle3 {t.label}" for t in trees]


def method_labels(names: list[str], trees: list[TreeSpec]) -> list[str]:
    return [label for name in names for label in (eagle3_labels(trees) if name == "eagle3" else [name])]


def _hf_method(
    target: Target, name: str, max_new_tokens: int, sampling: SamplingParams, assistant: str | None, pld_tokens: int
) -> Method:
    """transformers `generate` on the same weights: plain, with prompt lookup, or with an assistant model."""
    from transformers import AutoModelForCausalLM

    from eagle3.fetch import resolve_model

    dtype = target.model.dtype
    hf = AutoModelForCausalLM.from_pretrained(target.path, dtype=dtype).to(target.model.device).eval()
    eos = sorted(target.eos_token_ids)
    kwargs: dict = {"max_new_tokens": max_new_tokens, "eos_token_id": eos, "pad_token_id": eos[0]}
    if sampling.greedy:
        kwargs["do_sample"] = False
    else:
        kwargs.update(do_sample=True, temperature=sampling.temperature, top_p=sampling.top_p, top_k=sampling.top_k)
    if name == "hf-pld":
        kwargs["prompt_lookup_num_tokens"] = pld_tokens
    if name == "hf-assisted":
        if not assistant:
            raise ValueError("method hf-assisted needs --assistant MODEL (a small model sharing the tokenizer)")
        kwargs["assistant_model"] = AutoModelForCausalLM.from_pretrained(resolve_model(assistant), dtype=dtype).to(
            target.model.device).eval()  # fmt: skip

    def answer(messages: list[dict]) -> TurnOutput:
        ids = encode_messages(target, messages)
        if sampling.seed is not None:
            torch.manual_seed(sampling.seed)
        start = time.perf_counter()
        with torch.inference_mode():
            out = hf.generate(torch.tensor([ids], device=target.model.device), **kwargs)
        wall = time.perf_counter() - start
        new = out[0, len(ids):].tolist()
        # generate pads nothing for a single sequence, but cut at the first stop token like our stopper does.
        cut = next((i + 1 for i, t in enumerate(new) if t in target.eos_token_ids), len(new))
        new = new[:cut]
        return TurnOutput(new, target.tokenizer.decode(new, skip_special_tokens=True), wall)

    return answer


def fits_context(target: Target, question: Question, max_new_tokens: int) -> bool:
    """Whether every turn, with every answer at full budget, fits the context (so all methods get the same
    budget); assistant turns' template tokens are not counted, hence the slack of 16 per turn."""
    user_tokens = len(encode_messages(target, [{"role": "user", "content": t} for t in question.turns]))
    return user_tokens + len(question.turns) * (max_new_tokens + 16) <= target.context


def answer_question(method: Method, question: Question) -> list[TurnOutput]:
    """All turns of a question; later turns see this method's own earlier answers."""
    messages: list[dict] = []
    outputs = []
    for turn in question.turns:
        messages.append({"role": "user", "content": turn})
        out = method(messages)
        outputs.append(out)
        messages.append({"role": "assistant", "content": out.text})
    return outputs


def acceptance_by_depth(accept_lengths: list[int]) -> list[float]:
    """Rate at which a round that reached depth d-1 also accepts a draft token at depth d (d = 1, 2, ...)."""
    accepted = [n - 1 for n in accept_lengths]
    rates = []
    depth = 1
    while True:
        reached = sum(1 for a in accepted if a >= depth - 1)
        if reached == 0 or depth > max(accepted, default=0) + 1:
            return rates
        rates.append(sum(1 for a in accepted if a >= depth) / reached)
        depth += 1


def summarize(rows: list[dict], methods: list[str], greedy: bool) -> dict:
    """summary[method][suite] = speedup, speedup_total, tau, tokens_per_s, identical, n, acceptance_by_depth,
    drafted (the share of rounds that ran a draft; auto trees run plain rounds while drafting does not pay)."""
    summary: dict = {}
    suites = sorted({r["suite"] for r in rows}, key=lambda s: [r["suite"] for r in rows].index(s))
    for method in methods:
        summary[method] = {}
        for suite in suites + ["all"]:
            mine = [r for r in rows if r["method"] == method and (suite == "all" or r["suite"] == suite)]
            base = {(r["suite"], r["question_id"]): r for r in rows if r["method"] == "vanilla"}
            tokens, wall = sum(r["new_tokens"] for r in mine), sum(r["wall_s"] for r in mine)
            entry: dict = {"n": len(mine), "tokens_per_s": tokens / wall if wall else 0.0}
            pairs = [(r, base[(r["suite"], r["question_id"])]) for r in mine if (r["suite"], r["question_id"]) in base]
            if pairs:
                ratios = [(r["new_tokens"] / r["wall_s"]) / (b["new_tokens"] / b["wall_s"]) for r, b in pairs
                          if r["wall_s"] > 0 and b["wall_s"] > 0 and b["new_tokens"] > 0]  # fmt: skip
                entry["speedup"] = sum(ratios) / len(ratios) if ratios else None
                base_tokens, base_wall = sum(b["new_tokens"] for _, b in pairs), sum(b["wall_s"] for _, b in pairs)
                entry["speedup_total"] = entry["tokens_per_s"] / (base_tokens / base_wall) if base_wall else None
                entry["identical"] = sum(r["token_ids"] == b["token_ids"] for r, b in pairs) if greedy else None
            lengths = [n for r in mine for n in r["accept_lengths"]]
            entry["tau"] = sum(lengths) / len(lengths) if lengths else None
            entry["acceptance_by_depth"] = acceptance_by_depth(lengths) if lengths else []
            plain = sum(r.get("plain_rounds", 0) for r in mine)
            entry["drafted"] = len(lengths) / (len(lengths) + plain) if lengths else None
            summary[method][suite] = entry
    return summary


def _window_note(window: int | None) -> str:
    return f", draft prompt window {window}" if window else ""


def markdown(summary: dict, config: dict) -> str:
    methods = list(summary)
    suites = list(next(iter(summary.values())))

    def table(title: str, key: str, fmt: str) -> list[str]:
        lines = [f"### {title}", "", "| method | " + " | ".join(suites) + " |", "|---" * (len(suites) + 1) + "|"]
        for m in methods:
            cells = []
            for s in suites:
                v = summary[m][s].get(key)
                cells.append("-" if v is None else (f"{v}/{summary[m][s]['n']}" if key == "identical" else fmt.format(v)))
            lines.append(f"| {m} | " + " | ".join(cells) + " |")
        return lines + [""]

    head = [
        f"# eagle3 bench: {config['target']}", "",
        f"draft `{config['draft']}`{' (lm_head int8)' if config.get('draft_int8') else ''}"
        f"{_window_note(config.get('draft_window', 0))}, tree {config['tree']}, "
        f"temperature {config['temperature']}, "
        f"max_new_tokens {config['max_new_tokens']}, {config['threads']} threads, {config['device']}, "
        f"{config['date']}", "",
    ]  # fmt: skip
    body = table("Speed-up over vanilla (mean of per-question ratios)", "speedup", "{:.2f}x")
    body += table("Speed-up over vanilla (ratio of totals)", "speedup_total", "{:.2f}x")
    body += table("Tokens per second", "tokens_per_s", "{:.1f}")
    body += table("tau (accepted draft tokens + 1, per drafted round)", "tau", "{:.2f}")
    if any(summary[m]["all"].get("drafted") not in (None, 1.0) for m in methods):
        body += table("Share of rounds drafted (auto trees skip drafting while it does not pay)", "drafted", "{:.0%}")
    if config["temperature"] == 0:
        body += table("Outputs identical to vanilla (token for token)", "identical", "{}")
    return "\n".join(head + body)


def plots(summary: dict, out: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    methods = list(summary)
    suites = [s for s in next(iter(summary.values())) if s != "all"]
    written = []
    for key, title, name in [("speedup", "speed-up over vanilla", "speedup.png"), ("tau", "tau", "tau.png")]:
        shown = [m for m in methods if any(summary[m][s].get(key) is not None for s in suites)]
        if not shown:
            continue
        fig, ax = plt.subplots(figsize=(max(6, 1.2 * len(suites) * max(1, len(shown)) / 2), 4))
        width = 0.8 / len(shown)
        for i, m in enumerate(shown):
            values = [summary[m][s].get(key) or 0 for s in suites]
            ax.bar([x + i * width for x in range(len(suites))], values, width, label=m)
        ax.set_xticks([x + 0.4 - width / 2 for x in range(len(suites))], suites, rotation=30, ha="right")
        if key == "speedup":
            ax.axhline(1.0, color="gray", lw=0.8)
        ax.set_title(title)
        ax.legend()
        fig.tight_layout()
        fig.savefig(out / name, dpi=110)
        plt.close(fig)
        written.append(out / name)
    curves = {m: summary[m]["all"]["acceptance_by_depth"] for m in methods if summary[m]["all"]["acceptance_by_depth"]}
    if curves:
        fig, ax = plt.subplots(figsize=(6, 4))
        for m, rates in curves.items():
            ax.plot(range(1, len(rates) + 1), rates, marker="o", label=m)
        ax.set_xlabel("tree depth")
        ax.set_ylabel("acceptance rate at this depth")
        ax.set_ylim(0, 1)
        ax.legend()
        ax.set_title("acceptance by depth (all suites)")
        fig.tight_layout()
        fig.savefig(out / "acceptance.png", dpi=110)
        plt.close(fig)
        written.append(out / "acceptance.png")
    return written


def run_bench(
    target: Target,
    suites: list[str],
    methods: list[str],
    out: Path,
    max_new_tokens: int = 256,
    limit: int | None = None,
    sampling: SamplingParams = SamplingParams(),
    trees: list[TreeSpec] | TreeSpec = TreeSpec(),
    draft: str | Path | None = None,
    assistant: str | None = None,
    data: str | None = None,
    pld_tokens: int = 10,
    draft_int8: bool | None = None,
    draft_window: int | None = DEFAULT_PROMPT_WINDOW,
) -> dict:
    if "vanilla" not in methods:
        methods = ["vanilla", *methods]  # the baseline for speed-ups and identical-output counts
    folder = data_dir(data)
    questions = [q for name in suites for q in load_suite(name, folder, limit)]
    fits = [q for q in questions if fits_context(target, q, max_new_tokens)]
    skipped = [f"{q.suite}/{q.question_id}" for q in questions if q not in fits]
    if skipped:
        print(f"skipping {len(skipped)} question(s) longer than {target.name}'s context of {target.context} tokens "
              f"with {max_new_tokens} new tokens per turn: {', '.join(skipped[:10])}"
              + (" ..." if len(skipped) > 10 else ""), file=sys.stderr)  # fmt: skip
    questions = fits
    if not questions:
        raise ValueError("no questions to run (none fits the context)")
    trees = [trees] if isinstance(trees, TreeSpec) else list(trees)
    if draft_int8 is None:
        draft_int8 = int8_supported(target.model.device, target.model.dtype)
    runners = make_methods(target, methods, max_new_tokens, sampling, trees, draft, assistant, pld_tokens, draft_int8,
                           draft_window)  # fmt: skip
    methods = method_labels(methods, trees)
    warm = [{"role": "user", "content": questions[0].turns[0]}]
    for runner in runners.values():  # warm-up: first calls pay for allocations and kernel choice
        runner(warm)

    rows = []
    for i, q in enumerate(tqdm(questions, desc="questions", file=sys.stderr)):
        order = methods[i % len(methods):] + methods[: i % len(methods)]
        for name in order:
            outputs = answer_question(runners[name], q)
            rows.append({
                "suite": q.suite, "question_id": q.question_id, "method": name,
                "new_tokens": sum(len(o.token_ids) for o in outputs), "wall_s": sum(o.wall_s for o in outputs),
                "token_ids": [t for o in outputs for t in o.token_ids],
                "accept_lengths": [n for o in outputs for n in o.accept_lengths],
                "plain_rounds": sum(o.plain_rounds for o in outputs),
                "turns": [o.text for o in outputs],
            })  # fmt: skip

    summary = summarize(rows, methods, sampling.greedy)
    config = {
        "target": target.name, "draft": str(draft) if draft else None, "draft_int8": draft_int8,
        "draft_window": draft_window,
        "tree": " ".join(t.label for t in trees),
        "suites": suites, "methods": methods, "max_new_tokens": max_new_tokens, "limit": limit, "skipped": skipped,
        "temperature": sampling.temperature, "top_p": sampling.top_p, "top_k": sampling.top_k,
        "threads": torch.get_num_threads(), "device": str(target.model.device), "dtype": str(target.model.dtype),
        "torch": torch.__version__, "machine": platform.machine(), "date": time.strftime("%Y-%m-%d"),
    }  # fmt: skip
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps({"config": config, "summary": summary, "rows": rows}, indent=1))
    report = markdown(summary, config)
    (out / "results.md").write_text(report)
    plots(summary, out)
    print(report)
    if sampling.greedy:
        for m in methods:
            bad = summary[m]["all"].get("identical")
            if m.split()[0] in LOSSLESS and bad is not None and bad != summary[m]["all"]["n"]:
                print(f"WARNING: {m} differs from vanilla on {summary[m]['all']['n'] - bad} of "
                      f"{summary[m]['all']['n']} questions at temperature 0: a lossless method must not",
                      file=sys.stderr)  # fmt: skip
    return {"config": config, "summary": summary, "rows": rows}


def add_bench_parser(sub) -> None:
    p = sub.add_parser("bench", help="benchmark eagle3 against plain decoding and other methods")
    p.add_argument("--target", default="smollm2-135m")
    p.add_argument("--draft", default="default", help="EAGLE-3 draft folder for method eagle3 (default: the shipped one)")
    add_drafter_arguments(p)
    p.add_argument("--suites", default="mt_bench", help="comma-separated: " + ", ".join(
        ["mt_bench", "humaneval", "gsm8k", "alpaca", "cnn_dm", "natural_questions", "spec_bench"]))  # fmt: skip
    p.add_argument("--methods", default="vanilla,eagle3", help="comma-separated: " + ", ".join(METHODS))
    p.add_argument("--max-new-tokens", type=int, default=256)
    p.add_argument("--limit", type=int, default=None, help="questions per suite (Spec-Bench: per category)")
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--tree", nargs="+", default=["auto"],
                   help="eagle3's tree: auto (cost-aware, the default) or TOTAL,DEPTH,TOPK; several trees make one "
                        "eagle3 method each, side by side")  # fmt: skip
    p.add_argument("--pld-tokens", type=int, default=10, help="tokens proposed by pld and hf-pld")
    p.add_argument("--assistant", default=None, help="assistant model for hf-assisted")
    p.add_argument("--data-dir", default=None, help="benchmark JSONL folder (default $EAGLE3_DATA or ../shared/data/eval)")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--dtype", default="float32")
    p.add_argument("--device", default=None)
    p.add_argument("--out", required=True, help="output folder (results.json, results.md, *.png)")


def _draft_options(args) -> dict:
    options = drafter_options(args)
    return {"draft_int8": options["int8"], "draft_window": options["prompt_window"]}


def bench_command(args) -> int:
    from eagle3.fetch import resolve_draft
    from eagle3.target import load_target

    sampling = SamplingParams(args.temperature, args.top_p, args.top_k, args.seed)
    suites = parse_suites(args.suites)
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        raise ValueError(f"unknown method(s) {', '.join(unknown)}; choose from {', '.join(METHODS)}")
    if args.max_new_tokens < 1:
        raise ValueError(f"max-new-tokens must be >= 1, got {args.max_new_tokens}")
    trees = [TreeSpec.parse(t) for t in args.tree]
    data_dir(args.data_dir)  # fail on missing data before loading models
    if args.threads:
        torch.set_num_threads(args.threads)
    draft = resolve_draft(args.draft, args.target)
    target = load_target(args.target, dtype=args.dtype, device=args.device)
    run_bench(target, suites, methods, Path(args.out), args.max_new_tokens, args.limit, sampling, trees, draft,
              args.assistant, args.data_dir, args.pld_tokens, **_draft_options(args))  # fmt: skip
    return 0
