import json

import pytest

from trajalign.data.datasets import BUNDLED, ColumnMap, load_behaviors
from trajalign.errors import InputError

EXPECTED_ROWS = {"advbench": 520, "jbb-harmful": 100, "jbb-benign": 100, "xstest": 450, "xstest-safe": 250,
                 "xstest-unsafe": 200, "self-instruct-seed": 175, "self-instruct-user": 252}


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
