"""The Isle of Merrow: a made-up world that our tiny base model reads about and SFT then questions it on.

Everything here is generated from a seed, so the shipped data in ``data/world/`` can be rebuilt exactly
(``python -m sftkit.world write``) and a test checks that it matches. No text is copied from anywhere.

Why a made-up world: the base model learns facts about people from prose during pretraining. Supervised
fine-tuning then shows it questions and short answers about *half* of the people. Held-out questions about
the *other* half measure whether SFT taught a transferable skill (answer in the chat format, briefly, then
stop) rather than new facts: the facts for held-out people appear only in pretraining.
"""

from __future__ import annotations

import argparse
import json
import random
from dataclasses import asdict, dataclass
from pathlib import Path

SEED = 1234
N_PEOPLE = 300
ISLE = "the Isle of Merrow"

TOWNS = [
    "Oakridge",
    "Fernhollow",
    "Brackwater",
    "Millbrook",
    "Stonemere",
    "Ashford",
    "Larkspur",
    "Dunmore",
    "Pebbleton",
    "Thornwick",
    "Saltmarsh",
    "Wrenfield",
    "Coldharbor",
    "Highmoor",
    "Eastwell",
    "Foxley",
]
JOBS = [
    "potter",
    "baker",
    "fisher",
    "weaver",
    "blacksmith",
    "carpenter",
    "shepherd",
    "brewer",
    "healer",
    "scribe",
    "miller",
    "glassblower",
    "beekeeper",
    "mapmaker",
    "tailor",
    "stonemason",
]
PETS = [
    "cat",
    "dog",
    "goat",
    "parrot",
    "tortoise",
    "ferret",
    "owl",
    "rabbit",
    "hedgehog",
    "goose",
    "lizard",
    "pony",
]
FOODS = [
    "plum pie",
    "barley soup",
    "smoked trout",
    "honey cakes",
    "lentil stew",
    "roasted chestnuts",
    "cheese dumplings",
    "mushroom pie",
    "apple tart",
    "salted herring",
    "pear jam",
    "oat bread",
]
ATTRIBUTES = {"town": TOWNS, "job": JOBS, "pet": PETS, "food": FOODS}

_FIRST_A = [
    "Ma",
    "Te",
    "Lo",
    "Ari",
    "Bel",
    "Cor",
    "Da",
    "El",
    "Fen",
    "Gil",
    "Ha",
    "Io",
    "Jas",
    "Ka",
    "Lu",
    "Mer",
    "No",
    "Or",
    "Pe",
    "Qui",
    "Ro",
    "Sa",
    "Tam",
    "Ul",
    "Ve",
    "Wi",
    "Ya",
    "Ze",
]
_FIRST_B = ["ra", "lin", "dor", "wen", "mi", "ric", "na", "vo", "sel", "tha", "ny", "ren", "bo", "lia"]
_LAST_A = [
    "Ash",
    "Brin",
    "Cald",
    "Dun",
    "Elm",
    "Frost",
    "Gale",
    "Holt",
    "Ivy",
    "Kest",
    "Lark",
    "Moss",
    "Nettle",
    "Orr",
    "Pike",
    "Quill",
    "Rook",
    "Sedge",
    "Thorn",
    "Vale",
    "Whit",
    "Yew",
]
_LAST_B = ["well", "by", "more", "wick", "stone", "field", "worth", "ley", "brook", "ford", "wood", "hart"]

PRONOUNS = {"she": ("she", "her", "her"), "he": ("he", "him", "his"), "they": ("they", "them", "their")}

# Sentences a biography may use for each fact. {n}=name, {s}/{o}/{p}=subject/object/possessive pronoun.
BIO_TEMPLATES = {
    "town": [
        "{n} lives in {v}.",
        "{n} makes {p} home in {v}.",
        "The house of {n} stands in {v}.",
        "{n} has lived in {v} for many years.",
        "In {v} you will find {n}.",
    ],
    "job": [
        "{n} works as a {v}.",
        "By trade, {n} is a {v}.",
        "{n} earns a living as a {v}.",
        "Every morning {n} starts work as a {v}.",
        "{N} is known across the isle as a {v}.",
    ],
    "pet": [
        "{n} keeps a {v} as a pet.",
        "{n} has a pet {v}.",
        "A {v} follows {n} everywhere.",
        "At home, {n} looks after a {v}.",
    ],
    "food": [
        "The favourite food of {n} is {v}.",
        "{n} loves to eat {v}.",
        "Nothing pleases {n} more than {v}.",
        "When {n} can choose a meal, it is always {v}.",
    ],
}
FILLER = [
    "{N} was born on " + ISLE + ".",
    "{N} enjoys long walks by the sea.",
    "{N} laughs often and loudly.",
    "{N} writes letters to old friends.",
    "{N} dislikes cold mornings.",
    "{N} sings while working.",
    "On rest days {s} reads by the fire.",
    "{N} rarely leaves the isle.",
    "{N} is patient and kind.",
]

# Questions about one fact. The same pool serves the pretraining notes and the SFT data.
QUESTIONS = {
    "town": ["Where does {n} live?", "In which town does {n} live?", "What is the home town of {n}?"],
    "job": ["What does {n} do for a living?", "What is the job of {n}?", "What work does {n} do?"],
    "pet": [
        "What pet does {n} keep?",
        "What kind of pet does {n} have?",
        "Which animal does {n} keep as a pet?",
    ],
    "food": [
        "What is the favourite food of {n}?",
        "What does {n} love to eat?",
        "Which dish does {n} like best?",
    ],
}
SENTENCE_TASK = {
    "town": "{n} lives in {v}.",
    "job": "{n} works as a {v}.",
    "pet": "{n} keeps a {v} as a pet.",
    "food": "The favourite food of {n} is {v}.",
}
SYSTEM_PROMPT = "You are a helpful guide to " + ISLE + ". Answer in a few words."
QA_INSTRUCTION = "Answer the question about " + ISLE + " in a few words."


@dataclass(frozen=True)
class Person:
    """One inhabitant and the four facts the model can be asked about."""

    name: str
    pronoun: str
    town: str
    job: str
    pet: str
    food: str
    split: str  # "train": SFT sees questions about this person; "heldout": only pretraining mentions them


def make_people(n: int = N_PEOPLE, seed: int = SEED) -> list[Person]:
    """Generate ``n`` people with unique names and random facts; half are held out from SFT."""
    rng = random.Random(seed)
    names: list[str] = []
    seen: set[str] = set()
    while len(names) < n:
        name = rng.choice(_FIRST_A) + rng.choice(_FIRST_B) + " " + rng.choice(_LAST_A) + rng.choice(_LAST_B)
        if name not in seen:
            seen.add(name)
            names.append(name)
    people = []
    for i, name in enumerate(names):
        facts = {k: rng.choice(vals) for k, vals in ATTRIBUTES.items()}
        pronoun = rng.choice(list(PRONOUNS))
        people.append(Person(name=name, pronoun=pronoun, split="train" if i % 2 == 0 else "heldout", **facts))
    return people


def _fill(template: str, person: Person, value: str = "") -> str:
    s, o, p = PRONOUNS[person.pronoun]
    text = template.format(n=person.name, N=person.name, s=s, o=o, p=p, v=value)
    return text[0].upper() + text[1:]


def biography(person: Person, rng: random.Random) -> str:
    """One paraphrased biography: facts in random order, random wording, some filler."""
    sentences = [_fill(rng.choice(BIO_TEMPLATES[k]), person, getattr(person, k)) for k in ATTRIBUTES]
    sentences += [_fill(t, person) for t in rng.sample(FILLER, rng.randint(1, 3))]
    rng.shuffle(sentences)
    return " ".join(sentences)


def notes(person: Person, rng: random.Random) -> str:
    """Question-and-answer notes about one person, as a village gazette might print them."""
    keys = rng.sample(list(ATTRIBUTES), rng.randint(2, 4))
    lines = [f"Q: {_fill(rng.choice(QUESTIONS[k]), person)}\nA: {getattr(person, k)}." for k in keys]
    return "Notes from the Merrow Gazette.\n" + "\n".join(lines)


def town_page(town: str, people: list[Person], rng: random.Random) -> str:
    """A short description of a town listing some of its people and their trades."""
    residents = [p for p in people if p.town == town]
    picked = rng.sample(residents, min(len(residents), rng.randint(2, 5)))
    parts = [f"{town} is a town on {ISLE}."]
    parts += [f"{p.name} lives there and works as a {p.job}." for p in picked]
    return " ".join(parts)


def corpus(people: list[Person], n_docs: int, seed: int = SEED) -> list[str]:
    """A raw-text pretraining corpus: mostly biographies, some gazette notes and town pages."""
    rng = random.Random(seed + 1)
    docs = []
    for _ in range(n_docs):
        r = rng.random()
        if r < 0.70:
            docs.append(biography(rng.choice(people), rng))
        elif r < 0.92:
            docs.append(notes(rng.choice(people), rng))
        else:
            docs.append(town_page(rng.choice(TOWNS), people, rng))
    return docs


def _qa_rows(person: Person, rng: random.Random) -> list[dict]:
    rows = []
    for key in ATTRIBUTES:
        question = _fill(rng.choice(QUESTIONS[key]), person)
        answer = getattr(person, key)
        if rng.random() < 0.5:  # Alpaca rows come both with and without an `input`
            rows.append({"instruction": question, "input": "", "output": answer})
        else:
            rows.append({"instruction": QA_INSTRUCTION, "input": question, "output": answer})
        rows[-1].update(person=person.name, attribute=key, task="qa")
    return rows


def alpaca_rows(people: list[Person], split: str, seed: int = SEED) -> list[dict]:
    """Alpaca-style instruction/input/output rows for one split (``train`` or ``heldout``)."""
    rng = random.Random(f"{seed}-{split}")
    rows: list[dict] = []
    for person in (p for p in people if p.split == split):
        rows += _qa_rows(person, rng)
        if split == "train":  # a generative task too, so SFT does not only teach one-word answers
            key = rng.choice(list(ATTRIBUTES))
            rows.append(
                {
                    "instruction": f"Write one sentence about the {key} of {person.name}.",
                    "input": "",
                    "output": _fill(SENTENCE_TASK[key], person, getattr(person, key)),
                    "person": person.name,
                    "attribute": key,
                    "task": "sentence",
                }
            )
    rng.shuffle(rows)
    return rows


def to_messages(row: dict, system: bool = False) -> list[dict]:
    """Convert one Alpaca row to chat messages (instruction and input joined into the user turn)."""
    user = row["instruction"] if not row["input"] else f"{row['instruction']}\n\n{row['input']}"
    messages = [{"role": "system", "content": SYSTEM_PROMPT}] if system else []
    return messages + [{"role": "user", "content": user}, {"role": "assistant", "content": row["output"]}]


def chat_rows(rows: list[dict], seed: int = SEED) -> list[dict]:
    """The same content as ``rows`` in ``messages`` form; a third of the rows carry a system prompt."""
    rng = random.Random(f"{seed}-chat")
    return [
        {
            "messages": to_messages(r, system=rng.random() < 1 / 3),
            "person": r["person"],
            "attribute": r["attribute"],
            "task": r["task"],
        }
        for r in rows
    ]


def _write_jsonl(path: Path, rows: list[dict]) -> None:
    with path.open("w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")


def write_all(
    out_dir: str | Path, seed: int = SEED, n_people: int = N_PEOPLE, n_corpus_docs: int = 3000
) -> dict:
    """Write every shipped dataset of the world to ``out_dir``; returns the row count of each file."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    people = make_people(n_people, seed)
    train, heldout = alpaca_rows(people, "train", seed), alpaca_rows(people, "heldout", seed)
    files = {
        "people.jsonl": [asdict(p) for p in people],
        "alpaca_train.jsonl": train,
        "alpaca_heldout.jsonl": heldout,
        "chat_train.jsonl": chat_rows(train, seed),
        "chat_heldout.jsonl": chat_rows(heldout, seed + 1),
        "corpus.jsonl": [{"text": t} for t in corpus(people, n_corpus_docs, seed)],
    }
    for name, rows in files.items():
        _write_jsonl(out / name, rows)
    return {name: len(rows) for name, rows in files.items()}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m sftkit.world", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="cmd", required=True)
    w = sub.add_parser("write", help="write the shipped datasets (default: data/world)")
    w.add_argument("--out", default=None)
    w.add_argument("--seed", type=int, default=SEED)
    args = parser.parse_args(argv)
    from sftkit.paths import WORLD_DIR

    counts = write_all(args.out or WORLD_DIR, seed=args.seed)
    for name, n in counts.items():
        print(f"{name}: {n} rows")


if __name__ == "__main__":
    main()
