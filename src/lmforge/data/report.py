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
        parts.append(f"{s['rows']:,} rows, packing efficiency {s['packing_efficiency']:.0%}")
        if "padding_fraction" in s:
            parts.append(f"padding {s['padding_fraction']:.1%}")
        lines.append("; ".join(parts))
    return lines


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
