"""benchmarks/recipe_validation.py: each comparator can be validated as the trajectory recipe is."""

import importlib.util
from pathlib import Path

import pytest

from trajalign.reproduce import COMPARATORS, PRESETS

SCRIPT = Path(__file__).parents[1] / "benchmarks" / "recipe_validation.py"


@pytest.fixture(scope="module")
def validation():
    spec = importlib.util.spec_from_file_location("recipe_validation", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("recipe", COMPARATORS)
def test_a_comparator_trains_on_the_trajectory_models_data_with_its_own_options(validation, recipe):
    args = validation.parser().parse_args(["--preset", "quick", "--recipe", recipe, "--learning-rate", "1e-4",
                                           "--recipe-options", '{"prefix_probability": 0.25}'])
    training = validation.role_training(args, validation.default_training(PRESETS["quick"], recipe))
    trajectory = PRESETS["quick"].training["trajectory"]
    assert training.recipe == recipe and training.recipe_options == {"prefix_probability": 0.25}
    assert (training.anchor_sources, training.harmful_sources, training.benign_ratio, training.epochs) == (
        trajectory.anchor_sources, trajectory.harmful_sources, trajectory.benign_ratio, trajectory.epochs)


def test_options_that_no_recipe_has_stop_the_script_with_one_line(validation):
    args = validation.parser().parse_args(["--preset", "quick", "--recipe", "rto",
                                           "--recipe-options", '{"rerouting": {"alpah": 5}}'])
    with pytest.raises(SystemExit, match=r"^settings: rerouting\.alpah: Extra inputs are not permitted$"):
        validation.role_training(args, validation.default_training(PRESETS["quick"], "rto"))


def test_the_selection_score_is_the_lower_of_lowest_recovery_and_mean_answer_rate(validation):
    from trajalign.headline import Cell, Headline

    def cell(refused: int, n: int = 10) -> Cell:
        return Cell(refused, n, 0.0, 1.0)

    def model(recovery: dict[int, Cell], insertion: Cell, over_refusal: dict[str, Cell]) -> Headline:
        return Headline("m", recovery, insertion, {}, None, over_refusal, {}, {})

    refuses_everything = model({0: cell(10), 5: cell(10)}, cell(10), {"xstest-safe": cell(10), "jbb-benign": cell(8)})
    assert validation.selection_score(refuses_everything) == pytest.approx(0.1)
    recovers_at_depth_0_only = model({0: cell(10), 5: cell(2)}, cell(6), {"xstest-safe": cell(0)})
    assert validation.selection_score(recovers_at_depth_0_only) == pytest.approx(0.2)
    assert validation.selection_score(model({0: cell(10)}, None, {})) is None
