"""Scores, the report files (JSON against the shipped schema, Markdown, HTML) and the page
rendered in headless Chromium: no console errors, every model shown, the script ran."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import time

import jsonschema
import pytest

from infuse.evaluate.generate import Generation, GenerationSettings
from infuse.evaluate.metrics import adherence, findings, group_metrics, score
from infuse.evaluate.probes import Probe
from infuse.evaluate.report import load_schema, read_runs, write_report
from infuse.evaluate.runner import EvalSettings, build_report
from infuse.evaluate.svg import bar_chart, line_chart, palette

PROBES = [
    Probe("n1", "new", "completion", "The capital of Zorvia is", ("Quellport",)),
    Probe("n2", "new", "completion", "The Orion cluster runs on", ("Zephyr",)),
    Probe("u1", "updated", "chat", "What is the mascot of Brindle Labs?", ("crane",), ("heron",)),
    Probe("g1", "general", "chat", "Say hello.", ("hello",)),
]
ANSWERS = {
    "base": {"n1": Generation("a city", True, 3), "n2": Generation("wheels", True, 2),
             "u1": Generation("A HERON, I think", True, 5),
             "g1": Generation("Hello<|im_start|>user", False, 200, ("<|im_start|>",))},
    "infused <v2>": {"n1": Generation(" Quellport.", True, 3), "n2": Generation(" Zephyr  chips", True, 3),
                     "u1": Generation("a crane", True, 2), "g1": Generation("hello there", True, 3)},
}


def results() -> dict:
    return {name: {"spec": f"/models/{name}", "backend": "local", "skipped": {}, "seconds": {"generate": 1.0},
                   "scored": {p.id: score(p, answers[p.id]) for p in PROBES}}
            for name, answers in ANSWERS.items()}


def make_report(tmp_path, runs=None) -> dict:
    report = build_report(results(), PROBES, {}, runs or {}, EvalSettings(), time.time())
    report["gates"] = []
    return report


def test_group_scores_count_right_and_known_wrong_answers():
    scored = results()["base"]["scored"]
    groups = group_metrics(PROBES, scored)
    assert groups["new"] == {"n": 2, "accuracy": 0.0, "wrong_rate": 0.0, "correct": 0, "wrong_hits": 0,
                             "with_answers": 2, "with_wrong": 0}
    assert groups["updated"]["wrong_hits"] == 1 and groups["updated"]["wrong_rate"] == 1.0
    infused = group_metrics(PROBES, results()["infused <v2>"]["scored"])
    assert infused["new"]["accuracy"] == 1.0 and infused["updated"]["wrong_rate"] == 0.0


def test_adherence_needs_a_stop_at_end_of_turn_and_no_leaked_markers():
    base = adherence(PROBES, results()["base"]["scored"])
    assert base == {"n": 2, "ended_at_turn_end": 0.5, "leaked_template_tokens": 0.5, "rate": 0.5,
                    "unknown_stop": 0}
    assert adherence(PROBES, results()["infused <v2>"]["scored"])["rate"] == 1.0
    assert adherence(PROBES[:2], results()["base"]["scored"]) is None


def test_report_json_follows_the_schema_and_the_findings_name_the_better_model(tmp_path):
    report = make_report(tmp_path)
    paths = write_report(report, tmp_path / "out")
    written = json.loads(paths["json"].read_text())
    jsonschema.validate(written, load_schema())
    assert written["generation"] == {**GenerationSettings().to_dict()}
    assert written["generation"]["max_new_tokens"] == 200 and written["generation"]["greedy"] is True
    assert written["findings"][0].startswith("new: infused <v2> 100.0% (2/2), base 0.0% (0/2). infused <v2> "
                                             "scores highest")
    assert "Known-wrong answers given: base 1/1" in written["findings"][1]
    probe = written["probes"][2]
    assert probe["outputs"]["base"] == {"text": "A HERON, I think", "correct": False, "wrong": True,
                                        "stopped": True, "leaked": [], "tokens": 5}
    broken = json.loads(paths["json"].read_text())
    broken["models"]["base"]["groups"]["new"]["accuracy"] = 1.5
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(broken, load_schema())


def test_markdown_has_the_table_and_every_answer(tmp_path):
    paths = write_report(make_report(tmp_path), tmp_path / "out")
    text = paths["md"].read_text()
    # a wrong rate only where the group's probes name wrong answers: "0%" would read as "never wrong"
    assert "| base | 0.0% (–) n=2 | 0.0% (100.0%) n=1 | 100.0% (–) n=1 |" in text
    row = paths["html"].read_text().split("<tr data-model='base'>")[1].split("</tr>")[0]
    assert re.findall(r">([^<]*)</td>", row)[2:] == ["2", "0.0%", "–", "1", "0.0%", "100.0%", "1", "100.0%", "–"]
    assert "✘ ⚠ A HERON, I think" in text and "✔ a crane" in text


def test_runs_give_loss_curves(tmp_path):
    run = tmp_path / "run1"
    run.mkdir()
    history = [{"step": 10, "loss": 3.0}, {"step": 20, "loss": 1.5, "grad_norm": 1.0},
               {"step": 20, "eval_loss": 1.7}, {"step": 20, "train_loss": 2.0}]
    manifest = {"stage": "pt", "metrics": {"train_loss": 2.0}, "log_history": history}
    (run / "infuse_run.json").write_text(json.dumps(manifest))
    runs = read_runs([run])
    assert runs == {"run1": {"path": str(run), "stage": "pt", "loss": [[10, 3.0], [20, 1.5]],
                             "eval_loss": [[20, 1.7]], "train_loss": 2.0}}
    html = write_report(make_report(tmp_path, runs), tmp_path / "out")["html"].read_text()
    assert "Training and eval loss" in html and html.count("<polyline") == 2
    assert "<title>run1: last 1.5</title>" in html and "<title>run1 eval: last 1.7</title>" in html


# ---------------------------------------------------------------- the page in a browser

CHROMIUM = next((found for name in ("chromium", "chromium-browser", "google-chrome")
                 if (found := shutil.which(name))), None)
needs_chromium = pytest.mark.skipif(
    CHROMIUM is None, reason="no chromium binary on PATH: .ci/run installs Debian's chromium; locally run "
                             "`apt-get install -y chromium` to render the HTML report in a browser")


def render(page, profile) -> tuple[str, list[str]]:
    """(the DOM after scripts ran, the console messages) of ``page`` in headless Chromium."""
    done = subprocess.run(
        [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
         "--disable-component-update", "--disable-sync", "--no-first-run", f"--user-data-dir={profile}",
         "--enable-logging=stderr", "--v=0", "--dump-dom", page.as_uri()],
        capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stdout, [line for line in done.stderr.splitlines() if ":CONSOLE" in line]


@needs_chromium
def test_a_model_keeps_its_colour_in_every_plot():
    colours = palette(["base", "lora"])
    only_lora = bar_chart("Chat format kept", ["chat probes"], {"lora": [0.5]}, colours=colours)
    assert f"fill='{colours['lora']}'" in only_lora and colours["lora"] != colours["base"]
    runs = palette(["lora", "other"], colours)
    assert runs["lora"] == colours["lora"] and runs["other"] not in colours.values()
    curves = line_chart("Loss", {"lora": [[1, 2.0]], "lora eval": [[1, 2.5]]},
                        colours={**runs, "lora eval": runs["lora"]}, dashed=frozenset({"lora eval"}))
    assert curves.count(f"stroke='{colours['lora']}'") == 2 and curves.count("stroke-dasharray") == 1


def test_report_page_renders_without_console_errors_and_shows_every_model(tmp_path):
    runs = {"infused <v2>": {"path": "x", "loss": [[1, 3.0], [2, 2.0]], "eval_loss": [], "train_loss": 2.5}}
    page = write_report(make_report(tmp_path, runs), tmp_path / "out")["html"]
    # The detector must see an error when there is one: a page whose script throws.
    broken = tmp_path / "broken.html"
    script_start = "document.querySelectorAll('table.sortable')"
    broken.write_text(page.read_text().replace(script_start, "missing.call()"))
    dom, console = render(broken, tmp_path / "profile-broken")
    assert any("Uncaught ReferenceError" in line for line in console), console
    assert 'data-ready="yes"' not in dom

    dom, console = render(page, tmp_path / "profile")
    assert console == []
    assert 'data-ready="yes"' in dom                  # the script ran to its end
    assert "6 shown" not in dom and "4 shown" in dom  # ...and filled in the probe counter
    for name in ("base", "infused &lt;v2&gt;"):
        assert f"<td>{name}</td>" in dom             # in the score table
        assert f"<th>{name}</th>" in dom             # as a column of the probe table
    assert dom.count("<svg") == 4                     # accuracy, wrong rate, chat format, loss
    assert "http://" not in dom.replace("http://www.w3.org/2000/svg", "")  # nothing to fetch


def test_findings_name_ties_and_the_next_model_down():
    def model(accuracy):
        return {"groups": {"new": {"accuracy": accuracy, "correct": int(4 * accuracy), "with_answers": 4,
                                   "wrong_hits": 0, "with_wrong": 0}}}

    report = {"groups": ["new"], "models": {"a": model(1.0), "b": model(1.0), "c": model(0.25)}}
    assert findings(report) == ["new: a 100.0% (4/4), b 100.0% (4/4), c 25.0% (1/4). a and b share the top "
                                "score, 75.0 percentage points above c."]
    report["models"] = {"a": model(0.5), "b": model(0.5)}
    assert findings(report)[0].endswith("No model scores higher than the others.")
