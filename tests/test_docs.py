"""docs/plugins.md cannot rot: every hook is documented, and the tutorial's plugin works.

The code blocks of the tutorial whose info string carries ``title="FILE"`` are the files of
its example project. They are written out, installed with pip, and checked against what the
tutorial says: the ``dtk plugins`` listing, the JSON record, the option error, the output of
its example script and the options of its ``dtk generate`` line.
"""

from __future__ import annotations

import json
import os
import pathlib
import re
import shlex
import subprocess
import sys

import pytest
from invoke import dtk_executable

import toolkit
import toolkit.registry.manager
from toolkit.registry import hookspecs
from toolkit.registry.manager import KINDS, get_registry
from toolkit.registry.options import parse_key_values

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    tomllib = pytest.importorskip("tomli")

PLUGINS_MD = pathlib.Path(__file__).resolve().parent.parent / "docs" / "plugins.md"
FENCE = re.compile(r"^```([^\n]*)\n(.*?)^```[ \t]*$", re.MULTILINE | re.DOTALL)
IDENTIFIER = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


def code_blocks(markdown: str) -> list[tuple[str, str]]:
    """(info string, body) of every fenced code block that starts in column 0."""
    return [(info.strip(), body) for info, body in FENCE.findall(markdown)]


def titled_files(markdown: str) -> dict[str, str]:
    files = {}
    for info, body in code_blocks(markdown):
        title = re.search(r'title="([^"]+)"', info)
        if title:
            assert title.group(1) not in files, f"two code blocks titled {title.group(1)}"
            files[title.group(1)] = body
    return files


def console_transcripts(markdown: str) -> dict[str, list[str]]:
    """``$ command`` -> the output lines shown under it, from ``console`` blocks."""
    transcripts: dict[str, list[str]] = {}
    for info, body in code_blocks(markdown):
        if info.split()[:1] != ["console"]:
            continue
        command = None
        for line in body.splitlines():
            if line.startswith("$ "):
                command = line[2:].strip()
                transcripts[command] = []
            elif command is not None:
                transcripts[command].append(line)
    return transcripts


def documented_names(markdown: str) -> set[str]:
    """Identifiers named in a heading, in inline code or in a code block."""
    names: set[str] = set()
    for line in markdown.splitlines():
        if line.startswith("#"):
            names.update(IDENTIFIER.findall(line))
    for span in re.findall(r"`([^`\n]+)`", markdown):
        names.update(IDENTIFIER.findall(span))
    for _, body in code_blocks(markdown):
        names.update(IDENTIFIER.findall(body))
    return names


def hook_names() -> list[str]:
    marker = f"{hookspecs.PROJECT_NAME}_spec"
    return sorted(
        name
        for name, value in vars(hookspecs).items()
        if callable(value) and hasattr(value, marker)
    )


@pytest.fixture(scope="module")
def markdown() -> str:
    return PLUGINS_MD.read_text()


# -- every hook is documented ------------------------------------------------------------


def test_hookspecs_are_found():
    assert hook_names() == sorted(KINDS.values())


@pytest.mark.parametrize("hook", hook_names())
def test_hook_is_documented(markdown, hook):
    assert hook in documented_names(markdown), f"docs/plugins.md does not document {hook}"


@pytest.mark.parametrize("hook", hook_names())
def test_hook_has_a_section(markdown, hook):
    headings = [line for line in markdown.splitlines() if line.startswith("#")]
    assert any(re.match(rf"#+ {hook}\(register\)$", h) for h in headings), hook


def test_an_undocumented_hook_would_be_caught(markdown):
    hook = hook_names()[0]
    without = markdown.replace(hook, "something_else")
    assert hook in documented_names(markdown)
    assert hook not in documented_names(without)


def test_documented_names_reads_headings_and_code():
    text = "# register_a(register)\nplain register_b\n`register_c`\n```python\nregister_d\n```\n"
    assert {"register_a", "register_c", "register_d"} <= documented_names(text)
    assert "register_b" not in documented_names(text)


def protocol_members() -> list[tuple[str, str]]:
    """(kind, member) for every member of every plugin kind's protocol, optional ones too."""
    from toolkit.registry.protocols import CONTRACT, members

    found = []
    for kind, (protocol, options, _) in CONTRACT.items():
        for cls in (protocol, options):
            if cls is not None:
                found += [(kind, m) for m in members(cls) if m not in ("name", "__call__")]
    return found


@pytest.mark.parametrize(("kind", "member"), protocol_members())
def test_every_protocol_member_is_documented(markdown, kind, member):
    assert member in documented_names(markdown), (
        f"docs/plugins.md does not document {kind} {member}"
    )


def test_optional_members_have_their_defaults_in_one_place():
    from toolkit.registry.protocols import CONTRACT, members

    for protocol, options, defaults in CONTRACT.values():
        assert set(defaults) == set(members(options) if options else []), protocol.__name__


def test_the_guide_imports_only_the_public_api(markdown):
    """What a plugin author copies from the guide must not import private toolkit modules."""
    for _, body in code_blocks(markdown):
        for line in body.splitlines():
            private = re.match(r"\s*(from|import) toolkit\.", line)
            assert not private, f"docs/plugins.md imports a private module: {line.strip()}"
            names = re.match(r"\s*from toolkit import (.+)", line)
            if names:
                for name in re.findall(IDENTIFIER, names.group(1)):
                    assert name in toolkit.__all__, f"docs/plugins.md imports toolkit.{name}"


# -- the tutorial's plugin works ---------------------------------------------------------


class Tutorial:
    """The tutorial's example project, installed by pip into `site`."""

    def __init__(self, markdown: str, root: pathlib.Path) -> None:
        self.files = titled_files(markdown)
        self.project = root / "project"
        self.project.mkdir()
        for name, body in self.files.items():
            (self.project / name).write_text(body)
        pyproject = tomllib.loads(self.files["pyproject.toml"])
        self.distribution = pyproject["project"]["name"]
        self.version = pyproject["project"]["version"]
        self.entry_points = pyproject["project"]["entry-points"]["dtk"]
        self.site = root / "site"
        command = [sys.executable, "-m", "pip", "install", "--quiet", "--no-deps"]
        command += ["--no-build-isolation", "--no-index", "--disable-pip-version-check"]
        command += ["--target", str(self.site), str(self.project)]
        env = {**os.environ, "PIP_ROOT_USER_ACTION": "ignore", "PIP_NO_INPUT": "1"}
        done = subprocess.run(command, capture_output=True, text=True, env=env, timeout=300)
        assert done.returncode == 0, done.stdout + done.stderr

    def run(self, *command: str) -> subprocess.CompletedProcess:
        """Run `command` in the project folder, with the plugin installed."""
        env = {k: v for k, v in os.environ.items() if not k.startswith("DTK_")}
        env["PYTHONPATH"] = str(self.site)
        return subprocess.run(
            command, cwd=self.project, capture_output=True, text=True, env=env, timeout=120
        )


@pytest.fixture(scope="module")
def tutorial(markdown, tmp_path_factory) -> Tutorial:
    return Tutorial(markdown, tmp_path_factory.mktemp("tutorial"))


@pytest.fixture
def installed(tutorial, monkeypatch):
    """The tutorial's plugin importable in this process, and a fresh registry."""
    monkeypatch.syspath_prepend(str(tutorial.site))
    monkeypatch.delenv("DTK_LOAD_PLUGINS", raising=False)
    monkeypatch.delenv("DTK_STRICT_PLUGINS", raising=False)
    monkeypatch.setattr(toolkit.registry.manager, "_default", None)
    modules = set(tutorial.entry_points.values())
    yield tutorial
    for name in modules & set(sys.modules):
        del sys.modules[name]


def test_tutorial_defines_a_plugin_project(markdown, tutorial):
    assert {"pyproject.toml", "dtk_midpoint.py"} <= set(tutorial.files)
    assert tutorial.entry_points  # [project.entry-points.dtk]
    assert "pip install -e ." in markdown


def test_tutorial_listing_matches_dtk_plugins(markdown, tutorial):
    command = "dtk plugins --kind sampler"
    shown = console_transcripts(markdown)[command]
    done = tutorial.run(dtk_executable(), *command.split()[1:])
    assert done.returncode == 0, done.stderr
    assert done.stderr == ""
    real = [line.split() for line in done.stdout.splitlines()]
    real_names = {tokens[0] for tokens in real}
    assert shown[0].split() == real[0]  # the header
    ours = [line.split() for line in shown if tutorial.distribution in line.split()]
    assert ours, f"the listing in docs/plugins.md does not show {tutorial.distribution}"
    for tokens in ours:
        assert tokens in real, f"dtk plugins does not print {' '.join(tokens)}"
    for line in shown[1:]:
        if line.strip() != "...":
            assert line.split()[0] in real_names, line


def test_tutorial_json_record_matches(markdown, tutorial):
    done = tutorial.run(dtk_executable(), "plugins", "--json")
    assert done.returncode == 0, done.stderr
    records = json.loads(done.stdout)
    shown = [json.loads(body) for info, body in code_blocks(markdown) if info == "json"]
    assert shown
    for record in shown:
        assert record in records


def test_tutorial_script_output(markdown, tutorial):
    transcripts = console_transcripts(markdown)
    scripts = [c for c in transcripts if c.startswith("python ") and c.split()[1] in tutorial.files]
    assert scripts, "no example script run in docs/plugins.md"
    for command in scripts:
        done = tutorial.run(sys.executable, *shlex.split(command)[1:])
        assert done.returncode == 0, done.stderr
        assert done.stdout.splitlines() == transcripts[command]


def test_tutorial_plugin_in_process(installed):
    import torch

    sampler = toolkit.sampler("midpoint")
    assert isinstance(sampler, toolkit.Sampler)
    registration = get_registry().get("sampler", "midpoint")
    assert (registration.distribution, registration.version) == (
        installed.distribution,
        installed.version,
    )
    # second order: exact on the linear ODE a constant denoiser gives, geometric or not
    levels = toolkit.NoiseLevels.continuous(0.02, 20.0)
    sigmas = toolkit.schedule("karras")(6, levels)
    x = torch.randn(2, 1, 4, 4, generator=torch.Generator().manual_seed(1)) * sigmas[0]
    seen = []
    out = sampler(
        lambda x, s: torch.zeros_like(x) - 0.3, x, sigmas, noise=None, callback=seen.append
    )
    torch.testing.assert_close(out, torch.full_like(x, -0.3))
    assert [step["i"] for step in seen] == list(range(6))


def test_tutorial_option_error_is_the_real_one(markdown, installed):
    shown = [body.strip() for info, body in code_blocks(markdown) if info == "text"]
    [message] = [m for m in shown if m.startswith("bad value")]
    option, value = re.match(r"bad value '([^']*)' for option '([^']*)'", message).group(2, 1)
    with pytest.raises(toolkit.OptionError) as info:
        toolkit.sampler("midpoint", **{option: value})
    assert str(info.value) == message


def test_tutorial_command_line_options_are_valid(markdown, installed):
    lines = [
        line
        for info, body in code_blocks(markdown)
        if info.split()[:1] == ["bash"]
        for line in body.splitlines()
        if line.startswith("dtk generate") and "--sampler-option" in line
    ]
    assert lines
    for line in lines:
        args = shlex.split(line)
        sampler = args[args.index("--sampler") + 1]
        pairs = [args[i + 1] for i, arg in enumerate(args) if arg == "--sampler-option"]
        options = parse_key_values(pairs, what="--sampler-option")
        instance = get_registry().create("sampler", sampler, options, from_strings=True)
        assert type(instance).__module__ in installed.entry_points.values()


def test_tutorial_plugin_is_lazy(tutorial):
    code = (
        "import sys, toolkit.cli.group\n"
        "sys.argv = ['dtk', 'plugins']\n"
        "try:\n    toolkit.cli.group.main()\nexcept SystemExit:\n    pass\n"
        "assert 'torch' not in sys.modules, 'torch was imported'\n"
    )
    done = tutorial.run(sys.executable, "-c", code)
    assert done.returncode == 0, done.stderr
    assert tutorial.distribution in done.stdout
