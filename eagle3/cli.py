"""The `eagle3` command line: fetch, generate, serve, bench, train, regenerate, calibrate, convert, draft-init."""

from __future__ import annotations

import argparse
import json
import os
import sys

from eagle3 import options
from eagle3.evaluation.bench import add_bench_parser, bench_command
from eagle3.formats.checkpoint import CLI_COMMANDS, add_cli_parsers
from eagle3.decoding.cost import add_calibrate_parser, calibrate_command
from eagle3.methods.drafter import add_drafter_arguments
from eagle3.fetch import DEFAULT_TARGET, PRESETS, ModelNotFound
from eagle3.training.regenerate import add_regenerate_parser, regenerate_command
from eagle3.serving.server import add_serve_parser, serve_command
from eagle3.training.train import add_train_parser, train_command


def _add_generate(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("generate", help="generate text from a prompt")
    p.add_argument("prompt", type=options.text, help="the prompt text")
    p.add_argument("--target", default=DEFAULT_TARGET, help=f"preset ({', '.join(PRESETS)}), local folder or hub id")
    p.add_argument("--max-new-tokens", type=options.count, default=256)
    p.add_argument("--temperature", type=options.temperature, default=0.0,
                   help=f"0 is greedy (default); else {options.MIN_TEMPERATURE:g} to {options.MAX_TEMPERATURE:g}")
    p.add_argument("--top-p", type=options.top_p, default=1.0)
    p.add_argument("--top-k", type=options.top_k, default=0, help="0 disables top-k")
    p.add_argument("--seed", type=options.seed, default=None)
    p.add_argument("--stop", action="append", type=options.text, default=[], metavar="STRING",
                   help="stop string (repeatable)")
    p.add_argument("--chat", action="store_true", help="wrap the prompt in the tokenizer's chat template")
    p.add_argument("--system", type=options.text, default=None, help="system message (with --chat)")
    p.add_argument("--json", action="store_true", help="print one JSON object as the last line instead of streaming")
    options.add_runtime_arguments(p)
    p.add_argument("--draft", default="default",
                   help="EAGLE-3 draft folder (official or speculators layout); or an EAGLE / EAGLE-2 / HASS draft "
                        "(EAGLE's layout), Medusa or Hydra heads, or a draft language model (classic speculative "
                        "sampling, SpS); 'default' (the shipped draft for the target, if any) or 'none' (plain "
                        "decoding)")  # fmt: skip
    p.add_argument("--tree", type=options.tree, default="auto",
                   help="draft tree: auto (sized each round for this machine's measured costs, the default), "
                        "TOTAL,DEPTH,TOPK (e.g. 60,5,10, the EAGLE eval scripts' GPU values) or static:N (the same N "
                        "draft tokens' shape every round, as EAGLE-1 and Medusa verify)")  # fmt: skip
    p.add_argument("--lookup", type=options.integer(0, 64), default=None,
                   help="graft a prompt-lookup chain of up to N tokens (what followed the context's last n-gram where "
                        "it occurred before) onto every round's tree, plain rounds included (default: 4 with a draft "
                        "on the auto tree, whose policy prices each chain; 0, none, otherwise)")  # fmt: skip
    add_drafter_arguments(p)


def _generate(args: argparse.Namespace) -> int:
    from eagle3.methods.drafter import NoDrafter, drafter_options, load_drafter
    from eagle3.fetch import resolve_draft
    from eagle3.decoding.generate import generate
    from eagle3.methods.pld import DEFAULT_LOOKUP
    from eagle3.decoding.sampling import SamplingParams
    from eagle3.decoding.speculative import speculative_generate
    from eagle3.runtimes.target import load_target

    sampling = SamplingParams(args.temperature, args.top_p, args.top_k, args.seed)
    options.apply_threads(args)
    target = load_target(args.target, dtype=args.dtype, device=args.device, runtime=args.runtime)
    draft_path = resolve_draft(args.draft, args.target)
    prompt_ids = target.encode(args.prompt, chat=args.chat, system=args.system)
    stream = None if args.json else (lambda s: (sys.stdout.write(s), sys.stdout.flush()))
    lookup = args.lookup
    if lookup is None:  # (chains only where the auto tree's policy prices them)
        lookup = DEFAULT_LOOKUP if draft_path is not None and args.tree.auto else 0
    if draft_path is None and not lookup:
        result = generate(target, prompt_ids, args.max_new_tokens, sampling, args.stop, on_text=stream)
    else:
        drafter = NoDrafter() if draft_path is None else load_drafter(draft_path, target, **drafter_options(args))
        result = speculative_generate(target, drafter, prompt_ids, args.max_new_tokens, sampling, args.stop,
                                      on_text=stream, tree=args.tree, lookup=lookup)  # fmt: skip
    if args.json:
        print(json.dumps(result.to_json()))
    else:
        sys.stdout.write("\n")
        extra = ""
        if draft_path is not None or lookup:
            plain = f" and {result.plain_rounds} plain" if result.plain_rounds else ""
            extra = f", tau {result.tau:.2f} over {len(result.accept_lengths)} drafted rounds{plain}"
        print(
            f"[{result.method}: {result.new_tokens} tokens in {result.wall_s:.2f}s, {result.tokens_per_s:.1f} tok/s"
            f"{extra}, finish: {result.finish_reason}]",
            file=sys.stderr,
        )
    return 0


def _fetch(args: argparse.Namespace) -> int:
    from eagle3.fetch import resolve_model

    print(resolve_model(args.name))
    return 0


class Parser(argparse.ArgumentParser):
    """argparse with one-line errors: `error: --flag: what is wrong`, exit code 2 (no usage dump)."""

    def error(self, message: str):
        command = self.prog.removeprefix("eagle3").strip()
        hint = f" (see eagle3 {command} --help)" if command else " (see eagle3 --help)"
        self.exit(2, f"error: {message.removeprefix('argument ')}{hint}\n")


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(prog="eagle3", description="Lossless speculative decoding with EAGLE-3.")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("fetch", help="materialize a model and print its local folder (last line)")
    p.add_argument("name", help=f"preset ({', '.join(PRESETS)}), local folder or hub id")
    _add_generate(sub)
    add_serve_parser(sub)
    add_cli_parsers(sub)
    add_bench_parser(sub)
    add_train_parser(sub)
    add_regenerate_parser(sub)
    add_calibrate_parser(sub)
    return parser


COMMANDS = {"fetch": _fetch, "generate": _generate, "serve": serve_command, "bench": bench_command,
            "train": train_command, "regenerate": regenerate_command, "calibrate": calibrate_command, **CLI_COMMANDS}


def one_line(err: BaseException) -> str:
    """An exception's message on one line."""
    return " | ".join(line.strip() for line in str(err).splitlines() if line.strip()) or type(err).__name__


def main(argv: list[str] | None = None) -> int:
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as exit_:  # --help (0) or a bad option (2, already reported)
        return int(exit_.code or 0)
    try:
        return COMMANDS[args.command](args)
    except (ValueError, OSError, ModelNotFound) as err:
        # Known user-facing failures (bad input, missing or corrupt model, file or data): one line, no traceback.
        print(f"error: {one_line(err)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as err:  # the message says how to resume, where there is something to resume
        print(f"interrupted{': ' + one_line(err) if str(err) else ''}", file=sys.stderr)
        return 130
    except Exception as err:  # a bug: still one line, the traceback on request
        if os.environ.get("EAGLE3_DEBUG"):
            raise
        print(f"error: internal error, {type(err).__name__}: {one_line(err)} (a bug in eagle3; rerun with "
              "EAGLE3_DEBUG=1 for the traceback)", file=sys.stderr)  # fmt: skip
        return 1
