"""A fairness or safety edit on top of the user's usual guider: the ``base`` of ``fair`` and
``sld``.

Both methods are "classifier-free guidance plus an edit term" in their papers. Here the
classifier-free part is any registered guidance (``base=apg``, ``base=pag``,
``base=cfg_zero_star``, ...; default ``cfg``), set with ``base.KEY=VALUE`` options, and the
edit is added to its result. The toolkit evaluates the base's branches in the same batched
forward pass as the edit's, combines them with the base in the base's own space (a guider
on the network's raw outputs stays one), and hands the result to the editing guidance as
the ``base`` entry of its estimates (the guidance's optional ``base`` member;
docs/plugins.md). The base's perturbed branches (PAG's, SLG's) and prompts come along.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import toolkit
from toolkit import DtkError, OptionError, optional_member

if TYPE_CHECKING:
    import torch

#: the entry of `preds` holding the base guidance's combination
BASE = "base"
#: the prefix of the options that go to the base guidance
PREFIX = "base."
#: guidances that edit a base themselves: one edit on top of another is not supported
EDITING = ("fair", "sld")


def base_options(owner: str, extra: Mapping[str, Any]) -> dict[str, str]:
    """The ``base.KEY=VALUE`` options among `extra` (a plugin's ``**kwargs``), as the
    command-line text the base's own option conversion reads; anything else is refused."""
    unknown = [key for key in extra if not key.startswith(PREFIX)]
    if unknown:
        raise OptionError(f"{owner}: unknown option {unknown[0]!r} (options of the base "
                          f"guidance are given as base.KEY=VALUE)")  # fmt: skip
    return {key.removeprefix(PREFIX): _as_text(value) for key, value in extra.items()}


def _as_text(value: Any) -> str:
    """A Python value as the option text it stands for (Python callers may pass values)."""
    if isinstance(value, str):
        return value
    if value is None:
        return "none"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (list, tuple)):
        return ",".join(_as_text(v) for v in value)
    return str(value)


def make_base(owner: str, base: str, scale: float, options: Mapping[str, str]) -> Any:
    """The guidance `owner` edits: `base` with `options`, its ``scale`` `owner`'s unless
    given (every guider but ``none`` has a ``scale``)."""
    if base in EDITING:
        raise OptionError(f"{owner}: base {base!r} is itself an edit; the base is the guider "
                          f"the edit goes on top of (cfg, apg, pag, ...)")  # fmt: skip
    options = dict(options)
    if base != "none":
        options.setdefault("scale", str(scale))
    try:
        guidance = toolkit.create_plugin("guidance", base, options, from_strings=True)
    except DtkError as exc:
        raise OptionError(f"{owner}: base: {exc}") from None
    if optional_member("guidance", guidance, "text_branches"):
        raise OptionError(f"{owner}: base {base!r} brings prompts of its own; it cannot be "
                          f"stacked under {owner}")  # fmt: skip
    return guidance


class Stacked:
    """The members an editing guidance takes from its `base`: its branches first, then the
    edit's `own` ones; its perturbed and guide-model branches; its noise-level gating; its
    per-batch state.
    A subclass sets ``self.base`` and calls `stack_branches`."""

    base: Any

    def stack_branches(self, own: Sequence[str]) -> tuple[str, ...]:
        return tuple(dict.fromkeys([*self.base.branches, *own]))

    @property
    def perturbations(self) -> Mapping[str, Any]:
        return optional_member("guidance", self.base, "perturbations")

    @property
    def guide_models(self) -> Mapping[str, Any]:
        return optional_member("guidance", self.base, "guide_models")

    def base_active(self, sigma: float) -> tuple[str, ...]:
        active = optional_member("guidance", self.base, "active")
        return tuple(active(sigma)) if active is not None else tuple(self.base.branches)

    def start_base(self, conditions: Sequence[Mapping[str, str]]) -> None:
        start = optional_member("guidance", self.base, "start_batch")
        if start is not None:
            start(conditions)

    def base_estimate(self, preds: Mapping[str, torch.Tensor], sigma: float) -> torch.Tensor:
        """The base's combination: the toolkit's (in the base's space), or for a direct
        caller the base applied here, which only a clean-image-space base allows."""
        if BASE in preds:
            return preds[BASE]
        if optional_member("guidance", self.base, "space") != "denoised":
            raise DtkError(f"base {self.base.name!r} combines the network's outputs: call "
                           f"{self.name!r} through the toolkit's denoiser")  # fmt: skip
        return self.base(preds, sigma)
