"""Builds assets/fonts/*.otf: the Simplified Chinese face of Noto Sans CJK (SIL Open Font License 1.1),
cut down to GB 2312 (all 6,763 hanzi), ASCII, Latin-1 and CJK punctuation, so the kiosk renders Chinese
with no system font and the files stay small. Needs Debian's fonts-noto-cjk and fontTools (pip install
fonttools); run once by a developer, the output is committed.

    .venv/bin/python scripts/make_font_subset.py
"""

from pathlib import Path

from fontTools import subset
from fontTools.ttLib import TTCollection

ROOT = Path(__file__).resolve().parent.parent
SOURCES = {"Regular": "/usr/share/fonts/opentype/noto/NotoSansCJK-Regular.ttc",
           "Bold": "/usr/share/fonts/opentype/noto/NotoSansCJK-Bold.ttc"}
SC_INDEX = 2        # JP, KR, SC, TC, HK: the third face is Simplified Chinese


def characters() -> str:
    chars = {chr(c) for c in range(0x20, 0x7F)} | {chr(c) for c in range(0xA0, 0x100)}
    chars |= {chr(c) for c in range(0x3000, 0x3040)} | {chr(c) for c in range(0xFF01, 0xFF66)}
    chars |= set("←→↑↓✓✗…·•—–‘’“”№℃°±×÷")
    for hi in range(0xA1, 0xF8):
        for lo in range(0xA1, 0xFF):
            try:
                chars.add(bytes([hi, lo]).decode("gb2312"))
            except UnicodeDecodeError:
                pass
    return "".join(sorted(chars))


def main() -> None:
    text = characters()
    out_dir = ROOT / "assets" / "fonts"
    out_dir.mkdir(parents=True, exist_ok=True)
    for weight, src in SOURCES.items():
        font = TTCollection(src).fonts[SC_INDEX]
        opts = subset.Options()
        opts.layout_features = ["*"]
        opts.name_IDs = ["*"]
        opts.name_languages = ["*"]
        opts.notdef_outline = True
        sub = subset.Subsetter(opts)
        sub.populate(text=text)
        sub.subset(font)
        path = out_dir / f"NotoSansSC-{weight}-GB2312.otf"
        font.save(path)
        print(f"{path.relative_to(ROOT)}: {path.stat().st_size / 1e6:.1f} MB, {len(text)} characters")


if __name__ == "__main__":
    main()
