"""The demo's synthetic HAR-like world (`python -m har_ref synth`), drawn with PIL.ImageDraw.

Each of the 15 HAR actions is a cartoon scene (scenes.py): a person whose pose and props show the
action. calling / texting, eating / drinking and sitting / using_laptop differ only in a prop or
where it is held. Around the scene, nuisances that a model must learn to ignore, scaled by
`variation` v in [0, 1] (`Style.of`; the demo draws at `VARIATION` = 0.7):

- place and size: the scene's longer side fills 0.9 - 0.08 v to 0.9 of the image and it moves by up
  to 6 v % of the room left around it, each way; a rotation of up to 3 v degrees; pose jitter (hand
  and foot targets, standard deviation 0.015 + 0.01 v figure units);
- people: clothes hues up to 36 v degrees away from a blue shirt and brown trousers, skin shade
  1 +- (0.1 + 0.15 v) on five tones;
- the room: a patterned wall in 2/3 v of the images, faded blobs on it in v of them, and up to
  round(3 v) distractors: props of other classes lying at any angle (a cup in a texting scene, a
  bicycle behind a sleeper), drawn with the props' own shapes (scenes.py::DISTRACTORS);
- light: each colour channel's gain is 1 +- 0.15 v (brightness and colour cast), then pixel noise
  with a standard deviation of v * U(2, 6) grey levels.

The wall's hue and brightness, the hair, the props' colours and the mirror image vary at any v. At
v = 0 nothing else does: that is the plain world the shipped tiny checkpoints were pretrained on
(pretrain.py), and since a nuisance draws from the generator only when the style asks for it, those
scenes are the same as before the nuisances existed.

The rule that separates the splits (both share the nuisances above):

- ID (train/, test/): the wall is plain or, in 2/3 v of the images, has a vertical gradient or
  vertical stripes; its colour has a saturation of 0.05-0.6; shapes are drawn flat.
- Shift (test_shift/), a style no training image shows: every wall is a checkerboard or polka dots,
  its colour has a saturation of 0.65-0.9 (a palette ID never uses), and every shape has a dark ink
  outline 0.012 figure units wide.

boxes.json records, per image, the person's box (the union of the person's shapes, both people in
fighting and hugging), the action prop's (its objects and marks; null for dancing, fighting,
hugging, laughing, running) and each distractor's: integer pixel edges [x0, y0, x1, y1] of the saved
image, x0 <= x < x1, after scaling, placement, downsampling and mirroring, clipped to the image.

Every image has its own numpy Generator seeded by (seed, split, class, index): the same seed gives
byte-identical files, and asking for more images never changes the existing ones.
"""
from __future__ import annotations

import json
import math
import shutil
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from .scenes import CLASS_NAMES, DARK, DISTRACTORS, SCENES, Look, Shape, affine, hsv, random_look, rotation, shade
from .tiny import IMAGE_SIZE

__all__ = ["CLASS_NAMES", "Style", "render", "draw_scene", "generate"]

# The demo's world: `generate`'s and so `python -m har_ref synth`'s defaults (demo.py::demo_dataset draws it);
# test_shift/ holds as many images per class as test/.
TRAIN_PER_CLASS, TEST_PER_CLASS, VARIATION = 100, 100, 0.7
SPLITS = ("train", "test", "test_shift")
SUPERSAMPLE = 2  # draw at 2x and box-downsample: anti-aliased edges at no extra dependency


@dataclass(frozen=True)
class Style:
    """How one split's pictures vary (`Style.of`)."""
    fill: tuple[float, float]  # the scene's longer side, as a share of the image
    offset: float  # the scene moves by up to this share of the room left around it, each way
    rotation: float  # degrees, each way
    jitter: float  # standard deviation of the pose's hand and foot targets (figure units; scenes._person)
    clothes: float  # clothes hues move by up to this * 180 degrees from blue and brown (scenes.random_look)
    skin: float  # skin shade spread (scenes.random_look)
    walls: tuple[str, ...]  # wall patterns to draw from ...
    patterned: float  # ... for this share of the images (the others are plain)
    saturation: tuple[float, float]  # of the wall colour
    clutter: float  # share of images with 0-2 faded blobs on the wall
    distractors: int  # up to this many props of other classes lie around
    light: float  # each colour channel's gain is 1 +- light
    noise: float  # pixel noise standard deviation, times U(2, 6) grey levels
    ink: float  # width of a dark outline around every shape (figure units), 0 for none

    @classmethod
    def of(cls, variation: float, shifted: bool = False) -> Style:
        v = variation
        return cls(fill=(0.9 - 0.08 * v, 0.9), offset=0.06 * v, rotation=3 * v, jitter=0.015 + 0.01 * v,
                   clothes=0.2 * v, skin=0.1 + 0.15 * v,
                   walls=("checks", "dots") if shifted else ("gradient", "stripes"),
                   patterned=1.0 if shifted else 2 / 3 * v, saturation=(0.65, 0.9) if shifted else (0.05, 0.6),
                   clutter=v, distractors=round(3 * v), light=0.15 * v, noise=v, ink=0.012 if shifted else 0.0)


# ---------------------------------------------------------------- rendering

def _background(rng, size: int, style: Style) -> tuple[Image.Image, str]:
    """The wall and floor, and the name of the wall's pattern."""
    base = hsv(rng.random(), rng.uniform(*style.saturation), rng.uniform(0.35, 0.95))
    img = Image.new("RGB", (size, size), base)
    draw = ImageDraw.Draw(img)
    wall = style.walls[rng.integers(len(style.walls))] if rng.random() < style.patterned else "plain"
    if wall == "gradient":  # vertical
        other = shade(base, rng.uniform(0.6, 1.3))
        for y in range(0, size, 4):
            t = y / size
            draw.rectangle([0, y, size, y + 4], fill=tuple(int(a + (b - a) * t) for a, b in zip(base, other)))
    step = int(rng.integers(size // 12, size // 5)) if wall in ("stripes", "checks", "dots") else 0
    if wall == "stripes":  # vertical
        for x in range(0, size, step):
            draw.rectangle([x, 0, x + step // 3, size], fill=shade(base, 0.85))
    elif wall == "checks":
        for x in range(0, size, step):
            for y in range(0, size, step):
                if (x + y) // step % 2:
                    draw.rectangle([x, y, x + step - 1, y + step - 1], fill=shade(base, 0.8))
    elif wall == "dots":
        for x in range(step // 2, size, step):
            for y in range(step // 2, size, step):
                draw.ellipse([x - step / 4, y - step / 4, x + step / 4, y + step / 4], fill=shade(base, 0.75))
    horizon = int(size * rng.uniform(0.55, 0.85))
    draw.rectangle([0, horizon, size, size], fill=shade(base, rng.uniform(0.55, 0.85)))
    for _ in range(rng.integers(0, 3) if rng.random() < style.clutter else 0):  # faded blobs
        color = tuple(int(0.6 * a + 0.4 * b) for a, b in zip(base, hsv(rng.random(), 0.6, rng.uniform(0.3, 1.0))))
        x, y = rng.uniform(0, size, 2)
        w, h = rng.uniform(0.08, 0.3, 2) * size
        (draw.ellipse if rng.random() < 0.5 else draw.rectangle)([x, y, x + w, y + h], fill=color)
    return img, wall


def paint(draw: ImageDraw.ImageDraw, shape: Shape, ink: float = 0.0) -> None:
    """Draw one shape (pixel units); `ink` > 0 first draws it `ink` wider all round in dark ink."""
    pts = [tuple(p) for p in shape.pts]
    if shape.kind == "line":
        for w, color in ((shape.w + 2 * ink, DARK), (shape.w, shape.color)) if ink else ((shape.w, shape.color),):
            draw.line(pts, fill=color, width=max(1, round(w)))
            for x, y in pts:  # round joints and caps
                draw.ellipse([x - w / 2, y - w / 2, x + w / 2, y + w / 2], fill=color)
    elif shape.kind == "poly":
        if ink:  # PIL draws a polygon's outline inside its edge
            draw.polygon(pts, fill=shape.color, outline=DARK, width=max(1, round(ink)))
        else:
            draw.polygon(pts, fill=shape.color)
    else:
        (x, y), r = pts[0], shape.r
        if ink and shape.kind == "disc":
            draw.ellipse([x - r - ink, y - r - ink, x + r + ink, y + r + ink], fill=DARK)
        elif ink:  # PIL draws an ellipse's outline inside its box
            draw.ellipse([x - r - ink, y - r - ink, x + r + ink, y + r + ink], outline=DARK,
                         width=max(1, round(shape.w + 2 * ink)))
        if shape.kind == "disc":
            draw.ellipse([x - r, y - r, x + r, y + r], fill=shape.color)
        else:
            draw.ellipse([x - r, y - r, x + r, y + r], outline=shape.color, width=max(1, round(shape.w)))


def _extent(shapes: list[Shape]) -> tuple[np.ndarray, np.ndarray]:
    """Lowest and highest (x, y) of the shapes, each padded by r + w / 2: what places and sizes a scene."""
    lo = np.min([sh.pts.min(0) - sh.r - sh.w / 2 for sh in shapes], axis=0)
    hi = np.max([sh.pts.max(0) + sh.r + sh.w / 2 for sh in shapes], axis=0)
    return lo, hi


def _box(shapes: list[Shape], ink: float, image_size: int, mirrored: bool) -> list[int] | None:
    """The pixel box [x0, y0, x1, y1] (x0 <= x < x1) of supersampled shapes in the saved image."""
    if not shapes:
        return None
    # how far each shape reaches past its points as `paint` draws it: a line's width is rounded to whole
    # pixels, a ring's outline lies inside r
    reach = [max(1, round(sh.w + 2 * ink), sh.w + 2 * ink) / 2 if sh.kind == "line" else
             0.0 if sh.kind == "poly" else sh.r + ink for sh in shapes]
    lo = np.min([sh.pts.min(0) - d for sh, d in zip(shapes, reach)], axis=0)
    hi = np.max([sh.pts.max(0) + d for sh, d in zip(shapes, reach)], axis=0)
    # PIL fills the pixel at each drawn coordinate: reach one pixel further at the high side
    x0, y0 = (max(0, math.floor(c / SUPERSAMPLE)) for c in lo)
    x1, y1 = (min(image_size, math.ceil((c + 1) / SUPERSAMPLE)) for c in hi)
    if x1 <= x0 or y1 <= y0:
        return None
    return [image_size - x1, y0, image_size - x0, y1] if mirrored else [x0, y0, x1, y1]


def _distractors(rng, class_name: str, style: Style, scale: float, size: int) -> list[list[Shape]]:
    """Up to style.distractors props of other classes, each at a random place, angle and size."""
    names = [name for name, (owners, _) in DISTRACTORS.items() if class_name not in owners]
    placed = []
    for _ in range(rng.integers(0, style.distractors + 1)):
        shapes = DISTRACTORS[names[rng.integers(len(names))]][1](rng)
        lo, hi = _extent(shapes)
        A = scale * rng.uniform(0.6, 1.0) * rotation(rng.uniform(-90, 90))
        at = rng.uniform(0.1, 0.9, 2) * size
        placed.append([replace(sh, part="distractor") for sh in affine(shapes, A, at - A @ ((lo + hi) / 2))])
    return placed


@dataclass
class SceneFacts:
    """What a drawn scene shows besides its action: for captions (captions.py) and boxes.json."""
    looks: tuple[Look, Look]  # the person (and the second person of fighting / hugging)
    background: tuple  # RGB behind the people's heads
    wall: str  # the wall's pattern: plain, gradient, stripes (ID) or checks, dots (shift)
    mirrored: bool  # flipped left-right: the person faces left
    boxes: dict  # {"person": box, "prop": box or None, "distractors": [box, ...]} (`_box`)


def render(class_name: str, rng: np.random.Generator, image_size: int = IMAGE_SIZE, variation: float = VARIATION,
           shifted: bool = False) -> Image.Image:
    """One image of `class_name`, fully determined by the state of `rng` (see the module docstring)."""
    return draw_scene(class_name, rng, image_size, variation, shifted)[0]


def draw_scene(class_name: str, rng: np.random.Generator, image_size: int = IMAGE_SIZE,
               variation: float = VARIATION, shifted: bool = False) -> tuple[Image.Image, SceneFacts]:
    """`render`, also returning what it drew (the same draws from `rng`, so the same image).

    The draws keep the order they had before the distractors, the light and the shift style existed,
    which draw only when the style asks for them: the pretraining scenes (v = 0) stay unchanged.
    """
    style = Style.of(variation, shifted)
    size = image_size * SUPERSAMPLE
    img, wall = _background(rng, size, style)
    bg = img.getpixel((size // 2, size // 4))
    looks = (random_look(rng, bg, style.clothes, style.skin), random_look(rng, bg, style.clothes, style.skin))
    shapes = SCENES[class_name](rng, *looks, style.jitter)
    shapes = affine(shapes, rotation(style.rotation * rng.uniform(-1, 1)))
    lo, hi = _extent(shapes)
    fill = style.fill[1] - (style.fill[1] - style.fill[0]) * rng.uniform(0, 1)
    scale = fill * size / (hi - lo).max()
    offset = (0.5 + style.offset * rng.uniform(-1, 1, 2)) * (size - scale * (hi - lo)) - scale * lo
    shapes = affine(shapes, np.eye(2) * scale, offset)
    distractors = _distractors(rng, class_name, style, scale, size) if style.distractors else []
    ink = style.ink * scale
    draw = ImageDraw.Draw(img)
    for shape in [sh for group in distractors for sh in group] + shapes:  # props lie behind the scene
        paint(draw, shape, ink)
    img = img.reduce(SUPERSAMPLE)
    mirrored = bool(rng.random() < 0.5)
    if mirrored:
        img = img.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    pixels = np.asarray(img, np.float32)
    if style.light:
        pixels = pixels * rng.uniform(1 - style.light, 1 + style.light, 3)
    pixels = pixels + rng.normal(0, style.noise * rng.uniform(2, 6), (image_size, image_size, 3))
    boxes = {part: _box([sh for sh in shapes if sh.part == part], ink, image_size, mirrored)
             for part in ("person", "prop")}
    boxes["distractors"] = [box for group in distractors if (box := _box(group, ink, image_size, mirrored))]
    return (Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)),
            SceneFacts(looks, bg, wall, mirrored, boxes))


def _rng(seed: int, split: str, class_id: int, index: int) -> np.random.Generator:
    return np.random.default_rng([seed, SPLITS.index(split), class_id, index])


def generate(out_dir: str | Path, train_per_class: int = TRAIN_PER_CLASS, test_per_class: int = TEST_PER_CLASS,
             shift_per_class: int | None = None, image_size: int = IMAGE_SIZE, seed: int = 0,
             variation: float = VARIATION, overwrite: bool = False) -> list[str]:
    """Write out_dir/{train,test,test_shift}/<class>/NNNN.png for the 15 HAR classes and out_dir/boxes.json
    ({"test/texting/0003.png": {"person": box, "prop": box or null, "distractors": [box, ...]}, ...});
    returns the class names. The defaults are the demo's world.

    shift_per_class None: as many as test_per_class; 0: no test_shift/. Same arguments, same bytes.
    With overwrite=True only those three folders and boxes.json are replaced.
    """
    shift_per_class = test_per_class if shift_per_class is None else shift_per_class
    if min(train_per_class, test_per_class) < 1 or shift_per_class < 0 or image_size < 16 or not 0 <= variation <= 1:
        raise ValueError(f"need at least 1 train and 1 test image per class, 0 or more shifted test images, "
                         f"image_size >= 16 and variation in [0, 1], got {train_per_class}, {test_per_class}, "
                         f"{shift_per_class}, {image_size} and {variation}.")
    out_dir = Path(out_dir)
    if out_dir.exists() and any(out_dir.iterdir()):
        if not overwrite:
            raise ValueError(f"{out_dir} is not empty: choose a new directory or pass overwrite=True (--overwrite).")
        for split in SPLITS:
            shutil.rmtree(out_dir / split, ignore_errors=True)
        (out_dir / "boxes.json").unlink(missing_ok=True)
    boxes = {}
    for split, count in zip(SPLITS, (train_per_class, test_per_class, shift_per_class)):
        for class_id, name in enumerate(CLASS_NAMES):
            for i in range(count):
                image, facts = draw_scene(name, _rng(seed, split, class_id, i), image_size, variation,
                                          shifted=split == "test_shift")
                path = Path(split, name, f"{i:04d}.png")
                (out_dir / path).parent.mkdir(parents=True, exist_ok=True)
                image.save(out_dir / path)
                boxes[path.as_posix()] = facts.boxes
    lines = [f"{json.dumps(path)}: {json.dumps(box)}" for path, box in boxes.items()]  # one image per line
    (out_dir / "boxes.json").write_text("{\n" + ",\n".join(lines) + "\n}\n")
    return list(CLASS_NAMES)
