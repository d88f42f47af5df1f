"""PDF pages as page images for ``python -m core.shards`` (docs/data.md §3).

A page is named like an image: ``doc.pdf#page=3`` (the PDF open parameter of RFC 8118; pages count from
1) or a ``PdfPage``; a bare ``doc.pdf`` is its only page. pypdfium2 (PDFium, Chrome's PDF renderer)
draws the page on white at a chosen DPI or longest side, and the page becomes PNG bytes, so a shard
holds a plain image and training never sees a PDF. By longest side, a long thin page is drawn with its
short side at least ``MIN_SHORT_SIDE`` px (its long side then exceeds the longest side asked): a 234 x
14,295 pt page would otherwise be a 21 px wide strip whose text no model reads (docs/data.md §3).
``page_paths`` names the pages of a PDF as ``python -m core.generate`` reads them. A PDF that cannot be
used is a ``PdfSkip`` with its reason: ``missing_image``, ``empty_pdf`` (0 bytes or no page),
``encrypted_pdf``, ``bad_pdf`` (PDFium cannot parse it), ``pdf_needs_page`` (several pages and no page
named), ``pdf_page_out_of_range``, ``image_too_large``.
"""
import io
import os
import re
from dataclasses import dataclass, field

from PIL import Image

from core.errors import ConfigError
from core.images import DEFAULT_MAX_IMAGE_PIXELS

DEFAULT_LONGEST_SIDE = 1288  # olmOCR's pipeline renders pages at this longest side (docs/data.md §3)
MIN_SHORT_SIDE = 128  # px: a page scaled to its longest side is never drawn narrower (the module doc)
POINTS_PER_INCH = 72  # PDF user space: 1/72 inch per unit
PDFIUM_PASSWORD, PDFIUM_FORMAT, PDFIUM_SECURITY = 4, 3, 6  # FPDF_GetLastError codes (fpdfview.h)
_FRAGMENT = re.compile(r"^(?P<path>.*\.pdf)(?:#page=(?P<page>\d+))?$", re.IGNORECASE)
_TRANSPOSE = {90: Image.Transpose.ROTATE_90, 180: Image.Transpose.ROTATE_180, 270: Image.Transpose.ROTATE_270}


class PdfSkip(Exception):
    """A PDF page that cannot become an image: ``reason`` (see the module doc) and a short ``detail``."""

    def __init__(self, reason, detail=""):
        super().__init__(reason)
        self.reason, self.detail = reason, detail


@dataclass(frozen=True)
class PdfPage:
    """One page of a PDF. ``page`` counts from 1 (None: the PDF's only page); ``rotate``: degrees the rendered
    image is turned counter-clockwise afterwards (Pillow's ROTATE_n, as olmOCR applies rotation_correction);
    ``data``: the PDF's bytes when it is not a file of its own (``path`` then only names it)."""
    path: str
    page: int = None
    rotate: int = 0
    data: bytes = field(default=None, repr=False, compare=False)

    def __str__(self):
        return self.path if self.page is None else f"{self.path}#page={self.page}"


def as_pdf_page(image):
    """``image`` (an Item's image: a PdfPage, a path, bytes) -> PdfPage if it names a PDF, else None."""
    if isinstance(image, PdfPage):
        return image
    if isinstance(image, str):
        m = _FRAGMENT.match(image)
        if m:
            return PdfPage(m["path"], int(m["page"]) if m["page"] else None)
    return None


@dataclass(frozen=True)
class Render:
    """How pages are drawn: at ``dpi``, or scaled so the longer side is ``longest_side`` pixels (one of the two);
    ``pages``: the page numbers to keep (a PageRange, None: all)."""
    dpi: float = None
    longest_side: int = DEFAULT_LONGEST_SIDE
    pages: object = None

    def __post_init__(self):
        if (self.dpi is None) == (self.longest_side is None):
            raise ConfigError("--dpi and --longest-side: give one of them, not both")
        if (self.dpi or self.longest_side) <= 0:
            raise ConfigError(f"--dpi / --longest-side must be positive, not {self.dpi or self.longest_side}")

    def scale(self, width_pt, height_pt):
        """Pixels per PDF unit for a page of width x height points (by longest side, the short side is at
        least MIN_SHORT_SIDE px)."""
        if self.dpi is not None:
            return self.dpi / POINTS_PER_INCH
        return max(self.longest_side / max(width_pt, height_pt), MIN_SHORT_SIDE / min(width_pt, height_pt))


class PageRange:
    """``--pages 1-3,7,10-``: pages counted from 1, ranges inclusive, an open end runs to the last page."""

    def __init__(self, text):
        self.text, self.spans = text, []
        for part in str(text).replace(" ", "").split(","):
            m = re.fullmatch(r"(\d+)(?:(-)(\d*))?", part)
            first = int(m[1]) if m else 0
            last = (int(m[3]) if m[3] else None) if m and m[2] else first
            if not m or first < 1 or (last is not None and last < first):
                raise ConfigError(f"--pages {text!r}: expected page numbers from 1 and ranges like 1-3,7,10-")
            self.spans.append((first, last))

    def __contains__(self, page):
        return any(first <= page and (last is None or page <= last) for first, last in self.spans)

    def __str__(self):
        return self.text


def _open(path, data=None):
    import pypdfium2 as pdfium  # imported here: only PDF input needs it

    if data is None and not os.path.isfile(path):
        raise PdfSkip("missing_image", "no such file")
    if (len(data) if data is not None else os.path.getsize(path)) == 0:
        raise PdfSkip("empty_pdf", "0 bytes")
    try:
        return pdfium.PdfDocument(data if data is not None else path)
    except pdfium.PdfiumError as e:
        code = getattr(e, "err_code", None)
        if code in (PDFIUM_PASSWORD, PDFIUM_SECURITY):
            raise PdfSkip("encrypted_pdf", str(e)) from None
        raise PdfSkip("bad_pdf", str(e)) from None


def page_count(path):
    """The number of pages of the PDF at ``path``; PdfSkip if it cannot be used (or has no page)."""
    doc = _open(path)
    try:
        if len(doc) == 0:
            raise PdfSkip("empty_pdf", "no page")
        return len(doc)
    finally:
        doc.close()


def page_paths(path):
    """An image path -> the image paths it stands for: a PDF of several pages -> ``doc.pdf#page=1`` ... in
    order; anything else (a one-page PDF, a named page, an image, a file that cannot be opened: its reader
    says why) -> itself."""
    page = as_pdf_page(path)
    if page is None or page.page is not None or not os.path.isfile(page.path):
        return [path]
    try:
        count = page_count(page.path)
    except PdfSkip:
        return [path]
    return [path] if count == 1 else [f"{path}#page={n}" for n in range(1, count + 1)]


def render_png(page, render, max_pixels=DEFAULT_MAX_IMAGE_PIXELS):
    """A PdfPage drawn as ``render`` says, on white, turned by ``page.rotate`` -> PNG bytes; PdfSkip."""
    doc = _open(page.path, page.data)
    try:
        count = len(doc)
        if count == 0:
            raise PdfSkip("empty_pdf", "no page")
        if page.page is None and count > 1:
            raise PdfSkip("pdf_needs_page", f"{count} pages; name one as {page.path}#page=N")
        number = page.page or 1
        if not 1 <= number <= count:
            raise PdfSkip("pdf_page_out_of_range", f"page {number} of {count}")
        pdf_page = doc[number - 1]
        try:
            width, height = pdf_page.get_size()
            scale = render.scale(width, height)
            pixels = round(width * scale) * round(height * scale)
            if max_pixels is not None and pixels > max_pixels:
                raise PdfSkip("image_too_large", f"{pixels:,} pixels at this size > {max_pixels:,}")
            bitmap = pdf_page.render(scale=scale, fill_color=(255, 255, 255, 255))
            image = bitmap.to_pil()
        except PdfSkip:
            raise
        except Exception as e:  # PDFium reports a page it cannot draw in several ways
            raise PdfSkip("bad_pdf", f"page {number}: {type(e).__name__}: {e}") from None
        finally:
            pdf_page.close()
    finally:
        doc.close()
    if page.rotate:
        if page.rotate not in _TRANSPOSE:
            raise PdfSkip("bad_pdf", f"rotation {page.rotate} is not 90, 180 or 270")
        image = image.transpose(_TRANSPOSE[page.rotate])
    buf = io.BytesIO()
    image.convert("RGB").save(buf, format="PNG")
    return buf.getvalue()
