"""The 16 MM_Robustness image corruptions (COCO-C / Flickr-C), severities 1-5, and the three
validation corruptions.

Validation corruptions (``VALIDATION_CORRUPTIONS``: gaussian_blur, spatter, saturate) are ImageNet-C's
"extra" corruptions, the ones outside the 16 test corruptions, with ImageNet-C's parameters. They are for
choosing hyper-parameters (learning rate, method options) and appear in no test table or test suite.

Randomness. Every corruption is written here in numpy/OpenCV/SciPy and draws all of its randomness from the
``numpy.random.Generator`` it is given, so an image depends only on (seed, query index) and two DataLoader
workers never share state. imagecorruptions-imaug is not called: it draws from the global ``np.random``
(which would need a process-wide lock around every image) and several of its functions differ from the
MM_Robustness generator anyway (pixelate, elastic_transform, frost cropping, zoom_blur severity 5, numba
glass blur). We only read its bundled frost textures (frost1-5, the ImageNet-C files).

Parameters are MM_Robustness's, in pixels, applied at the image's own resolution. Deviations and quirks of
the original generator, and what we do about them:

* unseeded noise: not reproduced; every draw is seeded per query, so runs are repeatable.
* pixelate transposes non-square images (cv2 ``dsize=(h, w)``): not reproduced, the output keeps the input
  size. The models resize queries to a square anyway, so the transpose only reshuffled content. The grid is
  ``floor(224 c)`` squared for images of at least 224 px, as in the original; below 224 px it would *enlarge*
  the image (pixelate would be a no-op on the 64 px synthetic benchmark), so there it is ``floor(c * side)``.
* glass_blur loop bug (the swap loops reuse ``h``/``w``): reproduced, because the released COCO-C/Flickr-C
  images were made this way. Only the row ``min(H, 224) - delta`` gets pixel moves, once, and each "swap" is
  a copy (numpy view aliasing), so the result is essentially two Gaussian blurs.
* frost channel flip: reproduced. The texture is read by OpenCV (BGR) and flipped to RGB, but added to a BGR
  photo; in RGB terms the texture is added channel-reversed (a warmer tint than ImageNet-C's frost).
* other BGR-as-RGB effects of feeding ``cv2.imread`` arrays to RGB code are reproduced where they change
  pixels: snow's grey level uses swapped weights, and jpeg_compression encodes the channel-reversed image
  (so chroma subsampling hits the same channels). brightness and the rest are channel-symmetric.
* double JPEG: the generator saves every output as JPEG q95, so jpeg_compression is compressed twice. On the
  fly we do not re-encode anything; ``queryshift corrupt`` saves JPEG q95 and so reproduces it on disk.
* fog: the plasma map is ``next_pow2(max(H, W))`` wide instead of a fixed 1024 (COCO) / 512 (Flickr). That is
  1024 for 640 px COCO photos and 512 for 500 px Flickr photos, always covers the image, and stays cheap on
  small images.
* frost: the original top-left crop crashes when the photo is larger than the texture; we scale the texture
  up (bicubic) just enough to cover, then crop top-left.
* motion_blur / snow used ImageMagick's MotionBlur through Wand; we build the same one-sided Gaussian line
  kernel (width ``2 r + 1``, offsets ``ceil(i cos a - .5), ceil(i sin a - .5)``) and apply it with
  ``cv2.filter2D`` and edge replication.
* zoom_blur centre zooms use an affine warp (same geometry as scipy's crop-and-zoom up to sub-pixel
  alignment), much faster at full resolution.
"""

from __future__ import annotations

import functools
import importlib.util
import io
import math
import os

import numpy as np
from PIL import Image

from . import QueryShift

# the `corrupt` extra (opencv, scipy), imported by _require_backends when a corruption is first built or applied:
# without it the names stay importable and building a corruption says what's missing, and listing the names
# (``queryshift list``) does not pay for importing them
cv2 = gaussian_filter = None
_MISSING: ImportError | None = None

IMAGE_CORRUPTIONS = (
    "gaussian_noise", "shot_noise", "impulse_noise", "speckle_noise",
    "defocus_blur", "glass_blur", "zoom_blur", "motion_blur",
    "fog", "frost", "snow",
    "contrast", "brightness", "pixelate", "elastic_transform", "jpeg_compression",
)
VALIDATION_CORRUPTIONS = ("gaussian_blur", "spatter", "saturate")
SEVERITIES = (1, 2, 3, 4, 5)


# -- noise -------------------------------------------------------------------------------------------------

def gaussian_noise(x, s, rng):
    sigma = (.08, .12, .18, .26, .38)[s - 1]
    return np.clip(x / 255 + rng.normal(scale=sigma, size=x.shape), 0, 1) * 255


def shot_noise(x, s, rng):
    c = (60, 25, 12, 5, 3)[s - 1]
    return np.clip(rng.poisson(x / 255 * c) / c, 0, 1) * 255


def impulse_noise(x, s, rng):
    # skimage random_noise(mode='s&p'): each array element flips with p=amount, half to 1, half to 0
    amount = (.03, .06, .09, .17, .27)[s - 1]
    flipped = rng.random(x.shape) < amount
    salt = rng.random(x.shape) < 0.5
    out = x / 255
    out[flipped & salt] = 1.0
    out[flipped & ~salt] = 0.0
    return out * 255


def speckle_noise(x, s, rng):
    c = (.15, .2, .35, .45, .6)[s - 1]
    y = x / 255
    return np.clip(y + y * rng.normal(scale=c, size=x.shape), 0, 1) * 255


# -- blur --------------------------------------------------------------------------------------------------

def _disk_kernel(radius: int, alias_sigma: float) -> np.ndarray:
    half = 8 if radius <= 8 else radius  # ImageNet-C's grid: 17x17 for small radii
    coords = np.arange(-half, half + 1)
    xx, yy = np.meshgrid(coords, coords)
    disk = (xx ** 2 + yy ** 2 <= radius ** 2).astype(np.float32)
    disk /= disk.sum()
    ksize = (3, 3) if radius <= 8 else (5, 5)
    return cv2.GaussianBlur(disk, ksize=ksize, sigmaX=alias_sigma)


def defocus_blur(x, s, rng):
    radius, alias = ((3, .1), (4, .5), (6, .5), (8, .5), (10, .5))[s - 1]
    return np.clip(cv2.filter2D(x / 255, -1, _disk_kernel(radius, alias)), 0, 1) * 255


def _gaussian_rgb(x, sigma):
    # skimage.filters.gaussian defaults: mode 'nearest', truncate 4, channels independent
    return gaussian_filter(x, sigma=(sigma, sigma, 0), mode="nearest", truncate=4.0)


def glass_blur(x, s, rng):
    sigma, delta, _iterations = ((.7, 1, 2), (.9, 2, 1), (1, 2, 3), (1.1, 3, 2), (1.5, 4, 2))[s - 1]
    h, w = x.shape[:2]
    y = (np.clip(_gaussian_rgb(x / 255, sigma), 0, 1) * 255).astype(np.uint8)
    # The original's loops reuse h/w: only the first row is visited, once, whatever the iteration count.
    row = min(h, 224) - delta
    if delta < row < h:
        for col in range(min(w, 224) - delta, delta, -1):
            dx, dy = rng.integers(-delta, delta, size=2)
            y[row, col] = y[row + dy, col + dx]  # the "swap" copies one way (numpy view aliasing)
    return np.clip(_gaussian_rgb(y / 255, sigma), 0, 1) * 255


def _zoom_about_centre(img: np.ndarray, factor: float) -> np.ndarray:
    h, w = img.shape[:2]
    cx, cy = (w - 1) / 2, (h - 1) / 2
    # inverse map: output pixel p reads the input at centre + (p - centre) / factor
    m = np.float32([[1 / factor, 0, cx * (1 - 1 / factor)], [0, 1 / factor, cy * (1 - 1 / factor)]])
    return cv2.warpAffine(img, m, (w, h), flags=cv2.INTER_LINEAR | cv2.WARP_INVERSE_MAP,
                          borderMode=cv2.BORDER_REFLECT)


def zoom_blur(x, s, rng):
    factors = (np.arange(1, 1.11, .01), np.arange(1, 1.16, .01), np.arange(1, 1.21, .02),
               np.arange(1, 1.26, .02), np.arange(1, 1.33, .03))[s - 1]
    y = (x / 255).astype(np.float32)
    total = y.copy()
    for factor in factors:
        total += _zoom_about_centre(y, float(factor))
    return np.clip(total / (len(factors) + 1), 0, 1) * 255


def _motion_kernel(radius: int, sigma: float, angle: float) -> np.ndarray:
    """ImageMagick MotionBlurImage as a correlation kernel: a one-sided Gaussian trail along ``angle``."""
    width = 2 * radius + 1
    weights = np.exp(-np.arange(width) ** 2 / (2 * sigma ** 2))
    weights /= weights.sum()
    a = math.radians(angle)
    kernel = np.zeros((2 * width + 1, 2 * width + 1), np.float32)
    for i, wgt in enumerate(weights):
        ox = math.ceil(i * math.cos(a) - 0.5)
        oy = math.ceil(i * math.sin(a) - 0.5)
        kernel[width + oy, width + ox] += wgt
    return kernel


def _motion_blur_array(img: np.ndarray, radius: int, sigma: float, angle: float) -> np.ndarray:
    kernel = _motion_kernel(radius, sigma, angle)
    return cv2.filter2D(img.astype(np.float32), -1, kernel, borderType=cv2.BORDER_REPLICATE)


def motion_blur(x, s, rng):
    radius, sigma = ((10, 3), (15, 5), (15, 8), (15, 12), (20, 15))[s - 1]
    blurred = _motion_blur_array(x, radius, sigma, rng.uniform(-45, 45))
    return np.clip(np.rint(blurred), 0, 255)  # ImageMagick returns 8-bit pixels


# -- weather -----------------------------------------------------------------------------------------------

def plasma_fractal(size: int, decay: float, rng: np.random.Generator) -> np.ndarray:
    """Diamond-square height map in [0, 1] on a torus, ``size`` a power of two (ImageNet-C's fog)."""
    grid = np.zeros((size, size))
    step, wibble = size, 100.0

    def noisy(total, wibble):  # mean of the four neighbours plus noise
        return total / 4 + wibble * rng.uniform(-wibble, wibble, total.shape)

    while step >= 2:
        half = step // 2
        corners = grid[0::step, 0::step]
        square = corners + np.roll(corners, -1, axis=0)
        square = square + np.roll(square, -1, axis=1)
        grid[half::step, half::step] = noisy(square, wibble)
        centres = grid[half::step, half::step]
        top = centres + np.roll(centres, 1, axis=0) + corners + np.roll(corners, -1, axis=1)
        grid[0::step, half::step] = noisy(top, wibble)
        left = centres + np.roll(centres, 1, axis=1) + corners + np.roll(corners, -1, axis=0)
        grid[half::step, 0::step] = noisy(left, wibble)
        step = half
        wibble /= decay
    grid -= grid.min()
    return grid / grid.max()


def fog(x, s, rng):
    strength, decay = ((1.5, 2), (2., 2), (2.5, 1.7), (2.5, 1.5), (3., 1.4))[s - 1]
    h, w = x.shape[:2]
    size = 1 << max(1, (max(h, w) - 1).bit_length())
    y = x / 255
    peak = y.max()
    y = y + strength * plasma_fractal(size, decay, rng)[:h, :w, None]
    return np.clip(y * peak / (peak + strength), 0, 1) * 255


@functools.cache
def _frost_texture(k: int) -> np.ndarray:
    spec = importlib.util.find_spec("imagecorruptions")
    if spec is None or not spec.submodule_search_locations:
        raise ImportError("frost needs the ImageNet-C frost textures shipped with imagecorruptions-imaug: "
                          "pip install 'imagecorruptions-imaug>=1.1.5' (or queryshift[corrupt])")
    name = ("frost1.png", "frost2.png", "frost3.png", "frost4.jpg", "frost5.jpg")[k]
    path = os.path.join(list(spec.submodule_search_locations)[0], "frost", name)
    texture = cv2.imread(path)  # BGR, kept so: see the channel-flip note in the module docstring
    if texture is None:
        raise FileNotFoundError(f"frost texture missing or unreadable: {path}")
    return texture.astype(np.float32)


def frost(x, s, rng):
    photo_w, frost_w = ((1, .4), (.8, .6), (.7, .7), (.65, .7), (.6, .75))[s - 1]
    texture = _frost_texture(int(rng.integers(5)))  # randint(5): frost6 is never used
    h, w = x.shape[:2]
    th, tw = texture.shape[:2]
    if th < h or tw < w:
        scale = max(h / th, w / tw)
        texture = cv2.resize(texture, (max(w, math.ceil(tw * scale)), max(h, math.ceil(th * scale))),
                             interpolation=cv2.INTER_CUBIC)
    return np.clip(photo_w * x + frost_w * texture[:h, :w], 0, 255)


def snow(x, s, rng):
    mu, sd, zoom, thr, blur_r, blur_s, blend = (
        (.1, .3, 3, .5, 10, 4, .8), (.2, .3, 2, .5, 12, 4, .7), (.55, .3, 4, .9, 12, 8, .7),
        (.55, .3, 4.5, .85, 12, 8, .65), (.55, .3, 2.5, .85, 12, 12, .55))[s - 1]
    y = (x / 255).astype(np.float32)
    layer = rng.normal(loc=mu, scale=sd, size=y.shape[:2]).astype(np.float32)
    layer = _zoom_about_centre(layer, zoom)
    layer[layer < thr] = 0
    layer = (np.clip(layer, 0, 1) * 255).astype(np.uint8)  # the original goes through an 8-bit PNG
    layer = np.clip(np.rint(_motion_blur_array(layer, blur_r, blur_s, rng.uniform(-135, -45))), 0, 255) / 255
    layer = layer[..., None]
    # cv2 RGB2GRAY applied to a BGR photo in the original: the R and B weights are swapped
    grey = 0.114 * y[..., :1] + 0.587 * y[..., 1:2] + 0.299 * y[..., 2:]
    y = blend * y + (1 - blend) * np.maximum(y, grey * 1.5 + 0.5)
    return np.clip(y + layer + np.rot90(layer, k=2), 0, 1) * 255


# -- digital -----------------------------------------------------------------------------------------------

def contrast(x, s, rng):
    c = (.4, .3, .2, .1, .05)[s - 1]
    y = x / 255
    means = y.mean(axis=(0, 1), keepdims=True)
    return np.clip((y - means) * c + means, 0, 1) * 255


def brightness(x, s, rng):
    # HSV with V += c (clipped) and H, S kept is the same as scaling RGB by V'/V (V = max channel)
    c = (.1, .2, .3, .4, .5)[s - 1]
    y = x / 255
    v = y.max(axis=2, keepdims=True)
    v_new = np.clip(v + c, 0, 1)
    scaled = y * np.divide(v_new, v, out=np.zeros_like(v), where=v > 0)
    return np.clip(np.where(v > 0, scaled, v_new), 0, 1) * 255


def pixelate(x, s, rng):
    c = (.6, .5, .4, .3, .25)[s - 1]
    h, w = x.shape[:2]
    grid = (max(1, int(c * min(224, w))), max(1, int(c * min(224, h))))
    small = cv2.resize(x.astype(np.float32), grid, interpolation=cv2.INTER_AREA)
    return cv2.resize(small, (w, h), interpolation=cv2.INTER_AREA)


def elastic_transform(x, s, rng):
    alpha, sigma, affine = ((244 * 2, 244 * .7, 244 * .1), (244 * 2, 244 * .08, 244 * .2),
                            (244 * .05, 244 * .01, 244 * .02), (244 * .07, 244 * .01, 244 * .02),
                            (244 * .12, 244 * .01, 244 * .02))[s - 1]
    y = (x / 255).astype(np.float32)
    h, w = y.shape[:2]
    centre = np.float32([h, w]) // 2
    half = min(h, w) // 3
    # (row, col) points, as in the original; getAffineTransform reads them as (x, y), and so did it
    src = np.float32([centre + half, [centre[0] + half, centre[1] - half], centre - half])
    dst = src + rng.uniform(-affine, affine, size=src.shape).astype(np.float32)
    y = cv2.warpAffine(y, cv2.getAffineTransform(src, dst), (w, h), borderMode=cv2.BORDER_REFLECT_101)
    dx = gaussian_filter(rng.uniform(-1, 1, size=(h, w)), sigma, mode="reflect", truncate=3) * alpha
    dy = gaussian_filter(rng.uniform(-1, 1, size=(h, w)), sigma, mode="reflect", truncate=3) * alpha
    cols, rows = np.meshgrid(np.arange(w, dtype=np.float32), np.arange(h, dtype=np.float32))
    # scipy map_coordinates(order=1, mode='reflect') == bilinear remap with half-sample reflection
    out = cv2.remap(y, (cols + dx).astype(np.float32), (rows + dy).astype(np.float32),
                    interpolation=cv2.INTER_LINEAR, borderMode=cv2.BORDER_REFLECT)
    return np.clip(out, 0, 1) * 255


def jpeg_compression(x, s, rng):
    quality = (25, 18, 15, 10, 7)[s - 1]
    buf = io.BytesIO()
    # channel-reversed, as the original encoded a BGR array as if it were RGB
    Image.fromarray(np.ascontiguousarray(x[..., ::-1]).astype(np.uint8)).save(buf, "JPEG", quality=quality)
    buf.seek(0)
    with Image.open(buf) as im:
        return np.asarray(im.convert("RGB"), dtype=np.float64)[..., ::-1]


# -- validation corruptions (ImageNet-C extras) --------------------------------------------------------------

def gaussian_blur(x, s, rng):
    sigma = (1, 2, 3, 4, 6)[s - 1]
    return np.clip(_gaussian_rgb(x / 255, sigma), 0, 1) * 255


def saturate(x, s, rng):
    # HSV saturation S -> clip(a S + b); a grey pixel has hue 0 (red), so b > 0 tints greys red, as in skimage
    a, b = ((.3, 0), (.1, 0), (2, 0), (5, .1), (20, .2))[s - 1]
    hsv = cv2.cvtColor((x / 255).astype(np.float32), cv2.COLOR_RGB2HSV)  # H in degrees, S and V in [0, 1]
    hsv[..., 1] = np.clip(hsv[..., 1] * a + b, 0, 1)
    return np.clip(cv2.cvtColor(hsv, cv2.COLOR_HSV2RGB), 0, 1) * 255


def spatter(x, s, rng):
    """Water drops (severities 1-3: pale turquoise rims) or mud (4-5: brown blots), as ImageNet-C."""
    mean, sd, sigma, threshold, strength, mud = (
        (.65, .3, 4, .69, .6, 0), (.65, .3, 3, .68, .6, 0), (.65, .3, 2, .68, .5, 0),
        (.65, .3, 1, .65, 1.5, 1), (.67, .4, 1, .65, 1.5, 1))[s - 1]
    y = (x / 255).astype(np.float32)
    liquid = gaussian_filter(rng.normal(loc=mean, scale=sd, size=y.shape[:2]), sigma, mode="nearest", truncate=4.0)
    liquid[liquid < threshold] = 0
    if not mud:
        layer = (liquid * 255).astype(np.uint8)
        # distance to the drops' edges, shaped into a bevelled rim
        dist = cv2.distanceTransform(255 - cv2.Canny(layer, 50, 150), cv2.DIST_L2, 5)
        _, dist = cv2.threshold(dist, 20, 20, cv2.THRESH_TRUNC)
        dist = cv2.equalizeHist(cv2.blur(dist, (3, 3)).astype(np.uint8))
        bevel = np.array([[-2, -1, 0], [-1, 1, 1], [0, 1, 2]])
        dist = cv2.blur(cv2.filter2D(dist, cv2.CV_8U, bevel), (3, 3)).astype(np.float32)
        m = layer.astype(np.float32) * dist
        m = m / max(float(m.max()), 1e-12) * strength
        # ImageNet-C means BGR pale turquoise (175, 238, 238) but adds it to an RGB array: kept as it adds it
        water = np.float32([175, 238, 238]) / 255
        return np.clip(y + m[..., None] * water, 0, 1) * 255
    m = gaussian_filter(np.where(liquid > threshold, 1.0, 0.0), strength, mode="nearest", truncate=4.0)
    m[m < .8] = 0
    mud_colour = np.float32([63, 42, 20]) / 255
    return np.clip(y * (1 - m[..., None]) + mud_colour * m[..., None], 0, 1) * 255


def _require_backends() -> None:
    global cv2, gaussian_filter, _MISSING
    if cv2 is None and _MISSING is None:
        try:
            import cv2 as _cv2
            from scipy.ndimage import gaussian_filter as _gaussian_filter
        except ImportError as err:
            _MISSING = err
        else:
            cv2, gaussian_filter = _cv2, _gaussian_filter
    if _MISSING is not None:
        raise ImportError(f"image corruptions need opencv and scipy: pip install 'queryshift[corrupt]' ({_MISSING})")


CORRUPTION_FUNCTIONS = {name: globals()[name] for name in IMAGE_CORRUPTIONS + VALIDATION_CORRUPTIONS}


def corrupt(image: Image.Image, name: str, severity: int, rng: np.random.Generator) -> Image.Image:
    """Apply one corruption (test or validation) to a PIL image; returns an RGB image of the same size."""
    if name not in CORRUPTION_FUNCTIONS:
        raise ValueError(f"unknown image corruption {name!r}; choose from "
                         f"{', '.join(IMAGE_CORRUPTIONS + VALIDATION_CORRUPTIONS)}")
    if severity not in SEVERITIES:
        raise ValueError(f"{name}: severity must be 1-5, got {severity}")
    _require_backends()
    x = np.asarray(image.convert("RGB"), dtype=np.float64)
    out = CORRUPTION_FUNCTIONS[name](x, severity, rng)
    return Image.fromarray(np.clip(np.rint(out), 0, 255).astype(np.uint8), "RGB")


class ImageCorruption(QueryShift):
    """One corruption at one severity, applied to every image query."""

    modality = "image"

    def __init__(self, corruption: str, severity: int):
        if corruption not in CORRUPTION_FUNCTIONS:
            raise ValueError(f"unknown image corruption {corruption!r}")
        if severity not in SEVERITIES:
            raise ValueError(f"{corruption}: severity must be 1-5, got {severity}")
        _require_backends()
        self.corruption, self.severity = corruption, severity
        self.name = f"{corruption}:{severity}"

    def __call__(self, item, index, position, total, rng):
        return corrupt(item, self.corruption, self.severity, rng)
