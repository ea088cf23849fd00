"""Trajectories: the token ids of an assistant answer for each behavior, from a model, a column or a target."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

from pydantic import BaseModel, Field

from trajalign.backends.base import Sampling
from trajalign.data.datasets import Behavior
from trajalign.errors import InputError


class Trajectory(BaseModel):
    behavior_id: str
    source: str
    token_ids: list[int]


class TrajectorySampling(BaseModel):
    """A sampled trajectory source, `model:SPEC@T=1` (`@T=0.7,seed=3`): one seeded draw per behavior at this
    temperature (no top-k or top-p cut), instead of the model's greedy answer."""

    temperature: float = Field(gt=0)
    seed: int = 0

    def for_behavior(self, behavior_id: str) -> Sampling:
        digest = hashlib.sha256(f"{self.seed}:{behavior_id}".encode()).hexdigest()
        return Sampling(temperature=self.temperature, seed=int(digest[:8], 16))


def parse_model_source(source: str) -> tuple[str, TrajectorySampling | None]:
    """`model:SPEC` -> (SPEC, None); `model:SPEC@T=t[,seed=s]` -> (SPEC, its sampling settings)."""
    spec = source.split(":", 1)[1]
    spec, marker, settings = spec.rpartition("@T=")
    if not marker:
        return settings, None
    temperature, _, seed = settings.partition(",seed=")
    try:
        return spec, TrajectorySampling(temperature=float(temperature), seed=int(seed or 0))
    except ValueError:
        raise InputError(f"trajectories '{source}': expected model:SPEC@T=TEMPERATURE[,seed=N] with a temperature "
                         f"above 0, e.g. model:smollm2-135m@T=1") from None


def tokenizer_fingerprint(tokenizer) -> str:
    vocab = sorted(tokenizer.get_vocab().items())
    return hashlib.sha256(json.dumps(vocab).encode()).hexdigest()[:16]


def model_fingerprint(spec: str) -> str:
    """Identifies a model's weights cheaply: the spec, plus size and mtime of local weight files."""
    path = Path(spec)
    parts = [spec]
    if path.exists():
        files = [path] if path.is_file() else sorted(path.glob("*.safetensors")) + sorted(path.glob("*.gguf"))
        parts += [f"{file.name}:{file.stat().st_size}:{file.stat().st_mtime_ns}" for file in files]
    return hashlib.sha256("|".join(parts).encode()).hexdigest()[:16]


def _from_text(behaviors: list[Behavior], field: str, target, source: str) -> dict[str, Trajectory]:
    trajectories = {}
    for behavior in behaviors:
        text = getattr(behavior, field, None)
        if not text:
            raise InputError(f"dataset '{behavior.dataset}' behavior '{behavior.id}' field '{field}': empty, "
                             f"so it gives no trajectory")
        trajectories[behavior.id] = Trajectory(behavior_id=behavior.id, source=source,
                                               token_ids=target.chat.encode_span(text))
    return trajectories


def generate_answers(handle, behaviors: list[Behavior], max_new_tokens: int, batch_size: int = 16,
                     cache_dir: Path | None = None, progress=None, backend=None,
                     sampling: TrajectorySampling | None = None) -> dict[str, list[int]]:
    """Greedy answers of `handle`'s model, from `backend` (the local hf backend unless given), cached by content
    hash of model, backend, prompts and length; with `sampling`, one seeded draw per behavior instead.
    `progress(done, total, "answers")` follows the generation."""
    from trajalign.backends.base import GenerationRequest

    if backend is None:
        from trajalign.backends.hf import HFBackend

        backend = HFBackend(handle, batch_size=batch_size)
    prompts = {behavior.id: handle.chat.prompt_ids(behavior.prompt) for behavior in behaviors}
    identity = [model_fingerprint(handle.spec), tokenizer_fingerprint(handle.tokenizer), backend.identity,
                max_new_tokens, sorted(prompts.items())]
    if sampling is not None:  # appended only when sampling, so greedy answers keep their cache files
        identity.append(sampling.model_dump())
    key = hashlib.sha256(json.dumps(identity).encode()).hexdigest()[:20]
    cache_file = cache_dir / f"answers-{key}.json" if cache_dir else None
    if cache_file and cache_file.exists():
        return json.loads(cache_file.read_text())
    requests = [GenerationRequest(key=behavior_id, trunk=ids, branch=len(ids), max_new_tokens=max_new_tokens,
                                  sampling=sampling.for_behavior(behavior_id) if sampling else Sampling())
                for behavior_id, ids in prompts.items()]
    answers = {}
    for batch in backend.generate(requests):
        for result in batch:
            answers[result.key] = result.continuation_ids
        if progress:
            progress(len(answers), len(requests), "answers")
    if cache_file:  # written whole and renamed, so concurrent ranks or a kill never leave half a file
        cache_file.parent.mkdir(parents=True, exist_ok=True)
        partial = cache_file.with_suffix(f".{os.getpid()}.tmp")
        partial.write_text(json.dumps(answers))
        os.replace(partial, cache_file)
    return answers


def _source_model(spec: str, target, loaded: dict | None):
    """The model of a `model:SPEC` source other than the target, on the target's device, sharing its tokenizer."""
    from trajalign.models.loading import ModelHandle, load_model

    device = str(target.device) if isinstance(target, ModelHandle) else "auto"
    handle = (loaded or {}).get(spec) or load_model(spec, device=device)
    if not keeps_every_id(target.tokenizer, handle.tokenizer):
        raise InputError(f"trajectories 'model:{spec}': that model's tokenizer differs from the target model's, so its "
                         f"token ids cannot be injected token-exactly")
    return handle


def keeps_every_id(target_tokenizer, source_tokenizer) -> bool:
    """Every token of the source has the same id in the target, so the source's ids mean the same there: the same
    tokenizer, or one that only added tokens (a backtracking model's reset token)."""
    target = target_tokenizer.get_vocab()
    return all(target.get(token) == index for token, index in source_tokenizer.get_vocab().items())


def load_trajectories(source: str, behaviors: list[Behavior], target, max_tokens: int = 48,
                      batch_size: int = 16, cache_dir: Path | None = None, loaded: dict | None = None,
                      progress=None, backend=None) -> dict[str, Trajectory]:
    """Resolve `model:SPEC` (greedy), `model:SPEC@T=1` (sampled), `column:NAME`, `target` or `another:SOURCE` into
    trajectories in the target model's tokens. `another:SOURCE` gives each behavior the SOURCE trajectory of the
    next behavior in `behaviors` (the last one the first's): a span from another answer, as a benign insertion
    control splices in.

    `target` is the evaluated model's handle (a TokenizerHandle is enough) and `backend` the backend that runs it:
    `model:SPEC` naming the target generates there (on a server, if that is the backend); another SPEC is loaded
    locally. A source model must share the target's tokenizer: its ids are then used as they are, never
    re-tokenized.
    """
    if source.startswith("another:"):
        if len(behaviors) < 2:
            raise InputError(f"trajectories '{source}': another behavior's trajectory needs at least two behaviors")
        inner = load_trajectories(source.split(":", 1)[1], behaviors, target, max_tokens, batch_size, cache_dir,
                                  loaded, progress, backend)
        donors = behaviors[1:] + behaviors[:1]
        return {behavior.id: Trajectory(behavior_id=behavior.id, source=source, token_ids=inner[donor.id].token_ids)
                for behavior, donor in zip(behaviors, donors)}
    if source == "target":
        return _from_text(behaviors, "target", target, source)
    if source.startswith("column:"):
        column = source.split(":", 1)[1]
        return _from_text(behaviors, column if column == "target" else "reference", target, source)
    if source.startswith("model:"):
        spec, sampling = parse_model_source(source)
        # the target runs on the evaluation's backend; another model is loaded here and runs locally
        handle, runner = (target, backend) if spec == target.spec else (_source_model(spec, target, loaded), None)
        answers = generate_answers(handle, behaviors, max_tokens, batch_size, cache_dir, progress, runner, sampling)
        return {behavior.id: Trajectory(behavior_id=behavior.id, source=source, token_ids=answers[behavior.id])
                for behavior in behaviors}
    raise InputError(f"trajectories '{source}': use model:SPEC, model:SPEC@T=1 (sampled), column:NAME, target or "
                     f"another:SOURCE")
