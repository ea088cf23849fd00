"""benchmarks/reset_bias.py: a backtracking model's resets against the logit bias on its reset token."""

import importlib.util
from pathlib import Path

SCRIPT = Path(__file__).parents[1] / "benchmarks" / "reset_bias.py"


def test_the_reset_bias_sweep_moves_resets_on_every_validation_set(tmp_path, capsys):
    from trajalign.models import load_model
    from trajalign.testing import save_tiny_model
    from trajalign.train.backtracking import add_reset_token

    handle = load_model(str(save_tiny_model(tmp_path / "base")))
    add_reset_token(handle.tokenizer, "[RESET]")
    handle.model.resize_token_embeddings(len(handle.tokenizer))
    handle.model.save_pretrained(tmp_path / "backtracking")
    handle.tokenizer.save_pretrained(tmp_path / "backtracking")
    spec = importlib.util.spec_from_file_location("reset_bias", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    results = module.main([str(tmp_path / "backtracking"), "--biases=-100,100", "--preset", "smoke",
                           "--trajectories", "target", "--out", str(tmp_path / "sweep")])
    assert sorted(results) == [-100.0, 0.0, 100.0]
    assert all(resets == refused == n > 0 for resets, refused, n in results[100.0].values())
    assert {"harmful", "xstest-safe", "jbb-benign", "self-instruct-user", "coconot-contrast"} <= set(results[0.0])
    printed = capsys.readouterr().out
    assert "| +100 | 100% [" in printed and "| -100 |" in printed and "| +0 |" in printed
    saved = (tmp_path / "sweep" / "bias+100" / "xstest-safe" / "config.yaml").read_text()
    assert "behaviors.jsonl" in saved and "reset_logit_bias: 100.0" in saved  # its config re-runs it
