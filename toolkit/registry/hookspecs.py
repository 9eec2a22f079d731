"""The hooks a dtk plugin can implement.

A plugin is a module (or object) named by an entry point in the ``dtk`` group. It implements
one or more of the hooks below, each decorated with `toolkit.hookimpl`::

    import toolkit

    class MySampler:
        name = "my_sampler"

        def __init__(self, eta: float = 1.0) -> None:  # keyword arguments are its options
            self.eta = eta

        def __call__(self, denoise, x, sigmas, *, noise, callback=None):
            ...

    @toolkit.hookimpl
    def register_samplers(register):
        register(MySampler)

Every hook receives a single ``register`` callable and returns nothing. ``register(cls)``
takes a class with a string class attribute ``name``; the keyword arguments of its
``__init__`` are the options users can set (``--sampler-option eta=0.5`` on the command
line, ``toolkit.sampler("my_sampler", eta=0.5)`` in Python). Annotate them: the annotation
is how a command-line string is converted and how a wrong value is reported.

Each hook is called once per plugin when the registry is first used. A hook that raises is
reported against the plugin's distribution and its registrations are dropped; the rest of
the toolkit keeps working (set ``DTK_STRICT_PLUGINS=1`` to see the exception instead).
Keep heavy imports (torch, transformers, ...) out of module level: ``dtk plugins`` imports
every plugin module to list it, and must stay fast.
"""

from __future__ import annotations

import pluggy

from toolkit.registry.protocols import Register

PROJECT_NAME = "dtk"

hookspec = pluggy.HookspecMarker(PROJECT_NAME)
hookimpl = pluggy.HookimplMarker(PROJECT_NAME)


@hookspec
def register_schedules(register: Register) -> None:
    """Register noise-schedule classes.

    :param register: call it with each schedule class.

    A schedule instance is called as ``schedule(steps, noise)`` where ``steps`` is the
    number of sampling steps and ``noise`` the model's `toolkit.NoiseLevels`. It returns a
    1-D float tensor of ``steps + 1`` strictly decreasing sigmas whose last element is 0.
    """


@hookspec
def register_samplers(register: Register) -> None:
    """Register sampler classes.

    :param register: call it with each sampler class.

    A sampler instance is called as ``sampler(denoise, x, sigmas, *, noise, callback=None)``
    and returns the final sample (at sigma 0). ``denoise(x, sigma)`` returns the model's
    estimate of the clean image (guidance already applied; ``sigma`` a float, a 0-d or a
    ``[B]`` tensor); ``x`` is already at ``sigmas[0]``; ``noise(sigma, sigma_next)`` returns
    fresh standard normal noise shaped like ``x`` and is the only source of randomness a
    sampler may use; ``callback``, if given, is called after every step with a dict holding
    ``i``, ``x``, ``sigma``, ``sigma_hat`` and ``denoised``. A sampler that needs the
    unconditional estimate too (CFG++) calls ``toolkit.with_unconditional(denoise, x, sigma)``.
    """


@hookspec
def register_guidance(register: Register) -> None:
    """Register guidance classes.

    :param register: call it with each guidance class.

    A guidance method combines the model's predictions for several conditionings of the same
    batch. It declares which conditionings it needs so that the toolkit evaluates all of them
    in one batched forward pass, then combines the resulting clean-image estimates.

    Optional members (docs/plugins.md): ``active(sigma)`` (fewer branches at some noise
    levels), ``text_branches`` (prompts of its own, as further branches, on text-to-image
    models), ``assign(condition, seed, attributes)`` (complete each sample's condition),
    ``start_batch(conditions)`` (called before each batch with its samples' conditions),
    ``space`` (combine the network's raw outputs instead of clean-image estimates),
    ``perturbations`` (branches through a perturbed network, in the same pass),
    ``guide_models`` (branches through another model's network, in a pass of their own) and
    ``base`` (a guidance whose combination this one edits).
    """


@hookspec
def register_safety_filters(register: Register) -> None:
    """Register safety-filter classes.

    :param register: call it with each safety-filter class.

    A filter instance is called as ``flt(images, requests)`` with ``images`` a float
    ``[B, C, H, W]`` tensor in ``[0, 1]`` and returns one ``Verdict(flagged, reason, score)``
    per image. A filter whose class attribute ``stage`` is ``"request"`` is called with the
    requests only, before any computation. Filters fail closed: a requested filter that is
    missing or raises aborts the run.
    """


@hookspec
def register_attribute_classifiers(register: Register) -> None:
    """Register attribute-classifier classes.

    :param register: call it with each attribute-classifier class.

    An instance has ``attribute`` (the attribute it predicts, e.g. ``"group"``), ``labels``
    (the list of values) and ``predict_proba(images)`` returning a ``[B, len(labels)]``
    tensor of probabilities for float images ``[B, C, H, W]`` in ``[0, 1]``.
    """


@hookspec
def register_step_caches(register: Register) -> None:
    """Register step-cache classes.

    :param register: call it with each step-cache class.

    A step cache skips part of the denoising network on calls where its features barely
    change. ``cache.attach(network)`` returns a context manager: inside it, the network's
    forward passes share the cache's state. The toolkit enters it for the calls of one
    batch with one layout of rows and leaves it when the batch ends or the layout changes;
    on exit the network must be as it was. Decide per batch row from that row's own
    history, so that a sample does not depend on its batch. Optional: ``check(network)``
    refuses a network the cache cannot serve, at plan time.
    """


@hookspec
def register_commands(register: Register) -> None:
    """Register ``dtk`` subcommands.

    :param register: call it with each command: a ``click.Command`` (or ``click.Group``)
        instance, whose ``name`` is the subcommand's name (``dtk NAME``).

    Unlike the other kinds, a command is registered as an instance, not a class. A command
    can add a name to ``dtk``, never replace one: a name the built-in distribution already
    uses stays the built-in's, and the other registration is listed with status ``clash``
    by ``dtk plugins``; two third-party commands of one name are both left out. Keep the
    command's module light (no torch at import): ``dtk --help`` loads it. A
    `toolkit.DtkError` raised by the command is shown as one line with exit status 2.
    """
