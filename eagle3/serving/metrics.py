"""/metrics: the scheduler's counters in Prometheus' text exposition format."""

from __future__ import annotations

from eagle3.serving.scheduler import Histogram, Scheduler


def _metric(lines: list[str], name: str, kind: str, help_: str, samples: list[tuple[str, float]]) -> None:
    lines += [f"# HELP {name} {help_}", f"# TYPE {name} {kind}"]
    lines += [f"{name}{labels} {value:g}" if isinstance(value, float) else f"{name}{labels} {value}"
              for labels, value in samples]  # fmt: skip


def _histogram(lines: list[str], name: str, help_: str, h: Histogram) -> None:
    samples = [(f'_bucket{{le="{bound:g}"}}', count) for bound, count in zip(h.buckets, h.counts)]
    samples += [('_bucket{le="+Inf"}', h.n), ("_sum", float(h.total)), ("_count", h.n)]
    lines += [f"# HELP {name} {help_}", f"# TYPE {name} histogram"]
    lines += [f"{name}{suffix} {value:g}" if isinstance(value, float) else f"{name}{suffix} {value}"
              for suffix, value in samples]  # fmt: skip


def render(scheduler: Scheduler) -> str:
    s = scheduler.stats
    lines: list[str] = []
    _metric(lines, "eagle3_requests_total", "counter", "Requests by outcome (refused: queue full or shutting down).",
            [(f'{{outcome="{k}"}}', v) for k, v in s.requests.items()])  # fmt: skip
    _metric(lines, "eagle3_prompt_tokens_total", "counter", "Prompt tokens prefilled.", [("", s.prompt_tokens)])
    _metric(lines, "eagle3_generation_tokens_total", "counter", "Tokens generated.", [("", s.generation_tokens)])
    _metric(lines, "eagle3_queue_depth", "gauge", "Requests waiting for a row.", [("", scheduler.queue_depth)])
    _metric(lines, "eagle3_running_requests", "gauge", "Requests holding a row.", [("", scheduler.running)])
    _metric(lines, "eagle3_batch_rows", "gauge", "Rows in the last round.", [("", s.batch_rows)])
    _metric(lines, "eagle3_rounds_total", "counter", "Engine rounds (one target forward each).", [("", s.rounds)])
    _metric(lines, "eagle3_drafted_rows_total", "counter", "Rows' rounds that verified a draft tree.",
            [("", s.drafted_rounds)])  # fmt: skip
    _metric(lines, "eagle3_accepted_draft_tokens_total", "counter", "Draft tokens the target accepted.",
            [("", s.accepted_draft_tokens)])  # fmt: skip
    _metric(lines, "eagle3_tau", "gauge", "Mean acceptance length of drafted rows' rounds since start (0: none yet).",
            [("", float(s.tau))])  # fmt: skip
    _histogram(lines, "eagle3_time_to_first_token_seconds", "From arrival to the first token drawn.", s.ttft)
    _histogram(lines, "eagle3_time_per_output_token_seconds", "Per request, after its first token.", s.tpot)
    return "\n".join(lines) + "\n"
