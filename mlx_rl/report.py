"""`mlx-rl report RUN [RUN...]`: one self-contained HTML page for a run, or for runs side by side.

The page holds what a model builder looks at after a run, in the order they look at it:

1. before and after: every `eval/*` figure at the start (step 0, the model before training) and at the
   last evaluation, with the change;
2. the curves (the same figures as `mlx-rl plot`, plus a chapter's own figures in RUN/plots);
3. where the time goes: ms per step and share of each phase (as `mlx-rl profile`);
4. sample completions at the first and last evaluation: prompt, completion, expected answer, reward;
   an episode's whole transcript, the environment's turns shaded;
5. the run's final figures (summary.json);
6. the resolved config, with the settings that differ between runs highlighted.

Self-contained: images are inlined as base64 PNG data URIs and the CSS is inline; there is no script,
so the file opens offline, from an e-mail, from a CI artifact. Everything taken from a run (model
output above all) is escaped with html.escape: a completion is untrusted text.

Default output: RUN/report.html for one run; for several, report.html in the folder `mlx-rl plot`
uses for the overlay (beside the first run, named compare-A-vs-B).
"""

import base64
import html
import io
import json
import math
from datetime import datetime
from pathlib import Path

import click

from mlx_rl import plots
from mlx_rl.runs import atomic_write_text

N_SAMPLES = 8  # completions shown per evaluation point
HIDPI = 150  # pixels per inch of the report's images (figures are laid out at plots.DPI)


def esc(value):
    return html.escape("" if value is None else str(value), quote=True)


# --- what the page reports, as plain data (tested without HTML) ----------------------------------------


def before_after(run):
    """{metric: (start, end, start_step, end_step)} for every eval/* metric of the run."""
    out = {}
    for name in sorted(k for k in run.series if k.startswith("eval/")):
        s = run.series[name]
        out[name] = (float(s.values[0]), float(s.values[-1]), int(s.steps[0]), int(s.steps[-1]))
    return out


def eval_samples(run):
    """{step: [sample rows]} of the held-out completions at the first and last evaluation.

    Chapters log training samples too (split "train"); the held-out ones carry no split or a
    non-train one. If a run has only training samples, those are shown (and say so).
    """
    rows, _ = plots.read_jsonl_tolerant(run.path / "samples.jsonl")
    rows = [r for r in rows if isinstance(r.get("step"), (int, float))]
    held = [r for r in rows if r.get("split", "eval") != "train"] or rows
    steps = sorted({r["step"] for r in held})
    if not steps:
        return {}
    chosen = [steps[0]] if len(steps) == 1 else [steps[0], steps[-1]]
    return {s: [r for r in held if r["step"] == s][:N_SAMPLES] for s in chosen}


def read_summary(run):
    try:
        summary = json.loads((run.path / "summary.json").read_text())
    except (OSError, json.JSONDecodeError):
        return {}
    return summary if isinstance(summary, dict) else {}


def summary_figures(run):
    """summary.json flattened one level ({"eval": {"success_rate": 1}} -> "eval.success_rate"); lists left out."""
    out = {}
    for k, v in read_summary(run).items():
        items = v.items() if isinstance(v, dict) else [(None, v)]
        for sub, value in items:
            if isinstance(value, (list, dict)):
                continue
            out[f"{k}.{sub}" if sub else k] = value
    return out


def run_facts(run):
    """Headline facts of a run: chapter, steps, wall time, model, task."""
    summary = read_summary(run)
    last = run.rows[-1]
    wall = summary.get("wall_s", last.get("wall_s"))
    facts = {
        "chapter": run.chapter,
        "steps": summary.get("steps", last.get("step")),
        "wall time": f"{wall:.1f} s" if plots.is_number(wall) else "unknown",
        "model": run.config.get("model") or (f"new {run.config['preset']} model" if run.config.get("preset") else None),
        "task": run.config.get("task"),
        "directory": str(run.path.resolve()),
    }
    per_step, unit = run.samples_per_step
    if per_step:
        facts["per step"] = f"{per_step} {unit}"
    if not summary:
        facts["status"] = "no summary.json: the run is still going, or was stopped"
    return {k: v for k, v in facts.items() if v is not None}


# --- HTML pieces ------------------------------------------------------------------------------------------

CSS = """
:root { --ink:#1d2430; --muted:#5b6575; --line:#dde2ea; --bg:#f6f8fb; --good:#1a7f37; --bad:#c62828; --accent:#1f5fae; }
* { box-sizing: border-box; }
body { margin:0; font:14px/1.45 -apple-system, "Segoe UI", Roboto, "Helvetica Neue", Arial, sans-serif;
       color:var(--ink); background:var(--bg); }
main { max-width:1240px; margin:0 auto; padding:24px 28px 60px; }
header h1 { font-size:24px; margin:0 0 4px; }
header .sub { color:var(--muted); margin:0 0 16px; }
h2 { font-size:18px; margin:32px 0 10px; padding-bottom:4px; border-bottom:2px solid var(--line); }
h3 { font-size:15px; margin:18px 0 8px; }
section.card, .facts { background:#fff; border:1px solid var(--line); border-radius:8px; padding:14px 18px; }
.facts-row { display:grid; gap:14px; grid-template-columns:repeat(auto-fit, minmax(280px, 1fr)); }
.facts h3 { margin-top:0; }
dl { display:grid; grid-template-columns:max-content 1fr; gap:2px 12px; margin:0; }
dt { color:var(--muted); } dd { margin:0; overflow-wrap:anywhere; }
table { border-collapse:collapse; width:100%; background:#fff; font-variant-numeric:tabular-nums; }
th, td { text-align:left; padding:5px 9px; border-bottom:1px solid var(--line); vertical-align:top; }
th { background:#eef2f7; font-weight:600; font-size:13px; }
td.num, th.num { text-align:right; white-space:nowrap; }
tr:nth-child(even) td { background:#fafbfd; }
tr.differs td { background:#fff6dd; }
.up { color:var(--good); font-weight:600; } .down { color:var(--bad); font-weight:600; }
.metric { font-family:ui-monospace, SFMono-Regular, Menlo, Consolas, monospace; font-size:12px; color:var(--muted); }
.scroll { overflow-x:auto; }
.figs { display:flex; flex-wrap:wrap; gap:14px; align-items:flex-start; }
figure { margin:0; background:#fff; border:1px solid var(--line); border-radius:8px; padding:8px; min-width:280px; }
figure img { display:block; max-width:100%; height:auto; margin:0 auto; }
figcaption { color:var(--muted); font-size:12px; padding:4px 6px 0; }
.cols { display:grid; gap:14px; grid-template-columns:repeat(var(--n), minmax(0, 1fr)); }
.cols > div { min-width:0; }
pre, code.c { font-family:ui-monospace, SFMono-Regular, Menlo, Consolas, monospace; font-size:12.5px; }
td pre { margin:0; white-space:pre-wrap; overflow-wrap:anywhere; }
.ok { color:var(--good); font-weight:700; } .no { color:var(--bad); font-weight:700; }
.env { background:#e8eef7; color:#34495e; border-radius:3px; padding:0 2px; }
.note { color:var(--muted); font-size:13px; }
.bar { display:inline-block; height:9px; border-radius:2px; vertical-align:middle; margin-right:6px; }
nav { font-size:13px; margin:8px 0 0; } nav a { color:var(--accent); margin-right:14px; text-decoration:none; }
"""


def scroll(inner):
    """Wide tables (several runs side by side) scroll inside the page instead of overflowing it."""
    return f"<div class='scroll'>{inner}</div>"


def table(head, rows, num_from=1, row_class=None):
    """An HTML table; cells are pre-escaped HTML strings; columns from num_from on align right."""
    out = ["<table><thead><tr>"]
    out += [f'<th class="{"num" if i >= num_from else ""}">{h}</th>' for i, h in enumerate(head)]
    out.append("</tr></thead><tbody>")
    for j, row in enumerate(rows):
        cls = f' class="{row_class(j)}"' if row_class and row_class(j) else ""
        out.append(f"<tr{cls}>" + "".join(
            f'<td class="{"num" if i >= num_from else ""}">{c}</td>' for i, c in enumerate(row)) + "</tr>")
    out.append("</tbody></table>")
    return "".join(out)


def figure_html(png_bytes, caption, alt, width_px=None):
    """A figure with its PNG inlined; width_px is its size on screen (the PNG may have more pixels)."""
    data = base64.b64encode(png_bytes).decode("ascii")
    # Laid out at 80% of the plot's size, grown up to 100% to fill the row: a two-panel and a
    # one-panel figure share a row, and a lone one-panel figure is not blown up to the page width.
    style = f' style="flex:1 1 {int(0.8 * width_px)}px; max-width:{width_px}px"' if width_px else ""
    return (f'<figure{style}><img src="data:image/png;base64,{data}" alt="{esc(alt)}">'
            f"<figcaption>{esc(caption)}</figcaption></figure>")


def fmt_value(name, v):
    if v is None or (isinstance(v, float) and not math.isfinite(v)):
        return "–"
    return plots.fmt(v, plots.is_share(name))


def fmt_change(name, start, end):
    d = end - start
    if not math.isfinite(d):
        return "–"
    cls = "up" if d > 0 else "down" if d < 0 else ""
    text = f"{d * 100:+.1f} pt" if plots.is_share(name) else f"{d:+.4g}"
    return f'<span class="{cls}">{esc(text)}</span>'


def section_before_after(runs):
    names = list(dict.fromkeys(n for r in runs for n in before_after(r)))
    if not names:
        return ("<p class='note'>No evaluation was logged during training (no <code>eval/*</code> metrics); "
                "the run's final figures are under <a href='#summary'>Final figures</a>.</p>")
    tables = {r.label: before_after(r) for r in runs}
    head = ["metric"]
    for r in runs:
        prefix = f"{esc(r.label)}: " if len(runs) > 1 else ""
        head += [f"{prefix}start", f"{prefix}end", f"{prefix}change"]
    rows = []
    for name in names:
        cells = [f"{esc(plots.describe(name)[0])}<br><span class='metric'>{esc(name)}</span>"]
        for r in runs:
            if name in tables[r.label]:
                start, end, s0, s1 = tables[r.label][name]
                cells += [f"{esc(fmt_value(name, start))} <span class='note'>step {s0}</span>",
                          f"{esc(fmt_value(name, end))} <span class='note'>step {s1}</span>", fmt_change(name, start, end)]
            else:
                cells += ["–", "–", "–"]
        rows.append(cells)
    notes = []
    for r in runs:
        n = plots.heldout_count(r)  # the rows evaluated (eval/prompts), not only the configured --eval-prompts
        acc = tables[r.label].get("eval/accuracy")  # (start, end, start_step, end_step)
        if n and acc:
            lo, hi = plots.wilson(acc[1], n)
            notes.append(f"{esc(r.label)}: {int(n)} held-out prompts per evaluation; final accuracy "
                         f"95% interval {lo:.1%} – {hi:.1%}.")
        if acc and acc[2] != 0:
            notes.append(f"{esc(r.label)}: no step-0 evaluation, start is the first evaluation (step {acc[2]}).")
    return scroll(table(head, rows)) + "".join(f"<p class='note'>{n}</p>" for n in notes)


def section_time(runs):
    tables = {r.label: plots.phase_table(r.rows) for r in runs}
    if not any(tables.values()):
        return "<p class='note'>No <code>time/*</code> metrics were logged.</p>"
    phases = list(dict.fromkeys(p for t in tables.values() for p in t))
    colours = plots.phase_colours(phases)
    head = ["phase"] + [h for r in runs for h in ((f"{esc(r.label)}: ms/step" if len(runs) > 1 else "ms / step"),
                                                 (f"{esc(r.label)}: share" if len(runs) > 1 else "share"))]
    rows = []
    for p in phases:
        cells = [f'<span class="bar" style="background:{colours[p]};width:12px"></span>{esc(p.replace("_", " "))}']
        for r in runs:
            t = tables[r.label].get(p)
            cells += [f"{1000 * t['mean_s']:.1f}", f"{t['share']:.1%}"] if t else ["–", "–"]
        rows.append(cells)
    total = ["<b>total</b>"]
    for r in runs:
        total += [f"<b>{1000 * sum(t['mean_s'] for t in tables[r.label].values()):.1f}</b>", "100%"]
    rows.append(total)
    note = ("<p class='note'>Mean over the training steps, the first (compilation) and the evaluation before "
            "training left out: the same figures as <code>mlx-rl profile</code> (one function makes both); eval and "
            "save are spread over those steps.</p>")
    return scroll(table(head, rows)) + note


def sample_table(samples):
    if not samples:
        return "<p class='note'>No samples logged.</p>"
    has_answer = any("answer" in s for s in samples)
    has_correct = any("correct" in s for s in samples)
    head = ["prompt", "completion"] + (["expected"] if has_answer else []) + ["reward"] + (["right"] if has_correct else [])
    rows = []
    for s in samples:
        completion = s.get("completion", "")
        shown = f"<pre>{esc(completion)}</pre>" if completion != "" else "<span class='note'>(empty)</span>"
        if isinstance(s.get("transcript"), list):  # an episode: the environment's turns set apart from the model's
            shown = "<pre>" + "".join(
                f"<span class='env'>{esc(t.get('text', ''))}</span>" if t.get("role") == "env" else esc(t.get("text", ""))
                for t in s["transcript"] if isinstance(t, dict)) + "</pre>"
        cells = [f"<pre>{esc(s.get('prompt', ''))}</pre>", shown]
        if has_answer:
            cells.append(f"<pre>{esc(s.get('answer', ''))}</pre>")
        reward = s.get("reward")
        cells.append(esc(f"{reward:.3g}" if plots.is_number(reward) else reward))
        if has_correct:
            c = s.get("correct")
            cells.append('<span class="ok">✓</span>' if c is True else '<span class="no">✗</span>' if c is False else "–")
        rows.append(cells)
    return table(head, rows, num_from=len(head) - (2 if has_correct else 1))


def section_samples(runs):
    cols = []
    for r in runs:
        by_step = eval_samples(r)
        parts = [f"<h3>{esc(r.title)}</h3>"] if len(runs) > 1 else []
        if not by_step:
            parts.append("<p class='note'>No samples.jsonl rows.</p>")
        for i, (step, samples) in enumerate(by_step.items()):
            when = "first evaluation" if i == 0 else "last evaluation"
            split = {s.get("split") for s in samples} - {None}
            extra = f" (split: {', '.join(sorted(map(str, split)))})" if split else ""
            parts.append(f"<h3>Step {int(step)}: {when}{esc(extra)}</h3>" + sample_table(samples))
        cols.append("<div>" + "".join(parts) + "</div>")
    return f'<div class="cols" style="--n:{len(runs)}">' + "".join(cols) + "</div>"


def section_summary(runs):
    figures = {r.label: summary_figures(r) for r in runs}
    keys = list(dict.fromkeys(k for f in figures.values() for k in f))
    if not keys:
        return "<p class='note'>No summary.json: the run is still going, or was stopped before the end.</p>"
    show = lambda v: "–" if v is None else f"{v:.4g}" if isinstance(v, float) else str(v)  # noqa: E731
    rows = [[f"<code class='c'>{esc(k)}</code>"] + [esc(show(figures[r.label].get(k))) for r in runs] for k in keys]
    return scroll(table(["figure"] + [esc(r.label) for r in runs], rows))


def section_config(runs):
    keys = list(dict.fromkeys(k for r in runs for k in r.config))
    if not keys:
        return "<p class='note'>No config.json.</p>"
    show = lambda v: "–" if v is None else json.dumps(v) if isinstance(v, (dict, list, bool)) else str(v)  # noqa: E731
    rows, differs = [], []
    for k in keys:
        values = [show(r.config.get(k)) for r in runs]
        rows.append([f"<code class='c'>{esc(k)}</code>"] + [f"<code class='c'>{esc(v)}</code>" for v in values])
        differs.append(len(runs) > 1 and len(set(values)) > 1 and k != "out")
    head = ["setting"] + [esc(r.label) for r in runs]
    note = "<p class='note'>Highlighted: settings that differ between the runs.</p>" if len(runs) > 1 else ""
    return scroll(table(head, rows, num_from=99, row_class=lambda j: "differs" if differs[j] else "")) + note


def section_plots(runs, drawn):
    figs = []
    for d in drawn:
        if d.fig is None:
            continue
        buf = io.BytesIO()
        d.fig.savefig(buf, format="png", dpi=HIDPI)  # sharp on high-density screens, shown at plot size
        width = int(d.fig.get_size_inches()[0] * plots.DPI)
        # the file `mlx-rl plot` writes it to (values-curves.png where a chapter owns values.png)
        name = plots.target_path(runs[0].path / "plots", d.stem).name if len(runs) == 1 else f"{d.stem}.png"
        figs.append(figure_html(buf.getvalue(), name, d.title, width))
    out = [f"<div class='figs'>{''.join(figs)}</div>"]
    if len(runs) == 1:  # the chapter's own figures (Ice Maze's values, KL's estimators): not ours to redraw
        own = [p for p in sorted((runs[0].path / "plots").glob("*.png")) if not plots.is_generic_figure(p)]
        if own:
            out.append("<h3>The chapter's own figures</h3><div class='figs'>"
                       + "".join(figure_html(p.read_bytes(), f"{p.name} (drawn by the chapter)", p.name) for p in own)
                       + "</div>")
    constants = plots.constant_notes(drawn)
    if constants:
        items = "".join(
            f"<li>{esc(plots.describe(n)[0])} <span class='metric'>{esc(n)}</span> = "
            f"{esc(' / '.join(sorted({plots.fmt(v, plots.is_share(n)) for v in by.values()})))}</li>"
            for n, by in constants.items())
        out.append(f"<h3>Constant over the run (not drawn)</h3><ul>{items}</ul>")
    return "".join(out)


def build(run_paths, labels=None, x="auto"):
    """The report page for the runs, as one HTML string."""
    runs = plots.load_runs(list(run_paths), labels)
    drawn = plots.draw(runs, x)
    try:
        figures = section_plots(runs, drawn)
    finally:
        plots.close_all(drawn)
    title = plots.runs_title(runs)
    facts = "".join(
        f"<div class='facts'><h3>{esc(r.title)}</h3><dl>"
        + "".join(f"<dt>{esc(k)}</dt><dd>{esc(v)}</dd>" for k, v in run_facts(r).items()) + "</dl></div>"
        for r in runs)
    warnings = "".join(f"<p class='note'>{esc(r.label)}: skipped {r.bad_lines} malformed line(s) of metrics.jsonl "
                       "(a torn last line from an interrupted run?).</p>" for r in runs if r.bad_lines)
    sections = [
        ("before-after", "Before and after training", section_before_after(runs)),
        ("curves", "Curves", figures),
        ("time", "Where the time goes", section_time(runs)),
        ("samples", "Sample completions", section_samples(runs)),
        ("summary", "Final figures (summary.json)", section_summary(runs)),
        ("config", "Config", section_config(runs)),
    ]
    nav = "".join(f'<a href="#{sid}">{esc(name)}</a>' for sid, name, _ in sections)
    body = "".join(f'<h2 id="{sid}">{esc(name)}</h2>{content}' for sid, name, content in sections)
    stamp = datetime.now().strftime("%Y-%m-%d %H:%M")
    return (
        "<!DOCTYPE html>\n<html lang='en'><head><meta charset='utf-8'>"
        "<meta name='viewport' content='width=device-width, initial-scale=1'>"
        f"<title>{esc('mlx-rl report: ' + title)}</title><style>{CSS}</style></head><body><main>"
        f"<header><h1>{esc(title)}</h1><p class='sub'>mlx-rl report, written {esc(stamp)}</p>"
        f"<div class='facts-row'>{facts}</div>{warnings}<nav>{nav}</nav></header>{body}"
        "</main></body></html>\n"
    )


def default_out(run_paths):
    if len(run_paths) == 1:
        return Path(run_paths[0]) / "report.html"
    return plots.overlay_dir(run_paths) / "report.html"


@click.command("report")
@click.argument("runs", nargs=-1, required=True, type=click.Path())
@click.option("--out", type=click.Path(dir_okay=False), default=None,
              help="where to write: the HTML file (default: RUN/report.html; for several runs, report.html in the "
                   "compare-RUN1-vs-RUN2 folder beside the first run)")
@click.option("--x", "x", type=click.Choice(plots.X_CHOICES), default="auto", show_default=True,
              help="x axis of the curves: step, wall_s (seconds), or samples (completions or pairs seen); "
                   "auto: step, or samples when the runs are of different chapters")
@click.option("--labels", default=None, help="comma-separated names for the runs, e.g. grpo,control")
def cli(runs, out, x, labels):
    """Write one self-contained HTML page for a run, or several side by side (plots, config, timing, samples)."""
    from mlx_rl.runs import check_writable_folder

    path = Path(out) if out else default_out(runs)
    check_writable_folder(path.parent, "--out", path)
    page = build(runs, plots.parse_labels(labels), x)
    if path.parent and not path.parent.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, page)
    click.echo(path)
