"""`eagle3 bench`: eagle3 against plain decoding and the methods users would pick instead, side by side.

Every method decodes the same chat-templated prompts with the same token budget, stop tokens and threads.
After a warm-up, the methods take turns per question in an order that rotates with the question's index in the
run (so a resumed run keeps it), and machine noise hits all alike. MT-bench's second turn follows each method's
own first answer.

Metrics per method and suite: tokens/s; speed-up over `vanilla` from per-question ratios (the method's tokens/s
over vanilla's on the same question) as their median (`speedup_median`, the headline: one disturbed question
cannot move it), their geometric mean (`speedup_geomean`), their mean (`speedup`, as EAGLE's speed.py) and as
the ratio of totals (`speedup_total`); tau (mean accepted draft tokens + 1 per drafted round); acceptance rate
by tree depth; at temperature 0, how many questions' outputs equal vanilla's token for token.

Noise: a question whose ratio lies far from the method's other questions' (`outliers`) is re-run once, all
methods in its usual order, after the main pass. The re-run's rows replace the first ones (marked `rerun`, the
first time kept as `first_wall_s`); a question still far out after it is kept as measured and listed as flagged.

Nothing lost: OUT/run.json holds the run's configuration, written before the first question, and OUT/rows.jsonl
each finished question's rows, appended as it goes. `resume` continues a stopped run after checking that its
configuration is this one; results.json, results.md and the plots are written at the end, atomically. An auto
tree's policy starts afresh in a resumed run: outputs are the same, tree sizes (so tau and times) may differ.
"""

from __future__ import annotations

import json
import math
import os
import platform
import sys
import time
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from statistics import fmean, median
from typing import Callable

import torch
from tqdm import tqdm

from eagle3 import options
from eagle3.methods.draft import int8_supported
from eagle3.methods.drafter import DEFAULT_DRAFT_WINDOW, add_drafter_arguments, drafter_options
from eagle3.files import atomic_path, end_torn_line, read_text, write_text
from eagle3.decoding.generate import generate
from eagle3.methods.pld import PromptLookupDrafter
from eagle3.decoding.sampling import SamplingParams
from eagle3.decoding.speculative import speculative_generate
from eagle3.evaluation.suites import Question, data_dir, parse_suites, read_suite
from eagle3.runtimes.target import Target, encode_messages
from eagle3.decoding.tree import AUTO_TREE, TreeSpec, static_tree

METHODS = ("vanilla", "eagle3", "eagle2", "eagle", "hass", "pld", "sps", "medusa", "hydra", "hf", "hf-pld",
           "hf-assisted")  # fmt: skip
ALSO_AUTO = ("sps", "medusa", "hydra")  # methods with a fixed tree of their own that --also-auto runs on auto too
TREE_METHODS = ("eagle3", "eagle2", "hass")  # the methods that take --tree (one method per tree, auto included)
HEADS_TREE = static_tree(10)  # the tree of eagle, medusa and hydra (--fixed-tree): one shape every round
LOSSLESS = set(METHODS)  # every method here is lossless: greedy outputs must equal vanilla's

PLOTS = ("speedup.png", "tau.png", "acceptance.png")
BENCH_FILES = ("run.json", "rows.jsonl", "results.json", "results.md", *PLOTS)  # all that bench writes in OUT
RUN_FILES = ("run.json", "rows.jsonl", "results.json")  # any of them: OUT holds a bench run
# What makes a run the same run, so that --resume never mixes rows of different ones. The rest of the
# configuration (date, torch version, skipped questions) is recorded, not compared.
RUN_KEYS = ("target", "draft", "draft_int8", "draft_window", "tree", "suites", "methods", "max_new_tokens",
            "limit", "temperature", "top_p", "top_k", "seed", "pld_tokens", "sps_tokens", "assistant", "medusa",
            "hydra", "eagle", "hass", "heads_tree", "lookup", "also_auto", "data", "dtype", "device", "threads",
            "runtime")  # fmt: skip
# Keys runs made before them lack, with the value those runs had.
RUN_KEY_DEFAULTS = {"runtime": "torch", "sps_tokens": 4, "medusa": None, "hydra": None, "eagle": None, "hass": None,
                    "heads_tree": "10,4,3", "lookup": 0, "also_auto": False}  # fmt: skip

OUTLIER_MADS = 5.0  # robust standard deviations (1.4826 MAD) from the median log ratio: see outliers
OUTLIER_MIN_RATIO = 1.5  # never flag a question within this factor of the method's median ratio


@dataclass
class TurnOutput:
    token_ids: list[int]
    text: str
    wall_s: float
    accept_lengths: list[int] = field(default_factory=list)  # speculative methods only, drafted rounds
    plain_rounds: int = 0  # rounds an auto tree ran without a draft


# A method answers a conversation (a list of chat messages ending with a user turn).
Method = Callable[[list[dict]], TurnOutput]


@dataclass(frozen=True)
class MethodDrafts:
    """What the methods beside vanilla draft with: each one's draft, heads or assistant, and the knobs that shape
    its trees. Recorded in run.json under these names (they make a run the run it is)."""

    draft: str | Path | None = None  # eagle3's
    draft_int8: bool | None = None  # None: wherever supported
    draft_window: int | None = DEFAULT_DRAFT_WINDOW
    assistant: str | None = None  # sps, hf-assisted
    pld_tokens: int = 10  # pld, hf-pld
    sps_tokens: int = 4
    medusa: str | Path | None = None
    hydra: str | Path | None = None
    eagle: str | Path | None = None  # eagle, eagle2
    hass: str | Path | None = None
    heads_tree: TreeSpec = HEADS_TREE  # eagle, medusa, hydra
    lookup: int = 0  # TREE_METHODS also run with lookup chains ("+lookup")
    also_auto: bool = False  # ALSO_AUTO also run on the auto tree ("NAME auto")

    def record(self) -> dict:
        paths = ("draft", "medusa", "hydra", "eagle", "hass")
        return {f.name: (str(v) if v is not None and f.name in paths else v.label if isinstance(v, TreeSpec) else v)
                for f in fields(self) for v in [getattr(self, f.name)]}  # fmt: skip


def make_methods(target: Target, names: list[str], max_new_tokens: int, sampling: SamplingParams,
                 trees: list[TreeSpec], drafts: MethodDrafts = MethodDrafts()) -> dict[str, Method]:  # fmt: skip
    """One callable per method, all with the same budget, stop tokens and sampling parameters. With several
    trees, each of TREE_METHODS becomes one method per tree, labelled "NAME TREE" (see method_labels). eagle,
    eagle2 and hass read EAGLE-layout drafts (eagle: the EAGLE draft, for both; hass: a HASS-trained one). With
    drafts.lookup, each of TREE_METHODS also runs with prompt-lookup chains of up to that many tokens grafted
    onto its trees, labelled "LABEL+lookup"; with drafts.also_auto, each of ALSO_AUTO also on the auto tree
    (one policy for the whole run), labelled "NAME auto"."""
    methods: dict[str, Method] = {}

    def on_auto_too(name: str, drafter) -> None:
        if drafts.also_auto:
            from eagle3.decoding.autotree import auto_tree

            policy = auto_tree(target, drafter, AUTO_TREE)
            methods[f"{name} auto"] = ours(lambda ids: speculative_generate(
                target, drafter, ids, max_new_tokens, sampling, tree=AUTO_TREE, method=name, policy=policy))  # fmt: skip

    def ours(run: Callable[[list[int]], object]) -> Method:
        def answer(messages: list[dict]) -> TurnOutput:
            result = run(encode_messages(target, messages))
            return TurnOutput(result.token_ids, result.text, result.wall_s, getattr(result, "accept_lengths", []),
                              getattr(result, "plain_rounds", 0))  # fmt: skip
        return answer

    for name in names:
        if name == "vanilla":
            methods[name] = ours(lambda ids: generate(target, ids, max_new_tokens, sampling))
        elif name in TREE_METHODS:
            from eagle3.decoding.autotree import auto_tree
            from eagle3.methods.drafter import load_drafter

            path = {"eagle3": drafts.draft, "eagle2": drafts.eagle, "hass": drafts.hass}[name]
            if path is None:
                raise ValueError("method eagle3 needs a draft: pass --draft PATH (no draft is shipped for this target)"
                                 if name == "eagle3" else f"method {name} needs --{'eagle' if name == 'eagle2' else name} "
                                 "PATH (a draft in EAGLE's layout for this target)")  # fmt: skip
            drafter = load_drafter(path, target, drafts.draft_int8, drafts.draft_window)
            for tree, label in zip(trees, tree_labels(name, trees)):
                for grafted in (0, drafts.lookup) if drafts.lookup else (0,):
                    # One policy per tree for the whole run, so its acceptance corrections carry over questions.
                    policy = auto_tree(target, drafter, tree) if tree.auto else None
                    methods[label + ("+lookup" if grafted else "")] = ours(
                        lambda ids, d=drafter, t=tree, p=policy, m=name, g=grafted: speculative_generate(
                            target, d, ids, max_new_tokens, sampling, tree=t, method=m, policy=p, lookup=g))  # fmt: skip
        elif name == "eagle":
            from eagle3.methods.eagle1 import load_eagle1_drafter

            if drafts.eagle is None:
                raise ValueError("method eagle needs --eagle PATH (a draft in EAGLE's layout for this target)")
            drafter = load_eagle1_drafter(drafts.eagle, target, drafts.draft_int8, drafts.draft_window)
            methods[name] = ours(lambda ids, d=drafter: speculative_generate(
                target, d, ids, max_new_tokens, sampling, tree=drafts.heads_tree, method="eagle"))  # fmt: skip
        elif name == "pld":
            pld = PromptLookupDrafter(drafts.pld_tokens)
            methods[name] = ours(lambda ids, d=pld: speculative_generate(
                target, d, ids, max_new_tokens, sampling, tree=d.tree, method="pld"))  # fmt: skip
        elif name == "sps":
            if not drafts.assistant:
                raise ValueError("method sps needs --assistant MODEL (a draft language model with the target's tokenizer)")
            from eagle3.fetch import resolve_model
            from eagle3.methods.sps import load_draft_model_drafter

            sps = load_draft_model_drafter(resolve_model(drafts.assistant), target)
            chain = TreeSpec(drafts.sps_tokens + 1, drafts.sps_tokens, 1)
            methods[name] = ours(lambda ids, d=sps, t=chain: speculative_generate(
                target, d, ids, max_new_tokens, sampling, tree=t, method="sps"))  # fmt: skip
            on_auto_too(name, sps)
        elif name in ("medusa", "hydra"):
            path = drafts.medusa if name == "medusa" else drafts.hydra
            if not path:
                raise ValueError(f"method {name} needs --{name} PATH ({name.capitalize()} heads for this target)")
            from eagle3.methods.hydra import load_hydra_drafter
            from eagle3.methods.medusa import load_medusa_drafter

            heads = (load_medusa_drafter if name == "medusa" else load_hydra_drafter)(path, target)
            methods[name] = ours(lambda ids, d=heads, m=name: speculative_generate(
                target, d, ids, max_new_tokens, sampling, tree=drafts.heads_tree, method=m))  # fmt: skip
            on_auto_too(name, heads)
        elif name in ("hf", "hf-pld", "hf-assisted"):
            methods[name] = _hf_method(target, name, max_new_tokens, sampling, drafts.assistant, drafts.pld_tokens)
        else:
            raise ValueError(f"unknown method {name!r}; choose from {', '.join(METHODS)}")
    return methods


def tree_labels(name: str, trees: list[TreeSpec]) -> list[str]:
    return [name] if len(trees) == 1 else [f"{name} {t.label}" for t in trees]


def method_labels(names: list[str], trees: list[TreeSpec], lookup: int = 0, also_auto: bool = False) -> list[str]:
    """Each method's labels: a tree method's per tree, and with lookup each beside its "+lookup" twin; with
    also_auto, each of ALSO_AUTO beside its "NAME auto" twin."""
    labels = []
    for name in names:
        for label in tree_labels(name, trees) if name in TREE_METHODS else [name]:
            labels += [label, label + "+lookup"] if lookup and name in TREE_METHODS else [label]
        if also_auto and name in ALSO_AUTO:
            labels.append(f"{name} auto")
    return labels


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


def question_label(suite: str, question_id: str) -> str:
    return f"{suite}/{question_id}"


def question_ratios(rows: list[dict], method: str) -> dict[tuple[str, str], float]:
    """Per question (suite, question_id): the method's tokens/s over vanilla's on it, where both produced
    tokens in a measured time."""
    base = {(r["suite"], r["question_id"]): r for r in rows if r["method"] == "vanilla"}
    ratios = {}
    for r in rows:
        key = (r["suite"], r["question_id"])
        b = base.get(key)
        measured = b is not None and min(r["new_tokens"], r["wall_s"], b["new_tokens"], b["wall_s"]) > 0
        if r["method"] == method and measured:
            ratios[key] = (r["new_tokens"] / r["wall_s"]) / (b["new_tokens"] / b["wall_s"])
    return ratios


def speedups(ratios: list[float]) -> dict:
    """The per-question ratios' mean (`speedup`), median and geometric mean; None without any."""
    if not ratios:
        return {"speedup": None, "speedup_median": None, "speedup_geomean": None}
    return {"speedup": fmean(ratios), "speedup_median": median(ratios),
            "speedup_geomean": math.exp(fmean(math.log(r) for r in ratios))}  # fmt: skip


def outliers(rows: list[dict], methods: list[str]) -> dict[str, dict[str, float]]:
    """Questions ("suite/question_id", in run order) whose time lies far outside the others', each with its
    ratio to vanilla for the methods that flag it.

    The rule, per method other than vanilla, on the logs of its per-question ratios r: a question is an outlier
    when |log r - median| > max(5 * 1.4826 * MAD, log 1.5), MAD being the median of |log r - median| over the
    method's questions (in all suites).
    - Logs: ratios are multiplicative, so twice as fast and twice as slow lie equally far from the centre.
    - Median and MAD rather than mean and standard deviation: one wild time (a 69 s question among 6 s ones)
      inflates the standard deviation enough to hide itself, and drags the mean; the median and the MAD hardly
      move. 1.4826 MAD estimates the standard deviation of normal noise, so 5 of them flag plain noise about
      once in a million questions, and a hiccup that multiplies a time several-fold stands far beyond.
    - The floor, a factor of 1.5 from the median: when times are tight (MAD near 0, e.g. all ratios within a few
      percent) the scaled MAD alone would flag tiny differences; within 1.5x of a method's typical ratio nothing
      is flagged, while a hiccup that matters (a question taking several times its time) still is.
    - Fewer than 3 questions: none can stand out from "the others".
    A flag costs one re-run and drops nothing: a question that is genuinely different (a repetitive answer where
    prompt lookup shines) measures the same again and stays, listed as flagged.
    """
    found: dict[tuple[str, str], dict[str, float]] = {}
    for method in methods:
        if method == "vanilla":
            continue
        ratios = question_ratios(rows, method)
        if len(ratios) < 3:
            continue
        logs = {key: math.log(r) for key, r in ratios.items()}
        centre = median(logs.values())
        spread = 1.4826 * median(abs(x - centre) for x in logs.values())
        limit = max(OUTLIER_MADS * spread, math.log(OUTLIER_MIN_RATIO))
        for key, x in logs.items():
            if abs(x - centre) > limit:
                found.setdefault(key, {})[method] = ratios[key]
    order = dict.fromkeys((r["suite"], r["question_id"]) for r in rows)
    return {question_label(*key): found[key] for key in order if key in found}


def summarize(rows: list[dict], methods: list[str], greedy: bool) -> dict:
    """summary[method][suite] = speedup (mean of per-question ratios), speedup_median, speedup_geomean,
    speedup_total (ratio of totals), tau, tokens_per_s, identical, n, acceptance_by_depth, drafted (the share of
    rounds that ran a draft; auto trees run plain rounds while drafting does not pay)."""
    summary: dict = {}
    suites = list(dict.fromkeys(r["suite"] for r in rows))
    base = {(r["suite"], r["question_id"]): r for r in rows if r["method"] == "vanilla"}
    for method in methods:
        summary[method] = {}
        ratios = question_ratios(rows, method)
        for suite in suites + ["all"]:
            mine = [r for r in rows if r["method"] == method and (suite == "all" or r["suite"] == suite)]
            tokens, wall = sum(r["new_tokens"] for r in mine), sum(r["wall_s"] for r in mine)
            entry: dict = {"n": len(mine), "tokens_per_s": tokens / wall if wall else 0.0}
            pairs = [(r, base[(r["suite"], r["question_id"])]) for r in mine if (r["suite"], r["question_id"]) in base]
            if pairs:
                entry.update(speedups([v for (s, _), v in ratios.items() if suite in ("all", s)]))
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


def _int8_note(config: dict) -> str:
    """What --draft-int8 made int8: every draft matrix on the native runtimes, the lm_head on PyTorch."""
    if not config.get("draft_int8"):
        return ""
    return " (int8 matrices)" if str(config.get("runtime", "torch")).startswith("native") else " (lm_head int8)"


def _window_note(window: int | None) -> str:
    return f", draft prompt window {window}" if window else ""


def _outlier_lines(reruns: list[str], flagged: dict[str, dict[str, float]]) -> list[str]:
    rule = "ratio to vanilla lay far from the method's other questions' ratios (bench.outliers)"
    if not reruns and not flagged:
        return ["### Outliers", "", f"None: no question's {rule}.", ""]
    described = [f"{q} ({', '.join(f'{m} {r:.2f}x' for m, r in by.items())})" for q, by in flagged.items()]
    return ["### Outliers", "", f"Questions whose {rule} were re-run once, all methods; the re-run's rows replace "
            "the first.", "", f"- re-run: {', '.join(reruns) or 'none'}",
            f"- still outliers (kept as measured, flagged): {', '.join(described) or 'none'}", ""]  # fmt: skip


def markdown(summary: dict, config: dict, reruns: list[str] | None = None, flagged: dict | None = None) -> str:
    methods = list(summary)
    suites = list(next(iter(summary.values())))

    def table(title: str, cell: Callable[[dict], str]) -> list[str]:
        lines = [f"### {title}", "", "| method | " + " | ".join(suites) + " |", "|---" * (len(suites) + 1) + "|"]
        lines += [f"| {m} | " + " | ".join(cell(summary[m][s]) for s in suites) + " |" for m in methods]
        return lines + [""]

    def number(key: str, fmt: str) -> Callable[[dict], str]:
        return lambda entry: "-" if entry.get(key) is None else fmt.format(entry[key])

    def other_speedups(entry: dict) -> str:
        values = [entry.get(k) for k in ("speedup", "speedup_geomean", "speedup_total")]
        return "-" if None in values else " / ".join(f"{v:.2f}" for v in values) + "x"

    malformed = config.get("malformed_rows") or {}
    head = [
        f"# eagle3 bench: {config['target']}", "",
        f"runtime {config.get('runtime', 'torch')}, draft `{config['draft']}`{_int8_note(config)}"
        f"{_window_note(config.get('draft_window', 0))}, tree {config['tree']}, "
        f"temperature {config['temperature']}, "
        f"max_new_tokens {config['max_new_tokens']}, {config['threads']} threads, {config['device']}, "
        f"{config['date']}{' (resumed)' if config.get('resumed') else ''}", "",
    ]  # fmt: skip
    if malformed:
        head += ["Malformed suite rows skipped: " + ", ".join(f"{s} {n}" for s, n in malformed.items()), ""]
    body = table("Speed-up over vanilla (median of per-question ratios)", number("speedup_median", "{:.2f}x"))
    body += table("Speed-up over vanilla: mean / geometric mean of per-question ratios / ratio of totals",
                  other_speedups)  # fmt: skip
    body += table("Tokens per second", number("tokens_per_s", "{:.1f}"))
    body += table("tau (accepted draft tokens + 1, per drafted round)", number("tau", "{:.2f}"))
    if any(summary[m]["all"].get("drafted") not in (None, 1.0) for m in methods):
        body += table("Share of rounds drafted (auto trees skip drafting while it does not pay)",
                      number("drafted", "{:.0%}"))  # fmt: skip
    if config["temperature"] == 0:
        body += table("Outputs identical to vanilla (token for token)",
                      lambda e: "-" if e.get("identical") is None else f"{e['identical']}/{e['n']}")  # fmt: skip
    body += _outlier_lines(reruns or [], flagged or {})
    return "\n".join(head + body)


def _save_figure(fig, path: Path) -> None:
    with atomic_path(path) as temp:
        fig.savefig(temp, dpi=110, format="png")  # the temp name has no .png to infer the format from


def plots(summary: dict, out: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    methods = list(summary)
    suites = [s for s in next(iter(summary.values())) if s != "all"]
    written = []
    for key, title, name in [("speedup_median", "speed-up over vanilla (median of per-question ratios)", "speedup.png"),
                             ("tau", "tau", "tau.png")]:  # fmt: skip
        shown = [m for m in methods if any(summary[m][s].get(key) is not None for s in suites)]
        if not shown:
            continue
        fig, ax = plt.subplots(figsize=(max(6, 1.2 * len(suites) * max(1, len(shown)) / 2), 4))
        width = 0.8 / len(shown)
        for i, m in enumerate(shown):
            values = [summary[m][s].get(key) or 0 for s in suites]
            ax.bar([x + i * width for x in range(len(suites))], values, width, label=m)
        ax.set_xticks([x + 0.4 - width / 2 for x in range(len(suites))], suites, rotation=30, ha="right")
        if key == "speedup_median":
            ax.axhline(1.0, color="gray", lw=0.8)
        ax.set_title(title)
        ax.legend()
        fig.tight_layout()
        _save_figure(fig, out / name)
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
        _save_figure(fig, out / "acceptance.png")
        plt.close(fig)
        written.append(out / "acceptance.png")
    return written


def holds_run(out: Path, run_files: tuple[str, ...] = RUN_FILES) -> bool:
    return any((out / name).exists() for name in run_files)


def check_out(out: Path, resume: bool, overwrite: bool, run_files: tuple[str, ...] = RUN_FILES) -> None:
    """Refuses what would mix or lose runs: both flags, an OUT that is a file, an OUT holding a run (any of
    run_files) without one of the flags."""
    if resume and overwrite:
        raise ValueError("--resume and --overwrite contradict each other: pass one of them")
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {out} is a file; bench writes a folder there")
    if not (resume or overwrite) and holds_run(out, run_files):
        raise ValueError(f"{out} holds a bench run; pass --resume to continue it or --overwrite to start over")


def clear_out(out: Path, files: tuple[str, ...] = BENCH_FILES) -> None:
    """Removes what bench writes in OUT (files), nothing else."""
    for name in files:
        (out / name).unlink(missing_ok=True)


def read_records(path: Path) -> dict[int, dict]:
    """rows.jsonl's records (one per finished question: its index, suite, question_id, rerun and rows) by
    question index. A later record of a question (its re-run) replaces the earlier one; a line that does not
    parse (the torn last line of a killed run) is ignored."""
    records: dict[int, dict] = {}
    if not path.is_file():
        return records
    for line in read_text(path)[0].split("\n"):
        try:
            record = json.loads(line)
            records[int(record["index"])] = record
        except (json.JSONDecodeError, KeyError, TypeError, ValueError):
            continue
    return dict(sorted(records.items()))


def append_record(path: Path, record: dict) -> None:
    """Appends one question's record to rows.jsonl, on disk before the next question starts."""
    with path.open("a", encoding="utf-8") as f:
        f.write(json.dumps(record) + "\n")
        f.flush()
        os.fsync(f.fileno())


def resumed_records(out: Path, config: dict, questions: list[Question]) -> dict[int, dict]:
    """The finished questions of the run in OUT, after checking that it is this run: the same configuration
    (RUN_KEYS) and the same questions at the indices it finished. Nothing there: no records."""
    run_path, rows_path = out / "run.json", out / "rows.jsonl"
    if not run_path.is_file():
        if holds_run(out):
            raise ValueError(f"{out} holds bench results without run.json (an older eagle3 bench, which cannot be "
                             "resumed); pass --overwrite to start over")  # fmt: skip
        print(f"nothing to resume in {out}: starting a new run", file=sys.stderr)
        return {}
    try:
        stored = json.loads(read_text(run_path)[0])
    except json.JSONDecodeError as err:
        raise ValueError(f"{run_path} is not valid JSON ({err}); pass --overwrite to start over") from None
    if not isinstance(stored, dict):
        raise ValueError(f"{run_path} is not a bench configuration; pass --overwrite to start over")
    then = {k: stored.get(k, RUN_KEY_DEFAULTS.get(k)) for k in RUN_KEYS}
    differ = [k for k in RUN_KEYS if then[k] != config[k]]
    if differ:
        shown = ", ".join(f"{k} ({then[k]!r} there, {config[k]!r} now)" for k in differ)
        raise ValueError(f"--resume: {run_path} is another run, its {shown} differ; rerun with the same options, "
                         "or pass --overwrite to start over")  # fmt: skip
    records = read_records(rows_path)
    for index, record in records.items():
        now = question_label(questions[index].suite, questions[index].question_id) if index < len(questions) else "none"
        then = question_label(record.get("suite"), record.get("question_id"))
        if then != now:
            raise ValueError(f"--resume: {rows_path} holds {then} as question {index}, the suites now give {now}: "
                             "the data changed since the run began; pass --overwrite to start over")  # fmt: skip
    return records


def run_question(runners: dict[str, Method], methods: list[str], question: Question, index: int) -> list[dict]:
    """All methods' rows for one question, in an order that rotates with the question's index in the run."""
    shift = index % len(methods)
    rows = []
    for name in methods[shift:] + methods[:shift]:
        outputs = answer_question(runners[name], question)
        rows.append({
            "suite": question.suite, "question_id": question.question_id, "method": name,
            "new_tokens": sum(len(o.token_ids) for o in outputs), "wall_s": sum(o.wall_s for o in outputs),
            "token_ids": [t for o in outputs for t in o.token_ids],
            "accept_lengths": [n for o in outputs for n in o.accept_lengths],
            "plain_rounds": sum(o.plain_rounds for o in outputs),
            "turns": [o.text for o in outputs], "rerun": False,
        })  # fmt: skip
    return rows


def _record(index: int, question: Question, rows: list[dict], rerun: bool = False) -> dict:
    return {"index": index, "suite": question.suite, "question_id": question.question_id, "rerun": rerun, "rows": rows}


def _rerun_rows(first: list[dict], again: list[dict]) -> list[dict]:
    """The re-run's rows, marked, each keeping its method's first time."""
    first_wall = {r["method"]: r.get("first_wall_s", r["wall_s"]) for r in first}
    return [{**r, "rerun": True, "first_wall_s": first_wall[r["method"]]} for r in again]


def _first_pass(rows: list[dict]) -> list[dict]:
    """The rows as the main pass timed them (re-run rows with their first time), so that which questions are
    re-run does not depend on whether re-running was interrupted and resumed."""
    return [{**r, "wall_s": r["first_wall_s"]} if "first_wall_s" in r else r for r in rows]


def _all_rows(records: dict[int, dict]) -> list[dict]:
    return [r for index in sorted(records) for r in records[index]["rows"]]


def _fitting(target: Target, questions: list[Question], max_new_tokens: int) -> tuple[list[Question], list[str]]:
    """The questions that fit the context, and the labels of those that do not (reported on stderr)."""
    fits = [q for q in questions if fits_context(target, q, max_new_tokens)]
    skipped = [question_label(q.suite, q.question_id) for q in questions if q not in fits]
    if skipped:
        print(f"skipping {len(skipped)} question(s) longer than {target.name}'s context of {target.context} tokens "
              f"with {max_new_tokens} new tokens per turn: {', '.join(skipped[:10])}"
              + (" ..." if len(skipped) > 10 else ""), file=sys.stderr)  # fmt: skip
    return fits, skipped


def run_bench(
    target: Target,
    suites: list[str],
    methods: list[str],
    out: Path,
    max_new_tokens: int = 256,
    limit: int | None = None,
    sampling: SamplingParams = SamplingParams(),
    trees: list[TreeSpec] | TreeSpec = TreeSpec(),
    drafts: MethodDrafts = MethodDrafts(),
    data: str | None = None,
    resume: bool = False,
    overwrite: bool = False,
) -> dict:
    """Benchmarks the methods into OUT and returns results.json's content. resume: continue the run in OUT
    (refused if its configuration differs); overwrite: remove what bench wrote in OUT and start over; neither:
    OUT must not hold a run."""
    out = Path(out)
    check_out(out, resume, overwrite)
    names = list(dict.fromkeys(["vanilla", *methods]))  # vanilla: the baseline for speed-ups and identical outputs
    trees = list(dict.fromkeys([trees] if isinstance(trees, TreeSpec) else trees))
    if drafts.draft_int8 is None:
        drafts = replace(drafts, draft_int8=int8_supported(target.model.device, target.model.dtype))
    labels = method_labels(names, trees, drafts.lookup, drafts.also_auto)
    folder = data_dir(data)
    files = [read_suite(name, folder, limit) for name in suites]
    questions, skipped = _fitting(target, [q for f in files for q in f.questions], max_new_tokens)
    if not questions:
        raise ValueError("no questions to run (none fits the context)")
    config = json.loads(json.dumps({
        "target": target.name, **drafts.record(), "tree": " ".join(t.label for t in trees), "suites": suites,
        "methods": labels, "max_new_tokens": max_new_tokens, "limit": limit, "temperature": sampling.temperature,
        "top_p": sampling.top_p, "top_k": sampling.top_k, "seed": sampling.seed, "data": str(folder.resolve()),
        "dtype": str(target.model.dtype),
        "device": str(target.model.device), "threads": torch.get_num_threads(), "runtime": target.runtime,
        "skipped": skipped,
        "malformed_rows": {f.path.stem: f.malformed for f in files if f.malformed},
        "undecodable_bytes": {f.path.stem: f.replaced for f in files if f.replaced},
        "torch": torch.__version__, "machine": platform.machine(), "date": time.strftime("%Y-%m-%d"),
    }))  # fmt: skip
    continuing = resume and (out / "run.json").is_file()
    records = resumed_records(out, config, questions) if resume else {}

    def ready_methods() -> dict[str, Method]:
        runners = make_methods(target, names, max_new_tokens, sampling, trees, drafts)
        warm = [{"role": "user", "content": questions[0].turns[0]}]
        for runner in runners.values():  # warm-up: first calls pay for allocations and kernel choice
            runner(warm)
        return runners

    todo = [i for i in range(len(questions)) if i not in records]
    runners = ready_methods() if todo else None  # before run.json: a method that cannot start leaves no run behind
    rows_path = out / "rows.jsonl"
    if continuing:
        end_torn_line(rows_path)
    else:
        if overwrite:
            clear_out(out)
        write_text(out / "run.json", json.dumps(config, indent=1))
    try:
        bar = tqdm(todo, desc="questions", file=sys.stderr, total=len(questions), initial=len(questions) - len(todo))
        for i in bar:
            records[i] = _record(i, questions[i], run_question(runners, labels, questions[i], i))
            append_record(rows_path, records[i])
        first = outliers(_first_pass(_all_rows(records)), labels)
        again = [i for i, r in sorted(records.items())
                 if question_label(r["suite"], r["question_id"]) in first and not r["rerun"]]  # fmt: skip
        if again and runners is None:
            runners = ready_methods()
        for i in tqdm(again, desc="re-running outliers", file=sys.stderr):
            rows = _rerun_rows(records[i]["rows"], run_question(runners, labels, questions[i], i))
            records[i] = _record(i, questions[i], rows, rerun=True)
            append_record(rows_path, records[i])
    except KeyboardInterrupt:
        phase = " and while re-running outliers" if len(records) == len(questions) else ""
        raise KeyboardInterrupt(f"bench stopped after {len(records)} of {len(questions)} questions{phase}, kept in "
                                f"{rows_path}; rerun the same command with --resume to continue") from None

    rows = _all_rows(records)
    reruns = [question_label(r["suite"], r["question_id"]) for _, r in sorted(records.items()) if r["rerun"]]
    flagged = outliers(rows, labels)
    summary = summarize(rows, labels, sampling.greedy)
    config["resumed"] = continuing
    results = {"config": config, "summary": summary, "reruns": reruns, "flagged": flagged, "rows": rows}
    write_text(out / "results.json", json.dumps(results, indent=1))
    report = markdown(summary, config, reruns, flagged)
    write_text(out / "results.md", report)
    plots(summary, out)
    print(report)
    if sampling.greedy:
        for m in labels:
            bad = summary[m]["all"].get("identical")
            lossless = m.split()[0].removesuffix("+lookup") in LOSSLESS
            if lossless and bad is not None and bad != summary[m]["all"]["n"]:
                print(f"WARNING: {m} differs from vanilla on {summary[m]['all']['n'] - bad} of "
                      f"{summary[m]['all']['n']} questions at temperature 0: a lossless method must not",
                      file=sys.stderr)  # fmt: skip
    return results


def add_bench_parser(sub) -> None:
    p = sub.add_parser("bench", help="benchmark eagle3 against plain decoding and other methods")
    p.add_argument("--target", default="smollm2-135m")
    p.add_argument("--draft", default="default",
                   help="EAGLE-3 draft folder for method eagle3 (default: the shipped one; none: no draft)")
    add_drafter_arguments(p)
    p.add_argument("--suites", default="mt_bench", help="comma-separated: " + ", ".join(
        ["mt_bench", "humaneval", "gsm8k", "alpaca", "cnn_dm", "natural_questions", "spec_bench"]))  # fmt: skip
    p.add_argument("--methods", default="vanilla,eagle3", help="comma-separated: " + ", ".join(METHODS))
    p.add_argument("--max-new-tokens", type=options.count, default=256, help="per turn")
    p.add_argument("--limit", type=options.count, default=None, help="questions per suite (Spec-Bench: per category)")
    p.add_argument("--temperature", type=options.temperature, default=0.0,
                   help=f"0 is greedy (default); else {options.MIN_TEMPERATURE:g} to {options.MAX_TEMPERATURE:g}")
    p.add_argument("--top-p", type=options.top_p, default=1.0)
    p.add_argument("--top-k", type=options.top_k, default=0, help="0 disables top-k")
    p.add_argument("--seed", type=options.seed, default=0)
    p.add_argument("--tree", type=options.tree, nargs="+", default=[AUTO_TREE],
                   help="the tree of eagle3, eagle2 and hass: auto (cost-aware, the default), TOTAL,DEPTH,TOPK or "
                        "static:N; several trees make one method each, side by side")  # fmt: skip
    p.add_argument("--pld-tokens", type=options.integer(1, 64), default=10, help="tokens proposed by pld and hf-pld")
    p.add_argument("--lookup", type=options.integer(0, 64), default=0,
                   help="eagle3, eagle2 and hass also run with prompt-lookup chains of up to N tokens grafted onto their "
                        "trees, plain rounds included, as methods NAME+lookup beside them (default 0: none)")  # fmt: skip
    p.add_argument("--sps-tokens", type=options.integer(1, 64), default=4, help="the chain sps drafts each round")
    p.add_argument("--medusa", default=None, help="Medusa heads (Medusa's layout) for the medusa method")
    p.add_argument("--hydra", default=None, help="Hydra heads for the hydra method")
    p.add_argument("--eagle", default=None, help="a draft in EAGLE's layout for the eagle and eagle2 methods")
    p.add_argument("--hass", default=None, help="a HASS-trained draft (EAGLE's layout) for the hass method")
    p.add_argument("--fixed-tree", "--heads-tree", dest="heads_tree", type=heads_tree_option, default=HEADS_TREE,
                   help=f"the tree of eagle, medusa and hydra, one shape every round: static:N (N draft tokens) or "
                        f"TOTAL,DEPTH,TOPK (default {HEADS_TREE.label})")  # fmt: skip
    p.add_argument("--also-auto", action="store_true",
                   help="sps, medusa and hydra also run on the auto tree (the cost-aware policy), as methods "
                        "'NAME auto' beside their own trees (eagle's is eagle2)")  # fmt: skip
    p.add_argument("--assistant", default=None, help="draft language model for sps and hf-assisted (the target's "
                   "tokenizer)")  # fmt: skip
    p.add_argument("--data-dir", default=None, help="benchmark JSONL folder (default $EAGLE3_DATA or ../shared/data/eval)")
    options.add_runtime_arguments(p)
    p.add_argument("--out", required=True,
                   help="output folder: run.json and rows.jsonl as it goes, then results.json, results.md, *.png")
    p.add_argument("--batch-size", type=batch_sizes_option, default=None, metavar="B[,B...]",
                   help="throughput at these batch sizes instead (e.g. 1,2,4,8): each method decodes the suites' "
                        "first turns B at a time, side by side (methods vanilla, eagle3, pld)")  # fmt: skip
    p.add_argument("--resume", action="store_true",
                   help="continue the stopped run in --out (the same options), skipping its finished questions")
    p.add_argument("--overwrite", action="store_true",
                   help="start over in an --out that holds a run (removes only the files bench writes)")


def heads_tree_option(text: str) -> TreeSpec:
    """--fixed-tree: static:N or TOTAL,DEPTH,TOPK (these methods verify one shape every round)."""
    import argparse

    spec = options.tree(text)
    if spec.auto:
        raise argparse.ArgumentTypeError("takes static:N or TOTAL,DEPTH,TOPK (e.g. static:10); auto is for the tree "
                                         "methods (--tree)")  # fmt: skip
    return spec


def batch_sizes_option(text: str) -> list[int]:
    """--batch-size: comma-separated batch sizes, each in [1, 256]."""
    import argparse

    parse = options.integer(1, 256)
    try:
        sizes = [parse(x) for x in text.split(",") if x.strip()]
    except argparse.ArgumentTypeError as err:
        raise argparse.ArgumentTypeError(f"takes comma-separated batch sizes (e.g. 1,2,4,8): {err}") from None
    if not sizes:
        raise argparse.ArgumentTypeError(f"takes comma-separated batch sizes (e.g. 1,2,4,8), got {text!r}")
    return list(dict.fromkeys(sizes))


def _draft_options(args) -> dict:
    chosen = drafter_options(args)
    return {"draft_int8": chosen["int8"], "draft_window": chosen["window"]}


def bench_command(args) -> int:
    from eagle3.fetch import resolve_draft
    from eagle3.runtimes.target import load_target

    sampling = SamplingParams(args.temperature, args.top_p, args.top_k, args.seed)
    suites = parse_suites(args.suites)
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        raise ValueError(f"unknown method(s) {', '.join(unknown)}; choose from {', '.join(METHODS)}")
    out = Path(args.out)
    if args.batch_size:
        from eagle3.evaluation.batchbench import BATCH_METHODS, RUN_FILES as BATCH_RUN_FILES

        if any(m not in BATCH_METHODS for m in methods):
            raise ValueError(f"--batch-size runs {', '.join(BATCH_METHODS)} (not {args.methods})")
        check_out(out, args.resume, args.overwrite, BATCH_RUN_FILES)
    else:
        check_out(out, args.resume, args.overwrite)  # before anything is loaded
    data_dir(args.data_dir)  # fail on missing data before loading models
    draft_options = _draft_options(args)
    draft = resolve_draft(args.draft, args.target)
    if "eagle3" in methods and draft is None:
        shipped = " (no draft is shipped for this target)" if args.draft == "default" else ""
        raise ValueError(f"method eagle3 needs a draft: pass --draft PATH{shipped}")
    options.apply_threads(args)
    target = load_target(args.target, dtype=args.dtype, device=args.device, runtime=args.runtime)
    if args.batch_size:
        from eagle3.evaluation.batchbench import run_batch_bench

        run_batch_bench(target, suites, methods, out, args.batch_size, args.max_new_tokens, args.limit, sampling,
                        args.tree, draft, args.pld_tokens, **draft_options, data=args.data_dir,
                        resume=args.resume, overwrite=args.overwrite)  # fmt: skip
        return 0
    drafts = MethodDrafts(draft, **draft_options, assistant=args.assistant, pld_tokens=args.pld_tokens,
                          sps_tokens=args.sps_tokens, medusa=args.medusa, hydra=args.hydra, eagle=args.eagle,
                          hass=args.hass, heads_tree=args.heads_tree, lookup=args.lookup,
                          also_auto=args.also_auto)  # fmt: skip
    run_bench(target, suites, methods, out, args.max_new_tokens, args.limit, sampling, args.tree, drafts,
              args.data_dir, resume=args.resume, overwrite=args.overwrite)
    return 0
