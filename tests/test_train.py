"""A tiny end-to-end training run on stories260K: the loss falls, the saved draft loads and speculates
losslessly, and resuming is exact."""

import dataclasses

import pytest
import torch

from eagle3.formats.checkpoint import load_draft
from eagle3.methods.drafter import Eagle3Drafter
from eagle3.decoding.generate import generate
from eagle3.runtimes.model import load_model
from eagle3.decoding.speculative import speculative_generate
from eagle3.training.train import TrainConfig, epoch_order, train
from eagle3.decoding.tree import TreeSpec
from training_checks import assert_resumes_exactly, story_conversations

CFG = TrainConfig(steps=120, batch_size=4, lr=1e-2, warmup=5, ttt_steps=3, draft_vocab_size=256, save_every=50)


def test_training_learns_and_the_draft_speculates_losslessly(stories, examples, tmp_path):
    draft, state = train(stories, examples, tmp_path, CFG, progress=False)
    first = sum(r["loss0"] for r in state.log[:5]) / 5
    last = sum(r["loss0"] for r in state.log[-5:]) / 5
    assert last < 0.5 * first, (first, last)
    loaded = load_draft(tmp_path / "draft", stories.model.config, device="cpu")
    for key, value in draft.state_dict().items():
        assert torch.equal(value.cpu(), loaded.state_dict()[key]), key
    drafter = Eagle3Drafter(loaded.attach(stories.model.embed.weight))
    ids = stories.encode("Once upon a time")
    plain = generate(stories, ids, 120)
    spec = speculative_generate(stories, drafter, ids, 120, tree=TreeSpec(10, 4, 3))
    assert spec.token_ids == plain.token_ids
    assert spec.tau > 1.3  # a trained draft gets tokens accepted (an untrained one: 1.0)


def test_resume_is_exact(stories, examples, tmp_path):
    assert_resumes_exactly(stories, examples, tmp_path, CFG)


def test_cli_train_runs_end_to_end(tmp_path, capsys):
    import json

    from eagle3.cli import main

    data = story_conversations(tmp_path / "data.jsonl", ["dog", "cat", "girl", "boy", "bird", "fish", "tree", "ball"])
    code = main(["train", "--target", "stories260k", "--data", str(data), "--out", str(tmp_path / "run"),
                 "--steps", "6", "--batch-size", "2", "--ttt-steps", "2", "--draft-vocab-size", "128",
                 "--eval-conversations", "2", "--save-every", "3"])
    assert code == 0
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["steps"] == 6 and summary["tau"]["chain"] >= 1 and summary["tau"]["tree"] >= 1
    assert (tmp_path / "run" / "draft" / "model.safetensors").is_file()
    lines = (tmp_path / "run" / "train_log.jsonl").read_text().splitlines()
    assert len(lines) == 6 and len(json.loads(lines[0])["loss"]) == 2
    assert main(["train", "--target", "stories260k", "--data", str(tmp_path / "nope.json"), "--out", str(tmp_path / "x")]) == 2

    # --resume keeps the run's own settings (the recipe's defaults would differ) and extends it.
    resume = ["train", "--target", "stories260k", "--data", str(data), "--out", str(tmp_path / "run"), "--resume",
              "--eval-conversations", "2"]  # fmt: skip
    capsys.readouterr()
    assert main(resume + ["--lr", "0.5"]) == 2 and "other settings (lr" in capsys.readouterr().err
    assert main(resume + ["--recipe", "paper"]) == 2 and "drop --recipe" in capsys.readouterr().err
    assert main(resume + ["--steps", "8"]) == 0
    assert json.loads((tmp_path / "run" / "summary.json").read_text())["steps"] == 8
    assert len((tmp_path / "run" / "train_log.jsonl").read_text().splitlines()) == 8


def test_sigterm_checkpoints_then_resume_finishes(stories, examples, tmp_path, monkeypatch):
    import os
    import signal

    import eagle3.training.train as train_module

    calls = {"n": 0}
    real_loss = train_module.ttt_loss

    def loss_then_signal(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 3:
            os.kill(os.getpid(), signal.SIGTERM)  # arrives mid-step: the step finishes, then a checkpoint
        return real_loss(*args, **kwargs)

    monkeypatch.setattr(train_module, "ttt_loss", loss_then_signal)
    cfg = TrainConfig(**{**CFG.__dict__, "steps": 8, "save_every": 100})
    with pytest.raises(KeyboardInterrupt, match="resume"):
        train(stories, examples, tmp_path, cfg, progress=False)
    saved = torch.load(tmp_path / "train_state.pt", weights_only=True)
    assert saved["state"]["step"] == 3
    monkeypatch.setattr(train_module, "ttt_loss", real_loss)
    _, state = train(stories, examples, tmp_path, cfg, resume=True, progress=False)
    assert state.step == 8 and (tmp_path / "draft" / "config.json").is_file()


def test_a_run_folder_is_never_written_over(stories, examples, tmp_path):
    """A folder holding a run is refused unless resumed (same settings but the step count, same data, a
    readable state) or started over (only the run's own files go)."""
    import json

    cfg = TrainConfig(**{**CFG.__dict__, "steps": 2, "save_every": 1})
    run = tmp_path / "run"
    train(stories, examples, run, cfg, progress=False)
    (run / "notes.txt").write_text("mine")
    with pytest.raises(ValueError, match="holds a training run .*--resume.*--overwrite"):
        train(stories, examples, run, cfg, progress=False)
    _, state = train(stories, examples, run, cfg, progress=False, overwrite=True)
    assert state.step == 2 and (run / "notes.txt").read_text() == "mine"
    assert len((run / "train_log.jsonl").read_text().splitlines()) == 2  # started over, not appended to

    with pytest.raises(ValueError, match="nothing to resume"):
        train(stories, examples, tmp_path / "fresh", cfg, resume=True, progress=False)
    with pytest.raises(ValueError, match="other settings \\(lr 0.01 -> 0.02\\)"):
        train(stories, examples, run, TrainConfig(**{**cfg.__dict__, "lr": 0.02}), resume=True, progress=False)
    with pytest.raises(ValueError, match="other data"):
        train(stories, examples[:-1], run, cfg, resume=True, progress=False)
    with pytest.raises(ValueError, match="exclude each other"):
        train(stories, examples, run, cfg, resume=True, overwrite=True, progress=False)

    # Log rows written after the checkpoint (a run killed between saves) are dropped, not duplicated.
    with (run / "train_log.jsonl").open("a") as log:
        log.write(json.dumps({"step": 3, "loss": [9.9]}) + "\n" + '{"step": 4, "lo')
    _, state = train(stories, examples, run, TrainConfig(**{**cfg.__dict__, "steps": 3}), resume=True, progress=False)
    steps = [json.loads(line)["step"] for line in (run / "train_log.jsonl").read_text().splitlines()]
    assert state.step == 3 and steps == [1, 2, 3]

    (run / "train_state.pt").write_bytes(b"PK\x03\x04 not a checkpoint")
    with pytest.raises(ValueError, match="train_state.pt is unreadable"):
        train(stories, examples, run, cfg, resume=True, progress=False)


def test_cli_train_refuses_a_run_folder(tmp_path, capsys):
    from eagle3.cli import main

    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "train_log.jsonl").write_text("")
    data = tmp_path / "data.jsonl"
    data.write_text('{"conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Hello."}]}\n')
    args = ["train", "--target", "stories260k", "--data", str(data), "--out", str(tmp_path / "run"), "--steps", "1"]
    assert main(args) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error:") and "holds a training run" in err and len(err.splitlines()) == 1
    assert main(args + ["--resume"]) == 2 and "nothing to resume" in capsys.readouterr().err
    assert (tmp_path / "run" / "train_log.jsonl").exists()


def test_two_process_torchrun_equals_one_process(tmp_path):
    """Data parallel over 2 CPU processes (gloo) gives the one-process result on the same global batch."""
    import json
    import os
    import subprocess
    import sys

    rows = [{"conversations": [{"from": "human", "value": "Tell me a story."},
                               {"from": "gpt", "value": f"Once upon a time, there was a {w} who liked to {v}."}]}
            for w in ["dog", "cat", "girl", "boy", "bird", "fish"] for v in ["play", "run", "sing"]]
    data = tmp_path / "data.jsonl"
    data.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    args = ["train", "--target", "stories260k", "--data", str(data), "--steps", "3", "--batch-size", "4",
            "--ttt-steps", "2", "--draft-vocab-size", "128", "--eval-conversations", "0", "--lr", "1e-2"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    one = subprocess.run([sys.executable, "-m", "eagle3", *args, "--out", str(tmp_path / "one")], env=env,
                         capture_output=True, text=True, timeout=300)
    assert one.returncode == 0, one.stderr[-2000:]
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
                          "29517", "-m", "eagle3", *args, "--out", str(tmp_path / "two")], env=env,
                         capture_output=True, text=True, timeout=300)
    assert two.returncode == 0, two.stderr[-2000:]
    a = load_draft(tmp_path / "one" / "draft", device="cpu").state_dict()
    b = load_draft(tmp_path / "two" / "draft", device="cpu").state_dict()
    for key in a:
        assert torch.allclose(a[key], b[key], atol=1e-5, rtol=1e-4), key
    log_one = [json.loads(x) for x in (tmp_path / "one" / "train_log.jsonl").read_text().splitlines()]
    log_two = [json.loads(x) for x in (tmp_path / "two" / "train_log.jsonl").read_text().splitlines()]
    flat = lambda log: [x for r in log for x in r["loss"]]  # noqa: E731
    assert flat(log_one) == pytest.approx(flat(log_two), rel=1e-4) and len(log_one) == len(log_two) == 3


def test_a_torchrun_rank_ends_with_gloo_threads_joined(tmp_path):
    """After training each rank closes the process group and gloo's threads are gone, even though transformers
    imported torch.distributed.nn (whose default arguments would otherwise hold the world group): a rank that
    exits with them running can abort while they release a collective's tensors."""
    import os
    import subprocess
    import sys

    script = tmp_path / "rank.py"
    script.write_text(
        "import os, torch, torch.distributed as dist\n"
        "from eagle3.training.train import all_reduce_sum, distributed_rank_and_world, end_distributed\n"
        "distributed_rank_and_world()\n"
        "import torch.distributed.nn\n"
        "all_reduce_sum(torch.ones(2))\n"
        "end_distributed()\n"
        "names = [open(f'/proc/self/task/{t}/comm').read().strip() for t in os.listdir('/proc/self/task')]\n"
        "assert not [n for n in names if 'gloo' in n], names\n"
    )
    run = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29518",
                          str(script)], env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True,
                         timeout=120)  # fmt: skip
    assert run.returncode == 0, run.stderr[-2000:]


def test_offline_features_train_like_online(stories, examples, tmp_path, monkeypatch):
    import eagle3.training.features as features_module
    from eagle3.training.features import FeatureCache, dump_features

    cfg = TrainConfig(**{**CFG.__dict__, "steps": 4})
    online, _ = train(stories, examples, tmp_path / "online", cfg, progress=False)
    # Interrupted after the first shard, then completed by a rerun.
    real_save = features_module.save_file
    calls = {"n": 0}

    def save_then_die(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt
        return real_save(*args, **kwargs)

    taps = stories.model.config.default_tap_layers
    monkeypatch.setattr(features_module, "save_file", save_then_die)
    with pytest.raises(KeyboardInterrupt):
        dump_features(stories, examples, tmp_path / "feat", taps, shard_examples=5, dtype=torch.float32, progress=False)
    assert len(FeatureCache(tmp_path / "feat")) == 5
    assert [p.name for p in (tmp_path / "feat").iterdir() if p.name.startswith(".")] == []  # no torn shard
    monkeypatch.setattr(features_module, "save_file", real_save)
    dump_features(stories, examples, tmp_path / "feat", taps, shard_examples=5, dtype=torch.float32, progress=False)
    cache = FeatureCache(tmp_path / "feat", stories, examples, taps)
    assert len(cache) == len(examples) and torch.equal(cache[7].input_ids, examples[7].input_ids)
    offline, _ = train(stories, examples, tmp_path / "offline", cfg, progress=False, features=cache)
    for key, value in online.state_dict().items():
        assert torch.allclose(value, offline.state_dict()[key], atol=1e-5), key

    # A cache made from other data, other layers or another target is refused, never trained on.
    with pytest.raises(ValueError, match="other data"):
        dump_features(stories, examples[:-1] + examples[:1], tmp_path / "feat", taps, progress=False)
    with pytest.raises(ValueError, match="other tapped layers"):
        FeatureCache(tmp_path / "feat", stories, examples, (0, 1, 2))
    other = dataclasses.replace(stories, model=load_model(stories.path, device="cpu"))
    other.model.layers[2].down_weight.mul_(1.01)  # a fine-tuned target, say
    with pytest.raises(ValueError, match="another target"):
        FeatureCache(tmp_path / "feat", other, examples, taps)
    with pytest.raises(ValueError, match="the draft reads"):
        train(stories, examples, tmp_path / "other-taps", TrainConfig(**{**cfg.__dict__, "tap_layers": (0, 1, 2)}),
              progress=False, features=cache)  # fmt: skip


def test_init_continues_from_a_saved_draft(stories, examples, tmp_path):
    cfg = TrainConfig(**{**CFG.__dict__, "steps": 40})
    first, state = train(stories, examples, tmp_path / "first", cfg, progress=False)
    more = TrainConfig(**{**CFG.__dict__, "steps": 2, "lr": 1e-9})
    second, more_state = train(stories, examples, tmp_path / "second", more, init=tmp_path / "first" / "draft",
                               progress=False)  # fmt: skip
    assert torch.equal(second.d2t, first.d2t) and torch.equal(second.t2d, first.t2d)
    fresh_loss = state.log[0]["loss0"]
    assert more_state.log[0]["loss0"] < 0.8 * fresh_loss, (more_state.log[0]["loss0"], fresh_loss)
    assert abs(more_state.log[0]["loss0"] - state.log[-1]["loss0"]) < 0.5 * fresh_loss


def test_batches_group_similar_lengths_and_cover_the_epoch():
    lengths = [int(x) for x in torch.randint(10, 500, (1000,), generator=torch.Generator().manual_seed(1))]
    order = epoch_order(1000, seed=3, epoch=2, lengths=lengths, batch_size=4)
    assert sorted(order) == list(range(1000))
    assert order == epoch_order(1000, seed=3, epoch=2, lengths=lengths, batch_size=4)  # resume replays it
    assert order != epoch_order(1000, seed=3, epoch=3, lengths=lengths, batch_size=4)

    def padding(o):
        return sum(max(lengths[i] for i in o[j : j + 4]) * 4 - sum(lengths[i] for i in o[j : j + 4])
                   for j in range(0, len(o), 4))  # fmt: skip

    assert padding(order) < 0.2 * padding(epoch_order(1000, seed=3, epoch=2))
