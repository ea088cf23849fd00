"""The study's headline: per model, harmful recovery beside benign false breaks, over-refusal and utility.

Each evaluation's summary rows count refusals (`Episode.refused`); what a refusal means depends on the prompts:
on harmful prompts it is a recovery, on benign ones an over-refusal (at depth 0) or a false break (after a benign
prefill or insertion). Depth discriminates when a model recovers from harm at every depth and carries on with
everything else, so the headline puts both sides in one row per model, and the frontier plots the worst cell of
each side: the lowest recovery over depths and insertion against the highest benign refusal over sources (or the
highest false break over depths and insertion).
"""

from __future__ import annotations

from dataclasses import dataclass

HARMFUL_SWEEP, HARMFUL_INSERT = "prefill", "insert"
BENIGN_SWEEP, BENIGN_INSERT = "benign-prefill", "benign-insert"
BENIGN_SOURCES = {"xstest-safe": "XSTest safe", "jbb-benign": "JailbreakBench benign",
                  "self-instruct-user": "Self-Instruct user tasks", "coconot-contrast": "CoCoNot contrast"}


@dataclass(frozen=True)
class Cell:
    """A count of refusals out of n, with its Wilson 95% interval."""

    refused: int
    n: int
    low: float
    high: float

    @property
    def rate(self) -> float:
        return self.refused / self.n

    @classmethod
    def of(cls, row: dict) -> "Cell":
        low, high = row["refusal_ci95"]
        return cls(row["refused"], row["n"], low, high)

    def __str__(self) -> str:
        return f"{self.rate:.0%} [{self.low:.0%}, {self.high:.0%}]"


def by_depth(rows: list[dict]) -> dict[int, Cell]:
    return {row["depth"]: Cell.of(row) for row in rows}


def single(rows: list[dict]) -> Cell | None:
    """The one position of an evaluation with one position (an insertion point, depth 0)."""
    return Cell.of(rows[0]) if len(rows) == 1 else None


def attempts(rows: list[dict]) -> Cell | None:
    """Share of benign answers that attempt the task, where a judge said so (the `pmi` judge)."""
    row = rows[0] if len(rows) == 1 else None
    if row is None or "attempts_task" not in row:
        return None
    low, high = row["attempts_task_ci95"]
    return Cell(row["attempts_task"], row["n"], low, high)


def worst(cells: list[Cell | None], highest: bool) -> Cell | None:
    present = [cell for cell in cells if cell is not None]
    if not present:
        return None
    return (max if highest else min)(present, key=lambda cell: cell.rate)


@dataclass
class Headline:
    """One model's side-by-side figures."""

    model: str
    recovery: dict[int, Cell]  # harmful prefill, depth -> refusal (depth 0: refusal with nothing injected)
    insertion: Cell | None
    false_break: dict[int, Cell]  # benign prefill, depth -> refusal
    benign_insertion: Cell | None
    over_refusal: dict[str, Cell]  # benign source -> refusal at depth 0
    attempts_task: dict[str, Cell]  # benign source -> answers that attempt the task
    utility: dict[str, dict]  # reference set -> the utility comparison (relative NLL change, interval)

    @property
    def worst_recovery(self) -> Cell | None:
        return worst([cell for depth, cell in self.recovery.items() if depth > 0] + [self.insertion], False)

    @property
    def worst_over_refusal(self) -> Cell | None:
        return worst(list(self.over_refusal.values()), True)

    @property
    def worst_false_break(self) -> Cell | None:
        return worst([cell for depth, cell in self.false_break.items() if depth > 0] + [self.benign_insertion], True)


def headline(model: str, results: dict[str, list[dict]], utility: dict[str, dict] | None = None) -> Headline:
    """`results`: evaluation name -> its summary rows (names as in HARMFUL_*, BENIGN_* and BENIGN_SOURCES)."""
    return Headline(
        model=model, recovery=by_depth(results.get(HARMFUL_SWEEP, [])),
        insertion=single(results.get(HARMFUL_INSERT, [])), false_break=by_depth(results.get(BENIGN_SWEEP, [])),
        benign_insertion=single(results.get(BENIGN_INSERT, [])),
        over_refusal={source: Cell.of(results[source][0]) for source in BENIGN_SOURCES if results.get(source)},
        attempts_task={source: cell for source in BENIGN_SOURCES if results.get(source)
                       for cell in [attempts(results[source])] if cell is not None},
        utility=utility or {})


def _cell(cell: Cell | None) -> str:
    return str(cell) if cell is not None else "–"


def _utility_cell(comparison: dict | None) -> str:
    if not comparison or "relative_change_pct" not in comparison:
        return "–"
    low, high = comparison["relative_change_pct_ci95"]
    return f"{comparison['relative_change_pct']:+.1f}% [{low:+.1f}, {high:+.1f}]"


def markdown(headlines: list[Headline]) -> list[str]:
    """Three tables, one row per model: harm (recovery), benign perturbations (false break), benign prompts at
    depth 0 (over-refusal, attempts, utility)."""
    depths = sorted({depth for h in headlines for depth in h.recovery})
    benign_depths = sorted({depth for h in headlines for depth in h.false_break if depth > 0})
    sources = [source for source in BENIGN_SOURCES if any(source in h.over_refusal for h in headlines)]
    utility_sets = sorted({name for h in headlines for name in h.utility})
    lines = ["Harmful prompts (held-out AdvBench): refusal with nothing injected, then recovery after a prefill of k "
             "tokens of a harmful answer and after an insertion into the model's own answer.", "",
             _row(["model", *["refuse @0" if d == 0 else f"recover @{d}" for d in depths], "insertion"]),
             _rule(len(depths) + 2)]
    lines += [_row([h.model, *[_cell(h.recovery.get(d)) for d in depths], _cell(h.insertion)]) for h in headlines]
    if benign_depths:
        lines += ["", "Benign controls: the same perturbations where the right behaviour is to carry on (a prefill of "
                  "the original model's own benign answer; a span of another benign answer inserted). False break "
                  "= a refusal begins in the continuation.", "",
                  _row(["model", *[f"false break @{d}" for d in benign_depths], "benign insertion"]),
                  _rule(len(benign_depths) + 2)]
        lines += [_row([h.model, *[_cell(h.false_break.get(d)) for d in benign_depths], _cell(h.benign_insertion)])
                  for h in headlines]
    if sources:
        lines += ["", "Benign prompts at depth 0: refused (over-refusal) per source; attempts the task (pmi judge) "
                  "per source; utility = change of the mean per-token NLL of human reference answers against the "
                  "original model (paired bootstrap 95% CI; lower is better).", "",
                  _row(["model", *[f"{BENIGN_SOURCES[s]} refused" for s in sources],
                        *[f"{BENIGN_SOURCES[s]} attempts" for s in sources if any(s in h.attempts_task
                                                                                    for h in headlines)],
                        *[f"NLL change ({name})" for name in utility_sets]]),
                  _rule(1 + len(sources) + sum(any(s in h.attempts_task for h in headlines) for s in sources)
                        + len(utility_sets))]
        for h in headlines:
            lines.append(_row([h.model, *[_cell(h.over_refusal.get(s)) for s in sources],
                               *[_cell(h.attempts_task.get(s)) for s in sources
                                 if any(s in other.attempts_task for other in headlines)],
                               *[_utility_cell(h.utility.get(name)) for name in utility_sets]]))
    return lines


def _row(cells: list[str]) -> str:
    return "| " + " | ".join(cells) + " |"


def _rule(columns: int) -> str:
    return "|" + "---|" * columns
