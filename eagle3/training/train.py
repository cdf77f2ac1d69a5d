"""Training drafts: EAGLE-3 heads with training-time test, and (`--method sps`, distill.py) small draft
language models for classic speculative sampling.

The loop: tokenized conversations -> the target's taps and logits (no grad) -> the draft unrolled K steps
(ttt.py) -> decayed loss -> AdamW. Checkpoints (draft, optimizer, schedule, RNG, data position) are written
atomically every `save_every` steps and on SIGINT/SIGTERM; `resume` continues exactly where a run stopped.
The result is saved in the official EAGLE layout (an SpS draft: a transformers Llama checkpoint). What differs
between methods (the draft, its loss, its output) is an objective's; the loop is shared.

Data parallel under torchrun: each process takes its share of every global micro-batch, losses are normalized
by the whole batch's counts and gradients summed, so N processes train exactly as one on the same batch.

Features come online (the target in process) or from an offline cache (features.py).
"""

from __future__ import annotations

import json
import math
import os
import shutil
import signal
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from tqdm import tqdm

from eagle3 import options
from eagle3.formats.checkpoint import check_fits
from eagle3.training.data import Example, examples_fingerprint
from eagle3.methods.draft import DraftConfig, Eagle3Draft, new_draft
from eagle3.training.features import FeatureCache
from eagle3.files import atomic_path, write_text
from eagle3.runtimes.target import Target
from eagle3.training.ttt import teacher_from_logits, ttt_forward, ttt_loss, ttt_masks
from eagle3.methods.vocab import build_vocab_map, count_tokens


@dataclass
class TrainConfig:
    steps: int = 1000  # optimizer steps
    batch_size: int = 4  # sequences per micro-batch
    grad_accum: int = 1
    lr: float = 5e-5
    warmup: int = 50
    ttt_steps: int = 7  # K, unrolled draft steps
    decay: float = 0.8  # loss weight decay per step
    clip: float = 0.5
    weight_decay: float = 0.0
    draft_vocab_size: int = 32000
    max_length: int = 2048
    seed: int = 0
    save_every: int = 100
    dtype: str = "float32"  # or bfloat16 (autocast)
    group_by_length: bool = True  # batches of similar lengths (less padding), in shuffled order
    tap_layers: tuple[int, ...] | None = None  # target layers a fresh draft reads (None: the target's defaults)
    method: str = "eagle3"  # or eagle, hass (eagle1.py), sps (distill.py), medusa (medusa.py), hydra (hydra.py)
    lm_layers: int = 4  # sps: the draft model's layers ...
    lm_hidden: int = 256  # ... and width
    heads: int = 4  # medusa, hydra: heads ...
    head_layers: int = 1  # ... and residual blocks per head


# What may differ when a run is resumed: a run can be extended (the schedule then follows the new step count)
# and checkpointed more or less often; anything else would not continue the same run.
RESUMABLE_CHANGES = ("steps", "save_every")
METHODS = ("eagle3", "eagle", "hass", "sps", "medusa", "hydra")
RUN_FILES = ("train_state.pt", "train_log.jsonl", "summary.json", "draft")  # what a run writes in its folder


RECIPES = {
    # The EAGLE-3 paper's settings.
    "paper": TrainConfig(lr=5e-5, ttt_steps=7, draft_vocab_size=32000, max_length=2048),
    # For a ~100M target on a few CPU cores in a couple of hours (600 steps of 4 x 512 tokens): fewer unrolled
    # steps, a small draft vocabulary and a higher learning rate suit that budget. What it cost and gave for
    # the shipped SmolLM2 draft: eagle3/drafts/smollm2-135m/README.md.
    "cpu": TrainConfig(steps=600, batch_size=4, lr=5e-4, warmup=30, ttt_steps=4, draft_vocab_size=8192,
                       max_length=512, save_every=50),  # fmt: skip
}


@dataclass
class TrainState:
    step: int = 0  # optimizer steps done
    epoch: int = 0
    batch_index: int = 0  # micro-batches consumed in this epoch
    log: list[dict] = field(default_factory=list)


def collate(examples: list[Example], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded [B, L] input ids and loss mask (0 on padding; causal attention ignores what follows)."""
    length = max(len(e.input_ids) for e in examples)
    ids = torch.full((len(examples), length), pad_id, dtype=torch.long)
    mask = torch.zeros((len(examples), length), dtype=torch.long)
    for i, e in enumerate(examples):
        ids[i, : len(e.input_ids)] = e.input_ids
        mask[i, : len(e.loss_mask)] = e.loss_mask
    return ids, mask


def epoch_order(n: int, seed: int, epoch: int, lengths: list[int] | None = None, batch_size: int = 1) -> list[int]:
    """The shuffled example order of an epoch, a function of (seed, epoch) only, so resuming can replay it.

    With lengths, each run of batch_size examples has similar lengths (padding is wasted compute): windows of
    64 batches of the shuffled order are sorted by length and cut into batches, and the full batches are
    shuffled again; the one partial batch, if any, goes last so every other batch stays whole.
    """
    generator = torch.Generator().manual_seed(seed * 1000003 + epoch)
    order = torch.randperm(n, generator=generator).tolist()
    if lengths is None or batch_size <= 1:
        return order
    window = 64 * batch_size
    batches = []
    for first in range(0, n, window):
        chunk = sorted(order[first : first + window], key=lambda i: lengths[i], reverse=True)
        batches += [chunk[j : j + batch_size] for j in range(0, len(chunk), batch_size)]
    partial = [b for b in batches if len(b) < batch_size]
    full = [b for b in batches if len(b) == batch_size]
    full = [full[i] for i in torch.randperm(len(full), generator=generator).tolist()]
    return [i for batch in full + partial for i in batch]


def distributed_rank_and_world() -> tuple[int, int]:
    """(rank, world size); under torchrun the process group is started here (gloo on CPU, nccl on CUDA)."""
    import torch.distributed as dist

    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not dist.is_initialized():
        # Imported first: imported after init (transformers' tokenizers import it), its functions take the
        # world group as a default argument and keep it alive, so destroy_process_group cannot join gloo's
        # threads and a rank can abort at exit while they release a finished collective.
        import torch.distributed.nn  # noqa: F401
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    if dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def all_reduce_sum(x: torch.Tensor) -> torch.Tensor:
    """Sums x over the data-parallel ranks in place (a no-op in one process)."""
    import torch.distributed as dist

    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(x)
    return x


def barrier() -> None:
    """Waits for every data-parallel rank (a no-op in one process)."""
    import torch.distributed as dist

    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier()


def end_distributed() -> None:
    """Waits for every rank, then closes the process group and joins gloo's threads: a rank that exits while they
    still release a collective's tensors aborts ("terminate called without an active exception")."""
    import torch.distributed as dist

    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def lr_at(step: int, cfg: TrainConfig) -> float:
    """Linear warm-up, then cosine decay to 10% of the peak."""
    if step < cfg.warmup:
        return cfg.lr * (step + 1) / cfg.warmup
    progress = (step - cfg.warmup) / max(1, cfg.steps - cfg.warmup)
    return cfg.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, progress))))


@torch.no_grad()
def target_features(target: Target, ids: torch.Tensor, t2d: torch.Tensor, taps: tuple[int, ...]):
    """The frozen target's taps [B, L, 3H] of the draft's layers and its teacher distribution over the draft
    vocabulary."""
    model = target.model
    model.empty_cache(ids.shape[1], batch_size=ids.shape[0])  # reused across steps
    out = model(ids.to(model.device), taps=taps)
    return out.taps, teacher_from_logits(out.logits, t2d.to(model.device))


@torch.no_grad()
def cached_features(target: Target, items: list, length: int, t2d: torch.Tensor):
    """target_features from the offline cache: taps as stored, logits recomputed by the target's head."""
    model = target.model
    taps = torch.zeros(len(items), length, items[0].taps.shape[-1], dtype=model.dtype)
    hidden = torch.zeros(len(items), length, items[0].hidden.shape[-1], dtype=model.dtype)
    for i, item in enumerate(items):
        taps[i, : len(item.taps)] = item.taps
        hidden[i, : len(item.hidden)] = item.hidden
    logits = model.head(hidden.to(model.device))
    return taps.to(model.device), teacher_from_logits(logits, t2d.to(model.device))


def make_draft(target: Target, examples: list[Example], cfg: TrainConfig) -> Eagle3Draft:
    """A fresh draft whose vocabulary is the most frequent trained-on target tokens of the data."""
    vocab = target.model.config.vocab_size
    counts = sum(count_tokens(e.input_ids, e.loss_mask, vocab) for e in examples)
    taps = {"tap_layers": tuple(cfg.tap_layers)} if cfg.tap_layers else {}
    draft = new_draft(target.model.config, min(cfg.draft_vocab_size, vocab), seed=cfg.seed, **taps)
    check_fits(draft.config, target.model.config)
    d2t, t2d = build_vocab_map(counts, draft.config.draft_vocab_size)
    draft.d2t.copy_(d2t)
    draft.t2d.copy_(t2d)
    return draft.to(target.model.device).attach(target.model.embed.weight)


class Eagle3Objective:
    """An EAGLE-3 head and its training-time-test loss, for train: a fresh draft, an --init one or a resumed
    run's; features online (the target in process) or from an offline cache."""

    method = "eagle3"

    def __init__(self, target: Target, examples: list[Example], cfg: TrainConfig, features: FeatureCache | None,
                 saved: dict | None = None, init: str | Path | None = None):  # fmt: skip
        device = target.model.device
        if saved is not None:
            draft = Eagle3Draft(DraftConfig.from_dict(saved["draft_config"]))
            draft.load_state_dict(saved["draft"])
            draft = draft.to(device).attach(target.model.embed.weight)
        elif init is not None:
            from eagle3.formats.checkpoint import load_draft

            draft = load_draft(init, target.model.config, device=device, dtype=torch.float32)
            draft = draft.attach(target.model.embed.weight)
        else:
            draft = make_draft(target, examples, cfg)
        self.taps = tuple(draft.config.tap_layers)
        if features is not None and tuple(features.tap_layers) != self.taps:
            raise ValueError(f"the feature cache in {features.folder} holds the target's layers {list(features.tap_layers)}, "
                             f"the draft reads {list(self.taps)}; use a cache made for this draft")  # fmt: skip
        self.model, self.target, self.cfg = draft, target, cfg

    def config_dict(self) -> dict:
        return asdict(self.model.config)

    def loss(self, ids: torch.Tensor, loss_mask: torch.Tensor, items: list | None, reduce, autocast):
        """(loss to backpropagate, per-step losses detached, hits, counted positions per step) for a
        micro-batch, normalized by the whole batch's counts (`reduce` sums over the data-parallel ranks)."""
        target, draft, device = self.target, self.model, self.target.model.device
        if items is None:
            features_in, teacher = target_features(target, ids, draft.t2d, self.taps)
        else:
            features_in, teacher = cached_features(target, items, ids.shape[1], draft.t2d)
        loss_mask = loss_mask.to(device)
        norms = reduce(torch.stack([m.sum() for m in ttt_masks(teacher, loss_mask, self.cfg.ttt_steps)]).float())
        with autocast:
            logits = ttt_forward(draft, ids.to(device), features_in, self.cfg.ttt_steps)
            result = ttt_loss(logits, teacher, loss_mask, self.cfg.decay, normalizers=norms)
        return result.total, result.per_step, result.hits, norms

    def save(self, folder: Path, target: Target) -> None:
        from eagle3.formats.checkpoint import save_draft

        save_draft(self.model, folder, verifier=str(target.name), overwrite=True)


def save_state(path: Path, objective, optimizer, state: TrainState, cfg: TrainConfig, data: str) -> None:
    """Everything resume needs, written atomically; `data` is the training data's fingerprint."""
    payload = {
        "draft": objective.model.state_dict(), "optimizer": optimizer.state_dict(), "state": asdict(state),
        "config": asdict(cfg), "draft_config": objective.config_dict(), "rng": torch.get_rng_state(), "data": data,
    }  # fmt: skip
    with atomic_path(path) as temp:
        torch.save(payload, temp)


def load_state(path: Path) -> dict:
    """A run's train_state.pt (weights only), or a one-line error saying why it cannot be resumed from."""
    try:
        saved = torch.load(path, map_location="cpu", weights_only=True)
        missing = [k for k in ("draft", "optimizer", "state", "config", "draft_config", "rng") if k not in saved]
    except Exception as err:  # torch.load fails in many ways on a truncated or foreign file
        raise ValueError(f"{path} is unreadable ({type(err).__name__}): the run cannot be resumed from it; "
                         "start over with --overwrite, or restore the file") from None  # fmt: skip
    if missing:
        raise ValueError(f"{path} lacks {', '.join(missing)}: not a training state this version can resume")
    return saved


def config_from_saved(saved: dict) -> TrainConfig:
    """The TrainConfig a run was started with, from its loaded train_state.pt."""
    fields = {k: v for k, v in saved["config"].items() if k in TrainConfig.__dataclass_fields__}
    if fields.get("tap_layers") is not None:
        fields["tap_layers"] = tuple(fields["tap_layers"])
    return TrainConfig(**fields)


def prepare_run_folder(out_dir: Path, resume: bool, overwrite: bool) -> None:
    """Checks the run folder against --resume / --overwrite: a folder holding a run is continued (resume) or
    started over (overwrite: only the run's own files are removed), never silently written over."""
    if resume and overwrite:
        raise ValueError("--resume and --overwrite exclude each other")
    if out_dir.exists() and not out_dir.is_dir():
        raise ValueError(f"{out_dir} is a file, not a run folder")
    present = [name for name in RUN_FILES if (out_dir / name).exists()]
    if resume:
        if not (out_dir / "train_state.pt").is_file():
            raise ValueError(f"nothing to resume in {out_dir}: it holds no train_state.pt")
    elif present and not overwrite:
        raise ValueError(f"{out_dir} holds a training run ({', '.join(present)}); pass --resume to continue it or "
                         "--overwrite to start over")  # fmt: skip
    elif present:
        for name in present:
            path = out_dir / name
            if path.is_dir() and not path.is_symlink():
                shutil.rmtree(path)
            else:
                path.unlink()
    out_dir.mkdir(parents=True, exist_ok=True)


def check_resumable(saved: dict, cfg: TrainConfig, data: str, path: Path) -> None:
    """A resumed run must continue with the same settings (but those in RESUMABLE_CHANGES) and data."""
    before, now = asdict(config_from_saved(saved)), asdict(cfg)
    changed = [k for k in now if k not in RESUMABLE_CHANGES and before.get(k) != now[k]]
    if changed:
        pairs = ", ".join(f"{k} {before.get(k)!r} -> {now[k]!r}" for k in changed)
        raise ValueError(f"the run in {path.parent} was started with other settings ({pairs}); resume it with its "
                         "own, or start another run")  # fmt: skip
    if saved.get("data") is not None and saved["data"] != data:
        raise ValueError(f"the run in {path.parent} was trained on other data (a different set of examples or "
                         "order); resume it on the same --data, --limit and settings")  # fmt: skip


def truncate_log(path: Path, step: int) -> None:
    """Drops log rows after the checkpoint being resumed from (steps done after it are done again)."""
    if not path.is_file():
        return
    kept = []
    for line in path.read_text(errors="replace").splitlines():
        try:
            if json.loads(line)["step"] <= step:
                kept.append(line)
        except (ValueError, KeyError, TypeError):
            continue  # a torn last line
    write_text(path, "".join(row + "\n" for row in kept))


def train(
    target: Target,
    examples: list[Example],
    out_dir: str | Path,
    cfg: TrainConfig = TrainConfig(),
    resume: bool = False,
    progress: bool = True,
    features: FeatureCache | None = None,
    init: str | Path | None = None,
    overwrite: bool = False,
) -> tuple[torch.nn.Module, TrainState]:
    """Trains a draft (cfg.method) on tokenized examples; returns it (also saved under out_dir/draft) and the
    run's state.

    A folder that holds a run is continued with `resume` (the same settings but RESUMABLE_CHANGES, the same
    data) or started over with `overwrite`; otherwise it is refused.

    With `features` (a cache of these same examples, see features.py) the target's forward pass is skipped.
    With `init` (a draft checkpoint for this target) training starts from that draft, its vocabulary included,
    instead of a fresh one: fine-tuning a draft on new data, e.g. the target's regenerated answers.
    """
    out_dir = Path(out_dir)
    state_path = out_dir / "train_state.pt"
    rank, world = distributed_rank_and_world()
    if rank == 0:  # (the others follow rank 0's folder)
        prepare_run_folder(out_dir, resume, overwrite)
    if features is not None and len(features) != len(examples):
        raise ValueError(f"the feature cache holds {len(features)} examples, the data {len(examples)}")
    usable = [i for i, e in enumerate(examples) if int(e.loss_mask[2:].sum()) > 0]  # something to predict
    if not usable:
        raise ValueError("no training example has trained-on tokens")
    if cfg.method not in METHODS:
        raise ValueError(f"unknown training method {cfg.method!r}; choose from {', '.join(METHODS)}")
    data = examples_fingerprint(examples)
    torch.manual_seed(cfg.seed)
    device = target.model.device
    state = TrainState()
    saved = None
    if resume:
        saved = load_state(state_path)
        check_resumable(saved, cfg, data, state_path)
    if cfg.method != "eagle3" and features is not None:
        raise ValueError(f"--features caches an EAGLE-3 draft's taps; --method {cfg.method} trains from the target online")
    if cfg.method in ("eagle", "hass"):
        from eagle3.methods.eagle1 import Eagle1Objective

        objective = Eagle1Objective(target, cfg, saved, init, hass=cfg.method == "hass")
    elif cfg.method == "sps":
        from eagle3.training.distill import SpsObjective

        objective = SpsObjective(target, cfg.lm_layers, cfg.lm_hidden, cfg.seed, saved, init)
    elif cfg.method == "medusa":
        from eagle3.methods.medusa import MedusaObjective

        objective = MedusaObjective(target, cfg.heads, cfg.head_layers, cfg.seed, saved, init)
    elif cfg.method == "hydra":
        from eagle3.methods.hydra import HydraObjective

        objective = HydraObjective(target, cfg.heads, cfg.head_layers, cfg.seed, saved, init)
    else:
        objective = Eagle3Objective(target, [examples[i] for i in usable], cfg, features, saved, init)
    if saved is not None:
        state = TrainState(**saved["state"])
        torch.set_rng_state(saved["rng"])
        if rank == 0:
            truncate_log(out_dir / "train_log.jsonl", state.step)
    draft = objective.model
    draft.train()
    optimizer = torch.optim.AdamW(draft.parameters(), lr=cfg.lr, betas=(0.9, 0.95), weight_decay=cfg.weight_decay)
    if resume:
        optimizer.load_state_dict(saved["optimizer"])
    pad = target.tokenizer.pad_token_id if target.tokenizer.pad_token_id is not None else 0
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=cfg.dtype in ("bfloat16", "bf16"))

    stop = {"signal": None}

    def on_signal(signum, frame):  # finish the current step, checkpoint, then leave
        stop["signal"] = signum

    if cfg.batch_size % world:
        raise ValueError(f"batch size {cfg.batch_size} does not split evenly over {world} processes")
    handlers = {s: signal.signal(s, on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
    log_file = (out_dir / "train_log.jsonl").open("a") if rank == 0 else open(os.devnull, "w")
    bar = tqdm(total=cfg.steps, initial=state.step, desc="train", disable=not progress or rank > 0, file=sys.stderr)
    per_epoch = math.ceil(len(usable) / cfg.batch_size)
    lengths = [len(examples[i].input_ids) for i in usable] if cfg.group_by_length else None
    order_epoch, order = None, []  # the epoch's order, computed once per epoch
    try:
        while state.step < cfg.steps and stop["signal"] is None:
            start = time.perf_counter()
            for group in optimizer.param_groups:
                group["lr"] = lr_at(state.step, cfg)
            optimizer.zero_grad(set_to_none=True)
            loss_sum = hits = counts = 0
            for _ in range(cfg.grad_accum):
                if state.batch_index >= per_epoch:
                    state.epoch, state.batch_index = state.epoch + 1, 0
                if order_epoch != state.epoch:
                    order_epoch = state.epoch
                    order = [usable[i] for i in epoch_order(len(usable), cfg.seed, state.epoch, lengths, cfg.batch_size)]
                first = state.batch_index * cfg.batch_size
                chosen = [order[(first + j) % len(order)] for j in range(cfg.batch_size)]  # always full
                state.batch_index += 1
                mine = chosen[rank::world]  # this rank's share of the global micro-batch
                ids, loss_mask = collate([examples[i] for i in mine], pad)
                items = None if features is None else [features[i] for i in mine]
                # Normalized by the whole micro-batch's counts, so the ranks' losses sum to its loss.
                total, per_step, step_hits, norms = objective.loss(ids, loss_mask, items, all_reduce_sum, autocast)
                (total / cfg.grad_accum).backward()
                loss_sum = loss_sum + all_reduce_sum(per_step) / cfg.grad_accum
                hits, counts = hits + all_reduce_sum(step_hits), counts + norms
            for p in draft.parameters():  # data parallel: the batch's gradient is the sum of the ranks'
                if p.grad is not None:
                    all_reduce_sum(p.grad)
            grad_norm = torch.nn.utils.clip_grad_norm_(draft.parameters(), cfg.clip)
            optimizer.step()
            state.step += 1
            row = {
                "step": state.step, "lr": lr_at(state.step - 1, cfg), "grad_norm": float(grad_norm),
                "loss": loss_sum.tolist(), "acc": (hits / counts.clamp(min=1)).tolist(),
                "s": time.perf_counter() - start,
            }  # fmt: skip
            state.log.append({"step": state.step, "loss0": row["loss"][0], "acc0": row["acc"][0]})
            bar.update(1)
            bar.set_postfix(loss=f"{row['loss'][0]:.3f}", acc=f"{row['acc'][0]:.2f}")
            # Every rank stops (and checkpoints) together when any of them was signalled.
            if all_reduce_sum(torch.tensor(float(stop["signal"] is not None))) > 0 and stop["signal"] is None:
                stop["signal"] = signal.SIGTERM
            if rank == 0:
                log_file.write(json.dumps(row) + "\n")
                log_file.flush()
                if state.step % cfg.save_every == 0 or state.step == cfg.steps or stop["signal"] is not None:
                    save_state(state_path, objective, optimizer, state, cfg, data)
    finally:
        bar.close()
        log_file.close()
        for s, h in handlers.items():
            signal.signal(s, h)
    draft.eval()
    if rank == 0:  # also when stopped early: the draft so far is usable as it is
        objective.save(out_dir / "draft", target)  # the run's own
    if stop["signal"] is not None:
        raise KeyboardInterrupt(f"training stopped by signal {stop['signal']} at step {state.step}; "
                                f"resume with --resume from {out_dir}")  # fmt: skip
    return draft, state


@torch.no_grad()
def evaluate_tau(target: Target, drafter, conversations: list[list[dict]], max_new_tokens: int = 96, depth: int = 5,
                 with_tree: bool = True) -> dict[str, float]:  # fmt: skip
    """Mean acceptance length (tau) of a drafter on held-out first user turns, greedy, for a chain (one
    proposal per level) and (with_tree) for the default dynamic tree."""
    from eagle3.decoding.speculative import speculative_generate
    from eagle3.decoding.tree import TreeSpec

    trees = {"chain": TreeSpec(depth + 1, depth, 1), **({"tree": TreeSpec()} if with_tree else {})}
    lengths: dict[str, list[int]] = {name: [] for name in trees}
    for messages in conversations:
        first_user = next((m for m in messages if m["role"] == "user"), None)
        if first_user is None:
            continue
        if getattr(target.tokenizer, "chat_template", None):
            ids = target.encode_chat([first_user])
        else:
            ids = target.encode(first_user["content"])
        if len(ids) + max_new_tokens + 64 > target.context:
            continue
        for name, tree in trees.items():
            lengths[name] += speculative_generate(target, drafter, ids, max_new_tokens, tree=tree).accept_lengths
    return {name: sum(v) / len(v) if v else float("nan") for name, v in lengths.items()}


def tap_layers_option(text: str) -> tuple[int, ...]:
    """--tap-layers: three comma-separated target layer indices (layer inputs, as vLLM counts them)."""
    import argparse

    try:
        taps = tuple(int(x) for x in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"takes three comma-separated layer indices (e.g. 2,15,27), got {text!r}") from None
    if len(taps) != 3 or len(set(taps)) != 3 or min(taps) < 0:
        raise argparse.ArgumentTypeError(f"takes three distinct layer indices >= 0 (e.g. 2,15,27), got {text!r}")
    return taps


def add_train_parser(sub) -> None:
    p = sub.add_parser("train", help="train an EAGLE-3 draft for a target with training-time test (or another "
                       "method's draft: --method)")  # fmt: skip
    p.add_argument("--target", default="smollm2-135m")
    p.add_argument("--method", choices=METHODS, default=None,
                   help="eagle3 (default): an EAGLE-3 head; eagle: EAGLE's draft (for EAGLE and EAGLE-2); hass: the "
                        "same trained with HASS's objective over --ttt-steps; sps: a small Llama with the target's "
                        "vocabulary, distilled from the target, for classic speculative sampling (--lm-layers, "
                        "--lm-hidden); medusa: Medusa-1 heads on the target's top feature; hydra: Hydra's sequentially "
                        "dependent heads (--heads, --head-layers)")  # fmt: skip
    p.add_argument("--data", nargs="*", default=None,
                   help="ShareGPT / OpenAI-messages JSON or JSONL files (default: ShareGPT from PyPI and "
                        "../shared/data/train)")  # fmt: skip
    p.add_argument("--recipe", choices=sorted(RECIPES), default=None,
                   help="settings to start from (default: cpu; a resumed run keeps its own)")  # fmt: skip
    p.add_argument("--out", required=True, help="run folder: train_state.pt, train_log.jsonl, draft/, summary.json")
    p.add_argument("--resume", action="store_true", help="continue the run in --out exactly where it stopped")
    p.add_argument("--overwrite", action="store_true",
                   help="start over in an --out that holds a run (its run files are removed; others are kept)")  # fmt: skip
    p.add_argument("--init", default=None,
                   help="start from this draft checkpoint (weights and vocabulary) instead of a fresh draft")  # fmt: skip
    p.add_argument("--limit", type=options.count, default=None, help="use the first N conversations")
    p.add_argument("--eval-conversations", type=options.nonnegative, default=8,
                   help="held out from the data for the tau check")  # fmt: skip
    p.add_argument("--drop-long", action="store_true", help="drop conversations over max length (default: truncate)")
    for name, kind in [("steps", options.count), ("batch-size", options.integer(1, 65536)),
                       ("grad-accum", options.integer(1, 65536)), ("lr", options.real(0.0, 10.0, open_below=True)),
                       ("warmup", options.nonnegative), ("ttt-steps", options.integer(1, 64)),
                       ("draft-vocab-size", options.count), ("max-length", options.integer(2, options.BIG)),
                       ("seed", options.seed), ("save-every", options.count), ("lm-layers", options.integer(1, 64)),
                       ("lm-hidden", options.integer(64, 8192)), ("heads", options.integer(1, 16)),
                       ("head-layers", options.integer(0, 16))]:  # fmt: skip
        p.add_argument(f"--{name}", type=kind, default=None, help="overrides the recipe")
    p.add_argument("--tap-layers", type=tap_layers_option, default=None,
                   help="the target layers a fresh draft reads, e.g. 2,15,27 (default: the target's EAGLE-3 "
                        "defaults)")  # fmt: skip
    p.add_argument("--features", default=None,
                   help="offline feature cache folder: filled first (or completed) from the data, then trained on "
                        "without running the target")  # fmt: skip
    p.add_argument("--dtype", choices=("float32", "bfloat16", "bf16"), default=None,
                   help="float32 or bfloat16 (autocast) for the draft's training")  # fmt: skip
    p.add_argument("--threads", type=options.threads, default=None)
    p.add_argument("--device", type=options.device, default=None)


def base_config(args, saved: dict | None) -> TrainConfig:
    """The run's settings: a resumed run's own (`saved`, its state), else the recipe's; then the options given."""
    from dataclasses import replace

    if saved is not None:
        if args.recipe is not None:
            raise ValueError("--recipe starts a run; a resumed run keeps its own settings (drop --recipe)")
        base = config_from_saved(saved)
    else:
        base = RECIPES[args.recipe or "cpu"]
    overrides = {k: getattr(args, k) for k in TrainConfig.__dataclass_fields__ if getattr(args, k, None) is not None}
    return replace(base, **overrides)


def draft_tap_layers(target: Target, cfg: TrainConfig, args, saved: dict | None) -> tuple[int, ...]:
    """The target layers the trained draft reads: a resumed run's, an --init draft's, or the configured ones."""
    from eagle3.formats.checkpoint import read_draft_config

    if saved is not None:
        taps = saved["draft_config"].get("tap_layers")
    elif args.init:
        taps = read_draft_config(args.init)[0].tap_layers
    else:
        taps = cfg.tap_layers
    return tuple(taps) if taps else tuple(target.model.config.default_tap_layers)


def train_command(args) -> int:
    from eagle3.training.data import build_examples, default_sources, read_conversations
    from eagle3.runtimes.target import load_target

    rank = distributed_rank_and_world()[0]
    if rank == 0:  # before the slow part: a folder holding a run is refused (or cleared) now
        prepare_run_folder(Path(args.out), args.resume, args.overwrite)
    saved = load_state(Path(args.out) / "train_state.pt") if args.resume else None
    cfg = base_config(args, saved)
    if cfg.method != "eagle3" and args.features:
        raise ValueError(f"--features caches an EAGLE-3 draft's taps; --method {cfg.method} trains from the target online")
    options.apply_threads(args)
    sources = [Path(p) for p in args.data] if args.data else default_sources()
    conversations, stats = read_conversations(sources, args.limit)
    held_out = conversations[-args.eval_conversations :] if args.eval_conversations else []
    conversations = conversations[: len(conversations) - len(held_out)]
    device = args.device
    if device is None and torch.cuda.is_available() and "LOCAL_RANK" in os.environ:
        device = f"cuda:{os.environ['LOCAL_RANK']}"  # one GPU per torchrun process
    target = load_target(args.target, device=device)
    examples, counts = build_examples(target.tokenizer, conversations, cfg.max_length, truncate=not args.drop_long)
    replaced = f"; {stats.replaced} undecodable byte sequences read as U+FFFD" if stats.replaced else ""
    print(f"data: {stats.read} records, {len(conversations)} conversations for training, {len(held_out)} held out; "
          f"skipped {stats.skipped or 'none'}; examples {counts}{replaced}", file=sys.stderr)  # fmt: skip
    start = time.perf_counter()
    features = None
    if args.features:
        from eagle3.training.features import dump_features

        taps = draft_tap_layers(target, cfg, args, saved)
        if rank == 0:
            try:
                dump_features(target, examples, args.features, taps)
            except KeyboardInterrupt:
                raise KeyboardInterrupt(f"feature extraction stopped; its complete shards are kept in {args.features}: "
                                        "rerun the same command to continue") from None  # fmt: skip
        barrier()
        features = FeatureCache(args.features, target, examples, taps)
    draft, state = train(target, examples, args.out, cfg, resume=args.resume, features=features, init=args.init,
                         overwrite=args.overwrite)  # fmt: skip
    end_distributed()  # rank 0 evaluates alone from here
    if rank != 0:
        return 0
    hours = (time.perf_counter() - start) / 3600
    tau = {}
    if held_out and cfg.method == "sps":  # (a draft model proposes one path at a time: the chain only)
        from eagle3.methods.sps import load_draft_model_drafter

        tau = evaluate_tau(target, load_draft_model_drafter(Path(args.out) / "draft", target), held_out, with_tree=False)
    elif held_out and cfg.method in ("eagle", "hass", "medusa", "hydra"):
        from eagle3.methods.drafter import load_drafter

        tau = evaluate_tau(target, load_drafter(Path(args.out) / "draft", target), held_out)
    elif held_out:
        from eagle3.methods.drafter import Eagle3Drafter

        tau = evaluate_tau(target, Eagle3Drafter(draft.eval()), held_out)
    last = state.log[-1] if state.log else {}
    summary = {"steps": state.step, "epochs": state.epoch, "examples": len(examples),
               "tokens_per_epoch": sum(len(e.input_ids) for e in examples), "hours_this_run": hours,
               "cpu_hours_this_run": hours * torch.get_num_threads(), "final_loss0": last.get("loss0"),
               "final_acc0": last.get("acc0"), "tau": tau, "draft": str(Path(args.out) / "draft"),
               "init": args.init}  # fmt: skip
    write_text(Path(args.out) / "summary.json", json.dumps(summary, indent=1))
    print(json.dumps(summary, indent=1))
    return 0
