"""Load on `eagle3 serve` over loopback: EAGLE-3 and plain batched decoding (`--draft none`) side by side.

    python benchmarks/serve_load.py [--concurrency 1,2,4,8,16] [--runtime native] [--lookup 4] [--out runs/serve-load]
    python benchmarks/serve_load.py --soak 600 [--concurrency 8] [--out runs/serve-soak]

Load: starts one server per configuration (each with --max-batch at the highest concurrency), then for each
concurrency C (the configurations taking turns, the first one alternating) runs C clients that send MT-bench
first turns through the chat endpoint, greedy, streamed, one request after another, until each level has
answered its share of requests or its time is up. With --lookup N a third configuration serves EAGLE-3 with
prompt-lookup chains of up to N tokens in its trees (`eagle3 serve --lookup N`). Reports per level: throughput
(completion tokens per second of wall time), time to first token and time per output token (p50 / p99, per
request), errors, and how many answers equal plain decoding's answer to the same prompt (greedy: all must).
Writes load.json, load.md and load.png under --out.

Soak (--soak SECONDS, one configuration, not part of CI): clients with random prompt lengths, budgets and stop
strings, a share of which hang up mid-stream; checks that every request was answered or refused with an
OpenAI error, samples the server's resident memory, and that nothing is left queued or running at the end.
Writes soak.json and soak.md.

Clients run on the same machine as the server (loopback), so they share its cores.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import random
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import httpx

from eagle3.files import write_text
from eagle3.evaluation.suites import data_dir, read_suite

def configurations(lookup: int) -> dict[str, list[str]]:
    """Each configuration's name and its extra `eagle3 serve` arguments; plain decoding is the reference."""
    return {"eagle3": [], **({"eagle3+lookup": ["--lookup", str(lookup)]} if lookup else {}), "plain": ["--draft", "none"]}


@dataclass
class Outcome:
    prompt: int
    ok: bool
    status: int = 200
    error: str = ""
    text: str = ""
    tokens: int = 0
    ttft_s: float = 0.0
    tpot_s: float = 0.0
    hung_up: bool = False


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServerProcess:
    """`eagle3 serve` in a subprocess on a free loopback port; its log goes to OUT/server-NAME.log."""

    def __init__(self, name: str, extra: list[str], args: argparse.Namespace, out: Path):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = open(out / f"server-{name}.log", "w")
        cmd = [sys.executable, "-m", "eagle3", "serve", "--target", args.target, "--runtime", args.runtime,
               "--port", str(self.port), "--max-batch", str(max(args.concurrency)), "--max-queue", "1024",
               "--served-model-name", "model", "--log-level", "warning", *extra]  # fmt: skip
        if args.threads:
            cmd += ["--threads", str(args.threads)]
        self.proc = subprocess.Popen(cmd, stdout=self.log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 600
        while True:
            if self.proc.poll() is not None:
                raise SystemExit(f"error: the {name} server exited (code {self.proc.returncode}); see {self.log.name}")
            if time.monotonic() > deadline:
                self.stop()
                raise SystemExit(f"error: the {name} server did not start in 10 minutes; see {self.log.name}")
            try:
                if httpx.get(f"{self.url}/health", timeout=5).status_code == 200:
                    return
            except httpx.TransportError:
                time.sleep(0.5)

    def rss_mb(self) -> float:
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
        return 0.0

    def metrics(self) -> dict[str, float]:
        values = {}
        for line in httpx.get(f"{self.url}/metrics", timeout=10).text.splitlines():
            if line and not line.startswith("#"):
                name, value = line.rsplit(" ", 1)
                values[name] = float(value)
        return values

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            self.proc.kill()
        self.log.close()


def ask(client: httpx.Client, url: str, prompt_index: int, messages: list[dict], max_tokens: int,
        stop: list[str] | None = None, hang_up_after: int | None = None) -> Outcome:  # fmt: skip
    """One streamed chat request; hang_up_after: close the connection after that many content chunks."""
    body = {"model": "model", "messages": messages, "max_tokens": max_tokens, "temperature": 0, "stream": True,
            "stream_options": {"include_usage": True}}  # fmt: skip
    if stop:
        body["stop"] = stop
    start, first, text, tokens, chunks = time.perf_counter(), None, [], 0, 0
    try:
        with client.stream("POST", f"{url}/v1/chat/completions", json=body) as reply:
            if reply.status_code != 200:
                reply.read()
                error = reply.json().get("error", {}).get("message", "") if reply.content else ""
                return Outcome(prompt_index, False, reply.status_code, error or "no error message")
            for line in reply.iter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                event = json.loads(line[6:])
                if "error" in event:
                    return Outcome(prompt_index, False, 200, event["error"]["message"])
                if event.get("usage"):
                    tokens = event["usage"]["completion_tokens"]
                for choice in event.get("choices", []):
                    piece = choice.get("delta", {}).get("content")
                    if piece:
                        first = first or time.perf_counter()
                        text.append(piece)
                        chunks += 1
                if hang_up_after is not None and chunks >= hang_up_after:
                    return Outcome(prompt_index, True, text="".join(text), hung_up=True)
    except httpx.HTTPError as err:
        return Outcome(prompt_index, False, 0, f"{type(err).__name__}: {err}")
    end = time.perf_counter()
    first = first or end
    tpot = (end - first) / (tokens - 1) if tokens > 1 else 0.0
    return Outcome(prompt_index, True, text="".join(text), tokens=tokens, ttft_s=first - start, tpot_s=tpot)


def percentile(values: list[float], q: float) -> float:
    if not values:
        return 0.0
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q / 100 * (len(ordered) - 1)))]


def run_level(server: ServerProcess, prompts: list[list[dict]], concurrency: int, requests: int, max_tokens: int,
              time_limit: float) -> dict:  # fmt: skip
    """C clients, one request after another each, over the prompts in order, until `requests` are answered or
    time_limit seconds have passed (then no new request starts)."""
    order = itertools.count()
    outcomes: list[Outcome] = []
    lock = threading.Lock()
    start = time.perf_counter()

    def client_loop() -> None:
        with httpx.Client(timeout=600) as client:
            while time.perf_counter() - start < time_limit:
                with lock:
                    i = next(order)
                if i >= requests:
                    return
                outcome = ask(client, server.url, i % len(prompts), prompts[i % len(prompts)], max_tokens)
                with lock:
                    outcomes.append(outcome)

    threads = [threading.Thread(target=client_loop) for _ in range(concurrency)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - start
    ok = [o for o in outcomes if o.ok]
    return {"concurrency": concurrency, "requests": len(outcomes), "errors": len(outcomes) - len(ok), "wall_s": wall,
            "tokens": sum(o.tokens for o in ok), "throughput": sum(o.tokens for o in ok) / wall,
            "ttft_p50": percentile([o.ttft_s for o in ok], 50), "ttft_p99": percentile([o.ttft_s for o in ok], 99),
            "tpot_p50": percentile([o.tpot_s for o in ok], 50), "tpot_p99": percentile([o.tpot_s for o in ok], 99),
            "answers": {o.prompt: o.text for o in ok}}  # fmt: skip


def load(args: argparse.Namespace, out: Path, prompts: list[list[dict]]) -> None:
    servers = {}
    try:
        for name, extra in configurations(args.lookup).items():
            print(f"starting the {name} server ...", file=sys.stderr)
            servers[name] = ServerProcess(name, extra, args, out)
        rows = []
        for level, concurrency in enumerate(args.concurrency):
            names = list(servers) if level % 2 == 0 else list(servers)[::-1]
            for name in names:
                requests = max(args.requests, 2 * concurrency)
                row = run_level(servers[name], prompts, concurrency, requests, args.max_tokens, args.level_seconds)
                row["config"] = name
                rows.append(row)
                print(f"C={concurrency:>3} {name:>13}: {row['throughput']:6.1f} tok/s, ttft p50 {row['ttft_p50']:.2f} s, "
                      f"tpot p50 {row['tpot_p50'] * 1000:.0f} ms, {row['requests']} requests, {row['errors']} errors",
                      file=sys.stderr)  # fmt: skip
        metrics = {name: server.metrics() for name, server in servers.items()}
    finally:
        for server in servers.values():
            server.stop()
    for row in rows:  # greedy answers to the same prompt must equal plain decoding's (plain's: eagle3's)
        reference = "eagle3" if row["config"] == "plain" else "plain"
        other = next(r for r in rows if r["concurrency"] == row["concurrency"] and r["config"] == reference)
        shared = set(row["answers"]) & set(other["answers"])
        row["equal"] = sum(row["answers"][p] == other["answers"][p] for p in shared)
        row["compared"] = len(shared)
    settings = {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}
    table = [{k: v for k, v in r.items() if k != "answers"} for r in rows]
    report = {"args": settings, "rows": table, "server_metrics": metrics, "host": os.uname().nodename}
    write_text(out / "load.json", json.dumps(report, indent=1))
    write_text(out / "load.md", load_table(rows, args))
    plot(rows, list(configurations(args.lookup)), out / "load.png")
    print(load_table(rows, args))


def load_table(rows: list[dict], args: argparse.Namespace) -> str:
    by = {(r["config"], r["concurrency"]): r for r in rows}
    names = list(configurations(args.lookup))
    drafted = [n for n in names if n != "plain"]
    head = "| concurrency | " + " | ".join(str(c) for c in args.concurrency) + " |"
    lines = [head, "|---" * (len(args.concurrency) + 1) + "|"]

    def line(label: str, cell) -> None:
        lines.append(f"| {label} | " + " | ".join(cell(c) for c in args.concurrency) + " |")

    for name in names:
        line(f"{name}: tok/s", lambda c, n=name: f"{by[n, c]['throughput']:.1f}")
    for name in drafted:
        line(f"**{name} / plain**", lambda c, n=name: f"**{by[n, c]['throughput'] / by['plain', c]['throughput']:.2f}x**")
    for name in names:
        line(f"{name}: TTFT p50 / p99 (s)", lambda c, n=name: f"{by[n, c]['ttft_p50']:.2f} / {by[n, c]['ttft_p99']:.2f}")
    for name in names:
        line(f"{name}: TPOT p50 / p99 (ms)",
             lambda c, n=name: f"{by[n, c]['tpot_p50'] * 1000:.0f} / {by[n, c]['tpot_p99'] * 1000:.0f}")  # fmt: skip
    line(f"requests (errors), {' / '.join(names)}",
         lambda c: " / ".join(f"{by[n, c]['requests']} ({by[n, c]['errors']})" for n in names))  # fmt: skip
    for name in drafted:
        line(f"{name}: answers equal to plain's", lambda c, n=name: f"{by[n, c]['equal']}/{by[n, c]['compared']}")
    return "\n".join(lines) + "\n"


def plot(rows: list[dict], names: list[str], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for name in names:
        mine = sorted((r["concurrency"], r["throughput"]) for r in rows if r["config"] == name)
        ax.plot([c for c, _ in mine], [t for _, t in mine], marker="o", label=name)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("concurrent clients")
    ax.set_ylabel("completion tokens / s")
    ax.set_title("eagle3 serve on loopback")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def soak(args: argparse.Namespace, out: Path, prompts: list[list[dict]]) -> None:
    rng = random.Random(args.seed)
    server = ServerProcess("soak", [] if args.draft else ["--draft", "none"], args, out)
    outcomes: list[Outcome] = []
    memory: list[tuple[float, float]] = []
    lock = threading.Lock()
    start = time.perf_counter()
    words = " ".join(m["content"] for p in prompts for m in p).split()

    def client_loop(seed: int) -> None:
        local = random.Random(seed)
        with httpx.Client(timeout=600) as client:
            while time.perf_counter() - start < args.soak:
                length = local.choice([4, 16, 64, 256])
                at = local.randrange(max(1, len(words) - length))
                messages = [{"role": "user", "content": " ".join(words[at : at + length])}]
                stop = [local.choice(["\n\n", ".", " the "])] if local.random() < 0.3 else None
                hang_up = local.randint(1, 8) if local.random() < 0.2 else None
                outcome = ask(client, server.url, -1, messages, local.choice([8, 32, 128]), stop, hang_up)
                with lock:
                    outcomes.append(outcome)

    threads = [threading.Thread(target=client_loop, args=(rng.randrange(2**31),)) for _ in range(args.concurrency[0])]
    for t in threads:
        t.start()
    while any(t.is_alive() for t in threads):
        memory.append((time.perf_counter() - start, server.rss_mb()))
        time.sleep(10)
    for t in threads:
        t.join()
    time.sleep(1)
    final = server.metrics()
    memory.append((time.perf_counter() - start, server.rss_mb()))
    server.stop()
    failed = [o for o in outcomes if not o.ok]
    unexplained = [o for o in failed if not o.error]
    half = [m for t, m in memory if t >= args.soak / 2]
    report = {"seconds": args.soak, "concurrency": args.concurrency[0], "requests": len(outcomes),
              "answered": sum(o.ok and not o.hung_up for o in outcomes), "hung_up": sum(o.hung_up for o in outcomes),
              "refused_or_failed": len(failed), "failures": sorted({f"{o.status}: {o.error}" for o in failed})[:20],
              "unexplained_failures": len(unexplained), "rss_mb": memory,
              "rss_first_mb": memory[0][1], "rss_second_half_max_mb": max(half, default=0.0), "rss_last_mb": memory[-1][1],
              "queue_depth_at_end": final.get("eagle3_queue_depth"), "running_at_end": final.get("eagle3_running_requests"),
              "server_metrics": final}  # fmt: skip
    write_text(out / "soak.json", json.dumps(report, indent=1))
    summary = (f"soak: {report['requests']} requests in {args.soak:.0f} s at concurrency {report['concurrency']}: "
               f"{report['answered']} answered, {report['hung_up']} hung up by the client, "
               f"{report['refused_or_failed']} refused or failed ({report['unexplained_failures']} without an error "
               f"message); server RSS {report['rss_first_mb']:.0f} MB at start, {report['rss_last_mb']:.0f} MB at the "
               f"end (second-half max {report['rss_second_half_max_mb']:.0f} MB); at the end "
               f"{report['queue_depth_at_end']:.0f} queued, {report['running_at_end']:.0f} running")  # fmt: skip
    write_text(out / "soak.md", summary + "\n")
    print(summary)
    if unexplained or final.get("eagle3_queue_depth") or final.get("eagle3_running_requests"):
        raise SystemExit(2)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--target", default="smollm2-135m")
    p.add_argument("--runtime", default="native")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--concurrency", default="1,2,4,8,16", type=lambda s: [int(c) for c in s.split(",")])
    p.add_argument("--requests", type=int, default=8, help="requests per level at least (and 2 x concurrency)")
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--level-seconds", type=float, default=240, help="no new request starts after this, per level")
    p.add_argument("--limit", type=int, default=40, help="MT-bench questions used as prompts")
    p.add_argument("--soak", type=float, default=None, help="SECONDS: a soak run instead of the load table")
    p.add_argument("--draft", action="store_true", help="soak with the draft (default: plain decoding)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--lookup", type=int, default=0, help="also serve EAGLE-3 with lookup chains of up to N tokens")
    p.add_argument("--out", type=Path, default=Path("runs/serve-load"))
    args = p.parse_args()
    if args.out.exists() and any(args.out.glob("*.json")):
        raise SystemExit(f"error: {args.out} holds a run; pick another --out")
    args.out.mkdir(parents=True, exist_ok=True)
    questions = read_suite("mt_bench", data_dir(), args.limit).questions
    prompts = [[{"role": "user", "content": q.turns[0]}] for q in questions]
    if args.soak:
        soak(args, args.out, prompts)
    else:
        load(args, args.out, prompts)


if __name__ == "__main__":
    main()
