"""Held-out attacks: random insertion, sampled trajectories, the adaptive search and abliteration at inference."""

from contextlib import contextmanager

import pytest
import torch

from trajalign.attacks import Adaptive, Prefill, RandomInsert, ReinjectHeader
from trajalign.data.datasets import load_behaviors
from trajalign.data.trajectories import generate_answers, load_trajectories
from trajalign.errors import InputError
from trajalign.evaluate import AblationConfig, EvalConfig, Evaluation
from trajalign.probe import hooks
from trajalign.probe.direction import RefusalDirection, refusal_opening_ids
from trajalign.records import Episode
from trajalign.runs import EpisodeLog

BEHAVIORS = 3


def evaluate(tiny, out, attack, **fields):
    fields = {"trajectories": "target", **fields}
    config = EvalConfig(model="tiny", dataset="advbench", limit=BEHAVIORS, attack=attack, max_new_tokens=6,
                        batch_size=4, out=out, **fields)
    Evaluation(config, handle=tiny).run()
    return EpisodeLog(out).load()


def target_trajectories(tiny):
    return {b.id: t.token_ids for b, t in zip(load_behaviors("advbench", limit=BEHAVIORS),
                                               load_trajectories("target", load_behaviors("advbench",
                                                                                          limit=BEHAVIORS),
                                                                 tiny).values())}


def own_answers(tiny, length: int) -> dict[str, list[int]]:
    return generate_answers(tiny, load_behaviors("advbench", limit=BEHAVIORS), length)


@pytest.mark.parametrize("defense", [None, ReinjectHeader()], ids=["plain", "defended"])
def test_random_insert_places_the_seeded_spans_at_the_recorded_positions(tiny, tmp_path, defense):
    attack = RandomInsert(insertions=2, samples=3, span_lengths=(2, 5), own_tokens=8, seed=7)
    episodes = evaluate(tiny, tmp_path / "run", attack, defense=defense)
    trajectories, own = target_trajectories(tiny), own_answers(tiny, 8)
    defense_ids = list(tiny.chat.header_ids) if defense else []
    assert len(episodes) == BEHAVIORS * 3
    for episode in episodes:
        trajectory, answer = trajectories[episode.behavior_id], own[episode.behavior_id]
        after, windows = attack.draw(episode.behavior_id, episode.sample, len(answer), len(trajectory))
        assert (episode.position.after, episode.position.windows) == (after, windows)
        expected, written = tiny.chat.prompt_ids(episode.prompt), 0
        for point, (start, end) in zip(after, windows):
            expected += answer[written:point] + trajectory[start:end] + defense_ids
            written = point
        assert episode.context_ids == expected
        assert [episode.context_ids[a:b] for a, b in episode.injected_spans] == \
            [trajectory[start:end] for start, end in windows]
        assert all(2 <= end - start <= 5 for start, end in windows) and list(after) == sorted(after)
        assert episode.trajectory_source == "target"
    assert len({episode.position.windows for episode in episodes}) > 1, "each episode draws its own spans"
    again = {e.episode_id: e.context_ids for e in evaluate(tiny, tmp_path / "again", attack, defense=defense)}
    assert again == {e.episode_id: e.context_ids for e in episodes}, "re-planning gives the same episodes"


def test_sampled_trajectories_are_seeded_cached_apart_and_recorded(tiny, tmp_path):
    behaviors = load_behaviors("advbench", limit=BEHAVIORS)
    greedy = load_trajectories("model:tiny-chatml", behaviors, tiny, 12, cache_dir=tmp_path / "cache")
    sampled = load_trajectories("model:tiny-chatml@T=1", behaviors, tiny, 12, cache_dir=tmp_path / "cache")
    again = load_trajectories("model:tiny-chatml@T=1", behaviors, tiny, 12)
    reseeded = load_trajectories("model:tiny-chatml@T=1,seed=5", behaviors, tiny, 12)
    assert len(list((tmp_path / "cache").glob("answers-*.json"))) == 2
    ids = lambda trajectories: {key: t.token_ids for key, t in trajectories.items()}  # noqa: E731
    assert ids(sampled) == ids(again) and ids(sampled) != ids(greedy) and ids(sampled) != ids(reseeded)
    assert {t.source for t in sampled.values()} == {"model:tiny-chatml@T=1"}
    episodes = evaluate(tiny, tmp_path / "run", Prefill(depths=[0, 3]), trajectories="model:tiny-chatml@T=1")
    assert {e.trajectory_source for e in episodes} == {"model:tiny-chatml@T=1"}
    for bad in ("model:tiny-chatml@T=hot", "model:tiny-chatml@T=0"):
        with pytest.raises(InputError, match="model:SPEC@T=TEMPERATURE"):
            load_trajectories(bad, behaviors, tiny, 4)


def test_records_written_before_trajectory_sources_were_kept_read_as_none(tiny, tmp_path):
    (episode,) = evaluate(tiny, tmp_path / "run", Prefill(depths=[0]))[:1]
    old = episode.model_dump(mode="json")
    del old["trajectory_source"], old["ablation"]
    again = Episode.model_validate(old)
    assert again.trajectory_source is None and again.ablation is None


def log_odds(tiny, context: list[int]) -> float:
    """Independent of the batching code: one unpadded pass, the refusal openings' next-token mass as log-odds."""
    with torch.no_grad():
        log_probs = tiny.model(torch.tensor([context])).logits[0, -1].double().log_softmax(-1)
    mass = log_probs[refusal_opening_ids(tiny.chat)].logsumexp(-1)
    return float(mass - torch.log1p(-mass.exp()))


@pytest.mark.parametrize("shared", [True, False], ids=["shared-prefix", "no-shared-prefix"])
def test_context_scores_equal_unpadded_passes(tiny, shared):
    from trajalign.probe.direction import context_refusal_scores

    prompt = tiny.chat.prompt_ids("How do plants grow?")
    contexts = [prompt + list(range(40, 40 + length)) for length in (0, 3, 7, 1, 12)]
    if not shared:
        contexts.append(tiny.chat.prompt_ids("Name a colour.")[1:])
    scores, _ = context_refusal_scores(tiny, contexts, refusal_opening_ids(tiny.chat), batch_size=2)
    assert scores.tolist() == pytest.approx([log_odds(tiny, context) for context in contexts], abs=1e-5)


def test_adaptive_search_keeps_its_budget_and_records_the_true_score(tiny, tmp_path, monkeypatch):
    from trajalign.probe import direction

    scored: list[list[int]] = []
    real = direction.context_refusal_scores

    def counting(handle, contexts, *args, **kwargs):
        scored.extend(contexts)
        return real(handle, contexts, *args, **kwargs)

    monkeypatch.setattr(direction, "context_refusal_scores", counting)
    attack = Adaptive(budgets=[3, 10, 24], span_lengths=[2, 4], own_tokens=6, round_size=5)
    episodes = evaluate(tiny, tmp_path / "run", attack, defense=ReinjectHeader())
    trajectories, own = target_trajectories(tiny), own_answers(tiny, 6)
    prompts = {e.behavior_id: tiny.chat.prompt_ids(e.prompt) for e in episodes}
    for behavior_id, prompt in prompts.items():
        queried = [context for context in scored if context[:len(prompt)] == prompt]
        assert len(queried) == 24, "the search spends its budget and never more"
    best = {}
    for episode in episodes:
        position, prompt = episode.position, prompts[episode.behavior_id]
        start, end = position.window
        assert position.queries == position.budget
        assert episode.context_ids == (prompt + own[episode.behavior_id][:position.after]
                                       + trajectories[episode.behavior_id][start:end] + list(tiny.chat.header_ids))
        assert episode.injected_spans == [(len(prompt) + position.after, len(prompt) + position.after + end - start)]
        assert position.score == pytest.approx(log_odds(tiny, episode.context_ids), abs=1e-4)
        best[(episode.behavior_id, position.budget)] = position.score
    for behavior_id in prompts:
        assert best[(behavior_id, 24)] <= best[(behavior_id, 10)] <= best[(behavior_id, 3)]
    assert {episode.position.label for episode in episodes} == {"budget=3", "budget=10", "budget=24"}
    assert attack.headline(episodes[0].position.model_copy(update={"budget": 10})) is None


def test_adaptive_search_scores_a_small_space_whole():
    attack = Adaptive(budgets=[100], span_lengths=[2, 9], round_size=7)
    calls = []

    def score(candidates):
        calls.append(len(candidates))
        return [float(j - start + length) for j, start, length in candidates]

    queries = attack.search("b", own_length=3, trajectory_length=4, score=score)
    space = {(j, start, 2) for j in range(4) for start in range(3)}  # length 9 exceeds the trajectory
    assert {candidate for candidate, _ in queries} == space and len(queries) == len(space)
    assert max(calls) <= 7
    assert attack.search("b", 3, 4, score) == queries, "seeded: the same order again"


def test_adaptive_needs_the_weights(tiny, tmp_path):
    from trajalign.attacks.base import PlanningContext
    from trajalign.data.trajectories import Trajectory

    behavior = load_behaviors("advbench", limit=1)[0]
    context = PlanningContext(chat=tiny.chat, backend=None, key=lambda b, p: "k", handle=None)
    with pytest.raises(InputError, match="hf backend"):
        Adaptive().plan([(behavior, Trajectory(behavior_id=behavior.id, source="t", token_ids=[1] * 9))], context)


def test_ablation_hook_removes_the_direction_at_every_block_input_and_output(tiny):
    direction = torch.randn(tiny.model.config.hidden_size)
    unit = direction / direction.norm()
    blocks = hooks.decoder_blocks(tiny.model)
    with torch.no_grad(), hooks.ablate_direction(tiny.model, direction), \
            recorded_projections(tiny.model, unit) as projections:
        tiny.model(torch.tensor([tiny.chat.prompt_ids("How do plants grow?")]))
    assert len(projections) == 2 * len(blocks)
    assert max(projections) < 1e-4
    assert all(not block._forward_hooks and not block._forward_pre_hooks for block in blocks)


@contextmanager
def recorded_projections(model, unit: torch.Tensor):
    """The largest |projection on `unit`| / |residual| at any position of every block's input and output, per
    forward pass; registered after any hook already there, so it reads what that hook leaves."""
    projections: list[float] = []

    def read(hidden):
        relative = (hidden @ unit.to(hidden.dtype)).abs() / hidden.norm(dim=-1).clamp(min=1e-6)
        projections.append(float(relative.max()))

    handles = []
    for block in hooks.decoder_blocks(model):
        handles.append(block.register_forward_pre_hook(
            lambda module, args, kwargs: read(hooks._hidden(args, kwargs)), with_kwargs=True))
        handles.append(block.register_forward_hook(lambda module, args, output: read(hooks._output_hidden(output))))
    try:
        yield projections
    finally:
        for handle in handles:
            handle.remove()


def test_ablation_during_an_attack_leaves_weights_and_hooks_as_they_were(tiny, tmp_path, monkeypatch):
    direction = torch.randn(tiny.model.config.hidden_size)
    RefusalDirection(direction, layer=0, position=-1, mean_diff=direction[None].clone()).save(tmp_path / "direction")
    before = {name: tensor.clone() for name, tensor in tiny.model.state_dict().items()}
    unit = direction / direction.norm()
    projections: list[float] = []
    real = hooks.ablate_direction

    @contextmanager
    def observed(model, vector):
        with real(model, vector), recorded_projections(model, unit) as seen:
            yield
        projections.extend(seen)

    monkeypatch.setattr(hooks, "ablate_direction", observed)
    attack = RandomInsert(samples=1, own_tokens=4, span_lengths=(2, 3))
    ablated = evaluate(tiny, tmp_path / "ablated", attack, ablate=AblationConfig(direction=tmp_path / "direction"))
    plain = evaluate(tiny, tmp_path / "plain", attack)
    assert projections and max(projections) < 1e-4, "planning and generation both ran with the direction removed"
    assert all(torch.equal(tensor, before[name]) for name, tensor in tiny.model.state_dict().items())
    assert all(not block._forward_hooks and not block._forward_pre_hooks for block in hooks.decoder_blocks(tiny.model))
    assert {e.ablation for e in ablated} == {str(tmp_path / "direction")} and {e.ablation for e in plain} == {None}
    assert not {e.episode_id for e in ablated} & {e.episode_id for e in plain}


def test_ablation_bad_inputs(tiny, tmp_path):
    with pytest.raises(InputError, match="needs both"):
        Evaluation(EvalConfig(model="tiny", ablate=AblationConfig(direction=tmp_path / "nowhere"), out=tmp_path / "a"),
                   handle=tiny)
    RefusalDirection(torch.ones(3), 0, -1, torch.ones(1, 3)).save(tmp_path / "small")
    with pytest.raises(InputError, match="weights"):
        Evaluation(EvalConfig(model="tiny", backend="openai", ablate=AblationConfig(direction=tmp_path / "small"),
                              out=tmp_path / "b"))
    with pytest.raises(InputError, match="size 3"):
        evaluate(tiny, tmp_path / "c", Prefill(depths=[0]), ablate=AblationConfig(direction=tmp_path / "small"))


def test_eval_command_runs_the_held_out_attacks(cli, tmp_path):
    from trajalign.testing import save_tiny_model

    model = save_tiny_model(tmp_path / "model")
    common = ["--model", model, "--limit", "2", "--trajectories", "target", "--max-new-tokens", "4"]
    code, _, err = cli("eval", *common, "--attack", "random-insert", "--insertions", "2", "--samples", "2",
                       "--span-lengths", "2,3", "--out", tmp_path / "random")
    assert code == 0, err
    assert {e.position.insertions for e in EpisodeLog(tmp_path / "random").load()} == {2}
    direction = torch.randn(64)
    RefusalDirection(direction, 0, -1, direction[None].clone()).save(tmp_path / "direction")
    code, _, err = cli("eval", *common, "--attack", "adaptive", "--budgets", "2,6", "--span-lengths", "2",
                       "--ablate", tmp_path / "direction.safetensors", "--out", tmp_path / "adaptive")
    assert code == 0, err
    episodes = EpisodeLog(tmp_path / "adaptive").load()
    assert {e.position.budget for e in episodes} == {2, 6} and {e.ablation for e in episodes} != {None}
    code, _, err = cli("eval", *common, "--attack", "finetune", "--steps", "0", "--out", tmp_path / "bad")
    assert code == 2 and "steps" in err
