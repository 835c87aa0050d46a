"""Offline HAR-like image generator for the embedded demo (`python -m har_ref synth`).

Each of the 15 HAR actions is drawn as a cartoon scene with PIL.ImageDraw: a
blocky person (head, torso, two-segment limbs placed by inverse kinematics)
whose pose encodes the action, plus the props that define it (phone, cup,
plate, laptop, chair, bed, bicycle, headphones, a second person). Position,
scale, a small rotation, mirror, skin/hair/clothes colours, background
(floor, gradient, stripes, noise) and faded distractor shapes vary, so a model
must learn shapes rather than colours. Some classes are deliberately close:
calling vs texting (where the phone is), eating vs drinking (plate vs cup),
sitting vs using_laptop (laptop on a table).

`variation` (0..1) scales those nuisances. A tiny ViT trained from scratch is very
sensitive to them: measured with the demo's vision tower as a 15-way classifier,
60 images per class, batch 60, 300 steps: test macro-F1 0.16 at variation 1,
0.68 at 0.2, 0.93 at 0 (0.81 after 150 steps).

Every image has its own numpy Generator seeded by (seed, split, class, index):
the same seed gives byte-identical files, and asking for more images never
changes the existing ones.

Coordinates are in "figure units" (hip at the origin, +x is the way a person
faces, +y points down; a standing person is about 0.95 units tall) until the
final affine map to pixels.
"""
from __future__ import annotations

import colorsys
import csv
import math
import shutil
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

CLASS_NAMES = (
    "calling", "clapping", "cycling", "dancing", "drinking", "eating", "fighting", "hugging",
    "laughing", "listening_to_music", "running", "sitting", "sleeping", "texting", "using_laptop",
)
TORSO, HEAD_R, UPPER_ARM, FOREARM, THIGH, SHIN = 0.30, 0.10, 0.15, 0.15, 0.20, 0.20
SUPERSAMPLE = 2  # draw at 2x and box-downsample: anti-aliased edges at no extra dependency
DARK = (25, 25, 30)


@dataclass
class Shape:
    kind: str  # "line" (polyline, width w) | "disc" (radius r) | "ring" (radius r, width w) | "poly"
    pts: np.ndarray  # [N, 2]
    color: tuple
    r: float = 0.0
    w: float = 0.0


def _line(pts, w, color) -> Shape:
    return Shape("line", np.asarray(pts, float), color, w=w)


def _disc(c, r, color) -> Shape:
    return Shape("disc", np.asarray([c], float), color, r=r)


def _rect(cx, cy, w, h, color, angle=0.0) -> Shape:
    corners = np.array([[-w, -h], [w, -h], [w, h], [-w, h]]) / 2
    return Shape("poly", corners @ _rotation(angle).T + (cx, cy), color)


def _ellipse(cx, cy, rx, ry, color) -> Shape:
    t = np.linspace(0, 2 * math.pi, 16, endpoint=False)
    return Shape("poly", np.stack([cx + rx * np.cos(t), cy + ry * np.sin(t)], 1), color)


def _affine(shapes: list[Shape], A: np.ndarray, b=(0.0, 0.0)) -> list[Shape]:
    """Map every shape through x -> A x + b; radii and widths scale by sqrt|det A|."""
    s = math.sqrt(abs(np.linalg.det(A)))
    return [replace(sh, pts=sh.pts @ A.T + b, r=sh.r * s, w=sh.w * s) for sh in shapes]


def _rotation(deg: float) -> np.ndarray:
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

def _hsv(h, s, v) -> tuple:
    return tuple(int(255 * x) for x in colorsys.hsv_to_rgb(h % 1.0, s, v))


def _shade(color, f) -> tuple:
    return tuple(int(min(255, c * f)) for c in color)


@dataclass
class Look:
    skin: tuple
    hair: tuple
    shirt: tuple
    pants: tuple


def _random_look(rng, background, variation: float) -> Look:
    skins = [(255, 220, 185), (234, 192, 134), (198, 134, 66), (141, 85, 36), (90, 56, 37)]
    hairs = [(20, 20, 20), (90, 60, 30), (200, 170, 90), (150, 150, 150), (120, 40, 20)]
    clothes = []
    for hue in (0.6, 0.08):  # shirt and trousers: blue and brown, shifted by up to variation * 180 degrees
        for _ in range(8):  # they must stand out from the background
            c = _hsv(hue + variation * rng.uniform(-0.5, 0.5), 0.7 + variation * rng.uniform(-0.4, 0.3),
                     0.5 + variation * rng.uniform(-0.3, 0.5))
            if np.abs(np.subtract(c, background)).sum() > 180:
                break
        clothes.append(c)
    skin = skins[rng.integers(len(skins))]
    return Look(_shade(skin, rng.uniform(0.9, 1.1)), hairs[rng.integers(len(hairs))], *clothes)


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
            elbow_prefer=((-0.2, 1.0), (-0.2, 1.0)), at=(0.0, 0.0), facing=1) -> Person:
    """A person with hand targets relative to the shoulder and feet relative to the hip.

    lean and head_tilt are degrees forward (negative: backward). Targets get a little
    jitter so that no two poses of a class are the same.
    """
    jitter = lambda v: np.asarray(v, float) + rng.normal(0, 0.015, 2)
    up = np.array([math.sin(math.radians(lean)), -math.cos(math.radians(lean))])
    hip, shoulder = np.zeros(2), TORSO * up
    head = shoulder + (HEAD_R + 0.035) * (_rotation(head_tilt) @ up)
    limbs = []
    for i in range(2):
        elbow, hand = _two_bone(shoulder, shoulder + jitter(hands[i]), UPPER_ARM, FOREARM, elbow_prefer[i])
        knee, foot = _two_bone(hip, jitter(feet[i]), THIGH, SHIN, (1.0, 0.0))
        limbs.append((elbow, hand, knee, foot))
    parts = {"back": [], "body": [], "front": []}
    for i, (elbow, hand, knee, foot) in enumerate(limbs):
        f = 1.0 if i == 0 else 0.75  # the far side is in shadow
        leg = [_line([hip, knee, foot], 0.075, _shade(look.pants, f)),
               _line([foot, foot + (0.05, 0.0)], 0.045, DARK)]
        arm = [_line([shoulder, elbow], 0.06, _shade(look.shirt, f)),
               _line([elbow, hand], 0.045, _shade(look.skin, f)), _disc(hand, 0.03, _shade(look.skin, f))]
        parts["back" if i else "body"] += leg
        parts["back" if i else "front"] += arm
    face = _rotation(head_tilt + lean)
    parts["body"][:0] = [_line([hip, shoulder], 0.11, look.shirt)]
    parts["body"] += [_disc(head + face @ (-0.02, -0.015), HEAD_R, look.hair),
                      _disc(head + face @ (0.01, 0.01), HEAD_R * 0.9, look.skin),
                      _disc(head + face @ (0.05, -0.015), 0.013, DARK)]
    if mouth_open:
        parts["body"].append(_ellipse(*(head + face @ (0.055, 0.045)), 0.035, 0.03, (120, 10, 20)))
    A, b = np.diag([facing, 1.0]), np.asarray(at)  # place and turn the person
    return Person(*(_affine(parts[k], A, b) for k in ("back", "body", "front")),
                  head=A @ head + b, hands=[A @ limb[1] + b for limb in limbs])


STAND = ((0.04, 0.39), (-0.04, 0.39))
ARMS_DOWN = ((0.03, 0.29), (-0.03, 0.29))


def _phone(center, angle, rng) -> list[Shape]:
    screen = _hsv(rng.uniform(0.45, 0.65), 0.4, 1.0)
    return [_rect(*center, 0.06, 0.11, DARK, angle), _rect(*center, 0.04, 0.08, screen, angle)]


def _chair(rng) -> list[Shape]:
    wood = _hsv(rng.uniform(0.05, 0.12), rng.uniform(0.3, 0.8), rng.uniform(0.3, 0.7))
    return [_line([(-0.15, -0.28), (-0.13, 0.05), (0.13, 0.05)], 0.04, wood),
            _line([(-0.12, 0.05), (-0.12, 0.28)], 0.03, wood), _line([(0.11, 0.05), (0.11, 0.28)], 0.03, wood)]


def _table(rng, top_y, x0=0.2, x1=0.6) -> list[Shape]:
    color = _hsv(rng.uniform(0.0, 1.0), rng.uniform(0.0, 0.5), rng.uniform(0.35, 0.75))
    return [_rect((x0 + x1) / 2, top_y + 0.02, x1 - x0, 0.04, color),
            _line([(x0 + 0.04, top_y), (x0 + 0.04, 0.28)], 0.03, color),
            _line([(x1 - 0.04, top_y), (x1 - 0.04, 0.28)], 0.03, color)]


def _seated(rng, look, hands) -> Person:
    """A person sitting on a chair; the chair is part of the person's back layer."""
    p = _person(rng, look, hands, ((0.22, 0.26), (0.2, 0.27)), lean=rng.uniform(-5, 8))
    p.back[:0] = _chair(rng)
    return p


# ---------------------------------------------------------------- one scene per class

def _calling(rng, look, other):
    p = _person(rng, look, ((0.03, -0.1), ARMS_DOWN[1] if rng.random() < 0.6 else (-0.07, 0.15)), STAND,
                lean=rng.uniform(-4, 6), elbow_prefer=((1.0, 0.3), (-0.2, 1.0)))
    phone = _phone(p.head + (0.0, 0.01), rng.uniform(-20, 0), rng)
    return p.back + p.body + phone + p.front


def _texting(rng, look, other):
    p = _person(rng, look, ((0.14, 0.1), (0.12, 0.11)), STAND, head_tilt=rng.uniform(15, 30))
    phone = _phone(p.hands[0] + (0.02, -0.04), rng.uniform(-70, -40), rng)
    return p.back + p.body + phone + p.front


def _clapping(rng, look, other):
    p = _person(rng, look, ((0.22, -0.06), (0.21, -0.05)), STAND, lean=rng.uniform(-4, 4))
    c, n = p.hands[0], rng.integers(2, 4)
    lines = [_line([c + 0.06 * d, c + 0.12 * d], 0.02, DARK)
             for a in np.linspace(-60, 60, n) + rng.uniform(-10, 10)
             for d in [np.array([math.cos(math.radians(a)), math.sin(math.radians(a))])]]
    return p.shapes + lines


def _cycling(rng, look, other):
    frame_c = _hsv(rng.random(), rng.uniform(0.6, 1.0), rng.uniform(0.5, 1.0))
    rear, front, seat, bars, crank = (np.array(v) for v in
                                      ((-0.3, 0.3), (0.35, 0.3), (0.0, 0.05), (0.28, -0.12), (0.03, 0.3)))
    wheels = [Shape("ring", np.array([c]), DARK, r=0.16, w=0.035) for c in (rear, front)]
    frame = [_line([rear, seat, crank, rear], 0.035, frame_c), _line([seat, bars, front], 0.035, frame_c),
             _line([crank, bars + (0.0, 0.06)], 0.035, frame_c)]
    a = rng.uniform(0, 2 * math.pi)
    pedals = [crank + 0.08 * np.array([math.cos(a + k * math.pi), math.sin(a + k * math.pi)]) for k in (0, 1)]
    p = _person(rng, look, (bars - (0.08, -0.28), bars - (0.1, -0.28)), pedals, lean=rng.uniform(20, 35))
    return wheels + p.back + frame + p.body + p.front


def _dancing(rng, look, other):
    hands = [((0.12, -0.27), (-0.12, -0.26)), ((0.05, -0.29), (-0.29, -0.02)), ((0.27, -0.1), (-0.2, -0.2))]
    feet = [((0.22, 0.25), (-0.03, 0.39)), ((0.2, 0.33), (-0.2, 0.33))]
    p = _person(rng, look, hands[rng.integers(3)], feet[rng.integers(2)], lean=rng.uniform(-12, 12))
    return p.shapes


def _drinking(rng, look, other):
    p = _person(rng, look, ((0.1, -0.07), ARMS_DOWN[1]), STAND, head_tilt=rng.uniform(-25, -10))
    cup_c = _hsv(rng.random(), rng.uniform(0.5, 1.0), rng.uniform(0.6, 1.0))
    cup = [_rect(*(p.hands[0] + (0.03, -0.04)), 0.07, 0.1, cup_c, rng.uniform(-35, -15))]
    return p.back + p.body + cup + p.front


def _eating(rng, look, other):
    seated = rng.random() < 0.5
    top = -0.07 if seated else -0.02
    plate = [_ellipse(0.38, top - 0.015, 0.11, 0.025, (240, 240, 235))]
    plate += [_disc((0.33 + 0.05 * k, top - 0.035), 0.025, _hsv(rng.uniform(0, 0.35), 0.8, 0.8)) for k in range(2)]
    hands = ((0.1, -0.07), (0.3, 0.26) if seated else ARMS_DOWN[1])
    p = _seated(rng, look, hands) if seated else _person(rng, look, hands, STAND)
    fork = [_line([p.hands[0] + (0.0, 0.02), p.hands[0] + (0.05, -0.05)], 0.018, (160, 160, 170))]
    return _table(rng, top) + plate + p.shapes + fork


def _fighting(rng, look, other):
    d = rng.uniform(0.5, 0.6)
    punch, guard, stance = (0.29, 0.0), (0.12, -0.1), ((0.16, 0.36), (-0.14, 0.36))
    a = _person(rng, look, (punch, guard), stance, lean=rng.uniform(5, 15))
    b = _person(rng, other, (guard, punch) if rng.random() < 0.5 else (punch, guard), stance,
                lean=rng.uniform(5, 15), at=(d, 0.0), facing=-1)
    return a.shapes + b.shapes


def _hugging(rng, look, other):
    d = rng.uniform(0.16, 0.22)
    arms = ((0.2, 0.05), (0.19, 0.0))
    a = _person(rng, look, arms, STAND, lean=rng.uniform(5, 12), elbow_prefer=((0.0, 1.0), (0.0, 1.0)))
    b = _person(rng, other, arms, STAND, lean=rng.uniform(5, 12), at=(d, 0.0), facing=-1)
    return a.back + b.back + a.body + b.body + b.front + a.front


def _laughing(rng, look, other):
    p = _person(rng, look, ((0.1, 0.2), (0.08, 0.22)), STAND, lean=rng.uniform(-15, -6),
                head_tilt=rng.uniform(-30, -15), mouth_open=True, elbow_prefer=((-1.0, 0.2), (-1.0, 0.2)))
    return p.shapes


def _listening_to_music(rng, look, other):
    p = _person(rng, look, ARMS_DOWN, STAND, lean=rng.uniform(-6, 6), head_tilt=rng.uniform(-10, 10))
    color = DARK if rng.random() < 0.5 else _hsv(rng.random(), 0.9, 0.9)
    t = np.linspace(math.pi * 1.1, math.pi * 1.9, 8)
    band = _line(p.head + (HEAD_R + 0.02) * np.stack([np.cos(t), np.sin(t)], 1), 0.03, color)
    notes = []
    for k in range(rng.integers(1, 3)):
        c = p.head + (0.2 + 0.1 * k + rng.uniform(-0.03, 0.03), -0.05 - rng.uniform(0, 0.1))
        notes += [_disc(c, 0.025, DARK), _line([c + (0.022, 0.0), c + (0.022, -0.09), c + (0.06, -0.06)], 0.015, DARK)]
    return p.shapes + [band, _disc(p.head + (-0.035, 0.0), 0.045, color)] + notes


def _running(rng, look, other):
    arms, legs = ((0.16, 0.05), (-0.17, 0.12)), ((0.23, 0.29), (-0.26, 0.24))
    if rng.random() < 0.5:
        arms, legs = arms[::-1], legs[::-1]
    return _person(rng, look, arms, legs, lean=rng.uniform(10, 22)).shapes


def _sitting(rng, look, other):
    return _seated(rng, look, ((0.18, 0.28), (0.15, 0.29))).shapes


def _sleeping(rng, look, other):
    sheet = _hsv(rng.random(), rng.uniform(0.1, 0.5), rng.uniform(0.7, 1.0))
    wood = _hsv(rng.uniform(0.05, 0.12), rng.uniform(0.3, 0.8), rng.uniform(0.3, 0.6))
    bed = [_rect(-0.66, -0.02, 0.05, 0.34, wood), _rect(-0.07, 0.13, 1.18, 0.06, wood),
           _rect(-0.07, 0.08, 1.14, 0.06, sheet), _line([(-0.6, 0.16), (-0.6, 0.26)], 0.04, wood),
           _line([(0.48, 0.16), (0.48, 0.26)], 0.04, wood), _ellipse(-0.5, 0.02, 0.1, 0.045, (245, 245, 245))]
    body = _affine(_person(rng, look, ARMS_DOWN, ((0.02, 0.39), (-0.02, 0.39)), head_tilt=rng.uniform(-15, 15)).shapes,
                   _rotation(-90), (0.0, 0.0))
    blanket = []
    if rng.random() < 0.6:
        blanket_c = _hsv(rng.random(), rng.uniform(0.3, 0.8), rng.uniform(0.5, 0.9))
        blanket = [Shape("poly", np.array([(-0.32, -0.05), (0.46, -0.04), (0.5, 0.08), (-0.34, 0.08)]), blanket_c)]
    return bed + body + blanket


def _using_laptop(rng, look, other):
    top = -0.07
    shell = _hsv(0, 0, rng.uniform(0.25, 0.75))
    x = rng.uniform(0.22, 0.26)
    laptop = [_rect(x + 0.1, top - 0.012, 0.22, 0.025, shell),
              _line([(x + 0.2, top - 0.02), (x + 0.24, top - 0.2)], 0.035, shell),
              _line([(x + 0.19, top - 0.035), (x + 0.225, top - 0.19)], 0.012, _hsv(0.58, 0.4, 1.0))]
    return _table(rng, top) + laptop + _seated(rng, look, ((0.33, 0.19), (0.3, 0.2))).shapes


SCENES = {name: globals()[f"_{name}"] for name in CLASS_NAMES}  # "calling" -> _calling, ...


# ---------------------------------------------------------------- rendering

def _background(rng, size: int, variation: float) -> Image.Image:
    base = _hsv(rng.random(), rng.uniform(0.05, 0.6), rng.uniform(0.35, 0.95))
    img = Image.new("RGB", (size, size), base)
    draw = ImageDraw.Draw(img)
    style = rng.integers(3) if rng.random() < variation else 0
    if style == 1:  # vertical gradient
        other = _shade(base, rng.uniform(0.6, 1.3))
        for y in range(0, size, 4):
            t = y / size
            draw.rectangle([0, y, size, y + 4], fill=tuple(int(a + (b - a) * t) for a, b in zip(base, other)))
    elif style == 2:  # wallpaper stripes
        step = int(rng.integers(size // 12, size // 5))
        for x in range(0, size, step):
            draw.rectangle([x, 0, x + step // 3, size], fill=_shade(base, 0.85))
    horizon = int(size * rng.uniform(0.55, 0.85))
    draw.rectangle([0, horizon, size, size], fill=_shade(base, rng.uniform(0.55, 0.85)))
    for _ in range(rng.integers(0, 3) if rng.random() < variation else 0):  # faded distractors
        color = tuple(int(0.6 * a + 0.4 * b) for a, b in zip(base, _hsv(rng.random(), 0.6, rng.uniform(0.3, 1.0))))
        x, y = rng.uniform(0, size, 2)
        w, h = rng.uniform(0.08, 0.3, 2) * size
        (draw.ellipse if rng.random() < 0.5 else draw.rectangle)([x, y, x + w, y + h], fill=color)
    return img


def _draw(draw: ImageDraw.ImageDraw, shape: Shape) -> None:
    pts = [tuple(p) for p in shape.pts]
    if shape.kind == "line":
        draw.line(pts, fill=shape.color, width=max(1, round(shape.w)))
        for x, y in pts:  # round joints and caps
            draw.ellipse([x - shape.w / 2, y - shape.w / 2, x + shape.w / 2, y + shape.w / 2], fill=shape.color)
    elif shape.kind == "poly":
        draw.polygon(pts, fill=shape.color)
    else:
        (x, y), r = pts[0], shape.r
        if shape.kind == "disc":
            draw.ellipse([x - r, y - r, x + r, y + r], fill=shape.color)
        else:
            draw.ellipse([x - r, y - r, x + r, y + r], outline=shape.color, width=max(1, round(shape.w)))


def render(class_name: str, rng: np.random.Generator, image_size: int = 64, variation: float = 1.0) -> Image.Image:
    """One image of `class_name`, fully determined by the state of `rng`.

    `variation` in [0, 1] scales the nuisances: placement, size, rotation, clothes colours,
    background clutter and noise. At 0 the scene is centred at a fixed size in blue and brown
    clothes on a plain background (the pose, props, skin, hair, background colour and mirror
    still vary).
    """
    size = image_size * SUPERSAMPLE
    img = _background(rng, size, variation)
    bg = img.getpixel((size // 2, size // 4))
    shapes = SCENES[class_name](rng, _random_look(rng, bg, variation), _random_look(rng, bg, variation))
    shapes = _affine(shapes, _rotation(variation * rng.uniform(-6, 6)))
    lo = np.min([sh.pts.min(0) - sh.r - sh.w / 2 for sh in shapes], axis=0)
    hi = np.max([sh.pts.max(0) + sh.r + sh.w / 2 for sh in shapes], axis=0)
    scale = (0.9 - variation * rng.uniform(0, 0.18)) * size / (hi - lo).max()  # the scene fills 72-90%
    offset = (0.5 + variation * rng.uniform(-0.3, 0.3, 2)) * (size - scale * (hi - lo)) - scale * lo
    draw = ImageDraw.Draw(img)
    for shape in _affine(shapes, np.eye(2) * scale, offset):
        _draw(draw, shape)
    img = img.reduce(SUPERSAMPLE)
    if rng.random() < 0.5:
        img = img.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    pixels = np.asarray(img, np.float32) + rng.normal(0, variation * rng.uniform(2, 6), (image_size, image_size, 3))
    return Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))


def _rng(seed: int, split: str, class_id: int, index: int) -> np.random.Generator:
    return np.random.default_rng([seed, ("train", "test", "flat").index(split), class_id, index])


def _prepare_out_dir(out_dir: Path, overwrite: bool, owned: tuple[str, ...]) -> None:
    if out_dir.exists() and any(out_dir.iterdir()):
        if not overwrite:
            raise ValueError(f"{out_dir} is not empty: choose a new directory or pass overwrite=True (--overwrite).")
        for name in owned:
            target = out_dir / name
            if target.is_dir():
                shutil.rmtree(target)
            elif target.exists():
                target.unlink()
    out_dir.mkdir(parents=True, exist_ok=True)


def generate(out_dir: str | Path, train_per_class: int = 60, test_per_class: int = 20, image_size: int = 64,
             seed: int = 0, variation: float = 1.0, overwrite: bool = False) -> list[str]:
    """Write out_dir/{train,test}/<class>/NNNN.png for the 15 HAR classes; returns the class names.

    Same arguments, same bytes. About 2-4 ms per 64 px image. With overwrite=True only
    out_dir/train and out_dir/test are replaced.
    """
    if min(train_per_class, test_per_class) < 1 or image_size < 16 or not 0 <= variation <= 1:
        raise ValueError(f"need at least 1 train and 1 test image per class, image_size >= 16 and variation in "
                         f"[0, 1], got {train_per_class}, {test_per_class}, {image_size} and {variation}.")
    out_dir = Path(out_dir)
    _prepare_out_dir(out_dir, overwrite, ("train", "test"))
    for split, count in (("train", train_per_class), ("test", test_per_class)):
        for class_id, name in enumerate(CLASS_NAMES):
            folder = out_dir / split / name
            folder.mkdir(parents=True)
            for i in range(count):
                render(name, _rng(seed, split, class_id, i), image_size, variation).save(folder / f"{i:04d}.png")
    return list(CLASS_NAMES)


def write_flat_csv_layout(out_dir: str | Path, per_class: int = 10, image_size: int = 32, seed: int = 0,
                          class_names: tuple[str, ...] = CLASS_NAMES, overwrite: bool = False) -> tuple[Path, Path]:
    """The layout the HAR dataset is distributed in: out_dir/images/Image_<k>.png (classes shuffled
    together) and out_dir/labels.csv with a `filename,label` header. Returns (csv_path, images_dir)."""
    out_dir = Path(out_dir)
    _prepare_out_dir(out_dir, overwrite, ("images", "labels.csv"))
    images = out_dir / "images"
    images.mkdir()
    labels = [name for name in class_names for _ in range(per_class)]
    order = np.random.default_rng(seed).permutation(len(labels))
    rows = []
    for k, j in enumerate(order, start=1):
        name = labels[j]
        render(name, _rng(seed, "flat", CLASS_NAMES.index(name), int(j)), image_size).save(images / f"Image_{k}.png")
        rows.append((f"Image_{k}.png", name))
    csv_path = out_dir / "labels.csv"
    with open(csv_path, "w", newline="") as f:
        csv.writer(f).writerows([("filename", "label"), *rows])
    return csv_path, images
