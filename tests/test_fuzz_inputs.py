"""Generated inputs on every surface that reads data: FER2013 CSV rows, photos (every Pillow mode,
sizes, EXIF orientations, truncation) through `pipeline.predict` and the served model's photo
requests, and raw-pixel requests of every dtype and shape. Each either works as documented or is
refused with one line naming the file (or request item) and what was expected; nothing is left
behind that looks valid. Values are drawn by construction, so each case knows its answer."""

from __future__ import annotations

import base64
import gzip
import io
from pathlib import Path

import numpy as np
import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st
from PIL import Image

from pipeline import data as fer
from pipeline import faces, serving
from pipeline.config import EMOTIONS
from pipeline.errors import DataError, InputError
from tests.conftest import ROOT, csv_text, make_faces

pytestmark = pytest.mark.slow

IMAGES, LABELS, USAGE = make_faces({"Training": 1, "PublicTest": 1}, seed=3)  # 14 rows
VALID = csv_text(IMAGES, LABELS, USAGE).encode()


def _load(path: Path):
    """The loaded arrays, or the DataError's one line (the parse cache then as it was); any
    other exception fails the test."""
    before = _cache_entries()
    try:
        d = fer.load(path)
        return d, None
    except DataError as e:
        msg = str(e)
        assert "\n" not in msg and msg.startswith(str(path)), msg
        assert _cache_entries() == before
        return None, msg


def _cache_entries() -> list[str]:
    root = fer.cache_dir()
    return sorted(p.name for p in root.iterdir()) if root.exists() else []


# --------------------------------------------------------------------------- CSV rows


@st.composite
def spellings(draw):
    """The same 14 rows written as the documented layouts allow: either CSV layout, CRLF line
    ends, a BOM, quoted fields, blank lines, gzip."""
    layout = draw(st.sampled_from(["kaggle", "icml"]))
    text = csv_text(IMAGES, LABELS, USAGE, layout)
    lines = text.splitlines()
    if draw(st.booleans()):
        head, *rows = lines
        rows = [",".join(f'"{f.strip()}"' for f in r.split(",")) for r in rows]
        lines = [head, *rows]
    if draw(st.booleans()):
        at = draw(st.integers(1, len(lines)))
        lines.insert(at, "")
    end = draw(st.sampled_from(["\n", "\r\n"]))
    raw = (end.join(lines) + end).encode()
    if draw(st.booleans()):
        raw = b"\xef\xbb\xbf" + raw
    return raw, draw(st.booleans())


@settings(max_examples=25)
@given(spelling=spellings())
def test_every_documented_spelling_of_the_rows_loads_the_same_arrays(spelling, tmp_path):
    raw, zipped = spelling
    p = tmp_path / ("rows.csv.gz" if zipped else "rows.csv")
    p.write_bytes(gzip.compress(raw) if zipped else raw)
    d, err = _load(p)
    assert err is None, err
    assert np.array_equal(d.images, IMAGES) and np.array_equal(d.labels, LABELS)
    assert list(d.usage) == list(USAGE)


# A row broken one way, with the words its refusal must hold.
BREAKS = {
    "pixel out of range": (lambda px, rng: _set(px, rng, "256"), "is out of range; expected 0..255"),
    "pixel not a number": (lambda px, rng: _set(px, rng, "x7"), "is not an integer"),
    "negative pixel": (lambda px, rng: _set(px, rng, "-3"), "is not an integer"),
    "pixel dropped": (lambda px, rng: " ".join(px.split()[:-1]), "2303 pixel values; expected 2304"),
    "pixel added": (lambda px, rng: px + " 7", "2305 pixel values; expected 2304"),
    "tab separated": (lambda px, rng: px.replace(" ", "\t"), "pixel values separated by '\\t'"),
}


def _set(pixels: str, k: int, value: str) -> str:
    v = pixels.split()
    v[k % len(v)] = value
    return " ".join(v)


@settings(max_examples=40)
@given(row=st.integers(0, len(LABELS) - 1), pos=st.integers(0, 2303),
       how=st.sampled_from([*BREAKS, "label", "usage", "field added", "field dropped"]),
       label=st.sampled_from(["7", "-1", "x", "", "3.0", "1e0", " 8"]),
       usage=st.sampled_from(["", '""']))
def test_a_broken_row_is_refused_by_its_line_and_nothing_is_cached(row, pos, how, label, usage,
                                                                  tmp_path):
    lines = VALID.decode().splitlines()
    emo, pixels, use = lines[row + 1].split(",")
    if how in BREAKS:
        pixels = BREAKS[how][0](pixels, pos)
        needle = BREAKS[how][1]
    elif how == "label":
        emo, needle = label, "is not a label; expected an integer 0..6"
    elif how == "usage":
        use, needle = usage, "empty Usage"
    elif how == "field added":
        use, needle = use + ",extra", "4 fields; expected 3"
    lines[row + 1] = f"{emo},{pixels},{use}"
    if how == "field dropped":
        lines[row + 1], needle = f"{emo},{pixels}", "2 fields; expected 3"
    p = tmp_path / "rows.csv"
    p.write_text("\n".join(lines) + "\n")
    d, err = _load(p)
    assert d is None, how
    assert f"{p}: line {row + 2}: " in err and needle in err, (how, err)


@settings(max_examples=40)
@example(cut=len(gzip.compress(VALID)) - 3, zipped=True)
@example(cut=VALID.index(b"\n") + 1, zipped=False)
@given(cut=st.integers(0, len(VALID)), zipped=st.booleans())
def test_a_truncated_file_loads_its_whole_rows_or_names_where_it_broke(cut, zipped, tmp_path):
    """Cut anywhere: a cut between rows loads the rows before it; inside a row, that row is
    named; a cut gzip stream is named as truncated; nothing half-parsed is cached."""
    raw = gzip.compress(VALID, mtime=0) if zipped else VALID
    cut = min(cut, len(raw))
    p = tmp_path / ("cut.csv.gz" if zipped else "cut.csv")
    p.write_bytes(raw[:cut])
    d, err = _load(p)
    # Rows ended by a newline before the cut (the header's line is not a row).
    whole_rows = len(LABELS) if zipped else VALID[:cut].count(b"\n") - 1
    if d is not None:
        assert not zipped or cut == len(raw)
        n = len(d.labels)
        assert 1 <= n <= len(LABELS)
        assert np.array_equal(d.images, IMAGES[:n]) and np.array_equal(d.labels, LABELS[:n])
        assert n in (whole_rows, whole_rows + 1)  # the last may lack only its newline
    elif zipped and cut < len(raw) and cut >= 10:
        assert "corrupt or truncated gzip data" in err or "header" in err or "empty" in err


@settings(max_examples=60)
@given(flips=st.lists(st.tuples(st.integers(0, len(VALID) - 1), st.integers(0, 255)),
                      min_size=1, max_size=4),
       encoding=st.sampled_from(["utf-8", "utf-16", "latin-1", "cp1252"]))
def test_bytes_changed_anywhere_load_as_rows_or_are_one_line(flips, encoding, tmp_path):
    """Random bytes anywhere and other encodings: the load gives 48x48 uint8 images with labels
    0..6, or one DataError line naming the file; never another exception."""
    raw = bytearray(VALID.decode().encode(encoding))
    for at, b in flips:
        raw[at % len(raw)] = b
    p = tmp_path / "flipped.csv"
    p.write_bytes(bytes(raw))
    d, err = _load(p)
    if d is not None:
        assert d.images.dtype == np.uint8 and d.images.shape[1:] == (48, 48)
        assert set(d.labels.tolist()) <= set(range(7)) and len(d.usage) == len(d.labels)


# --------------------------------------------------------------------------- photos


@pytest.fixture(scope="module")
def shipped() -> serving.ServedModel:
    return serving.load(str(ROOT / "models" / "improved"))


@pytest.fixture(scope="module")
def portrait() -> np.ndarray:
    skimage_data = pytest.importorskip("skimage.data")
    return np.asarray(Image.fromarray(skimage_data.astronaut()).convert("L"))  # (512, 512)


MODES = ["1", "L", "LA", "P", "RGB", "RGBA", "CMYK", "I;16", "I", "F"]


def in_mode(g: np.ndarray, mode: str) -> tuple[Image.Image, np.ndarray]:
    """The grey portrait held in ``mode``, and the 8-bit grey a reader of that mode must see
    (its faithful 8-bit copy): deeper modes hold the same picture scaled to their range."""
    base = Image.fromarray(g)
    if mode == "I;16":
        return Image.fromarray(g.astype(np.uint16) * 257), g
    if mode == "I":
        return Image.fromarray(g.astype(np.int32) * 257, "I"), g
    if mode == "F":
        return Image.fromarray(g.astype(np.float32) / 255, "F"), g
    im = base.convert("RGB").convert(mode) if mode in ("CMYK", "RGBA", "P") else base.convert(mode)
    return im, np.asarray(im.convert("RGB").convert("L"))


def encode(im: Image.Image, orientation: int = 1) -> bytes:
    """Lossless bytes of ``im`` (PNG where it holds the mode, TIFF otherwise), with an EXIF
    orientation tag when ``orientation`` is not 1."""
    buf = io.BytesIO()
    fmt = "PNG" if im.mode in ("1", "L", "LA", "P", "RGB", "RGBA", "I;16") else "TIFF"
    kw = {}
    if orientation != 1:
        exif = Image.Exif()
        exif[0x0112] = orientation
        kw["exif"] = exif.tobytes()
    im.save(buf, fmt, **kw)
    return buf.getvalue()


# What a camera stores for each EXIF orientation, given the upright picture (the inverse of
# what a reader applies).
STORED = {1: lambda im: im, 2: lambda im: im.transpose(Image.Transpose.FLIP_LEFT_RIGHT),
          3: lambda im: im.transpose(Image.Transpose.ROTATE_180),
          4: lambda im: im.transpose(Image.Transpose.FLIP_TOP_BOTTOM),
          5: lambda im: im.transpose(Image.Transpose.TRANSPOSE),
          6: lambda im: im.transpose(Image.Transpose.ROTATE_90),
          7: lambda im: im.transpose(Image.Transpose.TRANSVERSE),
          8: lambda im: im.transpose(Image.Transpose.ROTATE_270)}


def _boxes(blob: bytes) -> list:
    return faces.detect(faces.grey(faces.open_image(blob, "photo"))).tolist()


@settings(max_examples=30)
@given(mode=st.sampled_from(MODES), orientation=st.integers(1, 8))
def test_a_photo_in_any_mode_and_orientation_finds_the_faces_of_its_8_bit_upright_copy(
        mode, orientation, portrait):
    """A metamorphic property on the project's test portrait: the mode a photo is stored in,
    and the EXIF orientation it is stored under, change nothing the detector sees."""
    im, copy = in_mode(portrait, mode)
    want = faces.detect(copy).tolist()
    got = _boxes(encode(STORED[orientation](im), orientation))
    assert got == want, (mode, orientation)
    if mode in ("L", "I;16", "I", "F"):  # these hold the portrait exactly
        assert len(want) >= 1


@st.composite
def any_photo(draw):
    """Bytes of an image of any mode and size up to 300x300 with random pixels, in a format
    that holds the mode, maybe with an EXIF orientation, maybe truncated."""
    mode = draw(st.sampled_from(MODES))
    w, h = draw(st.integers(1, 300)), draw(st.integers(1, 300))
    seed = draw(st.integers(0, 2**16))
    rng = np.random.default_rng(seed)
    g = rng.integers(0, 256, (h, w), dtype=np.uint8)
    im, _ = in_mode(g, mode)
    fmt = draw(st.sampled_from(["PNG", "TIFF", "GIF", "BMP", "JPEG", "WEBP"]))
    if fmt == "JPEG" and im.mode not in ("L", "RGB", "CMYK"):
        fmt = "TIFF"
    if fmt in ("GIF", "BMP", "WEBP") and im.mode not in ("L", "P", "RGB", "RGBA", "1"):
        fmt = "TIFF"
    if fmt == "PNG" and im.mode in ("CMYK", "I", "F"):
        fmt = "TIFF"
    buf = io.BytesIO()
    im.save(buf, fmt)
    blob = buf.getvalue()
    cut = draw(st.one_of(st.none(), st.integers(0, len(blob) - 1)))
    return (blob if cut is None else blob[:cut]), cut is None


def _bomb(w: int, h: int) -> bytes:
    """A PNG header that claims w x h pixels over a few bytes of data."""
    import struct
    import zlib

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(
            ">I", zlib.crc32(kind + body) & 0xFFFFFFFF)

    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 0, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(b"\x00" * 64)) + chunk(b"IEND", b""))


@settings(max_examples=60)
@example(photo=(_bomb(60000, 60000), False))
@example(photo=(_bomb(1, 1), False))
@given(photo=any_photo())
def test_any_photo_is_read_or_refused_by_name_in_predict_and_in_a_served_request(
        photo, shipped, tmp_path):
    """Every mode, size from 1x1, truncated anywhere or claiming more pixels than the limit:
    `pipeline.predict` writes a record or one error line naming the file, and a served photo
    request answers rows within the photo or an InputError naming the image."""
    from pipeline.predict import Outputs, photo as read_photo

    blob, whole = photo
    path = tmp_path / "photo.img"
    path.write_bytes(blob)
    try:
        rec = read_photo(shipped, path, Outputs(), None, [])
    except InputError as e:
        assert str(e).startswith(str(path)) and "\n" not in str(e)
        refused = True
    else:
        refused = False
        assert rec["file"] == str(path)
        for f in rec["faces"]:
            assert abs(sum(f["probs"].values()) - 1) < 1e-3
    try:
        out = shipped.predict({"image": [base64.b64encode(blob).decode()]})
    except InputError as e:
        assert str(e).startswith("image 0") and "\n" not in str(e)
        assert refused  # the same bytes are refused on both surfaces
    else:
        assert not refused
        assert list(out.columns) == ["image", "x", "y", "w", "h", *EMOTIONS, "label"]
        assert np.allclose(out[list(EMOTIONS)].sum(axis=1), 1, atol=1e-4)
        im = Image.open(io.BytesIO(blob))
        assert ((out["x"] >= 0) & (out["y"] >= 0)).all()
        assert ((out["x"] + out["w"] <= max(im.size)) & (out["y"] + out["h"] <= max(im.size))).all()


# --------------------------------------------------------------------------- raw pixels

SHAPES = {"(N,48,48)": lambda n: (n, 48, 48), "(N,1,48,48)": lambda n: (n, 1, 48, 48),
          "(N,2304)": lambda n: (n, 2304)}
NUMERIC = ["uint8", "int8", "int16", "uint16", "int32", "uint32", "int64", "float16", "float32",
           "float64"]


@settings(max_examples=40)
@given(n=st.integers(1, 5), shape=st.sampled_from(list(SHAPES)), dtype=st.sampled_from(NUMERIC),
       seed=st.integers(0, 2**16), as_list=st.booleans())
def test_raw_pixels_of_every_numeric_dtype_and_accepted_shape_answer_as_uint8_does(
        n, shape, dtype, seed, as_list, shipped):
    x = np.random.default_rng(seed).integers(0, 256, (n, 48, 48)).astype(np.uint8)
    x[:, 0, 0] = 255  # a batch in 0..1 is refused as looking scaled; raw pixels reach 255
    want = shipped.predict(x)
    batch = x.reshape(SHAPES[shape](n)).astype(dtype if dtype != "int8" else "int16")
    got = shipped.predict(batch.tolist() if as_list else batch)
    assert len(got) == n
    assert np.allclose(got[list(EMOTIONS)].to_numpy(), want[list(EMOTIONS)].to_numpy(),
                       atol=1e-3 if dtype == "float16" else 1e-6)


@st.composite
def refused_pixels(draw):
    """A raw-pixel batch the model must refuse: a shape it does not read, no image, values out
    of 0..255 or not finite, values scaled to 0..1, or values that are not numbers."""
    n = draw(st.integers(1, 3))
    kind = draw(st.sampled_from(["shape", "empty", "range", "nan", "scaled", "type"]))
    if kind == "shape":
        dims = draw(st.lists(st.integers(0, 60), min_size=1, max_size=4))
        ok = {(48, 48), (1, 48, 48), (2304,)}
        if tuple(dims[1:]) in ok or (len(dims) == 4 and tuple(dims[1:]) == (1, 48, 48)):
            dims[-1] += 1
        return np.zeros(dims, np.uint8), "got shape"
    if kind == "empty":
        return np.zeros((0, 48, 48), np.uint8), "holds no image"
    x = np.full((n, 48, 48), 100.0)
    if kind == "range":
        x[0, 1, 2] = draw(st.one_of(st.floats(max_value=-1e-3, allow_nan=False,
                                              allow_infinity=False),
                                    st.floats(min_value=255.001, allow_nan=False,
                                              allow_infinity=False)))
        return x, "pixel values must lie in 0..255"
    if kind == "nan":
        x[0, 3, 4] = draw(st.sampled_from([np.nan, np.inf, -np.inf]))
        return x, "NaN or infinite"
    if kind == "scaled":
        return np.full((n, 48, 48), draw(st.floats(0.01, 1.0))), "looks scaled to 0..1"
    dtype = draw(st.sampled_from(["bool", "complex64", "U3", "datetime64[s]"]))
    return np.zeros((n, 48, 48)).astype(dtype), "got values of type"


@settings(max_examples=60)
@given(case=refused_pixels())
def test_raw_pixels_the_model_cannot_read_are_refused_with_the_reason(case, shipped):
    x, needle = case
    with pytest.raises(InputError) as e:
        shipped.predict(x)
    assert needle in str(e.value) and "\n" not in str(e.value)
