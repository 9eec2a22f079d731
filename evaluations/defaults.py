"""The defaults the evaluations set where they differ from toolkit's (`toolkit` keeps its
own in ``toolkit/defaults.py``): read by the commands' options, their ``--help`` and the
Python functions alike. Light: ``dtk --help`` imports it."""

from __future__ import annotations

#: synthesis's sampling steps
SYNTHESIS_STEPS = 20
#: Synthesis's guidance when none is named: weak. On colored digits CFG 0.75 gives more
#: varied minority samples than the sampling default (CFG 2), the filters reject the ones
#: that drift off their labels, and a downstream CNN gains far more from them
#: (docs/fairness.md has the figures).
SYNTHESIS_GUIDANCE = {"guidance": "cfg", "guidance_options": {"scale": 0.75}}
#: the demo audits' sampling steps: a few minutes for the whole demo on a CPU
DEMO_STEPS = 10
