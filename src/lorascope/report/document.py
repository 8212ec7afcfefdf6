"""The report's document model: blocks written once, rendered to Markdown and to one
self-contained HTML file (CSS inline, every figure a base64 PNG data URI: nothing to fetch)."""

from __future__ import annotations

import base64
import html
import re
import struct
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

NOT_RUN = "not run"


@dataclass
class Document:
    """Blocks rendered twice, to Markdown and to HTML. Text may use **bold** and `code`."""

    blocks: list[tuple] = field(default_factory=list)

    def heading(self, level: int, text: str) -> None:
        self.blocks.append(("h", level, text))

    def para(self, text: str, css: str = "") -> None:
        self.blocks.append(("p", text, css))

    def bullets(self, items: Iterable[str]) -> None:
        items = list(items)
        if items:
            self.blocks.append(("ul", items))

    def table(self, headers: Sequence[str], rows: Sequence[Sequence[Any]], css: str = "") -> None:
        """Cells are strings or (text, css class) pairs."""
        self.blocks.append(("table", list(headers), [list(r) for r in rows], css))

    def figure(self, path: Path, caption: str) -> None:
        self.blocks.append(("fig", path, caption))

    def details(self, summary: str, text: str, lang: str = "") -> None:
        self.blocks.append(("details", summary, text, lang))

    def not_run(self, why: str) -> None:
        self.para(f"{NOT_RUN}: {why}", css="notrun")

    def figure_paths(self) -> list[Path]:
        return [block[1] for block in self.blocks if block[0] == "fig"]


def slug(text: str) -> str:
    """An HTML anchor or a file name from a heading or task name."""
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")


def _cell(cell: Any) -> tuple[str, str]:
    return cell if isinstance(cell, tuple) else (str(cell), "")


def to_markdown(doc: Document, root: Path) -> str:
    """Figures are linked relative to `root`, where report.md is written."""
    out: list[str] = []
    for block in doc.blocks:
        kind = block[0]
        if kind == "h":
            out.append(f"{'#' * block[1]} {block[2]}")
        elif kind == "p":
            out.append(f"*{block[1]}*" if block[2] == "notrun" else block[1])
        elif kind == "ul":
            out.append("\n".join(f"- {item}" for item in block[1]))
        elif kind == "table":
            headers, rows = block[1], block[2]
            esc = lambda s: s.replace("|", "\\|").replace("\n", " ")  # noqa: E731
            lines = ["| " + " | ".join(esc(h) for h in headers) + " |", "|" + "---|" * len(headers)]
            lines += ["| " + " | ".join(esc(_cell(c)[0]) for c in row) + " |" for row in rows]
            out.append("\n".join(lines))
        elif kind == "fig":
            rel = block[1].relative_to(root).as_posix()
            out.append(f"![{block[2]}]({rel})\n\n*{block[2]}*")
        elif kind == "details":
            code = f"```{block[3]}\n{block[2].rstrip()}\n```"
            out.append(f"<details><summary>{block[1]}</summary>\n\n{code}\n\n</details>")
    return "\n\n".join(out) + "\n"


def _inline(text: str) -> str:
    text = html.escape(text, quote=False)
    text = re.sub(r"\*\*(.+?)\*\*", r"<strong>\1</strong>", text)
    return re.sub(r"`(.+?)`", r"<code>\1</code>", text)


_NUMERIC = re.compile(r"^(?:[\[(<≤≥+\-−]?\s?\d|—$)")


def _png_size(data: bytes) -> tuple[int, int]:
    if data[:8] != b"\x89PNG\r\n\x1a\n":
        raise ValueError("not a PNG")
    return struct.unpack(">II", data[16:24])


def to_html(doc: Document, title: str) -> str:
    body: list[str] = []
    toc = [(block[2], slug(block[2])) for block in doc.blocks if block[0] == "h" and block[1] == 2]
    for block in doc.blocks:
        kind = block[0]
        if kind == "h":
            body.append(f'<h{block[1]} id="{slug(block[2])}">{_inline(block[2])}</h{block[1]}>')
        elif kind == "p":
            css = f' class="{block[2]}"' if block[2] else ""
            body.append(f"<p{css}>{_inline(block[1])}</p>")
            if block[2] == "summary" and toc:
                links = " · ".join(f'<a href="#{anchor}">{html.escape(text)}</a>' for text, anchor in toc)
                body.append(f'<nav class="toc">{links}</nav>')
        elif kind == "ul":
            body.append("<ul>" + "".join(f"<li>{_inline(item)}</li>" for item in block[1]) + "</ul>")
        elif kind == "table":
            headers, rows, css = block[1], block[2], block[3]
            head = "".join(f"<th>{_inline(h)}</th>" for h in headers)
            lines = []
            for row in rows:
                cells = []
                for j, cell in enumerate(row):
                    text, cls = _cell(cell)
                    classes = [cls] if cls else []
                    if j > 0 and css != "kv" and _NUMERIC.match(text):
                        classes.append("num")
                    attr = f' class="{" ".join(classes)}"' if classes else ""
                    cells.append(f"<td{attr}>{_inline(text)}</td>")
                lines.append("<tr>" + "".join(cells) + "</tr>")
            attr = f' class="{css}"' if css else ""
            body.append(
                f'<div class="tablewrap"><table{attr}><thead><tr>{head}</tr></thead>'
                f"<tbody>{''.join(lines)}</tbody></table></div>"
            )
        elif kind == "fig":
            data = block[1].read_bytes()
            width, height = _png_size(data)
            uri = "data:image/png;base64," + base64.b64encode(data).decode("ascii")
            cap = _inline(block[2])
            body.append(
                f'<figure><img src="{uri}" width="{width}" height="{height}" alt="{html.escape(block[2])}">'
                f"<figcaption>{cap}</figcaption></figure>"
            )
        elif kind == "details":
            body.append(f"<details><summary>{_inline(block[1])}</summary><pre>{html.escape(block[2])}</pre></details>")
    return (
        '<!DOCTYPE html>\n<html lang="en">\n<head>\n<meta charset="utf-8">\n'
        '<meta name="viewport" content="width=device-width, initial-scale=1">\n'
        f"<title>{html.escape(title)}</title>\n<style>{_CSS}</style>\n</head>\n<body>\n<main>\n"
        + "\n".join(body)
        + "\n</main>\n</body>\n</html>\n"
    )


_CSS = """
:root{--lora:#0072B2;--full:#D55E00}
body{margin:0;background:#eef1f4;color:#1d2125;font:15px/1.55 system-ui,-apple-system,"Segoe UI",Roboto,
"Helvetica Neue",Arial,sans-serif}
main{max-width:1180px;margin:0 auto;padding:28px 40px 60px;background:#fff;box-shadow:0 0 12px rgba(0,0,0,.06)}
h1{font-size:28px;margin:0 0 12px}
h2{font-size:21px;margin:40px 0 10px;padding-bottom:4px;border-bottom:2px solid #e3e7eb}
h3{font-size:17px;margin:24px 0 6px}
p{margin:8px 0;max-width:70em}
p.summary{font-size:16px;background:#f3f7fb;border-left:4px solid var(--lora);padding:10px 14px}
p.notrun{color:#6b7177;font-style:italic;background:#f5f5f5;border-left:3px solid #b9bec3;padding:6px 12px}
p.note{font-size:13.5px;color:#4a5056}
nav.toc{font-size:13.5px;margin:10px 0 4px;color:#6b7177}
nav.toc a{color:#1f5f95;text-decoration:none}
.tablewrap{overflow-x:auto;margin:10px 0 14px}
table{border-collapse:collapse;font-size:13.5px;font-variant-numeric:tabular-nums}
th,td{border:1px solid #dde1e5;padding:4px 9px;text-align:left;vertical-align:top}
th{background:#f0f3f6;font-weight:600}
tbody tr:nth-child(even) td{background:#fafbfc}
td.num{text-align:right;white-space:nowrap}
td.met{background:#d9f2df !important;color:#0f5323;font-weight:600}
td.notmet{background:#fbdcdc !important;color:#8a1c1c;font-weight:600}
td.inconclusive{background:#fff1c7 !important;color:#7a5a00;font-weight:600}
td.notrun{background:#eceef0 !important;color:#5d6368}
td.flag{color:#8a1c1c}
tbody tr td.sub{background:#f1f4f7;color:#30363b}
table.verdict td,table.verdict th{font-size:14px;padding:5px 11px}
table.verdict tr.rec td{border-bottom:2px solid #aab1b8}
figure{margin:14px 0 22px}
figure img{max-width:100%;height:auto;border:1px solid #e6e9ec}
figcaption{font-size:13px;color:#4a5056;margin-top:4px;max-width:70em}
code{font-size:90%;background:#f2f4f6;padding:0 3px;border-radius:3px}
details{margin:8px 0}
pre{background:#f6f8fa;padding:10px;font-size:12.5px;overflow-x:auto}
ul{margin:6px 0 10px}
"""
