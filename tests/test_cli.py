"""The command line: options merge deeply into a YAML config, the same way for every command."""

from fake_openai_server import FakeCompletionsServer

from trajalign.cli import command_config, given, merge_deep
from trajalign.evaluate import EvalConfig
from trajalign.runs import EpisodeLog
from trajalign.train.trainer import TrainConfig


def test_merge_is_deep_but_another_kind_replaces():
    base = {"backend_options": {"served_model": "m", "concurrency": 2}, "attack": {"kind": "insert", "after": [4]}}
    merged = merge_deep(base, {"backend_options": {"base_url": "http://x/v1"}, "attack": {"span_lengths": [3]}})
    assert merged["backend_options"] == {"served_model": "m", "concurrency": 2, "base_url": "http://x/v1"}
    assert merged["attack"] == {"kind": "insert", "after": [4], "span_lengths": [3]}
    assert merge_deep(base, {"attack": {"kind": "prefill", "depths": [1]}})["attack"] == {"kind": "prefill",
                                                                                          "depths": [1]}


def test_only_given_options_count():
    assert given({"a": None, "b": 0, "c": {"d": None}, "e": {}, "f": {"g": 1, "h": None}}) == \
        {"b": 0, "e": {}, "f": {"g": 1}}


def test_yaml_keeps_what_the_command_line_does_not_name(tmp_path):
    path = tmp_path / "train.yaml"
    path.write_text("recipe: {name: rto, benign_ratio: 2.0}\nlora: {r: 8}\nepochs: 3\n")
    config = command_config(TrainConfig, path, {"recipe": {"name": "trajectory"}, "lora": {}, "epochs": None})
    assert (config.recipe.name, config.recipe.benign_ratio, config.lora.r, config.epochs) == ("trajectory", 2.0, 8, 3)
    attack_only = command_config(EvalConfig, None, {"attack": {"depths": [0, 2]}}, {"attack": {"kind": "prefill"}})
    assert attack_only.attack.depths == [0, 2]


def test_base_url_on_the_command_line_keeps_served_model_from_the_file(cli, tmp_path, tiny):
    from trajalign.testing import save_tiny_model

    directory = save_tiny_model(tmp_path / "m")
    config = tmp_path / "eval.yaml"
    config.write_text(f"model: {directory}\ndataset: advbench\nlimit: 2\ntrajectories: target\nmax_new_tokens: 3\n"
                      f"attack: {{kind: prefill, depths: [0, 1]}}\nbackend: openai\n"
                      f"backend_options: {{served_model: served-name}}\nout: {tmp_path / 'run'}\n")
    with FakeCompletionsServer(tiny) as server:
        code, out, err = cli("eval", "--config", config, "--base-url", server.base_url)
        models = {body["model"] for body in server.requests}
    assert code == 0, err
    assert models == {"served-name"} and len(EpisodeLog(tmp_path / "run").load()) == 4
