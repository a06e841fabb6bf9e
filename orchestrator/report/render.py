"""The report as a document: blocks (headings, text, tables, pictures) rendered as Markdown and as one HTML page."""

from __future__ import annotations

import base64
import html
from dataclasses import dataclass


@dataclass(frozen=True)
class Heading:
    text: str
    level: int = 2


@dataclass(frozen=True)
class Text:
    text: str


@dataclass(frozen=True)
class Table:
    headers: tuple[str, ...]
    rows: tuple[tuple[str, ...], ...]
    # (row, column) of the cells that are the best of their column.
    best: frozenset[tuple[int, int]] = frozenset()


@dataclass(frozen=True)
class Picture:
    file: str  # relative to the report's folder
    caption: str


Block = Heading | Text | Table | Picture


def render_markdown(blocks: list[Block]) -> str:
    lines: list[str] = []
    for block in blocks:
        if isinstance(block, Heading):
            lines += ["#" * block.level + " " + block.text, ""]
        elif isinstance(block, Text):
            lines += [block.text, ""]
        elif isinstance(block, Picture):
            lines += [f"![{block.caption}]({block.file})", "", f"*{block.caption}*", ""]
        else:
            lines += [*_markdown_table(block), ""]
    return "\n".join(lines)


def _markdown_table(table: Table) -> list[str]:
    def cell(text: str, row: int, column: int) -> str:
        text = text.replace("|", "\\|")
        return f"**{text}**" if (row, column) in table.best else text

    return [
        "| " + " | ".join(table.headers) + " |",
        "|" + "|".join("---" for _ in table.headers) + "|",
        *("| " + " | ".join(cell(t, r, c) for c, t in enumerate(row)) + " |" for r, row in enumerate(table.rows)),
    ]


HTML_STYLE = """
body { font-family: system-ui, sans-serif; max-width: 70em; margin: 2em auto; padding: 0 1em; color: #222; }
table { border-collapse: collapse; margin: 0.5em 0 1.5em; font-size: 0.9em; }
th, td { border: 1px solid #ccc; padding: 0.25em 0.6em; text-align: left; }
th { background: #f2f2f2; }
figure { margin: 1em 0 2em; }
figure img { max-width: 100%; }
figcaption { font-size: 0.9em; color: #555; }
"""


def render_html(blocks: list[Block], images: dict[str, bytes], title: str) -> str:
    """One self-contained page: the figures embedded as base64 data URIs."""
    escape = html.escape
    body: list[str] = []
    for block in blocks:
        if isinstance(block, Heading):
            body.append(f"<h{block.level}>{escape(block.text)}</h{block.level}>")
        elif isinstance(block, Text):
            body.append(f"<p>{escape(block.text)}</p>")
        elif isinstance(block, Picture):
            data = base64.b64encode(images[block.file]).decode("ascii")
            body.append(
                f'<figure><img src="data:image/png;base64,{data}" alt="{escape(block.caption)}">'
                f"<figcaption>{escape(block.caption)}</figcaption></figure>"
            )
        else:
            rows = ["<tr>" + "".join(f"<th>{escape(h)}</th>" for h in block.headers) + "</tr>"]
            for r, row in enumerate(block.rows):
                cells = (
                    f"<td><strong>{escape(text)}</strong></td>" if (r, c) in block.best else f"<td>{escape(text)}</td>"
                    for c, text in enumerate(row)
                )
                rows.append("<tr>" + "".join(cells) + "</tr>")
            body.append("<table>\n" + "\n".join(rows) + "\n</table>")
    return (
        f'<!DOCTYPE html>\n<html lang="en">\n<head>\n<meta charset="utf-8">\n<title>{escape(title)}</title>\n'
        f"<style>{HTML_STYLE}</style>\n</head>\n<body>\n" + "\n".join(body) + "\n</body>\n</html>\n"
    )
