"""Tables and a static HTML page for people who would rather look than read.

Plain Markdown and HTML written by hand: a report folder opens in any browser
or Markdown viewer, and nothing beyond the standard library is needed.
"""

import html

from tfdogs import files

STYLE = """
body { font-family: system-ui, sans-serif; margin: 2em auto; max-width: 1200px; color: #222; }
table { border-collapse: collapse; margin: 1em 0; font-size: 0.9em; }
th, td { border: 1px solid #ccc; padding: 0.3em 0.6em; }
th { background: #f3f3f3; }
td.number { text-align: right; font-variant-numeric: tabular-nums; }
tr.baseline td { color: #666; font-style: italic; }
tr.ensemble td { font-weight: bold; }
figure { margin: 1.5em 0; }
figure img { max-width: 100%; border: 1px solid #ddd; }
p.note { background: #fff6dd; padding: 0.5em 1em; }
"""


def markdown_table(headers, rows, numeric=()):
    """A Markdown table; columns whose header is in `numeric` are right-aligned.

    Args:
        headers: column titles.
        rows: lists of cell strings, one per row.
        numeric: titles of right-aligned columns.
    """
    def escape(cell):
        return str(cell).replace("|", "\\|")

    lines = ["| " + " | ".join(escape(header) for header in headers) + " |",
             "| " + " | ".join("---:" if header in numeric else "---" for header in headers) + " |"]
    lines += ["| " + " | ".join(escape(cell) for cell in row) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def html_table(headers, rows, numeric=(), row_classes=None):
    """An HTML table; `row_classes` optionally gives each row a CSS class (e.g. "baseline")."""
    row_classes = row_classes or [""] * len(rows)
    head = "".join(f"<th>{html.escape(str(header))}</th>" for header in headers)
    body = []
    for row, row_class in zip(rows, row_classes):
        cells = "".join(
            f'<td class="number">{html.escape(str(cell))}</td>' if header in numeric
            else f"<td>{html.escape(str(cell))}</td>" for header, cell in zip(headers, row))
        body.append(f'<tr class="{row_class}">{cells}</tr>' if row_class else f"<tr>{cells}</tr>")
    return f"<table>\n<thead><tr>{head}</tr></thead>\n<tbody>\n" + "\n".join(body) + "\n</tbody>\n</table>"


def write_index(path, title, *, table, notes=(), figures=(), links=()):
    """Writes an `index.html` showing a table, notes, figures and links.

    Args:
        path: the HTML file to write.
        title: page title.
        table: HTML of the table (`html_table`).
        notes: sentences shown above the table.
        figures: (caption, image path relative to the page) pairs.
        links: (text, path relative to the page) pairs shown under the table.
    """
    parts = [f"<!DOCTYPE html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n"
             f"<title>{html.escape(title)}</title>\n<style>{STYLE}</style>\n</head>\n<body>\n"
             f"<h1>{html.escape(title)}</h1>"]
    parts += [f'<p class="note">{html.escape(note)}</p>' for note in notes]
    parts.append(table)
    if links:
        parts.append("<p>" + " · ".join(f'<a href="{html.escape(target)}">{html.escape(text)}</a>'
                                        for text, target in links) + "</p>")
    for caption, image in figures:
        parts.append(f'<figure><img src="{html.escape(image)}" alt="{html.escape(caption)}">'
                     f"<figcaption>{html.escape(caption)}</figcaption></figure>")
    parts.append("</body>\n</html>\n")
    files.replace_into(path, lambda temporary: temporary.write_text("\n".join(parts)))
