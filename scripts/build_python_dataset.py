#!/usr/bin/env python3
"""Build the second bundled dataset: Python functions' source code -> their docstrings.

A summarization task whose references are several sentences long (as samsum's dialogue
summaries are; the Debian synopses are one line): the input is a function's source code with
its docstring removed, the reference output the docstring's leading prose (2 to 5 sentences),
i.e. code-to-documentation summarization as in CodeSearchNet. The source is a fixed list of
Debian bookworm packages: the Python 3.11 standard library (PSF-2.0) and permissively licensed
(BSD, MIT/Expat) pure-Python libraries. apt downloads each pinned .deb, the script checks its
sha256 against apt's package list (whose InRelease signature apt has checked) and unpacks it
with dpkg-deb; nothing is installed and nothing else is read.

    apt-get update                                            # apt's lists, once
    .venv/bin/python scripts/build_python_dataset.py          # rebuild data/python-docstrings

Writes train.jsonl.gz / test.jsonl.gz (byte-reproducible: gzip without name or mtime),
PROVENANCE.md and LICENSES/ (each package's Debian copyright file, which the BSD and MIT
licenses ask to keep beside the copies) into the output directory, and prints the statistics
recorded in PROVENANCE.md, among them the share of inputs that fit lastmile's 400-token
budget in SmolLM2's chat template (the real tokenizer, through lastmile.data). Neither the
tests nor `make run` need this script; its output is committed.
"""

from __future__ import annotations

import argparse
import ast
import datetime as dt
import fnmatch
import os
import re
import shutil
import subprocess
import sys
import tempfile
import textwrap
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "scripts"))

from lastmile.config import DEFAULT_INSTRUCTION, PAPER_INSTRUCTION, DataConfig  # noqa: E402
from lastmile.data import format_prompt, prompt_lengths, split_of, word_stats  # noqa: E402
from lastmile.io import atomic_path, sha256_file, write_reproducible_jsonl_gz  # noqa: E402
from bundling import dedupe, normalised, sample  # noqa: E402

STDLIB = "usr/lib/python3.11"
DIST = "usr/lib/python3/dist-packages"


@dataclass(frozen=True)
class Package:
    name: str
    version: str
    root: str  # the directory in the .deb whose .py files are read
    license: str  # the license of the package's Python code, from its copyright file


#: Debian bookworm (main) packages read, pinned. Left out on purpose: packages under Apache-2.0
#: (its NOTICE duty), GPL/LGPL code, and packages whose copyright file does not say file by
#: file what the Python code is under (e.g. matplotlib).
PACKAGES = (
    Package("libpython3.11-minimal", "3.11.2-6+deb12u8", STDLIB, "PSF-2.0"),
    Package("libpython3.11-stdlib", "3.11.2-6+deb12u8", STDLIB, "PSF-2.0"),
    Package("python3-distutils", "3.11.2-3", STDLIB, "PSF-2.0"),
    Package("python3-lib2to3", "3.11.2-3", STDLIB, "PSF-2.0"),
    Package("python3-astropy", "5.2.1-2+deb12u1", DIST, "BSD-3-Clause"),
    Package("python3-boltons", "21.0.0-2", DIST, "BSD-3-Clause"),
    Package("python3-click", "8.1.3-2", DIST, "BSD-3-Clause"),
    Package("python3-dask", "2022.12.1+dfsg-2", DIST, "BSD-3-Clause"),
    Package("python3-django", "3:3.2.25-0+deb12u3", DIST, "BSD-3-Clause"),
    Package("python3-ipython", "8.5.0-4", DIST, "BSD-3-Clause"),
    Package("python3-jinja2", "3.1.2-1+deb12u3", DIST, "BSD-3-Clause"),
    Package("python3-mpmath", "1.2.1-2", DIST, "BSD-3-Clause"),
    Package("python3-networkx", "2.8.8-1", DIST, "BSD-3-Clause"),
    Package("python3-numpy", "1:1.24.2-1+deb12u1", DIST, "BSD-3-Clause"),
    Package("python3-pandas", "1.5.3+dfsg-2", DIST, "BSD-3-Clause"),
    Package("python3-pygments", "2.14.0+dfsg-1", DIST, "BSD-2-Clause"),
    Package("python3-pytest", "7.2.1-2", DIST, "Expat"),
    Package("python3-scipy", "1.10.1-2", DIST, "BSD-3-Clause"),
    Package("python3-setuptools", "66.1.1-1+deb12u2", DIST, "MIT"),
    Package("python3-sklearn", "1.2.1+dfsg-1", DIST, "BSD-3-Clause"),
    Package("python3-sphinx", "5.3.0-4", DIST, "BSD-2-Clause"),
    Package("python3-sqlalchemy", "1.4.46+ds1-1", DIST, "Expat"),
    Package("python3-statsmodels", "0.13.5+dfsg-7", DIST, "BSD-3-Clause"),
    Package("python3-sympy", "1.11.1-1", DIST, "BSD-3-Clause"),
    Package("python3-twisted", "22.4.0-4+deb12u1", DIST, "Expat"),
    Package("python3-werkzeug", "2.2.2-3+deb12u1", DIST, "BSD-3-Clause"),
)
#: License names (Debian copyright-format short names, lower case) whose files are read.
ALLOWED_LICENSES = {"psf-2.0", "bsd-2-clause", "bsd-3-clause", "bsd-3", "expat", "mit"}

#: Path parts that mark tests, vendored third-party code and caches.
SKIP_PARTS = {"test", "tests", "testing", "idle_test", "_vendor", "vendor", "extern",
              "externals", "__pycache__"}
MIN_SENTENCES, MAX_SENTENCES = 2, 5
MIN_OUTPUT_WORDS, MAX_OUTPUT_WORDS = 12, 90
MIN_CODE_LINES = 3  # statements left after the docstring, blank and comment lines not counted
MIN_INPUT_WORDS = 25
#: Code runs ~2.7 characters per SmolLM2 token: 1200 characters keep ~99% of prompts (50 tokens
#: of chat template and instruction included) within lastmile's 400-token budget.
MAX_INPUT_CHARS = 1200
TEST_FRACTION = 0.15
#: A sentence ends at . ! ? followed by space and a capital, quote, backquote or bracket.
SENTENCE_END = re.compile(r"(?<=[.!?])\s+(?=[A-Z`'\"(\[])")
#: A docstring paragraph that is not prose: doctest, list, field list, reST directive, a
#: line ending in ':' (section headers such as `Args:`, `Example:`); indented lines
#: (signatures, tables, numpydoc sections) are checked apart. Prose ends there.
NOT_PROSE = re.compile(r"^\s*(>>>|[-*+]\s|\d+[.)]\s|:\w+|\.\. |\S.*:\s*$)", re.M)
TRIVIAL = re.compile(r"^(pass|\.\.\.|raise NotImplementedError(\(.*\))?|return( None)?)$")


@dataclass
class Pair:
    id: str  # module.qualname, e.g. json.decoder.JSONDecoder.decode
    code: str  # the function's source, docstring removed, dedented
    doc: str  # the docstring's leading prose paragraphs, whitespace collapsed
    package: str


# ----------------------------------------------------------------------------- source

def apt_record(pkg: Package) -> dict[str, str]:
    """Filename, Size and SHA256 of the pinned .deb from apt's (signature-checked) lists."""
    out = subprocess.run(["apt-cache", "show", f"{pkg.name}={pkg.version}"],
                         capture_output=True, text=True)
    fields = dict(re.findall(r"^(Filename|Size|SHA256|Architecture): (.+)$", out.stdout, re.M))
    if out.returncode or "SHA256" not in fields:
        sys.exit(f"apt knows no {pkg.name}={pkg.version} ({out.stderr.strip()}); run "
                 "apt-get update (Debian bookworm main), or fetch that version from "
                 "snapshot.debian.org and pass its directory with --debs")
    return fields


def fetch_deb(pkg: Package, record: dict[str, str], debs: Path) -> Path:
    """The .deb in `debs` (downloaded with apt-get download if absent), sha256 verified."""
    # apt-get download writes an epoch's colon as %3a (python3-django_3%3a3.2.25-..._all.deb)
    path = debs / f"{pkg.name}_{pkg.version.replace(':', '%3a')}_{record['Architecture']}.deb"
    if not path.exists():
        subprocess.run(["apt-get", "download", f"{pkg.name}={pkg.version}"], cwd=debs,
                       check=True, stdout=subprocess.DEVNULL)
    digest = sha256_file(path)
    if digest != record["SHA256"]:
        sys.exit(f"{path}: sha256 {digest} differs from apt's list ({record['SHA256']})")
    return path


def dep5_rules(copyright_text: str) -> list[tuple[list[str], str]]:
    """(file patterns, license) of each `Files:` stanza of a machine-readable copyright file
    (Debian copyright-format 1.0); the last stanza matching a file decides its license."""
    rules = []
    for block in re.split(r"\n\s*\n", copyright_text):
        files = re.search(r"^Files:(.*(?:\n[ \t].*)*)", block, re.M)
        lic = re.search(r"^License:(.*)$", block, re.M)
        if files:
            rules.append((files.group(1).split(), lic.group(1).strip() if lic else ""))
    return rules


def license_of(rel: str, rules: list[tuple[list[str], str]], default: str) -> str:
    """The license of a file at `rel` (relative to the package's Python root). A source-tree
    pattern may carry a prefix the installed path lacks (`lib/sqlalchemy/...`)."""
    found = default
    for patterns, lic in rules:
        for pattern in patterns:
            if pattern == "*" or any(fnmatch.fnmatchcase(rel, p) for p in (
                    pattern, pattern.removeprefix("lib/"), pattern.removeprefix("Lib/"),
                    pattern.removeprefix("src/"))):
                found = lic if pattern != "*" else (lic or default)
    return found


def allowed(lic: str) -> bool:
    """Every term of an `and` expression, or one of an `or`, is in ALLOWED_LICENSES."""
    lic = lic.casefold().strip()
    if " or " in lic:
        return any(allowed(t) for t in lic.split(" or "))
    return bool(lic) and all(t.strip() in ALLOWED_LICENSES for t in lic.split(" and "))


def copyright_of(pkg: Package, tree: Path, copyrights: dict[str, str]) -> str:
    """The package's copyright file; a doc directory that is a symlink to another package's
    (libpython3.11-stdlib -> libpython3.11-minimal) shares that package's, read before."""
    doc = tree / "usr/share/doc" / pkg.name
    if doc.is_symlink():
        target = os.readlink(doc)
        if target not in copyrights:
            sys.exit(f"{pkg.name}: /usr/share/doc/{pkg.name} points to {target}, which is not "
                     "among the packages read before it")
        return copyrights[target]
    return (doc / "copyright").read_text(encoding="utf-8")


def package_files(pkg: Package, tree: Path, copyright_text: str, counts: dict[str, int]
                  ) -> list[tuple[str, bytes]]:
    """(path relative to the root, bytes) of the package's .py files that are read."""
    # CPython's copyright file is not machine-readable: its "Files:" list names C sources and
    # Lib/ files under other permissive licenses (logging, tarfile, ...), read with the rest.
    rules = [] if pkg.license == "PSF-2.0" else dep5_rules(copyright_text)
    root = tree / pkg.root
    files = []
    for path in sorted(root.rglob("*.py")):
        rel = path.relative_to(root).as_posix()
        counts["py"] += 1
        if path.is_symlink() or SKIP_PARTS & set(rel.split("/")):  # a link is read where it points
            counts["skipped"] += 1
            continue
        if not allowed(license_of(rel, rules, pkg.license)):
            counts["license"] += 1
            continue
        files.append((rel, path.read_bytes()))
    return files


# ----------------------------------------------------------------------------- extraction

def module_name(rel: str) -> str:
    parts = rel.removesuffix(".py").split("/")
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def leading_prose(doc: str) -> str:
    """The docstring's paragraphs up to the first that is not prose, joined on one line."""
    paragraphs = []
    for para in re.split(r"\n\s*\n", doc.strip()):
        if NOT_PROSE.search(para) or any(ln[:1] in (" ", "\t") for ln in para.split("\n")):
            break
        paragraphs.append(" ".join(para.split()))
    return " ".join(paragraphs)


def sentences(text: str) -> int:
    return len(SENTENCE_END.split(text)) if text else 0


def functions(tree: ast.AST):
    """(qualname, node) of every function and method, nested ones too (`f.<locals>.g`)."""
    stack = [(tree, "")]
    while stack:
        node, prefix = stack.pop()
        for child in ast.iter_child_nodes(node):
            if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef)):
                name = prefix + child.name
                yield name, child
                stack.append((child, name + ".<locals>."))
            elif isinstance(child, ast.ClassDef):
                stack.append((child, prefix + child.name + "."))
            else:
                stack.append((child, prefix))


def without_docstring(lines: list[str], node) -> str | None:
    """The function's source (decorators included) minus the docstring's lines, dedented;
    None when the docstring shares a line with other code (`def f(): "doc"`)."""
    doc = node.body[0]
    first = min([node.lineno] + [d.lineno for d in node.decorator_list])
    before = lines[doc.lineno - 1].encode()[:doc.col_offset]  # ast offsets count UTF-8 bytes
    after = lines[doc.end_lineno - 1].encode()[doc.end_col_offset:].strip()
    if before.strip() or (after and not after.startswith(b"#")):
        return None
    body = lines[doc.end_lineno:node.end_lineno]
    while body and not body[0].strip():  # the blank line that followed the docstring
        body.pop(0)
    kept = lines[first - 1:doc.lineno - 1] + body
    return textwrap.dedent("\n".join(kept)).strip("\n")


def code_lines(code: str) -> int:
    """Lines after the signature's first line that are not blank, comments or trivial."""
    body = code.split("\n")[1:]
    return sum(1 for ln in body if ln.strip() and not ln.strip().startswith("#")
               and not TRIVIAL.match(ln.strip()))


def extract(package: str, files: list[tuple[str, bytes]], counts: dict[str, int]
            ) -> list[Pair]:
    """Every function with a docstring on lines of its own, as a Pair (not yet filtered)."""
    pairs = []
    for rel, raw in files:
        try:  # a few files are Python 2 or hold bad encodings on purpose
            text = raw.decode("utf-8")
            tree = ast.parse(text, filename=rel)
        except (UnicodeDecodeError, SyntaxError, ValueError):
            counts["unparsed"] += 1
            continue
        lines = text.split("\n")
        module = module_name(rel)
        for qualname, node in functions(tree):
            counts["functions"] += 1
            doc = ast.get_docstring(node)
            if not doc:
                continue
            counts["with a docstring"] += 1
            code = without_docstring(lines, node)
            if code is None:
                continue
            counts["docstring own lines"] += 1
            pairs.append(Pair(f"{module}.{qualname}", code, leading_prose(doc), package))
    return pairs


# ----------------------------------------------------------------------------- filtering

def filter_pairs(pairs: list[Pair]) -> tuple[list[Pair], list[tuple[str, int]]]:
    """Apply the filters in order; returns the kept pairs and (step, count after it)."""
    steps = []
    pairs = sorted(pairs, key=lambda p: p.id)  # first = alphabetical by id, stable
    pairs = [p for p in pairs if MIN_SENTENCES <= sentences(p.doc) <= MAX_SENTENCES]
    steps.append((f"leading prose of {MIN_SENTENCES}-{MAX_SENTENCES} sentences", len(pairs)))
    pairs = [p for p in pairs if p.doc[:1].isupper() and p.doc.endswith(".")
             and MIN_OUTPUT_WORDS <= len(p.doc.split()) <= MAX_OUTPUT_WORDS]
    steps.append((f"starts with a capital, ends with '.', {MIN_OUTPUT_WORDS}-"
                  f"{MAX_OUTPUT_WORDS} words", len(pairs)))
    pairs = [p for p in pairs if code_lines(p.code) >= MIN_CODE_LINES]
    steps.append((f"at least {MIN_CODE_LINES} non-trivial code lines after the signature",
                  len(pairs)))
    pairs = [p for p in pairs if MIN_INPUT_WORDS <= len(p.code.split())
             and len(p.code) <= MAX_INPUT_CHARS]
    steps.append((f"input of at least {MIN_INPUT_WORDS} words and at most {MAX_INPUT_CHARS} "
                  "characters", len(pairs)))
    pairs = dedupe(pairs, lambda p: normalised(p.doc))
    steps.append(("distinct docstring after normalising case and spaces (first id kept)",
                  len(pairs)))
    pairs = dedupe(pairs, lambda p: normalised(p.code))
    steps.append(("distinct input after normalising case and spaces", len(pairs)))
    pairs = dedupe(pairs, lambda p: p.id)
    steps.append(("distinct id (a function redefined under one name: the first kept)",
                  len(pairs)))
    return pairs, steps


# ----------------------------------------------------------------------------- sample

def write_gz_jsonl(path: Path, pairs: list[Pair]) -> None:
    write_reproducible_jsonl_gz(path, ({"id": p.id, "input": p.code, "output": p.doc}
                                       for p in pairs))


# ----------------------------------------------------------------------------- report

def fit_shares(groups: dict[str, list[Pair]], max_tokens: int) -> dict[str, dict[str, float]]:
    """Share of inputs whose chat-formatted prompt fits `max_tokens` (lastmile's filter), per
    instruction, and the prompts' token counts (default instruction) as "mean / median / p95"."""
    import numpy as np

    from lastmile.modeling import load_tokenizer

    tokenizer = load_tokenizer("tiny-random")  # SmolLM2-135M-Instruct's tokenizer
    shares: dict[str, dict] = {}
    for label, instruction in (("default instruction", DEFAULT_INSTRUCTION),
                               ("paper instruction", PAPER_INSTRUCTION)):
        shares[label] = {}
        for name, pairs in groups.items():
            prompts = [format_prompt(tokenizer, instruction, p.code) for p in pairs]
            lengths = np.array(prompt_lengths(tokenizer, prompts), dtype=float)
            shares[label][name] = 100 * float((lengths <= max_tokens).mean())
            if label == "default instruction":
                shares.setdefault("tokens", {})[name] = (
                    f"{lengths.mean():.1f} / {np.median(lengths):g} / "
                    f"{np.percentile(lengths, 95):g}")
    return shares


def stats_rows(groups: dict[str, list[Pair]], shares: dict[str, dict[str, float]]
               ) -> list[str]:
    labels = [label for label in shares if label != "tokens"]
    rows = ["| set | pairs | input words mean / median / p95 | docstring words mean / median "
            "/ p95 | docstring sentences mean | docstring verbatim in input | prompt tokens "
            "mean / median / p95 | "
            + " | ".join(f"fits 400 tokens ({label})" for label in labels) + " |",
            "|---|---|---|---|---|---|---|" + "---|" * len(labels)]
    for name, pairs in groups.items():
        i = word_stats(p.code for p in pairs)
        o = word_stats(p.doc for p in pairs)
        n = max(len(pairs), 1)
        sent = sum(sentences(p.doc) for p in pairs) / n
        verbatim = sum(p.doc.casefold() in p.code.casefold() for p in pairs)
        rows.append(f"| {name} | {len(pairs)} | {i['mean']} / {i['median']:g} / {i['p95']:g} | "
                    f"{o['mean']} / {o['median']:g} / {o['p95']:g} | {sent:.2f} | "
                    f"{100 * verbatim / n:.1f}% | {shares['tokens'][name]} | "
                    + " | ".join(f"{shares[label][name]:.1f}%" for label in labels) + " |")
    return rows


def provenance(args, sources: list[dict], steps: list[tuple[str, int]],
               groups: dict[str, list[Pair]], shares: dict, files: dict[str, Path]) -> str:
    count_rows = ["| step | count |", "|---|---|"] + [f"| {n} | {c} |" for n, c in steps]
    file_rows = ["| file | pairs | bytes | sha256 |", "|---|---|---|---|"] + [
        f"| `{path.name}` | {len(groups['sample ' + split])} | {path.stat().st_size} | "
        f"`{sha256_file(path)}` |" for split, path in files.items()]
    by_package = {s["name"]: 0 for s in sources}
    for p in groups["full"]:
        by_package[p.package] += 1
    package_rows = [
        "| package | version | license read | `.py` read / in the .deb | pairs (full set) "
        "| notices | .deb sha256 (= apt's list) |", "|---|---|---|---|---|---|---|"] + [
        f"| `{s['name']}` | {s['version']} | {s['license']} | {s['read']} / {s['py']} | "
        f"{by_package[s['name']]} | `LICENSES/{s['notice']}` | `{s['sha256']}` |"
        for s in sources]
    sample_train, sample_test = len(groups["sample train"]), len(groups["sample test"])
    psf_pairs = sum(n for s in sources for name, n in by_package.items()
                    if name == s["name"] and s["license"] == "PSF-2.0")
    return "\n".join([
        "# Python functions → docstrings",
        "",
        "A second task data set for lastmile whose references are several sentences long (as",
        "the paper's samsum summaries are; the default Debian synopses are one line): summarise",
        "a Python function's source code into its docstring (code → documentation, as in",
        "CodeSearchNet). Records are",
        '`{"id": module.qualname, "input": source without the docstring, "output": docstring}`.',
        "",
        "## Why this source",
        "",
        "Candidates weighed (no internet here, only the PyPI, Debian and npm registries): (a) the",
        "CPython standard library, (b) paired text inside Debian packages, (c) a PyPI package",
        "that ships a summarization corpus. The paired text Debian packages carry is one line",
        "on the summary side (package synopses, man-page NAME lines, AppStream summaries). The",
        "one PyPI package found shipping a summarization corpus, ACLSum (MIT), holds 247 full",
        "papers: too long for a 400-token prompt, and its abstract -> 3-sentence aspect summary",
        "pairs would be too few. (a) gives a natural task whose references people wrote for",
        "this purpose and which, once the docstring is cut from the input, are not copied from",
        f"it; but the standard library alone gives {psf_pairs} pairs after the filters below, so",
        "the same extraction also reads permissively licensed (BSD, MIT/Expat) Python",
        "libraries that Debian packages, each file's license taken from the package's copyright",
        "file. Inputs are code, not prose: they count more tokens per word than English.",
        "",
        "## Source",
        "",
        "Debian bookworm `main`, from `deb.debian.org`: each pinned `.deb` was fetched with "
        "`apt-get download`, its sha256 checked against the `SHA256` of apt's package list "
        "(which apt verified against the signed InRelease), and unpacked with `dpkg-deb -x`.",
        "",
        *package_rows,
        "",
        f"Built {sources[0]['built']} with:",
        "",
        "```bash",
        "apt-get update",
        f".venv/bin/python scripts/build_python_dataset.py --train {args.train} "
        f"--test {args.test} --seed {args.seed}",
        "```",
        "",
        "## Processing",
        "",
        f"- Files: every `*.py` under `{STDLIB}` (standard library) or `{DIST}` of the "
        f"package, except paths with a part in {sorted(SKIP_PARTS)} (tests, vendored "
        "third-party code, caches), and files whose license is not in "
        f"{sorted(ALLOWED_LICENSES)}: a machine-readable copyright file's last `Files:` stanza "
        "that matches the path decides (e.g. `django/utils/ipv6.py`, Apache-2.0, is left "
        "out); a file no stanza names has the package's license. The CPython packages' files "
        "are read whole: their copyright file gives Lib/ files other than PSF-2.0 (logging, "
        "multiprocessing, sqlite3, asyncore/asynchat, tarfile, turtle) permissive licenses "
        "that ask only for the notice, which LICENSES/ keeps.",
        "- Functions: every `def` / `async def` found by `ast` (methods and nested functions "
        "too; id `module.Class.method`, `module.f.<locals>.g`) whose body starts with a "
        "docstring on lines of its own. Files that are not UTF-8 Python 3 are skipped.",
        "- Input: the function's source lines from its first decorator to its last line with "
        "the docstring's lines (and blank lines right after it) removed, dedented "
        "(`textwrap.dedent`). Comments and nested functions' docstrings stay.",
        "- Output: the docstring (`ast.get_docstring`, i.e. `inspect.cleandoc`) cut at the "
        "first paragraph that is not prose (a doctest, list, field list, reST directive, a line "
        "ending in `:` such as `Args:`, or any indented line: numpydoc sections, signatures, "
        "tables), paragraphs joined with one space, whitespace collapsed.",
        f"- Kept when: the output has {MIN_SENTENCES}-{MAX_SENTENCES} sentences (a sentence "
        "ends at `.`, `!` or `?` followed by a space and a capital, quote or bracket), starts "
        f"with a capital, ends with `.`, has {MIN_OUTPUT_WORDS}-{MAX_OUTPUT_WORDS} words; the "
        f"body keeps at least {MIN_CODE_LINES} lines that are not blank, comments, `pass`, "
        "`...`, `return`, `return None` or `raise NotImplementedError`; the input has "
        f"at least {MIN_INPUT_WORDS} whitespace words and at most {MAX_INPUT_CHARS} characters "
        "(code runs ~2.7 characters per SmolLM2 token, so the bound keeps ~99% of prompts "
        "within 400 tokens whatever the tokenizer's take on indentation).",
        "- Deduplicated, in id order (the first kept): by output, then by input, both after "
        "case folding and collapsing whitespace (copies such as `_pyio`/`io`, "
        "`setuptools._distutils`/`distutils` and overrides share docstrings), then by id.",
        f"- Split: `lastmile.data.split_of(input, {TEST_FRACTION})`, a sha256 of the "
        "whitespace-normalised input (the hash split lastmile applies to unsplit data; 0.15, "
        "not the Debian set's 0.1, so that the test side holds 500).",
        "- Sample: in each split, the first N pairs ranked by sha256 of "
        f"`\"{args.seed}:<id>\"`; written sorted by id, gzip without file name or mtime "
        "(byte-reproducible).",
        "",
        "## Counts",
        "",
        *count_rows,
        "",
        "## Lengths (whitespace words) and the token budget",
        "",
        "`prompt tokens`: the input in its prompt (`lastmile.data.format_prompt`: "
        "SmolLM2-135M-Instruct's chat template, the default instruction; 50 tokens without the "
        "input). `fits 400 tokens`: the share of prompts, with the default or the paper "
        "profile's instruction, of at most 400 tokens, the budget `lastmile.data` filters on "
        "(§4.2).",
        "",
        *stats_rows(groups, shares),
        "",
        "## Files",
        "",
        *file_rows,
        "",
        "## License",
        "",
        f"The {sample_train + sample_test} pairs are excerpts (a function's code and its "
        "docstring) of the packages above, each under the license in its row: the Python "
        "Software Foundation License Agreement for Python 3.11 (PSF-2.0; Copyright © 2001-2023 "
        "Python Software Foundation; All Rights Reserved) for the standard library, the BSD 2- "
        "or 3-clause or the MIT (Expat) license for the others. All permit redistributing "
        "modified copies provided that the copyright notices and license texts are kept: "
        "`LICENSES/<package>.copyright` holds each package's Debian copyright file verbatim "
        "(notices, license texts, file-level exceptions; packages with the same file share "
        "one, as the `notices` column says). Each record's `id` names its module, "
        "hence its package. No other source is included.",
        "",
    ])


# ----------------------------------------------------------------------------- main

def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, default=REPO / "data" / "python-docstrings")
    ap.add_argument("--debs", type=Path, help="directory of the .debs (default: a temporary "
                    "one; missing ones are downloaded with apt-get download)")
    ap.add_argument("--train", type=int, default=3000)
    ap.add_argument("--test", type=int, default=500)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)

    built = dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    counts = {k: 0 for k in ("py", "skipped", "license", "unparsed", "functions",
                             "with a docstring", "docstring own lines")}
    sources, extracted, copyrights = [], [], {}
    with tempfile.TemporaryDirectory() as tmp:
        debs = args.debs or Path(tmp) / "debs"
        debs.mkdir(parents=True, exist_ok=True)
        for pkg in PACKAGES:
            record = apt_record(pkg)
            deb = fetch_deb(pkg, record, debs)
            tree = Path(tmp) / pkg.name
            subprocess.run(["dpkg-deb", "-x", str(deb), str(tree)], check=True)
            py_before = counts["py"]
            copyrights[pkg.name] = copyright_of(pkg, tree, copyrights)
            files = package_files(pkg, tree, copyrights[pkg.name], counts)
            extracted += extract(pkg.name, files, counts)
            # one notices file per distinct copyright text, named after its first package
            first = next(n for n, t in copyrights.items() if t == copyrights[pkg.name])
            sources.append({"name": pkg.name, "version": pkg.version, "license": pkg.license,
                            "sha256": record["SHA256"], "py": counts["py"] - py_before,
                            "read": len(files), "notice": f"{first}.copyright",
                            "built": built})
    read = sum(s["read"] for s in sources)
    steps = [("`.py` files in the packages' Python directories", counts["py"]),
             ("outside tests, vendored code and caches, not symlinks",
              counts["py"] - counts["skipped"]),
             ("under an allowed license (read)", read),
             ("parsed as UTF-8 Python 3", read - counts["unparsed"]),
             ("functions and methods in them", counts["functions"]),
             ("with a docstring", counts["with a docstring"]),
             ("docstring on lines of its own", counts["docstring own lines"])]
    pairs, filter_steps = filter_pairs(extracted)
    steps += filter_steps
    sides = {s: [p for p in pairs if split_of(p.code, TEST_FRACTION) == s]
             for s in ("train", "test")}
    chosen = {"train": sample(sides["train"], args.train, args.seed, lambda p: p.id),
              "test": sample(sides["test"], args.test, args.seed, lambda p: p.id)}
    out_files = {s: args.out / f"{s}.jsonl.gz" for s in chosen}
    for s, path in out_files.items():
        write_gz_jsonl(path, chosen[s])
    licenses = args.out / "LICENSES"
    shutil.rmtree(licenses, ignore_errors=True)
    licenses.mkdir(parents=True)
    for name in {s["notice"] for s in sources}:
        (licenses / name).write_text(copyrights[name.removesuffix(".copyright")],
                                     encoding="utf-8")
    groups = {"full": pairs, "full train": sides["train"], "full test": sides["test"],
              "sample train": chosen["train"], "sample test": chosen["test"]}
    shares = fit_shares(groups, DataConfig().max_input_tokens)
    text = provenance(args, sources, steps, groups, shares, out_files)
    with atomic_path(args.out / "PROVENANCE.md") as tmp_path:
        tmp_path.write_text(text, encoding="utf-8")
    print(text[text.index("## Source"):text.index("## License")])
    return 0


if __name__ == "__main__":
    sys.exit(main())
