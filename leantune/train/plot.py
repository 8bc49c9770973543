"""A dependency-free loss plot: rasterize lines into an RGB buffer and write a PNG with zlib.

matplotlib would be a heavy dependency for one picture; this draws axes, the train-loss curve (blue),
eval-loss points (red) and min/max labels in a 3x5 pixel font (digits, a-z, a few signs), scaled 2x.
"""
from __future__ import annotations

import struct
import zlib
from pathlib import Path

_FONT = {  # 3x5 glyphs, rows top->bottom, 3 bits per row
    "0": "111101101101111", "1": "010110010010111", "2": "111001111100111", "3": "111001111001111",
    "4": "101101111001001", "5": "111100111001111", "6": "111100111101111", "7": "111001010010010",
    "8": "111101111101111", "9": "111101111001111", ".": "000000000000010", "-": "000000111000000",
    "e": "000111111100111", " ": "000000000000000", "s": "011100111001110", "t": "010111010010011",
    "p": "000111101111100", "l": "100100100100111", "o": "000111101101111", "v": "000101101101010",
    "a": "000011101101011", "r": "000111100100100", "i": "010000010010010", "n": "000110101101101",
    ":": "000010000010000", "/": "001001010100100",
    # the rest of the alphabet and a few signs, for `leantune sweep`'s axis names and metrics
    "b": "100100111101111", "c": "000111100100111", "d": "001001111101111", "f": "011010111010010",
    "g": "111100101101111", "h": "100100111101101", "j": "001000001001110", "k": "100101110101101",
    "m": "000111111101101", "q": "000111101111001", "u": "000101101101111", "w": "000101101111111",
    "x": "000101010101101", "y": "101101111001111", "z": "111001010100111", "=": "000111000111000",
    ",": "000000000010100", "_": "000000000000111", "(": "010100100100010", ")": "010001001001010",
}


class Canvas:
    def __init__(self, w: int, h: int):
        self.w, self.h = w, h
        self.px = bytearray(b"\xff" * (w * h * 3))

    def dot(self, x: int, y: int, rgb, r: int = 0):
        for dx in range(-r, r + 1):
            for dy in range(-r, r + 1):
                xx, yy = x + dx, y + dy
                if 0 <= xx < self.w and 0 <= yy < self.h:
                    i = (yy * self.w + xx) * 3
                    self.px[i:i + 3] = bytes(rgb)

    def line(self, x0, y0, x1, y1, rgb):
        n = max(abs(x1 - x0), abs(y1 - y0), 1)
        for k in range(n + 1):
            self.dot(round(x0 + (x1 - x0) * k / n), round(y0 + (y1 - y0) * k / n), rgb)

    def text(self, x: int, y: int, s: str, rgb=(0, 0, 0), scale: int = 2):
        for c in s.lower():
            g = _FONT.get(c, _FONT[" "])
            for r in range(5):
                for col in range(3):
                    if g[r * 3 + col] == "1":
                        for sx in range(scale):
                            for sy in range(scale):
                                self.dot(x + col * scale + sx, y + r * scale + sy, rgb)
            x += 4 * scale

    def png(self) -> bytes:
        raw = b"".join(b"\x00" + bytes(self.px[y * self.w * 3:(y + 1) * self.w * 3]) for y in range(self.h))

        def chunk(tag, data):
            return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data) & 0xFFFFFFFF)

        hdr = struct.pack(">IIBBBBB", self.w, self.h, 8, 2, 0, 0, 0)
        return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", hdr) + chunk(b"IDAT", zlib.compress(raw, 6)) + chunk(b"IEND", b"")


def _fmt(v: float) -> str:
    return f"{v:.3g}"


def plot_losses(train: list[tuple[float, float]], evals: list[tuple[float, float]], path: Path,
                w: int = 640, h: int = 400, title: str = "loss: train - / eval o", xlabel: str = "step") -> None:
    """Write `path` (PNG): loss against step (or any y against x: `leantune sweep` plots its metric against
    the axis value with it). Written to a temp name, then renamed."""
    c = Canvas(w, h)
    left, right, top, bottom = 70, w - 20, 30, h - 40
    pts = train + evals
    if pts:
        s0, s1 = min(p[0] for p in pts), max(p[0] for p in pts)
        s1 = s1 if s1 > s0 else s0 + 1
        lo, hi = min(p[1] for p in pts), max(p[1] for p in pts)
        hi = hi if hi > lo else lo + 1.0

        def xy(step, loss):
            return (round(left + (step - s0) / (s1 - s0) * (right - left)),
                    round(bottom - (loss - lo) / (hi - lo) * (bottom - top)))

        for a, b in zip(train, train[1:]):
            c.line(*xy(*a), *xy(*b), (31, 119, 180))
        for p in evals:
            c.dot(*xy(*p), (214, 39, 40), r=3)
        c.text(4, top - 4, _fmt(hi))
        c.text(4, bottom - 8, _fmt(lo))
        x0, x1 = (str(v) if isinstance(v, int) else _fmt(v) for v in (s0, s1))  # steps stay whole numbers
        c.text(left, bottom + 12, x0)
        c.text(right - 8 * len(x1), bottom + 12, x1)
    c.line(left, top, left, bottom, (0, 0, 0))
    c.line(left, bottom, right, bottom, (0, 0, 0))
    c.text(left + 10, 8, title)
    c.text((left + right) // 2 - 4 * len(xlabel), bottom + 12, xlabel)
    tmp = Path(str(path) + ".tmp")
    tmp.write_bytes(c.png())
    tmp.replace(path)
