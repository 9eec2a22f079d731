"""One report, two renderings: a self-contained ``report.html`` and a GitHub ``report.md``.

::

    report = Report("Bias audit: group")
    report.heading("Shares")
    report.text("Shares of `group` with **95%** intervals.")
    report.table(df, caption="Shares", float_format="{:.3f}")
    report.figure(png_bytes, caption="Shares by group", name="shares")
    report.gallery("Samples by predicted group", {"light": paths, "dark": paths})
    report.gallery("Samples", {"dark": [(path, "dark 0.93"), ...]})  # a caption per image
    report.config({"run": ..., "plugins": ...})
    report.write(folder)  # folder/report.html, folder/report.md, folder/figures/*.png

The HTML embeds every image as a data URI and carries a Content-Security-Policy that
forbids scripts and any fetch, so it can be mailed or archived as one file. The markdown
links its images under ``figures/``.
"""

from __future__ import annotations

import base64
import dataclasses
import datetime
import functools
import html
import json
import os
import pathlib
import re
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import markupsafe
import numpy as np
import pandas
from PIL import Image

import toolkit

__all__ = ["Report", "round_robin", "shown_path"]

#: Where a gallery image is: a path, or a sample of a shard (`toolkit.image_sources`).
ImageAt = str | pathlib.Path | toolkit.ShardedImage
#: A gallery image: where it is, or that and the caption shown under it.
GalleryItem = ImageAt | tuple[ImageAt, str]


PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
THUMB_MAX = 128  # embedded gallery images are downscaled to this; originals may be large
THUMB_DISPLAY = 64  # small images are shown at an integer multiple reaching this size
SHEET_COLUMNS = 8
SHEET_CELL = 64
SHEET_PAD = 2
SHEET_CAPTION = 14  # the strip under each contact-sheet cell that holds its caption
MISSING = "—"

# Only inline styles and data: images: the file stays one file, and whatever slips past
# escaping cannot run or phone home.
CSP = "default-src 'none'; img-src data:; style-src 'unsafe-inline'; script-src 'none'"

CSS = """
:root { color-scheme: light; --fg: #1f2328; --muted: #59636e; --line: #d1d9e0;
        --stripe: #f6f8fa; --accent: #0969da; }
* { box-sizing: border-box; }
body { margin: 0; color: var(--fg); background: #fff; line-height: 1.5;
       font: 16px/1.5 -apple-system, "Segoe UI", "Helvetica Neue", Arial, sans-serif; }
header { padding: 1.5rem 2rem 1rem; border-bottom: 1px solid var(--line);
         background: var(--stripe); }
header h1 { margin: 0 0 .25rem; font-size: 1.75rem; }
header .meta { margin: 0; color: var(--muted); font-size: .9rem; }
main { max-width: 1100px; padding: 1rem 2rem 3rem; }
h2 { margin-top: 2rem; padding-bottom: .25rem; border-bottom: 1px solid var(--line); }
h3, h4 { margin-top: 1.5rem; }
code, pre { font-family: ui-monospace, "SFMono-Regular", Menlo, Consolas, monospace;
            font-size: .875em; }
code { padding: .1em .3em; border-radius: 4px; background: var(--stripe); }
pre { padding: 1rem; overflow-x: auto; border-radius: 6px; background: var(--stripe); }
pre code { padding: 0; background: none; }
.table-wrap { overflow-x: auto; margin: 1rem 0; }
table { border-collapse: collapse; font-variant-numeric: tabular-nums; font-size: .9rem; }
caption { caption-side: top; text-align: left; padding-bottom: .4rem; color: var(--muted); }
th, td { padding: .35rem .75rem; border: 1px solid var(--line); text-align: left; }
th { background: var(--stripe); font-weight: 600; }
tbody tr:nth-child(even) { background: #fbfcfd; }
td.num, th.num { text-align: right; }
figure { margin: 1.25rem 0; }
figure img { max-width: 100%; height: auto; border: 1px solid var(--line); }
figcaption { color: var(--muted); font-size: .9rem; margin-top: .35rem; }
.gallery-group { margin: 1rem 0; }
.gallery-group h4 { margin: 0 0 .4rem; font-size: 1rem; }
.gallery-group .count { color: var(--muted); font-weight: normal; }
.thumbs { display: flex; flex-wrap: wrap; gap: 4px; }
.thumbs img { image-rendering: pixelated; border: 1px solid var(--line); background: #fff; }
.thumbs figure { margin: 0; text-align: center; }
.thumbs figcaption { margin: 0; font-size: .75rem; color: var(--muted);
                     font-variant-numeric: tabular-nums; }
.note { color: var(--muted); font-size: .9rem; font-style: italic; }
details { margin: 1rem 0; border: 1px solid var(--line); border-radius: 6px; padding: .5rem 1rem; }
summary { cursor: pointer; font-weight: 600; }
"""


# ---------------------------------------------------------------------------- escaping


_MD_SPECIAL = re.compile(r"([\\`*_\[\]<>|~&#!])")
_CODE_SPAN = re.compile(r"(`+)(.+?)\1", re.DOTALL)
_BOLD = re.compile(r"\*\*(?=\S)(.+?)(?<=\S)\*\*", re.DOTALL)
_ITALIC = re.compile(r"(?<![*\w])\*(?=[^\s*])(.+?)(?<=[^\s*])\*(?![*\w])", re.DOTALL)


def _md_plain(text: object) -> str:
    """`text` as markdown that renders literally, on one line."""
    return _MD_SPECIAL.sub(r"\\\1", " ".join(str(text).split()))


def _split_code(text: str) -> tuple[str, list[str]]:
    # code spans are set aside first so that `**` inside them is not taken as bold
    codes: list[str] = []

    def keep(match: re.Match[str]) -> str:
        codes.append(match.group(2))
        return f"\x00{len(codes) - 1}\x00"

    return _CODE_SPAN.sub(keep, text.replace("\x00", "")), codes


def _inline_html(text: str) -> str:
    """Minimal markdown (code spans, bold, italic) as escaped HTML."""
    rest, codes = _split_code(text)
    out = html.escape(rest, quote=False)
    out = _BOLD.sub(r"<strong>\1</strong>", out)
    out = _ITALIC.sub(r"<em>\1</em>", out)
    return re.sub(
        r"\x00(\d+)\x00",
        lambda m: f"<code>{html.escape(codes[int(m.group(1))].strip(), quote=False)}</code>",
        out,
    )


def _inline_md(text: str) -> str:
    """Minimal markdown passed through, with raw HTML outside code spans neutralised."""
    rest, codes = _split_code(text)
    out = rest.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")

    def code(match: re.Match[str]) -> str:
        body = codes[int(match.group(1))]
        fence = "`" * (_longest_backtick_run(body) + 1)
        pad = " " if body.startswith("`") or body.endswith("`") else ""
        return f"{fence}{pad}{body}{pad}{fence}"

    return re.sub(r"\x00(\d+)\x00", code, out)


def _longest_backtick_run(text: str) -> int:
    return max((len(run) for run in re.findall(r"`+", text)), default=0)


def _paragraphs(text: str) -> list[str]:
    return [p.strip() for p in re.split(r"\n\s*\n", text) if p.strip()]


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9]+", "-", text).strip("-").lower()[:60]


def _data_uri(png: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(png).decode("ascii")


# ---------------------------------------------------------------------------- images


def _png_size(png: bytes) -> tuple[int, int]:
    if not png.startswith(PNG_SIGNATURE) or png[12:16] != b"IHDR":
        raise ValueError("figure() wants PNG bytes")
    return int.from_bytes(png[16:20], "big"), int.from_bytes(png[20:24], "big")


def _load_image(source: ImageAt) -> Image.Image:
    if not isinstance(source, toolkit.ShardedImage):
        source = pathlib.Path(source)
    with toolkit.open_image(source) as opened:
        opened.load()
        alpha = "A" in opened.getbands() or "transparency" in opened.info
        image = opened.convert("RGBA" if alpha else "RGB")
    if max(image.size) > THUMB_MAX:
        image.thumbnail((THUMB_MAX, THUMB_MAX), Image.Resampling.LANCZOS)
    return image


def _shown_name(source: ImageAt) -> str:
    return source.name if isinstance(source, toolkit.ShardedImage) else pathlib.Path(source).name


def _encode_png(image: Image.Image) -> bytes:
    return toolkit.encode_png(image, optimize=True)


def _contact_sheet(images: Sequence[Image.Image], captions: Sequence[str] = ()) -> bytes:
    """The images in a grid; with `captions`, each one's caption written under it (the
    markdown report has no other place to put it)."""
    sheet = toolkit.image_grid(images, columns=max(1, min(SHEET_COLUMNS, len(images))),
                               cell=SHEET_CELL, gap=SHEET_PAD, background="#d1d9e0",
                               captions=captions, caption_height=SHEET_CAPTION)  # fmt: skip
    return _encode_png(sheet)


# ---------------------------------------------------------------------------- templates


@functools.cache
def templates() -> Any:
    """The Jinja2 environment of evaluations/templates (the report, the label sheet):
    autoescaped, with the filters their macros use."""
    import jinja2

    environment = jinja2.Environment(loader=jinja2.PackageLoader("evaluations", "templates"),
                                     autoescape=True, keep_trailing_newline=True,
                                     undefined=jinja2.StrictUndefined)  # fmt: skip
    environment.filters.update(
        inline=lambda text: markupsafe.Markup(_inline_html(text)),
        paragraphs=_paragraphs, data_uri=_data_uri, png_size=_png_size,
        gallery_note=_gallery_note,
    )  # fmt: skip
    return environment


def _template() -> Any:
    """templates/report.html."""
    return templates().get_template("report.html")


def _render(macro: str, *args: Any) -> str:
    """One of the template's macros rendered: a block's HTML, or the page."""
    return str(getattr(_template().module, macro)(*args))


# ---------------------------------------------------------------------------- blocks


@dataclasses.dataclass
class _Heading:
    text: str
    level: int

    def html(self) -> str:
        return _render("heading", self)

    def md(self) -> str:
        return f"{'#' * self.level} {_inline_md(' '.join(self.text.split()))}"


@dataclasses.dataclass
class _Text:
    text: str

    def html(self) -> str:
        return _render("text", self)

    def md(self) -> str:
        return "\n\n".join(_inline_md(p) for p in _paragraphs(self.text))


@dataclasses.dataclass
class _Table:
    header: list[str]
    rows: list[list[str]]
    numeric: list[bool]
    caption: str | None

    def html(self) -> str:
        return _render("table", self)

    def md(self) -> str:
        def line(cells: Sequence[str]) -> str:
            return "| " + " | ".join(_md_plain(c) if c else " " for c in cells) + " |"

        rule = "| " + " | ".join("---:" if n else "---" for n in self.numeric) + " |"
        lines = [line(self.header), rule, *(line(row) for row in self.rows)]
        if self.caption:
            lines.insert(0, f"*{_md_plain(self.caption)}*\n")
        return "\n".join(lines)


@dataclasses.dataclass
class _Figure:
    png: bytes
    caption: str
    name: str

    def html(self) -> str:
        return _render("figure", self)

    def md(self) -> str:
        image = f"![{_md_plain(self.caption or self.name)}](figures/{self.name}.png)"
        return f"{image}\n\n*{_md_plain(self.caption)}*" if self.caption else image

    def files(self) -> dict[str, bytes]:
        return {f"{self.name}.png": self.png}


@dataclasses.dataclass
class _GalleryGroup:
    label: str
    name: str
    total: int
    thumbs: list[bytes]
    sizes: list[tuple[int, int]]
    captions: list[str]
    sheet: bytes | None
    skipped: list[str]


@dataclasses.dataclass
class _Gallery:
    title: str
    groups: list[_GalleryGroup]
    note: str = ""

    def html(self) -> str:
        return _render("gallery", self)

    def md(self) -> str:
        parts = [f"### {_md_plain(self.title)}"]
        if self.note:
            parts.append(_inline_md(" ".join(self.note.split())))
        for group in self.groups:
            parts.append(
                f"**{_md_plain(group.label)}** ({len(group.thumbs)} of {group.total} shown)"
            )
            if group.sheet is not None:
                parts.append(f"![{_md_plain(group.label)}](figures/{group.name}.png)")
            if any(group.captions):
                said = "; ".join(c or MISSING for c in group.captions)
                parts.append(f"*Under the images, in reading order:* {_md_plain(said)}")
            if note := _gallery_note(group):
                parts.append(f"*{_md_plain(note)}*")
        return "\n\n".join(parts)

    def files(self) -> dict[str, bytes]:
        return {f"{g.name}.png": g.sheet for g in self.groups if g.sheet is not None}


def _gallery_note(group: _GalleryGroup) -> str:
    if group.skipped:
        listed = ", ".join(group.skipped[:5]) + (", …" if len(group.skipped) > 5 else "")
        return f"Skipped {len(group.skipped)} missing or unreadable image(s): {listed}"
    if not group.thumbs:
        return "No images."
    return ""


@dataclasses.dataclass
class _Config:
    data: Any
    title: str

    @property
    def json(self) -> str:
        return json.dumps(self.data, indent=2, default=str, ensure_ascii=False)

    def html(self) -> str:
        return _render("config", self)

    def md(self) -> str:
        body = self.json
        fence = "`" * max(3, _longest_backtick_run(body) + 1)
        return f"### {_md_plain(self.title)}\n\n{fence}json\n{body}\n{fence}"


# ---------------------------------------------------------------------------- helpers


def shown_interval(value: float | None, low: float | None, high: float | None, *,
                   signed: bool = False) -> str:  # fmt: skip
    """A figure and its interval as reports show them, ``0.123 [0.100, 0.150]`` (`signed`:
    ``+0.012 [-0.010, +0.021]``); the figure alone without an interval, and ``n/a`` without
    a figure (None, or NaN from a table)."""
    if value is None or value != value:
        return "n/a"
    fmt = "{:+.3f}" if signed else "{:.3f}"
    if low is None or high is None:
        return fmt.format(value)
    return f"{fmt.format(value)} [{fmt.format(low)}, {fmt.format(high)}]"


def shown_path(path: str | os.PathLike[str] | None) -> str | None:
    """`path` as a report and its results.json show it: as the user gave it (relative to
    where the command ran, or absolute if they typed it so), except a file of the installed
    package, which the user did not type — the shipped generator and classifiers — shown as
    ``toolkit/...`` rather than as this machine's site-packages or checkout folder."""
    if path is None:
        return None
    given = pathlib.Path(path)
    package = _package()
    if given.is_absolute() and package is not None:
        try:
            inside = given.resolve().relative_to(package)
        except ValueError:
            return str(path)
        return (pathlib.PurePosixPath(package.name) / inside.as_posix()).as_posix()
    return str(path)


@functools.lru_cache(maxsize=1)
def _package() -> pathlib.Path | None:
    """The installed toolkit's folder, found through its public API: the shipped generator
    is ``<package>/assets/generator`` (an installation without one ships nothing to hide)."""
    model = toolkit.default_model()
    return None if model is None else model.resolve().parent.parent


def round_robin(rows: pandas.DataFrame, column: str | None) -> pandas.DataFrame:
    """`rows` reordered so that each value of `column` (in natural order) gives its first
    row, then each its second, and so on: a gallery's first images cover every class before
    any class repeats. Within a class the order is kept; no `column` keeps it all."""
    if column is None or column not in rows.columns or rows.empty:
        return rows
    values = rows[column].astype(str)
    rank = values.groupby(values, sort=False).cumcount()
    order = sorted(set(values), key=toolkit.natural_key)
    position = values.map({v: i for i, v in enumerate(order)})
    keys = pandas.DataFrame({"rank": rank.to_numpy(), "class": position.to_numpy()})
    return rows.iloc[keys.sort_values(["rank", "class"], kind="stable").index.to_numpy()]


# ---------------------------------------------------------------------------- tables


def _format_cell(value: object, float_format: Callable[[float], str]) -> str:
    if isinstance(value, (list, tuple, dict, set, np.ndarray)):
        return str(value)
    if value is None or (not isinstance(value, str) and pandas.isna(value)):
        return MISSING
    if isinstance(value, (bool, np.bool_)):
        return str(bool(value))
    if isinstance(value, (float, np.floating)):
        return float_format(float(value))
    return str(value)


def _column_label(label: object) -> str:
    if isinstance(label, tuple):
        return " / ".join(str(part) for part in label if str(part))
    return "" if label is None else str(label)


def _build_table(
    df: pandas.DataFrame, caption: str | None, float_format: str | Callable[[float], str]
) -> _Table:
    fmt = float_format.format if isinstance(float_format, str) else float_format
    # a default RangeIndex is row numbering, not data
    if df.index.names != [None] or not isinstance(df.index, pandas.RangeIndex):
        names = [n if n is not None else "" for n in df.index.names]
        frame = df.copy()
        frame.index = frame.index.set_names([f"\x00index{i}" for i in range(len(names))])
        frame = frame.reset_index()
        header = names + [_column_label(c) for c in df.columns]
    else:
        frame = df
        header = [_column_label(c) for c in df.columns]
    numeric = [
        pandas.api.types.is_numeric_dtype(frame.iloc[:, i])
        and not pandas.api.types.is_bool_dtype(frame.iloc[:, i])
        for i in range(frame.shape[1])
    ]
    rows = [[_format_cell(v, fmt) for v in row] for row in frame.itertuples(index=False)]
    return _Table(header, rows, numeric, caption)


# ---------------------------------------------------------------------------- report


class Report:
    """A report built block by block and written as HTML and markdown."""

    def __init__(self, title: str, created: datetime.datetime | str | None = None) -> None:
        self.title = title
        if created is None:
            created = datetime.datetime.now(datetime.timezone.utc)
        if isinstance(created, datetime.datetime):
            created = created.isoformat(timespec="seconds")
        self.created = created
        self._blocks: list[Any] = []
        self._names: set[str] = set()

    def _unique_name(self, wanted: str) -> str:
        base = _slug(wanted) or "figure"
        name, n = base, 2
        while name in self._names:
            name, n = f"{base}-{n}", n + 1
        self._names.add(name)
        return name

    def heading(self, text: str, level: int = 2) -> Report:
        """A section heading, with the same inline markup as `text`."""
        if not 1 <= level <= 6:
            raise ValueError(f"heading level must be 1..6, not {level}")
        self._blocks.append(_Heading(str(text), level))
        return self

    def text(self, text: str) -> Report:
        """Paragraphs (split at blank lines) with `code`, **bold** and *italic*."""
        self._blocks.append(_Text(str(text)))
        return self

    def table(
        self,
        df: pandas.DataFrame,
        *,
        caption: str | None = None,
        float_format: str | Callable[[float], str] = "{:.3f}",
    ) -> Report:
        """A DataFrame; its index is shown when named or not a plain RangeIndex."""
        self._blocks.append(_build_table(df, caption, float_format))
        return self

    def figure(self, png: bytes, *, caption: str = "", name: str | None = None) -> Report:
        """A PNG image, written as ``figures/<name>.png`` next to report.md."""
        _png_size(png)
        self._blocks.append(_Figure(png, caption, self._unique_name(name or "figure")))
        return self

    def gallery(
        self,
        title: str,
        groups: Mapping[str, Sequence[GalleryItem]],
        *,
        max_per_group: int = 16,
        note: str = "",
    ) -> Report:
        """Up to `max_per_group` images per group, in the order given; an item is where an
        image is (`ImageAt`) or that and a caption, shown under the image. `note` (inline
        markup as in `text`) says what the gallery shows. Unreadable images are skipped and
        noted."""
        built = []
        for label, items in groups.items():
            images, captions, skipped = [], [], []
            items = list(items)
            for item in items:
                if len(images) >= max_per_group:
                    break
                source, caption = item if isinstance(item, tuple) else (item, "")
                try:
                    images.append(_load_image(source))
                except (OSError, ValueError, SyntaxError, Image.DecompressionBombError,
                        toolkit.DtkError):  # fmt: skip
                    skipped.append(_shown_name(source))
                    continue
                captions.append(str(caption))
            built.append(
                _GalleryGroup(
                    label=str(label),
                    name=self._unique_name(f"gallery-{_slug(title)}-{_slug(str(label))}"),
                    total=len(items),
                    thumbs=[_encode_png(im) for im in images],
                    sizes=[toolkit.fit_size(im.size, THUMB_DISPLAY) for im in images],
                    captions=captions,
                    sheet=_contact_sheet(images, captions) if images else None,
                    skipped=skipped,
                )
            )
        self._blocks.append(_Gallery(str(title), built, str(note)))
        return self

    def config(self, data: Mapping[str, Any], *, title: str = "Configuration") -> Report:
        """The run's configuration, collapsed in HTML and a json block in markdown."""
        self._blocks.append(_Config(data, title))
        return self

    def html(self) -> str:
        """The report as one self-contained HTML page (templates/report.html)."""
        blocks = [markupsafe.Markup(block.html()) for block in self._blocks]
        return _render("page", self.title, self.created, CSP, CSS, blocks)

    def markdown(self) -> str:
        """The report as GitHub markdown; images are linked under ``figures/``."""
        head = f"# {_md_plain(self.title)}\n\nGenerated {_md_plain(self.created)}"
        return "\n\n".join([head, *(block.md() for block in self._blocks)]) + "\n"

    def write(self, folder: str | pathlib.Path) -> tuple[pathlib.Path, pathlib.Path]:
        """Write report.html, report.md and figures/ into `folder`; return the two reports."""
        folder = pathlib.Path(folder)
        for block in self._blocks:
            for name, data in getattr(block, "files", dict)().items():
                toolkit.atomic_write(folder / "figures" / name, data)
        html_path, md_path = folder / "report.html", folder / "report.md"
        toolkit.atomic_write(html_path, self.html().encode("utf-8"))
        toolkit.atomic_write(md_path, self.markdown().encode("utf-8"))
        return html_path, md_path
