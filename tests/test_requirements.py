import sys
from pathlib import Path

import pytest

from trajalign.attacks import Prefill, PrefillPosition
from trajalign.records import Episode
from trajalign.requirements import PIP_SPECS, MissingDependency, require
from trajalign.runs import EpisodeLog

ROOT = Path(__file__).resolve().parents[1]


def test_missing_package_names_the_pip_line(monkeypatch):
    monkeypatch.setitem(sys.modules, "trl", None)
    with pytest.raises(MissingDependency) as raised:
        require("trl", "training")
    assert str(raised.value) == "training needs trl, which is not installed; install it with: pip install 'trl>=0.20'"
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    with pytest.raises(MissingDependency, match="pip install 'matplotlib>=3.7'"):
        require("matplotlib", "the report")


def test_an_import_error_inside_an_installed_package_is_not_an_install_hint(tmp_path, monkeypatch):
    (tmp_path / "broken_package").mkdir()
    (tmp_path / "broken_package" / "__init__.py").write_text("import a_module_nobody_has_written\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(ModuleNotFoundError, match="a_module_nobody_has_written"):
        require("broken_package", "a test")


def test_every_pip_line_installs_what_pyproject_requires():
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    declared = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    assert set(PIP_SPECS.values()) <= set(declared)


def one_episode_run(directory: Path) -> Path:
    episode = Episode(episode_id="e", model="smollm2-135m", behavior_id="b", dataset="advbench", prompt="p",
                      attack=Prefill(depths=[0]), position=PrefillPosition(depth=0), depth=0, context_ids=[1],
                      answer_start=1, continuation_ids=[2], continuation_text="I cannot", finish_reason="eos",
                      exact_ids=True, refused=True)
    EpisodeLog(directory).append([episode])
    return directory


@pytest.mark.parametrize("package, argv", [
    ("trl", lambda tmp: ["train", "--out", str(tmp / "model")]),
    ("datasets", lambda tmp: ["train", "--out", str(tmp / "model")]),
    ("matplotlib", lambda tmp: ["report", str(one_episode_run(tmp / "run")), "--out", str(tmp / "r.html")]),
    ("accelerate", lambda tmp: ["reproduce", "--out", str(tmp / "reproduce")]),
    ("accelerate", lambda tmp: ["eval", "--model", str(tmp / "model.gguf")]),
])
def test_missing_dependency_is_one_line_and_exit_2(package, argv, cli, tmp_path, monkeypatch):
    (tmp_path / "model.gguf").write_bytes(b"GGUF")
    monkeypatch.setenv("TRAJALIGN_CACHE", str(tmp_path / "cache"))
    monkeypatch.setitem(sys.modules, package, None)
    code, out, err = cli(*argv(tmp_path))
    assert code == 2, (out, err)
    assert err.strip().splitlines() == [f"error: {err.strip()[len('error: '):]}"], err
    assert f"needs {package}, which is not installed" in err and f"pip install '{PIP_SPECS[package]}'" in err
