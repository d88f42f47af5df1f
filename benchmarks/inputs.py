"""Inputs the data benchmarks (and tests) make: PDFs written byte by byte (pages of Helvetica text and black
boxes, an encrypted one), and an HTTP server on 127.0.0.1 for a folder of shards."""
import contextlib
import functools
import http.server
import threading

PAGE = (612, 792)  # US Letter, in points


def pdf_bytes(pages, size=PAGE, encrypted=False, rotate=0):
    """A PDF with one page per content stream in ``pages`` (PDF operators, e.g. "0 0 0 rg 72 600 200 100 re f");
    ``encrypted``: a standard security handler whose user password is not empty, so no reader opens it."""
    objects = [b"<< /Type /Font /Subtype /Type1 /BaseFont /Helvetica >>", None]  # 1: font, 2: page tree
    kids = []
    for content in pages:
        data = content.encode("latin-1")
        objects.append(b"<< /Length %d >>\nstream\n%s\nendstream" % (len(data), data))
        objects.append(b"<< /Type /Page /Parent 2 0 R /MediaBox [0 0 %d %d] /Rotate %d /Resources << /Font "
                       b"<< /F1 1 0 R >> >> /Contents %d 0 R >>" % (size[0], size[1], rotate, len(objects)))
        kids.append(len(objects))
    objects[1] = b"<< /Type /Pages /Kids [%s] /Count %d >>" % (b" ".join(b"%d 0 R" % k for k in kids), len(kids))
    objects.append(b"<< /Type /Catalog /Pages 2 0 R >>")
    trailer = b"<< /Size %d /Root %d 0 R" % (len(objects) + 1 + encrypted, len(objects))
    if encrypted:
        objects.append(b"<< /Filter /Standard /V 1 /R 2 /O <%s> /U <%s> /P -4 >>" % (b"11" * 32, b"22" * 32))
        trailer += b" /Encrypt %d 0 R /ID [<%s> <%s>]" % (len(objects), b"33" * 16, b"33" * 16)
    out, offsets = bytearray(b"%PDF-1.4\n"), []
    for number, body in enumerate(objects, 1):
        offsets.append(len(out))
        out += b"%d 0 obj\n%s\nendobj\n" % (number, body)
    xref = len(out)
    out += b"xref\n0 %d\n0000000000 65535 f \n" % (len(objects) + 1)
    out += b"".join(b"%010d 00000 n \n" % offset for offset in offsets)
    out += b"trailer\n%s >>\nstartxref\n%d\n%%%%EOF\n" % (trailer, xref)
    return bytes(out)


def box(x, y, w, h):
    """A filled black rectangle, PDF coordinates (origin bottom left, points)."""
    return f"0 0 0 rg {x} {y} {w} {h} re f"


def text(x, y, words, size=48):
    return f"BT /F1 {size} Tf {x} {y} Td ({words}) Tj ET"


def page_of_lines(lines, size=12, top=740, left=54, leading=16):
    """A content stream of ``lines`` of Helvetica text from the top of a Letter page down."""
    return " ".join(text(left, top - i * leading, line.replace("(", "").replace(")", ""), size)
                    for i, line in enumerate(lines))


class _Quiet(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):
        pass


@contextlib.contextmanager
def serve(folder):
    """An HTTP server for ``folder`` on 127.0.0.1 (a free port) while the block runs; yields its base URL."""
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(_Quiet, directory=str(folder)))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()
