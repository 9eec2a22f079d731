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
#: label_consistency's threshold with a label-conditioned model: the filter classifier must
#: give the requested values at least this probability. At 0.5, half the accepted `dark`
#: digits scored under 0.8, where only a tenth of real held-out `dark` digits do (the
#: shipped CNNs, trained with label smoothing, rarely pass 0.92), and independent judges
#: read 4 points fewer of them as their digit than of real images; at 0.7 the gap is gone
#: for four judges of other families, and the downstream gain keeps (docs/fairness.md).
SYNTHESIS_CONSISTENCY_THRESHOLD = 0.7
#: ... and with a text-to-image model, whose classifier (e.g. clip) was not measured so
TEXT_CONSISTENCY_THRESHOLD = 0.5
#: the demo audits' sampling steps: a few minutes for the whole demo on a CPU
DEMO_STEPS = 10
