"""Make the examples' data files (committed; run again to reproduce them exactly).

    python examples/make_data.py

- spelling.jsonl: words of the shipped KJV text and their spelling, letter by letter.
- arithmetic_chat.jsonl: chats in which an assistant adds two numbers column by column.
- stdlib_summaries.jsonl: Python standard-library functions (docstring removed) and the first
  line of their docstring.
- verses_by_book.jsonl: KJV verses labelled with their book (Genesis ... Deuteronomy).
"""

from __future__ import annotations

import ast
import json
import random
import re
import sysconfig
from pathlib import Path

HERE = Path(__file__).resolve().parent
KJV = HERE.parent / "data" / "kjv-pentateuch.txt"
BOOKS = [("genesis", 50), ("exodus", 40), ("leviticus", 27), ("numbers", 36), ("deuteronomy", 34)]


def write(name: str, rows: list[dict]) -> None:
    path = HERE / "data" / name
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    print(f"{path.relative_to(HERE.parent)}: {len(rows)} records")


def spelling() -> list[dict]:
    words = sorted({w.lower() for w in re.findall(r"[A-Za-z]+", KJV.read_text()) if 3 <= len(w) <= 10})
    return [{"word": w, "spelling": " ".join(w)} for w in words]


def arithmetic_chat(n: int = 1500) -> list[dict]:
    rng = random.Random(0)
    rows = []
    for _ in range(n):
        messages = [{"role": "system", "content": "You are a patient arithmetic tutor. Add column by column."}]
        for _ in range(rng.choice([1, 1, 2])):
            a, b = rng.randint(10, 999), rng.randint(10, 999)
            messages += [
                {"role": "user", "content": f"What is {a} + {b}?"},
                {"role": "assistant", "content": _steps(a, b)},
            ]
        rows.append({"messages": messages})
    return rows


def _steps(a: int, b: int) -> str:
    steps, carry, place = [], 0, 0
    names = ["ones", "tens", "hundreds", "thousands"]
    while a // 10**place or b // 10**place:
        x, y = a // 10**place % 10, b // 10**place % 10
        total = x + y + carry
        plus = f" + {carry} carried" if carry else ""
        steps.append(
            f"{names[place]}: {x} + {y}{plus} = {total}, write {total % 10}" + (", carry 1" if total > 9 else "")
        )
        carry, place = total // 10, place + 1
    if carry:
        steps.append(f"{names[place]}: write the carried 1")
    return "; ".join(steps) + f". So {a} + {b} = {a + b}."


def documented_functions(min_summary: int, max_summary: int, max_chars: int) -> list[tuple[str, str, str]]:
    """(module, first docstring line, source without its docstring) of every standard-library
    function whose summary and source lengths fit, in file order. bench/workloads.py uses it too."""
    found = []
    for path in sorted(Path(sysconfig.get_paths()["stdlib"]).glob("*.py")):
        try:
            tree = ast.parse(path.read_text(encoding="utf-8"))
        except (SyntaxError, UnicodeDecodeError):
            continue
        for node in ast.walk(tree):
            if not isinstance(node, ast.FunctionDef) or not ast.get_docstring(node):
                continue
            summary = ast.get_docstring(node).strip().split("\n")[0].strip()
            if not min_summary <= len(summary) <= max_summary:
                continue
            node.body = node.body[1:] or [ast.Pass()]  # the docstring is the answer: remove it
            code = ast.unparse(node)
            if len(code) <= max_chars:
                found.append((path.stem, summary, code))
    return found


def stdlib_summaries(limit: int = 1200, max_chars: int = 600) -> list[dict]:
    rows = [{"code": c, "summary": s, "module": m} for m, s, c in documented_functions(10, 120, max_chars)]
    random.Random(0).shuffle(rows)
    return rows[:limit]


def verses_by_book(per_book: int = 300) -> list[dict]:
    chapters = KJV.read_text().split("\n\n")
    rows, start = [], 0
    for book, count in BOOKS:
        verses = [v for ch in chapters[start : start + count] for v in ch.split("\n") if v.strip()]
        random.Random(book).shuffle(verses)
        rows += [{"verse": v, "book": book} for v in verses[:per_book]]
        start += count
    random.Random(1).shuffle(rows)
    return rows


if __name__ == "__main__":
    write("spelling.jsonl", spelling())
    write("arithmetic_chat.jsonl", arithmetic_chat())
    write("stdlib_summaries.jsonl", stdlib_summaries())
    write("verses_by_book.jsonl", verses_by_book())
