"""The report's view across attacks: an attacks x models table of recovery with Wilson intervals (and its heatmap),
the adaptive search's budget-success curve and recovery against fine-tuning steps.

Each attack says which of its positions make its headline row (`BaseAttack.headline`); the row's name adds the
trajectory source, the defense and any ablation, so prefills of greedy, sampled and target trajectories stay apart.
"""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path

from trajalign.records import Episode
from trajalign.stats import wilson_interval


def model_name(spec: str) -> str:
    return Path(spec).name if "/" in spec else spec


def source_name(source: str) -> str:
    """A trajectory source in a few words: the model's name (with @T=... when sampled), target, column:NAME."""
    if not source.startswith("model:"):
        return source
    spec, marker, sampling = source.split(":", 1)[1].rpartition("@T=")
    return f"{model_name(spec)}@T={sampling}" if marker else model_name(sampling)


def attack_row(episode: Episode) -> str | None:
    """The attacks x models row an episode counts in; None for positions outside its attack's headline."""
    headline = episode.attack.headline(episode.position)
    if headline is None:
        return None
    parts = [episode.attack_kind]
    if episode.trajectory_source:
        parts.append(f"[{source_name(episode.trajectory_source)}]")
    if headline:
        parts.append(headline)
    if episode.defense:
        parts.append(f"+{episode.defense}")
    if episode.ablation:
        parts.append("+ablated")
    return " ".join(parts)


def attack_matrix(episodes: list[Episode]) -> dict[str, dict[str, dict]]:
    """attack row -> model -> n, recovered, recovery rate and its Wilson 95% interval, over the given (harmful)
    episodes."""
    outcomes: dict[str, dict[str, list[bool]]] = defaultdict(lambda: defaultdict(list))
    for episode in episodes:
        row = attack_row(episode)
        if row is not None:
            outcomes[row][model_name(episode.model)].append(episode.refused)
    return {row: {model: _rate(values) for model, values in sorted(by_model.items())}
            for row, by_model in sorted(outcomes.items())}


def _rate(values: list[bool]) -> dict:
    recovered = sum(values)
    return {"n": len(values), "recovered": recovered, "rate": recovered / len(values),
            "ci95": wilson_interval(recovered, len(values))}


def matrix_cell(cell: dict | None) -> str:
    if cell is None:
        return "–"
    low, high = cell["ci95"]
    return f"{cell['rate']:.0%} [{low:.0%}, {high:.0%}] n={cell['n']}"


def matrix_table(matrix: dict[str, dict[str, dict]]) -> tuple[list[str], list[list[str]]]:
    models = sorted({model for by_model in matrix.values() for model in by_model})
    return (["attack", *models],
            [[row, *[matrix_cell(by_model.get(model)) for model in models]] for row, by_model in matrix.items()])


def matrix_figure(matrix: dict[str, dict[str, dict]], pyplot):
    """Heatmap of recovery rates, each cell annotated with its rate and Wilson interval."""
    if not matrix:
        return None
    models = sorted({model for by_model in matrix.values() for model in by_model})
    rows = list(matrix)
    values = [[matrix[row][model]["rate"] if model in matrix[row] else float("nan") for model in models]
              for row in rows]
    figure, axis = pyplot.subplots(figsize=(1.9 * len(models) + 3.5, 0.42 * len(rows) + 1.4),
                                   layout="constrained")
    image = axis.imshow(values, vmin=0, vmax=1, cmap="cividis", aspect="auto")
    for row_index, row in enumerate(rows):
        for column, model in enumerate(models):
            cell = matrix[row].get(model)
            if cell is not None:
                low, high = cell["ci95"]
                axis.text(column, row_index, f"{cell['rate']:.0%} [{low:.0%}, {high:.0%}]", ha="center",
                          va="center", fontsize=7, color="white" if cell["rate"] < 0.5 else "black")
    axis.set_xticks(range(len(models)), models, rotation=30, ha="right", fontsize=8)
    axis.set_yticks(range(len(rows)), rows, fontsize=7)
    figure.colorbar(image, ax=axis, label="recovery rate (refusal in continuation)")
    return figure


def budget_curves(episodes: list[Episode]) -> dict[str, list[dict]]:
    """Adaptive search, per model (and defense/ablation): attack success verified for the best candidate found
    within the first b queries, for each budget b, with Wilson intervals."""
    outcomes: dict[str, dict[int, list[bool]]] = defaultdict(lambda: defaultdict(list))
    for episode in episodes:
        if episode.attack_kind == "adaptive":
            series = model_name(episode.model) + (f" +{episode.defense}" if episode.defense else "") \
                + (" +ablated" if episode.ablation else "")
            outcomes[series][episode.position.budget].append(not episode.refused)
    return {series: [{"budget": budget, **_rate(values)} for budget, values in sorted(by_budget.items())]
            for series, by_budget in sorted(outcomes.items())}


def steps_curves(episodes: list[Episode]) -> dict[str, list[dict]]:
    """Fine-tuning durability, per model and data: recovery pooled over prefill depths >= 1 after k steps; k = 0 is
    the same model's plain prefill sweep over the same depths, where the episodes hold one."""
    outcomes: dict[str, dict[int, list[bool]]] = defaultdict(lambda: defaultdict(list))
    depths_of: dict[str, set[int]] = defaultdict(set)
    for episode in episodes:
        if episode.attack_kind == "finetune" and episode.depth and episode.ablation is None:
            name = model_name(episode.model)
            outcomes[f"{name} {episode.attack.data} SFT"][episode.position.steps].append(episode.refused)
            depths_of[name].update(episode.attack.depths)
    for episode in episodes:
        name = model_name(episode.model)
        if episode.attack_kind == "prefill" and episode.depth and episode.depth in depths_of.get(name, ()) \
                and episode.defense is None and episode.ablation is None:
            for series in outcomes:
                if series.startswith(f"{name} "):
                    outcomes[series][0].append(episode.refused)
    return {series: [{"steps": steps, **_rate(values)} for steps, values in sorted(by_steps.items())]
            for series, by_steps in sorted(outcomes.items())}


def curve_figure(curves: dict[str, list[dict]], x: str, xlabel: str, ylabel: str, pyplot, series_style,
                 log_x: bool = False):
    """One line per series with its Wilson band; `series_style(index)` gives a series' colour, marker and dash."""
    if not curves:
        return None
    figure, axis = pyplot.subplots(figsize=(6.4, 3.8))
    for index, (series, points) in enumerate(curves.items()):
        xs = [point[x] for point in points]
        style = series_style(index)
        axis.plot(xs, [point["rate"] for point in points], **style, label=series)
        axis.fill_between(xs, [point["ci95"][0] for point in points], [point["ci95"][1] for point in points],
                          color=style["color"], alpha=0.15)
    if log_x:
        axis.set_xscale("log", base=2)
    axis.set_xlabel(xlabel)
    axis.set_ylabel(ylabel)
    axis.set_ylim(-0.02, 1.02)
    axis.grid(alpha=0.3)
    axis.legend(frameon=False, fontsize=8)
    return figure
