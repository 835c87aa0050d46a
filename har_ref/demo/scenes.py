"""The 15 HAR actions as cartoon scenes: shapes in figure units, no pixels (synthetic.py renders them).

Each scene is a blocky person (head, torso, two-segment limbs placed by inverse kinematics)
whose pose encodes the action, plus the props that define it (phone, cup, plate, laptop,
chair, bed, bicycle, headphones) or a second person. Some classes are deliberately close:
calling vs texting (where the phone is), eating vs drinking (plate vs cup), sitting vs
using_laptop (laptop on a table). Every shape says whose it is (`Shape.part`: the person's or the
prop's, the objects and marks that show the action), so that synthetic.py can box them, and
`DISTRACTORS` lists the props that may lie around in the scenes of other actions.

Coordinates are in "figure units" (hip at the origin, +x is the way a person faces, +y points
down; a standing person is about 0.95 units tall) until synthetic.render's affine map to pixels.
"""
from __future__ import annotations

import colorsys
import math
from dataclasses import dataclass, replace

import numpy as np

from ..data.classes import CLASS_NAMES

TORSO, HEAD_R, UPPER_ARM, FOREARM, THIGH, SHIN = 0.30, 0.10, 0.15, 0.15, 0.20, 0.20
DARK = (25, 25, 30)


@dataclass
class Shape:
    kind: str  # "line" (polyline, width w) | "disc" (radius r) | "ring" (radius r, width w) | "poly"
    pts: np.ndarray  # [N, 2]
    color: tuple
    r: float = 0.0
    w: float = 0.0
    part: str = "person"  # "person" | "prop" (the action's objects and marks) | "distractor" (synthetic.py)


def _line(pts, w, color) -> Shape:
    return Shape("line", np.asarray(pts, float), color, w=w)


def _disc(c, r, color) -> Shape:
    return Shape("disc", np.asarray([c], float), color, r=r)


def _rect(cx, cy, w, h, color, angle=0.0) -> Shape:
    corners = np.array([[-w, -h], [w, -h], [w, h], [-w, h]]) / 2
    return Shape("poly", corners @ rotation(angle).T + (cx, cy), color)


def _ellipse(cx, cy, rx, ry, color) -> Shape:
    t = np.linspace(0, 2 * math.pi, 16, endpoint=False)
    return Shape("poly", np.stack([cx + rx * np.cos(t), cy + ry * np.sin(t)], 1), color)


def affine(shapes: list[Shape], A: np.ndarray, b=(0.0, 0.0)) -> list[Shape]:
    """Map every shape through x -> A x + b; radii and widths scale by sqrt|det A|."""
    s = math.sqrt(abs(np.linalg.det(A)))
    return [replace(sh, pts=sh.pts @ A.T + b, r=sh.r * s, w=sh.w * s) for sh in shapes]


def rotation(deg: float) -> np.ndarray:
    c, s = math.cos(math.radians(deg)), math.sin(math.radians(deg))
    return np.array([[c, -s], [s, c]])


def _two_bone(root, target, l1, l2, prefer) -> tuple[np.ndarray, np.ndarray]:
    """Elbow/knee and end point of a two-segment limb reaching for `target` (law of cosines).

    Of the two mirror solutions, the bend closer to the `prefer` direction is used.
    """
    d = target - root
    dist = float(np.clip(np.linalg.norm(d), abs(l1 - l2) + 1e-6, (l1 + l2) * 0.999))
    u = d / (np.linalg.norm(d) + 1e-9)
    along = (l1 ** 2 - l2 ** 2 + dist ** 2) / (2 * dist)
    perp = np.array([-u[1], u[0]]) * math.sqrt(max(l1 ** 2 - along ** 2, 0.0))
    if perp @ np.asarray(prefer) < 0:
        perp = -perp
    return root + along * u + perp, root + dist * u


# ---------------------------------------------------------------- colours

def hsv(h, s, v) -> tuple:
    return tuple(int(255 * x) for x in colorsys.hsv_to_rgb(h % 1.0, s, v))


def shade(color, f) -> tuple:
    return tuple(int(min(255, c * f)) for c in color)


@dataclass
class Look:
    skin: tuple
    hair: tuple
    shirt: tuple
    pants: tuple


def random_look(rng, background, clothes: float, skin: float = 0.1) -> Look:
    """Skin (one of five tones, shaded by up to +-`skin`), hair, and clothes whose hues move from blue and
    brown by up to `clothes` * 180 degrees (0: always blue shirt, brown trousers)."""
    skins = [(255, 220, 185), (234, 192, 134), (198, 134, 66), (141, 85, 36), (90, 56, 37)]
    hairs = [(20, 20, 20), (90, 60, 30), (200, 170, 90), (150, 150, 150), (120, 40, 20)]
    colors = []
    for hue in (0.6, 0.08):  # shirt and trousers
        for _ in range(8):  # they must stand out from the background
            c = hsv(hue + clothes * rng.uniform(-0.5, 0.5), 0.7 + clothes * rng.uniform(-0.4, 0.3),
                     0.5 + clothes * rng.uniform(-0.3, 0.5))
            if np.abs(np.subtract(c, background)).sum() > 180:
                break
        colors.append(c)
    tone = skins[rng.integers(len(skins))]
    return Look(shade(tone, rng.uniform(1 - skin, 1 + skin)), hairs[rng.integers(len(hairs))], *colors)


# ---------------------------------------------------------------- the person

@dataclass
class Person:
    back: list  # far arm and far leg, drawn first
    body: list  # torso, near leg, head
    front: list  # near arm: hugging redraws it over the other person
    head: np.ndarray
    hands: list

    @property
    def shapes(self) -> list[Shape]:
        return self.back + self.body + self.front


def _person(rng, look: Look, hands, feet, lean=0.0, head_tilt=0.0, mouth_open=False,
            elbow_prefer=((-0.2, 1.0), (-0.2, 1.0)), at=(0.0, 0.0), facing=1, jitter=0.015) -> Person:
    """A person with hand targets relative to the shoulder and feet relative to the hip.

    lean and head_tilt are degrees forward (negative: backward). Targets get a little
    jitter (standard deviation `jitter`, figure units) so that no two poses of a class are the same.
    """
    nudge = lambda v: np.asarray(v, float) + rng.normal(0, jitter, 2)
    up = np.array([math.sin(math.radians(lean)), -math.cos(math.radians(lean))])
    hip, shoulder = np.zeros(2), TORSO * up
    head = shoulder + (HEAD_R + 0.035) * (rotation(head_tilt) @ up)
    limbs = []
    for i in range(2):
        elbow, hand = _two_bone(shoulder, shoulder + nudge(hands[i]), UPPER_ARM, FOREARM, elbow_prefer[i])
        knee, foot = _two_bone(hip, nudge(feet[i]), THIGH, SHIN, (1.0, 0.0))
        limbs.append((elbow, hand, knee, foot))
    parts = {"back": [], "body": [], "front": []}
    for i, (elbow, hand, knee, foot) in enumerate(limbs):
        f = 1.0 if i == 0 else 0.75  # the far side is in shadow
        leg = [_line([hip, knee, foot], 0.075, shade(look.pants, f)),
               _line([foot, foot + (0.05, 0.0)], 0.045, DARK)]
        arm = [_line([shoulder, elbow], 0.06, shade(look.shirt, f)),
               _line([elbow, hand], 0.045, shade(look.skin, f)), _disc(hand, 0.03, shade(look.skin, f))]
        parts["back" if i else "body"] += leg
        parts["back" if i else "front"] += arm
    face = rotation(head_tilt + lean)
    parts["body"][:0] = [_line([hip, shoulder], 0.11, look.shirt)]
    parts["body"] += [_disc(head + face @ (-0.02, -0.015), HEAD_R, look.hair),
                      _disc(head + face @ (0.01, 0.01), HEAD_R * 0.9, look.skin),
                      _disc(head + face @ (0.05, -0.015), 0.013, DARK)]
    if mouth_open:
        parts["body"].append(_ellipse(*(head + face @ (0.055, 0.045)), 0.035, 0.03, (120, 10, 20)))
    A, b = np.diag([facing, 1.0]), np.asarray(at)  # place and turn the person
    return Person(*(affine(parts[k], A, b) for k in ("back", "body", "front")),
                  head=A @ head + b, hands=[A @ limb[1] + b for limb in limbs])


STAND = ((0.04, 0.39), (-0.04, 0.39))
ARMS_DOWN = ((0.03, 0.29), (-0.03, 0.29))


# ---------------------------------------------------------------- props: the objects that show an action

def _prop(shapes: list[Shape]) -> list[Shape]:
    return [replace(sh, part="prop") for sh in shapes]


def _phone(rng, center=(0.0, 0.0), angle=0.0) -> list[Shape]:
    screen = hsv(rng.uniform(0.45, 0.65), 0.4, 1.0)
    return _prop([_rect(*center, 0.06, 0.11, DARK, angle), _rect(*center, 0.04, 0.08, screen, angle)])


def _cup(rng, center=(0.0, 0.0), angles=(-35, -15)) -> list[Shape]:
    color = hsv(rng.random(), rng.uniform(0.5, 1.0), rng.uniform(0.6, 1.0))
    return _prop([_rect(*center, 0.07, 0.1, color, rng.uniform(*angles))])


def _plate(rng, top=0.0) -> list[Shape]:
    """A plate with two bites of food on a table top at height `top`."""
    plate = [_ellipse(0.38, top - 0.015, 0.11, 0.025, (240, 240, 235))]
    plate += [_disc((0.33 + 0.05 * k, top - 0.035), 0.025, hsv(rng.uniform(0, 0.35), 0.8, 0.8)) for k in range(2)]
    return _prop(plate)


def _laptop(rng, top=0.0) -> list[Shape]:
    """An open laptop on a table top at height `top`, screen to the right."""
    shell = hsv(0, 0, rng.uniform(0.25, 0.75))
    x = rng.uniform(0.22, 0.26)
    return _prop([_rect(x + 0.1, top - 0.012, 0.22, 0.025, shell),
                  _line([(x + 0.2, top - 0.02), (x + 0.24, top - 0.2)], 0.035, shell),
                  _line([(x + 0.19, top - 0.035), (x + 0.225, top - 0.19)], 0.012, hsv(0.58, 0.4, 1.0))])


def _chair(rng) -> list[Shape]:
    wood = hsv(rng.uniform(0.05, 0.12), rng.uniform(0.3, 0.8), rng.uniform(0.3, 0.7))
    return _prop([_line([(-0.15, -0.28), (-0.13, 0.05), (0.13, 0.05)], 0.04, wood),
                  _line([(-0.12, 0.05), (-0.12, 0.28)], 0.03, wood),
                  _line([(0.11, 0.05), (0.11, 0.28)], 0.03, wood)])


def _table(rng, top_y, x0=0.2, x1=0.6) -> list[Shape]:
    color = hsv(rng.uniform(0.0, 1.0), rng.uniform(0.0, 0.5), rng.uniform(0.35, 0.75))
    return _prop([_rect((x0 + x1) / 2, top_y + 0.02, x1 - x0, 0.04, color),
                  _line([(x0 + 0.04, top_y), (x0 + 0.04, 0.28)], 0.03, color),
                  _line([(x1 - 0.04, top_y), (x1 - 0.04, 0.28)], 0.03, color)])


def _headphones(rng, head=(0.0, 0.0)) -> list[Shape]:
    color = DARK if rng.random() < 0.5 else hsv(rng.random(), 0.9, 0.9)
    t = np.linspace(math.pi * 1.1, math.pi * 1.9, 8)
    band = _line(head + (HEAD_R + 0.02) * np.stack([np.cos(t), np.sin(t)], 1), 0.03, color)
    return _prop([band, _disc(head + np.array((-0.035, 0.0)), 0.045, color)])


REAR, FRONT, SEAT, BARS, CRANK = (np.array(v) for v in
                                  ((-0.3, 0.3), (0.35, 0.3), (0.0, 0.05), (0.28, -0.12), (0.03, 0.3)))


def _bicycle(rng) -> list[Shape]:
    """Two wheels, then the frame (cycling draws the rider's far leg between them)."""
    frame_c = hsv(rng.random(), rng.uniform(0.6, 1.0), rng.uniform(0.5, 1.0))
    wheels = [Shape("ring", np.array([c]), DARK, r=0.16, w=0.035) for c in (REAR, FRONT)]
    frame = [_line([REAR, SEAT, CRANK, REAR], 0.035, frame_c), _line([SEAT, BARS, FRONT], 0.035, frame_c),
             _line([CRANK, BARS + (0.0, 0.06)], 0.035, frame_c)]
    return _prop(wheels + frame)


# The props that may lie around in the scene of an action they do not belong to (synthetic.py's
# distractors): name -> (the classes whose prop it is, its drawing).
DISTRACTORS = {"phone": (("calling", "texting"), _phone), "cup": (("drinking",), _cup),
               "plate": (("eating",), _plate), "laptop": (("using_laptop",), _laptop),
               "chair": (("sitting",), _chair), "headphones": (("listening_to_music",), _headphones),
               "bicycle": (("cycling",), _bicycle)}


def _seated(rng, look, hands, jitter) -> Person:
    """A person sitting on a chair; the chair is drawn in the person's back layer."""
    p = _person(rng, look, hands, ((0.22, 0.26), (0.2, 0.27)), lean=rng.uniform(-5, 8), jitter=jitter)
    p.back[:0] = _chair(rng)
    return p


# ---------------------------------------------------------------- one scene per class

def _calling(rng, look, other, jitter):
    p = _person(rng, look, ((0.03, -0.1), ARMS_DOWN[1] if rng.random() < 0.6 else (-0.07, 0.15)), STAND,
                lean=rng.uniform(-4, 6), elbow_prefer=((1.0, 0.3), (-0.2, 1.0)), jitter=jitter)
    phone = _phone(rng, p.head + (0.0, 0.01), rng.uniform(-20, 0))
    return p.back + p.body + phone + p.front


def _texting(rng, look, other, jitter):
    p = _person(rng, look, ((0.14, 0.1), (0.12, 0.11)), STAND, head_tilt=rng.uniform(15, 30), jitter=jitter)
    phone = _phone(rng, p.hands[0] + (0.02, -0.04), rng.uniform(-70, -40))
    return p.back + p.body + phone + p.front


def _clapping(rng, look, other, jitter):
    p = _person(rng, look, ((0.22, -0.06), (0.21, -0.05)), STAND, lean=rng.uniform(-4, 4), jitter=jitter)
    c, n = p.hands[0], rng.integers(2, 4)
    lines = [_line([c + 0.06 * d, c + 0.12 * d], 0.02, DARK)
             for a in np.linspace(-60, 60, n) + rng.uniform(-10, 10)
             for d in [np.array([math.cos(math.radians(a)), math.sin(math.radians(a))])]]
    return p.shapes + _prop(lines)


def _cycling(rng, look, other, jitter):
    bike = _bicycle(rng)
    a = rng.uniform(0, 2 * math.pi)
    pedals = [CRANK + 0.08 * np.array([math.cos(a + k * math.pi), math.sin(a + k * math.pi)]) for k in (0, 1)]
    p = _person(rng, look, (BARS - (0.08, -0.28), BARS - (0.1, -0.28)), pedals, lean=rng.uniform(20, 35),
                jitter=jitter)
    return bike[:2] + p.back + bike[2:] + p.body + p.front


def _dancing(rng, look, other, jitter):
    hands = [((0.12, -0.27), (-0.12, -0.26)), ((0.05, -0.29), (-0.29, -0.02)), ((0.27, -0.1), (-0.2, -0.2))]
    feet = [((0.22, 0.25), (-0.03, 0.39)), ((0.2, 0.33), (-0.2, 0.33))]
    p = _person(rng, look, hands[rng.integers(3)], feet[rng.integers(2)], lean=rng.uniform(-12, 12), jitter=jitter)
    return p.shapes


def _drinking(rng, look, other, jitter):
    p = _person(rng, look, ((0.1, -0.07), ARMS_DOWN[1]), STAND, head_tilt=rng.uniform(-25, -10), jitter=jitter)
    cup = _cup(rng, p.hands[0] + (0.03, -0.04))
    return p.back + p.body + cup + p.front


def _eating(rng, look, other, jitter):
    seated = rng.random() < 0.5
    top = -0.07 if seated else -0.02
    plate = _plate(rng, top)
    hands = ((0.1, -0.07), (0.3, 0.26) if seated else ARMS_DOWN[1])
    p = _seated(rng, look, hands, jitter) if seated else _person(rng, look, hands, STAND, jitter=jitter)
    fork = _prop([_line([p.hands[0] + (0.0, 0.02), p.hands[0] + (0.05, -0.05)], 0.018, (160, 160, 170))])
    return _table(rng, top) + plate + p.shapes + fork


def _fighting(rng, look, other, jitter):
    d = rng.uniform(0.5, 0.6)
    punch, guard, stance = (0.29, 0.0), (0.12, -0.1), ((0.16, 0.36), (-0.14, 0.36))
    a = _person(rng, look, (punch, guard), stance, lean=rng.uniform(5, 15), jitter=jitter)
    b = _person(rng, other, (guard, punch) if rng.random() < 0.5 else (punch, guard), stance,
                lean=rng.uniform(5, 15), at=(d, 0.0), facing=-1, jitter=jitter)
    return a.shapes + b.shapes


def _hugging(rng, look, other, jitter):
    d = rng.uniform(0.16, 0.22)
    arms = ((0.2, 0.05), (0.19, 0.0))
    a = _person(rng, look, arms, STAND, lean=rng.uniform(5, 12), elbow_prefer=((0.0, 1.0), (0.0, 1.0)), jitter=jitter)
    b = _person(rng, other, arms, STAND, lean=rng.uniform(5, 12), at=(d, 0.0), facing=-1, jitter=jitter)
    return a.back + b.back + a.body + b.body + b.front + a.front


def _laughing(rng, look, other, jitter):
    p = _person(rng, look, ((0.1, 0.2), (0.08, 0.22)), STAND, lean=rng.uniform(-15, -6),
                head_tilt=rng.uniform(-30, -15), mouth_open=True, elbow_prefer=((-1.0, 0.2), (-1.0, 0.2)),
                jitter=jitter)
    return p.shapes


def _listening_to_music(rng, look, other, jitter):
    p = _person(rng, look, ARMS_DOWN, STAND, lean=rng.uniform(-6, 6), head_tilt=rng.uniform(-10, 10), jitter=jitter)
    headphones = _headphones(rng, p.head)
    notes = []
    for k in range(rng.integers(1, 3)):
        c = p.head + (0.2 + 0.1 * k + rng.uniform(-0.03, 0.03), -0.05 - rng.uniform(0, 0.1))
        notes += [_disc(c, 0.025, DARK), _line([c + (0.022, 0.0), c + (0.022, -0.09), c + (0.06, -0.06)], 0.015, DARK)]
    return p.shapes + headphones + _prop(notes)


def _running(rng, look, other, jitter):
    arms, legs = ((0.16, 0.05), (-0.17, 0.12)), ((0.23, 0.29), (-0.26, 0.24))
    if rng.random() < 0.5:
        arms, legs = arms[::-1], legs[::-1]
    return _person(rng, look, arms, legs, lean=rng.uniform(10, 22), jitter=jitter).shapes


def _sitting(rng, look, other, jitter):
    return _seated(rng, look, ((0.18, 0.28), (0.15, 0.29)), jitter).shapes


def _sleeping(rng, look, other, jitter):
    sheet = hsv(rng.random(), rng.uniform(0.1, 0.5), rng.uniform(0.7, 1.0))
    wood = hsv(rng.uniform(0.05, 0.12), rng.uniform(0.3, 0.8), rng.uniform(0.3, 0.6))
    bed = _prop([_rect(-0.66, -0.02, 0.05, 0.34, wood), _rect(-0.07, 0.13, 1.18, 0.06, wood),
                 _rect(-0.07, 0.08, 1.14, 0.06, sheet), _line([(-0.6, 0.16), (-0.6, 0.26)], 0.04, wood),
                 _line([(0.48, 0.16), (0.48, 0.26)], 0.04, wood), _ellipse(-0.5, 0.02, 0.1, 0.045, (245, 245, 245))])
    body = affine(_person(rng, look, ARMS_DOWN, ((0.02, 0.39), (-0.02, 0.39)), head_tilt=rng.uniform(-15, 15),
                          jitter=jitter).shapes, rotation(-90), (0.0, 0.0))
    blanket = []
    if rng.random() < 0.6:
        blanket_c = hsv(rng.random(), rng.uniform(0.3, 0.8), rng.uniform(0.5, 0.9))
        blanket = _prop([Shape("poly", np.array([(-0.32, -0.05), (0.46, -0.04), (0.5, 0.08), (-0.34, 0.08)]),
                               blanket_c)])
    return bed + body + blanket


def _using_laptop(rng, look, other, jitter):
    top = -0.07
    laptop = _laptop(rng, top)
    return _table(rng, top) + laptop + _seated(rng, look, ((0.33, 0.19), (0.3, 0.2)), jitter).shapes


SCENES = {name: globals()[f"_{name}"] for name in CLASS_NAMES}  # "calling" -> _calling, ...
