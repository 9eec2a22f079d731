"""Galleries that show what a reader needs: every class before any repeats, captions under
the images (HTML) and on the contact sheet (markdown)."""

from __future__ import annotations

import base64
import io

import numpy as np
import pandas
from browser import img_srcs
from PIL import Image

import toolkit
from evaluations.report import Report, round_robin
from evaluations.synthesis import SynthesisConfig, SynthesisResult, SynthesisRound
from evaluations.synthesis_report import add_synthesis_section


def colour(digit: int) -> tuple[int, int, int]:
    return (20 * digit + 10, 200 - 15 * digit, 90)


def thumbnail_digits(page: str) -> list[int]:
    """The digit of each embedded thumbnail, read back from its colour."""
    digits = []
    for src in img_srcs(page):
        png = base64.b64decode(src.split(",", 1)[1])
        with Image.open(io.BytesIO(png)) as image:
            red = np.asarray(image.convert("RGB"))[0, 0, 0]
        digits.append((int(red) - 10) // 20)
    return digits


def test_synthetic_gallery_shows_every_digit_before_any_repeats(tmp_path):
    # 5 dark images per digit, listed digit by digit as `synthesize` writes them
    rows = []
    for digit in range(10):
        for i in range(5):
            name = f"{digit}_dark/r0-{5 * digit + i:06d}.png"
            (tmp_path / "synthetic" / name).parent.mkdir(parents=True, exist_ok=True)
            Image.new("RGB", (16, 16), colour(digit)).save(tmp_path / "synthetic" / name)
            rows.append({"file_name": name, "digit": str(digit), "group": "dark"})
    synthetic = pandas.DataFrame(rows)
    config = SynthesisConfig(
        data="real", model="toolkit/assets/generator", out=str(tmp_path), attribute="group",
        by="digit", target="balanced", target_shares={"dark": 0.5, "light": 0.5}, budget=None,
        filters=[], consistency_threshold=0.5, memorization_threshold=0.03, max_rounds=1,
        seed=0, generation=toolkit.GenerationSettings(), prompt_template=None,
        negative_prompt=None, words=None, classifier="cnn", classifier_options={},
    )  # fmt: skip
    plan = pandas.DataFrame({"digit": ["0"], "group": ["dark"], "have": [1], "want": [6],
                             "generate": [5], "generated": [5]})  # fmt: skip
    result = SynthesisResult(created="2026-01-01T00:00:00+00:00", config=config, plugins=[],
                             versions={}, planned=50, accepted=50, shortfall=0,
                             rounds=[SynthesisRound(0, 0, 50, 50, 0)], rejections={},
                             plan=plan, synthetic=synthetic)  # fmt: skip
    report = Report("t")
    add_synthesis_section(report, tmp_path, result, level=2)
    assert thumbnail_digits(report.html()) == [*range(10), *range(6)]
    # the same order, said under each image
    assert "digit 0; digit 1; digit 2" in report.markdown()


def test_round_robin_takes_each_class_in_turn_and_keeps_order_within_it():
    rows = pandas.DataFrame({"digit": ["10", "2", "2", "10", "9", "2"], "n": range(6)},
                            index=list("abcdef"))  # fmt: skip
    assert round_robin(rows, "digit")["n"].tolist() == [1, 4, 0, 2, 3, 5]
    assert round_robin(rows, None) is rows
    assert round_robin(rows.iloc[:0], "digit").empty


def test_captions_go_under_each_html_image_and_onto_the_contact_sheet(tmp_path):
    paths = []
    for i, value in enumerate((30, 220)):
        paths.append(tmp_path / f"{i}.png")
        Image.new("RGB", (16, 16), (value, value, value)).save(paths[-1])
    report = Report("t").gallery(
        "Samples", {"dark": [(paths[0], "dark (0.93)"), (paths[1], "light <0.61>")]},
        note="Under each: the **label**.",
    )  # fmt: skip
    page = report.html()
    assert page.count("<figcaption>") == 2
    assert "<figcaption>dark (0.93)</figcaption>" in page
    assert "<figcaption>light &lt;0.61&gt;</figcaption>" in page
    assert "Under each: the <strong>label</strong>." in page
    md = report.markdown()
    assert r"*Under the images, in reading order:* dark (0.93); light \<0.61\>" in md
    report.write(tmp_path / "out")
    (sheet,) = (tmp_path / "out" / "figures").iterdir()
    plain = Report("t").gallery("Samples", {"dark": paths})
    plain.write(tmp_path / "plain")
    (bare,) = (tmp_path / "plain" / "figures").iterdir()
    with Image.open(sheet) as captioned, Image.open(bare) as uncaptioned:
        # a strip under the cells holds the captions: dark text on white
        assert captioned.height > uncaptioned.height
        strip = np.asarray(captioned.convert("L"))[uncaptioned.height - 2 :]
        assert strip.min() < 100 and strip.max() == 255
    assert "<figcaption>" not in plain.html()
