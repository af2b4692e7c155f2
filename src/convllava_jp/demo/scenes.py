"""The synthetic world's scenes: 1-4 coloured shapes, one per cell of a 2x2 grid, and their images.

A scene is drawn from a numpy Generator and rendered with PIL; both are pure functions of the
generator's state, so the same (seed, stream, index) always gives the same pixels.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from types import MappingProxyType

import numpy as np
from PIL import Image, ImageDraw

from ..errors import ConfigError


@dataclass(frozen=True)
class Colour:
    name: str  # 赤
    adjective: str  # 赤い (before a noun: 赤い円)
    rgb: tuple[int, int, int]


POSITIONS = ("左上", "右上", "左下", "右下")  # grid order: row-major
COLOURS = (
    Colour("赤", "赤い", (215, 35, 35)),
    Colour("青", "青い", (35, 80, 225)),
    Colour("緑", "緑の", (30, 150, 50)),
    Colour("黄", "黄色い", (235, 190, 10)),
    Colour("紫", "紫の", (135, 50, 175)),
)
SHAPES = ("円", "四角", "三角", "星")
SIZES = ("large", "small")
MAX_SHAPES = len(POSITIONS)
COLOUR_BY_NAME = MappingProxyType({c.name: c for c in COLOURS})

# Image sizes as multiples of `image_size` (width, height). The grid is the image's quadrants, so
# "pad" preprocessing (centre on a square, then resize) keeps every shape in its quadrant.
ASPECTS = ((1.0, 1.0), (1.25, 1.25), (1.5, 1.0), (1.0, 1.5))
_RADIUS = MappingProxyType(
    {"large": 0.175, "small": 0.125}
)  # of the short side; the largest still fits its cell
_EXTENT = 1.21  # a shape's farthest point from its centre, in radii (a square's corners)
_NOISE = 4  # +- grey levels of pixel noise

# Independent random streams: each image / record draws from default_rng([seed, stream, index]).
TRAIN_STREAM, TEST_STREAM, PRETRAIN_STREAM, TEST_PLAN_STREAM, EXTRA_STREAM = range(5)


@dataclass(frozen=True)
class Shape:
    position: str
    colour: str
    shape: str
    size: str
    center: tuple[float, float]
    radius: float
    angle: float
    tint: tuple[int, int, int]  # small per-shape offset from the colour's base RGB

    @property
    def rgb(self) -> tuple[int, int, int]:
        base = COLOUR_BY_NAME[self.colour].rgb
        return tuple(int(min(255, max(0, b + t))) for b, t in zip(base, self.tint))

    def to_dict(self) -> dict:
        return {
            "position": self.position,
            "colour": self.colour,
            "shape": self.shape,
            "size": self.size,
            "center": list(self.center),
            "radius": self.radius,
            "angle": self.angle,
            "rgb": list(self.rgb),
        }


@dataclass(frozen=True)
class Scene:
    width: int
    height: int
    background: tuple[int, int, int]
    shapes: tuple[Shape, ...]  # in grid order

    def to_dict(self) -> dict:
        return {
            "width": self.width,
            "height": self.height,
            "background": list(self.background),
            "shapes": [s.to_dict() for s in self.shapes],
        }


def shape_dicts(scene: Scene | dict) -> list[dict]:
    """The shapes of a scene, or of a record's "scene" dict, as dicts."""
    return scene["shapes"] if isinstance(scene, dict) else [s.to_dict() for s in scene.shapes]


def sample_scene(rng: np.random.Generator, image_size: int, n_shapes: int | None = None) -> Scene:
    """A random scene: image size, distinct cells and colours, shapes, sizes, jitter, tints."""
    aw, ah = ASPECTS[int(rng.integers(len(ASPECTS)))]
    width, height = round(image_size * aw), round(image_size * ah)
    short = min(width, height)
    if n_shapes is None:
        n_shapes = int(rng.integers(1, MAX_SHAPES + 1))
    cells = sorted(int(c) for c in rng.choice(len(POSITIONS), n_shapes, replace=False))
    colours = [COLOURS[int(i)].name for i in rng.choice(len(COLOURS), n_shapes, replace=False)]
    grey = int(rng.integers(222, 250))
    background = tuple(int(v) for v in np.clip(grey + rng.integers(-6, 7, 3), 0, 255))
    shapes = []
    for cell, colour in zip(cells, colours):
        shape = SHAPES[int(rng.integers(len(SHAPES)))]
        size = SIZES[int(rng.integers(len(SIZES)))]
        radius = round(short * _RADIUS[size] * float(rng.uniform(0.9, 1.1)), 2)
        row, col = divmod(cell, 2)
        cell_w, cell_h = width / 2, height / 2
        # Jitter the centre, keeping the whole shape (plus 2 px) inside its cell.
        slack_x = max(0.0, cell_w / 2 - radius * _EXTENT - 2)
        slack_y = max(0.0, cell_h / 2 - radius * _EXTENT - 2)
        cx = (col + 0.5) * cell_w + float(rng.uniform(-slack_x, slack_x))
        cy = (row + 0.5) * cell_h + float(rng.uniform(-slack_y, slack_y))
        angle = round(float(rng.uniform(-15, 15)), 1)
        tint = tuple(int(v) for v in rng.integers(-12, 13, 3))
        shapes.append(
            Shape(POSITIONS[cell], colour, shape, size, (round(cx, 1), round(cy, 1)), radius, angle, tint)
        )
    return Scene(width, height, background, tuple(shapes))


def draw_scenes(
    seed: int, start: int, n: int, image_size: int = 128, min_shapes: int = 1
) -> list[tuple[Image.Image, dict]]:
    """`n` more scenes of the world (image, scene dict), numbered from `start`: an endless stream.

    Drawn like the training images but from a stream of their own, so they never repeat a
    training or test image; the same (seed, index) always gives the same scene. The demo's
    vision pretraining draws a fresh batch from it every step, so the tower cannot memorise
    its images. `min_shapes` > 1 draws only scenes with at least that many shapes (more labelled
    cells per image for that pretraining).
    """
    if not isinstance(n, int) or n < 0 or not isinstance(start, int) or start < 0:
        raise ConfigError(f"start and n must be integers >= 0, got start={start!r}, n={n!r}")
    if min_shapes not in range(1, MAX_SHAPES + 1):
        raise ConfigError(f"min_shapes must be in 1..{MAX_SHAPES}, got {min_shapes!r}")
    out = []
    for i in range(start, start + n):
        rng = np.random.default_rng([seed, EXTRA_STREAM, i])
        n_shapes = None if min_shapes == 1 else int(rng.integers(min_shapes, MAX_SHAPES + 1))
        scene = sample_scene(rng, image_size, n_shapes)
        out.append((render(scene, rng), scene.to_dict()))
    return out


def _polygon(shape: str, cx: float, cy: float, r: float, angle: float) -> list[tuple[float, float]]:
    if shape == "四角":
        corners = [(45 + 90 * k, 0.85 * math.sqrt(2) * r) for k in range(4)]
    elif shape == "三角":
        corners = [(-90 + 120 * k, 1.1 * r) for k in range(3)]
    else:  # 星: five outer tips and five inner corners
        corners = [(-90 + 36 * k, 1.12 * r if k % 2 == 0 else 0.45 * r) for k in range(10)]
    a = math.radians(angle)
    return [
        (cx + d * math.cos(math.radians(t) + a), cy + d * math.sin(math.radians(t) + a)) for t, d in corners
    ]


def render(scene: Scene, rng: np.random.Generator) -> Image.Image:
    """The scene's image, with per-pixel brightness noise drawn from `rng`."""
    image = Image.new("RGB", (scene.width, scene.height), scene.background)
    draw = ImageDraw.Draw(image)
    for s in scene.shapes:
        cx, cy = s.center
        if s.shape == "円":
            draw.ellipse((cx - s.radius, cy - s.radius, cx + s.radius, cy + s.radius), fill=s.rgb)
        else:
            draw.polygon(_polygon(s.shape, cx, cy, s.radius, s.angle), fill=s.rgb)
    pixels = np.asarray(image, dtype=np.int16)
    # Brightness noise (one value per pixel for all channels): as good a nuisance as colour noise
    # and half the PNG size and encoding time.
    noise = rng.integers(-_NOISE, _NOISE + 1, (*pixels.shape[:2], 1), dtype=np.int16)
    return Image.fromarray(np.clip(pixels + noise, 0, 255).astype(np.uint8))
