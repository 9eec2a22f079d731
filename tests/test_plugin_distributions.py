"""Third-party plugin distributions, really built and installed by pip.

One session fixture writes a few tiny setuptools projects (a working plugin, one that fails
to import, one with bad hooks, one clashing with a built-in), installs them all with one
``pip install --target`` call, and the tests put that folder on ``sys.path`` (in-process) or
on ``PYTHONPATH`` (the real ``dtk`` executable in a subprocess). Which of them load is chosen
with ``DTK_LOAD_PLUGINS``, as a user would.
"""

from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys
import textwrap

import pytest
from click.testing import CliRunner
from invoke import dtk_executable

import toolkit
import toolkit.registry.manager
from toolkit import NoiseLevels, PluginClashError, PluginLoadWarning
from toolkit.cli import cli
from toolkit.registry.manager import get_registry

PYPROJECT = """
    [build-system]
    requires = ["setuptools"]
    build-backend = "setuptools.build_meta"

    [project]
    name = "{name}"
    version = "{version}"

    [project.entry-points.dtk]
    {entry_points}

    [tool.setuptools]
    py-modules = [{modules}]
"""

HELLO = '''
    """A third-party sampler and schedule, written as the plugin tutorial says."""

    from __future__ import annotations

    from typing import TYPE_CHECKING, Literal

    import toolkit

    if TYPE_CHECKING:
        import torch


    class HelloEuler:
        """Euler steps on the probability-flow ODE."""

        name = "hello_euler"

        def __init__(
            self,
            scale: float = 1.0,
            last: Literal["step", "denoised"] = "step",
            device: torch.device | None = None,
        ) -> None:
            self.scale, self.last = scale, last

        def __call__(self, denoise, x, sigmas, *, noise, callback=None):
            sigmas = [float(s) for s in sigmas]
            for i in range(len(sigmas) - 1):
                denoised = denoise(x, sigmas[i])
                if sigmas[i + 1] == 0 and self.last == "denoised":
                    return denoised
                x = x + (x - denoised) / sigmas[i] * (sigmas[i + 1] - sigmas[i]) * self.scale
            return x


    class HelloLinear:
        """Sigmas evenly spaced from sigma_max to sigma_min, then 0."""

        name = "hello_linear"

        def __call__(self, steps, noise):
            import torch  # only when a schedule is computed

            sigmas = torch.linspace(noise.sigma_max, noise.sigma_min, steps, dtype=torch.float64)
            return torch.cat([sigmas, sigmas.new_zeros(1)])


    @toolkit.hookimpl
    def register_samplers(register):
        register(HelloEuler)


    @toolkit.hookimpl
    def register_schedules(register):
        register(HelloLinear)
'''

BROKEN = """
    raise ImportError("dtk-test-broken needs the 'unobtainium' package")
"""

WRONG_SIGNATURE = """
    import toolkit

    @toolkit.hookimpl
    def register_samplers(register, device):
        pass
"""

UNKNOWN_HOOK = """
    import toolkit

    @toolkit.hookimpl
    def register_sampler(register):
        pass
"""

RAISES = """
    import toolkit

    @toolkit.hookimpl
    def register_schedules(register):
        raise RuntimeError("schedules are on strike")
"""

CLASH = """
    import toolkit


    class Euler:
        name = "euler"

        def __call__(self, denoise, x, sigmas, *, noise, callback=None):
            return denoise(x, float(sigmas[0]))


    @toolkit.hookimpl
    def register_samplers(register):
        register(Euler)
"""

# distribution -> (version, {entry point: (module, source)})
DISTRIBUTIONS = {
    "dtk-test-hello": ("1.2.3", {"hello": ("dtk_test_hello", HELLO)}),
    "dtk-test-broken": ("0.1", {"broken": ("dtk_test_broken", BROKEN)}),
    "dtk-test-badhooks": (
        "0.2",
        {
            "wrong_signature": ("dtk_test_wrong_signature", WRONG_SIGNATURE),
            "unknown_hook": ("dtk_test_unknown_hook", UNKNOWN_HOOK),
            "raises": ("dtk_test_raises", RAISES),
        },
    ),
    "dtk-test-clash": ("2.0", {"clash": ("dtk_test_clash", CLASH)}),
}
BUILTIN = "diffusion-toolkit"


def pip_install(projects: list[pathlib.Path], target: pathlib.Path) -> None:
    """Install local projects into `target` with pip, offline, using this environment's
    setuptools (no build isolation), as fast as pip allows."""
    command = [sys.executable, "-m", "pip", "install", "--quiet", "--no-deps"]
    command += ["--no-build-isolation", "--no-index", "--disable-pip-version-check"]
    command += ["--target", str(target), *map(str, projects)]
    env = {**os.environ, "PIP_ROOT_USER_ACTION": "ignore", "PIP_NO_INPUT": "1"}
    done = subprocess.run(command, capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr


@pytest.fixture(scope="session")
def site(tmp_path_factory) -> pathlib.Path:
    """A folder where pip installed every throwaway plugin distribution."""
    root = tmp_path_factory.mktemp("plugin-dists")
    projects = []
    for dist, (version, entry_points) in DISTRIBUTIONS.items():
        project = root / dist
        project.mkdir()
        for module, source in entry_points.values():
            (project / f"{module}.py").write_text(textwrap.dedent(source))
        pyproject = textwrap.dedent(PYPROJECT).format(
            name=dist,
            version=version,
            entry_points="\n".join(f'{ep} = "{m}"' for ep, (m, _) in entry_points.items()),
            modules=", ".join(f'"{m}"' for m, _ in entry_points.values()),
        )
        (project / "pyproject.toml").write_text(pyproject)
        projects.append(project)
    target = root / "site"
    pip_install(projects, target)
    return target


@pytest.fixture
def installed(site, monkeypatch):
    """The throwaway distributions on sys.path, and a process-wide registry to load afresh."""
    monkeypatch.syspath_prepend(str(site))
    monkeypatch.delenv("DTK_LOAD_PLUGINS", raising=False)
    monkeypatch.delenv("DTK_STRICT_PLUGINS", raising=False)
    monkeypatch.setattr(toolkit.registry.manager, "_default", None)
    yield site
    for name in [m for m in sys.modules if m.startswith("dtk_test_")]:
        del sys.modules[name]


def run_dtk(site: pathlib.Path, *args: str, **env: str) -> subprocess.CompletedProcess:
    environ = {k: v for k, v in os.environ.items() if not k.startswith("DTK_")}
    environ.update(env, PYTHONPATH=str(site))
    return subprocess.run(
        [dtk_executable(), *args], capture_output=True, text=True, env=environ, timeout=120
    )


def rows_of(distribution: str, rows: list[dict]) -> list[dict]:
    return [row for row in rows if row["distribution"] == distribution]


# -- a working plugin --------------------------------------------------------------------


def test_pip_installed_plugin_is_listed(installed, monkeypatch):
    monkeypatch.setenv("DTK_LOAD_PLUGINS", "dtk_test_hello")  # any spelling of the name
    frame = toolkit.plugins()
    hello = frame[frame["distribution"] == "dtk-test-hello"]
    assert hello[["name", "kind", "version", "status"]].values.tolist() == [
        ["hello_linear", "schedule", "1.2.3", "ok"],
        ["hello_euler", "sampler", "1.2.3", "ok"],
    ]
    assert hello["error"].isna().all()
    disabled = frame[frame["status"] == "disabled"]
    assert set(disabled["distribution"]) == {
        "dtk-test-broken",
        "dtk-test-badhooks",
        "dtk-test-clash",
    }
    assert (frame[frame["distribution"] == BUILTIN]["status"] == "ok").all()


def test_pip_installed_plugin_runs(installed, monkeypatch):
    import torch

    monkeypatch.setenv("DTK_LOAD_PLUGINS", "dtk-test-hello")
    sampler = toolkit.sampler("hello_euler", scale=1.0)
    assert isinstance(sampler, toolkit.Sampler)
    schedule = toolkit.schedule("dtk-test-hello:hello_linear")
    sigmas = schedule(5, NoiseLevels(sigma_min=0.1, sigma_max=10.0))
    assert sigmas.tolist()[0] == 10.0 and sigmas.tolist()[-1] == 0.0 and len(sigmas) == 6

    def denoise(x, sigma):  # a model that always predicts the same clean image
        return torch.full_like(x, 0.25)

    x = torch.randn(2, 3, 4, 4, generator=torch.Generator().manual_seed(0)) * 10.0
    out = sampler(denoise, x, sigmas, noise=lambda s, s_next: torch.randn_like(x))
    torch.testing.assert_close(out, torch.full_like(x, 0.25), rtol=0, atol=1e-5)


def test_pip_installed_plugin_options(installed, monkeypatch):
    monkeypatch.setenv("DTK_LOAD_PLUGINS", "dtk-test-hello")
    strings = {"scale": "0.5", "last": "denoised", "device": "cpu"}
    sampler = get_registry().create("sampler", "hello_euler", strings, from_strings=True)
    assert (sampler.scale, sampler.last) == (0.5, "denoised")
    with pytest.raises(toolkit.OptionError, match="expected one of 'step', 'denoised'") as info:
        toolkit.sampler("hello_euler", last="first")
    assert "accepted: scale: float = 1.0, last: step|denoised = 'step', device: " in str(info.value)
    with pytest.raises(toolkit.OptionError, match="unknown option 'eta' for sampler 'hello_euler'"):
        toolkit.sampler("hello_euler", eta=1.0)


def test_dtk_executable_lists_the_plugin(site):
    done = run_dtk(site, "plugins", "--json", DTK_LOAD_PLUGINS="dtk-test-hello")
    assert done.returncode == 0, done.stderr
    assert done.stderr == ""
    rows = json.loads(done.stdout)
    assert rows_of("dtk-test-hello", rows) == [
        {
            "name": name,
            "kind": kind,
            "distribution": "dtk-test-hello",
            "version": "1.2.3",
            "status": "ok",
            "error": None,
        }
        for name, kind in [("hello_linear", "schedule"), ("hello_euler", "sampler")]
    ]


def test_cli_kind_filter_shows_the_plugin(installed):
    result = CliRunner().invoke(
        cli, ["plugins", "--kind", "sampler"], env={"DTK_LOAD_PLUGINS": "dtk-test-hello"}
    )
    assert result.exit_code == 0, result.output
    [line] = [line for line in result.stdout.splitlines() if "dtk-test-hello" in line]
    assert line.split() == ["hello_euler", "sampler", "dtk-test-hello", "1.2.3", "ok"]
    assert "disabled" not in result.stdout  # --kind lists registrations only


# -- broken plugins ----------------------------------------------------------------------


def test_broken_distributions_are_reported(installed, monkeypatch):
    monkeypatch.setenv("DTK_LOAD_PLUGINS", "dtk-test-broken,dtk-test-badhooks")
    with pytest.warns(PluginLoadWarning) as record:
        frame = toolkit.plugins()
    messages = sorted(str(w.message) for w in record)
    assert len(messages) == 4
    assert all("Set DTK_STRICT_PLUGINS=1" in m for m in messages)
    errors = frame[frame["status"] == "error"]
    found = {(r.distribution, r.version, r.name): r.error for r in errors.itertuples()}
    assert set(found) == {
        ("dtk-test-broken", "0.1", "broken"),
        ("dtk-test-badhooks", "0.2", "wrong_signature"),
        ("dtk-test-badhooks", "0.2", "unknown_hook"),
        ("dtk-test-badhooks", "0.2", "raises"),
    }
    assert found[("dtk-test-broken", "0.1", "broken")] == (
        "ImportError: dtk-test-broken needs the 'unobtainium' package"
    )
    assert "'device'" in found[("dtk-test-badhooks", "0.2", "wrong_signature")]
    assert "unknown hook 'register_sampler'" in found[("dtk-test-badhooks", "0.2", "unknown_hook")]
    raises = found[("dtk-test-badhooks", "0.2", "raises")]
    assert raises == "RuntimeError: schedules are on strike"
    # the built-ins still work
    assert (frame[frame["distribution"] == BUILTIN]["status"] == "ok").all()
    assert isinstance(toolkit.sampler("euler"), toolkit.Sampler)
    assert isinstance(toolkit.schedule("karras"), toolkit.Schedule)


def test_strict_mode_reraises_for_a_pip_installed_plugin(installed, monkeypatch):
    monkeypatch.setenv("DTK_LOAD_PLUGINS", "dtk-test-broken")
    monkeypatch.setenv("DTK_STRICT_PLUGINS", "1")
    with pytest.raises(ImportError, match="unobtainium"):
        toolkit.plugins()


def test_dtk_executable_survives_everything_installed(site):
    """No allow-list: every throwaway distribution loads, broken and clashing ones too."""
    done = run_dtk(site, "plugins", "--json")
    assert done.returncode == 0, done.stderr
    rows = json.loads(done.stdout)  # warnings went to stderr, not into the JSON
    warnings = [line for line in done.stderr.splitlines() if line.startswith("dtk: warning:")]
    assert len(warnings) == 4, done.stderr
    assert all("dtk-test-broken" in w or "dtk-test-badhooks" in w for w in warnings)
    status = {(r["distribution"], r["name"]): r["status"] for r in rows}
    assert status[("dtk-test-hello", "hello_euler")] == "ok"
    assert status[("dtk-test-broken", "broken")] == "error"
    assert status[("dtk-test-badhooks", "raises")] == "error"
    assert status[("dtk-test-clash", "euler")] == "clash"
    assert status[(BUILTIN, "euler")] == "clash"
    assert status[(BUILTIN, "heun")] == "ok"


def test_dtk_executable_table_with_broken_plugins(site):
    done = run_dtk(site, "plugins", DTK_LOAD_PLUGINS="dtk-test-broken,dtk-test-badhooks")
    assert done.returncode == 0, done.stderr
    assert "dtk: warning: dtk plugin dtk-test-broken 0.1 (entry point 'broken')" in done.stderr
    assert "warning" not in done.stdout
    lines = done.stdout.splitlines()
    assert lines[0].split() == ["NAME", "KIND", "DISTRIBUTION", "VERSION", "STATUS", "ERROR"]
    [broken] = [line for line in lines if "dtk-test-broken" in line]
    assert broken.split()[:4] == ["broken", "dtk-test-broken", "0.1", "error"]
    # each row stays on one line, even for pluggy's multi-line validation errors
    assert all(len(line.split()) >= 4 for line in lines)


def test_dtk_executable_strict_mode(site):
    done = run_dtk(site, "plugins", DTK_LOAD_PLUGINS="dtk-test-broken", DTK_STRICT_PLUGINS="1")
    assert done.returncode == 1
    assert "ImportError: dtk-test-broken needs the 'unobtainium' package" in done.stderr
    assert done.stdout == ""


# -- clashes -----------------------------------------------------------------------------


def test_clash_with_a_builtin(installed, monkeypatch):
    monkeypatch.setenv("DTK_LOAD_PLUGINS", "dtk-test-clash")
    with pytest.raises(PluginClashError) as info:
        toolkit.sampler("euler")
    message = str(info.value)
    assert message.startswith("sampler 'euler' is registered by both")
    assert "'diffusion-toolkit'" in message and "'dtk-test-clash'" in message
    assert "choose one as" in message
    assert "'diffusion-toolkit:euler'" in message and "'dtk-test-clash:euler'" in message
    assert type(toolkit.sampler("dtk-test-clash:euler")).__module__ == "dtk_test_clash"
    assert type(toolkit.sampler("diffusion-toolkit:euler")).__module__ == "plugins.samplers.euler"
    frame = toolkit.plugins("sampler")
    euler = frame[frame["name"] == "euler"]
    assert euler[["distribution", "status"]].values.tolist() == [
        [BUILTIN, "clash"],
        ["dtk-test-clash", "clash"],
    ]


def test_cli_shows_the_clash(installed):
    result = CliRunner().invoke(
        cli, ["plugins", "--json"], env={"DTK_LOAD_PLUGINS": "dtk-test-clash"}
    )
    assert result.exit_code == 0, result.output
    clashing = [r for r in json.loads(result.stdout) if r["status"] == "clash"]
    assert [(r["name"], r["distribution"]) for r in clashing] == [
        ("euler", BUILTIN),
        ("euler", "dtk-test-clash"),
    ]
    assert "use 'dtk-test-clash:euler'" in clashing[1]["error"]


# -- allow-list --------------------------------------------------------------------------


def test_empty_allow_list(installed, monkeypatch):
    monkeypatch.setenv("DTK_LOAD_PLUGINS", "")
    frame = toolkit.plugins()
    third_party = frame[frame["distribution"] != BUILTIN]
    assert set(third_party["status"]) == {"disabled"}
    assert set(third_party["distribution"]) == set(DISTRIBUTIONS)
    assert isinstance(toolkit.sampler("euler"), toolkit.Sampler)  # no clash: not loaded
    assert not any(m.startswith("dtk_test_") for m in sys.modules)


@pytest.mark.filterwarnings("always::toolkit.errors.PluginLoadWarning")
def test_cli_allow_list_with_an_unknown_name(installed):
    env = {"DTK_LOAD_PLUGINS": "dtk-test-hello, dtk-test-nowhere"}
    result = CliRunner().invoke(cli, ["plugins", "--json"], env=env)
    assert result.exit_code == 0, result.output
    rows = json.loads(result.stdout)
    assert rows_of("dtk-test-nowhere", rows)[0]["status"] == "not installed"
    assert {r["status"] for r in rows_of("dtk-test-hello", rows)} == {"ok"}
    assert "dtk: warning: DTK_LOAD_PLUGINS names 'dtk-test-nowhere'" in result.stderr


# -- lazy loading ------------------------------------------------------------------------

CHECK_IMPORTS = """
import sys
import toolkit.cli.group

sys.argv = ["dtk", *sys.argv[1:]]
try:
    toolkit.cli.group.main()
except SystemExit as exit:
    assert exit.code in (0, None), exit.code
heavy = sorted(m for m in ("torch", "diffusers", "transformers") if m in sys.modules)
print("HEAVY:", heavy, file=sys.stderr)
sys.exit(3 if heavy else 0)
"""


@pytest.mark.parametrize(
    "args",
    [["--help"], ["plugins"], ["plugins", "--json"], ["plugins", "--kind", "sampler"]],
    ids=" ".join,
)
def test_cli_does_not_import_torch(site, args):
    environ = {k: v for k, v in os.environ.items() if not k.startswith("DTK_")}
    environ["PYTHONPATH"] = str(site)  # every throwaway plugin is imported, none needs torch
    done = subprocess.run(
        [sys.executable, "-c", CHECK_IMPORTS, *args],
        capture_output=True,
        text=True,
        env=environ,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    assert "HEAVY: []" in done.stderr
