"""``dtk eval label-sheet``: a stratified random sample of an audit's images for a person to
label, and the way back (``dtk eval bias --human-labels``).

A classifier that is worse on one group manufactures bias, and the only judge of that on
the audited images themselves is a person. The sample is stratified by the classifier's
prediction (equal numbers of each predicted value while they last, so the rare value gets
as many checks as the common one), drawn with a seed, and shown in random order without
the predictions (labelers must not be anchored). The sheet is one HTML page: a choice per
value and "can't tell" under each image, the answers kept as CSV in a text box and saved
with one button; `--human-labels` turns that CSV into the audit's calibration (accuracy
per true value, corrected shares), exactly as a labeled `--calibration` folder would.
"""

from __future__ import annotations

import dataclasses
import pathlib
from typing import Any

import toolkit
from evaluations.audit_folder import Audit
from evaluations.common import write_csv, write_json
from evaluations.report import templates

SHEET, BLANK, ANSWERS = "label-sheet.html", "label-sheet.csv", "label-sheet-answers.csv"
#: the side, in pixels, images are shown at (small images are scaled up, pixelated)
SHOWN = 128


@dataclasses.dataclass
class LabelSheet:
    folder: pathlib.Path
    attribute: str
    values: list[str]
    files: list[str]
    #: how many images of each predicted value the sample holds
    strata: dict[str, int]


def write_label_sheet(
    audit_folder: str | pathlib.Path,
    out: str | pathlib.Path,
    *,
    n: int = 100,
    attribute: str | None = None,
    seed: int = 0,
) -> LabelSheet:
    """Write the sheet (label-sheet.html), a blank answers table (label-sheet.csv, for a
    spreadsheet instead) and label-sheet.json (what was sampled, how) to `out`."""
    import pandas

    toolkit.check_positive("--n", n)
    toolkit.check_seed(seed, what="--seed")
    out = pathlib.Path(out)
    toolkit.check_writable(out)
    audit = Audit.read(audit_folder, "audit")
    if not audit.has_images:
        raise toolkit.DtkError(f"{audit_folder} holds counts, not images: nothing to label")
    attribute = attribute or next(iter(audit.results["attributes"]))
    values = list(audit.attribute(attribute)["labels"])
    chosen, strata = _stratified(audit.predictions, f"{attribute}_predicted", n, seed)
    files = chosen["file_name"].tolist()
    out.mkdir(parents=True, exist_ok=True)
    sources = toolkit.image_sources(audit.image_root, chosen)
    items = [_item(source, f, k) for k, (source, f) in enumerate(zip(sources, files))]
    sheet = templates().get_template("label_sheet.html")
    page = sheet.render(attribute=attribute, values=values, audit=str(audit.folder), seed=seed,
                        answers_name=ANSWERS, items=items)  # fmt: skip
    toolkit.atomic_write(out / SHEET, page.encode("utf-8"))
    write_csv(out / BLANK, pandas.DataFrame({"file_name": files, attribute: [""] * len(files)}))
    write_json(out / "label-sheet.json", {
        "audit": str(audit.folder), "images": str(audit.image_root), "attribute": attribute,
        "values": values, "n": n, "seed": seed, "strata": strata, "files": files,
    })  # fmt: skip
    return LabelSheet(out, attribute, values, files, strata)


def _stratified(predictions: Any, column: str, n: int, seed: int) -> tuple[Any, dict[str, int]]:
    """Up to `n` rows, as even over the predicted values as their sizes allow (each value's
    quota topped up from the values with images to spare), shuffled."""
    import numpy as np
    import pandas

    rng = np.random.default_rng(seed)
    groups = {str(v): rows for v, rows in predictions.groupby(column, sort=True)}
    sizes = {v: len(rows) for v, rows in groups.items()}
    quota = {v: 0 for v in groups}
    left = min(n, sum(sizes.values()))
    while left:
        open_values = [v for v in groups if quota[v] < sizes[v]]
        share = max(1, left // len(open_values))
        for v in open_values:
            take = min(share, sizes[v] - quota[v], left)
            quota[v] += take
            left -= take
            if not left:
                break
    picked = [groups[v].iloc[rng.permutation(sizes[v])[: quota[v]]] for v in groups]
    sample = pandas.concat(picked)
    return sample.iloc[rng.permutation(len(sample))], quota


def _item(source: Any, file_name: str, key: int) -> dict[str, Any]:
    from PIL import Image

    with toolkit.open_image(source) as image:
        image = image.convert("RGB")
    if max(image.size) < SHOWN:  # scaled up whole pixels: the browser keeps them sharp
        factor = max(1, SHOWN // max(image.size))
        image = image.resize((image.width * factor, image.height * factor), Image.NEAREST)
    return {"file_name": file_name, "key": key, "png": toolkit.encode_png(image)}
