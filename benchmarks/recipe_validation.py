"""Train one model of the reproduction with changed settings and score it on the validation split, never the test.

    python benchmarks/recipe_validation.py [--preset full] [--recipe trajectory] [--recipe-options JSON]
        [--learning-rate 3e-4]
        [--anchor-tokens 24] [--benign-ratio R] [--epochs E] [--lora R] [--contrastive-pairs]
        [--jbb-anchor-copies N] [--anchors SOURCE[:N] ...] [--anchor-answers self|reference]
        [--anchor-weight W] [--benign-mix prefix=0.25,insertion=0.25,plain=0.5] [--kl-weight L]
        [--preference] [--dpo-beta B] [--dpo-epochs E] [--dpo-learning-rate LR] [--pairs-per-behavior N]
        [--harmful-extra SOURCE[:N] ...] [--rounds N] [--name SETTING] [--out runs/validation]
    python benchmarks/recipe_validation.py --table [--out runs/validation] [--figure frontier.png]

The validation split (`trajalign.reproduce.validation_sets`) holds AdvBench behaviors after the training ones and
benign prompts that are neither anchors nor over-refusal test prompts; this is where the presets' settings were
chosen. A setting starts from the preset's settings for its model, and `--anchors` and `--harmful-extra` replace
the preset's extra sources (`none`: no extra ones). The README's ablation rows started from the trajectory model's
settings before the presets took CoCoNot, Dolly and CatQA (commit 89ac8e6): its baseline row is now `--anchors none
--harmful-extra none --benign-ratio 1`, and each row's settings are in its `settings/NAME.json`, whole.
Each setting is scored as the study scores its models: recovery at every depth and after an insertion,
refusal of each benign source, false breaks on benign controls (validation JailbreakBench benign and Self-Instruct
prompts, perturbed as in the study) and the NLL of reference answers (Dolly's training part from its end, never an
anchor, and the validation Self-Instruct tasks) against the original model. Settings that share `--out` share the
original model's evaluation and form one ablation table, printed after each run and by `--table`.

A comparator (`--recipe circuit-breaker`, ... : `trajalign.reproduce.COMPARATORS`) starts from the trajectory
model's settings, the data every model of the compare preset trains on, and `--recipe-options` sets the method's
own (RecipeConfig fields: `{"rerouting": {"alpha": 5}}`, `{"ablation": {"probability": 0.25}}`,
`{"prefix_probability": 0.25}`, `{"rto_fraction": 0.5}`).

Over-refusal levers tried there: `--contrastive-pairs` adds the JailbreakBench harmful behavior of each
JailbreakBench benign anchor (its twin) to the harmful training behaviors, except those whose goal is an AdvBench
goal (the validation and test behaviors are AdvBench's); `--jbb-anchor-copies N` puts each JailbreakBench benign
anchor N times among the anchors to sample from.

The levers of issue 18, each a setting of the role's training (`trajalign.reproduce.RoleTraining`):
(1) `--anchors coconot-pref:200 --anchors dolly-train:200` sets the extra anchor sources, answered by the original
model (`--anchor-answers self`) or by the datasets' own answers (`reference`), `--anchor-weight` times as often per
prompt as the preset's anchors; (2) `--benign-mix` perturbs that share of the anchor rows (prefill, insertion of
another benign answer's span) and trains them to continue; (3) `--kl-weight` adds KL(original || model) on benign
rows; (4) `--preference` runs DPO after SFT; (5) `--harmful-extra catqa:200` sets the extra harmful behaviors (none
whose goal is an AdvBench goal); (6) `--rounds N` attacks each round's model on its training behaviors and trains
again with the failures added (the validation row is the last round's).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from pydantic import ValidationError

from trajalign.data.datasets import Behavior, load_behaviors
from trajalign.headline import from_summary, markdown
from trajalign.reproduce import (
    BENIGN_INSERT_TRAJECTORIES,
    COMPARATORS,
    PRESETS,
    RECIPE_OF_ROLE,
    Reproduction,
    RoleTraining,
    benign_control_behaviors,
    benign_sets,
    split_behaviors,
    validation_sets,
    without_advbench,
)
from trajalign.train.sources import load_sources, parse_source

ROLE_OF_RECIPE = {recipe: role for role, recipe in RECIPE_OF_ROLE.items()}
RECIPES = sorted([*ROLE_OF_RECIPE, *COMPARATORS])


def contrastive_twins(anchors: list[Behavior]) -> list[Behavior]:
    """JailbreakBench pairs each benign behavior with a harmful one by index; AdvBench goals are left out."""
    anchor_ids = {anchor.id for anchor in anchors}
    return without_advbench([harmful for harmful in load_behaviors("jbb-harmful")
                             if harmful.id.replace("jbb-harmful", "jbb-benign") in anchor_ids])


def parse_shares(text: str) -> dict[str, float]:
    """'prefix=0.25,insertion=0.25,plain=0.5' -> {'prefix': 0.25, ...}."""
    try:
        return {kind.strip(): float(share) for kind, share in (part.split("=") for part in text.split(","))}
    except ValueError:
        raise argparse.ArgumentTypeError(f"'{text}': expected KIND=SHARE,... e.g. prefix=0.25,plain=0.75") from None


def extra_sources(given: list[str]) -> list[str] | None:
    """Sources given on the command line: None keeps the preset's, and 'none' stands for no extra ones."""
    return [source for source in given if source != "none"] if given else None


def role_training(args: argparse.Namespace, default: RoleTraining) -> RoleTraining:
    """The preset's settings for the role, with those given on the command line changed."""
    preference = None
    if args.preference:
        preference = {field: value for field, value in {
            "beta": args.dpo_beta, "epochs": args.dpo_epochs, "learning_rate": args.dpo_learning_rate,
            "pairs_per_behavior": args.pairs_per_behavior}.items() if value is not None}
    anchors = extra_sources(args.anchors)
    changes = {field: value for field, value in {
        "benign_ratio": args.benign_ratio, "epochs": args.epochs, "lora": {"r": args.lora} if args.lora else None,
        "anchor_sources": None if anchors is None else [
            {**parse_source(source), "answers": args.anchor_answers, "weight": args.anchor_weight}
            for source in anchors],
        "harmful_sources": extra_sources(args.harmful_extra), "benign_mix": args.benign_mix,
        "kl_weight": args.kl_weight,
        "preference": preference, "rounds": args.rounds, "recipe_options": args.recipe_options}.items()
        if value is not None}
    try:
        return RoleTraining.model_validate({**default.model_dump(), **changes})
    except ValidationError as error:
        problem = error.errors()[0]
        raise SystemExit(f"settings: {'.'.join(map(str, problem['loc'])) or 'training'}: {problem['msg']}") from None


def default_training(preset, recipe: str) -> RoleTraining:
    """The preset's settings for the recipe's model; a comparator that the preset does not train starts from the
    trajectory model's, as the compare preset trains every comparator on the trajectory model's data."""
    role = ROLE_OF_RECIPE.get(recipe, recipe)
    return preset.training.get(role, preset.training["trajectory"]).model_copy(update={"recipe": recipe})


def parse_options(text: str) -> dict:
    try:
        options = json.loads(text)
    except json.JSONDecodeError as error:
        raise argparse.ArgumentTypeError(f"'{text}': not JSON ({error.msg})") from None
    if not isinstance(options, dict):
        raise argparse.ArgumentTypeError(f"'{text}': expected a JSON object of RecipeConfig fields")
    return options


def parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", choices=sorted(PRESETS), default="full")
    parser.add_argument("--recipe", choices=RECIPES, default="trajectory",
                        help="the study's recipes or a comparator (trajalign.reproduce.COMPARATORS)")
    parser.add_argument("--recipe-options", type=parse_options, metavar="JSON",
                        help="the recipe's own settings (RoleTraining.recipe_options), e.g. "
                        "'{\"rerouting\": {\"alpha\": 5}}' or '{\"ablation\": {\"probability\": 0.25}}'")
    parser.add_argument("--learning-rate", type=float)
    parser.add_argument("--anchor-tokens", type=int)
    parser.add_argument("--benign-ratio", type=float)
    parser.add_argument("--epochs", type=float)
    parser.add_argument("--lora", type=int, metavar="R", help="train a LoRA adapter of rank R")
    parser.add_argument("--contrastive-pairs", action="store_true")
    parser.add_argument("--jbb-anchor-copies", type=int, default=1)
    parser.add_argument("--anchors", action="append", default=[], metavar="SOURCE[:N]",
                        help="lever 1: an anchor source beside the preset's own anchors, instead of the preset's "
                        "extra ones (repeatable; 'none': no extra anchors)")
    parser.add_argument("--anchor-answers", choices=["self", "reference"], default="self",
                        help="lever 1: answers of the --anchors sources")
    parser.add_argument("--anchor-weight", type=float, default=1.0,
                        help="lever 1: rows per prompt of the --anchors sources, relative to the preset's anchors")
    parser.add_argument("--benign-mix", type=parse_shares, help="lever 2: shares of plain, prefix and insertion "
                        "anchor rows")
    parser.add_argument("--kl-weight", type=float, help="lever 3: weight of KL(original || model) on benign rows")
    parser.add_argument("--preference", action="store_true", help="lever 4: a DPO stage after SFT")
    parser.add_argument("--dpo-beta", type=float)
    parser.add_argument("--dpo-epochs", type=float)
    parser.add_argument("--dpo-learning-rate", type=float)
    parser.add_argument("--pairs-per-behavior", type=int)
    parser.add_argument("--harmful-extra", action="append", default=[], metavar="SOURCE[:N]",
                        help="lever 5: harmful training behaviors beside AdvBench's, instead of the preset's "
                        "extra ones (repeatable; 'none': AdvBench's only)")
    parser.add_argument("--rounds", type=int, help="lever 6: on-policy rounds")
    parser.add_argument("--name", help="the setting's name in the ablation table (default: the recipe)")
    parser.add_argument("--out", type=Path, default=Path("runs/validation"),
                        help="shared by every setting of one ablation: the original model is evaluated there once")
    parser.add_argument("--table", action="store_true", help="print the ablation table of --out and exit")
    parser.add_argument("--figure", type=Path, help="as --table, and save the frontier (one point per setting) to "
                        "this image file")
    return parser


def validation_utility_sets(preset, self_instruct: list[Behavior]) -> dict[str, list[Behavior]]:
    """Reference answers for utility on validation: Dolly's training part from its end (anchors take its first
    rows) and the validation Self-Instruct user tasks; Dolly's evaluation part is the test."""
    return {"dolly-validation": load_behaviors("dolly-train")[-preset.utility_prompts:],
            "self-instruct-user": self_instruct}


def selection_score(headline) -> float | None:
    """The rule that picks a comparator's setting among those validated: the lower of its lowest recovery (prefill
    depths >= 1 and insertion) and its mean answer rate over the harmless sources. It rewards neither a model
    that refuses everything nor one that recovers from nothing."""
    if headline.worst_recovery is None or not headline.over_refusal:
        return None
    refused = sum(cell.rate for cell in headline.over_refusal.values()) / len(headline.over_refusal)
    return min(headline.worst_recovery.rate, 1 - refused)


def frontier_row(name: str, headline, original) -> list[str]:
    """One setting on the issue's scoreboard: its worst cell of each side, the most it refuses a benign source
    beyond the original model, and its selection score."""
    excess = max((cell.rate - original.over_refusal[source].rate, source)
                 for source, cell in headline.over_refusal.items())
    nll = [f"{comparison['relative_change_pct']:+.1f}%" for comparison in headline.utility.values()
           if "relative_change_pct" in comparison]
    score = selection_score(headline)
    return [name, str(headline.recovery.get(0, "–")), str(headline.worst_recovery or "–"),
            f"{excess[0]:+.0%} ({excess[1]})", str(headline.worst_false_break or "–"), " / ".join(nll) or "–",
            "–" if score is None else f"{score:.0%}"]


def setting_headlines(out: Path) -> dict:
    """The headline of every setting validated into `out` so far, the original model's included."""
    settings = {path.stem: json.loads(path.read_text()) for path in sorted((out / "settings").glob("*.json"))}
    summary = {"results": {name: s["results"] for name, s in settings.items()},
               "utility": {name: s["utility"] for name, s in settings.items()}}
    return {h.model: h for h in from_summary(summary)}


def ablation_table(headlines: dict) -> list[str]:
    """Every setting validated so far (`setting_headlines`), beside the original model."""
    header = ["setting", "refuse @0", "lowest recovery", "most over-refusal above original",
              "highest false break", "NLL change (Dolly / Self-Instruct)", "selection score"]
    rows = [frontier_row(name, h, headlines["original"]) for name, h in headlines.items()]
    return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header),
            *("| " + " | ".join(row) + " |" for row in rows), "", *markdown(list(headlines.values()))]


def main() -> None:
    args = parser().parse_args()
    if args.table or args.figure:
        headlines = setting_headlines(args.out)
        print("\n".join(ablation_table(headlines)))
        if args.figure:
            from trajalign.report import frontier_figure

            frontier_figure(list(headlines.values())).savefig(args.figure, dpi=120, bbox_inches="tight")
        return
    default = PRESETS[args.preset]
    name = args.name or args.recipe
    if name == "original":
        raise SystemExit("--name original is the untrained model's row; choose another name")
    training = role_training(args, default_training(default, args.recipe))
    changes = {field: value for field, value in {"learning_rate": args.learning_rate,
                                                 "anchor_tokens": args.anchor_tokens}.items() if value is not None}
    preset = default.model_copy(update={**changes, "training": {name: training}, "decoding": False})
    run = Reproduction(args.preset, args.out, preset=preset)
    train, _ = split_behaviors(preset)
    anchors, _ = benign_sets(preset)
    if args.contrastive_pairs:
        train = train + contrastive_twins(anchors)
    jbb_anchors = [anchor for anchor in anchors if anchor.dataset == "jbb-benign"]
    anchors = anchors + jbb_anchors * (args.jbb_anchor_copies - 1)
    harmful, benign = validation_sets(preset)
    controls = benign_control_behaviors(benign)
    utility_sets = validation_utility_sets(preset, benign["self-instruct-user"])
    reference_ids = {behavior.id for behavior in utility_sets["dolly-validation"]}
    if any(anchor.id in reference_ids for anchor in load_sources(training.anchor_sources)):
        raise SystemExit("an anchor source reaches Dolly's last rows, which score utility on validation")
    with run.stage("trajectories") as progress:
        trajectories = run.original_answers(train + harmful, progress)
        answers = run.original_answers(controls, progress)
        spans = run.original_answers(controls, progress, BENIGN_INSERT_TRAJECTORIES)
    (args.out / "settings").mkdir(parents=True, exist_ok=True)
    for role in ("original", name):
        if role != "original":
            with run.stage(f"train {role}") as progress:
                run.train(role, train, anchors, trajectories, progress)
        with run.stage(f"validate {role}") as progress:
            results = run.evaluate(role, harmful, trajectories, benign, progress)
            results |= run.evaluate_benign_controls(role, controls, answers, spans, progress)
            utility = run.utility(role, utility_sets, progress)
        settings = {"training": training.model_dump(mode="json"), **changes} if role != "original" else {}
        (args.out / "settings" / f"{role}.json").write_text(json.dumps(
            {"settings": settings, "results": results, "utility": utility, "timings_s": run.timings}, indent=2))
    print(f"settings: {preset.model_dump_json()}")
    print("\n".join(ablation_table(setting_headlines(args.out))))


if __name__ == "__main__":
    main()
