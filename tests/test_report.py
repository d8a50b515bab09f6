"""mlx-rl report: the page's content (escaped, self-contained) and that it renders in a real browser.

The browser test needs Chromium. scripts/test.sh installs it (Debian's `chromium`) when missing, so in CI
it always runs; without Chromium the test fails with a message saying how to get it, it is not skipped.
"""

import base64
import html
import json
import re
import shutil
import subprocess
import tempfile
from pathlib import Path

import pytest

from mlx_rl import plots, report
from mlx_rl.cli import main

from test_plots import GRPO_CONFIG, grpo_rows, write_run  # tests/ is on sys.path under pytest

EVIL = '<script>alert("x")</script><img src="http://example.invalid/x.png" onerror="alert(1)">'

SAMPLES = [
    {"step": 0, "prompt": "12+34=", "completion": "64", "answer": "64", "reward": 1.0, "correct": True},
    {"step": 0, "prompt": "55+55=", "completion": EVIL, "answer": "011", "reward": 0.0, "correct": False},
    {"step": 4, "split": "train", "prompt": "1+1=", "completion": "2", "reward": 1.0},  # a training sample
    {"step": 12, "prompt": "12+34=", "completion": "64", "answer": "64", "reward": 1.0, "correct": True},
    {"step": 12, "prompt": "9+9=", "completion": "", "answer": "81", "reward": 0.0, "correct": False},
]


@pytest.fixture
def grpo_run(tmp_path):
    run = write_run(tmp_path / "grpo-a", "grpo", grpo_rows(), {**GRPO_CONFIG, "model": EVIL}, SAMPLES)
    (run / "summary.json").write_text(json.dumps({"wall_s": 12.5, "steps": 12, "eval": {"accuracy": 0.32}}))
    return run


def test_report_content_is_escaped_and_self_contained(grpo_run, capsys):
    main(["report", str(grpo_run)])
    path = grpo_run / "report.html"
    assert capsys.readouterr().out.strip() == str(path)  # default: RUN/report.html
    page = path.read_text()
    # Model output (and anything else from the run) is text, never markup.
    assert EVIL not in page and "<script" not in page.lower()
    assert html.escape(EVIL) in page
    # Self-contained: every image is an inline PNG, no link leaves the page.
    srcs = re.findall(r'<img src="([^"]*)"', page)
    assert len(srcs) == 7  # eval, reward, train, loss, policy, grpo (its note only), time
    for src in srcs:
        assert src.startswith("data:image/png;base64,")
        assert base64.b64decode(src.split(",", 1)[1])[:8] == b"\x89PNG\r\n\x1a\n"
    assert not re.search(r'(src|href)="(?!data:|#)', page)
    # Before/after: step 0 against the last evaluation, in percent with the change in points.
    row = re.search(r"<span class='metric'>eval/accuracy</span>.*?</tr>", page, re.S).group(0)
    assert "26.0%" in row and "32.0%" in row and "+6.0 pt" in row
    assert "eval/accuracy_hard" in page  # every eval split, not only the known ones
    # Timing split: per-phase ms/step as `mlx-rl profile` computes it (generate 200 ms each step).
    time_table = page[page.index('id="time"'):page.index('id="samples"')]
    assert re.search(r"generate</td><td class=\"num\">200\.0</td><td class=\"num\">\d+\.\d%", time_table)
    # Samples: the first and last evaluation, held-out ones only, with expected answers and rewards.
    samples = page[page.index('id="samples"'):page.index('id="summary"')]
    assert "Step 0: first evaluation" in samples and "Step 12: last evaluation" in samples
    assert "1+1=" not in samples and "011" in samples and "(empty)" in samples
    # summary.json's figures, nested ones flattened.
    final = page[page.index('id="summary"'):page.index('id="config"')]
    assert "eval.accuracy</code></td><td class=\"num\">0.32<" in final and "wall time</dt><dd>12.5 s" in page
    # The config, with the untrusted model path escaped too.
    assert "prompts_per_step" in page and page.count(html.escape(EVIL)) == 3  # completion, facts, config


def test_comparison_report_puts_runs_side_by_side(tmp_path, capsys):
    a = write_run(tmp_path / "a", "grpo", grpo_rows(), GRPO_CONFIG, SAMPLES)
    b = write_run(tmp_path / "b", "grpo", grpo_rows(seed=1), {**GRPO_CONFIG, "group_size": 4}, SAMPLES)
    main(["report", str(a), str(b), "--labels", "tuned,control"])
    path = tmp_path / "compare-a-vs-b" / "report.html"
    assert capsys.readouterr().out.strip() == str(path)
    page = path.read_text()
    assert '<div class="cols" style="--n:2">' in page
    assert "tuned: start" in page and "control: change" in page
    differing = re.findall(r'<tr class="differs"><td class=""><code class=\'c\'>([^<]+)</code>', page)
    assert differing == ["group_size"]  # out differs too, but that is not a setting worth flagging


def find_chromium():
    for name in ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable"):
        if shutil.which(name):
            return shutil.which(name)
    for app in ("/Applications/Chromium.app/Contents/MacOS/Chromium",
                "/Applications/Google Chrome.app/Contents/MacOS/Google Chrome"):
        if Path(app).exists():
            return app
    return None


# Injected into a copy of the page for the test only (the report itself has no script): after load,
# count images that did not decode and say so in the DOM and on the console.
CHECK = """<script>
window.addEventListener("load", () => {
  const imgs = Array.from(document.images);
  const broken = imgs.filter(i => !(i.complete && i.naturalWidth > 0));
  const el = document.createElement("pre"); el.id = "img-check";
  el.textContent = "images=" + imgs.length + " broken=" + broken.length;
  document.body.appendChild(el);
  if (broken.length) console.error("broken images: " + broken.length);
});
</script>"""


def render(chromium, html_path):
    """(images, broken, console lines) of a page loaded in headless Chromium."""
    probe = html_path.with_name(html_path.stem + "-probe.html")
    probe.write_text(html_path.read_text().replace("</body>", CHECK + "</body>"))
    with tempfile.TemporaryDirectory() as profile:
        done = subprocess.run(
            [chromium, "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--disable-quic",
             "--no-first-run", "--disable-background-networking", "--disable-component-update", "--disable-sync",
             f"--user-data-dir={profile}", "--enable-logging=stderr", "--v=0", "--virtual-time-budget=5000",
             "--dump-dom", probe.resolve().as_uri()],
            capture_output=True, text=True, timeout=120)
    found = re.search(r'id="img-check">images=(\d+) broken=(\d+)<', done.stdout)
    assert found, f"Chromium did not load the page (rc {done.returncode}): {done.stderr[-2000:]}"
    console = [line for line in done.stderr.splitlines() if ":CONSOLE" in line]
    return int(found.group(1)), int(found.group(2)), console


def test_report_of_a_real_run_renders_in_chromium(tmp_path):
    chromium = find_chromium()
    assert chromium, ("Chromium is needed to check the report renders: `apt-get install chromium` "
                      "(scripts/test.sh installs it on Debian/Ubuntu)")
    out = tmp_path / "pretrain"
    main(["pretrain", "--preset", "micro", "--steps", "30", "--batch-size", "16", "--eval-every", "10",
          "--eval-prompts", "20", "--out", str(out)])
    main(["report", str(out)])
    page = out / "report.html"
    figures = len(re.findall(r"<img ", page.read_text()))
    assert figures >= 4  # eval, loss, optim, perf, time (less any constant group)
    images, broken, console = render(chromium, page)
    assert (images, broken) == (figures, 0)
    assert console == [], f"console messages: {console}"
    # The check itself must be able to fail: corrupt one image and it is reported broken.
    text = page.read_text()
    at = text.index("base64,") + 300
    bad = tmp_path / "bad.html"
    bad.write_text(text[:at] + "!!!!" + text[at + 4:])
    images, broken, console = render(chromium, bad)
    assert (images, broken) == (figures, 1) and any("broken images: 1" in line for line in console)


def test_report_lists_the_chapters_own_figures(tmp_path):
    run = write_run(tmp_path / "ice", "icemaze", [{"step": s, "wall_s": s, "env/return": s / 10} for s in range(1, 9)])
    import matplotlib.pyplot as plt

    fig = plt.figure(figsize=(2, 2))
    fig.savefig(run / "plots" / "values.png")  # the chapter's own (unstamped) figure
    plt.close(fig)
    page = report.build([run])
    assert "values.png (drawn by the chapter)" in page
    assert "Ice Maze · ice" in page
    assert not plots.is_generic_figure(run / "plots" / "values.png")


def test_report_of_a_run_with_no_metrics_is_one_clear_line(tmp_path, capsys):
    empty = write_run(tmp_path / "empty", "grpo", [])
    with pytest.raises(SystemExit) as exit_info:
        main(["report", str(empty)])
    err = capsys.readouterr().err
    assert exit_info.value.code != 0 and "has no metric rows yet" in err and "Traceback" not in err
    assert not (empty / "report.html").exists()
