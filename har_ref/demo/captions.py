"""Captions for the tiny models' pretraining: each synthetic scene described in words.

Real CLIP and SigLIP learn from web images and their alt-texts; the demo's tiny models learn from
synthetic scenes (synthetic.py) and these captions: a prompt-like start with the action (the class
phrase or a synonym), then two to four of the things the scene shows, in random order (skin, hair,
clothes, which way the person faces, the background), so that captions vary like real ones and
almost every one is unique: one positive per row, as in real pretraining.
"""
from __future__ import annotations

import colorsys

import numpy as np

from ..data.prompts import class_phrase
from .scenes import Look
from .synthetic import SceneFacts

PREFIXES = ("a photo of", "a picture of", "an image of", "this is a photo of")
SYNONYMS = {
    "calling": ("talking on the phone", "holding a phone to the ear"),
    "clapping": ("clapping hands", "applauding"),
    "cycling": ("riding a bicycle", "on a bike"),
    "dancing": ("dancing with arms up", "dancing happily"),
    "drinking": ("drinking from a cup", "sipping a drink"),
    "eating": ("eating food", "having a meal"),
    "fighting": ("two people fighting", "a fist fight"),
    "hugging": ("two people hugging", "an embrace"),
    "laughing": ("laughing out loud", "laughing with mouth open"),
    "listening_to_music": ("wearing headphones", "listening to songs"),
    "running": ("running fast", "jogging"),
    "sitting": ("sitting on a chair", "seated on a chair"),
    "sleeping": ("sleeping in bed", "asleep in bed"),
    "texting": ("texting on a phone", "typing a message on a phone"),
    "using_laptop": ("typing on a laptop", "working on a laptop"),
}
TWO_PEOPLE = ("fighting", "hugging")
SKINS = ((255, 220, 185), "pale"), ((234, 192, 134), "light"), ((198, 134, 66), "tan"), ((141, 85, 36), "brown"), \
    ((90, 56, 37), "dark")
HAIRS = {(20, 20, 20): "black", (90, 60, 30): "brown", (200, 170, 90): "blond", (150, 150, 150): "grey",
         (120, 40, 20): "red"}
MAX_ATTRIBUTES = 4  # short captions keep SigLIP's padded context short


def colour_name(rgb) -> str:
    """A plain English name for an RGB colour ("dark blue", "light grey", ...)."""
    h, s, v = colorsys.rgb_to_hsv(*(c / 255 for c in rgb))
    if s < 0.18:
        return "white" if v > 0.85 else "light grey" if v > 0.6 else "grey" if v > 0.35 else "black"
    hues = ((0.04, "red"), (0.11, "orange"), (0.19, "yellow"), (0.45, "green"), (0.54, "teal"), (0.70, "blue"),
            (0.80, "purple"), (0.93, "pink"), (1.01, "red"))
    hue = next(name for limit, name in hues if h < limit)
    if hue == "orange" and v < 0.6:
        hue = "brown"
    return ("dark " if v < 0.45 else "pale " if s < 0.4 and v > 0.75 else "") + hue


def look_words(look: Look) -> list[str]:
    skin = min(SKINS, key=lambda item: sum(abs(a - b) for a, b in zip(item[0], look.skin)))[1]
    return [f"{skin} skin", f"{HAIRS[look.hair]} hair", f"a {colour_name(look.shirt)} shirt",
            f"{colour_name(look.pants)} trousers"]


def caption(class_name: str, facts: SceneFacts, rng: np.random.Generator) -> str:
    action = (class_phrase(class_name), *SYNONYMS[class_name])[rng.integers(3)]
    two = class_name in TWO_PEOPLE
    who = "" if action.startswith("two") or action.startswith("a") and two else "two people " if two else "a person "
    head = f"{PREFIXES[rng.integers(len(PREFIXES))]} {who}{action}"
    if two:
        attributes = [f"one with {w}" for w in look_words(facts.looks[0])] + \
                     [f"the other with {w}" for w in look_words(facts.looks[1])]
    else:
        attributes = look_words(facts.looks[0]) + [f"facing {'left' if facts.mirrored else 'right'}"]
    attributes.append(f"{colour_name(facts.background)} background")
    k = int(rng.integers(2, MAX_ATTRIBUTES + 1))
    chosen = [attributes[i] for i in rng.permutation(len(attributes))[:k]]
    return f"{head}, {', '.join(chosen)}."
