"""report.html: one self-contained page (inline CSS, SVG and script; nothing fetched) with the
findings, plots (accuracy and wrong rate per group, perplexity, chat format, training loss) and
tables, down to every model's answer to every probe side by side.

The plots are SVG built here from the numbers, so the page needs no plotting library. The small
script sorts a table when its header is clicked and filters the probe table by group or to the
probes where the models disagree.
"""

from __future__ import annotations

from html import escape

from infuse import __version__
from infuse.evaluate.metrics import shown_wrong_rate
from infuse.evaluate.svg import bar_chart, line_chart, palette

CSS = """
body{font:14px/1.45 system-ui,-apple-system,'Segoe UI',sans-serif;margin:0 auto;max-width:1200px;
padding:0 1.5em 3em;color:#222}
h1{margin:.8em 0 .1em}h2{margin-top:1.6em;border-bottom:1px solid #ddd;padding-bottom:.2em}
.meta{color:#666}.charts{display:flex;flex-wrap:wrap;gap:1.5em}.charts figure{margin:0}
figcaption{font-weight:600;margin-bottom:.3em}
table{border-collapse:collapse;margin:.5em 0}
th,td{border:1px solid #ddd;padding:.3em .6em;vertical-align:top;text-align:left}
th{background:#f5f5f5;cursor:pointer;user-select:none}
th.sorted-asc::after{content:' ▲'}th.sorted-desc::after{content:' ▼'}
td.num{text-align:right;font-variant-numeric:tabular-nums}
td.ok{background:#e8f5e9}td.bad{background:#fdecea}td.stale{background:#fff4e0}
.answer{white-space:pre-wrap;max-width:28em;font-family:ui-monospace,monospace;font-size:12px}
.tag{font-size:11px;border-radius:3px;padding:0 .3em;margin-right:.3em;color:#fff}
.tag.ok{background:#2e7d32}.tag.bad{background:#c62828}.tag.stale{background:#ef6c00}.tag.leak{background:#6a1b9a}
.gate-failed{color:#c62828;font-weight:600}.gate-ok{color:#2e7d32}
.controls{margin:.5em 0}.controls label{margin-right:1.2em}
"""

SCRIPT = """
(function () {
  function cellValue(row, index) {
    var cell = row.cells[index];
    var raw = cell ? (cell.getAttribute('data-value') || cell.textContent) : '';
    var number = parseFloat(raw);
    return isNaN(number) ? raw.toLowerCase() : number;
  }
  function sortBy(table, index, header) {
    var body = table.tBodies[0];
    var rows = Array.prototype.slice.call(body.rows);
    var descending = header.classList.contains('sorted-asc');
    rows.sort(function (a, b) {
      var x = cellValue(a, index), y = cellValue(b, index);
      var order = x < y ? -1 : x > y ? 1 : 0;
      return descending ? -order : order;
    });
    Array.prototype.forEach.call(table.querySelectorAll('th'), function (th) {
      th.classList.remove('sorted-asc', 'sorted-desc');
    });
    header.classList.add(descending ? 'sorted-desc' : 'sorted-asc');
    rows.forEach(function (row) { body.appendChild(row); });
  }
  document.querySelectorAll('table.sortable').forEach(function (table) {
    table.querySelectorAll('thead th').forEach(function (header, index) {
      header.addEventListener('click', function () { sortBy(table, index, header); });
    });
  });
  var group = document.getElementById('probe-group');
  var disagree = document.getElementById('probe-disagree');
  var counter = document.getElementById('probe-count');
  function filterProbes() {
    var shown = 0;
    document.querySelectorAll('#probes tbody tr').forEach(function (row) {
      var visible = (!group.value || row.getAttribute('data-group') === group.value) &&
                    (!disagree.checked || row.getAttribute('data-disagree') === 'yes');
      row.hidden = !visible;
      if (visible) { shown += 1; }
    });
    counter.textContent = shown + ' shown';
  }
  if (group && disagree && counter) {
    group.addEventListener('change', filterProbes);
    disagree.addEventListener('change', filterProbes);
    filterProbes();
  }
  document.documentElement.setAttribute('data-ready', 'yes');
})();
"""


def render_html(report: dict) -> str:
    """The whole page as one string."""
    body = [
        f"<h1>infuse evaluation</h1><p class='meta'>{_meta(report)}</p>",
        _findings(report), _charts(report), _score_table(report), _perplexity_table(report),
        _adherence_table(report), _lm_eval_table(report), _gates(report), _probe_table(report),
    ]
    return ("<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'>"
            "<meta name='viewport' content='width=device-width,initial-scale=1'>"
            f"<title>infuse evaluation: {escape(', '.join(report['models']))}</title>"
            f"<style>{CSS}</style></head><body>{''.join(part for part in body if part)}"
            f"<script>{SCRIPT}</script></body></html>\n")


def _meta(report: dict) -> str:
    gen = report["generation"]
    return escape(
        f"{len(report['probes'])} probes · models {', '.join(report['models'])} · max_new_tokens "
        f"{gen['max_new_tokens']}, temperature {gen['temperature']}, top_p {gen['top_p']}"
        f"{' (greedy)' if gen.get('greedy') else ''} · "
        f"{report.get('timing', {}).get('total_seconds', '?')} s · "
        f"{report.get('created', '')} · infuse {report.get('infuse_version', __version__)}")


def _findings(report: dict) -> str:
    items = "".join(f"<li>{escape(line)}</li>" for line in report.get("findings", []))
    return f"<h2>Findings</h2><ul id='findings'>{items}</ul>" if items else ""


def _charts(report: dict) -> str:
    models, groups = list(report["models"]), report["groups"]
    colours = palette(models)  # a model keeps its colour in every plot

    def per_group(value) -> dict[str, list[float | None]]:
        return {name: [value(report["models"][name]["groups"].get(g)) for g in groups] for name in models}

    figures = [bar_chart("Accuracy per group", groups, per_group(lambda g: _get(g, "accuracy")), colours=colours),
               bar_chart("Wrong-answer rate per group", groups, per_group(shown_wrong_rate), colours=colours)]
    datasets = list(report.get("heldout", {}))
    if datasets:
        values = {n: [report["models"][n].get("perplexity", {}).get(d) for d in datasets] for n in models}
        figures.append(bar_chart("Perplexity on held-out text (lower is better)", datasets, values,
                                 percent=False, colours=colours))
    adherent = {n: [m["adherence"]["rate"]] for n, m in report["models"].items() if m.get("adherence")}
    if adherent:
        figures.append(bar_chart("Chat format kept", ["chat probes"], adherent, colours=colours))
    runs = report.get("runs") or {}
    curves = {name: run["loss"] for name, run in runs.items()}
    evaluated = {f"{name} eval": run["eval_loss"] for name, run in runs.items() if run.get("eval_loss")}
    if any(curves.values()):
        title = "Training and eval loss" if evaluated else "Training loss"
        run_colours = palette(list(curves), colours)
        run_colours |= {f"{name} eval": run_colours[name] for name in runs}  # its run's colour, dashed
        figures.append(line_chart(title, {**curves, **evaluated}, x_label="step", y_label="loss",
                                  colours=run_colours, dashed=frozenset(evaluated)))
    return "<h2>Plots</h2><div class='charts'>" + "".join(figures) + "</div>"


def _get(metrics: dict | None, key: str) -> float | None:
    return None if not metrics else metrics.get(key)


def _table(table_id: str, headers: list[str], rows: list[str]) -> str:
    head = "".join(f"<th>{escape(h)}</th>" for h in headers)
    return (f"<table class='sortable' id='{table_id}'><thead><tr>{head}</tr></thead>"
            f"<tbody>{''.join(rows)}</tbody></table>")


def _num(value: float | None, percent: bool = False, digits: int = 3) -> str:
    if value is None:
        return "<td class='num' data-value=''>–</td>"
    shown = f"{100 * value:.1f}%" if percent else f"{value:.{digits}f}"
    return f"<td class='num' data-value='{value}'>{shown}</td>"


def _score_table(report: dict) -> str:
    headers = ["model", "backend"]
    for group in report["groups"]:
        headers += [f"{group} n", f"{group} accuracy", f"{group} wrong rate"]
    rows = []
    for name, model in report["models"].items():
        cells = [f"<td>{escape(name)}</td><td>{escape(model.get('backend', ''))}</td>"]
        for group in report["groups"]:
            g = model["groups"].get(group)
            cells.append(_num(g["n"], digits=0) + _num(g["accuracy"], True) + _num(shown_wrong_rate(g), True)
                         if g else _num(None) * 3)
        rows.append(f"<tr data-model='{escape(name, quote=True)}'>{''.join(cells)}</tr>")
    return "<h2>Scores per group</h2>" + _table("scores", headers, rows)


def _perplexity_table(report: dict) -> str:
    datasets = list(report.get("heldout", {}))
    if not datasets:
        return ""
    rows = [f"<tr><td>{escape(n)}</td>{''.join(_num(m.get('perplexity', {}).get(d)) for d in datasets)}</tr>"
            for n, m in report["models"].items()]
    notes = "".join(f"<li>{escape(n)}: {escape(m['perplexity_skipped'])}</li>"
                    for n, m in report["models"].items() if m.get("perplexity_skipped"))
    return ("<h2>Perplexity on held-out text</h2>" + _table("perplexity", ["model", *datasets], rows)
            + (f"<ul class='meta'>{notes}</ul>" if notes else ""))


def _adherence_table(report: dict) -> str:
    rows = [f"<tr><td>{escape(n)}</td>{_num(a['n'], digits=0)}{_num(a['ended_at_turn_end'], True)}"
            f"{_num(a['leaked_template_tokens'], True)}{_num(a['rate'], True)}</tr>"
            for n, m in report["models"].items() if (a := m.get("adherence"))]
    if not rows:
        return ""
    return ("<h2>Chat format</h2><p class='meta'>A chat answer keeps the format when generation stopped at "
            "end-of-turn before max_new_tokens and no template marker appears in it.</p>"
            + _table("adherence", ["model", "chat probes", "ended at end-of-turn", "leaked template",
                                   "kept format"], rows))


def _lm_eval_table(report: dict) -> str:
    results = [(n, task, metric, value) for n, m in report["models"].items()
               for task, metrics in (m.get("lm_eval") or {}).items() for metric, value in metrics.items()]
    if not results:
        return ""
    rows = [f"<tr><td>{escape(n)}</td><td>{escape(t)}</td><td>{escape(k)}</td>{_num(v, digits=4)}</tr>"
            for n, t, k, v in results]
    return "<h2>lm-evaluation-harness</h2>" + _table("lm-eval", ["model", "task", "metric", "value"], rows)


def _gates(report: dict) -> str:
    gates = report.get("gates") or []
    items = "".join(
        f"<li class='{'gate-failed' if g['failed'] else 'gate-ok'}'>{'FAILED' if g['failed'] else 'ok'}: "
        f"<code>{escape(g['condition'])}</code> ({g['left']:.6g} vs {g['right']:.6g})</li>" for g in gates)
    return f"<h2>Gates</h2><ul id='gates'>{items}</ul>" if items else ""


def _probe_table(report: dict) -> str:
    models = list(report["models"])
    options = "".join(f"<option value='{escape(g, quote=True)}'>{escape(g)}</option>"
                      for g in report["groups"])
    controls = ("<div class='controls'><label>group <select id='probe-group'><option value=''>all</option>"
                f"{options}</select></label><label><input type='checkbox' id='probe-disagree'> only where "
                "the models disagree</label><span id='probe-count' class='meta'></span></div>")
    rows = [_probe_row(probe, models) for probe in report["probes"]]
    return ("<h2>Every probe</h2>" + controls
            + _table("probes", ["id", "group", "mode", "prompt", "answers / wrong", *models], rows))


def _probe_row(probe: dict, models: list[str]) -> str:
    verdicts = {out["correct"] for out in probe["outputs"].values()}
    listed = escape(" / ".join(probe["wrong"]))
    wrong = f"<br><span class='meta'>wrong: {listed}</span>" if probe["wrong"] else ""
    cells = ["".join(f"<td>{escape(probe[key])}</td>" for key in ("id", "group", "mode")),
             f"<td class='answer'>{escape(probe['prompt'])}</td>",
             f"<td>{escape(' / '.join(probe['answers']))}{wrong}</td>"]
    for name in models:
        out = probe["outputs"].get(name)
        if out is None:
            cells.append("<td class='meta' data-value=''>not asked</td>")
            continue
        tags = "<span class='tag ok'>right</span>" if out["correct"] else "<span class='tag bad'>miss</span>"
        tags += "<span class='tag stale'>wrong</span>" if out["wrong"] else ""
        tags += "<span class='tag leak'>template</span>" if out.get("leaked") else ""
        css = "stale" if out["wrong"] else ("ok" if out["correct"] else "bad")
        cells.append(f"<td class='{css}' data-value='{int(out['correct'])}'>{tags}"
                     f"<div class='answer'>{escape(out['text'])}</div></td>")
    disagree = "yes" if len(verdicts) > 1 else "no"
    return (f"<tr data-group='{escape(probe['group'], quote=True)}' data-disagree='{disagree}'>"
            + "".join(cells) + "</tr>")
