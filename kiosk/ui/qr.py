"""The rotating QR code as a Kivy texture: one texel per module (quiet zone included), magnified with
nearest-neighbour filtering so the edges stay sharp at any size."""

import segno
from kivy.graphics.texture import Texture


def qr_texture(url: str) -> Texture:
    code = segno.make_qr(url, error="m")
    rows = [list(r) for r in code.matrix_iter(scale=1, border=4)]
    n = len(rows)
    buf = bytearray()
    for row in reversed(rows):                    # GL textures start at the bottom row
        for dark in row:
            v = 0 if dark else 255
            buf += bytes((v, v, v, 255))
    tex = Texture.create(size=(n, n), colorfmt="rgba")
    tex.blit_buffer(bytes(buf), colorfmt="rgba", bufferfmt="ubyte")
    tex.mag_filter = "nearest"
    tex.min_filter = "nearest"
    return tex
