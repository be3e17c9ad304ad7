#!/usr/bin/env python3
"""Build the bundled summarization dataset: Debian package long descriptions -> synopses.

An extreme-summarization task in the spirit of xsum: the input is a package's long description
(a few paragraphs), the reference output its one-line synopsis. The source is Debian bookworm's
main component, English descriptions (`Translation-en`), which apt fetches with

    apt-get update -o Acquire::Languages=en

(root and the Debian mirror needed; `--no-update` reuses the lists already present). The list
is verified against the sha256 in the suite's InRelease (whose signature apt has checked).

    .venv/bin/python scripts/build_debian_dataset.py            # rebuild data/debian-descriptions

Writes train.jsonl.gz / test.jsonl.gz (byte-reproducible: gzip without name or mtime) and
PROVENANCE.md into the output directory, and prints the statistics recorded there. Neither the
tests nor `make run` need this script; its output is committed.
"""

from __future__ import annotations

import argparse
import datetime as dt
import hashlib
import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "scripts"))

from lastmile.data import split_of, word_stats  # noqa: E402
from lastmile.io import atomic_path, sha256_file, write_reproducible_jsonl_gz  # noqa: E402
from bundling import dedupe, normalised, sample  # noqa: E402

LISTS = Path("/var/lib/apt/lists")
SUITE = "bookworm"
LIST_GLOB = f"*_debian_dists_{SUITE}_main_i18n_Translation-en*"
RELEASE_GLOB = f"*_debian_dists_{SUITE}_InRelease"
APT_UPDATE = ["apt-get", "update", "-o", "Acquire::Languages=en"]
APT_CAT = "/usr/lib/apt/apt-helper"

MIN_WORDS = 20
TEST_FRACTION = 0.1
#: Packages that carry no description of their own: transitional/dummy/debug packages.
SYNOPSIS_EXCLUDE = re.compile(
    r"\btransitional\b|\btransition (dummy )?package\b|\bdummy\b|\bdebug(ging)? symbols\b", re.I)
NAME_EXCLUDE = re.compile(r"-dbg(sym)?$")
BODY_EXCLUDE = re.compile(r"\b(transitional|dummy) package\b", re.I)


@dataclass
class Pair:
    package: str
    synopsis: str
    description: str
    md5: str


# ----------------------------------------------------------------------------- source

def find_one(lists: Path, pattern: str) -> Path:
    found = sorted(lists.glob(pattern))
    found = [p for p in found if not p.name.endswith((".diff", ".partial"))]
    if len(found) != 1:
        sys.exit(f"expected one {pattern} in {lists}, found {[p.name for p in found]}; "
                 f"run: {' '.join(APT_UPDATE)}")
    return found[0]


def read_list(path: Path) -> bytes:
    """The uncompressed list (apt stores it lz4/xz/gz-compressed, whichever it fetched)."""
    return subprocess.run([APT_CAT, "cat-file", str(path)], check=True,
                          capture_output=True).stdout


def release_info(release: Path) -> tuple[str, str]:
    """(Date, sha256 of main/i18n/Translation-en) from the suite's InRelease."""
    text = release.read_text(encoding="utf-8")
    date = re.search(r"^Date: (.+)$", text, re.M).group(1)
    sha_section = text.split("\nSHA256:\n", 1)[1]
    digest = re.search(r"^ ([0-9a-f]{64})\s+\d+ main/i18n/Translation-en$", sha_section, re.M)
    return date, digest.group(1)


# ----------------------------------------------------------------------------- parsing

def stanzas(text: str):
    """deb822 stanzas as {field: value}; continuation lines kept with their leading space."""
    for block in text.split("\n\n"):
        fields: dict[str, str] = {}
        key = None
        for line in block.split("\n"):
            if line.startswith((" ", "\t")) and key is not None:
                fields[key] += "\n" + line
            elif ":" in line:
                key, _, value = line.partition(":")
                fields[key] = value.strip()
        if fields:
            yield fields


BULLET = re.compile(r"^([-*+o\u2022]|\d+[.)])\s")


def long_description(lines: list[str]) -> str:
    """Debian's description markup as plain text (Debian Policy §5.6.13).

    " ." separates paragraphs (one newline between them here); a line indented by one space is
    wrapped prose and is joined to the previous one; a line indented by two or more spaces is
    shown verbatim (lists, code) and starts a new line, except that a list item's wrapped
    continuation (indented deeper than the item's marker, no marker of its own) is joined to
    the item. Leading spaces are stripped.
    """
    paragraphs: list[list[str]] = [[]]
    item_indent = None  # indentation of the list item being continued, if any
    verbatim_before = False
    for raw in lines:
        text = raw.strip()
        if text == ".":
            paragraphs.append([])
            item_indent, verbatim_before = None, False
            continue
        if not text:
            continue
        indent = len(raw) - len(raw.lstrip(" "))
        current = paragraphs[-1]
        continues_item = item_indent is not None and indent > item_indent
        if indent >= 2 and BULLET.match(text):
            current.append(text)
            item_indent = indent
        elif continues_item or (indent < 2 and current and not verbatim_before):
            current[-1] += " " + text  # a list item's continuation, or wrapped prose
        else:
            current.append(text)  # verbatim, or prose after verbatim: a new line
            item_indent = None
        verbatim_before = indent >= 2
    return "\n".join("\n".join(p) for p in paragraphs if p)


def parse(text: str) -> list[Pair]:
    pairs = []
    for f in stanzas(text):
        lines = f.get("Description-en", "").split("\n")
        pairs.append(Pair(f.get("Package", ""), lines[0].strip(), long_description(lines[1:]),
                          f.get("Description-md5", "")))
    return pairs


# ----------------------------------------------------------------------------- filtering

def excluded(p: Pair) -> bool:
    return bool(SYNOPSIS_EXCLUDE.search(p.synopsis) or NAME_EXCLUDE.search(p.package)
                or BODY_EXCLUDE.search(p.description))


def filter_pairs(pairs: list[Pair]) -> tuple[list[Pair], list[tuple[str, int]]]:
    """Apply the filters in order; returns the kept pairs and (step, count after it)."""
    steps = [("stanzas in Translation-en", pairs)]
    pairs = sorted(pairs, key=lambda p: (p.package, p.md5))  # first = alphabetical, stable
    pairs = [p for p in pairs if p.package and p.synopsis and p.description]
    steps.append(("with a package name, synopsis and long description", pairs))
    pairs = [p for p in pairs if not excluded(p)]
    steps.append(("not transitional / dummy / debug-symbol packages", pairs))
    pairs = [p for p in pairs if len(p.description.split()) >= MIN_WORDS]
    steps.append((f"long description of at least {MIN_WORDS} words", pairs))
    pairs = dedupe(pairs, lambda p: (normalised(p.synopsis), normalised(p.description)))
    steps.append(("distinct (synopsis, description) after normalising case and spaces", pairs))
    pairs = dedupe(pairs, lambda p: normalised(p.description))
    steps.append(("distinct description (first package name kept)", pairs))
    pairs = dedupe(pairs, lambda p: p.package)
    steps.append(("distinct package name (ids are package names)", pairs))
    return pairs, [(name, len(ps)) for name, ps in steps]


# ----------------------------------------------------------------------------- sample

def write_gz_jsonl(path: Path, pairs: list[Pair]) -> None:
    write_reproducible_jsonl_gz(path, ({"id": p.package, "input": p.description,
                                        "output": p.synopsis} for p in pairs))


# ----------------------------------------------------------------------------- report

def stats_rows(groups: dict[str, list[Pair]]) -> list[str]:
    rows = ["| set | pairs | input words mean / median / p95 | synopsis words mean / median "
            "/ p95 | synopsis verbatim in input |", "|---|---|---|---|---|"]
    for name, pairs in groups.items():
        i = word_stats(p.description for p in pairs)
        o = word_stats(p.synopsis for p in pairs)
        verbatim = sum(p.synopsis.casefold() in p.description.casefold() for p in pairs)
        rows.append(f"| {name} | {len(pairs)} | {i['mean']} / {i['median']:g} / {i['p95']:g} | "
                    f"{o['mean']} / {o['median']:g} / {o['p95']:g} | "
                    f"{100 * verbatim / max(len(pairs), 1):.1f}% |")
    return rows


def provenance(args, source: dict, steps: list[tuple[str, int]], groups: dict[str, list[Pair]],
               files: dict[str, Path]) -> str:
    count_rows = ["| step | pairs |", "|---|---|"] + [f"| {n} | {c} |" for n, c in steps]
    file_rows = ["| file | pairs | bytes | sha256 |", "|---|---|---|---|"] + [
        f"| `{name}` | {len(groups['sample ' + split])} | {path.stat().st_size} | "
        f"`{sha256_file(path)}` |" for split, (name, path) in
        zip(("train", "test"), ((p.name, p) for p in files.values()))]
    return "\n".join([
        "# Debian package descriptions → synopses",
        "",
        "The default task data of lastmile: summarise a Debian package's long description into",
        "its one-line synopsis (an extreme-summarization task like xsum). Records are",
        '`{"id": package name, "input": long description, "output": synopsis}`.',
        "",
        "## Source",
        "",
        f"- Debian {SUITE} (`{source['suite']}`), component `main`, English descriptions "
        "(`Translation-en`), from `deb.debian.org`.",
        f"- Release file `{source['release_name']}`, Date: {source['release_date']}.",
        f"- List file `{source['list_name']}` ({source['list_bytes']} bytes compressed), sha256 "
        f"`{source['list_sha256']}`.",
        f"- Uncompressed `main/i18n/Translation-en`: {source['text_bytes']} bytes, sha256 "
        f"`{source['text_sha256']}`, equal to the sha256 listed in the InRelease: "
        f"{'yes' if source['verified'] else 'NO'}.",
        f"- Built {source['built']} with:",
        "",
        "```bash",
        " ".join(APT_UPDATE),
        f".venv/bin/python scripts/build_debian_dataset.py --train {args.train} "
        f"--test {args.test} --seed {args.seed}",
        "```",
        "",
        "## Processing",
        "",
        "- Each deb822 stanza gives `Package`, `Description-md5` and `Description-en`; the first "
        "line of `Description-en` is the synopsis (output), the continuation lines the long "
        "description (input).",
        "- Long description to plain text (Debian Policy §5.6.13): a ` .` line separates "
        "paragraphs (one newline between paragraphs); lines indented by one space are wrapped "
        "prose and are joined with a space; lines indented by two or more spaces are verbatim "
        "(lists, code) and keep their own line, except a list item's wrapped continuation "
        "(deeper than the item's marker, no marker of its own), which is joined to the item; "
        "leading spaces are stripped.",
        f"- Dropped: packages whose synopsis matches `{SYNOPSIS_EXCLUDE.pattern}`, whose name "
        f"matches `{NAME_EXCLUDE.pattern}` or whose description matches "
        f"`{BODY_EXCLUDE.pattern}` (case-insensitive; transitional, dummy and debug-symbol "
        f"packages); long descriptions under {MIN_WORDS} words.",
        "- Deduplicated, in package-name order (the first kept): by (synopsis, description) and "
        "then by description alone, both after case folding and collapsing whitespace (many "
        "packages of one source share a description), then by package name.",
        f"- Split: `lastmile.data.split_of(input, {TEST_FRACTION})`, a sha256 of the "
        "whitespace-normalised input (the same hash split lastmile applies to unsplit data).",
        "- Sample: in each split, the first N pairs ranked by sha256 of "
        f"`\"{args.seed}:<package>\"`; written sorted by package name, gzip without file name "
        "or mtime (byte-reproducible).",
        "",
        "## Counts",
        "",
        *count_rows,
        "",
        "## Lengths (whitespace words)",
        "",
        *stats_rows(groups),
        "",
        "## Files",
        "",
        *file_rows,
        "",
        "## License",
        "",
        "The descriptions are part of each package's metadata in the Debian archive and are "
        "distributed under the DFSG-free licenses of the respective packages (see each "
        "package's `/usr/share/doc/<package>/copyright`). Attribution: Debian package "
        "maintainers and upstream authors; the Debian Description Translation Project serves "
        "the `Translation-en` files. Only descriptions and synopses are included; no package "
        "contents.",
        "",
    ])


# ----------------------------------------------------------------------------- main

def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, default=REPO / "data" / "debian-descriptions")
    ap.add_argument("--lists", type=Path, default=LISTS, help="apt's list directory")
    ap.add_argument("--train", type=int, default=3000)
    ap.add_argument("--test", type=int, default=500)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--no-update", action="store_true", help="skip apt-get update")
    ap.add_argument("--full", type=Path, help="also write every filtered pair to this .jsonl.gz")
    args = ap.parse_args(argv)

    if not args.no_update:
        subprocess.run(APT_UPDATE, check=True, stdout=subprocess.DEVNULL)
    list_path, release = find_one(args.lists, LIST_GLOB), find_one(args.lists, RELEASE_GLOB)
    raw = read_list(list_path)
    release_date, expected = release_info(release)
    suite = re.search(r"^Suite: (.+)$", release.read_text(encoding="utf-8"), re.M).group(1)
    source = {"suite": suite, "release_name": release.name, "release_date": release_date,
              "list_name": list_path.name, "list_bytes": list_path.stat().st_size,
              "list_sha256": sha256_file(list_path), "text_bytes": len(raw),
              "text_sha256": hashlib.sha256(raw).hexdigest(),
              "built": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")}
    source["verified"] = source["text_sha256"] == expected
    if not source["verified"]:
        sys.exit(f"{list_path.name}: sha256 {source['text_sha256']} differs from the InRelease "
                 f"({expected}); run apt-get update again")

    pairs, steps = filter_pairs(parse(raw.decode("utf-8")))
    sides = {s: [p for p in pairs if split_of(p.description, TEST_FRACTION) == s]
             for s in ("train", "test")}
    chosen = {"train": sample(sides["train"], args.train, args.seed, lambda p: p.package),
              "test": sample(sides["test"], args.test, args.seed, lambda p: p.package)}
    files = {s: args.out / f"{s}.jsonl.gz" for s in chosen}
    for s, path in files.items():
        write_gz_jsonl(path, chosen[s])
    if args.full:
        write_gz_jsonl(args.full, pairs)
    groups = {"full": pairs, "full train": sides["train"], "full test": sides["test"],
              "sample train": chosen["train"], "sample test": chosen["test"]}
    text = provenance(args, source, steps, groups, files)
    with atomic_path(args.out / "PROVENANCE.md") as tmp:
        tmp.write_text(text, encoding="utf-8")
    print(text[text.index("## Counts"):text.index("## License")])
    return 0


if __name__ == "__main__":
    sys.exit(main())
