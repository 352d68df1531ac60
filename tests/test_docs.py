"""The documents: every relative link and anchor in a tracked Markdown file resolves, every command line
they show parses with its script's own parser, and no tracked file speaks of how or in what environment
the project was built (it speaks of itself only)."""
import contextlib
import importlib
import io
import re
import shlex
import subprocess
from pathlib import Path

import pytest
from conftest import ROOT

LINK = re.compile(r"(?<!!)\[[^\]]*\]\(([^)\s]+)\)")
HEADING = re.compile(r"^#{1,6}\s+(.*?)\s*#*\s*$")
FENCE = re.compile(r"^\s*(```|~~~)")


def tracked(pattern: str):
    out = subprocess.run(["git", "ls-files", pattern], cwd=ROOT, capture_output=True, text=True, check=True).stdout
    return [ROOT / p for p in out.splitlines() if (ROOT / p).is_file()]


def prose_lines(path: Path):
    """The lines of a Markdown file outside fenced code blocks."""
    inside = False
    for line in path.read_text(encoding="utf-8").splitlines():
        if FENCE.match(line):
            inside = not inside
            continue
        if not inside:
            yield line


def slug(heading: str) -> str:
    """GitHub's anchor of a heading: lower case, inline code / links reduced to their text, punctuation
    other than '-' and '_' dropped, spaces to '-'."""
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", heading).replace("`", "")
    text = re.sub(r"[^\w\- ]", "", text.lower())
    return text.replace(" ", "-")


def anchors(path: Path) -> set:
    seen, out = {}, set()
    for line in prose_lines(path):
        m = HEADING.match(line)
        if m:
            base = slug(m.group(1))
            n = seen.get(base, 0)
            seen[base] = n + 1
            out.add(base if n == 0 else f"{base}-{n}")
    return out


def test_the_slug_rule_matches_github_on_examples():
    assert slug("Pre-training") == "pre-training"
    assert slug("Tests") == "tests"
    assert slug("`--eval` and linear probing (MAE's recipe)") == "--eval-and-linear-probing-maes-recipe"
    assert slug("Data at scale: shards, decoders") == "data-at-scale-shards-decoders"


@pytest.mark.parametrize("md", tracked("*.md"), ids=lambda p: str(p.relative_to(ROOT)))
def test_every_relative_link_and_anchor_resolves(md):
    broken = []
    for line in prose_lines(md):
        for target in LINK.findall(line):
            if re.match(r"^[a-z][a-z0-9+.-]*:", target):  # http:, https:, mailto:
                continue
            file_part, _, anchor = target.partition("#")
            dest = (md.parent / file_part).resolve() if file_part else md
            if not dest.exists():
                broken.append(f"{target}: no such file")
            elif anchor and dest.suffix == ".md" and anchor not in anchors(dest):
                broken.append(f"{target}: no heading with that anchor in {dest.relative_to(ROOT)}")
    assert not broken, broken


# how or where the project was built is no part of it: the project speaks of itself only
# (the phrases are split so that this file does not match itself, nor any grep for them)
PHRASES = ["sessions? (that|which) " + "built", "work" + "place", "device " + "tool", "device " + "machine",
           "with " + "carry", "built " + "this repo", "on a slower " + "day", "one day's " + "machine",
           "development " + "(machine|cpu)", "device " + "image", "of device " + "time", "no gpu " + "was available",
           "had " + "no gpu"]
BUILT = re.compile("|".join(PHRASES), re.IGNORECASE)


def test_no_tracked_file_speaks_of_how_the_project_was_built():
    hits = []
    for path in tracked("*"):
        if path.suffix in (".png", ".jpg", ".pth", ".pt", ".gz", ".tar"):
            continue
        try:
            text = path.read_text(encoding="utf-8")
        except UnicodeDecodeError:
            continue
        hits += [f"{path.relative_to(ROOT)}:{i}: {line.strip()}" for i, line in enumerate(text.splitlines(), 1)
                 if BUILT.search(line)]
    assert not hits, hits


# --------------------------------------------------------------------------------------------
# the commands the documents show: every `python <script>.py ...`, `torchrun ... <script>.py ...`,
# `srun python ...` or `sbatch scripts/slurm_train.sbatch <script>.py ...` line of a ```bash / ```sh
# block parses with that script's own parser, in-process (nothing is trained)

SHELL_FENCE = re.compile(r"^\s*```\s*(bash|sh|shell|console)?\s*$")
PLACEHOLDERS = {"<flags>": []}  # "any further flags": nothing, for the parse
# commands whose arguments are placeholders no value stands in for: (file, a piece of the command) -> why
SKIP: dict = {}
STOP_TOKENS = {"|", "||", "&&", ";", "&", ">", ">>", "2>&1", "2>", "<"}


def shell_commands(md: Path):
    """(line number, one logical command line) of the ```bash / ```sh blocks: continuations joined."""
    inside, pending, start = False, "", 0
    for i, line in enumerate(md.read_text(encoding="utf-8").splitlines(), 1):
        fence = SHELL_FENCE.match(line)
        if not inside:
            if fence and fence.group(1):
                inside = True
            continue
        if line.strip().startswith("```"):
            inside, pending = False, ""
            continue
        if not pending:
            start = i
        if line.rstrip().endswith("\\"):
            pending += line.rstrip()[:-1] + " "
            continue
        yield start, pending + line
        pending = ""


def script_argv(command: str):
    """(the repo script a command runs, its arguments), or None when the line runs no ``.py`` file."""
    tokens = shlex.split(command, comments=True)
    for k, tok in enumerate(tokens):
        if tok in STOP_TOKENS:
            return None
        if tok.endswith(".py") and not tok.startswith("-"):
            argv = []
            for arg in tokens[k + 1:]:
                if arg in STOP_TOKENS:
                    break
                argv += PLACEHOLDERS.get(arg, [arg])
            return tok, argv
    return None


def module_of(script: str) -> str:
    """``tools/benchmark.py`` -> ``tools.benchmark`` (the scripts are importable: the project is installed)."""
    return str(Path(script).with_suffix("")).replace("/", ".")


def parse_error(script: str, argv: list) -> str:
    """What the script's parser says about ``argv``: '' when it accepts it (``--help`` included)."""
    if not (ROOT / script).is_file():
        return f"{script}: no such script in the repository"
    module = importlib.import_module(module_of(script))
    err = io.StringIO()
    try:
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
            if module_of(script) == "tools.benchmark":  # its own flags, then the script's flags after `--`
                parsed, rest = module.parse_cli(argv)
                inner = importlib.import_module("main_pretrain" if parsed.mode == "pretrain" else "main_finetune")
                for setting in parsed.compare or [""]:
                    inner.get_args_parser().parse_args(rest + shlex.split(setting))
            else:
                module.get_args_parser().parse_args(argv)
    except SystemExit as e:
        if e.code not in (0, None):
            return err.getvalue().strip().splitlines()[-1] if err.getvalue().strip() else f"exit {e.code}"
    return ""


def documented_commands():
    for md in tracked("*.md"):
        for lineno, command in shell_commands(md):
            found = script_argv(command)
            if found:
                yield md, lineno, command, found


def test_the_command_check_reads_commands_and_catches_an_unknown_flag():
    cmd = "torchrun --nproc_per_node 8 main_pretrain.py --model deepmim_vit_tiny_patch4 <flags>  # a comment"
    assert script_argv(cmd) == ("main_pretrain.py", ["--model", "deepmim_vit_tiny_patch4"])
    assert script_argv("make demo") is None
    assert parse_error("main_pretrain.py", ["--model", "deepmim_vit_tiny_patch4", "--epochs", "2"]) == ""
    assert parse_error("main_pretrain.py", ["--help"]) == ""
    assert "--no_such_flag" in parse_error("main_pretrain.py", ["--no_such_flag"])
    assert "--no_such_flag" in parse_error("tools/benchmark.py", ["--compare", "", "--no_such_flag 3", "--",
                                                                     "--model", "deepmim_vit_tiny_patch4"])
    assert "no such script" in parse_error("tools/no_such_tool.py", [])


def test_every_documented_command_parses():
    bad, seen = [], 0
    for md, lineno, command, (script, argv) in documented_commands():
        where = f"{md.relative_to(ROOT)}:{lineno}"
        if any(md.relative_to(ROOT).as_posix() == f and piece in command for f, piece in SKIP):
            continue
        seen += 1
        msg = parse_error(script, argv)
        if msg:
            bad.append(f"{where}: {script}: {msg}")
    assert seen >= 30, f"only {seen} commands found: the reader of the documents' code blocks broke"
    assert not bad, "\n".join(bad)


def test_every_skipped_command_is_still_shown():
    shown = [(md.relative_to(ROOT).as_posix(), command) for md, _, command, _ in documented_commands()]
    stale = [key for key in SKIP if not any(f == key[0] and key[1] in c for f, c in shown)]
    assert not stale, stale


def test_every_make_target_and_script_a_document_names_exists():
    targets = set(re.findall(r"^([\w-]+):", (ROOT / "Makefile").read_text(), re.MULTILINE))
    missing = []
    for md in tracked("*.md"):
        for lineno, command in shell_commands(md):
            tokens = shlex.split(command, comments=True)
            if tokens[:1] == ["make"]:
                missing += [f"{md.relative_to(ROOT)}:{lineno}: make {t}" for t in tokens[1:]
                            if "=" not in t and not t.startswith("-") and t not in targets]
            missing += [f"{md.relative_to(ROOT)}:{lineno}: {t}" for t in tokens
                        if re.match(r"^(scripts|tools)/[\w./-]+\.(sh|sbatch)$", t) and not (ROOT / t).is_file()]
    assert not missing, missing
