"""Checks on what people type and upload when they register (s4): mainland mobile numbers, legal names,
the 18-digit resident identity number of GB 11643-1999 (with its ISO 7064 MOD 11-2 check digit), and
photos of identity documents. Pure functions: no database, no clock (``today`` is passed in).

Masking is here too, because an ID number or phone number is never shown or logged in full.
"""

from __future__ import annotations

import datetime as dt
import io
import re
import unicodedata
from dataclasses import dataclass

from PIL import Image, ImageOps, UnidentifiedImageError

# ---------------------------------------------------------------- phone numbers

PHONE_RE = re.compile(r"^1[3-9]\d{9}$")


def normalize_phone(raw: str) -> str:
    """A mainland China mobile number as 11 digits; accepts spaces, dashes and a +86 / 0086 prefix."""
    s = re.sub(r"[\s\-()]", "", raw or "")
    for prefix in ("+86", "0086"):
        if s.startswith(prefix):
            s = s[len(prefix):]
    if not PHONE_RE.match(s):
        raise ValueError("a mainland China mobile number has 11 digits and starts with 13-19")
    return s


def mask_phone(phone: str) -> str:
    return phone[:3] + "****" + phone[-4:] if len(phone) == 11 else "***"


# ---------------------------------------------------------------- legal names

_NAME_OK = re.compile(r"^[\u3400-\u9fff\U00020000-\U0003134F\uf900-\ufaffA-Za-z·•.\- ]+$")


def normalize_name(raw: str) -> str:
    """A legal name as on the document: CJK or Latin letters, the middle dot of minority and foreign names,
    spaces, '.' and '-'; 2 to 40 characters."""
    name = unicodedata.normalize("NFC", " ".join((raw or "").split()))
    if not 2 <= len(name) <= 40:
        raise ValueError("a legal name has 2 to 40 characters")
    if not _NAME_OK.match(name):
        raise ValueError("a legal name has only letters (Chinese or Latin), '·', '.', '-' and spaces")
    return name.replace("•", "·")


def mask_name(name: str) -> str:
    return name[0] + "*" * max(1, len(name) - 1) if name else ""


# ---------------------------------------------------------------- resident identity numbers (GB 11643-1999)

WEIGHTS = tuple(pow(2, 17 - i, 11) for i in range(17))       # 7 9 10 5 8 4 2 1 6 3 7 9 10 5 8 4 2
CHECK_CHARS = "10X98765432"                                   # indexed by (sum of weighted digits) mod 11
# first two digits: provinces (GB/T 2260) plus 71 Taiwan, 81 Hong Kong, 82 Macau, 83 Taiwan residents
PROVINCES = frozenset({11, 12, 13, 14, 15, 21, 22, 23, 31, 32, 33, 34, 35, 36, 37, 41, 42, 43, 44, 45, 46,
                       50, 51, 52, 53, 54, 61, 62, 63, 64, 65, 71, 81, 82, 83})
DOC_TYPES = ("resident_id", "passport", "hk_macau_permit", "taiwan_permit")


def check_digit(first17: str) -> str:
    return CHECK_CHARS[sum(int(d) * w for d, w in zip(first17, WEIGHTS, strict=True)) % 11]


@dataclass(frozen=True)
class ResidentId:
    number: str
    birth_date: dt.date
    province: int
    female: bool


def check_resident_id(raw: str, today: dt.date) -> ResidentId:
    """Parse an 18-digit resident ID; raises ValueError saying exactly what is wrong."""
    n = (raw or "").strip().upper().replace(" ", "")
    if len(n) != 18:
        raise ValueError(f"a resident ID number has 18 characters, not {len(n)}")
    if not n[:17].isdigit() or not (n[17].isdigit() or n[17] == "X"):
        raise ValueError("a resident ID number is 17 digits followed by a digit or X")
    if int(n[:2]) not in PROVINCES:
        raise ValueError("the first two digits are not a province code")
    try:
        born = dt.date(int(n[6:10]), int(n[10:12]), int(n[12:14]))
    except ValueError:
        raise ValueError("digits 7-14 are not a valid date of birth") from None
    if born < dt.date(1900, 1, 1) or born > today:
        raise ValueError("the date of birth (digits 7-14) is impossible")
    if check_digit(n[:17]) != n[17]:
        raise ValueError("the check digit (the last character) does not match: please check the number")
    return ResidentId(n, born, int(n[:2]), int(n[16]) % 2 == 0)


def normalize_document(doc_type: str, raw: str, today: dt.date) -> str:
    """The document number to store. Resident IDs are checked in full; other documents get a format check
    and go to manual review."""
    if doc_type == "resident_id":
        return check_resident_id(raw, today).number
    n = (raw or "").strip().upper().replace(" ", "")
    if not re.fullmatch(r"[A-Z0-9]{5,20}", n):
        raise ValueError("a document number has 5 to 20 letters or digits")
    return n


def mask_document(number: str) -> str:
    """First two and last two characters only: ``11**************1X``."""
    if len(number) <= 4:
        return "*" * len(number)
    return number[:2] + "*" * (len(number) - 4) + number[-2:]


# ---------------------------------------------------------------- identity document photos

MAX_PHOTO_BYTES = 5 * 1024 * 1024
MIN_PHOTO_SIDE_PX = 320
MAX_PHOTO_SIDE_PX = 8_000
MAX_PHOTO_PIXELS = 40_000_000          # a JPEG is decoded at 1/2 to 1/8 scale (draft): ~30 MB at most
MAX_PNG_PIXELS = 12_000_000            # a PNG cannot be decoded at a smaller scale: 12 MP is ~48 MB
STORED_LONG_SIDE_PX = 2_000
JPEG_MAGIC, PNG_MAGIC = b"\xff\xd8\xff", b"\x89PNG\r\n\x1a\n"


class PhotoRejected(ValueError):
    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code


def reencode_photo(data: bytes) -> tuple[bytes, int, int]:
    """Check that ``data`` is a real JPEG or PNG within the size and pixel limits, then re-encode it as a
    fresh JPEG (EXIF and every other metadata dropped, orientation applied). Returns (jpeg, width, height)."""
    if len(data) > MAX_PHOTO_BYTES:
        raise PhotoRejected("photo_too_large", f"the photo is over {MAX_PHOTO_BYTES // (1024 * 1024)} MB")
    if not data.startswith((JPEG_MAGIC, PNG_MAGIC)):
        raise PhotoRejected("not_an_image", "the photo must be a JPEG or PNG image")
    try:
        with Image.open(io.BytesIO(data), formats=("JPEG", "PNG")) as img:
            w, h = img.size                      # from the header, before any pixel is decoded
            most = MAX_PNG_PIXELS if img.format == "PNG" else MAX_PHOTO_PIXELS
            if w * h > most or max(w, h) > MAX_PHOTO_SIDE_PX:
                raise PhotoRejected("photo_too_many_pixels",
                                    f"the photo is {w}x{h}; at most {MAX_PHOTO_SIDE_PX} px a side and "
                                    f"{most // 1_000_000} megapixels for a {img.format}")
            if min(w, h) < MIN_PHOTO_SIDE_PX:
                raise PhotoRejected("photo_too_small",
                                    f"the photo is {w}x{h}; the document must be legible "
                                    f"(at least {MIN_PHOTO_SIDE_PX} px a side)")
            if img.format == "JPEG":
                img.draft("RGB", (STORED_LONG_SIDE_PX, STORED_LONG_SIDE_PX))   # decode at a reduced scale
            img.load()
            upright = ImageOps.exif_transpose(img).convert("RGB")
    except PhotoRejected:
        raise
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
        raise PhotoRejected("not_an_image", f"the photo could not be read as an image ({type(e).__name__})") from None
    upright.thumbnail((STORED_LONG_SIDE_PX, STORED_LONG_SIDE_PX))
    out = io.BytesIO()
    upright.save(out, format="JPEG", quality=85, optimize=True)       # no exif= argument: no metadata
    return out.getvalue(), upright.width, upright.height
