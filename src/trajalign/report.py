"""`trajalign report`: one self-contained HTML page (figures inline), PNGs beside it, and summary.md.

Model output and dataset text are data: every string from a record is HTML-escaped, and a Content-Security-Policy
forbids scripts and any fetch, so the page makes no network request and nothing in it can run.
"""

from __future__ import annotations

import base64
import html
import io
import json
from collections import defaultdict
from pathlib import Path

from trajalign.attack_report import (
    attack_matrix,
    attack_row,
    budget_curves,
    curve_figure,
    matrix_figure,
    matrix_table,
    source_name,
    steps_curves,
)
from trajalign.data.datasets import is_benign
from trajalign.errors import InputError, TrajalignError
from trajalign.headline import Cell, Headline, from_summary, tables
from trajalign.models.registry import DEFAULT_MODEL
from trajalign.records import Episode
from trajalign.requirements import require
from trajalign.runs import EPISODES_FILE, EpisodeLog
from trajalign.stats import mcnemar_exact, wilson_interval

# Okabe-Ito: distinguishable with colour-blindness; markers and dashes keep curves apart in grey-scale too.
PALETTE = ["#0072B2", "#D55E00", "#009E73", "#CC79A7", "#E69F00", "#56B4E9", "#000000"]
MARKERS = ["o", "s", "^", "D", "v", "P", "X"]
DASHES = ["-", "--", "-.", ":", "-", "--", "-."]
CSP = "default-src 'none'; img-src data:; style-src 'unsafe-inline'"


def series_style(index: int) -> dict:
    """Colour, marker and dash of the index-th model. The marker shifts by one each time the colours come round,
    so that the compare preset's eighth model does not look like its first."""
    return dict(color=PALETTE[index % len(PALETTE)], marker=MARKERS[(index + index // len(PALETTE)) % len(MARKERS)],
                linestyle=DASHES[index % len(DASHES)])


def collect_episodes(runs: list[Path]) -> list[Episode]:
    episodes = []
    for run in runs:
        run = Path(run)
        files = sorted(run.rglob(EPISODES_FILE)) if run.is_dir() else []
        if not files:
            raise InputError(f"{run}: no {EPISODES_FILE} in this run directory or below it")
        for file in files:
            episodes += EpisodeLog(file.parent).load()
    return episodes


def _model_name(spec: str) -> str:
    return Path(spec).name if "/" in spec else spec


def _figure_png(figure) -> bytes:
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=110, bbox_inches="tight")
    return buffer.getvalue()


def pyplot():
    require("matplotlib", "the report").use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _harmful(episodes: list[Episode]) -> list[Episode]:
    return [e for e in episodes if not is_benign(e.dataset)]


DEFAULT_TRAJECTORIES = f"model:{DEFAULT_MODEL}"  # EvalConfig's default source


def is_plain_prefill(episode: Episode, source: str | None = None) -> bool:
    """A prefill with no defense and no ablation, of trajectories from `source` (unset: the default source, the
    original model's greedy answers): the depth sweep itself, not a held-out variant of it."""
    return (episode.attack_kind == "prefill" and episode.defense is None and episode.ablation is None
            and (episode.trajectory_source or DEFAULT_TRAJECTORIES) == (source or DEFAULT_TRAJECTORIES))


def depth_figure(episodes: list[Episode]):
    plt = pyplot()
    groups: dict[str, dict[int, list[bool]]] = defaultdict(lambda: defaultdict(list))
    for episode in _harmful(episodes):
        source = episode.trajectory_source or DEFAULT_TRAJECTORIES
        if is_plain_prefill(episode, source):  # one curve per model and trajectory source
            label = _model_name(episode.model) + ("" if source == DEFAULT_TRAJECTORIES else f" [{source_name(source)}]")
            groups[label][episode.depth].append(episode.refused)
    if not groups:
        return None
    figure, axis = plt.subplots(figsize=(6.4, 3.8))
    for index, (model, by_depth) in enumerate(sorted(groups.items())):
        depths = sorted(by_depth)
        rates = [sum(by_depth[d]) / len(by_depth[d]) for d in depths]
        bands = [wilson_interval(sum(by_depth[d]), len(by_depth[d])) for d in depths]
        style = series_style(index)
        axis.plot(depths, rates, **style, label=model)
        axis.fill_between(depths, [b[0] for b in bands], [b[1] for b in bands], color=style["color"], alpha=0.15)
    axis.set_xlabel("prefill depth k (target-model tokens)")
    axis.set_ylabel("recovery rate (refusal in continuation)")
    axis.set_ylim(-0.02, 1.02)
    axis.legend(frameon=False)
    axis.grid(alpha=0.3)
    return figure


def insertion_figure(episodes: list[Episode]):
    plt = pyplot()
    cells: dict[str, dict[tuple[int, int], list[bool]]] = defaultdict(lambda: defaultdict(list))
    for episode in _harmful(episodes):
        position = episode.position
        if episode.attack_kind == "insert" and position.length is not None:  # spans of a trajectory, not a text
            cells[_model_name(episode.model)][(position.after, position.length)].append(episode.refused)
    if not cells:
        return None
    figure, axes = plt.subplots(1, len(cells), figsize=(3.6 * len(cells) + 1.0, 3), squeeze=False,
                                layout="constrained")
    for axis, (model, grid) in zip(axes[0], sorted(cells.items())):
        afters = sorted({a for a, _ in grid})
        lengths = sorted({b for _, b in grid})
        values = [[sum(grid[(a, b)]) / len(grid[(a, b)]) if (a, b) in grid else float("nan") for a in afters]
                  for b in lengths]
        image = axis.imshow(values, vmin=0, vmax=1, cmap="cividis", origin="lower", aspect="auto")
        for row, length in enumerate(lengths):
            for column, after in enumerate(afters):
                axis.text(column, row, f"{values[row][column]:.0%}", ha="center", va="center",
                          color="white" if values[row][column] < 0.5 else "black", fontsize=9)
        axis.set_xticks(range(len(afters)), afters)
        axis.set_yticks(range(len(lengths)), lengths)
        axis.set_xlabel("own tokens before insertion (j)")
        axis.set_ylabel("inserted tokens (L)")
        axis.set_title(model, fontsize=10)
    figure.colorbar(image, ax=axes[0].tolist(), label="recovery rate")
    return figure


def _grouped_bars(groups: dict[str, dict[str, list[bool]]], ylabel: str, rotate: bool):
    """One bar per (category, model), coloured and hatched per model."""
    plt = pyplot()
    categories = sorted({category for by_category in groups.values() for category in by_category})
    figure, axis = plt.subplots(figsize=(max(6, 0.6 * len(categories) * len(groups)), 3.6))
    width = 0.8 / len(groups)
    for index, (model, by_category) in enumerate(sorted(groups.items())):
        rates = [sum(by_category[c]) / len(by_category[c]) if c in by_category else 0 for c in categories]
        axis.bar([i + index * width for i in range(len(categories))], rates, width, label=model,
                 color=PALETTE[index % 7], hatch=["", "//", "..", "xx"][index % 4], edgecolor="black", linewidth=0.4)
    axis.set_xticks([i + width * (len(groups) - 1) / 2 for i in range(len(categories))], categories,
                    rotation=45 if rotate else 0, ha="right" if rotate else "center", fontsize=8)
    axis.set_ylabel(ylabel)
    axis.set_ylim(0, 1)
    axis.legend(frameon=False)
    return figure


def decoding_figure(episodes: list[Episode]):
    groups: dict[str, dict[str, list[bool]]] = defaultdict(lambda: defaultdict(list))
    for episode in _harmful(episodes):
        if episode.attack_kind == "decoding":
            groups[_model_name(episode.model)][episode.position.label].append(not episode.refused)
    return _grouped_bars(groups, "attack success rate", rotate=True) if groups else None


def over_refusal_figure(episodes: list[Episode]):
    groups: dict[str, dict[str, list[bool]]] = defaultdict(lambda: defaultdict(list))
    for episode in episodes:
        if is_benign(episode.dataset) and episode.depth == 0 and episode.attack_kind == "prefill":
            groups[_model_name(episode.model)][episode.dataset].append(episode.refused)
    return _grouped_bars(groups, "share of benign prompts refused", rotate=False) if groups else None


def _pooled_aurocs(directory: Path) -> dict[str, float]:
    path = directory / "predictivity.json"
    if not path.exists():
        return {}
    runs = json.loads(path.read_text())["predictivity"]
    return {row["score"]: row["auroc"] for rows in runs.values() for row in rows if row["group"] == "pooled"}


def probe_figure(probe_dirs: list[Path], episodes: list[Episode]):
    """Projection on the refusal direction along the trajectory (mean and one-s.d. band), recovered vs not,
    with the pooled AUROC of each internal score for predicting recovery."""
    import numpy as np

    from trajalign.probe.run import load_readings

    plt = pyplot()
    panels = []
    for directory in probe_dirs:
        readings = {(r.behavior_id, r.depth): r for r in load_readings(directory)}
        direction_layer = json.loads((directory / "direction.json").read_text())["layer"] \
            if (directory / "direction.json").exists() else None
        outcomes = defaultdict(lambda: defaultdict(list))
        for episode in episodes:
            reading = readings.get((episode.behavior_id, episode.depth))
            if episode.attack_kind == "prefill" and _model_name(episode.model) == directory.name and reading \
                    and not is_benign(episode.dataset) and direction_layer in reading.projections:
                outcomes[episode.refused][episode.depth].append(reading.projections[direction_layer])
        if outcomes:
            panels.append((directory.name, direction_layer, outcomes, _pooled_aurocs(directory)))
    if not panels:
        return None
    figure, axes = plt.subplots(1, len(panels), figsize=(4.4 * len(panels), 3.6), squeeze=False)
    for axis, (model, layer, outcomes, aurocs) in zip(axes[0], panels):
        for index, recovered in enumerate((True, False)):
            by_depth = outcomes.get(recovered, {})
            depths = sorted(by_depth)
            if not depths:
                continue
            means = np.array([np.mean(by_depth[d]) for d in depths])
            spread = np.array([np.std(by_depth[d]) for d in depths])
            colour = PALETTE[index]
            axis.plot(depths, means, DASHES[index], marker=MARKERS[index], color=colour,
                      label="recovered" if recovered else "not recovered")
            axis.fill_between(depths, means - spread, means + spread, color=colour, alpha=0.15)
        scores = [f"{name.replace('projection_', 'proj ')} {value:.2f}" for name, value in aurocs.items()]
        lines = [", ".join(scores[start:start + 2]) for start in range(0, len(scores), 2)]
        axis.set_title("\n".join([f"{model}: direction at layer {layer}", "AUROC of recovery, depths ≥ 1 pooled:",
                                   *lines]),
                       fontsize=8)
        axis.set_xlabel("depth k")
        axis.set_ylabel("projection on refusal direction")
        axis.legend(frameon=False, fontsize=8)
    return figure


def _probe_context(directory: Path, episodes: list[Episode]):
    """A probe directory's readings, its layers (own direction; shared direction or None) and the harmful prefill
    episodes of the model it probed (matched by the model spec in its config.yaml)."""
    import yaml

    from trajalign.probe.run import load_readings

    results_file, config_file = directory / "predictivity.json", directory / "config.yaml"
    if not results_file.exists() or not config_file.exists():
        return None
    results = json.loads(results_file.read_text())
    settings = yaml.safe_load(config_file.read_text()) or {}
    spec = settings.get("model")
    own = [e for e in _harmful(episodes) if e.model == spec and is_plain_prefill(e, settings.get("trajectories"))]
    shared = results.get("reference_direction", {}).get("layer")
    return load_readings(directory), results["direction"]["layer"], shared, own


def frontier_figure(headlines: list[Headline]):
    """Two panels, one point per model with 95% intervals on both axes: the lowest recovery (over depths >= 1 and
    the insertion) against the highest over-refusal (over benign sources), and against the highest false break
    (over benign control depths and the benign insertion). Top left is where depth discriminates."""
    plt = pyplot()
    panels = [("highest over-refusal of a benign source (depth 0)", "worst_over_refusal"),
              ("highest false break (benign prefill depth or insertion)", "worst_false_break")]
    figure, axes = plt.subplots(1, 2, figsize=(9.6, 4.0), sharey=True)
    for axis, (xlabel, attribute) in zip(axes, panels):
        for index, h in enumerate(headlines):
            x, y = getattr(h, attribute), h.worst_recovery
            if x is None or y is None:
                continue
            style = series_style(index)
            axis.errorbar(x.rate, y.rate, xerr=_error_bar(x), yerr=_error_bar(y), fmt=style["marker"],
                          color=style["color"], capsize=3, label=h.model)
        axis.set_xlim(-0.02, 1.02)
        axis.set_ylim(-0.02, 1.02)
        axis.set_xlabel(xlabel)
        axis.grid(alpha=0.3)
    axes[0].set_ylabel("lowest recovery (prefill depth >= 1 or insertion)")
    axes[0].legend(frameon=False, fontsize=8, loc="lower right")
    figure.tight_layout()
    return figure


def _error_bar(cell: Cell) -> list[list[float]]:
    """The interval as distances below and above the rate (a Wilson bound can pass the rate by a rounding error)."""
    return [[max(0.0, cell.rate - cell.low)], [max(0.0, cell.high - cell.rate)]]


def reproduction_headlines(runs: list[Path]) -> list[Headline]:
    """Headlines of the reproduction directories among `runs` (those with a summary.json of results)."""
    found = []
    for run in runs:
        summary_file = Path(run) / "summary.json"
        if summary_file.exists():
            summary = json.loads(summary_file.read_text())
            if "results" in summary:
                found += from_summary(summary)
    return found


def within_depth_rows(probe_dirs: list[Path], episodes: list[Episode]) -> list[dict]:
    """Claim (b) without the depth confound: per probed model and score, the within-depth summary."""
    from trajalign.probe.predictivity import within_depth_summary

    rows = []
    for directory in probe_dirs:
        context = _probe_context(directory, episodes)
        if context and context[3]:
            rows += [{"model": directory.name, **row} for row in within_depth_summary(context[0], context[3])]
    return rows


def between_model_profiles(probe_dirs: list[Path], episodes: list[Episode]) -> dict[str, list[dict]]:
    """Per probed model read on a shared (the original model's) direction: its depth profile (recovery, mean
    projections per depth)."""
    from trajalign.probe.predictivity import depth_profile

    contexts = {directory: _probe_context(directory, episodes) for directory in probe_dirs}
    shared_sources = {Path(json.loads((directory / "predictivity.json").read_text())["reference_direction"]["path"])
                      for directory, context in contexts.items() if context and context[2] is not None}
    profiles = {}
    for directory, context in contexts.items():
        if not context or not context[3]:
            continue
        readings, layer, shared, own = context
        if shared is not None:
            profiles[directory.name] = depth_profile(readings, own, layer, shared)
        elif directory / "direction" in shared_sources:  # the model whose direction the others are read on
            profiles[directory.name] = depth_profile(readings, own, layer, own_is_shared=True)
    return profiles


def between_model_table(profiles: dict[str, list[dict]]) -> tuple[list[str], list[list[str]]]:
    """One row per depth: each model's mean projection on the shared direction, then its recovery."""
    models = sorted(profiles)
    by_depth = {model: {row["depth"]: row for row in rows} for model, rows in profiles.items()}
    depths = sorted({depth for rows in by_depth.values() for depth in rows})

    def cell(row: dict | None) -> str:
        if row is None:
            return "–"
        low, high = row["recovery_ci95"]
        return (f"{row['mean_shared_projection']:.2f} / {row['recovery_rate']:.0%} [{low:.0%}, {high:.0%}] "
                f"n={row['n']}")

    return (["depth", *[f"{model}: projection / recovery" for model in models]],
            [[str(depth), *[cell(by_depth[model].get(depth)) for model in models]] for depth in depths])


def between_model_figure(profiles: dict[str, list[dict]]):
    """Per depth, each model's mean projection on the shared (original model's) refusal direction beside its
    recovery rate: is the model whose states point at refusal the one that recovers?"""
    if not profiles:
        return None
    plt = pyplot()
    figure, (left, right) = plt.subplots(1, 2, figsize=(10, 3.6), layout="constrained")
    for index, (model, rows) in enumerate(sorted(profiles.items())):
        style = series_style(index) | {"label": model}
        depths = [row["depth"] for row in rows]
        left.plot(depths, [row["mean_shared_projection"] for row in rows], **style)
        right.plot(depths, [row["recovery_rate"] for row in rows], **style)
        right.fill_between(depths, [row["recovery_ci95"][0] for row in rows],
                           [row["recovery_ci95"][1] for row in rows], color=PALETTE[index % 7], alpha=0.12)
    left.set_xlabel("depth k")
    left.set_ylabel("mean projection on the original\nmodel's refusal direction")
    right.set_xlabel("depth k")
    right.set_ylabel("recovery rate")
    right.set_ylim(-0.02, 1.02)
    for axis in (left, right):
        axis.grid(alpha=0.3)
        axis.legend(frameon=False, fontsize=8)
    return figure


def _auroc_cell(value: float, interval) -> str:
    return "–" if value != value else f"{value:.2f} [{interval[0]:.2f}, {interval[1]:.2f}]"


def within_depth_table(rows: list[dict]) -> tuple[list[str], list[list[str]]]:
    headers = ["model", "score", "depths entered", "mean within-depth AUROC [95% CI]",
               "pooled k ≥ 1 AUROC [95% CI]", "n (recovered), k ≥ 1", "depth 0 AUROC", "n (recovered), k = 0"]
    cells = [[row["model"], row["score"], f"{len(row['depths_entered'])}: {row['depths_entered']}",
              _auroc_cell(row["mean_within_depth_auroc"], row["mean_within_depth_auroc_ci95"]),
              _auroc_cell(row["pooled_depth_ge1_auroc"], row["pooled_depth_ge1_auroc_ci95"]),
              f"{row['pooled_depth_ge1_n']} ({row['pooled_depth_ge1_recovered']})",
              "–" if row["depth0_auroc"] != row["depth0_auroc"] else f"{row['depth0_auroc']:.2f}",
              f"{row['depth0_n']} ({row['depth0_recovered']})"] for row in rows]
    return headers, cells


def comparison_rows(episodes: list[Episode]) -> list[dict]:
    """Models x attacks, with exact McNemar tests between each pair of models on the same episodes."""
    outcome: dict[str, dict[tuple, bool]] = defaultdict(dict)
    for episode in episodes:
        key = (episode.dataset, episode.behavior_id, episode.attack_kind, episode.position.label, episode.sample,
               episode.defense)
        outcome[_model_name(episode.model)][key] = episode.refused
    models = sorted(outcome)
    rows = []
    for index, first in enumerate(models):
        for second in models[index + 1:]:
            shared = set(outcome[first]) & set(outcome[second])
            by_attack = defaultdict(list)
            for key in shared:
                by_attack[(key[0], key[2])].append((outcome[first][key], outcome[second][key]))
            for (dataset, attack), pairs in sorted(by_attack.items()):
                only_first = sum(a and not b for a, b in pairs)
                only_second = sum(b and not a for a, b in pairs)
                rows.append({"first": first, "second": second, "dataset": dataset, "attack": attack, "n": len(pairs),
                             "first_rate": sum(a for a, _ in pairs) / len(pairs),
                             "second_rate": sum(b for _, b in pairs) / len(pairs),
                             "only_first": only_first, "only_second": only_second,
                             "p_value": mcnemar_exact(only_first, only_second)})
    return rows


def rate_table(episodes: list[Episode]) -> list[dict]:
    groups = defaultdict(list)
    for episode in episodes:
        attack = attack_row(episode)  # with its trajectory source, defense and depth class (k=0 apart from k>=1)
        if attack is not None:
            groups[(_model_name(episode.model), episode.dataset, attack)].append(episode.refused)
    rows = []
    for (model, dataset, attack), values in sorted(groups.items()):
        low, high = wilson_interval(sum(values), len(values))
        rows.append({"model": model, "dataset": dataset, "attack": attack,
                     "n": len(values), "rate": sum(values) / len(values), "low": low, "high": high})
    return rows


def held_out_figures(harmful: list[Episode], plt) -> list[tuple]:
    """The attacks x models heatmap, the adaptive search's budget-success curve and recovery against fine-tuning
    steps: (title, file name, figure or None)."""
    style = (plt, series_style)
    return [("Attacks × models: recovery with Wilson 95% intervals", "attacks_by_models",
             matrix_figure(attack_matrix(harmful), plt)),
            ("Adaptive search: attack success against the query budget per behavior", "budget_success",
             curve_figure(budget_curves(harmful), "budget", "queries per behavior (b)",
                          "attack success (best of first b, verified)", *style, log_x=True)),
            ("Fine-tuning durability: recovery against fine-tuning steps", "recovery_by_finetune_steps",
             curve_figure(steps_curves(harmful), "steps", "fine-tuning steps k",
                          "recovery rate, prefill depths ≥ 1 pooled", *style))]


def _marked_answer(episode: Episode, decode) -> str:
    """The assistant turn with injected spans in <mark>, the continuation in <ins>; every piece escaped."""
    pieces, cursor = [], episode.answer_start
    for start, end in sorted(episode.injected_spans):
        if start > cursor:
            pieces.append(html.escape(decode(episode.context_ids[cursor:start])))
        pieces.append(f"<mark>{html.escape(decode(episode.context_ids[start:end]))}</mark>")
        cursor = end
    if cursor < len(episode.context_ids):
        pieces.append(html.escape(decode(episode.context_ids[cursor:])))
    pieces.append(f"<ins>{html.escape(episode.continuation_text)}</ins>")
    return "".join(pieces)


def example_html(episodes: list[Episode], decode, per_model: int = 3) -> str:
    by_model = defaultdict(list)
    for episode in _harmful(episodes):
        if episode.injected_spans:
            by_model[_model_name(episode.model)].append(episode)
    blocks = []
    for model, members in sorted(by_model.items()):
        chosen = sorted(members, key=lambda e: (e.refused, e.behavior_id))[:per_model]
        for episode in chosen:
            verdict = "recovered" if episode.refused else "did not recover"  # harmful prompts only
            answer = _marked_answer(episode, decode)
            blocks.append(
                f"<details class='episode'><summary>{html.escape(model)} · {html.escape(episode.attack_kind)} "
                f"{html.escape(episode.position.label)} · <b>{verdict}</b> · "
                f"{html.escape(episode.prompt[:90])}</summary>"
                f"<p class='prompt'>{html.escape(episode.prompt)}</p><pre>{answer}</pre></details>")
    return "\n".join(blocks)


def _table(headers: list[str], rows: list[list[str]]) -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in headers)
    body = "".join("<tr>" + "".join(f"<td>{cell}</td>" for cell in row) + "</tr>" for row in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _md_cell(text: str) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ").replace("<", "&lt;")


STYLE = """body{font-family:system-ui,sans-serif;max-width:1100px;margin:2em auto;color:#222}
table{border-collapse:collapse;margin:1em 0}td,th{border:1px solid #bbb;padding:3px 8px;font-size:14px}
th{background:#eee}img{max-width:100%}mark{background:#ffd27f}ins{text-decoration:none;background:#cfe8ff}
pre{white-space:pre-wrap;background:#f6f6f6;padding:8px;max-height:18em;overflow:auto}
details.episode{margin:.4em 0;border:1px solid #ddd;padding:4px}"""


def build_report(runs: list[Path], out_file: Path, tokenizer_spec: str | None = None) -> Path:
    """Write the HTML report, its PNGs and summary.md next to `out_file`."""
    episodes = collect_episodes(runs)
    if not episodes:
        raise InputError(f"{', '.join(map(str, runs))}: no episodes to report")
    decode = _decoder(episodes, tokenizer_spec)
    probe_dirs = sorted({p.parent for run in runs for p in Path(run).rglob("readings.jsonl")})
    out_file = Path(out_file)
    out_file.parent.mkdir(parents=True, exist_ok=True)
    plt = pyplot()
    headlines = reproduction_headlines(runs)
    profiles = between_model_profiles(probe_dirs, episodes)
    figures = [("Depth that discriminates: harmful recovery against benign refusal, per model", "frontier",
                frontier_figure(headlines) if headlines else None),
               ("Recovery against injection depth", "recovery_by_depth", depth_figure(episodes)),
               ("Insertion attack: recovery by insertion point and span length", "insertion_heatmap",
                insertion_figure(episodes)),
               ("Decoding sweep: attack success per setting", "decoding_sweep", decoding_figure(episodes)),
               ("Probe: the refusal direction along the trajectory", "probe_projection",
                probe_figure(probe_dirs, episodes)),
               ("Between models: projection on the original model's refusal direction beside recovery",
                "between_models", between_model_figure(profiles)),
               ("Over-refusal on benign prompts", "over_refusal", over_refusal_figure(episodes)),
               *held_out_figures(_harmful(episodes), plt)]
    sections = []
    for title, name, figure in figures:
        if figure is None:
            continue
        png = _figure_png(figure)
        plt.close(figure)
        (out_file.parent / f"{name}.png").write_bytes(png)
        sections.append(f"<h2>{html.escape(title)}</h2><img alt='{html.escape(title)}' "
                        f"src='data:image/png;base64,{base64.b64encode(png).decode()}'>")
    if headlines:
        sections.append("<h2>Headline: both sides of depth, per model</h2>" + "".join(
            f"<p>{html.escape(table.caption)}</p>" + _table([html.escape(cell) for cell in table.header],
                                                           [[html.escape(cell) for cell in row] for row in table.rows])
            for table in tables(headlines)))
    rates = rate_table(episodes)
    comparisons = comparison_rows(episodes)
    sections.append("<h2>Models × attacks</h2><p>Rate = recovery on harmful prompts, refusal on benign ones.</p>"
                    + _table(["model", "dataset", "attack", "n", "rate", "95% CI"],
                             [[html.escape(r["model"]), html.escape(r["dataset"]), html.escape(r["attack"]),
                               str(r["n"]), f"{r['rate']:.1%}", f"{r['low']:.0%}–{r['high']:.0%}"] for r in rates]))
    if comparisons:
        sections.append("<h2>Paired comparisons (exact McNemar)</h2>" + _table(
            ["model A", "model B", "dataset", "attack", "n pairs", "A", "B", "only A", "only B", "p"],
            [[html.escape(c["first"]), html.escape(c["second"]), html.escape(c["dataset"]), html.escape(c["attack"]),
              str(c["n"]), f"{c['first_rate']:.0%}", f"{c['second_rate']:.0%}", str(c["only_first"]),
              str(c["only_second"]), f"{c['p_value']:.3g}"] for c in comparisons]))
    within_depth = within_depth_rows(probe_dirs, episodes)
    if within_depth:
        headers, cells = within_depth_table(within_depth)
        sections.append(
            "<h2>Claim (b) within depth: do internal scores predict recovery at a fixed depth?</h2><p>Mean over "
            "depths k ≥ 1 of the AUROC among episodes at that depth (only depths with at least two recovered and two "
            "not-recovered episodes enter; 95% CI: episodes resampled within their depth), beside the AUROC pooled "
            "over depths k ≥ 1, where depth itself can predict both score and recovery, and depth 0 apart.</p>"
            + _table(headers, [[html.escape(cell) for cell in row] for row in cells]))
    matrix = attack_matrix(_harmful(episodes))
    if matrix:
        headers, cells = matrix_table(matrix)
        sections.append("<h2>Attacks × models: recovery on harmful prompts [Wilson 95% CI]</h2>"
                        + _table(headers, [[html.escape(cell) for cell in row] for row in cells]))
    if profiles:
        headers, cells = between_model_table(profiles)
        sections.append("<h2>Between models: mean projection on the original model's refusal direction and recovery, "
                        "per depth</h2>" + _table([html.escape(cell) for cell in headers],
                                                  [[html.escape(cell) for cell in row] for row in cells]))
    sections.append("<h2>Example episodes</h2><p><mark>injected</mark> · <ins>model continuation</ins></p>"
                    + example_html(episodes, decode))
    page = (f"<!doctype html><html><head><meta charset='utf-8'>"
            f"<meta http-equiv='Content-Security-Policy' content=\"{CSP}\"><title>trajalign report</title>"
            f"<style>{STYLE}</style></head><body><h1>trajalign report</h1>"
            f"<p>{len(episodes)} episodes from {html.escape(', '.join(map(str, runs)))}</p>"
            + "\n".join(sections) + "</body></html>")
    out_file.write_text(page, encoding="utf-8")
    _write_markdown(out_file.parent / "summary.md", rates, comparisons)
    if matrix:
        headers, cells = matrix_table(matrix)
        with open(out_file.parent / "summary.md", "a", encoding="utf-8") as file:
            file.write("\nAttacks x models: recovery on harmful prompts [Wilson 95% CI]\n\n"
                       + "\n".join(["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
                                   + ["| " + " | ".join(_md_cell(cell) for cell in row) + " |" for row in cells])
                       + "\n")
    for rows in ([within_depth_table(within_depth)] if within_depth else []) + (
            [between_model_table(profiles)] if profiles else []):
        headers, cells = rows
        with open(out_file.parent / "summary.md", "a", encoding="utf-8") as file:
            file.write("\n" + "\n".join(["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
                                         + ["| " + " | ".join(_md_cell(cell) for cell in row) + " |" for row in cells])
                       + "\n")
    return out_file


def _write_markdown(path: Path, rates: list[dict], comparisons: list[dict]) -> None:
    lines = ["| model | dataset | attack | n | rate | 95% CI |", "|---|---|---|---|---|---|"]
    lines += [f"| {_md_cell(r['model'])} | {_md_cell(r['dataset'])} | {_md_cell(r['attack'])} | {r['n']} | "
              f"{r['rate']:.1%} | {r['low']:.0%}–{r['high']:.0%} |" for r in rates]
    if comparisons:
        lines += ["", "| A | B | dataset | attack | n | A | B | p (McNemar) |", "|---|---|---|---|---|---|---|---|"]
        lines += [f"| {_md_cell(c['first'])} | {_md_cell(c['second'])} | {_md_cell(c['dataset'])} | "
                  f"{_md_cell(c['attack'])} | {c['n']} | {c['first_rate']:.0%} | {c['second_rate']:.0%} | "
                  f"{c['p_value']:.3g} |" for c in comparisons]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")


def _decoder(episodes: list[Episode], tokenizer_spec: str | None):
    """Decode ids with the tokenizer of the episodes' model (only the tokenizer is loaded, and nothing fetched)."""
    from trajalign.models.loading import is_pulled, load_tokenizer
    from trajalign.models.registry import EMBEDDED_MODELS

    spec = tokenizer_spec or episodes[0].model
    if spec in EMBEDDED_MODELS and not is_pulled(spec):
        return lambda ids: f"[{len(ids)} tokens]"
    try:
        tokenizer = load_tokenizer(spec).tokenizer
    except (TrajalignError, OSError, ValueError):
        return lambda ids: f"[{len(ids)} tokens]"
    return lambda ids: tokenizer.decode(ids, skip_special_tokens=True)
