"""Issue 18's data-scaling figure: tau on MT-bench of EAGLE-3 and EAGLE-2 drafts trained on a quarter, a half and
all of the same data (same recipe), with the 60,5,10 tree and with the auto tree.

    bash scripts/equal_budget.sh scaling && bash scripts/equal_budget.sh scaling-bench   # the runs it reads
    python benchmarks/data_scaling.py [--runs runs] [--out runs/scaling]

Reads each bench's results.json (runs/scaling/bench-1of{4,2,1}: both trees, methods "eagle3 60,5,10",
"eagle3 auto", "eagle2 60,5,10", "eagle2 auto") and each draft's training
summary (runs/scaling/METHOD-1ofN, and runs/equal/METHOD for all of the data), and writes data_scaling.md (the
table) and data_scaling.png (tau against the share of the data) under --out. A bench not run yet is left out of
the table and the figure, and the summary names it.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from eagle3.files import atomic_path, write_text  # noqa: E402

SHARES = {4: "1/4", 2: "1/2", 1: "all"}  # denominator of the share of the data -> label
TREES = ("60,5,10", "auto")
METHODS = {"eagle3": "EAGLE-3", "eagle2": "EAGLE-2"}  # bench label -> name in the figure
TRAINED = {"eagle3": "eagle3", "eagle2": "eagle"}  # bench label -> training run folder's method


def bench_folder(runs: Path, part: int) -> Path:
    return runs / "scaling" / f"bench-1of{part}"


def training_folder(runs: Path, method: str, part: int) -> Path:
    return runs / "equal" / method if part == 1 else runs / "scaling" / f"{method}-1of{part}"


class BadRun(Exception):
    """A results or summary file that is there but cannot be used."""


def read_json(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as err:
        raise BadRun(f"{path} cannot be read: {err}") from None


def collect(runs: Path) -> tuple[list[dict], list[str]]:
    """One row per (method, tree, share) whose bench exists: tau and speed-up on MT-bench, and the draft's
    training tokens and held-out tau from its training summary; and the bench folders not found."""
    rows, missing = [], []
    for part in SHARES:
        results = read_json(bench_folder(runs, part) / "results.json")
        if results is None:
            missing.append(str(bench_folder(runs, part)))
            continue
        for tree in TREES:
            for label in METHODS:
                cell = results["summary"].get(f"{label} {tree}", {}).get("mt_bench")
                if cell is None:
                    raise BadRun(f"{bench_folder(runs, part)} has no {label} {tree} on mt_bench")
                trained = read_json(training_folder(runs, TRAINED[label], part) / "summary.json") or {}
                rows.append({"method": label, "tree": tree, "share": part, "tau": cell["tau"],
                             "speedup": cell["speedup_median"], "drafted": cell.get("drafted"),
                             "identical": cell["identical"], "n": cell["n"], "steps": trained.get("steps"),
                             "heldout_tau": trained.get("tau", {}).get("tree")})  # fmt: skip
    return rows, missing


def table(rows: list[dict], missing: list[str]) -> str:
    lines = ["| draft | tree | data | training steps | tau (MT-bench) | rounds drafted | speed-up | identical | "
             "held-out tau (training) |", "|---|---|---|---|---|---|---|---|---|"]  # fmt: skip
    for r in rows:
        held = "" if r["heldout_tau"] is None else f"{r['heldout_tau']:.2f}"
        drafted = "" if r["drafted"] is None else f"{r['drafted']:.0%}"
        lines.append(f"| {METHODS[r['method']]} | {r['tree']} | {SHARES[r['share']]} | {r['steps'] or ''} | "
                     f"{r['tau']:.2f} | {drafted} | {r['speedup']:.2f}x | {r['identical']}/{r['n']} | {held} |")  # fmt: skip
    if missing:
        lines += ["", "Not run yet: " + ", ".join(missing)]
    return "\n".join(lines) + "\n"


def figure(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(TREES), figsize=(5 * len(TREES), 3.6), sharey=True)
    for ax, tree in zip(axes, TREES):
        for label, name in METHODS.items():
            points = sorted((1 / r["share"], r["tau"]) for r in rows if r["method"] == label and r["tree"] == tree)
            if points:
                ax.plot(*zip(*points), marker="o", label=name)
        ax.set_title(f"MT-bench, tree {tree}")
        ax.set_xlabel("share of the training data")
        ax.set_xticks([1 / p for p in SHARES], list(SHARES.values()))
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("tau (accepted tokens per round)")
    axes[0].legend()
    fig.tight_layout()
    with atomic_path(path) as temp:
        fig.savefig(temp, dpi=110, format="png")
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=Path, default=Path("runs"), help="the runs folder (default runs)")
    parser.add_argument("--out", type=Path, default=None, help="where the table and figure go (default RUNS/scaling)")
    args = parser.parse_args(argv)
    try:
        rows, missing = collect(args.runs)
    except BadRun as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    if not rows:
        print(f"error: no scaling bench found under {args.runs / 'scaling'} (bash scripts/equal_budget.sh scaling-bench)",
              file=sys.stderr)  # fmt: skip
        return 2
    out = args.out or args.runs / "scaling"
    out.mkdir(parents=True, exist_ok=True)
    text = table(rows, missing)
    write_text(out / "data_scaling.md", text)
    figure(rows, out / "data_scaling.png")
    print(text + f"\nwrote {out / 'data_scaling.md'} and {out / 'data_scaling.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
