"""Command-line option types: each parses one kind of value and refuses what is out of range, so that every
command rejects a bad number, device or text where it is parsed (`error: --flag: ...`, exit code 2), before
any model is loaded.

The ranges are generous: they refuse what cannot be meant (zero or negative counts, NaN, infinity, absurdly
large sizes), not what is merely unusual.
"""

from __future__ import annotations

import argparse
import math
import os
from typing import Callable

from eagle3.decoding.sampling import MAX_SEED, MAX_TEMPERATURE, MIN_TEMPERATURE

BIG = 10_000_000  # the largest count of tokens, steps, examples ... any option accepts


def _fail(message: str, text: str) -> argparse.ArgumentTypeError:
    return argparse.ArgumentTypeError(f"{message}, got {text!r}")


def integer(minimum: int, maximum: int = BIG) -> Callable[[str], int]:
    """An integer in [minimum, maximum]."""

    def parse(text: str) -> int:
        try:
            value = int(text.strip())
        except ValueError:
            raise _fail("must be an integer", text) from None
        if not minimum <= value <= maximum:
            raise _fail(f"must be an integer in [{minimum}, {maximum:,}]", text)
        return value

    parse.__name__ = "integer"
    return parse


def real(minimum: float, maximum: float, open_below: bool = False) -> Callable[[str], float]:
    """A finite number in [minimum, maximum] (or (minimum, maximum] with open_below)."""

    def parse(text: str) -> float:
        try:
            value = float(text.strip())
        except ValueError:
            raise _fail("must be a number", text) from None
        below = value <= minimum if open_below else value < minimum
        if not math.isfinite(value) or below or value > maximum:
            bracket = "(" if open_below else "["
            raise _fail(f"must be a finite number in {bracket}{minimum:g}, {maximum:g}]", text)
        return value

    parse.__name__ = "number"
    return parse


count = integer(1)  # something that must happen at least once: steps, tokens, batch sizes
nonnegative = integer(0)
seed = integer(0, MAX_SEED)
top_p = real(0.0, 1.0, open_below=True)
top_k = integer(0)


def temperature(text: str) -> float:
    """0 (greedy) or a finite temperature in [MIN_TEMPERATURE, MAX_TEMPERATURE]."""
    value = real(0.0, MAX_TEMPERATURE)(text)
    if 0 < value < MIN_TEMPERATURE:
        raise _fail(f"must be 0 (greedy) or at least {MIN_TEMPERATURE:g} (smaller ones overflow the softmax)", text)
    return value


def threads(text: str) -> int:
    """A CPU thread count: at least 1, at most 4 per core of this machine."""
    return integer(1, 4 * (os.cpu_count() or 1))(text)


def device(text: str) -> str:
    """A torch device that exists here: cpu, cuda, cuda:N (N < the number of GPUs), mps."""
    import torch

    def refuse(why: str) -> argparse.ArgumentTypeError:
        return argparse.ArgumentTypeError(f"{text!r} {why}")

    try:
        dev = torch.device(text.strip())
    except (RuntimeError, ValueError):
        raise refuse("is not a device (cpu, cuda, cuda:N, mps)") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise refuse("needs a CUDA GPU, and none is available on this machine")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise refuse(f"names GPU {dev.index}, but this machine has {torch.cuda.device_count()}")
    elif dev.type == "mps":
        if not torch.backends.mps.is_available():
            raise refuse("needs Apple's MPS backend, which is not available on this machine")
    elif dev.type != "cpu":
        raise refuse("is not a device eagle3 runs on (cpu, cuda, cuda:N, mps)")
    return str(dev)


def text(value: str) -> str:
    """Text from the command line, which must be valid UTF-8 (Python keeps undecodable argv bytes as lone
    surrogates, which no tokenizer can encode)."""
    bad = next((i for i, ch in enumerate(value) if "\ud800" <= ch <= "\udfff"), None)
    if bad is not None:
        raise argparse.ArgumentTypeError(
            f"is not valid UTF-8 (an undecodable byte at character {bad}); pass UTF-8 text"
        )
    return value


text.__name__ = "text"


def add_runtime_arguments(parser: argparse.ArgumentParser, dtype_help: str = "float32 (default), bfloat16 or float16"
                          ) -> None:  # fmt: skip
    """--dtype, --device, --threads and --runtime, as every command that runs a model takes them."""
    from eagle3.runtimes.target import AUTO_RUNTIME, DTYPES, RUNTIMES

    parser.add_argument("--dtype", choices=tuple(DTYPES), default="float32", help=dtype_help)
    parser.add_argument("--device", type=device, default=None, help="cpu, cuda, cuda:1 ... (default: cuda when present)")
    parser.add_argument("--threads", type=threads, default=None, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--runtime", choices=(AUTO_RUNTIME, *RUNTIMES), default=AUTO_RUNTIME,
                        help="what runs the target: auto (default: native on a CPU in float32 where the kernels build, "
                             "else torch), eagle3's PyTorch model (torch, the reference), the same model on eagle3's "
                             "native CPU kernels with fp32 or int8 weights or int8 weights and activations (w8a8), or "
                             "OpenVINO on the CPU with fp32 or int8 weights (pip install openvino)")  # fmt: skip


def apply_threads(args: argparse.Namespace) -> None:
    """Sets torch's CPU thread count from --threads, when given."""
    if getattr(args, "threads", None):
        import torch

        torch.set_num_threads(args.threads)


def tree(text: str):
    """--tree: auto, TOTAL,DEPTH,TOPK or static:N (tree.TreeSpec.parse)."""
    from eagle3.decoding.tree import TreeSpec

    try:
        return TreeSpec.parse(text)
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err)) from None


tree.__name__ = "tree"
