"""The documentation says what the code does, and a command starts quietly.

- docs/configuration.md is what `tfdogs.config.reference` writes from the table of settings.
- Every `python -m tfdogs.<verb> ...` shown in README.md, docs/, the configs' headers and the
  commands' own `--help` examples parses with that verb's parser (continuation lines
  joined); training commands and the configs they name also pass the config's validation,
  and every YAML key shown is a config key. A renamed flag fails here, not for a user.
- Each command's `--help` ends with examples; README.md stays short; its links lead somewhere.
- A first run prints tfdogs' own lines and nothing of TensorFlow's C++ logging, which
  `--verbose 2` or the user's own TF_CPP_MIN_LOG_LEVEL bring back.
"""

import argparse
import contextlib
import importlib
import importlib.util
import io
import os
import pathlib
import re
import shlex
import subprocess
import sys
from unittest import mock

import pytest
import yaml

from tfdogs import config as config_lib
from tfdogs.config import reference
from tfdogs.runs.comparison import parse_overrides

ROOT = pathlib.Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
VERBS = ("train", "check", "evaluate", "compare", "ensemble", "predict", "submit", "export", "zeroshot", "port",
         "bench", "lr_find", "distill")
COMMAND = re.compile(r"python -m (tfdogs(?:\.\w+)+)")
SHELL_OPERATORS = ("&&", "||", "|", ";", ">", "2>", "2>&1", ">>")
README_MAX_LINES = 250


# --- where commands are shown -------------------------------------------------------------------------------------

def joined_lines(lines):
    """(line number, text) of each line, with continuation lines (ending in a backslash) joined to it."""
    number = 0
    while number < len(lines):
        start, text = number, lines[number].rstrip()
        while text.endswith("\\") and number + 1 < len(lines):
            number += 1
            text = text[:-1] + " " + lines[number].strip().lstrip("#").strip()
        yield start + 1, text
        number += 1


def markdown_parts(text):
    """Splits a Markdown page into fenced blocks, (language, first line, lines), and prose, (first line, paragraph)."""
    blocks, prose, fence, paragraph = [], [], None, []
    for number, line in enumerate(text.splitlines(), 1):
        if fence is None and line.lstrip().startswith("```"):
            if paragraph:
                prose.append((paragraph[0][0], " ".join(part for _, part in paragraph)))
                paragraph = []
            fence = (line.strip()[3:].strip(), number + 1, [])
        elif fence is not None and line.strip().startswith("```"):
            blocks.append(fence)
            fence = None
        elif fence is not None:
            fence[2].append(line)
        elif line.strip():
            paragraph.append((number, line.strip()))
        elif paragraph:
            prose.append((paragraph[0][0], " ".join(part for _, part in paragraph)))
            paragraph = []
    if paragraph:
        prose.append((paragraph[0][0], " ".join(part for _, part in paragraph)))
    return blocks, prose


def shown_commands():
    """(where, text) of every command line shown: in pages, configs' headers and the commands' docstrings."""
    found = []
    for page in PAGES:
        blocks, prose = markdown_parts(page.read_text())
        for _, first, lines in blocks:
            found += [(f"{page.name}:{first + offset - 1}", text) for offset, text in joined_lines(lines)
                      if "python -m tfdogs" in text]
        for number, paragraph in prose:
            found += [(f"{page.name}:{number}", span) for span in re.findall(r"`([^`]*)`", paragraph)
                      if "python -m tfdogs" in span]
    for path in sorted((ROOT / "configs").glob("*.yaml")):
        header = [line[1:] for line in path.read_text().splitlines() if line.startswith("#")]
        found += [(f"configs/{path.name}:{number}", text) for number, text in joined_lines(header)
                  if "python -m tfdogs" in text]
    for verb in VERBS + ("config.reference",):
        doc = importlib.import_module(f"tfdogs.{verb}").__doc__
        found += [(f"tfdogs.{verb} docstring:{number}", text) for number, text in joined_lines(doc.splitlines())
                  if text.strip().startswith("python -m tfdogs")]
    return found


def invocations(text):
    """(module, argv) of each `python -m tfdogs...` in one command line, up to a shell operator or comment."""
    for match in COMMAND.finditer(text):
        try:
            tokens = shlex.split(text[match.end():], comments=True)
        except ValueError as error:
            raise AssertionError(f"cannot split {text!r}: {error}") from None
        argv = []
        for token in tokens:
            if token in SHELL_OPERATORS or token.startswith(("$(", "`")):
                break
            argv.append(token)
        yield match.group(1), argv


COMMANDS = [(where, module, argv, text) for where, text in shown_commands() for module, argv in invocations(text)]


class _Captured(Exception):
    """Carries the parser a command's `main` was about to parse with."""


def parser_of(module_name):
    """The command's argument parser: `build_parser()`, or the one its `main` builds (stopped before any work)."""
    module = importlib.import_module(module_name)
    if hasattr(module, "build_parser"):
        return module.build_parser()

    def stop(parser, *args, **kwargs):
        raise _Captured(parser)

    with mock.patch.object(argparse.ArgumentParser, "parse_args", stop):
        try:
            module.main([])
        except _Captured as captured:
            return captured.args[0]
    raise AssertionError(f"{module_name}.main() never parsed its arguments")


def parse(module_name, argv):
    """argparse's namespace, or an AssertionError with argparse's own message."""
    errors = io.StringIO()
    parser = parser_of(module_name)
    # A shown flag must be whole: renamed to --learning-rate-peak, the flag would still take --learning-rate as
    # its abbreviation.
    parser.allow_abbrev = False
    try:
        with contextlib.redirect_stderr(errors):
            return parser.parse_args(argv)
    except SystemExit:
        raise AssertionError(errors.getvalue().strip()) from None


def config_file(token):
    """A shipped config file a command names (configs/NAME.yaml), or None for placeholders like RUN/config.yaml."""
    return ROOT / token if re.fullmatch(r"configs/[\w.-]+\.yaml", token) else None


# --- the configuration page ---------------------------------------------------------------------------------------

def test_the_configuration_page_is_what_the_table_of_settings_writes():
    written = (ROOT / "docs" / "configuration.md").read_text()
    assert written == reference.page(), ("docs/configuration.md differs from tfdogs/config/keys.py: run "
                                         "python -m tfdogs.config.reference --output docs/configuration.md")


def test_every_setting_has_one_group_in_the_help_and_on_the_page():
    grouped = [key for _, _, keys in config_lib.GROUPS for key in keys]
    assert sorted(grouped) == sorted(config_lib.DEFAULTS), "tfdogs.config.GROUPS must name every key once"
    page = reference.page()
    assert all(f"| `{key}`<br>`--{key.replace('_', '-')}` |" in page for key in config_lib.DEFAULTS)


# --- every command shown parses -----------------------------------------------------------------------------------

def test_the_pages_show_commands_of_every_verb():
    shown = {module for where, module, _, _ in COMMANDS if not where.startswith("tfdogs.")}
    assert {f"tfdogs.{verb}" for verb in VERBS} <= shown


@pytest.mark.parametrize("where, module, argv, text", COMMANDS, ids=[f"{c[0]} {c[1]}" for c in COMMANDS])
def test_each_command_shown_parses_with_its_verbs_parser(where, module, argv, text, monkeypatch):
    assert importlib.util.find_spec(module) is not None, f"{where}: no module {module}: {text}"
    if not argv or "--help" in argv or "-h" in argv:
        return  # the command named in prose, or its help
    try:
        args = parse(module, argv)
    except AssertionError as error:
        raise AssertionError(f"{where}: {text}\n{error}") from None
    for token in argv:
        if config_file(token):
            assert config_file(token).is_file(), f"{where}: no such config {token}"
            config_lib.load_yaml(config_file(token))  # refuses unknown keys, naming them
    monkeypatch.chdir(ROOT)
    if module == "tfdogs.train" and (not args.config or config_file(args.config)):
        config_lib.resolve(args)  # every value and combination, as a run checks them before any work
    if module == "tfdogs.compare":
        overrides = parse_overrides(args.overrides)
        for name in args.configs:
            if config_file(name):
                config_lib.validate({**config_lib.DEFAULTS, **config_lib.load_yaml(name), **overrides})
        assert set(overrides) <= set(config_lib.DEFAULTS), f"{where}: unknown --set key in {text}"


def test_every_yaml_key_shown_is_a_config_key():
    shown = []
    for page in PAGES:
        blocks, prose = markdown_parts(page.read_text())
        for language, first, lines in blocks:
            if language in ("yaml", "yml"):
                values = yaml.safe_load("\n".join(lines)) or {}
                shown.append((f"{page.name}:{first}", values))
                config_lib.validate({**config_lib.DEFAULTS, **values})
        for number, paragraph in prose:
            shown += [(f"{page.name}:{number}", {span.split(":")[0]: None})
                      for span in re.findall(r"`([^`]*)`", paragraph) if re.fullmatch(r"[a-z][a-z0-9_]*: \S.*", span)]
    unknown = [f"{where}: {key}" for where, values in shown for key in values if key not in config_lib.DEFAULTS]
    assert not unknown


# --- --help, the README's size and its links ----------------------------------------------------------------------

@pytest.mark.parametrize("verb", VERBS)
def test_each_commands_help_ends_with_examples(verb):
    module = importlib.import_module(f"tfdogs.{verb}")
    if not hasattr(module, "build_parser"):
        pytest.skip(f"tfdogs.{verb} has no build_parser() with an examples epilog yet")
    lines = [line.strip() for line in module.build_parser().format_help().strip().splitlines()]
    examples = lines[lines.index("Examples:") + 1:]
    commands = [line for line in examples if line.startswith(f"python -m tfdogs.{verb} ")]
    continued = [line for before, line in zip(examples, examples[1:]) if before.endswith("\\")]
    assert 2 <= len(commands) <= 3 and len(commands) + len(continued) == len(examples), examples


def test_the_readme_is_short():
    lines = (ROOT / "README.md").read_text().count("\n")
    assert lines <= README_MAX_LINES, f"README.md has {lines} lines; move detail into docs/"


def anchors(page):
    """The anchors a code host gives the headings of a Markdown page (lower case, punctuation dropped)."""
    headings, fenced = [], False
    for line in page.read_text().splitlines():
        fenced ^= line.lstrip().startswith("```")
        if not fenced and line.startswith("#"):
            headings.append(line)
    return {re.sub(r"[^\w\- ]", "", heading.lstrip("#").strip().lower()).replace(" ", "-") for heading in headings}


def test_every_relative_link_of_the_pages_leads_to_a_file_and_heading():
    broken = []
    for page in [*PAGES, ROOT / "CHANGELOG.md"]:
        for target, anchor in re.findall(r"\]\(([^)#\s]*)(?:#([^)\s]*))?\)", page.read_text()):
            if re.match(r"[a-z]+:", target):
                continue
            linked = (page.parent / target) if target else page
            if not linked.exists() or (anchor and linked.suffix == ".md" and anchor not in anchors(linked)):
                broken.append(f"{page.name}: {target}#{anchor}")
    assert not broken


# --- a quiet start ------------------------------------------------------------------------------------------------

MARKERS = ("cuInit", "oneDNN", "cuda drivers")
ABSL_LINE = re.compile(r"^[IWEF]\d{4} \d\d:\d\d:[\d.]+ +\d+ \S+:\d+\] ", re.MULTILINE)
TINY_RUN = ["tfdogs.train", "--model", "lenet5", "--data", "synthetic", "--epochs", "1", "--image-size", "32",
            "--synthetic-classes", "2", "--synthetic-images-per-class", "4", "--batch-size", "2"]


def run_command(argv, folder, **environment):
    """`python -m ARGV` in a fresh process, with TF_CPP_MIN_LOG_LEVEL only where `environment` sets it."""
    env = {key: value for key, value in os.environ.items() if key != "TF_CPP_MIN_LOG_LEVEL"}
    completed = subprocess.run([sys.executable, "-m", *argv], cwd=folder, env={**env, **environment},
                               capture_output=True, text=True, timeout=600)
    assert completed.returncode == 0, completed.stderr
    return completed


def seen(stderr):
    return [marker for marker in MARKERS if marker.lower() in stderr.lower()]


@pytest.fixture(scope="module")
def quiet_run(tmp_path_factory):
    folder = tmp_path_factory.mktemp("quiet")
    completed = run_command(TINY_RUN + ["--output", "run", "--export-dir", "export"], folder)
    return folder, completed


def test_a_first_run_prints_its_own_lines_and_nothing_of_tensorflows_cpp_logging(quiet_run):
    _, completed = quiet_run
    assert "Run folder:" in completed.stdout and "Time:" in completed.stdout
    assert seen(completed.stderr) == [] and not ABSL_LINE.search(completed.stderr), completed.stderr


def test_the_users_log_level_brings_tensorflows_messages_back(quiet_run):
    folder, _ = quiet_run
    completed = run_command(["tfdogs.check", "--data-dir", "run/synthetic_data"], folder, TF_CPP_MIN_LOG_LEVEL="0")
    assert completed.stdout.strip()  # the check's own summary
    assert seen(completed.stderr), completed.stderr  # on a CPU machine: all three; with a GPU: oneDNN at least


def test_verbose_2_brings_tensorflows_messages_back(quiet_run):
    folder, _ = quiet_run
    completed = run_command(TINY_RUN + ["--output", "loud", "--export-dir", "loud-export", "--verbose", "2"], folder)
    assert seen(completed.stderr), completed.stderr
