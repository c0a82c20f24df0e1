"""A small, independent sentiment score for steered text (happy minus sad words)."""

from __future__ import annotations

import re

# Small generic sentiment lexicons, matched as word prefixes ("excit" counts
# "excited" and "exciting").
HAPPY = (
    "happ",
    "joy",
    "excit",
    "love",
    "smil",
    "wonderful",
    "great",
    "amazing",
    "fun",
    "positiv",
    "glad",
    "delight",
    "cheer",
    "fantastic",
    "grateful",
    "inspir",
    "thrill",
    "celebrat",
    "beautiful",
    "bright",
    "hope",
    "enjoy",
)
SAD = (
    "sad",
    "sorry",
    "lonel",
    "tragic",
    "death",
    "died",
    "grief",
    "pain",
    "tear",
    "lost",
    "overwhelm",
    "difficult",
    "struggl",
    "miserabl",
    "depress",
    "alone",
    "anxi",
    "stress",
    "worr",
    "tired",
    "guilt",
    "heavy",
    "afraid",
    "fear",
    "upset",
    "hurt",
    "cry",
)


def mood(text: str) -> int:
    words = re.findall(r"[a-z]+", text.lower())
    return sum(w.startswith(HAPPY) for w in words) - sum(w.startswith(SAD) for w in words)
