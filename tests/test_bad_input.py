"""Hostile input is normal input: every bad option value and every damaged file a command reads ends in one
line, `error: ...` naming the problem, and exit code 2; never a traceback. Run through the CLI entry point in
process (parse errors never load a model; file errors load stories260K, which is tiny)."""

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from eagle3.cli import main

GEN = ["generate", "--target", "stories260k", "--draft", "none"]
BENCH = ["bench", "--target", "stories260k", "--out", "unused"]
TRAIN = ["train", "--target", "stories260k", "--out", "unused"]
REGEN = ["regenerate", "--target", "stories260k", "--out", "unused.jsonl"]

# (argv, a fragment the one-line message must contain)
BAD_OPTIONS = [
    (GEN + ["--temperature", "nan", "x"], "--temperature"),
    (GEN + ["--temperature", "inf", "x"], "--temperature"),
    (GEN + ["--temperature", "-1", "x"], "--temperature"),
    (GEN + ["--temperature", "1e-9", "x"], "0 (greedy) or at least"),
    (GEN + ["--temperature", "1e9", "x"], "--temperature"),
    (GEN + ["--top-p", "nan", "x"], "--top-p"),
    (GEN + ["--top-p", "0", "x"], "--top-p"),
    (GEN + ["--top-p", "1.5", "x"], "--top-p"),
    (GEN + ["--top-k", "-1", "x"], "--top-k"),
    (GEN + ["--top-k", "1e3", "x"], "--top-k: must be an integer"),
    (GEN + ["--max-new-tokens", "0", "x"], "--max-new-tokens"),
    (GEN + ["--max-new-tokens", "-3", "x"], "--max-new-tokens"),
    (GEN + ["--max-new-tokens", "99999999999", "x"], "--max-new-tokens"),
    (GEN + ["--max-new-tokens", "many", "x"], "must be an integer"),
    (GEN + ["--seed", "-1", "x"], "--seed"),
    (GEN + ["--seed", str(2**70), "x"], "--seed"),
    (GEN + ["--threads", "0", "x"], "--threads"),
    (GEN + ["--threads", "100000", "x"], "--threads"),
    (GEN + ["--device", "tpu", "x"], "--device: 'tpu' is not a device"),
    (GEN + ["--device", "cuda:not-a-number", "x"], "--device"),
    (GEN + ["--dtype", "float64", "x"], "--dtype"),
    (GEN + ["--tree", "10,3", "x"], "--tree"),
    (GEN + ["--tree", "0,1,1", "x"], "--tree"),
    (GEN + ["--tree", "100000,5,10", "x"], "--tree"),
    (GEN + ["--draft-window", "-1", "x"], "--draft-window"),
    (GEN + ["\udcff\udcfe"], "not valid UTF-8"),
    (GEN + ["--stop", "a\udcff", "x"], "not valid UTF-8"),
    (BENCH + ["--limit", "0"], "--limit"),
    (BENCH + ["--max-new-tokens", "0"], "--max-new-tokens"),
    (BENCH + ["--temperature", "nan"], "--temperature"),
    (BENCH + ["--pld-tokens", "0"], "--pld-tokens"),
    (BENCH + ["--seed", "-5"], "--seed"),
    (BENCH + ["--tree", "1,1"], "--tree"),
    (BENCH + ["--threads", "-2"], "--threads"),
    (TRAIN + ["--batch-size", "0"], "--batch-size"),
    (TRAIN + ["--grad-accum", "0"], "--grad-accum"),
    (TRAIN + ["--ttt-steps", "0"], "--ttt-steps"),
    (TRAIN + ["--save-every", "0"], "--save-every"),
    (TRAIN + ["--draft-vocab-size", "0"], "--draft-vocab-size"),
    (TRAIN + ["--steps", "-1"], "--steps"),
    (TRAIN + ["--lr", "nan"], "--lr"),
    (TRAIN + ["--lr", "0"], "--lr"),
    (TRAIN + ["--warmup", "-1"], "--warmup"),
    (TRAIN + ["--max-length", "1"], "--max-length"),
    (TRAIN + ["--eval-conversations", "-1"], "--eval-conversations"),
    (TRAIN + ["--limit", "0"], "--limit"),
    (TRAIN + ["--seed", "1.5"], "--seed"),
    (TRAIN + ["--tap-layers", "1,1,2"], "--tap-layers"),
    (TRAIN + ["--tap-layers", "a,b,c"], "--tap-layers"),
    (TRAIN + ["--device", "cuda:99"], "--device"),
    (REGEN + ["--batch-size", "0"], "--batch-size"),
    (REGEN + ["--concurrency", "-1"], "--concurrency"),
    (REGEN + ["--max-new-tokens", "0"], "--max-new-tokens"),
    (REGEN + ["--temperature", "inf"], "--temperature"),
    (REGEN + ["--limit", "0"], "--limit"),
    (["calibrate", "--target", "stories260k", "--threads", "0"], "--threads"),
    (["convert", "a", "b", "--to", "eagle", "--speculative-tokens", "0"], "--speculative-tokens"),
    (["convert", "a", "b", "--to", "gguf"], "--to"),
    (["convert", "a", "b", "--to", "eagle", "--dtype", "int8"], "--dtype"),
    (["draft-init", "out", "--target", "stories260k", "--draft-vocab", "0"], "--draft-vocab"),
    (["draft-init", "out", "--target", "stories260k", "--draft-vocab", "-1"], "--draft-vocab"),
    (["nonsense"], "invalid choice"),
]


def run(capsys, argv):
    """(exit code, stderr) of the CLI, run in process."""
    code = main([str(a) for a in argv])
    return code, capsys.readouterr().err


def assert_one_line_error(code, err, fragment):
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 2, err
    assert "Traceback" not in err
    assert lines and lines[-1].startswith("error: "), err
    assert sum(line.startswith("error") for line in lines) == 1, err
    assert fragment in lines[-1], (fragment, lines[-1])


@pytest.mark.parametrize("argv, fragment", BAD_OPTIONS, ids=[" ".join(a[-3:]) for a, _ in BAD_OPTIONS])
def test_bad_option_values_are_one_line_errors(capsys, argv, fragment):
    if "--device" in argv and torch.cuda.is_available():
        pytest.skip("this machine has a GPU: CUDA device names may be valid here")
    assert_one_line_error(*run(capsys, argv), fragment)


# ---------------------------------------------------------------------------------------------- damaged files


def damaged_targets(stories_path, root):
    """Copies of stories260K, each damaged in one way: {name: (folder, fragment of the expected message)}."""
    out = {}

    def copy(name):
        folder = root / name
        shutil.copytree(stories_path, folder)
        for f in folder.iterdir():
            f.chmod(0o644)
        return folder

    def config_edit(name, edit, fragment):
        folder = copy(name)
        cfg = json.loads((folder / "config.json").read_text())
        edit(cfg)
        (folder / "config.json").write_text(json.dumps(cfg))
        out[name] = (folder, fragment)

    folder = copy("config-not-json")
    (folder / "config.json").write_bytes(b"\x89PNG\r\n\x1a\n random bytes")
    out["config-not-json"] = (folder, "config.json is not valid JSON")
    folder = copy("config-a-list")
    (folder / "config.json").write_text("[1, 2]")
    out["config-a-list"] = (folder, "not a JSON object")
    config_edit("config-no-hidden", lambda c: c.pop("hidden_size"), "lacks 'hidden_size'")
    config_edit("config-negative", lambda c: c.update(num_hidden_layers=-3), "sizes must be positive")
    config_edit("config-string", lambda c: c.update(hidden_size="wide"), "wrong type")
    config_edit("config-heads", lambda c: c.update(num_key_value_heads=3), "do not group evenly")
    config_edit("config-eos", lambda c: c.update(eos_token_id={"a": 1}), "eos_token_id")
    config_edit("config-architecture", lambda c: c.update(model_type="gpt2"), "not supported")
    weights = load_file(str(stories_path / "model.safetensors"))

    def weights_edit(name, tensors, fragment):
        folder = copy(name)
        save_file(tensors, str(folder / "model.safetensors"))
        out[name] = (folder, fragment)

    folder = copy("weights-truncated")
    data = (folder / "model.safetensors").read_bytes()
    (folder / "model.safetensors").write_bytes(data[: len(data) // 2])
    out["weights-truncated"] = (folder, "model.safetensors is unreadable")
    folder = copy("weights-random")
    (folder / "model.safetensors").write_bytes(torch.randint(0, 256, (4096,), dtype=torch.uint8).numpy().tobytes())
    out["weights-random"] = (folder, "model.safetensors is unreadable")
    folder = copy("weights-empty")
    (folder / "model.safetensors").write_bytes(b"")
    out["weights-empty"] = (folder, "model.safetensors is unreadable")
    key = "model.layers.0.mlp.down_proj.weight"
    weights_edit("weights-shape", {**weights, key: weights[key][:, :10].contiguous()}, "has shape (64, 10)")
    weights_edit("weights-dtype", {**weights, key: weights[key].to(torch.int32)}, "expected a floating point type")
    weights_edit("weights-missing", {k: v for k, v in weights.items() if k != key}, "lacks the weight")
    folder = copy("weights-outside")
    (folder / "model.safetensors").rename(folder / "shard.safetensors")
    (folder / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"x": "../../../etc/passwd"}}))
    out["weights-outside"] = (folder, "outside")
    folder = copy("no-weights")
    (folder / "model.safetensors").unlink()
    out["no-weights"] = (folder, "no weights in")
    folder = copy("tokenizer-broken")
    (folder / "tokenizer.json").write_text("{not json")
    (folder / "tokenizer.model").write_bytes(b"junk")
    out["tokenizer-broken"] = (folder, "tokenizer")
    return out


@pytest.fixture(scope="module")
def targets(stories_path, tmp_path_factory):
    return damaged_targets(stories_path, tmp_path_factory.mktemp("targets"))


TARGET_CASES = ["config-not-json", "config-a-list", "config-no-hidden", "config-negative", "config-string",
                "config-heads", "config-eos", "config-architecture", "weights-truncated", "weights-random",
                "weights-empty", "weights-shape", "weights-dtype", "weights-missing", "weights-outside", "no-weights",
                "tokenizer-broken"]  # fmt: skip


@pytest.mark.parametrize("case", TARGET_CASES)
def test_a_damaged_target_is_a_one_line_error(capsys, targets, case):
    folder, fragment = targets[case]
    assert_one_line_error(*run(capsys, ["generate", "--target", folder, "--draft", "none", "hi"]), fragment)


@pytest.fixture(scope="module")
def draft(tmp_path_factory):
    folder = tmp_path_factory.mktemp("drafts") / "good"
    assert main(["draft-init", str(folder), "--target", "stories260k", "--draft-vocab", "64"]) == 0
    return folder


def damaged_draft(draft, root, name):
    folder = root / name
    shutil.copytree(draft, folder)
    config = json.loads((folder / "config.json").read_text())
    weights = folder / "model.safetensors"
    if name == "config-random":
        (folder / "config.json").write_bytes(bytes(range(256)))
    elif name == "taps-outside":
        config["eagle_aux_hidden_state_layer_ids"] = [1, 2, 40]
        config.pop("eagle_config")
    elif name == "taps-not-ints":
        config["eagle_config"]["eagle_aux_hidden_state_layer_ids"] = "2,3,4"
    elif name == "weights-truncated":
        weights.write_bytes(weights.read_bytes()[:100])
    elif name == "weights-shape":
        tensors = load_file(str(weights))
        tensors["fc.weight"] = tensors["fc.weight"][:, :5].contiguous()
        save_file(tensors, str(weights))
    elif name == "d2t-outside":
        tensors = load_file(str(weights))
        tensors["d2t"] = tensors["d2t"] + 10_000
        save_file(tensors, str(weights))
    (folder / "config.json").write_text(json.dumps(config)) if name != "config-random" else None
    return folder


DRAFT_CASES = {"config-random": "is not valid JSON", "taps-outside": "outside the target's 5 layers",
               "taps-not-ints": "must be a list of integers", "weights-truncated": "model.safetensors is unreadable",
               "weights-shape": "'fc.weight'", "d2t-outside": "outside the target vocabulary"}  # fmt: skip


@pytest.mark.parametrize("case", DRAFT_CASES)
def test_a_damaged_draft_is_a_one_line_error(capsys, draft, tmp_path, case):
    folder = damaged_draft(draft, tmp_path, case)
    argv = ["generate", "--target", "stories260k", "--draft", folder, "--tree", "4,2,2", "hi"]
    assert_one_line_error(*run(capsys, argv), DRAFT_CASES[case])


def test_damaged_run_files_are_one_line_errors(capsys, draft, tmp_path):
    data = tmp_path / "data.jsonl"
    data.write_text('{"conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Hello."}]}\n' * 4)
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "train_state.pt").write_bytes(b"\x00" * 64)
    train = ["train", "--target", "stories260k", "--data", data, "--out", run_dir, "--steps", "1",
             "--eval-conversations", "0"]  # fmt: skip
    assert_one_line_error(*run(capsys, train + ["--resume"]), "train_state.pt is unreadable")
    features = tmp_path / "features"
    features.mkdir()
    (features / "index.json").write_text('{"shards": [{"file": "../../secret", "first": 0, "count": 4}]}')
    argv = ["train", "--target", "stories260k", "--data", data, "--out", tmp_path / "run2", "--steps", "1",
            "--eval-conversations", "0", "--features", features]  # fmt: skip
    assert_one_line_error(*run(capsys, argv), "outside the cache folder")
    (features / "index.json").write_text("\x00garbage")
    assert_one_line_error(*run(capsys, argv), "not a feature cache index")
    missing = ["train", "--target", "stories260k", "--data", tmp_path / "missing.json", "--out", tmp_path / "run3"]
    assert_one_line_error(*run(capsys, missing), "does not exist")

    assert_one_line_error(*run(capsys, ["draft-init", draft, "--target", "stories260k"]), "--overwrite")
    (tmp_path / "a-file").write_text("x")
    assert_one_line_error(*run(capsys, ["convert", draft, tmp_path / "a-file", "--to", "eagle"]), "not a folder")
    assert_one_line_error(*run(capsys, ["convert", tmp_path / "nowhere", tmp_path / "o", "--to", "eagle"]), "does not exist")
    assert_one_line_error(*run(capsys, ["fetch", tmp_path / "nowhere"]), "unknown model")
    assert_one_line_error(*run(capsys, ["regenerate", "--target", "stories260k", "--data", data, "--out", tmp_path]),
                          "is a folder")  # fmt: skip
    assert_one_line_error(*run(capsys, ["bench", "--target", "stories260k", "--out", tmp_path / "a-file"]), "a-file")


def test_text_files_that_are_not_utf8_are_read_with_replacement(tmp_path):
    """The documented rule: undecodable bytes become U+FFFD and are counted; a row that no longer parses is
    skipped and counted; the run goes on."""
    from eagle3.training.data import read_conversations

    good = b'{"conversations": [{"from": "human", "value": "caf\xc3\xa9"}, {"from": "gpt", "value": "ok \xff\xfe"}]}'
    torn = b'{"conversations": [{"from": "human", "valu\xff'
    path = tmp_path / "data.jsonl"
    path.write_bytes(b"\xef\xbb\xbf" + good + b"\n" + torn + b"\n" + good + b"\n")
    conversations, stats = read_conversations([path])
    assert len(conversations) == 2 and conversations[0][0]["content"] == "caf\u00e9"
    assert conversations[0][1]["content"] == "ok \ufffd\ufffd"
    assert stats.replaced == 5 and stats.skipped == {"malformed JSON": 1}


def test_unwritable_home_still_generates(capsys, draft, tmp_path, monkeypatch):
    """An EAGLE3_HOME that cannot be written (here: beneath a file) only costs the calibration cache: --tree
    auto measures in memory, warns once, and the output is plain decoding's."""
    from eagle3.decoding import cost

    cost._MEASURED.clear()
    (tmp_path / "file").write_text("x")
    monkeypatch.setenv("EAGLE3_HOME", str(tmp_path / "file" / "home"))
    common = ["generate", "--target", "stories260k", "--max-new-tokens", "20", "--json", "Once upon a time"]
    assert main(common + ["--draft", "none"]) == 0
    plain = json.loads(capsys.readouterr().out.splitlines()[-1])
    errs = []
    for _ in range(2):
        assert main(common + ["--draft", str(draft), "--tree", "auto"]) == 0
        out, err = capsys.readouterr()
        assert json.loads(out.splitlines()[-1])["token_ids"] == plain["token_ids"]
        errs.append(err)
    assert "warning: could not cache the cost model" in errs[0] and "EAGLE3_HOME" in errs[0]
    assert "measuring" not in errs[1]  # measured once, then kept in memory


def test_a_corrupt_calibration_cache_is_measured_again(capsys, draft, tmp_path, monkeypatch):
    from eagle3.decoding import cost

    cost._MEASURED.clear()
    monkeypatch.setenv("EAGLE3_HOME", str(tmp_path / "home"))
    common = ["generate", "--target", "stories260k", "--max-new-tokens", "8", "--draft", str(draft), "hi"]
    assert main(common) == 0
    cached = list((tmp_path / "home" / "calibration").glob("*.json"))
    assert len(cached) == 1
    cached[0].write_text('{"target_ms": {"128": {"1": "fast"')
    cost._MEASURED.clear()
    assert main(common) == 0
    assert "unreadable" in capsys.readouterr().err
    assert json.loads(cached[0].read_text())["target_ms"]  # measured and cached again
