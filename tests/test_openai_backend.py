import pytest
from fake_openai_server import FakeCompletionsServer

from trajalign.attacks import Prefill
from trajalign.backends.base import GenerationRequest
from trajalign.backends.hf import HFBackend
from trajalign.backends.openai_compat import OpenAICompatBackend
from trajalign.data.datasets import load_behaviors
from trajalign.errors import InputError, TrajalignError
from trajalign.evaluate import EvalConfig, Evaluation
from trajalign.runs import EpisodeLog


def sweep(handle):
    trajectory = handle.chat.encode_span("Sure, here is a short answer to your question about the weather.")
    requests = []
    for index, prompt in enumerate(["Write a poem about the sea", "Explain photosynthesis"]):
        ids = handle.chat.prompt_ids(prompt)
        requests += [GenerationRequest(f"{index}@{d}", ids + trajectory, len(ids) + d, max_new_tokens=8)
                     for d in (0, 4, 9)]
    return requests


def test_server_continuations_equal_hf_backend(tiny):
    requests = sweep(tiny)
    local = {r.key: r.continuation_ids for batch in HFBackend(tiny).generate(requests) for r in batch}
    with FakeCompletionsServer(tiny) as server:
        backend = OpenAICompatBackend(tiny, base_url=server.base_url, served_model="tiny", concurrency=2)
        remote = {r.key: r.continuation_ids for batch in backend.generate(requests) for r in batch}
        sent = [body["prompt"] for body in server.requests]
    assert remote == local
    assert all(isinstance(prompt, list) for prompt in sent)  # token ids, never re-tokenized text


def test_logit_bias_is_sent_to_the_server_and_biases_as_the_hf_backend_does(tiny):
    requests = sweep(tiny)
    plain = {r.key: r.continuation_ids for batch in HFBackend(tiny).generate(requests) for r in batch}
    bias = {ids[0]: -100.0 for ids in plain.values()}  # no continuation may start as it did, or use those tokens
    local = {r.key: r.continuation_ids for batch in HFBackend(tiny, logit_bias=bias).generate(requests) for r in batch}
    with FakeCompletionsServer(tiny) as server:
        backend = OpenAICompatBackend(tiny, base_url=server.base_url, served_model="tiny", logit_bias=bias)
        remote = {r.key: r.continuation_ids for batch in backend.generate(requests) for r in batch}
        sent = [body["logit_bias"] for body in server.requests]
    assert remote == local
    assert all(ids and not set(ids) & set(bias) for ids in local.values())
    assert sent and all(body == {str(token): -100.0 for token in bias} for body in sent)


def test_depths_of_a_trunk_go_deepest_first(tiny):
    ordered = OpenAICompatBackend.order(sweep(tiny))
    assert [r.key for r in ordered] == ["0@9", "0@4", "0@0", "1@9", "1@4", "1@0"]


def test_text_fallback_when_server_refuses_ids(tiny):
    with FakeCompletionsServer(tiny, accept_token_ids=False) as server:
        backend = OpenAICompatBackend(tiny, base_url=server.base_url, served_model="tiny")
        results = [r for batch in backend.generate(sweep(tiny)[:2]) for r in batch]
    assert backend.send_token_ids is False and len(results) == 2


def test_missing_server_options():
    from trajalign.testing import tiny_handle

    with pytest.raises(InputError, match="--base-url"):
        OpenAICompatBackend(tiny_handle(), base_url=None, served_model=None)


def test_unreachable_server_fails_after_retries(tiny):
    backend = OpenAICompatBackend(tiny, base_url="http://127.0.0.1:9/v1", served_model="m", retries=1)
    backend.client.backoff_s = 0.01
    with pytest.raises(TrajalignError, match="no answer after 2 tries"):
        list(backend.generate(sweep(tiny)[:1]))


def test_api_key_never_written(tiny, tmp_path, monkeypatch):
    secret = "sk-trajalign-test-secret"
    monkeypatch.setenv("OPENAI_API_KEY", secret)
    with FakeCompletionsServer(tiny) as server:
        config = EvalConfig(model="tiny", dataset="advbench", limit=2, trajectories="target", max_new_tokens=4,
                            attack=Prefill(depths=[0, 2]), backend="openai", out=tmp_path / "run",
                            backend_options={"base_url": server.base_url, "served_model": "tiny"})
        Evaluation(config, handle=tiny).run()
        assert server.headers[0]["Authorization"] == f"Bearer {secret}"
    for path in (tmp_path / "run").rglob("*"):
        if path.is_file():
            assert secret not in path.read_text(errors="replace"), path


def test_text_fallback_is_recorded_per_episode(tiny, tmp_path):
    with FakeCompletionsServer(tiny, accept_token_ids=False) as server:
        config = EvalConfig(model="tiny", dataset="advbench", limit=2, trajectories="target", max_new_tokens=3,
                            attack=Prefill(depths=[0, 2]), backend="openai", out=tmp_path / "run",
                            backend_options={"base_url": server.base_url, "served_model": "tiny"})
        Evaluation(config, handle=tiny).run()
    assert [episode.exact_ids for episode in EpisodeLog(tmp_path / "run").load()] == [False] * 4


def test_openai_evaluation_loads_no_weights_and_generates_trajectories_on_the_server(tmp_path, monkeypatch):
    from transformers import AutoModelForCausalLM

    from trajalign.models import load_model
    from trajalign.testing import save_tiny_model

    directory = save_tiny_model(tmp_path / "model")
    served = load_model(str(directory))  # the server's copy, loaded before weights are forbidden

    def no_weights(*args, **kwargs):
        raise AssertionError("an openai-backend evaluation loaded weights")

    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", no_weights)
    with FakeCompletionsServer(served) as server:
        config = EvalConfig(model=str(directory), dataset="advbench", limit=3, trajectories=f"model:{directory}",
                            trajectory_tokens=6, max_new_tokens=4, attack=Prefill(depths=[0, 3]), backend="openai",
                            out=tmp_path / "run", backend_options={"base_url": server.base_url, "served_model": "m"})
        Evaluation(config).run()
        lengths = [body["max_tokens"] for body in server.requests]
    assert lengths.count(6) == 3 and lengths.count(4) == 6  # three trajectories, then six episodes, all served
    local = {b.id: served.chat.prompt_ids(b.prompt) for b in load_behaviors("advbench", limit=3)}
    for episode in EpisodeLog(tmp_path / "run").load():
        assert episode.exact_ids and episode.context_ids[:episode.answer_start] == local[episode.behavior_id]
