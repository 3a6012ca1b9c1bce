"""Saying what data preparation did: summary lines, and an example with its loss mask shown."""

from __future__ import annotations

from typing import Any

from rich.text import Text

from lmforge.data.tokenize import IGNORE_INDEX


def data_report_lines(report: dict[str, Any]) -> list[str]:
    """One line per split: records in, examples out, drops by reason, tokens, packing."""
    lines = []
    for name, s in report["splits"].items():
        dropped = sum(s["dropped"].values())
        reasons = ", ".join(f"{n} {reason}" for reason, n in s["dropped"].items())
        parts = [f"{name}: {s['records']:,} records -> {s['examples']:,} examples"]
        parts.append(f"dropped {dropped:,}" + (f" ({reasons})" if reasons else ""))
        if s["truncated"]:
            parts.append(f"truncated {s['truncated']:,}")
        if s["split_into_pieces"]:
            parts.append(f"split into pieces {s['split_into_pieces']:,}")
        share = s["trained_tokens"] / s["tokens"] if s["tokens"] else 0.0
        parts.append(f"{s['tokens']:,} tokens, {s['trained_tokens']:,} trained ({share:.0%})")
        packing = f", packing efficiency {s['packing_efficiency']:.0%}" if report.get("packing") else ""
        parts.append(f"{s['rows']:,} rows{packing}")
        if "padding_fraction" in s:
            parts.append(f"padding {s['padding_fraction']:.1%}")
        lines.append("; ".join(parts))
    if "curriculum" in report:
        lines.append(curriculum_line(report["curriculum"]))
    return lines


def curriculum_line(curriculum: dict[str, Any]) -> str:
    """The training rows' difficulty levels (data.curriculum): rows, tokens, and difficulties of each."""
    stages = curriculum["by"] == "stages"
    parts = []
    for level in curriculum["levels"]:
        span = level.get("difficulty")
        difficulty = f" (difficulty {span[0]:g}-{span[1]:g})" if span else ""
        name = "stage" if stages else "level"
        parts.append(f"{name} {level['level']}: {level['rows']:,} rows / {level['tokens']:,} tokens{difficulty}")
    return f"curriculum by {curriculum['by']}: " + "; ".join(parts)


LOUD_SHARE = 0.10
"""A split that loses (or truncates) this share of its records gets a warning."""


def data_warnings(report: dict[str, Any], data) -> list[str]:
    """Warnings for the splits that lost or truncated a large share of their records, with the fix
    (dry runs, training and `data inspect` print them)."""
    from lmforge.data.prepare import drop_advice

    warnings = []
    for name, s in report["splits"].items():
        dropped = sum(s["dropped"].values())
        if s["records"] and dropped / s["records"] >= LOUD_SHARE:
            reasons = ", ".join(f"{n} {reason}" for reason, n in s["dropped"].items())
            warnings.append(
                f"{name}: {dropped:,} of {s['records']:,} records dropped ({reasons}){drop_advice(s['dropped'], data)}"
            )
        if s["records"] and s["truncated"] / s["records"] >= LOUD_SHARE:
            warnings.append(
                f"{name}: {s['truncated']:,} of {s['records']:,} records truncated at data.max_length="
                f"{report['max_length']}: what is cut off is never trained on; raise data.max_length"
            )
    return warnings


def histogram_lines(report: dict[str, Any], split: str = "train", width: int = 40) -> list[str]:
    histogram = report["splits"][split]["length_histogram"]
    peak = max(histogram.values()) or 1
    return [f"{bucket:>11} {'#' * round(width * n / peak):<{width}} {n:,}" for bucket, n in histogram.items()]


def render_masked(input_ids: list[int], labels: list[int], tokenizer) -> Text:
    """The text of one example: trained tokens in green, masked ones dim and inside « »."""
    text = Text()
    start = 0
    for i in range(1, len(input_ids) + 1):
        boundary = i == len(input_ids) or (labels[i] == IGNORE_INDEX) != (labels[start] == IGNORE_INDEX)
        if boundary:
            piece = tokenizer.decode(input_ids[start:i])
            if labels[start] == IGNORE_INDEX:
                text.append(f"«{piece}»", style="dim")
            else:
                text.append(piece, style="bold green")
            start = i
    return text


def boundary_line(input_ids: list[int], labels: list[int], tokenizer) -> str:
    """Where the first answer starts, token by token: the last prompt token and the first trained
    one, as the model sees them (a template's trailing space shows up inside the answer's token)."""
    first = next((i for i, label in enumerate(labels) if label != IGNORE_INDEX), None)
    if first is None or first == 0:
        return "answer boundary: no prompt before the first trained token"
    last_prompt = tokenizer.decode(input_ids[first - 1 : first])
    first_answer = tokenizer.decode(input_ids[first : first + 1])
    note = ""
    if first_answer[:1].isspace() and not last_prompt[-1:].isspace():
        note = " (it starts with white space: a template's trailing space is trained as part of the answer)"
    return (
        f"answer boundary: the prompt ends with {last_prompt!r} (token {input_ids[first - 1]}), the answer "
        f"starts with {first_answer!r} (token {input_ids[first]}){note}"
    )
