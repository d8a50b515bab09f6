"""What the terminal shows while a run trains: one live line, samples at each evaluation, a closing summary.

    grpo  12/60  [#####-------------------]  0:14 elapsed, ETA 0:52  reward 0.81  held-out acc 64.2%  KL 0.012  clip 3.1%

On a terminal the line is redrawn in place; in a log file (not a TTY) it is
printed about twenty times per run. The chapter names its key signals; each is
shown by name, with a unit that makes sense (accuracies and rates as %).
"""

import math
import sys
import time


def fmt_value(name, value):
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    if "accuracy" in name or "frac" in name or name.endswith("success_rate"):
        return f"{value:.1%}"
    if isinstance(value, float):
        return f"{value:.3g}" if abs(value) < 1000 else f"{value:,.0f}"
    return str(value)


def fmt_duration(seconds):
    seconds = max(0, int(round(seconds)))
    h, rest = divmod(seconds, 3600)
    m, s = divmod(rest, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"


class LiveLine:
    """The one live line of a run: step/total, a bar, elapsed time, ETA and the named signals."""

    def __init__(self, name, total, start_step=0, signals=None, stream=None, enabled=True):
        self.name, self.total, self.start_step = name, total, start_step
        self.signals = signals or {}  # label -> metric name
        self.stream = stream or sys.stderr
        self.tty = self.stream.isatty()
        self.enabled = enabled
        self.started = time.perf_counter()
        self.shown = {}  # the latest value of every signal (held-out accuracy only changes at evaluations)
        self.last_print = -1
        self.width = 0

    def text(self, step):
        total = max(self.total, 1)
        done = int(24 * min(step, total) / total)
        bar = "#" * done + "-" * (24 - done)
        elapsed = time.perf_counter() - self.started
        steps_done = step - self.start_step
        eta = elapsed / steps_done * (total - step) if steps_done > 0 and step < total else None
        when = f"{fmt_duration(elapsed)} elapsed" + (f", ETA {fmt_duration(eta)}" if eta is not None else "")
        shown = "  ".join(f"{label} {fmt_value(metric, self.shown.get(metric))}" for label, metric in self.signals.items())
        return f"{self.name}  {step}/{self.total}  [{bar}]  {when}  {shown}".rstrip()

    def update(self, step, row):
        for metric in self.signals.values():
            if metric in row and row[metric] is not None:
                self.shown[metric] = row[metric]
        if not self.enabled:
            return
        line = self.text(step)
        if self.tty:
            self.stream.write("\r" + line.ljust(self.width))
            self.width = len(line)
            self.stream.flush()
            return
        every = max(1, self.total // 20)
        if step == self.total or step - self.last_print >= every or self.last_print < 0:
            print(line, file=self.stream, flush=True)
            self.last_print = step

    def say(self, text):
        """A message between live lines (it starts on a fresh line on a terminal)."""
        if not self.enabled:
            return
        if self.tty and self.width:
            self.stream.write("\r" + " " * self.width + "\r")
            self.width = 0
        print(text, file=self.stream, flush=True)

    def close(self):
        if self.enabled and self.tty and self.width:
            self.stream.write("\n")
            self.width = 0


def sample_lines(step, samples, limit=3):
    """A few sample completions with their expected answers and rewards, for the terminal."""
    lines = [f"  samples at step {step}:"]
    for s in samples[:limit]:
        prompt = s["prompt"] if isinstance(s["prompt"], str) else s["prompt"][-1].get("content", "")
        expected = f"  (expected {s['answer']!r})" if "answer" in s else ""
        lines.append(f"    {shorten(prompt, 50)!r} -> {shorten(s['completion'], 60)!r}{expected}  reward {s['reward']:.2f}")
    return "\n".join(lines)


def shorten(text, n):
    text = str(text).replace("\n", " ")
    return text if len(text) <= n else text[: n - 1] + "…"


def accuracy_summary(before, after):
    """'held-out accuracy 29.0% -> 100.0% (carry 2.0% -> 100.0%, no_carry 100.0% -> 100.0%)': every split shown."""
    labels = {"eval/accuracy": "held-out accuracy", "eval/pair_accuracy": "held-out pair accuracy",
              "eval/reward": "held-out reward"}  # (the reward model ranks pairs: its own name)
    key = next((k for k in labels if k in after), None)
    if key is None:
        return ""
    label = labels[key]

    def pair(k):
        a, b = before.get(k), after.get(k)
        return f"{fmt_value(k, a)} -> {fmt_value(k, b)}" if a is not None else fmt_value(k, b)

    splits = [k for k in after if k.startswith(key + "_")]
    parts = [f"{k[len(key) + 1:]} {pair(k)}" for k in splits]
    extra = f" ({', '.join(parts)})" if parts else ""
    return f"{label} {pair(key)}{extra}"
