"""A bias audit's folder read back (`Audit`): its results.json, its per-image predictions
and where its images are, for the commands that work on finished audits (``dtk eval
compare``, ``dtk eval label-sheet``). Published counts (a CSV of per-prompt counts) read as
an audit without images."""

from __future__ import annotations

import dataclasses
import json
import pathlib
from typing import TYPE_CHECKING, Any

import toolkit

if TYPE_CHECKING:
    import pandas

#: the row of an audit without a breakdown
ALL = "all"


@dataclasses.dataclass
class Audit:
    """One audit folder as the comparison reads it."""

    folder: pathlib.Path
    name: str
    results: dict[str, Any]
    predictions: pandas.DataFrame
    image_root: pathlib.Path

    @classmethod
    def read(cls, folder: str | pathlib.Path, name: str, attribute: str = "value") -> Audit:
        """An audit folder, or a CSV of published per-prompt counts (`from_counts`)."""
        import pandas

        folder = pathlib.Path(folder)
        if folder.is_file():
            return cls.from_counts(folder, name, attribute)
        try:
            results = json.loads((folder / "results.json").read_text())
            predictions = pandas.read_csv(folder / "predictions.csv", dtype=str,
                                          keep_default_na=False)  # fmt: skip
        except FileNotFoundError as exc:
            missing = pathlib.Path(exc.filename).name
            raise toolkit.DtkError(f"{folder} is not a bias audit (no {missing}; dtk eval bias "
                                   "writes one)") from None  # fmt: skip
        except (OSError, ValueError) as exc:
            raise toolkit.DtkError(f"cannot read the audit {folder}: {exc}") from None
        if results.get("command") != "eval bias":
            raise toolkit.DtkError(f"{folder}/results.json is not a bias audit's")
        config = results["config"]
        root = (
            folder / "samples" if config.get("images") is None else pathlib.Path(config["images"])
        )
        return cls(folder, name, results, predictions, root)

    @classmethod
    def from_counts(cls, path: pathlib.Path, name: str, attribute: str) -> Audit:
        """Published counts as an audit: a CSV with a ``prompt`` column and one column of
        counts per value of `attribute` (``prompt,female,male``), the target uniform. Its
        predictions are the counts spelled out, one row per classified image; it has no
        images to show."""
        import pandas

        try:
            table = pandas.read_csv(path, dtype={"prompt": str})
        except (OSError, ValueError, UnicodeDecodeError) as exc:
            raise toolkit.DtkError(f"cannot read the counts file {path}: {exc}") from None
        labels = [str(c) for c in table.columns if c != "prompt"]
        if "prompt" not in table.columns or len(labels) < 2:
            raise toolkit.DtkError(f"{path}: a counts file has a 'prompt' column and a column "
                                   "of counts per value (at least two)")  # fmt: skip
        counts = table[labels]
        if not all(pandas.api.types.is_integer_dtype(counts[c]) for c in labels) or (
                counts < 0).any().any():  # fmt: skip
            raise toolkit.DtkError(f"{path}: the counts must be whole numbers >= 0")
        rows = [(prompt, label)
                for prompt, *values in table[["prompt", *labels]].itertuples(index=False)
                for label, count in zip(labels, values) for _ in range(int(count))]  # fmt: skip
        predictions = pandas.DataFrame(rows, columns=["prompt", f"{attribute}_predicted"])
        totals = counts.sum()
        groups = {label: {"count": int(totals[label]), "target": 1 / len(labels)}
                  for label in labels}  # fmt: skip
        results = {"command": "eval bias",
                   "config": {"counts": str(path), "by": "prompt", "images": str(path)},
                   "attributes": {attribute: {"labels": labels, "groups": groups}}}  # fmt: skip
        return cls(path, name, results, predictions, path.parent)

    @property
    def has_images(self) -> bool:
        return "file_name" in self.predictions.columns

    @property
    def by(self) -> str | None:
        return self.results["config"].get("by")

    def attribute(self, attribute: str) -> dict[str, Any]:
        try:
            return self.results["attributes"][attribute]
        except KeyError:
            audited = ", ".join(self.results["attributes"])
            raise toolkit.DtkError(f"{self.folder} did not audit {attribute!r} (it audited "
                                   f"{audited})") from None  # fmt: skip

    def rows(self, by: str | None) -> list[str]:
        """The audit's row values (prompts, ``--by`` values), in first-seen order."""
        if by is None:
            return [ALL]
        return list(dict.fromkeys(self.predictions[by]))

    def labels_in(self, attribute: str, by: str | None, row: str) -> list[str]:
        """The predicted labels of the images of `row`."""
        frame = self.predictions if by is None else self.predictions[self.predictions[by] == row]
        return frame[f"{attribute}_predicted"].tolist()
