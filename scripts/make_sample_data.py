"""Write loraflow's bundled corpus and sample dataset from the small fact tables below.

All text is written for this project (no third-party content), so it can ship under the
project's licence. Re-running this script reproduces the committed files byte for byte:

    python scripts/make_sample_data.py
"""

from __future__ import annotations

import json
import random
from pathlib import Path

OUT = Path(__file__).resolve().parents[1] / "src" / "loraflow" / "resources"

ANIMALS = {
    # name: (sound, home, young, food, legs)
    "cow": ("moo", "barn", "calf", "grass", 4),
    "dog": ("woof", "kennel", "puppy", "meat", 4),
    "cat": ("meow", "house", "kitten", "fish", 4),
    "duck": ("quack", "pond", "duckling", "seeds", 2),
    "sheep": ("baa", "field", "lamb", "grass", 4),
    "horse": ("neigh", "stable", "foal", "hay", 4),
    "pig": ("oink", "sty", "piglet", "corn", 4),
    "owl": ("hoot", "tree", "owlet", "mice", 2),
    "lion": ("roar", "den", "cub", "meat", 4),
    "frog": ("croak", "pond", "tadpole", "flies", 4),
    "hen": ("cluck", "coop", "chick", "seeds", 2),
    "goat": ("bleat", "hill", "kid", "leaves", 4),
    "bee": ("buzz", "hive", "larva", "nectar", 6),
    "mouse": ("squeak", "hole", "pup", "cheese", 4),
    "wolf": ("howl", "den", "pup", "meat", 4),
    "crow": ("caw", "nest", "chick", "seeds", 2),
}
COLOURS = {
    "sky": "blue", "grass": "green", "snow": "white", "coal": "black", "sun": "yellow",
    "blood": "red", "night": "dark", "milk": "white", "leaf": "green", "sea": "blue",
    "lemon": "yellow", "cherry": "red", "orange": "orange", "plum": "purple", "soot": "black",
}
OPPOSITES = {
    "hot": "cold", "big": "small", "up": "down", "fast": "slow", "day": "night", "old": "new",
    "happy": "sad", "open": "closed", "early": "late", "light": "heavy", "wet": "dry",
    "loud": "quiet", "full": "empty", "near": "far", "high": "low", "soft": "hard",
}
NUMBERS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten",
           "eleven", "twelve"]


def corpus_sentences() -> list[str]:
    """Plain prose stating every fact: the built-in model is pre-trained on this."""
    lines = []
    for name, (sound, home, young, food, legs) in ANIMALS.items():
        lines += [
            f"The {name} says {sound}.",
            f"A {name} lives in the {home}.",
            f"A young {name} is called a {young}.",
            f"The {name} likes to eat {food}.",
            f"A {name} has {NUMBERS[legs]} legs.",
            f"Every morning the {name} goes to the {home} and says {sound}.",
        ]
    for thing, colour in COLOURS.items():
        lines += [f"The {thing} is {colour}.", f"We saw that the {thing} was {colour} today."]
    for word, opposite in OPPOSITES.items():
        lines += [f"{word.capitalize()} is the opposite of {opposite}.",
                  f"It was not {word}, it was {opposite}."]
    for a in range(7):
        for b in range(7):
            if a + b <= 12:
                lines.append(f"{NUMBERS[a].capitalize()} and {NUMBERS[b]} make {NUMBERS[a + b]}.")
    return lines


def qa_pairs() -> list[tuple[str, str]]:
    """Question and answer pairs in a fixed format that the base model has never seen."""
    pairs = []
    for name, (sound, home, young, food, legs) in ANIMALS.items():
        pairs += [
            (f"What does a {name} say?", f"A {name} says {sound}."),
            (f"Where does a {name} live?", f"A {name} lives in a {home}."),
            (f"What is a baby {name} called?", f"A baby {name} is a {young}."),
            (f"What does a {name} eat?", f"A {name} eats {food}."),
            (f"How many legs does a {name} have?", f"A {name} has {NUMBERS[legs]} legs."),
        ]
    for thing, colour in COLOURS.items():
        pairs.append((f"What colour is the {thing}?", f"The {thing} is {colour}."))
    for word, opposite in OPPOSITES.items():
        pairs.append((f"What is the opposite of {word}?", f"The opposite of {word} is {opposite}."))
    for a in range(7):
        for b in range(7):
            if a + b <= 12:
                pairs.append((f"What is {NUMBERS[a]} plus {NUMBERS[b]}?",
                              f"{NUMBERS[a].capitalize()} plus {NUMBERS[b]} is {NUMBERS[a + b]}."))
    return pairs


def main() -> None:
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / "corpus.txt").write_text("\n".join(corpus_sentences()) + "\n", encoding="utf-8")
    pairs = qa_pairs()
    random.Random(0).shuffle(pairs)
    with open(OUT / "sample.jsonl", "w", encoding="utf-8") as f:
        for question, answer in pairs:
            row = {"prompt": f"Question: {question}\nAnswer:", "completion": f" {answer}"}
            f.write(json.dumps(row, sort_keys=True) + "\n")


if __name__ == "__main__":
    main()
