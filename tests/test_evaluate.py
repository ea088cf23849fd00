import json

import pytest

from trajalign.attacks import Decoding, Insert, MultiInsert, Prefill, ReinjectHeader
from trajalign.data.datasets import load_behaviors
from trajalign.data.trajectories import load_trajectories
from trajalign.errors import InputError
from trajalign.evaluate import EvalConfig, Evaluation
from trajalign.runs import EpisodeLog


def run(tiny, tmp_path, attack, name="run", **fields):
    config = EvalConfig(model="tiny", dataset="advbench", limit=3, trajectories="target", attack=attack,
                        max_new_tokens=6, batch_size=4, out=tmp_path / name, **fields)
    return config, Evaluation(config, handle=tiny).run()


def episodes(config):
    return EpisodeLog(config.out).load()


def trajectories(tiny):
    return load_trajectories("target", load_behaviors("advbench", limit=3), tiny)


def test_prefill_contexts_are_prompt_plus_trajectory_prefix(tiny, tmp_path):
    config, summary = run(tiny, tmp_path, Prefill(depths=[0, 2, 5]))
    traj = trajectories(tiny)
    assert [row["position"] for row in summary["rows"]] == ["depth=0", "depth=2", "depth=5"]
    for episode in episodes(config):
        prompt = tiny.chat.prompt_ids(episode.prompt)
        assert episode.context_ids == prompt + traj[episode.behavior_id].token_ids[: episode.depth]
        assert episode.answer_start == len(prompt)


def test_defense_reinjects_header_after_the_injection(tiny, tmp_path):
    config, _ = run(tiny, tmp_path, Prefill(depths=[3]), defense=ReinjectHeader())
    header = tiny.chat.header_ids
    for episode in episodes(config):
        assert episode.context_ids[-len(header):] == header
        assert episode.defense == "reinject-header"


def test_insert_context_is_own_tokens_then_span(tiny, tmp_path):
    config, _ = run(tiny, tmp_path, Insert(after=[2, 4], span_lengths=[3]))
    traj = trajectories(tiny)
    for episode in episodes(config):
        prompt = tiny.chat.prompt_ids(episode.prompt)
        start, end = episode.injected_spans[0]
        assert episode.context_ids[start:end] == traj[episode.behavior_id].token_ids[:3]
        assert episode.context_ids[:len(prompt)] == prompt and end == len(episode.context_ids)
        assert start - len(prompt) == episode.position.after and episode.position.length == 3


def test_insert_of_given_text(tiny, tmp_path):
    config, _ = run(tiny, tmp_path, Insert(after=[1], span_text="Sure, here is"))
    span = tiny.chat.encode_span("Sure, here is")
    assert all(e.context_ids[e.injected_spans[0][0]:] == span for e in episodes(config))


def test_multi_insert_places_every_span(tiny, tmp_path):
    config, summary = run(tiny, tmp_path, MultiInsert(after=[2, 4], span_length=2))
    traj = trajectories(tiny)
    for episode in episodes(config):
        chunks = [episode.context_ids[a:b] for a, b in episode.injected_spans]
        assert chunks == [traj[episode.behavior_id].token_ids[0:2], traj[episode.behavior_id].token_ids[2:4]]
    assert summary["rows"][0]["n"] == 3


def test_decoding_sweep_is_reproducible(tiny, tmp_path):
    attack = Decoding(temperatures=[1.0], top_ps=[0.9], top_ks=[0, 5], samples=2)
    first, summary = run(tiny, tmp_path, attack, name="a")
    second, _ = run(tiny, tmp_path, attack, name="b")
    assert [row["n"] for row in summary["rows"]] == [6, 6]
    continuations = lambda config: {e.episode_id: e.continuation_ids for e in episodes(config)}  # noqa: E731
    assert continuations(first) == continuations(second)
    assert len({tuple(c) for c in continuations(first).values()}) > 1


def test_decoding_draws_do_not_depend_on_the_model_spec(tiny, tmp_path):
    """Common random numbers: the same weights under two specs (two run directories) draw the same tokens."""
    attack = Decoding(temperatures=[1.5], top_ps=[1.0], top_ks=[0], samples=2)
    outcomes = []
    for spec in ("models/a", "elsewhere/models/a"):
        config = EvalConfig(model=spec, dataset="advbench", limit=3, attack=attack, max_new_tokens=6, batch_size=4,
                            out=tmp_path / spec.replace("/", "-"))
        Evaluation(config, handle=tiny).run()
        outcomes.append({(e.behavior_id, e.position.label, e.sample): e.continuation_ids for e in episodes(config)})
    assert outcomes[0] == outcomes[1] and len(outcomes[0]) == 6


def test_killed_run_resumes_without_loss_or_duplicates(tiny, tmp_path, monkeypatch):
    attack = Prefill(depths=[0, 1, 3, 6])
    full_config, full_summary = run(tiny, tmp_path, attack, name="full")
    from trajalign.backends.hf import HFBackend

    original = HFBackend.generate

    def dying_generate(self, requests):
        yield next(original(self, requests))
        raise KeyboardInterrupt  # the process dies after one batch was written

    monkeypatch.setattr(HFBackend, "generate", dying_generate)
    with pytest.raises(KeyboardInterrupt):
        run(tiny, tmp_path, attack, name="killed")
    log_path = tmp_path / "killed" / "episodes.jsonl"
    written = log_path.read_text().splitlines()
    assert 0 < len(written) < 12
    with open(log_path, "a") as handle:  # a kill in the middle of a line leaves half a record
        handle.write(written[0][:40])
    monkeypatch.setattr(HFBackend, "generate", original)
    config, summary = run(tiny, tmp_path, attack, name="killed")
    ids = [e.episode_id for e in episodes(config)]
    assert len(ids) == len(set(ids)) == 12
    assert summary == full_summary
    assert {e.episode_id: e.continuation_ids for e in episodes(config)} == \
        {e.episode_id: e.continuation_ids for e in episodes(full_config)}


def test_other_config_in_run_directory_is_refused(tiny, tmp_path):
    run(tiny, tmp_path, Prefill(depths=[0]))
    with pytest.raises(InputError, match="differs in: attack"):
        run(tiny, tmp_path, Prefill(depths=[0, 1]))


def test_depth_beyond_every_trajectory(tiny, tmp_path):
    with pytest.raises(InputError, match="depth 500: beyond every trajectory"):
        run(tiny, tmp_path, Prefill(depths=[0, 500]))


def test_summary_has_wilson_intervals(tiny, tmp_path):
    config, summary = run(tiny, tmp_path, Prefill(depths=[0]))
    row = summary["rows"][0]
    low, high = row["refusal_ci95"]
    assert 0 <= low <= row["refusal_rate"] <= high <= 1
    assert json.loads((config.out / "summary.json").read_text()) == json.loads(json.dumps(summary))


def test_cli_eval_from_yaml_config(cli, tmp_path):
    from trajalign.testing import save_tiny_model

    save_tiny_model(tmp_path / "m")
    config = tmp_path / "eval.yaml"
    config.write_text(f"model: {tmp_path / 'm'}\ndataset: advbench\nlimit: 2\ntrajectories: target\n"
                      f"attack: {{kind: prefill, depths: [0, 2]}}\nmax_new_tokens: 4\nout: {tmp_path / 'run'}\n")
    code, out, err = cli("eval", "--config", config)
    assert code == 0, err
    assert "depth=2" in out and (tmp_path / "run" / "summary.json").exists()
    config.write_text("model: x\nunknown_key: 1\n")
    code, _, err = cli("eval", "--config", config)
    assert code == 2 and "field 'unknown_key'" in err


def test_resume_onto_other_behaviors_or_trajectories_is_refused(tiny, tmp_path):
    behaviors = load_behaviors("advbench", limit=3)
    traj = trajectories(tiny)
    config = EvalConfig(model="tiny", dataset="advbench", limit=3, trajectories="target", attack=Prefill(depths=[1]),
                        max_new_tokens=2, out=tmp_path / "run")
    Evaluation(config, handle=tiny, behaviors=behaviors, trajectories=traj).run()
    Evaluation(config, handle=tiny, behaviors=behaviors, trajectories=traj).run()  # the same: resumes
    with pytest.raises(InputError, match="ran on other behaviors"):
        Evaluation(config, handle=tiny, behaviors=behaviors[:2], trajectories=traj).run()
    shifted = {key: value.model_copy(update={"token_ids": value.token_ids[1:]}) for key, value in traj.items()}
    with pytest.raises(InputError, match="ran on other trajectories"):
        Evaluation(config, handle=tiny, behaviors=behaviors, trajectories=shifted).run()
    assert len(episodes(config)) == 3


def test_records_say_what_ran(tiny, tmp_path):
    config, _ = run(tiny, tmp_path, Insert(after=[2], span_lengths=[3]))
    for episode in episodes(config):
        assert episode.exact_ids and episode.attack == config.attack and episode.attack_kind == "insert"
        assert episode.refused == episode.verdicts["keyword"].refused_continuation
    manifest = json.loads((config.out / "manifest.json").read_text())
    assert manifest["behavior_ids"] == [b.id for b in load_behaviors("advbench", limit=3)]
    assert len(manifest["trajectories_sha256"]) == 64


def test_benign_insertion_control_splices_in_another_answer(tiny, tmp_path):
    """Benign control: after j own tokens, a span of ANOTHER prompt's answer (the original model's) goes in."""
    from trajalign.data.trajectories import generate_answers

    behaviors = load_behaviors("jbb-benign", limit=3)
    config = EvalConfig(model="tiny", dataset="jbb-benign", limit=3, trajectories=f"another:model:{tiny.spec}",
                        attack=Insert(after=[2], span_lengths=[4]), max_new_tokens=6, batch_size=4,
                        out=tmp_path / "control")
    Evaluation(config, handle=tiny).run()
    answers = generate_answers(tiny, behaviors, config.trajectory_tokens)
    donors = {b.id: d.id for b, d in zip(behaviors, behaviors[1:] + behaviors[:1])}
    for episode in episodes(config):
        prompt = tiny.chat.prompt_ids(episode.prompt)
        start, end = episode.injected_spans[0]
        assert episode.context_ids[:start] == prompt + answers[episode.behavior_id][:2]
        assert episode.context_ids[start:end] == answers[donors[episode.behavior_id]][:4]
