"""evaluations.report and evaluations.plots: content, escaping, self-containment, rendering."""

from __future__ import annotations

import base64
import io
import json
import math
import re

import numpy as np
import pandas
import pytest
from browser import check_renders, img_srcs
from PIL import Image

from evaluations.plots import accuracy_plot, shares_plot
from evaluations.report import Report

CREATED = "2025-01-02T03:04:05+00:00"
EVIL = "<script>alert(1)</script> | x"

GROUPS = {
    "light": {"share": 0.62, "ci_low": 0.55, "ci_high": 0.69},
    "dark": {"share": 0.38, "ci_low": 0.31, "ci_high": 0.45},
}


def png_bytes(color: tuple[int, int, int], size: tuple[int, int] = (16, 16)) -> bytes:
    buffer = io.BytesIO()
    image = Image.new("RGB", size, color)
    image.putpixel((0, 0), (255, 255, 255))
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def pixels(png: bytes) -> np.ndarray:
    with Image.open(io.BytesIO(png)) as image:
        assert image.format == "PNG"
        return np.asarray(image.convert("RGB"))


@pytest.fixture
def sample_images(tmp_path):
    folder = tmp_path / "samples"
    folder.mkdir()
    paths = {"light": [], "dark": []}
    for i in range(3):
        for label, base in (("light", 220), ("dark", 40)):
            path = folder / f"{label}-{i}.png"
            path.write_bytes(png_bytes((base, base - 20 * i + 20, 90)))
            paths[label].append(path)
    paths["dark"].append(folder / "gone.png")  # never written
    return paths


@pytest.fixture
def table():
    return pandas.DataFrame(
        {"share": [0.61803, 0.38197], "n": [55, 34], "note": [EVIL, "a|b"]},
        index=pandas.Index(["light", "dark <b>"], name="group"),
    )


def build(sample_images, table) -> Report:
    report = Report(f"Bias audit: {EVIL}", created=CREATED)
    report.heading("Shares of `group` <b>", level=2)
    report.text("Counts of `group` with **95%** intervals.\n\nSecond <i>paragraph</i>.")
    report.table(table, caption=f"Shares {EVIL}", float_format="{:.3f}")
    report.figure(shares_plot(GROUPS, {"light": 0.5, "dark": 0.5}), caption="Shares", name="shares")
    report.gallery("Samples by predicted group", sample_images, max_per_group=2)
    report.config({"run": {"n": 89, "label": EVIL}, "plugins": [{"name": "karras", "v": "1.0"}]})
    return report


def test_html_shows_every_table_value_and_escapes_labels(sample_images, table):
    page = build(sample_images, table).html()
    for value in ["0.618", "0.382", "55", "34", "group", "share", "light", "a|b"]:
        assert value in page
    assert "dark &lt;b&gt;" in page
    assert "<script>" not in page
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in page
    assert "<h2>Shares of <code>group</code> &lt;b&gt;</h2>" in page
    assert "<code>group</code>" in page and "<strong>95%</strong>" in page
    assert "<i>" not in page
    assert CREATED in page


def test_range_index_is_hidden_and_named_index_shown():
    plain = Report("t").table(pandas.DataFrame({"a": [1.5]})).html()
    assert "<th" in plain and ">0<" not in plain
    named = Report("t").table(pandas.DataFrame({"a": [1.5]}, index=["x"])).html()
    assert ">x<" in named and ">1.500<" in named
    missing = Report("t").table(pandas.DataFrame({"a": [math.nan, None]})).html()
    assert missing.count("—") == 2


def test_html_is_self_contained_and_every_image_is_an_embedded_png(sample_images, table):
    page = build(sample_images, table).html()
    assert 'src="http' not in page and 'src="file' not in page
    assert "<link" not in page and "@import" not in page and "url(" not in page
    srcs = img_srcs(page)
    assert len(srcs) == 1 + 2 + 2  # the figure, then max_per_group per gallery group
    for src in srcs:
        assert src.startswith("data:image/png;base64,")
        with Image.open(io.BytesIO(base64.b64decode(src.split(",", 1)[1]))) as image:
            image.verify()
    assert "image-rendering: pixelated" in page


def test_missing_gallery_image_is_noted_not_fatal(tmp_path, sample_images):
    paths = {"dark": [tmp_path / "nope.png", *sample_images["dark"][:1]], "none": []}
    report = Report("t").gallery("Samples", paths)
    page, md = report.html(), report.markdown()
    assert len(img_srcs(page)) == 1
    assert "nope.png" in page and "nope.png" in md
    assert "1 of 2 shown" in page and "No images." in page


def test_write_links_existing_files_and_escapes_markdown(tmp_path, sample_images, table):
    html_path, md_path = build(sample_images, table).write(tmp_path / "out")
    assert html_path == tmp_path / "out" / "report.html" and html_path.is_file()
    md = md_path.read_text()
    links = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", md)
    assert len(links) == 1 + 2  # the figure and one contact sheet per group
    for link in links:
        assert not link.startswith(("/", "http"))
        with Image.open(md_path.parent / link) as image:
            image.verify()
    assert (md_path.parent / "figures" / "shares.png").is_file()
    prose, config = md.split("```json\n", 1)
    assert "<script>" not in prose and r"\<script\>" in prose
    assert "## Shares of `group` &lt;b&gt;" in md
    assert r"a\|b" in md  # a pipe in a cell does not split it
    row = next(line for line in md.splitlines() if line.startswith("| light"))
    assert row.count(" | ") == 3
    assert json.loads(config.split("\n```", 1)[0])["run"]["label"] == EVIL
    assert not list(tmp_path.rglob("*.tmp"))


def test_contact_sheet_upscales_small_images(tmp_path, sample_images):
    report = Report("t").gallery("G", {"light": sample_images["light"]})
    report.write(tmp_path)
    (sheet,) = (tmp_path / "figures").iterdir()
    with Image.open(sheet) as image:
        assert image.width > 3 * 16 * 2 and image.height > 16 * 2


def test_figure_rejects_non_png():
    with pytest.raises(ValueError, match="PNG"):
        Report("t").figure(b"GIF89a...")


def test_plots_are_deterministic_pngs_that_depend_on_the_data():
    first = shares_plot(GROUPS, {"light": 0.5, "dark": 0.5}, title="Shares")
    assert first == shares_plot(GROUPS, {"light": 0.5, "dark": 0.5}, title="Shares")
    other = shares_plot(GROUPS, {"light": 0.5, "dark": 0.5}, corrected={"light": 0.9, "dark": 0.1})
    assert pixels(first).shape == (350, 600, 3)
    assert not np.array_equal(pixels(first), pixels(other))

    def summary(dark: float) -> pandas.DataFrame:
        return pandas.DataFrame({
            "method": ["real", "real + synthetic"],
            "accuracy_light_mean": [0.9, 0.88],
            "accuracy_light_ci_low": [0.85, None],
            "accuracy_light_ci_high": [0.95, None],
            "accuracy_dark_mean": [dark, math.nan],
        })  # fmt: skip

    a = accuracy_plot(summary(0.7), groups=["light", "dark"], title="Accuracy")
    b = accuracy_plot(summary(0.3), groups=["light", "dark"], title="Accuracy")
    assert pixels(a).std() > 10
    assert not np.array_equal(pixels(a), pixels(b))
    with pytest.raises(ValueError, match="accuracy_green_mean"):
        accuracy_plot(summary(0.7), groups=["green"])


def test_report_renders_in_headless_chromium(tmp_path, sample_images, table):
    html_path, _ = build(sample_images, table).write(tmp_path / "out")
    assert check_renders(html_path, tmp_path) > 0
