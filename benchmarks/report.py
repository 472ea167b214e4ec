"""What every benchmark script shares: the machine's name, size arguments, and printing/appending a table."""

from __future__ import annotations

import datetime
import os
import platform


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def parse_size(text: str) -> int:
    """'64M' -> 67108864; also K and G, or a plain number."""
    unit = text[-1].upper()
    return int(text[:-1]) << {"K": 10, "M": 20, "G": 30}[unit] if unit in "KMG" else int(text)


def size_label(n: int) -> str:
    """67108864 -> '64M', 65536 -> '64K' (the inverse of parse_size for round sizes)."""
    for shift, unit in ((30, "G"), (20, "M"), (10, "K")):
        if n >= 1 << shift and n % (1 << shift) == 0:
            return f"{n >> shift}{unit}"
    return str(n)


def machine_line(what: str) -> str:
    """'<what>, <CPU model>, <n> cores, <date>': how every table starts."""
    return f"{what}, {cpu_model()}, {os.cpu_count()} cores, {datetime.date.today().isoformat()}"


def table(title: str, columns: list[str], rows: list[tuple]) -> list[str]:
    """A Markdown table under its title line."""
    return [title, "", "| " + " | ".join(columns) + " |", "|" + "---|" * len(columns),
            *("| " + " | ".join(str(cell) for cell in row) + " |" for row in rows)]


def emit(lines: list[str], write: str | None) -> None:
    """Prints the Markdown table and, with --write, appends it to that file (e.g. BENCHMARKS.md)."""
    text = "\n".join(lines)
    print(text)
    if write:
        with open(write, "a") as f:
            f.write("\n" + text + "\n")
