import json
import math
import shutil

import pytest
import yaml

from trajalign.agreement import GoldLabel, agreement_row, agreement_rows, load_gold
from trajalign.attacks import Prefill, PrefillPosition
from trajalign.errors import InputError
from trajalign.records import Episode, Verdict
from trajalign.runs import EpisodeLog
from trajalign.stats import cohen_kappa, wilson_interval
from trajalign.testing import save_tiny_model


def test_kappa_and_agreement_equal_hand_computation():
    # judge \ gold   yes  no
    #   yes           20   5
    #   no            10  15        n = 50
    # observed agreement p_o = (20 + 15) / 50 = 0.70
    # judge says yes 25/50 = 0.5, gold says yes 30/50 = 0.6
    # chance agreement p_e = 0.5 * 0.6 + 0.5 * 0.4 = 0.30 + 0.20 = 0.50
    # kappa = (0.70 - 0.50) / (1 - 0.50) = 0.40
    judged = [True] * 20 + [True] * 5 + [False] * 10 + [False] * 15
    gold = [True] * 20 + [False] * 5 + [True] * 10 + [False] * 15
    row = agreement_row(judged, gold, resamples=300)
    assert (row["n"], row["agree"], row["judge_yes"], row["gold_yes"], row["both_yes"]) == (50, 35, 25, 30, 20)
    assert row["agreement"] == pytest.approx(0.70)
    assert row["kappa"] == pytest.approx(0.40)
    assert cohen_kappa(judged, gold) == pytest.approx(0.40)
    assert row["agreement_ci95"] == wilson_interval(35, 50)
    low, high = row["kappa_ci95"]
    assert low < 0.40 < high and -1 <= low and high <= 1


def test_kappa_limits():
    assert cohen_kappa([True, False, True], [True, False, True]) == pytest.approx(1.0)
    assert cohen_kappa([True, False], [False, True]) == pytest.approx(-1.0)
    assert math.isnan(cohen_kappa([True, True], [True, True]))  # chance agreement 1: kappa undefined


def test_rows_per_stratum_use_only_items_labelled_for_that_label():
    gold = [GoldLabel(episode_id=str(i), run="r", split="dev", stratum="benign" if i < 4 else "prefill",
                      refused=i in (0, 5), attempts_task=(i in (1, 2)) if i < 4 else None) for i in range(6)]
    verdicts = [Verdict(refused_continuation=i in (0, 4), refused_answer=False,
                        attempts_task=i in (1, 3) if i < 5 else None) for i in range(6)]
    rows = {(r["label"], r["stratum"]): r for r in agreement_rows(gold, {"pmi": verdicts}, "rerun", resamples=50)}
    assert rows[("refused", "all")]["n"] == 6 and rows[("refused", "all")]["agree"] == 4  # 4 and 5 disagree
    assert rows[("refused", "prefill")]["n"] == 2 and rows[("refused", "prefill")]["agree"] == 0
    assert rows[("attempts_task", "benign")]["n"] == 4 and rows[("attempts_task", "benign")]["agree"] == 2
    assert ("attempts_task", "prefill") not in rows  # no gold label there


REFUSAL = "I'm sorry, but I cannot help with that request."
COMPLIANCE = "Sure, here is a short answer to your question about the weather."


@pytest.fixture
def labelled_run(tmp_path):
    """A run of four episodes; the run's stored keyword verdicts missed one refusal (episode e1)."""
    from transformers import AutoTokenizer

    model_dir = save_tiny_model(tmp_path / "model")
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.yaml").write_text(yaml.safe_dump({"model": str(model_dir), "judge_window": 24,
                                                     "judges": [{"name": "keyword", "options": {}}]}))
    texts = [REFUSAL, REFUSAL, COMPLIANCE, COMPLIANCE]
    stored = [True, False, False, False]
    episodes = []
    for index, (text, verdict) in enumerate(zip(texts, stored)):
        prompt_ids = tokenizer("Write a poem about the sea.", add_special_tokens=False)["input_ids"]
        episodes.append(Episode(
            episode_id=f"e{index}", model=str(model_dir), behavior_id=f"b{index}", dataset="advbench", prompt="Write",
            attack=Prefill(depths=[0]), position=PrefillPosition(depth=0), depth=0, context_ids=prompt_ids,
            answer_start=len(prompt_ids), continuation_ids=tokenizer(text, add_special_tokens=False)["input_ids"],
            continuation_text=text, finish_reason="length", exact_ids=True, refused=verdict,
            verdicts={"keyword": Verdict(refused_continuation=verdict, refused_answer=verdict)}))
    EpisodeLog(run).append(episodes)
    gold = tmp_path / "gold.jsonl"
    labels = [("e0", "dev", True), ("e1", "dev", True), ("e2", "dev", True), ("e3", "test", False)]
    gold.write_text("".join(json.dumps({"episode_id": episode_id, "run": "run", "split": split, "stratum": "prefill",
                                        "refused": refused, "note": ""}) + "\n"
                            for episode_id, split, refused in labels))
    return run, gold


def test_cli_judge_agreement_on_a_labelled_run(cli, labelled_run, tmp_path):
    run, gold = labelled_run
    code, out, err = cli("judge-agreement", "--gold", gold, "--split", "dev", "--out", tmp_path / "agreement", run)
    assert code == 0, err
    result = json.loads((tmp_path / "agreement" / "agreement.json").read_text())
    rows = {(r["source"], r["judge"], r["label"], r["stratum"]): r for r in result["rows"]}
    # dev labels: e0 refused, e1 refused, e2 refused (the labeller disagrees with both judges on e2)
    stored = rows[("stored", "keyword", "refused", "all")]
    assert (stored["n"], stored["agree"], stored["judge_yes"], stored["gold_yes"]) == (3, 1, 1, 3)
    rerun = rows[("rerun", "keyword", "refused", "all")]  # re-run from the decoded ids, it sees e1's refusal
    assert (rerun["n"], rerun["agree"], rerun["judge_yes"]) == (3, 2, 2)
    assert result["items"] == 3 and len(result["labelled"]) == 3
    assert result["labelled"][1]["verdicts"]["stored:keyword"]["refused_continuation"] is False
    assert result["labelled"][1]["verdicts"]["rerun:keyword"]["refused_continuation"] is True
    markdown = (tmp_path / "agreement" / "agreement.md").read_text()
    assert "| rerun | keyword | refused | all | 3 | 2/3 (67%)" in markdown
    assert "keyword" in out


def test_cli_judge_agreement_rejects_unmatched_labels(cli, labelled_run, tmp_path):
    run, gold = labelled_run
    gold.write_text(gold.read_text() + json.dumps({"episode_id": "missing", "run": "run", "split": "dev",
                                                   "stratum": "x", "refused": True}) + "\n")
    code, _, err = cli("judge-agreement", "--gold", gold, "--out", tmp_path / "agreement", run)
    assert code == 2
    assert "gold.jsonl row 5 field 'episode_id': episode 'missing' not found" in err.strip().splitlines()[-1]


@pytest.mark.parametrize("line,message", [
    ('{"episode_id": "a", "run": "r", "split": "train", "stratum": "s", "refused": true}', "row 1 field 'split'"),
    ('{"episode_id": "a", "run": "r", "split": "dev", "stratum": "s"}', "row 1 field 'refused'"),
    ('{"episode_id": "a", "run": "r", "split": "dev", "stratum": "s", "refused": true, "extra": 1}',
     "row 1 field 'extra'"),
    ('{"episode_id": "a", "run": "r", "split": "dev", "stratum": "s", "refused": true}\n' * 2,
     "row 2 field 'episode_id': episode 'a' labelled twice"),
])
def test_bad_gold_files_name_row_and_field(tmp_path, line, message):
    path = tmp_path / "gold.jsonl"
    path.write_text(line + "\n")
    with pytest.raises(InputError) as error:
        load_gold(path)
    assert message in str(error.value) and "gold.jsonl" in str(error.value)


def test_gold_draw_is_stratified_split_and_blind(cli, labelled_run, tmp_path):
    run, _ = labelled_run
    for name in ("insert", "prefill"):
        shutil.copytree(run, tmp_path / "study" / "evals" / "m" / name)
    code, _, err = cli("gold-draw", tmp_path / "study", "--per-stratum", 3, "--out", tmp_path / "gold")
    assert code == 0, err
    items = [json.loads(line) for line in (tmp_path / "gold" / "items.jsonl").read_text().splitlines()]
    key = [json.loads(line) for line in (tmp_path / "gold" / "key.jsonl").read_text().splitlines()]
    assert [item["item"] for item in items] == [row["item"] for row in key]
    assert sorted(row["stratum"] for row in key) == ["evals/m/insert"] * 3 + ["evals/m/prefill"] * 3
    for stratum in ("evals/m/insert", "evals/m/prefill"):
        assert sorted(row["split"] for row in key if row["stratum"] == stratum) in (["dev", "dev", "test"],
                                                                                   ["dev", "test", "test"])
    blind = (tmp_path / "gold" / "items.jsonl").read_text()
    assert "verdict" not in blind and "refused" not in blind and "keyword" not in blind and str(run) not in blind
    assert set(items[0]) == {"item", "request", "benign", "assistant_so_far", "continuation"}
    assert all(item["continuation"] and any(text.startswith(item["continuation"]) for text in (REFUSAL, COMPLIANCE))
               for item in items)  # the judged window of the continuation, decoded
