import pytest
from pydantic import ValidationError

from trajalign import reproduce
from trajalign.attacks import Prefill, PrefillPosition
from trajalign.data.datasets import load_behaviors
from trajalign.errors import InputError
from trajalign.records import Episode
from trajalign.reproduce import (
    PRESETS,
    Reproduction,
    RoleTraining,
    benign_sets,
    split_behaviors,
    summary_markdown,
    validation_sets,
    without_advbench,
)
from trajalign.train.preference import PreferenceSettings
from trajalign.train.sources import AnchorSource, HarmfulSource, load_sources
from trajalign.train.trainer import LoraSettings


def test_split_is_by_behavior_and_fixed():
    for preset in PRESETS.values():
        train, test = split_behaviors(preset)
        assert not {b.id for b in train} & {b.id for b in test}
        assert len(train) == preset.train_behaviors and len(test) == preset.test_behaviors
        assert [b.id for b in split_behaviors(preset)[1]] == [b.id for b in test]


def test_over_refusal_prompts_are_never_trained_on():
    anchors, evaluation = benign_sets(PRESETS["full"])
    anchor_ids = {b.id for b in anchors}
    n = PRESETS["full"].over_refusal_prompts
    for behaviors in evaluation.values():
        assert not anchor_ids & {b.id for b in behaviors}
    assert len(evaluation["xstest-safe"]) == len(evaluation["coconot-contrast"]) == n
    assert len(evaluation["jbb-benign"]) + len(evaluation["self-instruct-user"]) == n
    assert all(b.dataset not in ("self-instruct-user", "coconot-contrast") for b in anchors)


def test_validation_split_shares_nothing_with_training_or_test():
    for preset in PRESETS.values():
        train, test = split_behaviors(preset)
        anchors, evaluation = benign_sets(preset)
        harmful, benign = validation_sets(preset)
        assert len(harmful) == 40 and not {b.id for b in harmful} & {b.id for b in train + test}
        held = {b.id for b in anchors} | {b.id for behaviors in evaluation.values() for b in behaviors}
        for behaviors in benign.values():
            assert behaviors and not held & {b.id for b in behaviors}


def test_summary_markdown_reports_every_model_and_interval():
    row = {"position": "depth=0", "depth": 0, "refusal_rate": 0.5, "refusal_ci95": (0.2, 0.8)}
    row |= {"refused": 2, "n": 4}
    rows = {"prefill": [row, {**row, "position": "depth=5", "depth": 5}],
            "insert": [{**row, "position": "after=8,len=10", "depth": None}],
            "benign-prefill": [{**row, "position": "depth=5", "depth": 5}],
            "benign-insert": [{**row, "position": "after=8,len=10", "depth": None}],
            "xstest-safe": [row], "jbb-benign": [row]}
    summary = {"preset": "quick", "continuation_tokens": 24, "results": {"original": rows, "shallow": rows},
               "probes": {}, "timings_s": {"trajectories": 3.0}, "total_s": 3.0}
    text = summary_markdown(summary)
    assert "within 24 continuation tokens" in text
    assert "| original |" in text and "| shallow |" in text and "50% [20%, 80%]" in text
    assert "recover @5" in text and "false break @5" in text and "JailbreakBench benign refused" in text


def depth_zero_episode(index: int, dataset: str, refused: bool, reset: bool = False) -> Episode:
    return Episode(episode_id=str(index), model="m", behavior_id=f"{dataset}-{index}", dataset=dataset, prompt="p",
                   attack=Prefill(depths=[0]), position=PrefillPosition(depth=0), depth=0, context_ids=[1],
                   answer_start=0, continuation_ids=[], continuation_text="", finish_reason="eos", exact_ids=True,
                   refused=refused, reset=reset)


def test_refusals_of_mixed_sources_are_split_by_source():
    from trajalign.runs import summarize

    episodes = ([depth_zero_episode(i, "jbb-benign", i < 3) for i in range(4)]
                + [depth_zero_episode(10 + i, "self-instruct-user", False) for i in range(4)])
    (row,) = summarize(episodes)
    assert row["refusal_rate"] == 3 / 8
    assert row["by_dataset"]["jbb-benign"]["refused"] == 3 and row["by_dataset"]["jbb-benign"]["n"] == 4
    assert row["by_dataset"]["self-instruct-user"]["refusal_rate"] == 0
    assert "by_dataset" not in summarize(episodes[:4])[0]


def test_each_aligned_model_trains_with_its_own_settings(tmp_path, monkeypatch):
    seen = {}
    monkeypatch.setattr(reproduce, "load_model", lambda spec: None)
    monkeypatch.setattr(reproduce, "run_training",
                        lambda config, **kwargs: seen.setdefault(config.out.name, (config, kwargs)))
    levers = dict(anchor_sources=[AnchorSource(name="self-instruct-seed", limit=3, answers="reference", weight=2)],
                  harmful_sources=[HarmfulSource.model_validate("jbb-harmful:4")],
                  benign_mix={"plain": 0.5, "prefix": 0.5}, kl_weight=0.3, preference=PreferenceSettings(beta=0.2))
    training = {"shallow": RoleTraining(epochs=2, benign_ratio=2.0),
                "trajectory": RoleTraining(epochs=3, benign_ratio=1.0, lora=LoraSettings(r=8), **levers)}
    run = Reproduction("full", tmp_path, preset=PRESETS["full"].model_copy(update={"training": training}))
    train, _ = split_behaviors(PRESETS["full"])
    anchors = load_behaviors("jbb-benign")[:2]
    for role, recipe in (("shallow", "refusal-sft"), ("trajectory", "trajectory")):
        run.train(role, train, anchors, {})
        config, inputs = seen[role]
        assert (config.epochs, config.recipe.benign_ratio) == (training[role].epochs, training[role].benign_ratio)
        assert config.recipe.name == recipe
        assert config.lora == training[role].lora
        assert config.recipe.benign_mix == training[role].benign_mix
        assert (config.kl_weight, config.preference) == (training[role].kl_weight, training[role].preference)
        assert config.benign == training[role].anchor_sources
    shallow, trajectory = seen["shallow"][1], seen["trajectory"][1]
    assert shallow["harmful"] == train and shallow["benign"] == anchors
    jbb_harmful = load_behaviors("jbb-harmful")[:4]
    kept = [b for b in jbb_harmful if b.prompt.lower().rstrip(".") not in
            {a.prompt.lower().rstrip(".") for a in load_behaviors("advbench")}]
    assert trajectory["harmful"][:len(train)] == train and trajectory["harmful"][len(train):] == kept
    assert trajectory["benign"] == anchors + load_behaviors("self-instruct-seed")[:3]


def test_extra_harmful_behaviors_never_repeat_an_advbench_goal():
    from trajalign.data.datasets import Behavior

    advbench = load_behaviors("advbench")[7]
    clash = Behavior(id="x-1", prompt=advbench.prompt.upper() + " ", dataset="x")
    other = Behavior(id="x-2", prompt="Describe a different harmful thing", dataset="x")
    assert without_advbench([clash, other]) == [other]


def test_extra_anchors_may_not_be_over_refusal_prompts(tmp_path, monkeypatch):
    monkeypatch.setattr(reproduce, "load_model", lambda spec: None)
    monkeypatch.setattr(reproduce, "run_training", lambda config, **kwargs: None)
    training = {"trajectory": RoleTraining(epochs=1, benign_ratio=1.0,
                                           anchor_sources=[AnchorSource(name="jbb-benign")])}
    run = Reproduction("quick", tmp_path, preset=PRESETS["quick"].model_copy(update={"training": training}))
    with pytest.raises(InputError, match="behavior 'jbb-benign-001': an over-refusal test or validation prompt"):
        run.train("trajectory", [], [], {})


def test_with_rounds_the_last_rounds_model_is_evaluated(tmp_path, monkeypatch):
    calls = []
    monkeypatch.setattr(reproduce, "load_model", lambda spec: None)
    monkeypatch.setattr(reproduce, "run_rounds", lambda config, attacks, **kwargs: calls.append((config, attacks)))
    training = {**PRESETS["quick"].training, "trajectory": RoleTraining(epochs=1, benign_ratio=1.0, rounds=3)}
    run = Reproduction("quick", tmp_path, preset=PRESETS["quick"].model_copy(update={"training": training}))
    run.train("trajectory", [], [], {})
    (config, attacks), = calls
    assert config.rounds == 3 and attacks.depths == [5, 10, 20, 40]
    assert (attacks.insert_after, attacks.insert_length) == (PRESETS["quick"].insert_after,
                                                             PRESETS["quick"].insert_length)
    assert run.model_spec("trajectory") == str(tmp_path / "models" / "trajectory" / "round-3")
    assert run.model_spec("shallow") == str(tmp_path / "models" / "shallow")


def test_each_evaluation_reruns_from_its_saved_config(cli, tmp_path, monkeypatch):
    from trajalign.data.datasets import load_behaviors
    from trajalign.runs import EpisodeLog
    from trajalign.testing import save_tiny_model

    directory = save_tiny_model(tmp_path / "model")
    monkeypatch.setattr(Reproduction, "model_spec", lambda self, role: str(directory))
    monkeypatch.chdir(tmp_path)
    behaviors = load_behaviors("jbb-benign", limit=2) + load_behaviors("self-instruct-user", limit=2)
    Reproduction("quick", tmp_path / "study")._eval("original", "everyday-benign", Prefill(depths=[0]), behaviors,
                                                    None)
    saved = tmp_path / "study" / "evals" / "original" / "everyday-benign"
    code, _, err = cli("eval", "--config", saved / "config.yaml", "--out", tmp_path / "rerun")
    assert code == 0, err

    def outcome(run):
        return {(e.behavior_id, e.dataset): (e.context_ids, e.continuation_ids) for e in EpisodeLog(run).load()}

    assert outcome(tmp_path / "rerun") == outcome(saved)
    assert {dataset for _, dataset in outcome(saved)} == {"jbb-benign", "self-instruct-user"}


def test_benign_controls_are_token_exact(tmp_path, monkeypatch):
    """Benign prefill: the context is exactly the prompt and the first k ids of the original model's own answer;
    benign insertion: a span of the next prompt's answer, its ids as they are, spliced into the model's own."""
    from trajalign.data.trajectories import Trajectory
    from trajalign.models.loading import load_model
    from trajalign.runs import EpisodeLog
    from trajalign.testing import save_tiny_model

    directory = save_tiny_model(tmp_path / "model")
    monkeypatch.setattr(Reproduction, "model_spec", lambda self, role: str(directory))
    preset = PRESETS["smoke"]
    run = Reproduction("smoke", tmp_path / "study", preset=preset)
    handle = load_model(str(directory))
    behaviors = load_behaviors("jbb-benign", limit=2) + load_behaviors("self-instruct-user", limit=2)
    answers = {b.id: Trajectory(behavior_id=b.id, source="s", token_ids=list(range(100 + i, 120 + i)))
               for i, b in enumerate(behaviors)}
    donors = behaviors[1:] + behaviors[:1]
    spans = {b.id: answers[donor.id].model_copy(update={"behavior_id": b.id}) for b, donor in zip(behaviors, donors)}
    rows = run.evaluate_benign_controls("original", behaviors, answers, spans)
    assert [row["depth"] for row in rows["benign-prefill"]] == [d for d in preset.depths if d > 0]
    prompts = {b.id: handle.chat.prompt_ids(b.prompt) for b in behaviors}
    swept = EpisodeLog(tmp_path / "study" / "evals" / "original" / "benign-prefill").load()
    assert len(swept) == len(behaviors) * 2
    for episode in swept:
        assert episode.context_ids == prompts[episode.behavior_id] + answers[episode.behavior_id].token_ids[
            :episode.depth]
    inserted = EpisodeLog(tmp_path / "study" / "evals" / "original" / "benign-insert").load()
    assert len(inserted) == len(behaviors)
    for episode in inserted:
        start = len(prompts[episode.behavior_id]) + preset.insert_after
        assert episode.context_ids[:len(prompts[episode.behavior_id])] == prompts[episode.behavior_id]
        assert episode.context_ids[start:start + preset.insert_length] == spans[episode.behavior_id].token_ids[
            :preset.insert_length]


def test_compare_preset_trains_every_comparator_on_the_same_behaviors_and_anchors(tmp_path, monkeypatch):
    from trajalign.reproduce import COMPARATORS

    seen = {}
    monkeypatch.setattr(reproduce, "load_model", lambda spec: None)
    monkeypatch.setattr(reproduce, "run_training",
                        lambda config, **kwargs: seen.setdefault(config.out.name, (config, kwargs)))
    run = Reproduction("compare", tmp_path)
    assert run.roles == ("original", "shallow", "trajectory", *COMPARATORS)
    train, _ = split_behaviors(run.preset)
    anchors = load_behaviors("jbb-benign")[:2]
    for role in run.roles[1:]:
        run.train(role, train, anchors, {})
    assert {role: config.recipe.name for role, (config, _) in seen.items()} == {
        "shallow": "refusal-sft", "trajectory": "trajectory", **{name: name for name in COMPARATORS}}
    harmful = train + load_behaviors("catqa")[:100]
    benign = anchors + load_behaviors("coconot-pref")[:200] + load_behaviors("dolly-train")[:200]
    assert all(inputs["harmful"] == harmful and inputs["benign"] == benign for _, inputs in seen.values())


@pytest.mark.parametrize("preset", ["full", "compare"])
def test_benign_fine_tuning_attack_trains_on_dolly_rows_that_no_model_has_as_anchors(preset, tmp_path):
    run = Reproduction(preset, tmp_path)
    anchored = {anchor.id for training in run.preset.training.values()
                for anchor in load_sources(training.anchor_sources)}
    assert any(anchor.startswith("dolly") for anchor in anchored)  # else the test checks nothing
    rows = run.benign_sft_behaviors()
    assert len(rows) == 160 and all(row.dataset == "dolly-train" and row.reference for row in rows)
    assert not anchored & {row.id for row in rows}


def test_a_roles_recipe_options_reach_its_recipe_and_bad_ones_fail_before_any_training(tmp_path, monkeypatch):
    seen = {}
    monkeypatch.setattr(reproduce, "load_model", lambda spec: None)
    monkeypatch.setattr(reproduce, "run_training", lambda config, **kwargs: seen.setdefault("config", config))
    training = RoleTraining(recipe="circuit-breaker", epochs=1, benign_ratio=1.0,
                            recipe_options={"rerouting": {"alpha": 5.0}})
    preset = PRESETS["smoke"].model_copy(update={"training": {"circuit-breaker": training}})
    train, _ = split_behaviors(preset)
    Reproduction("smoke", tmp_path, preset=preset).train("circuit-breaker", train, load_behaviors("jbb-benign")[:2],
                                                          {})
    recipe = seen["config"].recipe
    assert (recipe.name, recipe.rerouting.alpha, recipe.benign_ratio) == ("circuit-breaker", 5.0, 1.0)
    with pytest.raises(ValidationError, match="alpah"):
        RoleTraining(recipe="circuit-breaker", epochs=1, benign_ratio=1.0, recipe_options={"rerouting": {"alpah": 5}})
    with pytest.raises(ValidationError, match="benign_ratio"):
        RoleTraining(epochs=1, benign_ratio=1.0, recipe_options={"benign_ratio": 2.0})


@pytest.mark.integration
def test_the_compare_presets_target_prefill_depths_each_reach_most_test_behaviors(embedded):
    """AdvBench's targets are short: a depth that few of them reach would score a cell on a handful of behaviors
    (the full preset's depth 20 reaches 8 of its 40)."""
    from trajalign.attacks.held_out import held_out_attacks
    from trajalign.data.trajectories import load_trajectories

    preset = PRESETS["compare"]
    _, test = split_behaviors(preset)
    lengths = [len(t.token_ids) for t in load_trajectories("target", test, embedded).values()]
    for depth in held_out_attacks(preset.held_out)["prefill-target"].attack.depths:
        assert sum(length >= depth for length in lengths) >= len(test) / 2, depth


def test_a_backtracking_models_resets_are_counted_per_evaluation_and_reported(tmp_path):
    from trajalign.runs import EpisodeLog

    def episode(index: int, reset: bool) -> Episode:
        return depth_zero_episode(index, "xstest-safe", refused=reset, reset=reset)

    evals = tmp_path / "evals" / "backtracking"
    EpisodeLog(evals / "xstest-safe").append([episode(i, i < 1) for i in range(4)])
    EpisodeLog(evals / "held-out" / "random-insert").append([episode(i, i < 3) for i in range(5)])
    training = {"backtracking": RoleTraining(recipe="backtracking", epochs=1, benign_ratio=1.0)}
    run = Reproduction("smoke", tmp_path, preset=PRESETS["smoke"].model_copy(update={"training": training}))
    counts = run.reset_counts("backtracking")
    assert counts == {"held-out/random-insert": {"n": 5, "resets": 3}, "xstest-safe": {"n": 4, "resets": 1}}
    text = summary_markdown({"preset": "smoke", "continuation_tokens": 12, "results": {}, "probes": {},
                             "resets": {"backtracking": counts},
                             "timings_s": {}, "total_s": 0.0})
    assert "| xstest-safe | 25% [5%, 70%] (1/4) |" in text and "| held-out/random-insert | 60% " in text
