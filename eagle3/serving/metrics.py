"""/metrics: the scheduler's counters in Prometheus' text exposition format."""

from __future__ import annotations

from eagle3.serving.scheduler import Histogram, Scheduler


def _family(lines: list[str], name: str, kind: str, help_: str, samples: list[tuple[str, float | int]]) -> None:
    """One metric family: HELP, TYPE, then `name{labels} value` (or `name_suffix ...`) per sample."""
    lines += [f"# HELP {name} {help_}", f"# TYPE {name} {kind}"]
    lines += [f"{name}{tail} {value:g}" if isinstance(value, float) else f"{name}{tail} {value}" for tail, value in samples]


def _histogram(h: Histogram) -> list[tuple[str, float | int]]:
    samples: list[tuple[str, float | int]] = [(f'_bucket{{le="{b:g}"}}', n) for b, n in zip(h.buckets, h.counts)]
    return samples + [('_bucket{le="+Inf"}', h.n), ("_sum", float(h.total)), ("_count", h.n)]


def render(scheduler: Scheduler) -> str:
    s, lines = scheduler.stats, []
    _family(lines, "eagle3_requests_total", "counter", "Requests by outcome (refused: queue full or shutting down).",
            [(f'{{outcome="{k}"}}', v) for k, v in s.requests.items()])  # fmt: skip
    _family(lines, "eagle3_prompt_tokens_total", "counter", "Prompt tokens prefilled.", [("", s.prompt_tokens)])
    _family(lines, "eagle3_generation_tokens_total", "counter", "Tokens generated.", [("", s.generation_tokens)])
    _family(lines, "eagle3_queue_depth", "gauge", "Requests waiting for a row.", [("", scheduler.queue_depth)])
    _family(lines, "eagle3_running_requests", "gauge", "Requests holding a row.", [("", scheduler.running)])
    _family(lines, "eagle3_batch_rows", "gauge", "Rows in the last round.", [("", s.batch_rows)])
    _family(lines, "eagle3_rounds_total", "counter", "Engine rounds (one target forward each).", [("", s.rounds)])
    _family(lines, "eagle3_drafted_rows_total", "counter", "Rows' rounds that verified a draft tree.",
            [("", s.drafted_rows)])  # fmt: skip
    _family(lines, "eagle3_accepted_draft_tokens_total", "counter", "Draft tokens the target accepted.",
            [("", s.accepted_draft_tokens)])  # fmt: skip
    _family(lines, "eagle3_tau", "gauge", "Mean acceptance length of drafted rows' rounds since start (0: none yet).",
            [("", float(s.tau))])  # fmt: skip
    _family(lines, "eagle3_time_to_first_token_seconds", "histogram", "From arrival to the first token drawn.",
            _histogram(s.ttft))  # fmt: skip
    _family(lines, "eagle3_time_per_output_token_seconds", "histogram", "Per request, after its first token.",
            _histogram(s.tpot))  # fmt: skip
    return "\n".join(lines) + "\n"
