"""The plugin registry's contract (docs/contracts.md "Plugins", docs/plugins.md).

Built-ins, option validation and conversion, broken plugins, clashes and allow-lists. The
third-party plugins here are written straight into a folder on ``sys.path`` as a module plus
a ``.dist-info`` (what pip would leave there), which keeps these tests fast; the same contract
with distributions really built and installed by pip is in test_plugin_distributions.py.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import json
import sys
from typing import TYPE_CHECKING, Literal

import pluggy
import pytest
from click.testing import CliRunner

import toolkit
import toolkit.registry.manager
from toolkit import (
    OptionError,
    PluginClashError,
    PluginError,
    PluginLoadWarning,
    UnknownPluginError,
)
from toolkit.cli import cli
from toolkit.registry.manager import Registry, get_registry, reset_registry
from toolkit.registry.options import option_specs, parse_key_values, validate_options

if TYPE_CHECKING:
    from torch import device as Device  # only for type checkers, as in a lazy plugin

BUILTIN = "diffusion-toolkit"
COLUMNS = ["name", "kind", "distribution", "version", "status", "error"]
SCHEDULES = ["leading", "trailing", "linspace", "karras", "exponential", "polyexponential"]
SCHEDULES += ["beta", "vp"]
SAMPLERS = ["ddim", "ddpm", "euler", "euler_ancestral", "heun", "dpm_2", "dpm_2_ancestral", "lms"]
SAMPLERS += ["dpmpp_2s_ancestral", "dpmpp_sde", "dpmpp_2m", "dpmpp_2m_sde", "dpmpp_3m_sde"]
SAMPLERS += ["unipc"]

# -- third-party plugin modules ------------------------------------------------------------


def sampler_module(name: str) -> str:
    """Source of a plugin module registering one trivial sampler called `name`."""
    return f"""
        import toolkit

        class Sampler:
            name = {name!r}

            def __init__(self, scale: float = 1.0) -> None:
                self.scale = scale

            def __call__(self, denoise, x, sigmas, *, noise, callback=None):
                return denoise(x, sigmas[-2]) * self.scale

        @toolkit.hookimpl
        def register_samplers(register):
            register(Sampler)
    """


BROKEN_IMPORT = """
    raise ImportError("fake-broken needs the 'unobtainium' package")
"""

WRONG_SIGNATURE = """
    import toolkit

    class Sampler:
        name = "never_registered"

        def __call__(self, denoise, x, sigmas, *, noise, callback=None):
            return x

    # A good hook that pluggy accepts before it reaches the bad one below: the plugin must
    # still be skipped as a whole.
    @toolkit.hookimpl
    def register_samplers(register):
        register(Sampler)

    @toolkit.hookimpl
    def register_schedules(register, steps):
        pass
"""

UNKNOWN_HOOK = """
    import toolkit

    @toolkit.hookimpl
    def register_sampler(register):  # the hook is register_samplers
        pass
"""

HOOK_RAISES = """
    import toolkit

    class Sampler:
        name = "half_registered"

        def __call__(self, denoise, x, sigmas, *, noise, callback=None):
            return x

    @toolkit.hookimpl
    def register_samplers(register):
        register(Sampler)
        raise RuntimeError("boom in register_samplers")
"""


def misuse_module(body: str) -> str:
    return f"""
        import toolkit

        class Nameless:
            def __call__(self, *args, **kwargs):
                pass

        class NotCallable:
            name = "not_callable"

        class Twice:
            name = "twice"

            def __call__(self, *args, **kwargs):
                pass

        @toolkit.hookimpl
        def register_samplers(register):
            {body}
    """


# -- fixtures ----------------------------------------------------------------------------


@pytest.fixture(autouse=True)
def fresh_registry(monkeypatch):
    """Each test sees a process-wide registry loaded afresh, under a clean environment."""
    monkeypatch.delenv("DTK_LOAD_PLUGINS", raising=False)
    monkeypatch.delenv("DTK_STRICT_PLUGINS", raising=False)
    monkeypatch.setattr(toolkit.registry.manager, "_default", None)


def by_distribution(rows: list[dict], distribution: str) -> list[dict]:
    return [row for row in rows if row["distribution"] == distribution]


def problems_of(registry: Registry) -> list[dict]:
    return [row for row in registry.rows() if row["status"] != "ok"]


# -- built-ins ---------------------------------------------------------------------------


def test_plugins_lists_every_builtin_ok():
    frame = toolkit.plugins()
    assert list(frame.columns) == COLUMNS
    builtin = frame[frame["distribution"] == BUILTIN]
    assert set(builtin["version"]) == {importlib.metadata.version(BUILTIN)}
    assert set(builtin["status"]) == {"ok"}
    assert builtin["error"].isna().all()
    listed = set(zip(builtin["kind"], builtin["name"]))
    expected = {("schedule", n) for n in SCHEDULES} | {("sampler", n) for n in SAMPLERS}
    assert expected <= listed
    assert (frame["status"] == "ok").all(), frame[frame["status"] != "ok"]


def test_plugins_kind_keeps_one_kind():
    samplers = toolkit.plugins("sampler")
    assert set(samplers["kind"]) == {"sampler"}
    assert set(SAMPLERS) <= set(samplers["name"])
    with pytest.raises(ValueError, match="unknown plugin kind 'samplers'"):
        toolkit.plugins("samplers")


@pytest.mark.parametrize("name", SAMPLERS)
def test_builtin_sampler_instantiates(name):
    assert isinstance(toolkit.sampler(name), toolkit.Sampler)
    assert isinstance(toolkit.sampler(f"{BUILTIN}:{name}"), toolkit.Sampler)


@pytest.mark.parametrize("name", SCHEDULES)
def test_builtin_schedule_instantiates(name):
    assert isinstance(toolkit.schedule(name), toolkit.Schedule)


def test_builtins_are_registered_through_entry_points():
    entry_points = importlib.metadata.distribution(BUILTIN).entry_points.select(group="dtk")
    only = Registry(entry_points=[ep for ep in entry_points if ep.name == "samplers"], environ={})
    assert {row["kind"] for row in only.rows()} == {"sampler"}
    assert Registry(entry_points=[], environ={}).rows() == []


def test_get_registry_is_a_loaded_singleton():
    registry = get_registry()
    assert registry is get_registry()
    assert registry.registrations
    reset_registry()
    assert get_registry() is not registry


# -- names -------------------------------------------------------------------------------


def test_unknown_sampler_lists_the_choices():
    with pytest.raises(UnknownPluginError, match="unknown sampler 'eulr'") as info:
        toolkit.sampler("eulr")
    message = str(info.value)
    assert "Choose one of:" in message
    for name in SAMPLERS:
        assert name in message


def test_unknown_schedule_and_distribution():
    with pytest.raises(UnknownPluginError, match=r"unknown schedule 'karas'.*karras"):
        toolkit.schedule("karas")
    with pytest.raises(UnknownPluginError, match="unknown sampler 'nobody:euler'"):
        toolkit.sampler("nobody:euler")


def test_unknown_plugin_errors_are_lookup_and_dtk_errors():
    with pytest.raises(LookupError):
        toolkit.guidance("surely_not_a_guidance")
    with pytest.raises(toolkit.DtkError):
        toolkit.attribute_classifier("surely_not_a_classifier")


# -- options -----------------------------------------------------------------------------


def test_unknown_option_lists_the_accepted_ones():
    with pytest.raises(OptionError, match="unknown option 'etta' for sampler 'dpmpp_2m_sde'") as e:
        toolkit.sampler("dpmpp_2m_sde", etta=0.5)
    message = str(e.value)
    assert "accepted: eta: float = 1.0, s_noise: float = 1.0" in message
    assert "solver_type: midpoint|heun = 'midpoint'" in message


def test_option_of_a_plugin_without_options():
    with pytest.raises(OptionError, match=r"unknown option 'eta'.*it takes no options"):
        toolkit.sampler("dpmpp_2m", eta=1.0)


@pytest.mark.parametrize(
    ("name", "options", "expected"),
    [
        ("lms", {"order": "4"}, "bad value '4' for option 'order' of sampler 'lms': expected an"),
        ("lms", {"order": 2.0}, "expected an integer"),
        ("lms", {"order": True}, "expected an integer"),
        ("unipc", {"variant": "bh3"}, "expected one of 'bh1', 'bh2'"),
        ("unipc", {"corrector": 1}, "expected true or false"),
        ("euler", {"s_churn": "0.5"}, "expected a number"),
        ("dpmpp_2m_sde", {"solver_type": None}, "expected one of 'midpoint', 'heun'"),
    ],
)
def test_ill_typed_option_lists_the_accepted_ones(name, options, expected):
    with pytest.raises(OptionError, match="accepted: ") as info:
        toolkit.sampler(name, **options)
    assert expected in str(info.value)


def test_ill_typed_schedule_option():
    with pytest.raises(OptionError, match=r"option 'sigma_min' of schedule 'karras'.*float"):
        toolkit.schedule("karras", sigma_min="low")


def test_options_are_converted_to_their_annotation():
    karras = toolkit.schedule("karras", rho=5, sigma_min=None, sigma_max=80)
    assert (karras.rho, karras.sigma_min, karras.sigma_max) == (5.0, None, 80.0)
    assert type(karras.rho) is float


@pytest.mark.parametrize(
    ("kind", "name", "strings", "expected"),
    [
        ("sampler", "lms", {"order": "3"}, {"order": 3}),
        ("sampler", "unipc", {"order": "1", "variant": "bh1"}, {"order": 1, "variant": "bh1"}),
        (
            "sampler",
            "unipc",
            {"lower_order_final": "false", "corrector": "yes"},
            {"lower_order_final": False, "corrector": True},
        ),
        ("sampler", "unipc", {"corrector": "ON"}, {"corrector": True}),
        ("sampler", "dpmpp_2m_sde", {"solver_type": "heun"}, {"solver_type": "heun"}),
        ("sampler", "euler", {"s_churn": "0.5", "s_tmax": "inf"}, {"s_churn": 0.5}),
        ("schedule", "karras", {"rho": "5", "sigma_min": "none"}, {"rho": 5.0, "sigma_min": None}),
        ("schedule", "karras", {"sigma_max": "80"}, {"sigma_max": 80.0}),
        ("schedule", "leading", {"offset": "1"}, {"offset": 1}),
    ],
)
def test_command_line_strings_are_converted(kind, name, strings, expected):
    instance = get_registry().create(kind, name, strings, from_strings=True)
    for key, value in expected.items():
        assert getattr(instance, key) == value
        assert type(getattr(instance, key)) is type(value)


@pytest.mark.parametrize(
    ("kind", "name", "strings", "expected"),
    [
        ("sampler", "lms", {"order": "2.5"}, "option 'order'"),
        ("sampler", "lms", {"order": ""}, "option 'order'"),
        ("sampler", "unipc", {"corrector": "maybe"}, "expected true or false"),
        ("sampler", "unipc", {"variant": "BH1"}, "expected one of 'bh1', 'bh2'"),
        ("sampler", "euler", {"s_noise": "nan"}, "not nan"),
        ("schedule", "karras", {"rho": "seven"}, "option 'rho'"),
        ("schedule", "karras", {"sigma_min": "small"}, "expected float | None"),
        ("schedule", "karras", {"sigmamin": "1"}, "unknown option 'sigmamin'"),
    ],
)
def test_bad_command_line_strings(kind, name, strings, expected):
    with pytest.raises(OptionError, match="accepted: ") as info:
        get_registry().create(kind, name, strings, from_strings=True)
    assert expected in str(info.value)


def test_strings_are_not_converted_from_python():
    with pytest.raises(OptionError, match="expected an integer"):
        get_registry().create("sampler", "lms", {"order": "3"})


def test_a_plugin_may_refuse_an_option_value_itself():
    with pytest.raises(OptionError, match="order must be 1, 2 or 3"):
        toolkit.sampler("unipc", order=7)


def test_parse_key_values():
    assert parse_key_values(["order=3", " variant = bh1 ", "words=a,b=c"]) == {
        "order": "3",
        "variant": "bh1",
        "words": "a,b=c",
    }
    with pytest.raises(OptionError, match="'order' is not of the form KEY=VALUE"):
        parse_key_values(["order"])
    with pytest.raises(OptionError, match="'=3' is not of the form"):
        parse_key_values(["=3"])
    with pytest.raises(OptionError, match="sampler option 'order' is given twice"):
        parse_key_values(["order=3", "order=2"], what="sampler option")


class _Everything:
    name = "everything"

    def __init__(
        self,
        words: list[str] | None = None,
        sizes: tuple[int, ...] = (),
        mode: Literal["a", "b"] = "a",
        anything=None,
        device: Device | None = None,
        *,
        required: float,
    ) -> None:
        pass


def test_option_annotations_from_strings():
    kwargs = validate_options(
        _Everything,
        {"words": "cat, dog", "sizes": "1,2", "anything": "x", "device": "cuda", "required": "2"},
        kind="sampler",
        name="everything",
        from_strings=True,
    )
    assert kwargs == {
        "words": ["cat", "dog"],
        "sizes": (1, 2),
        "anything": "x",
        "device": "cuda",
        "required": 2.0,
    }


def test_missing_required_option():
    with pytest.raises(OptionError, match="sampler 'everything' needs option 'required'"):
        validate_options(_Everything, {}, kind="sampler", name="everything")


def test_unresolvable_annotation_does_not_spoil_the_others():
    # `Device` exists only for type checkers, as torch does in a plugin keeping imports lazy.
    specs = option_specs(_Everything)
    assert specs["required"].annotation is float
    assert specs["mode"].annotation == Literal["a", "b"]
    assert specs["device"].annotation == "Device | None"
    with pytest.raises(OptionError, match=r"option 'required'.*expected a number"):
        validate_options(_Everything, {"required": "x"}, kind="sampler", name="everything")
    kwargs = validate_options(_Everything, {"required": 1}, kind="sampler", name="everything")
    assert kwargs == {"required": 1.0}


# -- broken plugins ----------------------------------------------------------------------


def test_plugin_that_fails_to_import_is_reported_and_skipped(make_dist):
    make_dist("fake-broken", "0.3", fake_broken=BROKEN_IMPORT)
    registry = Registry()
    with pytest.warns(PluginLoadWarning, match="fake-broken 0.3 .* failed to load") as record:
        registry.load()
    assert len(record) == 1
    assert "unobtainium" in str(record[0].message)
    assert "DTK_STRICT_PLUGINS=1" in str(record[0].message)
    assert by_distribution(registry.rows(), "fake-broken") == [
        {
            "name": "fake_broken",
            "kind": None,
            "distribution": "fake-broken",
            "version": "0.3",
            "status": "error",
            "error": "ImportError: fake-broken needs the 'unobtainium' package",
        }
    ]
    assert set(SAMPLERS) <= set(registry.names("sampler"))
    assert isinstance(registry.create("sampler", "euler"), toolkit.Sampler)
    with pytest.raises(UnknownPluginError, match=r"\(not loaded: fake-broken\)"):
        registry.get("sampler", "from_the_broken_plugin")


def test_public_api_keeps_working_with_a_broken_plugin(make_dist):
    make_dist("fake-broken", fake_broken=BROKEN_IMPORT)
    with pytest.warns(PluginLoadWarning, match="fake-broken"):
        frame = toolkit.plugins()
    assert frame[frame["distribution"] == "fake-broken"]["status"].tolist() == ["error"]
    assert isinstance(toolkit.sampler("dpmpp_2m"), toolkit.Sampler)


@pytest.mark.parametrize(
    ("source", "error"),
    [
        (WRONG_SIGNATURE, "PluginValidationError: Plugin 'fake-bad:fake_bad' for hook"),
        (UNKNOWN_HOOK, "PluginValidationError: unknown hook 'register_sampler'"),
        (HOOK_RAISES, "RuntimeError: boom in register_samplers"),
    ],
    ids=["wrong-signature", "unknown-hook", "hook-raises"],
)
def test_bad_hooks_are_reported_like_import_errors(make_dist, source, error):
    make_dist("fake-bad", "2.0", fake_bad=source)
    registry = Registry()
    with pytest.warns(PluginLoadWarning, match="dtk plugin fake-bad 2.0 .*'fake_bad'") as record:
        registry.load()
    assert len(record) == 1
    [row] = problems_of(registry)
    assert row["status"] == "error"
    assert (row["name"], row["distribution"], row["version"]) == ("fake_bad", "fake-bad", "2.0")
    assert row["error"].startswith(error)
    assert by_distribution(registry.rows(), "fake-bad") == [row]  # nothing half-registered
    assert set(SAMPLERS) <= set(registry.names("sampler"))
    assert set(SCHEDULES) <= set(registry.names("schedule"))


def test_one_broken_plugin_does_not_hide_the_others(make_dist):
    make_dist("fake-bad", fake_signature=WRONG_SIGNATURE, fake_raises=HOOK_RAISES)
    make_dist("fake-broken", fake_broken=BROKEN_IMPORT)
    make_dist("fake-good", fake_good=sampler_module("good"))
    registry = Registry()
    with pytest.warns(PluginLoadWarning) as record:
        registry.load()
    assert len(record) == 3
    errors = {(r["distribution"], r["name"]) for r in problems_of(registry)}
    assert errors == {
        ("fake-bad", "fake_signature"),
        ("fake-bad", "fake_raises"),
        ("fake-broken", "fake_broken"),
    }
    assert registry.get("sampler", "good").distribution == "fake-good"


@pytest.mark.parametrize(
    ("body", "error"),
    [
        ("register(Nameless)", "Nameless needs a class attribute 'name'"),
        ("register(Twice())", "register() takes a class, got <"),
        ("register(NotCallable)", "sampler class NotCallable must be callable"),
        ("register(Twice); register(Twice)", "sampler 'twice' is registered twice"),
    ],
)
def test_register_misuse_is_reported(make_dist, body, error):
    make_dist("fake-misuse", fake_misuse=misuse_module(body))
    registry = Registry()
    with pytest.warns(PluginLoadWarning, match="register_samplers\\(\\) failed"):
        registry.load()
    [row] = problems_of(registry)
    assert row["error"].startswith(f"PluginError: {error}")
    assert "twice" not in registry.names("sampler")


@pytest.mark.parametrize(
    ("source", "exception", "match"),
    [
        (BROKEN_IMPORT, ImportError, "unobtainium"),
        (WRONG_SIGNATURE, pluggy.PluginValidationError, "register_schedules"),
        (UNKNOWN_HOOK, pluggy.PluginValidationError, "unknown hook 'register_sampler'"),
        (HOOK_RAISES, RuntimeError, "boom"),
    ],
    ids=["import", "wrong-signature", "unknown-hook", "hook-raises"],
)
@pytest.mark.parametrize("strict", ["1", "true", "YES"])
def test_strict_mode_reraises(make_dist, source, exception, match, strict):
    make_dist("fake-bad", fake_bad=source)
    with pytest.raises(exception, match=match):
        Registry(environ={"DTK_STRICT_PLUGINS": strict}).load()


def test_strict_mode_off(make_dist):
    make_dist("fake-broken", fake_broken=BROKEN_IMPORT)
    with pytest.warns(PluginLoadWarning):
        Registry(environ={"DTK_STRICT_PLUGINS": "0"}).load()


def test_a_plugin_failing_to_start_names_its_distribution(make_dist):
    make_dist(
        "fake-fragile",
        "0.9",
        fake_fragile="""
            import toolkit

            class Fragile:
                name = "fragile"

                def __init__(self):
                    raise OSError("no GPU")

                def __call__(self, denoise, x, sigmas, *, noise, callback=None):
                    return x

            @toolkit.hookimpl
            def register_samplers(register):
                register(Fragile)
        """,
    )
    with pytest.raises(
        PluginError, match=r"'fragile' from fake-fragile 0\.9 failed to start: OSError"
    ):
        toolkit.sampler("fragile")


# -- clashes -----------------------------------------------------------------------------


def test_clash_names_both_distributions(make_dist):
    make_dist("fake-clash", "2.0", fake_clash=sampler_module("euler"))
    with pytest.raises(PluginClashError) as info:
        toolkit.sampler("euler")
    message = str(info.value)
    assert "sampler 'euler' is registered by both" in message
    assert "'diffusion-toolkit'" in message
    assert "'fake-clash'" in message
    assert "'diffusion-toolkit:euler'" in message
    assert "'fake-clash:euler'" in message


def test_clash_is_resolved_by_dist_name(make_dist):
    make_dist("fake-clash", "2.0", fake_clash=sampler_module("euler"))
    theirs = toolkit.sampler("fake-clash:euler", scale=2.0)
    assert type(theirs).__module__ == "fake_clash"
    assert theirs.scale == 2.0
    ours = toolkit.sampler("diffusion-toolkit:euler", s_churn=0.5)
    assert type(ours).__module__.startswith("plugins.")
    # distribution names are compared after PEP 503 normalisation
    assert type(toolkit.sampler("Diffusion_Toolkit:euler")) is type(ours)
    assert type(toolkit.sampler("fake_clash:euler")) is type(theirs)
    # other names are unaffected
    assert isinstance(toolkit.sampler("heun"), toolkit.Sampler)


def test_clash_rows(make_dist):
    make_dist("fake-clash", "2.0", fake_clash=sampler_module("euler"))
    rows = [r for r in get_registry().rows("sampler") if r["name"] == "euler"]
    assert [(r["distribution"], r["status"]) for r in rows] == [
        ("diffusion-toolkit", "clash"),
        ("fake-clash", "clash"),
    ]
    assert "also registered by fake-clash; use 'diffusion-toolkit:euler'" in rows[0]["error"]
    assert "also registered by diffusion-toolkit; use 'fake-clash:euler'" in rows[1]["error"]


def test_same_name_for_another_kind_is_no_clash(make_dist):
    make_dist(
        "fake-schedule",
        fake_schedule="""
            import toolkit

            class EulerSchedule:
                name = "euler"

                def __call__(self, steps, noise):
                    raise NotImplementedError

            @toolkit.hookimpl
            def register_schedules(register):
                register(EulerSchedule)
        """,
    )
    assert isinstance(toolkit.sampler("euler"), toolkit.Sampler)
    assert toolkit.schedule("euler").__module__ == "fake_schedule"


def test_two_third_party_plugins_clash(make_dist):
    make_dist("fake-a", fake_a=sampler_module("shared"))
    make_dist("fake-b", fake_b=sampler_module("shared"))
    with pytest.raises(PluginClashError, match=r"'fake-a' and 'fake-b'|'fake-b' and 'fake-a'"):
        toolkit.sampler("shared")
    assert type(toolkit.sampler("fake-b:shared")).__module__ == "fake_b"


# -- DTK_LOAD_PLUGINS --------------------------------------------------------------------


def test_empty_allow_list_loads_only_builtins(make_dist):
    make_dist("fake-a", fake_a=sampler_module("a_sampler"))
    make_dist("fake-broken", fake_broken=BROKEN_IMPORT)
    registry = Registry(environ={"DTK_LOAD_PLUGINS": ""})
    rows = registry.rows()  # no warning: nothing third-party is even imported
    assert "fake_broken" not in sys.modules
    disabled = [r for r in rows if r["status"] == "disabled"]
    assert {(r["distribution"], r["name"]) for r in disabled} == {
        ("fake-a", "fake_a"),
        ("fake-broken", "fake_broken"),
    }
    assert {r["error"] for r in disabled} == {"not in DTK_LOAD_PLUGINS"}
    assert set(SAMPLERS) <= set(registry.names("sampler"))
    assert "a_sampler" not in registry.names("sampler")
    assert {r["status"] for r in rows if r["distribution"] == BUILTIN} == {"ok"}


def test_allow_list_names_distributions(make_dist, monkeypatch):
    make_dist("fake-a", fake_a=sampler_module("a_sampler"))
    make_dist("fake-b", fake_b=sampler_module("b_sampler"))
    make_dist("fake-c", fake_c=sampler_module("c_sampler"))
    monkeypatch.setenv("DTK_LOAD_PLUGINS", "fake-c, FAKE_A ")  # spaces; normalised like pip
    assert "a_sampler" in get_registry().names("sampler")
    assert "c_sampler" in get_registry().names("sampler")
    assert "b_sampler" not in get_registry().names("sampler")
    assert toolkit.sampler("a_sampler").scale == 1.0
    with pytest.raises(UnknownPluginError, match="unknown sampler 'b_sampler'"):
        toolkit.sampler("b_sampler")
    [row] = by_distribution(get_registry().rows(), "fake-b")
    assert row["status"] == "disabled"


def test_allow_list_reports_unknown_names(make_dist):
    make_dist("fake-a", fake_a=sampler_module("a_sampler"))
    registry = Registry(environ={"DTK_LOAD_PLUGINS": "fake-a,fake-nowhere"})
    with pytest.warns(PluginLoadWarning, match="DTK_LOAD_PLUGINS names 'fake-nowhere'"):
        registry.load()
    assert by_distribution(registry.rows(), "fake-nowhere") == [
        {
            "name": "",
            "kind": None,
            "distribution": "fake-nowhere",
            "version": "",
            "status": "not installed",
            "error": "named in DTK_LOAD_PLUGINS",
        }
    ]
    assert "a_sampler" in registry.names("sampler")


def test_builtins_always_load(make_dist):
    make_dist("fake-a", fake_a=sampler_module("a_sampler"))
    for value in ["", "fake-a", "diffusion-toolkit", ","]:
        registry = Registry(environ={"DTK_LOAD_PLUGINS": value})
        assert set(SAMPLERS) <= set(registry.names("sampler")), value
        assert set(SCHEDULES) <= set(registry.names("schedule")), value


# -- the command line --------------------------------------------------------------------


def invoke(*args: str, **env: str):
    return CliRunner().invoke(cli, list(args), env=env)


def test_cli_plugins_table():
    result = invoke("plugins")
    assert result.exit_code == 0, result.output
    assert result.stderr == ""
    header, *lines = result.stdout.splitlines()
    assert header.split() == [c.upper() for c in COLUMNS]
    table = {tuple(line.split()[:5]) for line in lines}
    version = importlib.metadata.version(BUILTIN)
    for name in SAMPLERS:
        assert (name, "sampler", BUILTIN, version, "ok") in table
    for name in SCHEDULES:
        assert (name, "schedule", BUILTIN, version, "ok") in table


def test_cli_plugins_kind_json():
    result = invoke("plugins", "--kind", "schedule", "--json")
    assert result.exit_code == 0, result.output
    rows = json.loads(result.stdout)
    assert {row["kind"] for row in rows} == {"schedule"}
    assert all(list(row) == COLUMNS for row in rows)
    assert set(SCHEDULES) <= {row["name"] for row in rows}


def test_cli_plugins_bad_kind():
    result = invoke("plugins", "--kind", "samplers")
    assert result.exit_code == 2
    assert result.stdout == ""
    assert "'samplers' is not one of" in result.stderr
    assert "'sampler'" in result.stderr


def test_cli_help_documents_the_environment():
    result = invoke("--help")
    assert result.exit_code == 0
    assert "DTK_LOAD_PLUGINS" in result.stdout
    assert "DTK_STRICT_PLUGINS" in result.stdout


@pytest.mark.filterwarnings("always::toolkit.errors.PluginLoadWarning")
@pytest.mark.parametrize("as_json", [False, True], ids=["table", "json"])
def test_cli_plugins_survives_a_broken_plugin(make_dist, as_json):
    make_dist("fake-broken", "0.3", fake_broken=BROKEN_IMPORT)
    make_dist("fake-bad", fake_bad=WRONG_SIGNATURE)
    result = invoke("plugins", *(["--json"] if as_json else []))
    assert result.exit_code == 0, result.output
    assert "warning" not in result.stdout
    assert "dtk: warning: dtk plugin fake-broken 0.3 (entry point 'fake_broken')" in result.stderr
    assert "unobtainium" in result.stderr
    assert "dtk: warning: dtk plugin fake-bad 1.0" in result.stderr
    if as_json:
        rows = json.loads(result.stdout)
        errors = {r["distribution"]: r["error"] for r in rows if r["status"] == "error"}
        assert errors["fake-broken"] == "ImportError: fake-broken needs the 'unobtainium' package"
        assert errors["fake-bad"].startswith("PluginValidationError")
        assert {r["status"] for r in rows if r["distribution"] == BUILTIN} == {"ok"}
    else:
        [line] = [line for line in result.stdout.splitlines() if "fake-broken" in line]
        assert line.split()[:4] == ["fake_broken", "fake-broken", "0.3", "error"]
        assert "ImportError: fake-broken needs the 'unobtainium' package" in line


def test_cli_strict_plugins_reraises(make_dist):
    make_dist("fake-broken", fake_broken=BROKEN_IMPORT)
    result = invoke("plugins", DTK_STRICT_PLUGINS="1")
    assert result.exit_code == 1
    assert isinstance(result.exception, ImportError)


def test_cli_shows_clashes(make_dist):
    make_dist("fake-clash", "2.0", fake_clash=sampler_module("euler"))
    result = invoke("plugins", "--kind", "sampler")
    assert result.exit_code == 0, result.output
    euler = [line.split()[:5] for line in result.stdout.splitlines() if line.startswith("euler ")]
    assert euler == [
        ["euler", "sampler", "diffusion-toolkit", importlib.metadata.version(BUILTIN), "clash"],
        ["euler", "sampler", "fake-clash", "2.0", "clash"],
    ]
    assert "use 'fake-clash:euler'" in result.stdout


@pytest.mark.filterwarnings("always::toolkit.errors.PluginLoadWarning")
def test_cli_allow_list(make_dist):
    make_dist("fake-a", fake_a=sampler_module("a_sampler"))
    make_dist("fake-b", fake_b=sampler_module("b_sampler"))
    result = invoke("plugins", "--json", DTK_LOAD_PLUGINS="fake-b,fake-typo")
    assert result.exit_code == 0, result.output
    status = {(r["distribution"], r["name"]): r["status"] for r in json.loads(result.stdout)}
    assert status[("fake-a", "fake_a")] == "disabled"
    assert status[("fake-b", "b_sampler")] == "ok"
    assert status[("fake-typo", "")] == "not installed"
    assert "DTK_LOAD_PLUGINS names 'fake-typo'" in result.stderr


# -- a plugin cannot end or silence dtk ----------------------------------------------------

EXITS_AT_IMPORT = """
    import sys

    sys.exit(0)
"""

EXITS_IN_HOOK = """
    import sys

    import toolkit

    @toolkit.hookimpl
    def register_samplers(register):
        sys.exit(3)
"""

SILENCES_AT_IMPORT = """
    import io
    import sys

    sys.stdout = io.StringIO()
    sys.stderr = io.StringIO()
"""

EXITS_WHEN_STARTED = """
    import sys

    import toolkit

    class Quitter:
        name = "quitter"

        def __init__(self) -> None:
            sys.exit(0)

        def __call__(self, denoise, x, sigmas, *, noise, callback=None):
            return x

    @toolkit.hookimpl
    def register_samplers(register):
        register(Quitter)
"""


@pytest.mark.filterwarnings("always::toolkit.errors.PluginLoadWarning")
@pytest.mark.parametrize(
    ("source", "error"),
    [
        (EXITS_AT_IMPORT, "RuntimeError: sys.exit(0) was called"),
        (EXITS_IN_HOOK, "RuntimeError: sys.exit(3) was called"),
    ],
    ids=["import", "hook"],
)
def test_a_plugin_calling_sys_exit_is_a_load_error(make_dist, source, error):
    make_dist("fake-exit", fake_exit=source)
    result = invoke("plugins", "--json")
    assert result.exit_code == 0, result.output
    rows = json.loads(result.stdout)  # the listing is printed: dtk did not end early
    [row] = [r for r in rows if r["distribution"] == "fake-exit"]
    assert (row["status"], row["error"]) == ("error", error)
    assert "dtk: warning: dtk plugin fake-exit 1.0" in result.stderr
    assert {r["status"] for r in rows if r["distribution"] == BUILTIN} == {"ok"}


@pytest.mark.filterwarnings("always::toolkit.errors.PluginLoadWarning")
def test_a_plugin_cannot_silence_dtk(make_dist):
    make_dist("fake-silence", fake_silence=SILENCES_AT_IMPORT)
    before = sys.stdout, sys.stderr
    registry = Registry().load()
    assert (sys.stdout, sys.stderr) == before
    assert [r["distribution"] for r in problems_of(registry)] == []


def test_a_plugin_calling_sys_exit_when_started_names_its_distribution(make_dist):
    make_dist("fake-quitter", "0.2", fake_quitter=EXITS_WHEN_STARTED)
    with pytest.raises(PluginError, match=r"'quitter' from fake-quitter 0\.2 failed to start.*"
                                          r"sys\.exit\(0\) was called"):  # fmt: skip
        toolkit.sampler("quitter")


@pytest.mark.filterwarnings("always::toolkit.errors.PluginLoadWarning")
def test_generate_survives_a_plugin_calling_sys_exit(make_dist, tmp_path):
    make_dist("fake-exit", fake_exit=EXITS_AT_IMPORT)
    out = tmp_path / "out"
    result = invoke("generate", "-n", "1", "--steps", "1", "--out", str(out), "-q")
    assert result.exit_code == 0, result.output
    assert "sys.exit(0) was called" in result.stderr
    assert "1 images in" in result.stderr
    assert len(list(out.glob("*/*.png"))) == 1


# -- commands: one more kind of plugin ------------------------------------------------------


def command_module(name: str, says: str) -> str:
    """Source of a plugin module registering one click command called `name`."""
    return f"""
        import click
        import toolkit

        @click.command({name!r})
        def command():
            \"\"\"{says}\"\"\"
            click.echo({says!r})

        @toolkit.hookimpl
        def register_commands(register):
            register(command)
    """


def test_builtin_commands_are_registered():
    rows = get_registry().rows("command")
    assert {r["name"] for r in rows} >= {"generate", "plugins", "merge", "eval", "synthesize",
                                          "demo", "train", "train-classifier", "data"}  # fmt: skip
    assert {(r["distribution"], r["status"]) for r in rows} == {(BUILTIN, "ok")}


def test_a_third_party_command_joins_dtk(make_dist):
    make_dist("fake-hello", fake_hello=command_module("hello", "hello from a plugin"))
    result = invoke("hello")
    assert result.exit_code == 0, result.output
    assert result.stdout == "hello from a plugin\n"
    assert "hello" in invoke("--help").stdout


@pytest.mark.parametrize("name", ["eval", "generate"])
def test_a_third_party_command_never_replaces_a_builtin(make_dist, name):
    make_dist("fake-takeover", fake_takeover=command_module(name, "taken over"))
    result = invoke(name, "--help")
    assert result.exit_code == 0, result.output
    assert "taken over" not in result.stdout
    listing = invoke("plugins", "--json", "--kind", "command")
    rows = [r for r in json.loads(listing.stdout) if r["name"] == name]
    status = {r["distribution"]: (r["status"], r["error"]) for r in rows}
    assert status[BUILTIN] == ("ok", None)
    assert status["fake-takeover"] == (
        "clash",
        f"the built-in command {name!r} cannot be replaced; this one is not added",
    )


def test_two_third_party_commands_of_one_name_are_both_left_out(make_dist):
    make_dist("fake-one", fake_one=command_module("twin", "one"))
    make_dist("fake-two", fake_two=command_module("twin", "two"))
    result = invoke("twin")
    assert result.exit_code == 2
    assert "No such command 'twin'" in result.stderr
    rows = [r for r in get_registry().rows("command") if r["name"] == "twin"]
    assert sorted((r["distribution"], r["status"]) for r in rows) == [
        ("fake-one", "clash"),
        ("fake-two", "clash"),
    ]


def test_commands_follow_the_allow_list(make_dist):
    make_dist("fake-hello", fake_hello=command_module("hello", "hi"))
    result = invoke("hello", DTK_LOAD_PLUGINS="")
    assert result.exit_code == 2
    assert "No such command 'hello'" in result.stderr


def test_register_commands_takes_click_commands(make_dist):
    make_dist("fake-notcommand", fake_notcommand="""
        import toolkit

        @toolkit.hookimpl
        def register_commands(register):
            register(print)
    """)  # fmt: skip
    registry = Registry()
    with pytest.warns(PluginLoadWarning, match="register_commands\\(\\) failed"):
        registry.load()
    [row] = problems_of(registry)
    assert row["error"].startswith("PluginError: register_commands takes click commands")
