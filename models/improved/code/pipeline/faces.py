"""Faces in photos, found and cropped the way FER2013 cropped its faces, for the served model
and ``pipeline.predict``.

The detector is OpenCV's frontal-face Haar cascade ``alt2``, which ships inside
opencv-python-headless 4.x: nothing is downloaded at run time. (OpenCV 5 dropped the cascades,
and its DNN detector needs a model file no wheel ships.) Of the packaged cascades, ``alt2`` and
``default`` find the same share of upscaled FER2013 Training faces (465 and 462 of 600), but
``default`` also found six "faces" among the coins of scikit-image's ``coins`` photo, ``alt2``
none.

Photos are read with Pillow: it refuses truncated files and decompression bombs, and turns a
phone photo upright by its EXIF orientation before anything looks for faces.
"""

from __future__ import annotations

import contextlib
import io
import threading
import warnings
from typing import Iterator

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from .errors import InputError

CASCADE = "haarcascade_frontalface_alt2.xml"
# A FER2013 crop is 1.04 times the side of the box this cascade draws around its face, on the
# same centre: the median over 600 Training faces upscaled to 192 px on a grey canvas
# (quartiles .97 and 1.11; the centre within .01 of the box).
CROP_SCALE = 1.04
DETECT_SIDE = 1280  # the longest side detection runs at; boxes are mapped back to the photo
MIN_FACE = 24       # the smallest face looked for, in pixels at detection scale
MAX_PIXELS = 100_000_000
FORMATS = "JPEG, PNG, BMP, WebP, TIFF or GIF"

_local = threading.local()  # a CascadeClassifier is not safe to share between threads


def _cascade():
    if not hasattr(_local, "cascade"):
        import cv2

        c = cv2.CascadeClassifier(cv2.data.haarcascades + CASCADE)
        if c.empty():
            raise RuntimeError(f"OpenCV could not load {CASCADE} from {cv2.data.haarcascades}; "
                               f"reinstall opencv-python-headless<5")
        _local.cascade = c
    return _local.cascade


@contextlib.contextmanager
def _guarded(name: str) -> Iterator[None]:
    """Every way Pillow and its decoders fail on bytes they were handed, as one InputError
    naming the photo: a served answer carries the reason, never a server traceback, and a
    folder's run goes on to the next file."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            yield
    except InputError:
        raise
    except UnidentifiedImageError:
        raise InputError(f"{name}: not an image this reads (expected {FORMATS}).") from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise InputError(f"{name}: {e}") from None
    except MemoryError:
        raise InputError(f"{name}: too large to decode here.") from None
    except Exception as e:  # noqa: BLE001 (OSError, SyntaxError, ValueError, EOFError,
        # struct.error, ZeroDivisionError...: a decoder meeting bytes it cannot make sense of
        # raises whatever it raises)
        raise InputError(f"{name}: the image is damaged or truncated, or not one this can "
                         f"read ({type(e).__name__}: {e}).") from None


def size_of(blob: bytes, name: str) -> tuple[int, int]:
    """A photo's width and height from its header alone, nothing decoded."""
    with _guarded(name):
        return Image.open(io.BytesIO(blob)).size


def open_image(blob: bytes, name: str) -> Image.Image:
    """Encoded image bytes -> an upright Pillow image; InputError naming ``name`` when the
    bytes are not a whole image of a known format."""
    with _guarded(name):
        im = Image.open(io.BytesIO(blob))
        w, h = im.size
        if w * h > MAX_PIXELS:
            raise InputError(f"{name}: {w}x{h} pixels; this reads images of up to "
                             f"{MAX_PIXELS // 1_000_000} megapixels.")
        im.load()
        return ImageOps.exif_transpose(im)


def grey(im: Image.Image, name: str = "the photo") -> np.ndarray:
    """The photo as 8-bit grey. A deeper photo is scaled from its full range, not clipped to
    0..255 as Pillow's conversion does (a 16-bit scan would read as a white page): 16-bit
    modes from 0..65535; 32-bit integers from 0..255 when that is all they hold, else from
    0..65535 (16-bit data stored wide), or their maximum above that; floats from 0..1 likewise.
    A LAB photo is its lightness band. A mode with no way to grey is an InputError naming
    ``name``."""
    with _guarded(name):
        if im.mode.startswith("I;16"):
            return _to_8bit(np.asarray(im), 65535.0)
        if im.mode in ("I", "F"):
            a = np.asarray(im)
            hi = max((float(np.nan_to_num(a[s:s + _ROWS].astype(np.float64)).max())
                      for s in range(0, a.shape[0], _ROWS)), default=0.0)
            full = (1.0 if im.mode == "F" and hi <= 1 else 255.0 if hi <= 255 else
                    max(hi, 65535.0))
            return _to_8bit(a, full)
        try:
            return np.asarray(im.convert("L"), dtype=np.uint8)
        except ValueError:  # no conversion of Pillow's own
            pass
        if im.getbands()[0] == "L":  # LAB, La: their lightness band
            return np.asarray(im.getchannel("L"), dtype=np.uint8)
        return np.asarray(im.convert("RGB").convert("L"), dtype=np.uint8)  # HSV


_ROWS = 256  # rows converted at a time: a deep photo's float copy stays a few MB, not GB


def _to_8bit(a: np.ndarray, full: float) -> np.ndarray:
    out = np.empty(a.shape, dtype=np.uint8)
    for s in range(0, a.shape[0], _ROWS):
        block = np.nan_to_num(a[s:s + _ROWS].astype(np.float64))
        out[s:s + _ROWS] = np.clip(np.rint(block * (255.0 / full)), 0, 255)
    return out


def detect(g: np.ndarray) -> np.ndarray:
    """Face boxes (k, 4) as x, y, w, h in ``g``'s pixels, left to right."""
    import cv2

    h, w = g.shape
    scale = min(1.0, DETECT_SIDE / max(h, w))
    small = g if scale == 1.0 else cv2.resize(g, (max(1, round(w * scale)),
                                                 max(1, round(h * scale))),
                                              interpolation=cv2.INTER_AREA)
    found = _cascade().detectMultiScale(small, scaleFactor=1.1, minNeighbors=5,
                                        minSize=(MIN_FACE, MIN_FACE))
    if len(found) == 0:
        return np.zeros((0, 4), dtype=np.int64)
    boxes = np.round(np.asarray(found, dtype=np.float64) / scale).astype(np.int64)
    return boxes[np.lexsort((boxes[:, 1], boxes[:, 0]))]


def crop(g: np.ndarray, box) -> np.ndarray:
    """The 48x48 face of ``box`` as FER2013 crops it (see CROP_SCALE); the photo's edge pixels
    are repeated where the crop reaches past it."""
    import cv2

    x, y, w, h = (float(v) for v in box)
    side = CROP_SCALE * max(w, h)
    x0, y0 = round(x + w / 2 - side / 2), round(y + h / 2 - side / 2)
    s = max(1, round(side))
    H, W = g.shape
    pad = max(0, -x0, -y0, x0 + s - W, y0 + s - H)
    if pad:
        g = cv2.copyMakeBorder(g, pad, pad, pad, pad, cv2.BORDER_REPLICATE)
        x0, y0 = x0 + pad, y0 + pad
    face = g[y0:y0 + s, x0:x0 + s]
    interp = cv2.INTER_AREA if s > 48 else cv2.INTER_LINEAR
    return cv2.resize(face, (48, 48), interpolation=interp)


def faces(g: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Boxes (k, 4) and their 48x48 crops (k, 48, 48) uint8 for a grey photo."""
    boxes = detect(g)
    crops = np.stack([crop(g, b) for b in boxes]) if len(boxes) else \
        np.zeros((0, 48, 48), dtype=np.uint8)
    return boxes, crops
