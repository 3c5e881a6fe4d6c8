"""The evaluation report: relative differences, disagreements, report.json, report.md and charts."""

from __future__ import annotations

from pathlib import Path

from tunesmith.atomic import atomic_file, write_json
from tunesmith.eval.runner import TUNED, EvalResult

MAX_DISAGREEMENTS = 10
QUALITY_NAMES = {"choice": "accuracy", "exact": "exact match", "contains": "contains", "json": "field accuracy"}


def quality_name(metric: str) -> str:
    """What the headline score of ``metric`` is called."""
    return QUALITY_NAMES.get(metric, metric)


def reference_label(result: EvalResult) -> str | None:
    """The model the others are compared with: the first fine-tuned one."""
    return next((r.contender.label for r in result.results if r.contender.mode == TUNED), None)


def relative(result: EvalResult) -> list[dict]:
    """For each other model: how the fine-tuned model differs from it.

    Returns:
        dicts with ``versus``, ``score_points`` (tuned minus other, in points), ``prompt_tokens_saved``
        and ``latency_saved`` (fractions of the other model's figure; positive = the tuned model costs less).
    """
    tuned_label = reference_label(result)
    if tuned_label is None:
        return []
    tuned = result.result(tuned_label).summary()
    rows = []
    for other in result.results:
        if other.contender.label == tuned_label:
            continue
        them = other.summary()
        rows.append({
            "tuned": tuned_label,
            "versus": other.contender.label,
            "score_points": 100 * (tuned["score"] - them["score"]),
            "prompt_tokens_saved": _saved(tuned["prompt_tokens_mean"], them["prompt_tokens_mean"]),
            "latency_saved": _saved(tuned["latency_p50_s"], them["latency_p50_s"]),
            "latency_mean_saved": _saved(tuned["latency_mean_s"], them["latency_mean_s"]),
        })
    return rows


def _saved(mine: float, theirs: float) -> float:
    return 1 - mine / theirs if theirs > 0 else 0.0


def disagreements(result: EvalResult, limit: int = MAX_DISAGREEMENTS) -> list[dict]:
    """Cases where the models' verdicts differ (one right, another wrong), first ``limit`` of them."""
    rows = []
    for i, case in enumerate(result.cases):
        verdicts = [r.scored.per_example[i] for r in result.results]
        if max(verdicts) == min(verdicts):
            continue
        rows.append({
            "line": case.line,
            "input": case.input_text,
            "reference": case.reference,
            "answers": {r.contender.label: {"text": r.answers[i].text, "score": r.scored.per_example[i]}
                        for r in result.results},
        })
        if len(rows) >= limit:
            break
    return rows


def to_json(result: EvalResult, data: str, extra: dict | None = None) -> dict:
    """The whole report as one JSON-ready dict."""
    payload = {
        "data": str(data),
        "metric": result.metric,
        "metric_reason": result.metric_reason,
        "quality": quality_name(result.metric),
        "examples": len(result.cases),
        "shots": len(result.shots),
        "max_tokens": result.max_tokens,
        "decoding": "greedy",
        "models": [r.summary() for r in result.results],
        "relative": relative(result),
        "disagreements": disagreements(result),
        "notes": result.notes,
        "answers": [
            {"line": case.line, "input": case.input_text, "reference": case.reference,
             "answers": {r.contender.label: r.answers[i].text for r in result.results}}
            for i, case in enumerate(result.cases)
        ],
    }
    if result.labels is not None:
        payload["labels"] = result.labels
        payload["confusion"] = {r.contender.label: r.scored.details.get("confusion") for r in result.results}
    if extra:
        payload.update(extra)
    return payload


def write_report(result: EvalResult, out: Path, data: str, extra: dict | None = None) -> dict:
    """Write report.json, report.md and the charts into ``out``; returns the JSON payload."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    payload = to_json(result, data, extra)
    charts = write_charts(result, out)
    payload["charts"] = [p.name for p in charts]
    write_json(out / "report.json", payload)
    with atomic_file(out / "report.md", "w", encoding="utf-8") as handle:
        handle.write(markdown(payload))
    return payload


def markdown(payload: dict) -> str:
    """report.md: the table, the relative differences, the notes, the charts and the disagreements."""
    quality = payload["quality"]
    lines = [
        "# Evaluation: fine-tuned vs prompted",
        "",
        f"Held-out data: `{payload['data']}` ({payload['examples']} examples). Metric: **{payload['metric']}** "
        f"({payload['metric_reason']}). Prompted models get the instructions and {payload['shots']} worked "
        f"examples; fine-tuned models are asked the way they were trained. Greedy decoding, at most "
        f"{payload['max_tokens']} new tokens, same machine, same run.",
        "",
        f"| model | how asked | {quality} (95% CI) | prompt tokens | generated tokens | latency p50 | latency p95 |",
        "|---|---|---|---|---|---|---|",
    ]
    for m in payload["models"]:
        lines.append(
            f"| {m['label']} | {how_asked(m, payload['shots'])} | {100 * m['score']:.1f}% "
            f"({100 * m['ci_low']:.1f}–{100 * m['ci_high']:.1f}) | {m['prompt_tokens_mean']:.0f} | "
            f"{m['completion_tokens_mean']:.1f} | {1000 * m['latency_p50_s']:.0f} ms | "
            f"{1000 * m['latency_p95_s']:.0f} ms |")
    extra_cols = [k for k in ("macro_f1", "non_label_rate", "valid_json_rate", "exact_match")
                  if k in payload["models"][0]]
    if extra_cols:
        lines += ["", "| model | " + " | ".join(c.replace("_", " ") for c in extra_cols) + " |",
                  "|---|" + "---|" * len(extra_cols)]
        for m in payload["models"]:
            lines.append(f"| {m['label']} | " + " | ".join(f"{m[c]:.3f}" for c in extra_cols) + " |")
    if payload["relative"]:
        lines += ["", "## The fine-tuned model compared", ""]
        for row in payload["relative"]:
            lines.append(f"- vs **{row['versus']}**: {row['score_points']:+.1f} {quality} points, "
                         f"{100 * row['prompt_tokens_saved']:.0f}% fewer prompt tokens, "
                         f"{100 * row['latency_saved']:.0f}% lower latency (p50)")
    if payload.get("notes"):
        lines += ["", "## Notes", ""] + [f"- {n}" for n in payload["notes"]]
    if payload.get("charts"):
        lines += ["", "## Charts", ""] + [f"![{Path(c).stem}]({c})" for c in payload["charts"]]
    if payload["disagreements"]:
        lines += ["", "## Where the models disagree", ""]
        for row in payload["disagreements"]:
            lines.append(f"- line {row['line']}: `{_short(row['input'])}` → expected `{_short(row['reference'])}`")
            for label, answer in row["answers"].items():
                mark = "✓" if answer["score"] == 1 else ("✗" if answer["score"] == 0 else f"{answer['score']:.2f}")
                lines.append(f"  - {label} {mark}: `{_short(answer['text'])}`")
    return "\n".join(lines) + "\n"


def how_asked(model: dict, shots: int) -> str:
    """How a model was asked, in words."""
    if model["mode"] == TUNED:
        return "as trained, no system prompt" if model.get("drop_system") else "as trained"
    return f"with instructions + {shots} examples"


def _short(text: str, limit: int = 80) -> str:
    text = " ".join(str(text).split()).replace("`", "'")
    return text if len(text) <= limit else text[: limit - 1] + "…"


def write_charts(result: EvalResult, out: Path) -> list[Path]:
    """comparison.png (quality with CI, prompt tokens, latency) and, for choice, confusion matrices."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = []
    summaries = [r.summary() for r in result.results]
    names = [s["label"] for s in summaries]
    colors = ["#2b8a3e" if s["mode"] == TUNED else "#868e96" for s in summaries]
    fig, axes = plt.subplots(1, 3, figsize=(4 + 2.2 * len(names) * 1.5, 4))
    score = [100 * s["score"] for s in summaries]
    err = [[100 * (s["score"] - s["ci_low"]) for s in summaries], [100 * (s["ci_high"] - s["score"]) for s in summaries]]
    panels = [
        (f"{quality_name(result.metric)} (%, 95% CI)", score, err),
        ("prompt tokens / request", [s["prompt_tokens_mean"] for s in summaries], None),
        ("latency p50 / request (ms)", [1000 * s["latency_p50_s"] for s in summaries], None),
    ]
    for ax, (title, values, errors) in zip(axes, panels):
        ax.bar(range(len(names)), values, color=colors, yerr=errors, capsize=4)
        ax.set_xticks(range(len(names)), [_wrap(n) for n in names], fontsize=8)
        ax.set_title(title, fontsize=10)
        for x, v in enumerate(values):
            ax.annotate(f"{v:.0f}", (x, v), ha="center", va="bottom", fontsize=8)
    fig.tight_layout()
    paths.append(_save(fig, out / "comparison.png"))
    plt.close(fig)
    if result.metric == "choice" and result.labels:
        paths.append(_confusion_chart(result, out / "confusion.png"))
    return paths


def _confusion_chart(result: EvalResult, path: Path) -> Path:
    import matplotlib.pyplot as plt
    import numpy as np

    labels = result.labels
    fig, axes = plt.subplots(1, len(result.results), figsize=(1 + 0.45 * len(labels) * len(result.results) + 2, 0.45 * len(labels) + 2))
    axes = np.atleast_1d(axes)
    for ax, model in zip(axes, result.results):
        matrix = np.array(model.scored.details["confusion"])
        ax.imshow(matrix, cmap="Greens")
        ax.set_title(model.contender.label, fontsize=9)
        ax.set_xticks(range(len(labels) + 1), labels + ["(none)"], rotation=90, fontsize=7)
        ax.set_yticks(range(len(labels)), labels, fontsize=7)
        ax.set_xlabel("answered", fontsize=8)
        ax.set_ylabel("expected", fontsize=8)
        for (y, x), v in np.ndenumerate(matrix):
            if v:
                ax.text(x, y, str(v), ha="center", va="center", fontsize=6)
    fig.tight_layout()
    saved = _save(fig, path)
    plt.close(fig)
    return saved


def _wrap(name: str, width: int = 14) -> str:
    words, lines, line = name.split(), [], ""
    for word in words:
        if line and len(line) + 1 + len(word) > width:
            lines.append(line)
            line = word
        else:
            line = f"{line} {word}".strip()
    return "\n".join(lines + [line])


def _save(fig, path: Path) -> Path:
    with atomic_file(path, "wb") as handle:
        fig.savefig(handle, format="png", dpi=110)
    return path
