import re
import shutil
import subprocess

import pytest

from trajalign.attacks import Decoding, Insert, Prefill, PrefillPosition
from trajalign.evaluate import EvalConfig, Evaluation
from trajalign.records import Episode
from trajalign.report import build_report, series_style
from trajalign.runs import EpisodeLog
from trajalign.testing import save_tiny_model

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
needs_chromium = pytest.mark.skipif(CHROMIUM is None and not __import__("os").environ.get("CI"),
                                    reason="chromium is not installed (CI installs it)")


@pytest.fixture(scope="module")
def two_runs(tmp_path_factory):
    from trajalign.models import load_model

    root = tmp_path_factory.mktemp("runs")
    for seed, name in ((0, "model-a"), (1, "model-b")):
        save_tiny_model(root / name, seed=seed)
        handle = load_model(str(root / name))
        for attack in (Prefill(depths=[0, 2, 4]), Insert(after=[1, 3], span_lengths=[2, 4]),
                       Decoding(temperatures=[1.0], top_ps=[1.0], top_ks=[0], samples=2)):
            config = EvalConfig(model=str(root / name), dataset="advbench", limit=4, trajectories="target",
                                attack=attack, max_new_tokens=6, out=root / f"run-{name}" / attack.kind)
            Evaluation(config, handle=handle).run()
        config = EvalConfig(model=str(root / name), dataset="xstest-safe", limit=3, trajectories="target",
                            attack=Prefill(depths=[0]), max_new_tokens=6, out=root / f"run-{name}" / "benign")
        Evaluation(config, handle=handle).run()
    return [root / "run-model-a", root / "run-model-b"]


def render(path, tmp_path, *extra):
    """Load the page in headless Chromium; returns the DOM after load."""
    command = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
               "--disable-component-update", "--no-first-run", f"--user-data-dir={tmp_path / 'profile'}",
               "--virtual-time-budget=3000", *extra, path.as_uri()]
    return subprocess.run(command, capture_output=True, text=True, timeout=120)


def test_report_has_every_section_and_no_external_reference(two_runs, tmp_path):
    page = build_report(two_runs, tmp_path / "report.html")
    text = page.read_text()
    for title in ("Recovery against injection depth", "Insertion attack", "Decoding sweep", "Over-refusal",
                  "Models × attacks", "Paired comparisons", "Example episodes"):
        assert title in text
    assert {p.name for p in tmp_path.glob("*.png")} >= {"recovery_by_depth.png", "insertion_heatmap.png"}
    references = re.findall(r"""(?:src|href|url)\s*[=(]\s*['"]?([^'")\s>]+)""", text)
    assert references and all(ref.startswith("data:") for ref in references)
    assert "default-src 'none'" in text
    assert "| model-a |" in (tmp_path / "summary.md").read_text()


@needs_chromium
def test_report_renders_in_chromium(two_runs, tmp_path):
    page = build_report(two_runs, tmp_path / "report.html")
    dom = render(page, tmp_path, "--dump-dom")
    assert dom.returncode == 0, dom.stderr[-2000:]
    assert dom.stdout.count("<img") >= 4 and "<table>" in dom.stdout
    shot = render(page, tmp_path, "--window-size=1200,2400", f"--screenshot={tmp_path / 'shot.png'}")
    assert shot.returncode == 0
    from PIL import Image

    image = Image.open(tmp_path / "shot.png").convert("RGB")
    colours = dict((colour, count) for count, colour in image.getcolors(maxcolors=1 << 24))
    blue = colours.get((0, 114, 178), 0)  # the first curve's colour, #0072B2
    assert blue > 200, blue  # the figures were decoded and painted, not just referenced


def hostile_run(tmp_path):
    payload = "<script>document.title='owned'</script><img src=x onerror=alert(1)><b>bold</b> | pipe"
    episode = Episode(episode_id="x", model="m<script>", behavior_id="b", dataset="advbench",
                      prompt=f"prompt {payload}", attack=Prefill(depths=[1]), position=PrefillPosition(depth=1),
                      depth=1, context_ids=[1, 2, 3], answer_start=1, injected_spans=[(1, 2)], continuation_ids=[4],
                      continuation_text=payload, finish_reason="eos", exact_ids=True, refused=False)
    EpisodeLog(tmp_path / "run").append([episode])
    return tmp_path / "run"


def test_hostile_output_is_escaped(tmp_path):
    page = build_report([hostile_run(tmp_path)], tmp_path / "out" / "report.html")
    text = page.read_text()
    assert "<script>" not in text and "onerror=alert" not in text.replace("onerror=alert(1)&gt;", "")
    assert "&lt;script&gt;" in text and "&lt;b&gt;bold&lt;/b&gt;" in text
    assert "\\| pipe" in (tmp_path / "out" / "summary.md").read_text() or "pipe" not in (
        tmp_path / "out" / "summary.md").read_text()


@needs_chromium
def test_hostile_output_renders_inert(tmp_path):
    page = build_report([hostile_run(tmp_path)], tmp_path / "out" / "report.html")
    dom = render(page, tmp_path, "--dump-dom").stdout
    assert "<title>trajalign report</title>" in dom  # the injected script did not run
    assert "<b>bold</b>" not in dom and "&lt;b&gt;bold&lt;/b&gt;" in dom
    assert "<img src=\"x\"" not in dom


def test_report_within_depth_section_and_between_model_figure(tmp_path):
    """A probe directory (readings with projections on a shared direction) beside the eval run it read."""
    import json

    import yaml
    from test_probe import synthetic_depth_data

    readings, episodes = synthetic_depth_data({0: 18, 1: 16, 2: 12, 3: 8, 4: 4}, genuine=False)
    EpisodeLog(tmp_path / "study" / "evals" / "m").append(episodes)
    probe = tmp_path / "study" / "probes" / "m"
    probe.mkdir(parents=True)
    (probe / "config.yaml").write_text(yaml.safe_dump({"model": "m"}))
    (probe / "readings.jsonl").write_text("".join(reading.model_dump_json() + "\n" for reading in readings))
    (probe / "predictivity.json").write_text(json.dumps({"direction": {"layer": 1, "position": -1},
                                                         "reference_direction": {"path": "x", "layer": 2}}))
    text = build_report([tmp_path / "study"], tmp_path / "out" / "report.html").read_text()
    assert "Claim (b) within depth" in text and "Between models" in text
    assert (tmp_path / "out" / "between_models.png").exists()
    summary = (tmp_path / "out" / "summary.md").read_text()
    row = next(line for line in summary.splitlines() if line.startswith("| m | projection_L1 |"))
    assert "| 4: [1, 2, 3, 4] | 0.50 [" in row  # within depth: chance, as built
    assert "| 80 (40) |" in row and "| 20 (18) |" in row


def test_between_model_table_reads_the_source_of_the_shared_direction_on_its_own_direction(tmp_path):
    """The model whose direction the others are read on enters the between-model view with its own projections."""
    import json

    import yaml
    from test_probe import synthetic_depth_data

    from trajalign.report import between_model_profiles, between_model_table, collect_episodes

    for name, shared in (("original", None), ("aligned", 2)):
        readings, episodes = synthetic_depth_data({0: 18, 1: 16, 2: 12}, genuine=False)
        episodes = [episode.model_copy(update={"model": name}) for episode in episodes]
        EpisodeLog(tmp_path / "study" / "evals" / name).append(episodes)
        probe = tmp_path / "study" / "probes" / name
        probe.mkdir(parents=True)
        (probe / "config.yaml").write_text(yaml.safe_dump({"model": name}))
        (probe / "readings.jsonl").write_text("".join(reading.model_dump_json() + "\n" for reading in readings))
        results = {"direction": {"layer": 1, "position": -1}}
        if shared is not None:
            results["reference_direction"] = {"path": str(tmp_path / "study" / "probes" / "original" / "direction"),
                                              "layer": shared}
        (probe / "predictivity.json").write_text(json.dumps(results))
    probe_dirs = sorted((tmp_path / "study" / "probes").iterdir())
    profiles = between_model_profiles(probe_dirs, collect_episodes([tmp_path / "study"]))
    assert set(profiles) == {"original", "aligned"}
    own = {row["depth"]: row["mean_projection"] for row in profiles["original"]}
    assert all(row["mean_shared_projection"] == own[row["depth"]] for row in profiles["original"])
    header, rows = between_model_table(profiles)
    assert header[1:] == ["aligned: projection / recovery", "original: projection / recovery"] and len(rows) == 3


def test_the_compare_presets_models_each_get_their_own_colour_and_marker():
    looks = {(style["color"], style["marker"]) for style in map(series_style, range(20))}
    assert len(looks) == 20
