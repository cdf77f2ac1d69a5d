"""`eagle3 serve`: loads the target and its draft, and serves the OpenAI-compatible API with uvicorn.

Binds to 127.0.0.1 unless told otherwise (another address needs --allow-remote, and warns without an API key).
SIGTERM or Ctrl-C: no new connections, open requests get --grace seconds to finish, the rest are cancelled.
"""

from __future__ import annotations

import argparse
import ipaddress
import os
import signal
import socket
import sys
import threading
from contextlib import contextmanager
from typing import Callable

import uvicorn

from eagle3 import options
from eagle3.fetch import DEFAULT_TARGET, PRESETS

DEFAULT_MAX_LEN = 2048  # positions per row unless --max-len: the KV cache is max-batch x max-len


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def add_serve_parser(sub: argparse._SubParsersAction) -> None:
    from eagle3.methods.drafter import add_drafter_arguments

    p = sub.add_parser("serve", help="serve an OpenAI-compatible API (continuous batching, EAGLE-3)")
    p.add_argument("--target", default=DEFAULT_TARGET, help=f"preset ({', '.join(PRESETS)}), local folder or hub id")
    p.add_argument("--draft", default="default",
                   help="draft folder (as `eagle3 generate --draft`), 'default' (the target's shipped draft, if any) or "
                        "'none' (plain batched decoding)")  # fmt: skip
    p.add_argument("--tree", type=options.tree, default="auto", help="auto (default), TOTAL,DEPTH,TOPK or static:N")
    p.add_argument("--lookup", type=options.integer(0, 64), default=0,
                   help="graft prompt-lookup chains of up to N tokens onto every round's trees (default 0: none)")
    options.add_runtime_arguments(p)
    add_drafter_arguments(p)
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=options.integer(1, 65535), default=8000)
    p.add_argument("--allow-remote", action="store_true", help="allow a --host other machines can reach")
    p.add_argument("--api-key", default=os.environ.get("EAGLE3_API_KEY"),
                   help="clients must send 'Authorization: Bearer KEY' (default: $EAGLE3_API_KEY, else no key)")
    p.add_argument("--served-model-name", default=None, help="the model id clients send (default: the --target value)")
    p.add_argument("--max-batch", type=options.integer(1, 256), default=8, help="requests decoded together (rows)")
    p.add_argument("--max-queue", type=options.integer(0, 100_000), default=64,
                   help="requests waiting for a row; beyond it clients get 429 (default 64)")  # fmt: skip
    p.add_argument("--max-len", type=options.count, default=None,
                   help=f"positions per row, prompt and answer (default: the model's context, at most "
                        f"{DEFAULT_MAX_LEN})")  # fmt: skip
    p.add_argument("--grace", type=options.real(0.0, 3600.0), default=30.0,
                   help="seconds open requests get to finish on SIGTERM (default 30)")
    p.add_argument("--log-level", choices=("debug", "info", "warning", "error"), default="info")


def serve_command(args: argparse.Namespace) -> int:
    from eagle3.methods.drafter import NoDrafter, drafter_options, load_drafter
    from eagle3.decoding.engine import Engine
    from eagle3.fetch import resolve_draft
    from eagle3.methods.pld import LookupGraft
    from eagle3.serving.app import create_app
    from eagle3.serving.scheduler import Scheduler
    from eagle3.runtimes.target import load_target

    if not is_loopback(args.host) and not args.allow_remote:
        raise ValueError(f"--host {args.host} is reachable from other machines; add --allow-remote to serve them")
    if args.api_key is not None and not args.api_key.strip():
        raise ValueError("--api-key is empty")
    sock = _bind(args.host, args.port)  # before loading: a busy port fails at once
    options.apply_threads(args)
    target = load_target(args.target, dtype=args.dtype, device=args.device, runtime=args.runtime)
    draft_path = resolve_draft(args.draft, args.target)
    lookup = LookupGraft(args.lookup) if args.lookup else None
    if draft_path is None:
        engine = Engine(target, NoDrafter(), max_rows=args.max_batch, method="vanilla", lookup=lookup)
    else:
        drafter = load_drafter(draft_path, target, **drafter_options(args))
        engine = Engine(target, drafter, args.tree, max_rows=args.max_batch, method="eagle3", lookup=lookup)
    max_len = min(args.max_len or DEFAULT_MAX_LEN, target.context)
    scheduler = Scheduler(engine, max_len, args.max_queue)
    name = args.served_model_name or target.name
    app = create_app(scheduler, target, name, args.api_key)
    what = "plain decoding" if draft_path is None else f"the draft {draft_path.name}, tree {args.tree.label}"
    what += f", lookup chains of up to {args.lookup} tokens" if args.lookup else ""
    print(f"eagle3 serve: {name} with {what}, runtime {target.runtime}; max batch {args.max_batch}, queue "
          f"{args.max_queue}, {max_len} positions per row; http://{args.host}:{args.port}/v1", file=sys.stderr)
    if not is_loopback(args.host) and args.api_key is None:
        print(f"warning: serving {args.host} without --api-key: anyone who can reach it can use it", file=sys.stderr)
    # uvicorn stops accepting connections at once and cuts the open ones when its own grace period ends; the
    # scheduler's runs out first, so that what is still decoding then ends with a proper error instead.
    config = uvicorn.Config(app, log_level=args.log_level, timeout_graceful_shutdown=args.grace + CUT_AFTER_S)
    with _signals_end_cleanly():
        _Server(config, lambda: scheduler.stop(args.grace)).run(sockets=[sock])
    return 0


CUT_AFTER_S = 5.0  # after the grace period, how long uvicorn waits for the cancelled requests' last words


class _Server(uvicorn.Server):
    """uvicorn's server, which also tells the scheduler when a signal asks it to stop (on a thread of its own:
    the scheduler's stop waits up to the grace period)."""

    def __init__(self, config: uvicorn.Config, drain: Callable[[], None]):
        super().__init__(config)
        self._drain, self._draining = drain, False

    def handle_exit(self, sig: int, frame) -> None:
        if not self._draining:
            self._draining = True
            threading.Thread(target=self._drain, name="eagle3-drain", daemon=True).start()
        super().handle_exit(sig, frame)


@contextmanager
def _signals_end_cleanly():
    """uvicorn handles SIGINT and SIGTERM (a graceful shutdown), then raises the signal again for the handler
    it found: make that one a no-op, so that a server which shut down as asked exits with code 0."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    found = {sig: signal.signal(sig, lambda *_: None) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for sig, handler in found.items():
            signal.signal(sig, handler)


def _bind(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as err:
        sock.close()
        raise OSError(f"cannot listen on {host}:{port}: {err.strerror or err}") from None
    return sock
