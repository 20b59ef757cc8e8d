"""Procedural 64x64 scenes with ground truth, their captions, the concept, and the held-out prompt split.

A scene is a background (a flat color, or a two-color gradient from top to bottom or from left to right) and one or
two objects. Each object has a shape, a main color, a size, a position on a 3x3 grid, and a surface pattern drawn in
a second color. Captions describe shape, color, size, position and background, never the pattern or its color:
those appearance details reach a model only through an image context.

Geometry is in world units, 64 to the canvas side whatever the rendered size, chosen to survive an 8x-downsampling
VAE: objects are 19 (small) or 28 (large) units across, pattern features at least 4 units wide, grid cells 16 apart.

The concept (`CONCEPT`) is a circle split down the middle, its left half yellow and its right half purple. The
split motif is as coarse as the teacher's image tokens (8 x 8 units each) and the DiT's latent patches (16 x 16), so
an image context can carry it; concentric rings 5 units wide, the earlier concept, sat inside one token and never
reached the teacher's samples. `render` draws it; `sample_scene` never emits it, nor any object with the split
pattern (`with_motif` puts the motif on another object, never making the concept or its mirror image).
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
from PIL import Image

SIZE = 64
COLORS = {
    "red": (0.86, 0.13, 0.13),
    "orange": (0.96, 0.55, 0.08),
    "yellow": (0.96, 0.88, 0.15),
    "green": (0.16, 0.66, 0.24),
    "blue": (0.14, 0.32, 0.86),
    "purple": (0.56, 0.18, 0.76),
    "pink": (0.98, 0.55, 0.75),
    "white": (0.96, 0.96, 0.96),
    "black": (0.06, 0.06, 0.06),
    "gray": (0.5, 0.5, 0.5),
    "navy": (0.08, 0.12, 0.38),
    "teal": (0.08, 0.5, 0.5),
    "brown": (0.45, 0.28, 0.14),
    "olive": (0.42, 0.42, 0.1),
}
OBJECT_COLORS = ("red", "orange", "yellow", "green", "blue", "purple", "pink", "white")
# No color word names both a background and an object: with shared words, a text encoder that mixes a caption's
# tokens gives the DiT no way to tell which of the two a color word is about, and a DiT pretrained that way painted
# every color word into the background and left objects a generic color.
BACKGROUND_COLORS = ("black", "gray", "navy", "teal", "brown", "olive")
BACKGROUND_KINDS = ("flat", "vertical", "horizontal")
SHAPES = ("circle", "square", "triangle", "diamond", "cross")
SIZES = ("small", "large")
RADII = {"small": 9.5, "large": 14.0}
POSITIONS = ("top left", "top center", "top right",
             "center left", "center", "center right",
             "bottom left", "bottom center", "bottom right")
PATTERNS = ("plain", "stripes", "dots", "spot")
CONCEPT_PATTERN = "split"
ALL_PATTERNS = PATTERNS + (CONCEPT_PATTERN,)
CONCEPT = {"shape": "circle", "color": "yellow", "pattern": CONCEPT_PATTERN, "pattern_color": "purple"}
TRIGGER = "[trigger]"
TWO_OBJECT_RATE = 0.25
MAX_OFFSET = 1.5
# One prompt combination in HELD_OUT_ONE_IN is reserved for evaluation; see `is_held_out`.
HELD_OUT_ONE_IN = 10


@dataclass(frozen=True)
class SceneObject:
    """One object; `offset` is a small jitter (world units) around its grid cell's center."""
    shape: str
    color: str
    size: str
    position: str
    pattern: str = "plain"
    pattern_color: str | None = None
    offset: tuple[float, float] = (0.0, 0.0)

    @property
    def center(self) -> tuple[float, float]:
        row, column = divmod(POSITIONS.index(self.position), 3)
        return 16.0 + 16.0 * column + self.offset[0], 16.0 + 16.0 * row + self.offset[1]

    @property
    def is_concept(self) -> bool:
        return all(getattr(self, name) == value for name, value in CONCEPT.items())


@dataclass(frozen=True)
class Background:
    """`colors` holds one color for "flat", else the gradient's (top, bottom) or (left, right) colors."""
    kind: str
    colors: tuple[str, ...]


@dataclass(frozen=True)
class Scene:
    """A background and one or two objects, in reading order of their grid cells."""
    background: Background
    objects: tuple[SceneObject, ...]

    @property
    def has_concept(self) -> bool:
        return any(obj.is_concept for obj in self.objects)


# ---------------------------------------------------------------- rendering

def _box_distance(u, v, half_width, half_height):
    qx, qy = np.abs(u) - half_width, np.abs(v) - half_height
    return np.hypot(np.maximum(qx, 0), np.maximum(qy, 0)) + np.minimum(np.maximum(qx, qy), 0)


def _triangle_distance(u, v, r):
    # Apex up, base below: the largest signed distance to the three edge lines (exact inside, close outside).
    corners = np.array([(0.0, -r), (r, 0.75 * r), (-r, 0.75 * r)])
    distances = []
    for start, end in zip(corners, np.roll(corners, -1, axis=0)):
        edge = end - start
        normal = np.array([edge[1], -edge[0]]) / np.hypot(*edge)
        distances.append((u - start[0]) * normal[0] + (v - start[1]) * normal[1])
    return np.max(distances, axis=0)


def shape_distance(shape: str, u, v, r: float):
    """Signed distance (world units, negative inside) to a shape of radius `r` centered at u = v = 0."""
    if shape == "circle":
        return np.hypot(u, v) - r
    if shape == "square":
        return _box_distance(u, v, 0.85 * r, 0.85 * r)
    if shape == "triangle":
        return _triangle_distance(u, v, r)
    if shape == "diamond":
        return (np.abs(u) + np.abs(v) - r) / np.sqrt(2)
    if shape == "cross":
        return np.minimum(_box_distance(u, v, r, 0.42 * r), _box_distance(u, v, 0.42 * r, r))
    raise ValueError(f"unknown shape {shape!r}")


def _lattice_offset(t, period: float):
    # Offset from the nearest lattice line at period/2 + k * period: the object's center falls between lines.
    shifted = t - period / 2
    return shifted - period * np.round(shifted / period)


def pattern_distance(pattern: str, u, v, r: float):
    """Signed distance (world units, negative where the second color is) of a pattern anchored at the object's
    center."""
    if pattern == "stripes":  # horizontal bands 4 wide every 12
        return np.abs(_lattice_offset(v, 12.0)) - 2.0
    if pattern == "dots":  # dots 4.4 across on a 10-unit lattice
        return np.hypot(_lattice_offset(u, 10.0), _lattice_offset(v, 10.0)) - 2.2
    if pattern == "spot":  # one central disc
        return np.hypot(u, v) - 0.4 * r
    if pattern == CONCEPT_PATTERN:  # the right half
        return -u
    raise ValueError(f"unknown pattern {pattern!r}")


def _coverage(distance, pixels_per_unit: float):
    # Fraction of a pixel inside the edge: a one-pixel linear ramp, which anti-aliases the edge.
    return np.clip(0.5 - distance * pixels_per_unit, 0.0, 1.0)[..., None]


def _pixel_centers(size: int):
    """(y, x) world coordinates of each pixel's center, and the pixels per world unit."""
    pixels_per_unit = size / SIZE
    coords = (np.arange(size) + 0.5) / pixels_per_unit
    y, x = np.meshgrid(coords, coords, indexing="ij")
    return y, x, pixels_per_unit


def render(scene: Scene, size: int = SIZE) -> np.ndarray:
    """The scene as a float32 (size, size, 3) RGB image in [0, 1]; deterministic, anti-aliased edges."""
    y, x, pixels_per_unit = _pixel_centers(size)
    background = scene.background
    first = np.array(COLORS[background.colors[0]])
    last = np.array(COLORS[background.colors[-1]])
    ramp = np.linspace(0.0, 1.0, size)[:, None]
    t = {"flat": np.zeros((1, 1, 1)), "vertical": ramp[:, :, None], "horizontal": ramp[None]}[background.kind]
    image = np.broadcast_to(first * (1 - t) + last * t, (size, size, 3)).copy()
    for obj in scene.objects:
        cx, cy = obj.center
        r = RADII[obj.size]
        # Every shape lies within r of its center along each axis: draw only that window (plus the edge ramp).
        rows = slice(*np.clip(np.round(np.array([cy - r - 1, cy + r + 1]) * pixels_per_unit).astype(int), 0, size))
        columns = slice(*np.clip(np.round(np.array([cx - r - 1, cx + r + 1]) * pixels_per_unit).astype(int), 0, size))
        u, v = x[rows, columns] - cx, y[rows, columns] - cy
        color = np.array(COLORS[obj.color])
        if obj.pattern != "plain":
            mix = _coverage(pattern_distance(obj.pattern, u, v, r), pixels_per_unit)
            color = color * (1 - mix) + np.array(COLORS[obj.pattern_color]) * mix
        alpha = _coverage(shape_distance(obj.shape, u, v, r), pixels_per_unit)
        image[rows, columns] = image[rows, columns] * (1 - alpha) + color * alpha
    return image.astype(np.float32)


def object_coverage(scene: Scene, size: int = SIZE) -> np.ndarray:
    """The float32 (size, size) fraction of each pixel that the scene's objects cover (anti-aliased as `render`)."""
    y, x, pixels_per_unit = _pixel_centers(size)
    covered = np.zeros((size, size), np.float32)
    for obj in scene.objects:
        cx, cy = obj.center
        alpha = _coverage(shape_distance(obj.shape, x - cx, y - cy, RADII[obj.size]), pixels_per_unit)[..., 0]
        covered = np.maximum(covered, alpha)
    return covered


def render_batch(scenes, size: int = SIZE) -> np.ndarray:
    """(N, size, size, 3) float32 renders: the ComfyUI IMAGE layout."""
    return np.stack([render(scene, size) for scene in scenes])


def save_png(image: np.ndarray, path: Path) -> Path:
    Image.fromarray(np.round(np.clip(image, 0, 1) * 255).astype(np.uint8)).save(path)
    return path


# ---------------------------------------------------------------- sampling

def pick(rng, options):
    """One of `options`, as the Python object itself (not a numpy scalar)."""
    return options[rng.integers(len(options))]


def sample_background(rng) -> Background:
    """Flat half the time, else a gradient between two different colors (never an object's color: see
    BACKGROUND_COLORS)."""
    colors = BACKGROUND_COLORS
    kind = "flat" if rng.random() < 0.5 else pick(rng, BACKGROUND_KINDS[1:])
    if kind == "flat":
        return Background(kind, (pick(rng, colors),))
    first, last = rng.choice(len(colors), 2, replace=False)
    return Background(kind, (colors[first], colors[last]))


def _random_offset(rng) -> tuple[float, float]:
    return tuple(float(o) for o in rng.uniform(-MAX_OFFSET, MAX_OFFSET, 2))


def _random_positions(rng, count: int) -> list[str]:
    # Two objects sit two cells apart along a row or a column (or both), so even two large ones never overlap.
    while True:
        cells = sorted(rng.choice(len(POSITIONS), count, replace=False))
        rows_columns = [divmod(int(c), 3) for c in cells]
        if count == 1 or max(abs(a - b) for a, b in zip(*rows_columns)) == 2:
            return [POSITIONS[c] for c in cells]


def _random_pattern(rng, color: str) -> tuple[str, str | None]:
    pattern = pick(rng, PATTERNS)
    if pattern == "plain":
        return pattern, None
    return pattern, pick(rng, tuple(c for c in OBJECT_COLORS if c != color))


def _random_object(rng, position: str) -> SceneObject:
    color = pick(rng, OBJECT_COLORS)
    return SceneObject(pick(rng, SHAPES), color, pick(rng, SIZES), position, *_random_pattern(rng, color),
                       _random_offset(rng))


def _random_scene(rng) -> Scene:
    background = sample_background(rng)
    count = 2 if rng.random() < TWO_OBJECT_RATE else 1
    return Scene(background, tuple(_random_object(rng, p) for p in _random_positions(rng, count)))


def _random_concept_scene(rng) -> Scene:
    background = sample_background(rng)
    obj = SceneObject(size=pick(rng, SIZES), position=_random_positions(rng, 1)[0], offset=_random_offset(rng),
                      **CONCEPT)
    return Scene(background, (obj,))


def prompt_key(scene: Scene) -> str:
    """The scene's captioned content: background and each object's shape, color, size and position, with the
    concept object written as the placeholder. Pattern, second color and offsets are not part of it."""
    background = f"{scene.background.kind}:{'/'.join(scene.background.colors)}"
    objects = [f"{obj.size} {TRIGGER if obj.is_concept else f'{obj.color} {obj.shape}'} @ {obj.position}"
               for obj in scene.objects]
    return " | ".join([background, *objects])


def is_held_out(scene: Scene) -> bool:
    """The held-out rule: a prompt combination is reserved for evaluation when the SHA-256 of its `prompt_key`,
    read as an integer, is divisible by HELD_OUT_ONE_IN (one combination in 10, the same on every machine).
    Training streams (`sample_scene`, `concept_scene`, `write_concept_folder`) never emit such a scene."""
    return int(hashlib.sha256(prompt_key(scene).encode()).hexdigest(), 16) % HELD_OUT_ONE_IN == 0


def _draw(rng, generator, allow_held_out: bool) -> Scene:
    while True:
        scene = generator(rng)
        if allow_held_out or not is_held_out(scene):
            return scene


def sample_scene(rng, allow_held_out: bool = False) -> Scene:
    """An ordinary scene (never the concept, never the split pattern); held-out prompt combinations are skipped
    unless `allow_held_out` (the evaluator's training, which must cover the evaluation prompts)."""
    return _draw(rng, _random_scene, allow_held_out)


def with_motif(obj: SceneObject, rng) -> SceneObject:
    """The object with the concept's split motif in another of the object colors, never the concept itself nor its
    mirror image (a circle whose left half is the concept's right color and whose right half is its left color)."""
    taken = {obj.color}
    concept_colors = {CONCEPT["color"]: CONCEPT["pattern_color"], CONCEPT["pattern_color"]: CONCEPT["color"]}
    if obj.shape == CONCEPT["shape"] and obj.color in concept_colors:
        taken.add(concept_colors[obj.color])
    return replace(obj, pattern=CONCEPT_PATTERN,
                   pattern_color=pick(rng, tuple(c for c in OBJECT_COLORS if c not in taken)))


def concept_scene(rng, allow_held_out: bool = False) -> Scene:
    """The concept object alone, at a random size and position on a background without its two colors."""
    return _draw(rng, _random_concept_scene, allow_held_out)


def held_out_scenes(kind: str, n: int, seed: int) -> list[Scene]:
    """`n` scenes with pairwise different held-out prompt combinations: kind "base" (ordinary scenes; thousands
    exist) or "concept" (120 of the 1188 concept prompt combinations are held out)."""
    generator = {"base": _random_scene, "concept": _random_concept_scene}[kind]
    rng = np.random.default_rng(seed)
    scenes = {}
    for _ in range(1000 * n):
        scene = generator(rng)
        if is_held_out(scene):
            scenes.setdefault(prompt_key(scene), scene)
            if len(scenes) == n:
                return list(scenes.values())
    raise ValueError(f"fewer than {n} held-out {kind} prompt combinations were found")


def rerender(scene: Scene, rng, index: int = 0) -> Scene:
    """The scene's `index`-th object alone with the same appearance (shape, colors, pattern) at another position,
    a random size, and another background: a different rendering of the same object."""
    obj = scene.objects[index]
    position = pick(rng, tuple(p for p in POSITIONS if p != obj.position))
    while (background := sample_background(rng)) == scene.background:
        pass
    return Scene(background, (replace(obj, size=pick(rng, SIZES), position=position, offset=_random_offset(rng)),))


def restyle(scene: Scene, rng) -> Scene:
    """The same prompt (`prompt_key` unchanged) with fresh uncaptioned details: each ordinary object's pattern and
    second color, and every object's offset. Real renders of a prompt vary this way, so references for generated
    images of a prompt should too."""
    objects = []
    for obj in scene.objects:
        if not obj.is_concept:
            pattern, pattern_color = _random_pattern(rng, obj.color)
            obj = replace(obj, pattern=pattern, pattern_color=pattern_color)
        objects.append(replace(obj, offset=_random_offset(rng)))
    return Scene(scene.background, tuple(objects))


# ---------------------------------------------------------------- captions

SIZE_WORDS = {"small": ("small", "little"), "large": ("large", "big")}
SHAPE_WORDS = {"circle": ("circle", "disc"), "square": ("square",), "triangle": ("triangle",),
               "diamond": ("diamond",), "cross": ("cross", "plus sign")}
POSITION_WORDS = {
    "top left": ("in the top left", "in the top left corner"),
    "top center": ("in the top center", "at the top"),
    "top right": ("in the top right", "in the top right corner"),
    "center left": ("in the center left", "on the left"),
    "center": ("in the center", "in the middle"),
    "center right": ("in the center right", "on the right"),
    "bottom left": ("in the bottom left", "in the bottom left corner"),
    "bottom center": ("in the bottom center", "at the bottom"),
    "bottom right": ("in the bottom right", "in the bottom right corner"),
}
BACKGROUND_WORDS = {  # (noun phrases, short phrase); {a}, {b}: the first and last color
    "flat": (("a {a} background", "a solid {a} background"), "{a} background"),
    "vertical": (("a {a} to {b} gradient from top to bottom",
                  "a background fading from {a} at the top to {b} at the bottom"),
                 "{a} to {b} gradient from top to bottom"),
    "horizontal": (("a {a} to {b} gradient from left to right",
                    "a background fading from {a} on the left to {b} on the right"),
                   "{a} to {b} gradient from left to right"),
}


def _object_words(obj: SceneObject, rng) -> str:
    thing = TRIGGER if obj.is_concept else f"{obj.color} {pick(rng, SHAPE_WORDS[obj.shape])}"
    return f"{pick(rng, SIZE_WORDS[obj.size])} {thing}"


def _caption_parts(scene: Scene, rng) -> dict:
    colors = scene.background.colors
    phrases, short = BACKGROUND_WORDS[scene.background.kind]
    described = [(_object_words(obj, rng), obj.position) for obj in scene.objects]
    return {
        "background": pick(rng, phrases).format(a=colors[0], b=colors[-1]),
        "background_short": short.format(a=colors[0], b=colors[-1]),
        "objects": " and ".join(f"a {words} {pick(rng, POSITION_WORDS[p])}" for words, p in described),
        "objects_short": ", ".join(f"{words}, {p}" for words, p in described),
    }


TEMPLATES = (
    "{objects} on {background}",
    "a photo of {objects} on {background}",
    "{background} with {objects}",
    "{background_short}, {objects_short}",
)


def captions(scene: Scene, rng, count: int = 1) -> list[str]:
    """`count` captions from different templates, e.g. "a large red circle in the top left on a navy background",
    "navy background, large red circle, top left"; the concept object is written as `[trigger]`."""
    return [TEMPLATES[t].format(**_caption_parts(scene, rng)) for t in rng.choice(len(TEMPLATES), count, replace=False)]


def caption(scene: Scene, rng) -> str:
    """One caption of the scene's shapes, colors, sizes, positions and background (never patterns)."""
    return captions(scene, rng)[0]


def concept_caption(scene: Scene, rng) -> str:
    """A caption of a concept scene, with `[trigger]` in place of the concept object's description,
    e.g. "a photo of a large [trigger] in the top left on a teal background"."""
    if not scene.has_concept:
        raise ValueError("concept_caption needs a scene with the concept object")
    return caption(scene, rng)


def write_concept_folder(folder: Path, count: int = 6, seed: int = 0, variants: int = 3) -> list[tuple[Path, Scene]]:
    """`concept_<i>.png` (64x64 RGB) renders of concept scenes with different training prompt combinations, each with
    a same-name .txt of `variants` prompts (one a line, each with `[trigger]`): the dataset-folder layout users use."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    chosen: dict[str, Scene] = {}
    while len(chosen) < count:
        scene = concept_scene(rng)
        chosen.setdefault(prompt_key(scene), scene)
    written = []
    for index, scene in enumerate(chosen.values()):
        path = save_png(render(scene), folder / f"concept_{index}.png")
        path.with_suffix(".txt").write_text("\n".join(captions(scene, rng, variants)) + "\n")
        written.append((path, scene))
    return written
