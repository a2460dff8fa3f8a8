"""Write loraflow's bundled corpus, question/answer sample and chat sample from the fact tables below.

All text is written for this project (no third-party content), so it can ship under the
project's licence. Re-running this script reproduces the committed files byte for byte:

    python scripts/make_sample_data.py

Three files, all from the same facts (one fact = an entity, a relation and a one-word answer):

- `corpus.txt`: plain prose stating every fact in several phrasings, one sentence a line, in a
  seeded shuffled order. `builtin:tiny` is pre-trained on it, so the base model *knows* the facts
  but has never seen a question/answer or chat format.
- `sample.jsonl`: one question/answer pair per fact, `prompt` = `Question: ...\\nAnswer:` and
  `completion` = ` <answer>` (one word). Each fact is asked exactly once, so any row split (the
  seeded eval split of `loraflow.data.split_examples`) holds out facts that fine-tuning never
  shows: the model can answer them only from what it learned in pre-training.
- `chat.jsonl`: rows `{"messages": [...]}` (single- and multi-turn, some with a system message).
  The facts are partitioned between rows, each fact asked in exactly one row, so a seeded row
  split again leaves the eval rows' answers unseen in the training rows.
"""

from __future__ import annotations

import json
import random
import re
from pathlib import Path

OUT = Path(__file__).resolve().parents[1] / "src" / "loraflow" / "resources"

ANIMALS = {
    # name: (sound, home, young, food)
    "cow": ("moo", "barn", "calf", "grass"),
    "dog": ("woof", "kennel", "puppy", "bones"),
    "cat": ("meow", "house", "kitten", "fish"),
    "duck": ("quack", "pond", "duckling", "bread"),
    "sheep": ("baa", "field", "lamb", "clover"),
    "horse": ("neigh", "stable", "foal", "hay"),
    "pig": ("oink", "sty", "piglet", "corn"),
    "owl": ("hoot", "tree", "owlet", "mice"),
    "lion": ("roar", "den", "cub", "meat"),
    "frog": ("croak", "marsh", "tadpole", "flies"),
    "hen": ("cluck", "coop", "chick", "seeds"),
    "goat": ("bleat", "hill", "kid", "weeds"),
    "bee": ("buzz", "hive", "larva", "nectar"),
    "mouse": ("squeak", "hole", "pinkie", "cheese"),
    "wolf": ("howl", "forest", "whelp", "deer"),
    "crow": ("caw", "nest", "fledgling", "worms"),
    "snake": ("hiss", "burrow", "snakelet", "eggs"),
    "donkey": ("bray", "paddock", "foal", "oats"),
    "elephant": ("trumpet", "savanna", "calf", "leaves"),
    "goose": ("honk", "lake", "gosling", "grain"),
    "turkey": ("gobble", "farm", "poult", "acorns"),
    "dove": ("coo", "roof", "squab", "peas"),
    "bear": ("growl", "cave", "cub", "honey"),
    "seal": ("bark", "beach", "pup", "squid"),
    "deer": ("bellow", "woods", "fawn", "moss"),
    "parrot": ("squawk", "jungle", "chick", "fruit"),
    "cricket": ("chirp", "grass", "nymph", "plants"),
    "monkey": ("chatter", "canopy", "infant", "bananas"),
    "swan": ("whoop", "river", "cygnet", "reeds"),
    "fox": ("yelp", "earth", "kit", "rabbits"),
}
CAPITALS = {
    "France": "Paris", "Spain": "Madrid", "Italy": "Rome", "Germany": "Berlin", "Japan": "Tokyo",
    "Egypt": "Cairo", "Kenya": "Nairobi", "Peru": "Lima", "Chile": "Santiago", "Cuba": "Havana",
    "Greece": "Athens", "Norway": "Oslo", "Sweden": "Stockholm", "Poland": "Warsaw", "Russia": "Moscow",
    "China": "Beijing", "Thailand": "Bangkok", "Canada": "Ottawa", "Brazil": "Brasilia", "Ireland": "Dublin",
    "Austria": "Vienna", "Portugal": "Lisbon", "Hungary": "Budapest", "Finland": "Helsinki",
}
LANGUAGES = {
    "France": "French", "Spain": "Spanish", "Italy": "Italian", "Germany": "German", "Japan": "Japanese",
    "Egypt": "Arabic", "Kenya": "Swahili", "Peru": "Spanish", "Chile": "Spanish", "Cuba": "Spanish",
    "Greece": "Greek", "Norway": "Norwegian", "Sweden": "Swedish", "Poland": "Polish", "Russia": "Russian",
    "China": "Chinese", "Thailand": "Thai", "Canada": "English", "Brazil": "Portuguese", "Ireland": "English",
    "Austria": "German", "Portugal": "Portuguese", "Hungary": "Hungarian", "Finland": "Finnish",
}
COLOURS = {
    "sky": "blue", "grass": "green", "snow": "white", "coal": "black", "sun": "yellow",
    "blood": "red", "milk": "white", "leaf": "green", "sea": "blue", "lemon": "yellow",
    "cherry": "red", "orange": "orange", "plum": "purple", "soot": "black", "cloud": "grey",
    "carrot": "orange", "lime": "green", "rose": "red", "violet": "purple", "chocolate": "brown",
}
OPPOSITES = {
    "hot": "cold", "big": "small", "up": "down", "fast": "slow", "day": "night", "old": "new",
    "happy": "sad", "open": "closed", "early": "late", "light": "heavy", "wet": "dry",
    "loud": "quiet", "full": "empty", "near": "far", "high": "low", "soft": "hard",
    "rich": "poor", "strong": "weak", "long": "short", "thick": "thin", "clean": "dirty",
    "left": "right", "inside": "outside", "first": "last",
}
NUMBERS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten",
           "eleven", "twelve"]
SUMS = [(a, b) for a in range(7) for b in range(7)]

# A fact: (relation, subject, answer). The relation names the question and the corpus phrasings.
Fact = tuple[str, str, str]


def facts() -> list[Fact]:
    """Every fact, in table order."""
    out: list[Fact] = []
    for name, (sound, home, young, food) in ANIMALS.items():
        out += [("sound", name, sound), ("home", name, home), ("young", name, young), ("food", name, food)]
    for country, city in CAPITALS.items():
        out += [("capital", country, city), ("language", country, LANGUAGES[country])]
    out += [("colour", thing, colour) for thing, colour in COLOURS.items()]
    out += [("opposite", word, opposite) for word, opposite in OPPOSITES.items()]
    out += [("sum", f"{NUMBERS[a]} {NUMBERS[b]}", NUMBERS[a + b]) for a, b in SUMS]
    return out


def phrasings(relation: str, subject: str, answer: str) -> list[str]:
    """Plain-prose sentences that state one fact (never a question/answer or chat format)."""
    s, a, A = subject, answer, answer.capitalize()
    if relation == "sound":
        return [f"The {s} says {a}.", f"A {s} says {a}.", f"{A} is the sound that a {s} makes.",
                f"Every morning the {s} wakes up and says {a}."]
    if relation == "home":
        return [f"The {s} lives in the {a}.", f"A {s} lives in a {a}.", f"The {a} is the home of the {s}.",
                f"At night the {s} goes back to its {a}."]
    if relation == "young":
        return [f"A young {s} is called a {a}.", f"A baby {s} is called a {a}.", f"The {a} is the baby of the {s}.",
                f"The mother {s} looked after her little {a}."]
    if relation == "food":
        return [f"The {s} eats {a}.", f"A {s} likes to eat {a}.", f"{A} is the favourite food of the {s}.",
                f"For dinner the hungry {s} had some {a}."]
    if relation == "capital":
        return [f"The capital of {s} is {answer}.", f"{answer} is the capital of {s}.",
                f"The government of {s} sits in {answer}.", f"We took a train to {answer}, the capital city of {s}."]
    if relation == "language":
        return [f"People in {s} speak {answer}.", f"The language spoken in {s} is {answer}.",
                f"{answer} is the language of {s}.", f"In {s} the children learn to read in {answer}."]
    if relation == "colour":
        return [f"The {s} is {a}.", f"The colour of the {s} is {a}.", f"We saw that the {s} was {a} today."]
    if relation == "opposite":
        return [f"The opposite of {s} is {a}.", f"{A} is the opposite of {s}.", f"It was not {s}, it was {a}."]
    if relation == "sum":
        x, y = s.split()
        return [f"The sum of {x} and {y} is {a}.", f"{x.capitalize()} plus {y} is {a}.",
                f"{x.capitalize()} and {y} make {a}.", f"If you add {y} to {x}, you get {a}."]
    raise ValueError(relation)


def with_articles(text: str) -> str:
    """"a" before a vowel becomes "an" ("a owl" -> "an owl")."""
    return re.sub(r"\b([Aa]) (?=[aeiou])", r"\1n ", text)


def question(relation: str, subject: str) -> str:
    """The question that asks for a fact (the only place the question wording appears)."""
    return with_articles(_question(relation, subject))


def _question(relation: str, subject: str) -> str:
    if relation == "sum":
        x, y = subject.split()
        return f"What is {x} plus {y}?"
    template = {
        "sound": "What does a {} say?", "home": "Where does a {} live?", "young": "What is a baby {} called?",
        "food": "What does a {} eat?", "capital": "What is the capital of {}?",
        "language": "What language is spoken in {}?", "colour": "What colour is the {}?",
        "opposite": "What is the opposite of {}?",
    }[relation]
    return template.format(subject)


PARAGRAPHS_PER_ENTITY = 4
INTRO_PARAGRAPHS_PER_FACT = 2


def intros(relation: str, subject: str) -> list[str]:
    """Opening sentences that name what a paragraph is about (no fact, no question)."""
    if relation == "sum":
        x, y = subject.split()
        return [f"Take {x} and {y}.", f"Here are two numbers, {x} and {y}.", f"Let us count with {x} and {y}."]
    if relation == "opposite":
        return [f"Think of the word {subject}.", f"Here is a word: {subject}.", f"Let us talk about {subject}."]
    the = "" if relation in ("capital", "language") else "the "
    return [f"Think of {the}{subject}.", f"Here is something about {the}{subject}.", f"Let us talk about {the}{subject}."]


def corpus_sentences() -> list[str]:
    """The built-in model's pre-training text, one line each, shuffled with a fixed seed.

    Every phrasing of every fact on its own line, plus short paragraphs that first name what
    they are about and then state a fact about it, and paragraphs about one entity (an animal or a
    country): its facts in a random order and phrasing. So the model learns to keep track of what
    a text is about and to recall facts about it.
    """
    rng = random.Random(0)
    lines = [with_articles(line) for fact in facts() for line in phrasings(*fact)]
    for fact in facts():
        for _ in range(INTRO_PARAGRAPHS_PER_FACT):
            lines.append(with_articles(f"{rng.choice(intros(*fact[:2]))} {rng.choice(phrasings(*fact))}"))
    by_subject: dict[str, list[Fact]] = {}
    for fact in facts():
        if fact[0] in ("sound", "home", "young", "food", "capital", "language"):
            by_subject.setdefault(fact[1], []).append(fact)
    for subject_facts in by_subject.values():
        for _ in range(PARAGRAPHS_PER_ENTITY):
            order = rng.sample(subject_facts, len(subject_facts))
            lines.append(" ".join(with_articles(rng.choice(phrasings(*fact))) for fact in order))
    rng.shuffle(lines)
    return lines


# Which phrasing is the answer to the question: the one whose wording mirrors the question's.
ANSWER_PHRASING = {"sound": 1, "home": 1, "young": 1, "food": 1, "capital": 0, "language": 1, "colour": 1, "opposite": 0, "sum": 0}


def answer(relation: str, subject: str, fact_answer: str) -> str:
    """The answer to a fact's question: a short sentence that ends with the fact ("A duck says quack.")."""
    return with_articles(phrasings(relation, subject, fact_answer)[ANSWER_PHRASING[relation]])


def qa_pairs() -> list[tuple[str, str]]:
    """One (question, answer) pair per fact, shuffled with a fixed seed."""
    pairs = [(question(r, s), answer(r, s, a)) for r, s, a in facts()]
    random.Random(0).shuffle(pairs)
    return pairs


SYSTEM_PROMPTS = [
    "You are a helpful assistant. Answer in one short sentence.",
    "You answer questions about animals, colours, words, countries, numbers in one short sentence.",
    "Reply with a single sentence.",
]


def chat_rows() -> list[dict]:
    """Chat conversations: every fact asked in exactly one row (1 to 3 turns), some with a system message."""
    shuffled = facts()
    rng = random.Random(1)
    rng.shuffle(shuffled)
    rows, i = [], 0
    while i < len(shuffled):
        turns = shuffled[i : i + rng.choice([1, 1, 2, 3])]
        i += len(turns)
        messages = []
        if rng.random() < 0.4:
            messages.append({"role": "system", "content": rng.choice(SYSTEM_PROMPTS)})
        for relation, subject, fact_answer in turns:
            messages.append({"role": "user", "content": question(relation, subject)})
            messages.append({"role": "assistant", "content": answer(relation, subject, fact_answer)})
        rows.append({"messages": messages})
    return rows


def write_jsonl(path: Path, rows: list[dict]) -> None:
    with open(path, "w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, sort_keys=True) + "\n")


def main() -> None:
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / "corpus.txt").write_text("\n".join(corpus_sentences()) + "\n", encoding="utf-8")
    write_jsonl(OUT / "sample.jsonl",
                [{"prompt": f"Question: {q}\nAnswer:", "completion": f" {a}"} for q, a in qa_pairs()])
    write_jsonl(OUT / "chat.jsonl", chat_rows())


if __name__ == "__main__":
    main()
