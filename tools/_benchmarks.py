"""Shared by the benchmark scripts: write a result table into its section of BENCHMARKS.md."""
from pathlib import Path

BENCHMARKS = Path(__file__).resolve().parents[1] / "BENCHMARKS.md"


def update_section(section, table, fallback):
    """Replace the text between ``<!-- {section}:begin -->`` and ``<!-- {section}:end -->``.

    Args:
        section: marker name, e.g. "bench_dsb2018"; table: Markdown to put there;
        fallback: where the table was also written, named in the message if the markers are missing.
    """
    begin, end = f"<!-- {section}:begin -->", f"<!-- {section}:end -->"
    text = BENCHMARKS.read_text()
    if begin in text and end in text:
        BENCHMARKS.write_text(text[: text.index(begin) + len(begin)] + "\n" + table + "\n" + text[text.index(end):])
        print(f"updated {BENCHMARKS}")
    else:
        print(f"markers {begin} / {end} not found in {BENCHMARKS}; table left in {fallback}")
