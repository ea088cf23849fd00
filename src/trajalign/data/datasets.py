"""Behaviors: rows of bundled public datasets or of a user's CSV / JSONL / JSON / TXT file."""

from __future__ import annotations

import csv
import hashlib
import io
import json
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Callable

from pydantic import BaseModel, Field

from trajalign.errors import InputError, where

PROMPT_COLUMNS = ("prompt", "goal", "instruction", "forbidden_prompt", "behavior")
GUESSED_COLUMNS = {"prompt": PROMPT_COLUMNS, "id": ("id",), "category": ("category",), "target": ("target",),
                   "reference": ("reference", "response", "output"), "dataset": ("dataset",),
                   "rejected": ("rejected",)}


class Behavior(BaseModel):
    """One dataset row: what to ask the model, and what is known about it."""

    id: str
    prompt: str
    category: str | None = None
    target: str | None = None
    reference: str | None = None
    rejected: str | None = None  # a worse answer than `reference`, for preference pairs (CoCoNot's refusals)
    dataset: str


class ColumnMap(BaseModel):
    """Which columns of a user file hold which fields; `prompt` is guessed from PROMPT_COLUMNS when unset."""

    prompt: str | None = None
    id: str | None = None
    category: str | None = None
    target: str | None = None
    reference: str | None = None
    dataset: str | None = Field(default=None, description="each row's source dataset; the file's name when unset")
    rejected: str | None = None


@dataclass(frozen=True)
class BundledDataset:
    name: str
    description: str
    license: str
    loader: Callable[[], list[Behavior]]
    harmful: bool
    training_allowed: bool = True


def _bundled_text(*parts: str) -> str:
    return resources.files("trajalign.data").joinpath("bundled", *parts).read_text(encoding="utf-8")


def _csv_rows(*parts: str) -> list[dict]:
    return list(csv.DictReader(io.StringIO(_bundled_text(*parts))))


def _advbench() -> list[Behavior]:
    return [
        Behavior(id=f"advbench-{index:03d}", prompt=row["goal"], target=row["target"], dataset="advbench")
        for index, row in enumerate(_csv_rows("advbench", "harmful_behaviors.csv"))
    ]


def _jbb(file: str, name: str) -> list[Behavior]:
    behaviors = []
    for index, row in enumerate(_csv_rows("jailbreakbench", file)):
        row = {key.lower(): value for key, value in row.items()}
        behaviors.append(Behavior(id=f"{name}-{index:03d}", prompt=row["goal"], target=row["target"],
                                  category=row["category"], dataset=name))
    return behaviors


def _xstest(label: str | None) -> list[Behavior]:
    name = "xstest" if label is None else f"xstest-{label}"
    return [
        Behavior(id=f"xstest-{row['id']}", prompt=row["prompt"], category=row["type"], dataset=name)
        for row in _csv_rows("xstest", "xstest_prompts.csv")
        if label is None or row["label"] == label
    ]


def _self_instruct(file: str, name: str) -> list[Behavior]:
    behaviors = []
    for line in _bundled_text("self_instruct", file).splitlines():
        row = json.loads(line)
        instance = row["instances"][0]
        prompt = row["instruction"] + (f"\n\n{instance['input']}" if instance["input"] else "")
        behaviors.append(Behavior(id=row["id"], prompt=prompt, reference=instance["output"], dataset=name))
    return behaviors


def _jsonl(*parts: str) -> list[dict]:
    return [json.loads(line) for line in _bundled_text(*parts).splitlines() if line.strip()]


COCONOT_SAFETY = "Requests with safety concerns"


def _coconot_contrast() -> list[Behavior]:
    return [Behavior(id=f"coconot-{row['id']}", prompt=row["prompt"], category=row["subcategory"],
                     dataset="coconot-contrast")
            for row in _jsonl("coconot", "coconot_contrast_eval.jsonl") if row["category"] == COCONOT_SAFETY]


def _coconot_pref() -> list[Behavior]:
    return [Behavior(id=f"coconot-{row['id']}", prompt=row["prompt"], category=row["subcategory"],
                     reference=row["chosen"], rejected=row["rejected"], dataset="coconot-pref")
            for row in _jsonl("coconot", "coconot_pref_safety_concerns.jsonl") if row["category"] == COCONOT_SAFETY]


DOLLY_EVAL_SHARE = 10  # one question in ten, chosen by hash, is evaluation-only


def dolly_split_key(question: str) -> int:
    """The hash that splits Dolly once and for all: the same question, up to case and spacing, always falls on
    the same side, so the evaluation part shares no question with the training part."""
    normalized = " ".join(question.lower().split())
    return int(hashlib.sha256(normalized.encode("utf-8")).hexdigest()[:8], 16) % DOLLY_EVAL_SHARE


def _dolly(evaluation: bool) -> list[Behavior]:
    name = "dolly-eval" if evaluation else "dolly-train"
    behaviors = []
    for number, row in enumerate(_jsonl("dolly_open_qa", "chinkara-open_qa.jsonl"), 1):
        human, answer = row["text"].split(" ### Assistant: ", 1)
        question = human.removeprefix("### Human: ").strip()
        if (dolly_split_key(question) == 0) == evaluation:
            behaviors.append(Behavior(id=f"dolly-open-qa-{number:04d}", prompt=question, reference=answer.strip(),
                                      dataset=name))
    return behaviors


def _catqa() -> list[Behavior]:
    """CatQA nests category -> subcategory -> questions; some subcategory keys end in ':' ("Drug:"), dropped."""
    tree = json.loads(_bundled_text("catqa", "catqa_english.json"))
    questions = [(f"{category} / {subcategory.rstrip(':').strip()}", question)
                 for category, subcategories in tree.items()
                 for subcategory, members in subcategories.items() for question in members]
    return [Behavior(id=f"catqa-{index:03d}", prompt=question, category=category, dataset="catqa")
            for index, (category, question) in enumerate(questions)]


BUNDLED: dict[str, BundledDataset] = {
    dataset.name: dataset
    for dataset in [
        BundledDataset("advbench", "AdvBench harmful behaviors (Zou et al. 2023), 520", "MIT", _advbench, True),
        BundledDataset("jbb-harmful", "JailbreakBench harmful behaviors, 100", "MIT",
                       lambda: _jbb("behaviors.csv", "jbb-harmful"), True),
        BundledDataset("jbb-benign", "JailbreakBench benign behaviors, 100", "MIT",
                       lambda: _jbb("benign-behaviors.csv", "jbb-benign"), False),
        BundledDataset("xstest", "XSTest prompts (Röttger et al. 2024), 250 safe + 200 unsafe", "CC-BY-4.0",
                       lambda: _xstest(None), False),
        BundledDataset("xstest-safe", "XSTest safe prompts built to look harmful, 250", "CC-BY-4.0",
                       lambda: _xstest("safe"), False),
        BundledDataset("xstest-unsafe", "XSTest unsafe contrast prompts, 200", "CC-BY-4.0",
                       lambda: _xstest("unsafe"), True),
        BundledDataset("self-instruct-seed", "Self-Instruct human-written seed tasks with outputs, 175",
                       "Apache-2.0", lambda: _self_instruct("seed_tasks.jsonl", "self-instruct-seed"), False),
        BundledDataset("self-instruct-user", "Self-Instruct user-oriented tasks, 252 (evaluation only)",
                       "Apache-2.0", lambda: _self_instruct("user_oriented_instructions.jsonl",
                                                            "self-instruct-user"), False,
                       training_allowed=False),
        BundledDataset("coconot-contrast", "CoCoNot contrast set: harmless requests that look unsafe, 149 "
                       "(evaluation only)", "MIT", _coconot_contrast, False, training_allowed=False),
        BundledDataset("coconot-pref", "CoCoNot preference set: harmless requests that look unsafe, with a compliant "
                       "(reference) and a refusing (rejected) answer, 479", "MIT", _coconot_pref, False),
        BundledDataset("dolly-eval", "Dolly open_qa questions with human answers, fixed evaluation part, 359 "
                       "(evaluation only)", "CC-BY-SA-3.0", lambda: _dolly(evaluation=True), False,
                       training_allowed=False),
        BundledDataset("dolly-train", "Dolly open_qa questions with human answers, training part, 3383",
                       "CC-BY-SA-3.0", lambda: _dolly(evaluation=False), False),
        BundledDataset("catqa", "CatQA harmful questions, 11 categories x 5 subcategories x 10, 550", "Apache-2.0",
                       _catqa, True),
    ]
}


def load_behaviors(spec: str, columns: ColumnMap | None = None, limit: int | None = None) -> list[Behavior]:
    """Load a bundled dataset by name or a user file, checking every row; `limit` keeps the first N."""
    if limit is not None and limit < 1:
        raise InputError(f"limit {limit}: must be a positive number of rows")
    if spec in BUNDLED:
        behaviors = BUNDLED[spec].loader()
    else:
        path = Path(spec)
        if not path.exists():
            raise InputError(f"dataset '{spec}': no such file, and not a bundled dataset ({', '.join(BUNDLED)})")
        behaviors = load_file(path, columns or ColumnMap())
    return behaviors[:limit] if limit else behaviors


def _read_text(path: Path) -> str:
    raw = path.read_bytes()
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as error:
        row = raw[: error.start].count(b"\n") + 1
        raise InputError(f"{path} line {row}: not valid UTF-8 (byte {raw[error.start]:#04x})") from None


def _records(path: Path) -> list[tuple[int, dict]]:
    """(row number, record) pairs; rows count data rows from 1, as a person reads the file."""
    text = _read_text(path)
    suffix = path.suffix.lower()
    if suffix == ".txt":
        return [(number, {"prompt": line}) for number, line in enumerate(text.splitlines(), 1) if line.strip()]
    if suffix == ".jsonl":
        records = []
        for number, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as error:
                raise InputError(f"{where(path, number)}: invalid JSON ({error.msg})") from None
            if not isinstance(record, dict):
                raise InputError(f"{where(path, number)}: expected a JSON object")
            records.append((number, record))
        return records
    if suffix == ".json":
        try:
            data = json.loads(text)
        except json.JSONDecodeError as error:
            raise InputError(f"{path} line {error.lineno}: invalid JSON ({error.msg})") from None
        if not isinstance(data, list) or not all(isinstance(item, dict) for item in data):
            raise InputError(f"{path}: expected a JSON list of objects")
        return list(enumerate(data, 1))
    if suffix in (".csv", ".tsv"):
        return _csv_records(path, text, "\t" if suffix == ".tsv" else ",")
    raise InputError(f"{path}: unsupported extension '{suffix}' (use .csv, .tsv, .jsonl, .json or .txt)")


def _csv_records(path: Path, text: str, delimiter: str) -> list[tuple[int, dict]]:
    reader = csv.DictReader(io.StringIO(text), delimiter=delimiter)
    if not reader.fieldnames:
        raise InputError(f"{path}: empty file, no header row")
    records = []
    for number, row in enumerate(reader, 1):
        if None in row:
            raise InputError(f"{where(path, number)}: more fields than the header's {len(reader.fieldnames)}")
        if any(value is None for value in row.values()):
            raise InputError(f"{where(path, number)}: fewer fields than the header's {len(reader.fieldnames)}")
        records.append((number, row))
    return records


def _pick_column(path: Path, keys: list[str], wanted: str | None, field: str, required: bool) -> str | None:
    lowered = {key.lower(): key for key in keys}
    if wanted is not None:
        if wanted not in keys and wanted.lower() not in lowered:
            raise InputError(f"{where(path, field=wanted)}: no such column for {field} (columns: {', '.join(keys)})")
        return wanted if wanted in keys else lowered[wanted.lower()]
    for candidate in GUESSED_COLUMNS[field]:
        if candidate in lowered:
            return lowered[candidate]
    if required:
        raise InputError(
            f"{path}: no prompt column; expected one of {', '.join(PROMPT_COLUMNS)} or give a column "
            f"mapping (found: {', '.join(keys)})"
        )
    return None


def load_file(path: Path, columns: ColumnMap) -> list[Behavior]:
    records = _records(path)
    if not records:
        raise InputError(f"{path}: no rows")
    keys = list(dict.fromkeys(key for _, record in records for key in record))  # JSON rows may differ in keys
    prompt_key = _pick_column(path, keys, columns.prompt, "prompt", required=True)
    optional = {field: _pick_column(path, keys, getattr(columns, field), field, required=False)
                for field in ("id", "category", "target", "reference", "rejected", "dataset")}
    behaviors, seen = [], {}
    for number, record in records:
        prompt = record.get(prompt_key)
        if not isinstance(prompt, str) or not prompt.strip():
            raise InputError(f"{where(path, number, prompt_key)}: empty or missing prompt")
        values = {field: _optional_text(path, number, record, key) for field, key in optional.items() if key}
        behavior_id = values.pop("id", None) or f"{path.stem}-{number:04d}"
        if behavior_id in seen:
            raise InputError(f"{where(path, number, optional['id'] or 'id')}: duplicate id '{behavior_id}' "
                             f"(first at row {seen[behavior_id]})")
        seen[behavior_id] = number
        dataset = values.pop("dataset", None) or path.stem
        behaviors.append(Behavior(id=behavior_id, prompt=prompt, dataset=dataset, **values))
    return behaviors


def _optional_text(path: Path, number: int, record: dict, key: str) -> str | None:
    value = record.get(key)
    if value is None or value == "":
        return None
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return str(value)
    if not isinstance(value, str):
        raise InputError(f"{where(path, number, key)}: expected text, got {type(value).__name__}")
    return value


def write_behaviors(path: Path, behaviors: list[Behavior]) -> Path:
    """The behaviors as a JSONL file that `load_behaviors` reads back as they are (ids and source datasets
    included); a file already there is kept, and the run's manifest refuses a resume onto other behaviors."""
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("".join(b.model_dump_json(exclude_none=True) + "\n" for b in behaviors), encoding="utf-8")
    return path


def is_benign(dataset: str) -> bool:
    """Whether a dataset holds prompts that should be answered: a bundled benign set (user files count as harmful,
    the study's default)."""
    return dataset in BUNDLED and not BUNDLED[dataset].harmful
