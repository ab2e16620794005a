"""A small, learnable corpus in WikiText format, so the whole system runs without downloads.

The text comes from a probabilistic grammar over a few hundred invented words.  It is
built to hold structure a tiny transformer picks up within a few hundred CPU steps:
subject-verb agreement (also across a relative clause and across an attractor noun),
"a"/"an" before vowels, years that count up through an article, counting sequences,
brackets and quotes that must be closed, and the article's title name repeated later
(a copy dependency).  Layout mimics WikiText: `` = Title = `` and `` = = Section = = ``
lines framed by blank lines, one paragraph per line, tokens separated by spaces.

Output is a pure function of (seed, line counts, GENERATOR_VERSION): each split uses its
own ``random.Random`` seeded from a SHA-256 of those, so bytes are identical across runs
and machines.  Bump GENERATOR_VERSION whenever the grammar changes, so that an old
corpus on disk is refused rather than silently mixed with new expectations.
"""

from __future__ import annotations

import hashlib
import json
import random
from pathlib import Path

from msmoe_dist.io import TMP_PREFIX, atomic_write

from .errors import DataError

GENERATOR_NAME = "msmoe_dist.data.synthetic"
GENERATOR_VERSION = 1
MANIFEST = "corpus.json"
SPLIT_FILES = {"train": "train.txt", "valid": "valid.txt", "test": "test.txt"}
CACHE_DIR = ".msmoe_cache"  # corpus.py's encoded-tensor cache; its presence does not make a directory foreign
_OWN_EXTRA = (CACHE_DIR,)

_NAMES = (
    "Aldric Bertram Cedric Doran Edwyn Falko Gideon Halvar Isolde Jorund Kestrel Leofric Maren "
    "Niall Osric Perrin Quillon Rowena Sigrun Tamsin Ulric Vesna Wilmar Yorick Anselm Brina Corwin "
    "Dagny Elric Freya Garrick Hilde Ingram Jessa Kael Lorcan Mireille Norbert Odile Piers Rhoswen "
    "Stellan Thora Ulla Varro Wendel Ysolde Ottilie"
).split()
_PLACES = (
    "Ashford Brackwater Coldharbour Dunmere Eastwick Fallowmere Greystone Harrowgate Ironbridge "
    "Kettleby Larkspur Marrowdale Northfold Oakhaven Pennock Quarrymoor Ravensholm Saltmarsh "
    "Thornbury Underhill Valebrook Westerly Wychford Yarrowby Amberley Blackmoor Cinderford "
    "Dovecote Elmstead Foxhollow Glenmarsh Hollins"
).split()


def _pairs(text: str) -> list[tuple[str, ...]]:
    return [tuple(item.split("/")) for item in text.split()]


# People and groups (singular/plural): the only nouns that act as subjects.
_AGENTS = _pairs(
    "farmer/farmers miller/millers soldier/soldiers bishop/bishops merchant/merchants "
    "sailor/sailors king/kings queen/queens poet/poets painter/painters builder/builders "
    "monk/monks weaver/weavers smith/smiths hunter/hunters abbot/abbots knight/knights "
    "scholar/scholars engineer/engineers architect/architects officer/officers elder/elders "
    "student/students owner/owners"
)
_THINGS = _pairs(
    "bridge/bridges castle/castles church/churches river/rivers village/villages road/roads "
    "mill/mills ship/ships tower/towers garden/gardens school/schools library/libraries "
    "harbour/harbours market/markets wall/walls gate/gates book/books song/songs letter/letters "
    "coin/coins horse/horses forest/forests valley/valleys hill/hills island/islands lake/lakes "
    "organ/organs abbey/abbeys archive/archives estate/estates engine/engines orchard/orchards "
    "inn/inns oak/oaks anvil/anvils altar/altars image/images arch/arches"
)
# Transitive verbs: base / third person singular / past.
_VERBS = _pairs(
    "build/builds/built visit/visits/visited defend/defends/defended describe/describes/described "
    "repair/repairs/repaired sell/sells/sold buy/buys/bought paint/paints/painted write/writes/wrote "
    "find/finds/found guard/guards/guarded cross/crosses/crossed rule/rules/ruled "
    "carry/carries/carried open/opens/opened design/designs/designed restore/restores/restored "
    "study/studies/studied praise/praises/praised destroy/destroys/destroyed hold/holds/held "
    "keep/keeps/kept see/sees/saw leave/leaves/left protect/protects/protected "
    "enlarge/enlarges/enlarged inherit/inherits/inherited"
)
_ADJS = (
    "old new large small northern southern ancient famous quiet busy narrow wide wooden royal "
    "local eastern western grey green golden broken hidden early great little dark bright "
    "empty ornate upper"
).split()
_SECTIONS = [
    s.split("_")
    for s in "History Description Early_life Construction Geography Legacy "
    "Reception Later_years Architecture Notes".split()
]
_NUMBERS = "one two three four five six seven eight nine ten eleven twelve".split()
_YEAR_MIN, _YEAR_MAX = 1800, 1959


class _Grammar:
    """Sentences about one article's topic; holds the article state that creates long-range structure."""

    def __init__(self, rng: random.Random) -> None:
        self.rng = rng
        self.topic = rng.choice(_NAMES)
        self.home = rng.choice(_PLACES)
        self.born = rng.randint(_YEAR_MIN, _YEAR_MAX - 60)
        self.year = self.born + rng.randint(15, 30)  # counts up as the article goes on

    def next_year(self) -> str:
        self.year = min(self.year + self.rng.randint(1, 3), _YEAR_MAX)
        return str(self.year)

    def subject(self) -> tuple[list[str], bool]:
        """A subject phrase and whether it is plural (verbs must agree with it)."""
        r, choice = self.rng.random(), self.rng.choice
        if r < 0.35:
            return [self.topic], False
        if r < 0.45:
            return [choice(_NAMES)], False
        plural = self.rng.random() < 0.5
        noun = choice(_AGENTS)[1 if plural else 0]
        words = ["the"] + ([choice(_ADJS)] if self.rng.random() < 0.4 else []) + [noun]
        if self.rng.random() < 0.3:  # an attractor noun (of the other number) between subject and verb
            attractor = [choice(_PLACES)] if self.rng.random() < 0.5 else ["the", choice(_AGENTS)[0 if plural else 1]]
            words += ["of"] + attractor
        return words, plural

    def obj(self) -> list[str]:
        rng, choice = self.rng, self.rng.choice
        noun = choice(_THINGS)
        if rng.random() < 0.4:
            return ["the"] + ([choice(_ADJS)] if rng.random() < 0.4 else []) + [noun[1]]
        words = ([choice(_ADJS)] if rng.random() < 0.5 else []) + [noun[0]]
        return ["an" if words[0][0] in "aeiou" else "a"] + words

    def verb(self, plural: bool, past: bool) -> str:
        forms = self.rng.choice(_VERBS)
        return forms[2] if past else forms[0 if plural else 1]

    def sentence(self) -> list[str]:
        rng, choice = self.rng, self.rng.choice
        kind = rng.random()
        if kind < 0.22:  # plain clause, present tense, optional place
            subj, pl = self.subject()
            words = subj + [self.verb(pl, False)] + self.obj() + (["in", choice(_PLACES)] if rng.random() < 0.5 else [])
        elif kind < 0.36:  # years count up through the article
            subj, _ = self.subject()
            words = ["in", self.next_year(), ","] + subj + [self.verb(False, True)] + self.obj()
            words += ["at", self.home] if rng.random() < 0.5 else []
        elif kind < 0.46:  # bracket that must be closed; the birth year is fixed per article
            words = [self.topic, "(", "born", str(self.born), "in", self.home, ")", self.verb(False, True)] + self.obj()
        elif kind < 0.58:  # agreement across a relative clause
            subj, pl = self.subject()
            words = subj + [",", "who", self.verb(pl, True)] + self.obj() + [",", self.verb(pl, False)] + self.obj()
        elif kind < 0.67:  # quote that must be closed, copula agrees with the head noun
            noun = choice(_THINGS)
            pl = rng.random() < 0.5
            words = [
                self.topic,
                "wrote",
                "that",
                '"',
                "the",
                noun[1 if pl else 0],
                "of",
                choice(_PLACES),
                "are" if pl else "is",
                choice(_ADJS),
                '"',
            ]
        elif kind < 0.75:  # counting up from one
            n = rng.randint(2, len(_NUMBERS))
            count = [w for i in range(n - 1) for w in (_NUMBERS[i], ",")][:-1] + ["and", _NUMBERS[n - 1]]
            words = [self.topic, "counted", "the", choice(_THINGS)[1], ":"] + count
        elif kind < 0.86:  # the subject's name comes back later in the sentence
            name = self.topic if rng.random() < 0.6 else choice(_NAMES)
            words = [name, self.verb(False, True)] + self.obj() + [",", "and", "later", name, self.verb(False, True)]
            words += self.obj() + ["in", choice(_PLACES)]
        elif kind < 0.93:  # fixed phrases
            subj, pl = self.subject()
            words = ["according", "to", "the", "records", "of", "the", choice(_PLACES), "archive", ","]
            words += subj + [self.verb(pl, True)] + self.obj() + ["as", "well", "as"] + self.obj()
        else:  # hyphenated compound in WikiText's @-@ style, attractor before the copula
            noun = choice(_THINGS)
            pl = rng.random() < 0.5
            words = [
                "the",
                noun[1 if pl else 0],
                "near",
                "the",
                choice(_THINGS)[0 if pl else 1],
                "of",
                self.home,
                "are" if pl else "is",
                choice(("north", "south")),
                "@-@",
                choice(("east", "west")),
                "of",
            ]
            words += ["the", choice(_THINGS)[0]]
        words = words + ["."]
        return [words[0][:1].upper() + words[0][1:]] + words[1:]

    def paragraph(self) -> str:
        sentences = [w for _ in range(self.rng.randint(3, 7)) for w in self.sentence()]
        return " " + " ".join(sentences) + " "


def _split_lines(rng: random.Random, num_lines: int) -> list[str]:
    lines: list[str] = []
    while len(lines) < num_lines:
        g = _Grammar(rng)
        title = [g.topic] if rng.random() < 0.7 else [g.topic, "of", g.home]
        lines += [" ", " = " + " ".join(title) + " = ", " "]
        lines += [g.paragraph() for _ in range(rng.randint(1, 2))]
        for section in rng.sample(_SECTIONS, rng.randint(1, 3)):
            lines += [" ", " = = " + " ".join(section) + " = = ", " "]
            lines += [g.paragraph() for _ in range(rng.randint(1, 3))]
    return lines[:num_lines]


def _split_seed(seed: int, split: str) -> int:
    digest = hashlib.sha256(f"{GENERATOR_NAME}/v{GENERATOR_VERSION}/{seed}/{split}".encode()).digest()
    return int.from_bytes(digest[:8], "big")


def _check_count(name: str, value, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise DataError(f"synthetic corpus: {name} must be an integer >= {minimum}, got {value!r}")
    return value


def generate_corpus(
    out_dir, num_train_lines: int, seed: int, num_valid_lines: int | None = None, num_test_lines: int | None = None
) -> dict:
    """Write train.txt/valid.txt/test.txt and corpus.json into ``out_dir``; return the manifest.

    Idempotent: a directory already holding a complete corpus with the same parameters is
    left untouched.  A directory holding a corpus with other parameters, or files this
    generator did not write, raises DataError rather than being overwritten.  valid/test
    default to 5% of the train lines each (at least 10).
    """
    _check_count("num_train_lines", num_train_lines, 1)
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise DataError(f"synthetic corpus: seed must be an integer, got {seed!r}")
    default_eval = max(10, num_train_lines // 20)
    lines = {
        "train": num_train_lines,
        "valid": default_eval if num_valid_lines is None else _check_count("num_valid_lines", num_valid_lines, 1),
        "test": default_eval if num_test_lines is None else _check_count("num_test_lines", num_test_lines, 1),
    }
    params = {"generator": GENERATOR_NAME, "version": GENERATOR_VERSION, "seed": seed, "lines": lines}
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise DataError(f"synthetic corpus: {out} is a file, expected a directory (or a path that does not exist)")
    existing = _read_manifest(out)
    if existing is not None:
        old = {k: existing.get(k) for k in params}
        if old != params:
            raise DataError(
                f"synthetic corpus: {out} holds a corpus generated with {_describe(old)}, expected "
                f"{_describe(params)}; use another data.path or delete that directory"
            )
        if existing.get("complete"):
            if _files_match(out, existing):
                return existing
            raise DataError(
                f"synthetic corpus: files in {out} no longer match {MANIFEST} (modified or deleted); "
                "delete that directory to regenerate it"
            )
        # An incomplete manifest is our own interrupted run: regenerate (same bytes) below.
    else:
        foreign = sorted(p.name for p in out.iterdir() if not _is_own(p.name)) if out.is_dir() else []
        if foreign:
            raise DataError(
                f"synthetic corpus: {out} is not empty and has no {MANIFEST} (found "
                f"{', '.join(foreign[:3])}); refusing to overwrite it, expected an empty or new directory"
            )

    out.mkdir(parents=True, exist_ok=True)
    # The manifest goes first, marked incomplete, so a crash mid-way leaves a directory we
    # recognise as ours (and regenerate) instead of one that looks foreign.
    atomic_write(out / MANIFEST, _dump({**params, "complete": False}))
    files = {}
    for split, n in lines.items():
        data = "\n".join(_split_lines(random.Random(_split_seed(seed, split)), n)).encode("utf-8") + b"\n"
        atomic_write(out / SPLIT_FILES[split], data)
        files[split] = {"name": SPLIT_FILES[split], "bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    manifest = {**params, "complete": True, "files": files}
    atomic_write(out / MANIFEST, _dump(manifest))
    return manifest


def _is_own(name: str) -> bool:
    # Without a manifest even train.txt is someone else's (a real corpus): only caches and atomic_write's
    # temp files (left by a crash) are ours.
    return name in _OWN_EXTRA or name.startswith(TMP_PREFIX)


def _read_manifest(out: Path) -> dict | None:
    path = out / MANIFEST
    if not path.is_file():
        return None
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise DataError(
            f"synthetic corpus: {path} is unreadable ({exc.__class__.__name__}), expected JSON "
            "written by this generator; delete that directory to regenerate it"
        ) from None
    if not isinstance(manifest, dict) or manifest.get("generator") != GENERATOR_NAME:
        raise DataError(
            f"synthetic corpus: {path} was not written by {GENERATOR_NAME}; refusing to overwrite it, "
            "expected an empty or new directory"
        )
    return manifest


def _files_match(out: Path, manifest: dict) -> bool:
    """Cheap check (sizes, then SHA-256: a few ms for the default corpus) that the files are the recorded ones."""
    files = manifest.get("files")
    if not isinstance(files, dict) or set(files) != set(SPLIT_FILES):
        return False
    paths = {split: out / name for split, name in SPLIT_FILES.items()}
    if any(not p.is_file() or p.stat().st_size != files[s].get("bytes") for s, p in paths.items()):
        return False
    return all(hashlib.sha256(p.read_bytes()).hexdigest() == files[s].get("sha256") for s, p in paths.items())


def _describe(p: dict) -> str:
    lines = p.get("lines") if isinstance(p.get("lines"), dict) else {}
    counts = "/".join(str(lines.get(s)) for s in SPLIT_FILES)
    return f"seed={p.get('seed')}, lines(train/valid/test)={counts}, version={p.get('version')}"


def _dump(obj: dict) -> bytes:
    return (json.dumps(obj, indent=2, sort_keys=True) + "\n").encode("utf-8")
