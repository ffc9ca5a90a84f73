"""Procedural images for the embedded default dataset ("alexnet_shapes").

Ten classes that stay distinguishable under the paper's augmentation (random crops,
horizontal flips, colour noise): six filled shapes and four textures, each drawn with
random colours, position, scale, rotation, background gradient and pixel noise.
Rendering is pure NumPy + Pillow and deterministic for a given ``numpy`` generator.
"""

import io
import math

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

CLASS_NAMES = (
    "circle",
    "ring",
    "square",
    "triangle",
    "star",
    "cross",
    "crescent",
    "stripes",
    "checkerboard",
    "dots",
)
SIZE = 256
_SUPERSAMPLE = 2


_LUMA = np.array([0.299, 0.587, 0.114])


def _colour_pair(rng):
    """A background and a foreground colour that differ by at least 64 grey levels of luma.

    Random hues keep colour from giving the class away; the luma gap keeps every shape
    visible to a network that has not yet learnt colour-opponent filters.
    """
    while True:
        bg = rng.integers(0, 256, 3)
        fg = rng.integers(0, 256, 3)
        if abs(float(_LUMA @ (bg - fg))) >= 64:
            return bg, fg


def _background(rng, bg):
    """A linear gradient around ``bg`` in a random direction."""
    angle = rng.uniform(0, 2 * math.pi)
    ramp = np.linspace(-1.0, 1.0, SIZE, dtype=np.float32)
    grad = math.cos(angle) * ramp[None, :] + math.sin(angle) * ramp[:, None]
    delta = rng.uniform(-40, 40, 3).astype(np.float32)
    img = bg.astype(np.float32)[None, None, :] + grad[..., None] * delta[None, None, :]
    return np.clip(img, 0, 255).astype(np.float32)


def _polygon(cx, cy, radius, sides, rotation, inner=None):
    """Vertices of a regular polygon, or of a star when ``inner`` (a radius ratio) is set."""
    points = []
    count = sides * 2 if inner else sides
    for k in range(count):
        r = radius * (inner if inner and k % 2 else 1.0)
        a = rotation + 2 * math.pi * k / count
        points.append((cx + r * math.cos(a), cy + r * math.sin(a)))
    return points


def _rotated_rect(cx, cy, half_w, half_h, rotation):
    c, s = math.cos(rotation), math.sin(rotation)
    corners = ((-half_w, -half_h), (half_w, -half_h), (half_w, half_h), (-half_w, half_h))
    return [(cx + x * c - y * s, cy + x * s + y * c) for x, y in corners]


def _draw_shape(draw, name, rng, fg, bg, size):
    """Draws one filled shape in colour ``fg``; holes are drawn in ``bg``."""
    cx, cy = rng.uniform(0.35, 0.65, 2) * size
    radius = rng.uniform(0.24, 0.34) * size
    rot = rng.uniform(0, 2 * math.pi)
    fill = tuple(int(v) for v in fg)
    hole = tuple(int(v) for v in bg)
    if name == "circle":
        draw.ellipse((cx - radius, cy - radius, cx + radius, cy + radius), fill=fill)
    elif name == "ring":
        draw.ellipse((cx - radius, cy - radius, cx + radius, cy + radius), fill=fill)
        inner = radius * rng.uniform(0.45, 0.65)
        draw.ellipse((cx - inner, cy - inner, cx + inner, cy + inner), fill=hole)
    elif name == "square":
        draw.polygon(_polygon(cx, cy, radius, 4, rot), fill=fill)
    elif name == "triangle":
        draw.polygon(_polygon(cx, cy, radius * 1.1, 3, rot), fill=fill)
    elif name == "star":
        draw.polygon(_polygon(cx, cy, radius * 1.1, 5, rot, inner=0.42), fill=fill)
    elif name == "cross":
        arm = radius * rng.uniform(0.28, 0.38)
        draw.polygon(_rotated_rect(cx, cy, radius, arm, rot), fill=fill)
        draw.polygon(_rotated_rect(cx, cy, arm, radius, rot), fill=fill)
    elif name == "crescent":
        draw.ellipse((cx - radius, cy - radius, cx + radius, cy + radius), fill=fill)
        shift = radius * rng.uniform(0.45, 0.6)
        ox, oy = cx + shift * math.cos(rot), cy + shift * math.sin(rot)
        draw.ellipse((ox - radius, oy - radius, ox + radius, oy + radius), fill=hole)
    else:
        raise ValueError(f"Unknown shape {name!r}")


def _texture(name, rng, size):
    """A boolean mask of the texture over the whole canvas (rotated, random period)."""
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    rot = rng.uniform(0, math.pi)
    u = xx * math.cos(rot) + yy * math.sin(rot)
    v = -xx * math.sin(rot) + yy * math.cos(rot)
    period = rng.uniform(0.1, 0.16) * size
    phase = rng.uniform(0, period, 2)
    if name == "stripes":
        return ((u + phase[0]) % period) < period / 2
    if name == "checkerboard":
        return (((u + phase[0]) // (period / 2) + (v + phase[1]) // (period / 2)) % 2) == 0
    if name == "dots":
        du = (u + phase[0]) % period - period / 2
        dv = (v + phase[1]) % period - period / 2
        return du * du + dv * dv < (period * rng.uniform(0.25, 0.35)) ** 2
    raise ValueError(f"Unknown texture {name!r}")


def render(label, rng):
    """Renders one 256x256 RGB uint8 image of class ``CLASS_NAMES[label]``."""
    name = CLASS_NAMES[label]
    bg, fg = _colour_pair(rng)
    canvas = _background(rng, bg)
    big = SIZE * _SUPERSAMPLE
    if name in ("stripes", "checkerboard", "dots"):
        big = SIZE  # textures need no supersampling, and are 4x cheaper without
        mask = _texture(name, rng, big).astype(np.float32)
        # Textures cover a random rotated patch of at least a third of the image.
        patch = Image.new("L", (big, big), 0)
        cx, cy = rng.uniform(0.4, 0.6, 2) * big
        half = rng.uniform(0.3, 0.5) * big
        ImageDraw.Draw(patch).polygon(
            _rotated_rect(cx, cy, half, half * rng.uniform(0.8, 1.0), rng.uniform(0, math.pi)),
            fill=255,
        )
        mask *= np.asarray(patch, np.float32) / 255.0
    else:
        # White-on-black: holes (ring, crescent) come out black, so this is the mask.
        mask_img = Image.new("L", (big, big), 0)
        _draw_shape(ImageDraw.Draw(mask_img), name, rng, (255,), (0,), big)
        mask = np.asarray(mask_img, np.float32) / 255.0
    if big != SIZE:
        mask = np.asarray(
            Image.fromarray((mask * 255).astype(np.uint8)).resize((SIZE, SIZE), Image.BILINEAR),
            np.float32,
        ) / 255.0
    fg_tint = (fg + rng.uniform(-25, 25, 3)).astype(np.float32)
    alpha = mask[..., None]
    img = canvas + alpha * (fg_tint[None, None, :] - canvas)
    img += rng.standard_normal(img.shape, dtype=np.float32) * np.float32(rng.uniform(2, 8))
    out = Image.fromarray(np.clip(img, 0, 255).astype(np.uint8))
    if rng.random() < 0.2:
        out = out.filter(ImageFilter.GaussianBlur(rng.uniform(0.5, 1.0)))
    return np.asarray(out)


def encode_jpeg(image, quality=90):
    """JPEG bytes of an RGB uint8 array."""
    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="JPEG", quality=quality)
    return buf.getvalue()
