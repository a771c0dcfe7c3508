"""The CJK font shipped in assets/fonts (Noto Sans SC, GB 2312 subset, SIL OFL), registered with Kivy as
"Tapshare" so no Chinese character renders as a box, on a Pi with no fonts installed too."""

from pathlib import Path

from kivy.core.text import LabelBase

FONT_DIR = Path(__file__).resolve().parents[2] / "assets" / "fonts"
REGULAR = FONT_DIR / "NotoSansSC-Regular-GB2312.otf"
BOLD = FONT_DIR / "NotoSansSC-Bold-GB2312.otf"
NAME = "Tapshare"


def register() -> str:
    for f in (REGULAR, BOLD):
        if not f.exists():
            raise FileNotFoundError(f"the kiosk font {f} is missing (it ships in assets/fonts)")
    LabelBase.register(NAME, fn_regular=str(REGULAR), fn_bold=str(BOLD))
    return NAME
