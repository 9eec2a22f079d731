"""Built-in attribute classifier: ``clip``, zero-shot classification with a local CLIP model.

Each label becomes a text prompt (``template``, or several ``templates`` averaged as in the
CLIP paper, or one ``label_prompts`` entry per label); with a ``words`` file (see
`toolkit.read_words`) a label's words, not the label itself, fill the templates' ``{label}``
field, and the labels default to the file's values for the attribute. An image's
probabilities are ``softmax(logit_scale * cosine(image, prompt))`` over the labels. The
model folder is what ``CLIPModel.save_pretrained`` and ``CLIPProcessor.save_pretrained``
(or the tokenizer's and image processor's) write; nothing is downloaded.
"""

from __future__ import annotations

import json
import pathlib
from typing import TYPE_CHECKING, Any

import toolkit
from toolkit import DtkError, OptionError, quiet_transformers

if TYPE_CHECKING:
    import torch

DEFAULT_TEMPLATE = "a photo of a {label}"
PLACEHOLDER = "{label}"


class CLIPClassifier:
    """Zero-shot attribute classifier over a local CLIP model (`path`).

    `attribute` names what is predicted, `labels` its values. Prompts: `template` with
    ``{label}`` replaced by each label; `templates` (several) replaces `template` and averages
    the normalized text embeddings of a label's prompts; `label_prompts` gives one full
    prompt per label (same order as `labels`) and overrides both. On the command line list
    options are comma-separated, so a template there cannot itself contain a comma.

    `words`, a words file (`toolkit.read_words`), says how each value is written: its words
    replace ``{label}`` in the templates, and without `labels` the labels are the file's
    values for `attribute`, in file order. One file thus serves one classifier per attribute
    (``dtk eval bias --attribute gender --attribute skin_tone``). `labels` stay the values:
    they name the columns of `predict_proba` and what `predict` returns; `label_words` maps
    each label to its text in the prompts.

    `predict_proba` always returns probabilities over `labels` (no "unknown" column): callers
    that want abstention apply a confidence threshold of their own (``dtk eval bias
    --min-confidence``). `predict` abstains (``None``) where the top probability beats the
    second by less than `margin`. `trust_pickle` allows pickled (non-safetensors) weights.
    """

    name = "clip"

    def __init__(
        self,
        path: pathlib.Path,
        attribute: str,
        labels: list[str] | None = None,
        words: pathlib.Path | None = None,
        template: str = DEFAULT_TEMPLATE,
        templates: list[str] | None = None,
        label_prompts: list[str] | None = None,
        margin: float = 0.0,
        batch_size: int = 64,
        device: str = "cpu",
        trust_pickle: bool = False,
    ) -> None:
        path = pathlib.Path(path)
        if not attribute:
            raise OptionError("clip: attribute must not be empty")
        labels, said = _labels(attribute, labels, words, label_prompts)
        self.prompts = _prompts(labels, said, template, templates, label_prompts)
        if not 0.0 <= margin <= 1.0:
            raise OptionError(f"clip: margin must be in [0, 1], got {margin}")
        if batch_size < 1:
            raise OptionError(f"clip: batch_size must be at least 1, got {batch_size}")
        _check_folder(path, trust_pickle)

        import torch

        self.device = toolkit.resolve_device(device)
        self._model, self._tokenizer, self._image_processor = _load(path, trust_pickle)
        self._model.to(self.device)
        self.path = path
        self.attribute = attribute
        self.labels = labels
        #: each label's text in the prompts (the label itself without a words file)
        self.label_words = dict(zip(labels, said))
        self.margin = margin
        self.batch_size = batch_size
        with torch.inference_mode():
            self._text = self._label_embeddings()
            self._logit_scale = self._model.logit_scale.detach().exp()

    def predict_proba(self, images: torch.Tensor) -> torch.Tensor:
        """``[B, len(labels)]`` probabilities for float images ``[B, C, H, W]`` in [0, 1].

        ``softmax(logit_scale * cosine similarity)`` of each image with each label's text
        embedding. No abstention here: threshold the result to get one.
        """
        import torch

        if images.ndim != 4 or images.shape[1] not in (1, 3, 4):
            raise DtkError(
                f"clip: expected images [B, C, H, W] with 1, 3 or 4 channels, "
                f"got shape {list(images.shape)}"
            )
        chunks = [torch.zeros(0, len(self.labels))]
        with torch.inference_mode():
            for start in range(0, images.shape[0], self.batch_size):
                features = self._image_embeddings(images[start : start + self.batch_size])
                logits = self._logit_scale * features @ self._text.T
                chunks.append(logits.softmax(dim=-1).float().cpu())
        return torch.cat(chunks)

    def predict(self, images: torch.Tensor) -> list[str | None]:
        """The most probable label per image, or ``None`` where it leads the runner-up by
        less than `margin` (with margin 0, never ``None``)."""
        probabilities = self.predict_proba(images)
        top = probabilities.topk(2, dim=-1)
        lead = (top.values[:, 0] - top.values[:, 1]).tolist()
        return [
            self.labels[index] if gap >= self.margin else None
            for index, gap in zip(top.indices[:, 0].tolist(), lead)
        ]

    def pixel_values(self, images: torch.Tensor) -> torch.Tensor:
        """`images` as the CLIP image processor prepares them (resized, cropped, normalized)."""
        images = images.detach().float().cpu().clamp(0, 1)
        if images.shape[1] == 1:
            images = images.expand(-1, 3, -1, -1)
        images = images[:, :3]  # CLIP sees RGB; alpha carries no content for it
        # the images are already floats in [0, 1]: rescaling would divide by 255 again, and
        # an explicit layout keeps tiny images (e.g. 3 x 3) from being read channels-last
        batch = self._image_processor(
            images=list(images),
            do_rescale=False,
            input_data_format="channels_first",
            return_tensors="pt",
        )
        return batch["pixel_values"]

    def _image_embeddings(self, images: torch.Tensor) -> torch.Tensor:
        pixels = self.pixel_values(images).to(self.device, self._model.dtype)
        features = _features(self._model.get_image_features(pixel_values=pixels))
        return features / features.norm(dim=-1, keepdim=True)

    def _label_embeddings(self) -> torch.Tensor:
        import torch

        texts = [prompt for prompts in self.prompts for prompt in prompts]
        limit = min(
            self._tokenizer.model_max_length,
            self._model.config.text_config.max_position_embeddings,
        )
        tokens = self._tokenizer(
            texts, padding=True, truncation=True, max_length=limit, return_tensors="pt"
        ).to(self.device)
        features = _features(
            self._model.get_text_features(
                input_ids=tokens["input_ids"], attention_mask=tokens.get("attention_mask")
            )
        )
        features = features / features.norm(dim=-1, keepdim=True)
        per_label = torch.stack(
            [group.mean(dim=0) for group in features.split([len(p) for p in self.prompts])]
        )
        # the mean of unit vectors is shorter than 1; cosine similarity needs unit length
        return per_label / per_label.norm(dim=-1, keepdim=True)


def _labels(
    attribute: str,
    labels: list[str] | None,
    words: pathlib.Path | None,
    label_prompts: list[str] | None,
) -> tuple[list[str], list[str]]:
    """The labels, and the text each one puts into the templates."""
    if words is None:
        if labels is None:
            raise OptionError(
                "clip: give labels=VALUE,VALUE,... or words=FILE (a words file listing "
                f"the {attribute} values)"
            )
        labels = [str(label) for label in labels]
        return labels, labels
    if label_prompts is not None:
        # the prompts would already be written out: which text would the words replace?
        raise OptionError("clip: give words or label_prompts, not both")
    try:
        said = toolkit.value_words(attribute, labels, words)
    except DtkError as exc:
        raise OptionError(f"clip: {exc}") from None
    if len(said) < 2 and labels is None:
        raise OptionError(
            f"clip: the words file {words} lists one {attribute} value ({next(iter(said))}); "
            "the classifier needs at least two to choose between"
        )
    return list(said), list(said.values())


def _prompts(
    labels: list[str],
    said: list[str],
    template: str,
    templates: list[str] | None,
    label_prompts: list[str] | None,
) -> list[list[str]]:
    """The prompts of each label, in label order; `said` is each label's text in them."""
    if len(labels) < 2:
        raise OptionError(f"clip: labels needs at least two labels to choose between, got {labels}")
    if any(not label.strip() for label in labels):
        raise OptionError(f"clip: labels must not be empty strings, got {labels}")
    duplicates = sorted({label for label in labels if labels.count(label) > 1})
    if duplicates:
        raise OptionError(f"clip: labels must be distinct; repeated: {', '.join(duplicates)}")
    if label_prompts is not None:
        if len(label_prompts) != len(labels):
            raise OptionError(
                f"clip: label_prompts needs one prompt per label ({len(labels)}), "
                f"got {len(label_prompts)}"
            )
        return [[prompt] for prompt in label_prompts]
    if templates is not None and not templates:
        raise OptionError("clip: templates must not be empty")
    chosen = list(templates) if templates is not None else [template]
    lacking = [t for t in chosen if PLACEHOLDER not in t]
    if lacking:
        # without the label in it, every label would get the same prompt
        raise OptionError(f"clip: template {lacking[0]!r} does not contain {PLACEHOLDER}")
    # str.replace, not str.format: other braces in a template are literal text
    return [[t.replace(PLACEHOLDER, text) for t in chosen] for text in said]


def _check_folder(path: pathlib.Path, trust_pickle: bool) -> None:
    """Fail with one line, before importing transformers, when `path` is no CLIP folder."""
    if not path.is_dir():
        raise OptionError(f"clip: model folder {path} does not exist")
    config = path / "config.json"
    try:
        model_type = json.loads(config.read_text()).get("model_type")
    except FileNotFoundError:
        raise OptionError(
            f"clip: {path} is not a CLIP model folder (no config.json; "
            "write one with CLIPModel.save_pretrained)"
        ) from None
    except (OSError, ValueError, AttributeError) as exc:
        raise OptionError(f"clip: cannot read {config}: {_one_line(exc)}") from None
    if model_type != "clip":
        raise OptionError(
            f"clip: {path} holds a {model_type or 'non-transformers'} model, not a CLIP "
            "model (config.json model_type 'clip')"
        )
    # transformers quietly builds an empty tokenizer when its files are missing
    has_tokenizer = (path / "tokenizer.json").is_file() or all(
        (path / name).is_file() for name in ("vocab.json", "merges.txt")
    )
    has_image_processor = any(
        (path / name).is_file() for name in ("preprocessor_config.json", "processor_config.json")
    )
    if not (has_tokenizer and has_image_processor):
        missing = "tokenizer" if not has_tokenizer else "image processor"
        raise OptionError(
            f"clip: {path} has no {missing}; save the model's CLIPProcessor there too "
            "(CLIPProcessor.save_pretrained)"
        )
    if not trust_pickle and not any(path.glob("*.safetensors*")):
        raise OptionError(
            f"clip: {path} has no safetensors weights; pass trust_pickle=true to load "
            "pickled weights from a source you trust"
        )


def _load(path: pathlib.Path, trust_pickle: bool) -> tuple[Any, Any, Any]:
    from transformers import AutoImageProcessor, AutoTokenizer, CLIPModel

    try:
        with quiet_transformers():
            model = CLIPModel.from_pretrained(
                path, local_files_only=True, use_safetensors=None if trust_pickle else True
            )
    except (OSError, ValueError) as exc:
        raise DtkError(f"clip: cannot load the CLIP model in {path}: {_one_line(exc)}") from None
    parts = []
    for what, loader in (("tokenizer", AutoTokenizer), ("image processor", AutoImageProcessor)):
        try:
            with quiet_transformers():
                parts.append(loader.from_pretrained(path, local_files_only=True))
        except (OSError, ValueError, TypeError, KeyError) as exc:
            raise DtkError(f"clip: cannot load the {what} in {path}: {_one_line(exc)}") from None
    model.eval().requires_grad_(False)
    return model, parts[0], parts[1]


def _features(output: Any) -> torch.Tensor:
    # transformers 5 returns a model output whose pooler_output is the projected embedding;
    # earlier versions return the embedding itself
    return output if hasattr(output, "norm") else output.pooler_output


def _one_line(exc: BaseException) -> str:
    lines = str(exc).strip().splitlines()
    return lines[0] if lines else type(exc).__name__


@toolkit.hookimpl
def register_attribute_classifiers(register: toolkit.Register) -> None:
    register(CLIPClassifier)
