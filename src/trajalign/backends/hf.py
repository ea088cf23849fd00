"""Local generation: one prefill per trunk, every branch decoded from it, continuously batched, with verified drafts.

The parts: `HFBackend` schedules (groups requests by trunk, prefills trunks, admits rows as others finish);
`Batch` owns the rows being decoded with their KV cache and attention mask; `drafting` proposes tokens to verify;
`sampling` draws sampled rows' tokens; `kv_cache` holds what depends on transformers' cache internals.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from functools import partial
from typing import Iterable, Iterator

import torch

from trajalign.backends import kv_cache
from trajalign.backends.base import GenerationRequest, GenerationResult
from trajalign.backends.drafting import Drafter, DraftRecord, DraftSlot, LookupDrafter, NoDrafter, accepted_length
from trajalign.backends.sampling import sample_token
from trajalign.batching import batches, pad_right
from trajalign.errors import InputError, TrajalignError

# (architecture, batch shape) -> relative step cost, measured once per process: every evaluation of a study builds
# its own backend, a study evaluates several fine-tuned copies of one architecture, and a timing costs seven passes
# over the whole batch.
_STEP_COSTS: dict[tuple, float] = {}


def _architecture(model) -> tuple:
    """What a step's cost depends on: the model class and its parameters' shapes, dtype and device, not their
    values (a fine-tuned copy costs what its original costs)."""
    parameters = list(model.parameters())
    return (type(model).__name__, parameters[0].dtype, str(parameters[0].device),
            tuple(tuple(parameter.shape) for parameter in parameters))


def _cached_length(request: GenerationRequest) -> int:
    # The last context token is always fed fresh: its logits give the first new token.
    return min(request.branch, len(request.context) - 1)


@dataclass
class Row:
    """One request being decoded: what it must feed next, what it has produced, and how its drafts fared."""

    request: GenerationRequest
    state: kv_cache.LayerStates | None  # the trunk's keys/values, at least `cached_length` long, until admitted
    cached_length: int
    forced: list[int]  # fed next whatever the model says: the uncached context tail, then the last new token
    next_position: int  # the position of forced[0]
    sequence: list[int]  # context + continuation so far; its trunk's siblings draft from it
    pool: list[list[int]]
    generator: torch.Generator | None
    continuation: list[int] = field(default_factory=list)
    gaps: list[float] = field(default_factory=list)
    finish: str = "length"
    done: bool = False
    draft: list[int] = field(default_factory=list)
    record: DraftRecord = field(default_factory=DraftRecord)
    seconds: float = 0.0

    def draft_slot(self) -> DraftSlot:
        room = self.request.max_new_tokens - len(self.continuation) - 1 if self.request.sampling.greedy else 0
        return DraftSlot(sequence=self.sequence, pool=self.pool, room=room, forced=len(self.forced),
                         record=self.record)

    def emit(self, token: int, gap: float, stop_ids: set[int]) -> None:
        self.gaps.append(gap)
        if token in stop_ids:
            self.finish, self.done = "eos", True
            return
        self.continuation.append(token)
        self.sequence.append(token)
        self.done = len(self.continuation) >= self.request.max_new_tokens

    def advance(self, choices: list[int], gaps: list[float], start: int, stop_ids: set[int],
                run_record: DraftRecord) -> int:
        """Take the model's choice at `start` and one more per draft token it confirmed; return how many."""
        taken = accepted_length(self.draft, choices[start:])
        for offset in range(taken + 1):
            self.emit(choices[start + offset], gaps[start + offset], stop_ids)
            if self.done:
                break
        if self.draft:
            self.record.add(len(self.draft), taken)
            run_record.add(len(self.draft), taken)
        self.next_position += len(self.forced) + taken
        self.forced, self.draft = [choices[start + taken]], []
        return taken

    def result(self) -> GenerationResult:
        return GenerationResult(key=self.request.key, continuation_ids=self.continuation, finish_reason=self.finish,
                                top2_gaps=self.gaps, seconds=self.seconds)


class Batch:
    """The rows decoded together. Row i of the KV cache and of the attention mask belongs to `rows[i]`: admitting
    appends to all three, evicting removes from all three, and nothing else changes their order.

    Each row's cached columns are right-aligned to the batch's width; columns a row does not see are masked.
    """

    def __init__(self, model, pad_id: int, stop_ids: set[int], logit_bias: dict[int, float] | None = None):
        self.model = model
        self.config = model.config
        self.cache_keyword = kv_cache.cache_keyword(model)
        self.pad_id = pad_id
        self.stop_ids = stop_ids
        self.bias_ids = list(logit_bias or {})
        self.bias_values = torch.tensor([logit_bias[token] for token in self.bias_ids], device=self.device)
        self.rows: list[Row] = []
        self.cache = None
        self.mask: torch.Tensor | None = None

    def __len__(self) -> int:
        return len(self.rows)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype

    def admit(self, rows: list[Row]) -> None:
        """Append rows, each with its cached trunk prefix right-aligned to the current width (widened if need be)."""
        width = 0 if self.mask is None else self.mask.shape[1]
        needed = max(row.cached_length for row in rows)
        if self.mask is not None and needed > width:  # widen everyone on the left with masked columns
            kv_cache.pad_left(self.cache, needed - width)
            self.mask = torch.nn.functional.pad(self.mask, (needed - width, 0))
        width = max(width, needed)
        lengths = [row.cached_length for row in rows]
        layers = kv_cache.right_aligned([row.state for row in rows], lengths, width, self.config, self.dtype,
                                        self.device)
        new_mask = torch.zeros((len(rows), width), dtype=torch.long, device=self.device)
        for index, length in enumerate(lengths):
            if length:
                new_mask[index, width - length:] = 1
        for row in rows:
            row.state = None  # the batch cache holds it now
        if self.cache is None:
            self.cache, self.mask = kv_cache.from_layers(layers, self.config), new_mask
        else:
            kv_cache.append_rows(self.cache, layers)
            self.mask = torch.cat([self.mask, new_mask])
        self.rows += rows

    @torch.inference_mode()
    def step(self, drafter: Drafter, record: DraftRecord) -> list[Row]:
        """One forward pass: every row feeds its forced tokens and its draft and keeps what the model confirms.
        Returns the rows that finished, evicted from the batch."""
        started = time.perf_counter()
        for row, draft in zip(self.rows, drafter.propose([row.draft_slot() for row in self.rows], record)):
            row.draft = draft
        feeds = [row.forced + row.draft for row in self.rows]
        width = max(len(feed) for feed in feeds)
        first_needed = min(len(row.forced) for row in self.rows) - 1
        input_ids, step_mask = pad_right(feeds, self.pad_id, self.device)
        positions = torch.tensor([row.next_position for row in self.rows])[:, None] + torch.arange(width)
        old_width = self.mask.shape[1]
        self.mask = torch.cat([self.mask, step_mask], dim=1)
        output = self.model(input_ids=input_ids, attention_mask=self.mask, position_ids=positions.to(self.device),
                            use_cache=True, logits_to_keep=width - first_needed, **{self.cache_keyword: self.cache})
        self.cache = kv_cache.output_cache(output)
        logits = output.logits.float()  # column j is fed position first_needed + j
        if self.bias_ids:  # before every choice: greedy, sampled and draft verification alike
            logits[..., self.bias_ids] += self.bias_values
        top2 = logits.topk(2, dim=-1).values
        gaps = (top2[..., 0] - top2[..., 1]).tolist()
        choices = logits.argmax(dim=-1).tolist()
        for index, row in enumerate(self.rows):
            start = len(row.forced) - 1 - first_needed
            if not row.request.sampling.greedy:
                choices[index][start] = sample_token(logits[index, start], row.request.sampling, row.generator)
            fed, drafted = len(row.forced), len(row.draft)
            taken = row.advance(choices[index], gaps[index], start, self.stop_ids, record)
            if drafted:
                self.mask[index, old_width + fed + taken:] = 0  # rejected drafts stay in the cache, masked for good
        share = (time.perf_counter() - started) / len(self.rows)
        for row in self.rows:
            row.seconds += share
        return self.evict_finished()

    def evict_finished(self) -> list[Row]:
        done = [row for row in self.rows if row.done]
        if not done:
            return []
        keep = [index for index, row in enumerate(self.rows) if not row.done]
        self.rows = [self.rows[index] for index in keep]
        if not self.rows:
            self.cache = self.mask = None
            return done
        selector = torch.tensor(keep, device=self.device)
        kv_cache.select_rows(self.cache, selector)
        self.mask = self.mask[selector]
        seen = self.mask.any(dim=0).nonzero()  # columns left only by evicted rows are dropped
        unseen = int(seen[0]) if len(seen) else self.mask.shape[1]
        if unseen:
            kv_cache.drop_leading_columns(self.cache, unseen)
            self.mask = self.mask[:, unseen:]
        return done

    @torch.inference_mode()
    def relative_step_cost(self, extra: int, repeats: int = 3) -> float:
        """Time of a step feeding 1 + extra tokens per row against a one-token step, on this batch's own cache
        (all columns attended: only the shape matters). The best of `repeats` timings of each. A timed step
        extends the cache into new tensors, never in place, and the cache is put back after it, so no second
        cache of the batch's size is ever built beside it."""
        rows, width = self.mask.shape
        kept = kv_cache.layer_tensors(self.cache) if width else None

        def seconds(feed: int, times: int) -> float:
            best = float("inf")
            for _ in range(times):
                inputs = {"input_ids": torch.full((rows, feed), self.pad_id, device=self.device),
                          "attention_mask": torch.ones((rows, width + feed), dtype=torch.long, device=self.device),
                          "use_cache": True, "logits_to_keep": feed}
                if kept is not None:
                    inputs[self.cache_keyword] = self.cache
                _synchronize(self.device)
                started = time.perf_counter()
                self.model(**inputs)
                _synchronize(self.device)
                best = min(best, time.perf_counter() - started)
                if kept is not None:
                    kv_cache.restore(self.cache, kept)
            return best

        seconds(1, 1)  # warm-up
        return seconds(1 + extra, repeats) / seconds(1, repeats)


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class HFBackend:
    """Greedy or seeded-sampling generation on a local transformers model.

    Requests are grouped by trunk. Each trunk is prefilled once, up to the deepest point any of its requests
    branches at; each request then reuses the trunk's keys/values up to its own branch point and only feeds its
    own suffix. Decoding is continuous: a finished row leaves the batch and the next request takes its place, in
    the same forward pass as the others' next tokens. Greedy rows also feed drafts (`LookupDrafter` unless
    `draft_tokens=0` or another `drafter` is given) and keep those the model confirms: several tokens per row per
    forward pass when branches retrace each other, the output unchanged. `draft_cost` fixes the drafter's cost
    model; unset, it is measured on the first batch. `max_batch_tokens` bounds the KV cache (rows x columns):
    rows with long contexts are decoded fewer at a time rather than widening a batch of `batch_size` (None: no
    bound). `logit_bias` ({token id: bias}) is added to those tokens' logits at every step, as OpenAI's parameter
    of that name.
    """

    name = "hf"
    needs_weights = True
    identity = "hf"

    def __init__(self, handle, batch_size: int = 16, trunk_batch_size: int = 16, stop_ids: Iterable[int] | None = None,
                 draft_tokens: int = 8, draft_cost: float | None = None, drafter: Drafter | None = None,
                 max_batch_tokens: int | None = 8192, logit_bias: dict[int, float] | None = None):
        if handle is None or getattr(handle, "model", None) is None:
            raise TrajalignError("the hf backend needs a loaded model")
        self.model = handle.model
        self.config = getattr(self.model, "config", None)
        self.stop_ids = set(stop_ids if stop_ids is not None else handle.chat.end_of_turn_ids)
        self.pad_id = handle.tokenizer.pad_token_id or 0
        self.batch_size = batch_size
        self.trunk_batch_size = trunk_batch_size
        self.max_batch_tokens = max_batch_tokens
        self.logit_bias = {int(token): float(bias) for token, bias in (logit_bias or {}).items()}
        vocabulary = self.model.get_output_embeddings().weight.shape[0] if self.logit_bias else 0
        outside = sorted(token for token in self.logit_bias if not 0 <= token < vocabulary)
        if outside:
            raise InputError(f"logit_bias: token ids {outside} are outside the model's vocabulary of {vocabulary}")
        if self.logit_bias:  # what produced the tokens, for the answer caches
            self.identity = f"hf logit_bias {sorted(self.logit_bias.items())}"
        self.drafter = drafter or (LookupDrafter(draft_tokens, draft_cost) if draft_tokens else NoDrafter())
        if kv_cache.has_sliding_window_layers(self.config):
            raise TrajalignError("the hf backend's KV reuse does not support sliding-window attention layers")

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def generate(self, requests: list[GenerationRequest]) -> Iterator[list[GenerationResult]]:
        for request in requests:
            if not 0 <= request.branch <= len(request.trunk) or not request.context:
                raise TrajalignError(
                    f"request {request.key}: branch {request.branch} outside its trunk or empty context")
        groups: dict[tuple[int, ...], list[GenerationRequest]] = {}
        record = DraftRecord()  # what drafts earn across this call: the prior for rows without a record
        for request in requests:
            groups.setdefault(tuple(request.trunk), []).append(request)
        waiting = self._rows(groups)
        batch = Batch(self.model, self.pad_id, self.stop_ids, self.logit_bias)
        finished: list[Row] = []
        exhausted = calibrated = False
        held: Row | None = None  # the next row, waiting for room in the batch
        while True:
            admitted = []
            while not exhausted and len(batch) + len(admitted) < self.batch_size:
                row = held or next(waiting, None)
                held = None
                exhausted = row is None
                if row is None:
                    break
                if (len(batch) or admitted) and not self._fits(batch, admitted + [row]):
                    held = row
                    break
                admitted.append(row)
            if admitted:
                batch.admit(admitted)
            if not len(batch):
                break
            if not calibrated:
                self.drafter.calibrate(partial(self._relative_step_cost, batch))
                calibrated = True
            finished += batch.step(self.drafter, record)
            if len(finished) >= min(self.batch_size, 16):  # a wide batch still reports (and persists) as it goes
                yield [row.result() for row in finished]
                finished = []
        if finished:
            yield [row.result() for row in finished]

    def _relative_step_cost(self, batch: Batch, extra: int) -> float:
        """`Batch.relative_step_cost`, measured once per architecture and batch shape (rows, width to a power of
        two) in this process (`_STEP_COSTS`)."""
        rows, width = batch.mask.shape
        key = (_architecture(self.model), rows, width.bit_length(), extra)
        if key not in _STEP_COSTS:
            _STEP_COSTS[key] = batch.relative_step_cost(extra)
        return _STEP_COSTS[key]

    def _fits(self, batch: Batch, admitted: list[Row]) -> bool:
        """Whether the batch's KV cache, with these rows admitted, stays within `max_batch_tokens` columns over
        all rows as long as each row may still grow (its context and every token it may yet generate)."""
        if self.max_batch_tokens is None:
            return True
        width = batch.mask.shape[1] if batch.mask is not None else 0
        growth = max((row.request.max_new_tokens - len(row.continuation) for row in batch.rows), default=0)
        needed = max([width + growth] + [row.cached_length + len(row.forced) + row.request.max_new_tokens
                                         for row in admitted])
        return (len(batch) + len(admitted)) * needed <= self.max_batch_tokens

    def _rows(self, groups: dict[tuple[int, ...], list[GenerationRequest]]) -> Iterator[Row]:
        """Requests ready to decode, trunk chunk by trunk chunk, longest trunks first: a chunk is prefilled when
        its first row is due.

        Within a chunk the deepest branches go first: what they generate is then there, whole, for the shallower
        branches of the same trunk to draft from (their continuations retrace it whenever the model does).
        """
        by_length = sorted(groups.items(), key=lambda group: -max(map(_cached_length, group[1])))
        for trunk_chunk in batches(by_length, self.trunk_batch_size):  # similar lengths: little padding
            states = self._prefill_trunks(trunk_chunk)
            pools = [[list(trunk)] for trunk, _ in trunk_chunk]
            members = [(request, state, pool) for (_, requests), state, pool in zip(trunk_chunk, states, pools)
                       for request in requests]
            for request, state, pool in sorted(members, key=lambda member: -member[0].branch):
                cached = _cached_length(request)
                sequence = list(request.context)
                pool.append(sequence)
                generator = None if request.sampling.greedy else torch.Generator(
                    device=self.device).manual_seed(request.sampling.seed)
                yield Row(request=request, state=state, cached_length=cached, forced=request.context[cached:],
                          next_position=cached, sequence=sequence, pool=pool, generator=generator)

    @torch.inference_mode()
    def _prefill_trunks(self, trunk_chunk) -> list[kv_cache.LayerStates | None]:
        """Per trunk, per layer: (keys, values) of shape [heads, length, head_dim] up to the deepest branch."""
        lengths = [max(_cached_length(request) for request in members) for _, members in trunk_chunk]
        if max(lengths) == 0:
            return [None] * len(trunk_chunk)
        prefixes = [list(trunk[:length]) for (trunk, _), length in zip(trunk_chunk, lengths)]
        input_ids, attention_mask = pad_right(prefixes, self.pad_id, self.device)
        output = self.model(input_ids=input_ids, attention_mask=attention_mask, use_cache=True, logits_to_keep=1)
        return kv_cache.row_states(kv_cache.output_cache(output), lengths)
