"""Captions for the colored digits: the text the shipped text-to-image model learns from.

Every image gets one caption, fixed by (seed, source index, group). The digit is always
named; the group only in a share of the captions (`GROUP_NAMED`), independently of which
group the image is in. So a neutral caption ("a handwritten seven") describes a sample of
the training distribution, skew included, and a model trained on them reproduces that skew
for neutral prompts: what a text-to-image bias audit exists to reveal. The group is said
as the paper the digit is drawn on ("on dark paper"), which is what tells the groups apart
at a glance (`colored_digits.STYLES`).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import numpy as np

DIGIT_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
#: the share of captions that name the image's group
GROUP_NAMED = 0.5
#: captions that name the digit only ({digit}: its word)
NEUTRAL = ("a {digit}", "a handwritten {digit}", "the digit {digit}", "a drawing of a {digit}")
#: captions that name the group too ({group}: ``dark`` or ``light``, the group's name)
NAMED = ("a {digit} on {group} paper", "a {group} {digit}",
         "a handwritten {digit} on {group} paper")  # fmt: skip
#: the caption column `dtk data colored-digits --captions` adds (diffusers' and datasets'
#: name for an image's text)
COLUMN = "text"


def caption(digit: int, group: str, rng: np.random.Generator) -> str:
    """One caption of a `digit` drawn in `group`, the template drawn from `rng`."""
    named = rng.random() < GROUP_NAMED
    templates = NAMED if named else NEUTRAL
    template = templates[int(rng.integers(len(templates)))]
    return template.format(digit=DIGIT_WORDS[digit], group=group)
