import hashlib
import json

import pytest

from trajalign.data.datasets import BUNDLED, ColumnMap, dolly_split_key, load_behaviors
from trajalign.errors import InputError

EXPECTED_ROWS = {"advbench": 520, "jbb-harmful": 100, "jbb-benign": 100, "xstest": 450, "xstest-safe": 250,
                 "xstest-unsafe": 200, "self-instruct-seed": 175, "self-instruct-user": 252,
                 "coconot-contrast": 149, "coconot-pref": 479, "dolly-eval": 359, "dolly-train": 3383, "catqa": 550}
DOLLY_EVAL_IDS_SHA256 = "bd534c4277265810"  # of the evaluation part's ids, comma-joined, when the split was made


@pytest.mark.parametrize("name", sorted(EXPECTED_ROWS))
def test_bundled_datasets_load_completely(name):
    behaviors = load_behaviors(name)
    assert len(behaviors) == EXPECTED_ROWS[name]
    assert len({b.id for b in behaviors}) == len(behaviors)
    assert all(b.prompt.strip() for b in behaviors)


def test_bundled_fields():
    assert load_behaviors("advbench")[0].target.startswith("Sure, here is")
    assert load_behaviors("jbb-benign")[0].category
    assert load_behaviors("self-instruct-seed")[0].reference
    assert not BUNDLED["self-instruct-user"].training_allowed


def test_evaluation_and_training_parts_share_no_question():
    def questions(name):
        return {" ".join(b.prompt.lower().split()) for b in load_behaviors(name)}

    assert not questions("dolly-eval") & questions("dolly-train")
    assert not questions("coconot-contrast") & questions("coconot-pref")
    assert not {b.id for b in load_behaviors("dolly-eval")} & {b.id for b in load_behaviors("dolly-train")}
    assert len(load_behaviors("dolly-eval")) + len(load_behaviors("dolly-train")) == 3742  # every row, once


def test_dolly_split_is_fixed():
    """The split is part of the data: a change to its rule would silently move questions into training."""
    ids = ",".join(b.id for b in load_behaviors("dolly-eval"))
    assert hashlib.sha256(ids.encode()).hexdigest()[:16] == DOLLY_EVAL_IDS_SHA256
    assert dolly_split_key("Why is  the sky BLUE?") == dolly_split_key("why is the sky blue?")


def test_new_datasets_fields_and_training_flags():
    assert {name for name, dataset in BUNDLED.items() if not dataset.training_allowed} >= {
        "coconot-contrast", "dolly-eval", "self-instruct-user"}
    assert BUNDLED["coconot-pref"].training_allowed and BUNDLED["dolly-train"].training_allowed
    assert BUNDLED["catqa"].harmful and not BUNDLED["coconot-contrast"].harmful
    contrast = load_behaviors("coconot-contrast")
    assert {b.category for b in contrast} == {"dangerous or sensitive topics", "privacy violations"}
    pref = load_behaviors("coconot-pref")
    assert all(b.reference and b.rejected and b.reference != b.rejected for b in pref)
    assert {b.category for b in pref} == {"triggers for offensive language", "dangerous or sensitive topics",
                                         "privacy violations", "false information"}
    assert all(b.reference for b in load_behaviors("dolly-eval") + load_behaviors("dolly-train"))
    catqa = load_behaviors("catqa")
    assert catqa[0].category == "Illegal Activity / Drug"
    assert len({b.category for b in catqa}) == 55 and not any(b.category.endswith(":") for b in catqa)


def test_cli_lists_and_shows_new_datasets(cli):
    code, out, _ = cli("datasets", "list")
    assert code == 0
    for name in ("coconot-contrast", "coconot-pref", "dolly-eval", "dolly-train", "catqa"):
        assert name in out
    code, out, _ = cli("datasets", "show", "coconot-pref", "--limit", "1")
    assert code == 0 and '"rejected"' in out and '"reference"' in out


def test_rejected_column_of_a_user_file(tmp_path):
    path = tmp_path / "pairs.jsonl"
    path.write_text(json.dumps({"prompt": "P", "chosen": "good", "rejected": "bad"}) + "\n")
    behavior = load_behaviors(str(path), ColumnMap(reference="chosen"))[0]
    assert (behavior.reference, behavior.rejected) == ("good", "bad")


def test_limit_keeps_first_rows():
    assert [b.id for b in load_behaviors("advbench", limit=3)] == ["advbench-000", "advbench-001", "advbench-002"]


@pytest.mark.parametrize("limit", [0, -4])
def test_bad_limit(limit):
    with pytest.raises(InputError, match="limit"):
        load_behaviors("advbench", limit=limit)


def test_user_files_in_every_format(tmp_path):
    (tmp_path / "a.csv").write_text("goal,target\nDo X,Sure X\nDo Y,Sure Y\n")
    (tmp_path / "b.jsonl").write_text(json.dumps({"prompt": "P1", "id": "x1"}) + "\n\n" +
                                      json.dumps({"prompt": "P2", "id": "x2"}) + "\n")
    (tmp_path / "c.json").write_text(json.dumps([{"instruction": "I1"}]))
    (tmp_path / "d.txt").write_text("first prompt\n\nsecond prompt\n")
    (tmp_path / "e.csv").write_text("text,answer\nHello,World\n")
    assert [b.target for b in load_behaviors(str(tmp_path / "a.csv"))] == ["Sure X", "Sure Y"]
    assert [b.id for b in load_behaviors(str(tmp_path / "b.jsonl"))] == ["x1", "x2"]
    assert load_behaviors(str(tmp_path / "c.json"))[0].prompt == "I1"
    assert [b.prompt for b in load_behaviors(str(tmp_path / "d.txt"))] == ["first prompt", "second prompt"]
    mapped = load_behaviors(str(tmp_path / "e.csv"), ColumnMap(prompt="text", reference="answer"))
    assert (mapped[0].prompt, mapped[0].reference) == ("Hello", "World")


BAD_FILES = [
    ("missing.csv", None, "no such file"),
    ("nocol.csv", b"text,other\nhello,world\n", "no prompt column"),
    ("empty_prompt.csv", b"prompt\nok\n  \n", "row 2 field 'prompt': empty"),
    ("ragged.csv", b"prompt,target\na,b\nc,d,e\n", "row 2: more fields"),
    ("short.csv", b"prompt,target\na,b\nc\n", "row 2: fewer fields"),
    ("latin1.csv", b"prompt\ncaf\xe9\n", "line 2: not valid UTF-8"),
    ("dup.jsonl", b'{"prompt": "a", "id": "1"}\n{"prompt": "b", "id": "1"}\n', "row 2 field 'id': duplicate id"),
    ("badjson.jsonl", b'{"prompt": "a"}\n{"prompt": \n', "row 2: invalid JSON"),
    ("header_only.csv", b"prompt\n", "no rows"),
    ("empty.csv", b"", "empty file"),
    ("notlist.json", b'{"prompt": "a"}', "expected a JSON list"),
    ("wrongtype.jsonl", b'{"prompt": "a", "target": ["x"]}\n', "row 1 field 'target': expected text"),
    ("data.xlsx", b"binary", "unsupported extension"),
]


@pytest.mark.parametrize("name,content,message", BAD_FILES, ids=[case[0] for case in BAD_FILES])
def test_bad_files_name_file_row_and_field(tmp_path, name, content, message):
    path = tmp_path / name
    if content is not None:
        path.write_bytes(content)
    with pytest.raises(InputError) as error:
        load_behaviors(str(path))
    assert message in str(error.value)
    assert "\n" not in str(error.value)
    if content is not None:
        assert name in str(error.value)


def test_behaviors_written_as_jsonl_read_back_as_they_were(tmp_path):
    behaviors = load_behaviors("jbb-benign", limit=2) + load_behaviors("self-instruct-user", limit=2)
    path = tmp_path / "behaviors.jsonl"
    path.write_text("".join(b.model_dump_json(exclude_none=True) + "\n" for b in behaviors))
    assert load_behaviors(str(path)) == behaviors  # ids, source datasets, targets and references included
    (tmp_path / "plain.csv").write_text("prompt\nhello\n")
    assert load_behaviors(str(tmp_path / "plain.csv"))[0].dataset == "plain"  # without a column: the file's name


def test_missing_mapped_column(tmp_path):
    path = tmp_path / "x.csv"
    path.write_text("prompt\na\n")
    with pytest.raises(InputError, match="field 'response': no such column"):
        load_behaviors(str(path), ColumnMap(reference="response"))


def test_cli_bad_dataset_exits_2(cli, tmp_path):
    path = tmp_path / "bad.csv"
    path.write_text("prompt,target\na,b\nc,d,e\n")
    code, out, err = cli("datasets", "show", str(path))
    assert code == 2
    assert err.strip().startswith("error:") and "bad.csv row 2" in err and len(err.strip().splitlines()) == 1
