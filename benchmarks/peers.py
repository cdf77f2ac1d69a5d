"""eagle3's runtimes and precisions side by side in one run, on the same prompts: plain decoding and EAGLE-3
(the shipped draft, auto tree; alone and with prompt-lookup chains, `eagle3 generate`'s default) on the
PyTorch runtime, on eagle3's native kernels in fp32, int8 and W8A8 and on OpenVINO fp32 and int8, with
transformers' `generate` as the outside reference, and llama.cpp (GGUF F32 and Q8_0, converted from the
target's own safetensors by llama.cpp's convert_hf_to_gguf.py) when llama-cpp-python is installed, and
OpenVINO GenAI's LLMPipeline (the target in fp32 and int8 weights, plainly and with the same draft as its EAGLE-3
chain of --genai-draft-tokens, written by `eagle3 convert --to openvino`) when openvino-genai is installed.

    python benchmarks/peers.py [--limit 5] [--max-new-tokens 128] [--lookup 4] [--out runs/peers] [--no-llama-cpp]
    bash scripts/install_peers.sh   # once, for llama.cpp; without it the summary says it was not run

Every engine decodes each prompt in turn (the order rotates with the prompt), greedy, through the chat template,
so machine noise hits them alike. Reports the median tokens/s per engine, its ratio to eagle3's PyTorch plain
decoding, EAGLE-3 over plain decoding per runtime, whether EAGLE-3's outputs equal plain decoding's on the same
runtime (they must for eagle3's; GenAI's are reported as they come), how many of llama.cpp F32's outputs equal eagle3's PyTorch plain decoding's (informational:
different arithmetic), and the resident memory each runtime's target added when loaded (RSS growth, in load
order). llama.cpp gets the same prompt token ids as the other engines and decodes greedily (argmax of its logits)
until max-new-tokens or one of the target's EOS tokens; so does OpenVINO GenAI (its stop_token_ids), timed
around its generate call. Writes rows.json and summary.md under --out.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:  # optional (scripts/install_peers.sh)
    from llama_cpp import Llama

RUNTIMES = ("torch", "native", "native-int8", "native-w8a8", "openvino", "openvino-int8")
LLAMA_CPP_TYPES = {"F32": "f32", "Q8_0": "q8_0"}  # engine label -> convert_hf_to_gguf.py --outtype
INSTALL_PEERS = "bash scripts/install_peers.sh"


def rss_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def llama_cpp_missing() -> str | None:
    """Why llama.cpp cannot run here (a line for the summary), or None when llama_cpp imports."""
    try:
        import llama_cpp  # noqa: F401
    except ImportError:
        return f"not installed ({INSTALL_PEERS})"
    except OSError as err:  # the package is there but its shared library does not load
        return f"does not load ({err}); rebuild it with {INSTALL_PEERS}"
    return None


def to_gguf(folder: Path, outtype: str, home: Path) -> Path:
    """The target's float32 safetensors folder as GGUF of outtype, converted once by llama.cpp's own script and
    reused afterwards. Exits with a one-line message when the script is missing or the conversion fails."""
    out = home / "peers" / "gguf" / f"{folder.name}-{outtype}.gguf"
    if out.is_file():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    print(f"converting {folder} to GGUF {outtype} (once) ...", flush=True)
    from eagle3.formats.gguf_export import export_target_gguf

    try:
        return export_target_gguf(str(folder), out, outtype)
    except (OSError, ValueError) as err:
        sys.exit(f"peers: converting {folder} to GGUF {outtype} failed: {err} (or pass --no-llama-cpp)")


def load_llama_cpp(path: Path, n_ctx: int, threads: int) -> Llama:
    import llama_cpp

    # n_threads_batch too: its default is every core, which would give llama.cpp's prefill more threads than the
    # other engines get.
    return llama_cpp.Llama(model_path=str(path), n_ctx=n_ctx, n_threads=threads, n_threads_batch=threads,
                           n_batch=512, verbose=False)  # fmt: skip


def llama_cpp_decode(llm: Llama, prompt: list[int], max_new_tokens: int, eos: frozenset[int]
                     ) -> tuple[list[int], float]:  # fmt: skip
    """Greedy decoding of prompt's token ids on a llama_cpp.Llama; returns the new tokens (an EOS token included,
    as eagle3's engines report it) and the wall time from the start of prefill to the last token."""
    import llama_cpp
    import numpy as np

    # An empty KV cache for every prompt: Llama.generate would reuse the prefix shared with the previous prompt
    # (the chat template's), which the other engines do not get.
    llm.reset()
    llama_cpp.llama_memory_clear(llama_cpp.llama_get_memory(llm.ctx), True)
    n_vocab = llm.n_vocab()
    tokens: list[int] = []
    start = time.perf_counter()
    llm.eval(prompt)
    while True:
        logits = np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(llm.ctx, -1), shape=(n_vocab,))
        tokens.append(int(logits.argmax()))
        if tokens[-1] in eos or len(tokens) >= max_new_tokens:
            break
        llm.eval(tokens[-1:])
    return tokens, time.perf_counter() - start


def openvino_genai_missing() -> str | None:
    """Why OpenVINO GenAI cannot run here (a line for the summary), or None when openvino_genai imports."""
    try:
        import openvino_genai  # noqa: F401
    except ImportError:
        return "not installed (pip install openvino-genai)"
    return None


def load_genai(folder: Path, threads: int, draft: bool):
    """GenAI's LLMPipeline on folder/target (with folder/draft as its EAGLE-3 draft), fp32 compute and KV cache
    (this CPU's AVX-512 bf16 would otherwise be its default), on `threads` threads."""
    import openvino_genai as genai

    props = {"INFERENCE_PRECISION_HINT": "f32", "KV_CACHE_PRECISION": "f32", "INFERENCE_NUM_THREADS": threads}
    if draft:
        props["draft_model"] = genai.draft_model(str(folder / "draft"), "CPU", **props)
    return genai.LLMPipeline(str(folder / "target"), "CPU", **props)


def genai_decode(pipe, prompt: list[int], max_new_tokens: int, eos: frozenset[int], draft_tokens: int = 0
                 ) -> tuple[list[int], float]:  # fmt: skip
    """Greedy decoding of prompt's token ids by a GenAI pipeline (a chain of draft_tokens per round when it has a
    draft); returns the new tokens and the wall time of the generate call (prefill included)."""
    import numpy as np
    import openvino as ov
    import openvino_genai as genai

    cfg = genai.GenerationConfig()
    cfg.max_new_tokens = max_new_tokens
    cfg.stop_token_ids = set(eos)
    if draft_tokens:
        cfg.num_assistant_tokens = draft_tokens
    tensor = ov.Tensor(np.array([prompt], dtype=np.int64))
    start = time.perf_counter()
    result = pipe.generate(tensor, cfg)
    return [int(t) for t in result.tokens[0]], time.perf_counter() - start


def main() -> None:
    from eagle3 import options
    from eagle3.runtimes.openvino_runtime import own_signal_stack
    from eagle3.methods.pld import DEFAULT_LOOKUP

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--target", default="smollm2-135m")
    parser.add_argument("--limit", type=int, default=5, help="MT-bench first turns")
    parser.add_argument("--max-new-tokens", type=int, default=128)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--runtimes", default=",".join(RUNTIMES))
    parser.add_argument("--lookup", type=options.integer(0, 64), default=DEFAULT_LOOKUP,
                        help="also EAGLE-3 with prompt-lookup chains of up to N tokens (`eagle3 generate`'s default; 0: not)")
    parser.add_argument("--no-transformers", action="store_true")
    parser.add_argument("--no-llama-cpp", action="store_true", help="skip llama.cpp even when it is installed")
    parser.add_argument("--no-openvino-genai", action="store_true", help="skip OpenVINO GenAI even when it is installed")
    parser.add_argument("--genai-draft-tokens", type=options.integer(1, 16), default=3,
                        help="GenAI's EAGLE-3 chain length (its num_assistant_tokens)")
    parser.add_argument("--out", default="runs/peers")
    args = parser.parse_args()
    # (own_signal_stack: GenAI's pipelines leave the thread a signal stack that dies with them; Ctrl-C would crash)
    with tempfile.TemporaryDirectory() as scratch, own_signal_stack():
        compare(args, Path(scratch))


def compare(args: argparse.Namespace, scratch: Path) -> None:
    """Loads every engine, decodes the prompts by turns, writes rows.json and summary.md."""
    from eagle3.decoding.autotree import auto_tree
    from eagle3.methods.drafter import load_drafter
    from eagle3.decoding.engine import Engine, Request
    from eagle3.fetch import shipped_draft
    from eagle3.paths import eagle3_home
    from eagle3.methods.pld import LookupGraft
    from eagle3.evaluation.suites import data_dir, load_suite
    from eagle3.runtimes.target import load_target
    from eagle3.decoding.tree import TreeSpec

    torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    questions = load_suite("mt_bench", data_dir(), args.limit)
    engines: dict[str, object] = {}
    memory: dict[str, float] = {}
    targets = {}
    for runtime in args.runtimes.split(","):
        before = rss_mb()
        target = load_target(args.target, runtime=runtime)
        drafter = load_drafter(shipped_draft(args.target), target)
        tree = TreeSpec.parse("auto")
        engines[f"{runtime} plain"] = Engine(target, method="vanilla")
        engines[f"{runtime} eagle3"] = Engine(target, drafter, tree, auto_tree(target, drafter, tree))
        if args.lookup:  # its own policy: each engine learns its own acceptance and costs
            engines[f"{runtime} eagle3+lookup"] = Engine(target, drafter, tree, auto_tree(target, drafter, tree),
                                                         lookup=LookupGraft(args.lookup))  # fmt: skip
        engines[f"{runtime} plain"].run([Request(target.encode("Hello", chat=True), 8)])  # compile, warm up
        memory[f"{runtime} plain"] = rss_mb() - before
        targets[runtime] = target
    any_target = next(iter(targets.values()))
    prompts = [any_target.encode(q.turns[0], chat=True) for q in questions]
    llama_note = "skipped (--no-llama-cpp)" if args.no_llama_cpp else llama_cpp_missing()
    llamas: dict[str, Llama] = {}
    if llama_note is None:
        import llama_cpp

        n_ctx = max(len(p) for p in prompts) + args.max_new_tokens + 1
        for label, outtype in LLAMA_CPP_TYPES.items():
            model_file = to_gguf(Path(any_target.path), outtype, eagle3_home())
            before = rss_mb()
            llm = load_llama_cpp(model_file, n_ctx, args.threads)
            llama_cpp_decode(llm, any_target.encode("Hello", chat=True), 8, any_target.eos_token_ids)  # warm up
            memory[f"llama.cpp {label} plain"] = rss_mb() - before
            llamas[f"llama.cpp {label} plain"] = llm
        llama_note = (f"llama-cpp-python {llama_cpp.__version__}; GGUF F32 and Q8_0 converted from the same "
                      "safetensors by llama.cpp's convert_hf_to_gguf.py; the same prompt token ids; greedy")
    genai_note = "skipped (--no-openvino-genai)" if args.no_openvino_genai else openvino_genai_missing()
    genais: dict[str, tuple[object, int]] = {}  # engine -> (pipeline, draft tokens per round)
    if genai_note is None:
        import openvino_genai

        from eagle3.formats.openvino_export import export_openvino

        for precision, label in (("fp32", "openvino-genai"), ("int8", "openvino-genai-int8")):
            folder = export_openvino(shipped_draft(args.target), scratch / label, args.target, precision=precision)
            for name, draft_tokens in ((f"{label} plain", 0), (f"{label} eagle3", args.genai_draft_tokens)):
                before = rss_mb()
                pipe = load_genai(folder, args.threads, draft=draft_tokens > 0)
                genai_decode(pipe, any_target.encode("Hello", chat=True), 8, any_target.eos_token_ids, draft_tokens)
                memory[name] = rss_mb() - before
                genais[name] = (pipe, draft_tokens)
        genai_note = (f"openvino-genai {openvino_genai.__version__}; LLMPipeline on IR written by `eagle3 convert --to "
                      "openvino` (the target's matrices fp32, or int8 with `--target-precision int8`; fp32 compute "
                      f"and KV cache, its other settings its defaults), EAGLE-3 as a chain of {args.genai_draft_tokens} "
                      "draft tokens a round (its num_assistant_tokens); the same prompt token ids; greedy")
    hf = None
    if not args.no_transformers:
        from transformers import AutoModelForCausalLM

        before = rss_mb()
        hf = AutoModelForCausalLM.from_pretrained(any_target.path, dtype=torch.float32).eval()
        memory["transformers"] = rss_mb() - before

    names = list(engines) + list(llamas) + list(genais) + (["transformers"] if hf is not None else [])
    rows = []
    for i, prompt in enumerate(prompts):
        order = names[i % len(names):] + names[: i % len(names)]
        for name in order:
            if name == "transformers":
                start = time.perf_counter()
                with torch.inference_mode():
                    ids = hf.generate(torch.tensor([prompt]), max_new_tokens=args.max_new_tokens, do_sample=False)
                wall = time.perf_counter() - start
                tokens = ids[0, len(prompt):].tolist()
                tau = None
            elif name in llamas:
                tokens, wall = llama_cpp_decode(llamas[name], prompt, args.max_new_tokens, any_target.eos_token_ids)
                tau = None
            elif name in genais:
                pipe, draft_tokens = genais[name]
                tokens, wall = genai_decode(pipe, prompt, args.max_new_tokens, any_target.eos_token_ids, draft_tokens)
                tau = None
            else:
                r = engines[name].run([Request(prompt, args.max_new_tokens)])[0]
                tokens, wall, tau = r.token_ids, r.wall_s, getattr(r, "tau", None)
            rows.append({"prompt": i, "engine": name, "tokens": len(tokens), "wall_s": wall, "tok_s": len(tokens) / wall,
                         "tau": tau, "token_ids": tokens})  # fmt: skip
            print(f"prompt {i} {name:22s} {len(tokens) / wall:6.1f} tok/s", flush=True)

    speed = {n: statistics.median(r["tok_s"] for r in rows if r["engine"] == n) for n in names}
    base = speed.get("torch plain") or next(iter(speed.values()))
    lines = [f"# Runtimes side by side ({time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())})", "",
             f"{args.target}, {args.threads} threads, greedy, the first {len(prompts)} MT-bench turns through the chat "
             f"template, {args.max_new_tokens} new tokens; engines take turns per prompt.", "",
             "| engine | median tok/s | vs torch plain | EAGLE-3 / plain | tau | outputs = plain | RSS added (MB) |",
             "|---|---|---|---|---|---|---|"]  # fmt: skip
    by = {(r["engine"], r["prompt"]): r for r in rows}
    for n in names:
        runtime = n.split()[0]
        ratio = same = tau = ""
        if n.endswith(("eagle3", "eagle3+lookup")):
            plain = f"{runtime} plain"
            ratio = f"{statistics.median(by[(n, i)]['tok_s'] / by[(plain, i)]['tok_s'] for i in range(len(prompts))):.2f}x"
            same = f"{sum(by[(n, i)]['token_ids'] == by[(plain, i)]['token_ids'] for i in range(len(prompts)))}/{len(prompts)}"
            taus = [by[(n, i)]["tau"] for i in range(len(prompts)) if by[(n, i)]["tau"]]
            tau = f"{statistics.mean(taus):.2f}" if taus else ""
        mem = f"{memory[n]:.0f}" if n in memory else ""
        lines.append(f"| {n} | {speed[n]:.1f} | {speed[n] / base:.2f}x | {ratio} | {tau} | {same} | {mem} |")
    lines += ["", "EAGLE-3 / plain is the median of per-prompt ratios on the same runtime. RSS added: the process's "
              "resident memory growth while that runtime's target (and draft) loaded and warmed up, in load order.",
              f"llama.cpp: {llama_note}.", f"OpenVINO GenAI: {genai_note}."]  # fmt: skip
    if "torch plain" in names:
        for n in [*llamas, *(g for g in genais if g.endswith("plain"))]:  # informational: other arithmetic, so a late near-tie may flip a token
            same = sum(by[(n, i)]["token_ids"] == by[("torch plain", i)]["token_ids"] for i in range(len(prompts)))
            lines.append(f"{n} outputs = torch plain token for token: {same}/{len(prompts)} (informational).")
    (out / "rows.json").write_text(json.dumps(rows))
    (out / "summary.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    # Freed here, in order, rather than by the interpreter's teardown: one full run of three aborted at exit with
    # a corrupted heap after writing its summary (llama-cpp-python reports crashes at exit, its issue 1735).
    for llm in llamas.values():
        llm.close()
    genais.clear()


if __name__ == "__main__":
    main()
