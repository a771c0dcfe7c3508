"""Numbers entered by touch alone: a field that opens an on-screen numeric keypad (a dispenser has no keyboard,
and Kivy's TextInput opens none on a kiosk). Used for the calibration wizard's target and jug reading."""

from __future__ import annotations

from kivy.metrics import dp
from kivy.properties import NumericProperty, StringProperty
from kivy.uix.behaviors import ButtonBehavior
from kivy.uix.boxlayout import BoxLayout
from kivy.uix.button import Button
from kivy.uix.gridlayout import GridLayout
from kivy.uix.label import Label
from kivy.uix.modalview import ModalView

BLUE, GREY, WHITE, INK = (0.039, 0.4, 0.761, 1), (0.5, 0.55, 0.6, 1), (1, 1, 1, 1), (0.09, 0.125, 0.165, 1)


class NumberField(ButtonBehavior, Label):
    """Shows a whole number; a tap opens :class:`NumericKeypad` to change it. ``text`` holds the digits."""

    max_digits = NumericProperty(5)
    title = StringProperty("")

    def on_release(self) -> None:
        NumericKeypad(self).open()


class NumericKeypad(ModalView):
    """Digits, delete, clear, cancel and OK, in buttons a finger hits (at least 56 dp)."""

    entry = StringProperty("")

    def __init__(self, field: NumberField, **kw) -> None:
        super().__init__(size_hint=(None, None), size=(dp(320), dp(420)), auto_dismiss=True,
                         background_color=(0, 0, 0, 0.45), **kw)
        self.field = field
        self.entry = field.text
        from kivy.app import App
        app = App.get_running_app()
        lang = getattr(app, "lang", "zh")

        def tr(key: str) -> str:
            return app.tr(key, lang) if app is not None and hasattr(app, "tr") else key
        box = BoxLayout(orientation="vertical", padding=dp(10), spacing=dp(8))
        box.add_widget(Label(text=field.title, font_name="Tapshare", font_size="16sp", color=WHITE,
                             size_hint_y=None, height=dp(28)))
        self.shown = Label(text=self.entry or "0", font_name="Tapshare", font_size="30sp", bold=True, color=WHITE,
                           size_hint_y=None, height=dp(52))
        box.add_widget(self.shown)
        grid = GridLayout(cols=3, spacing=dp(6))
        for key in ("1", "2", "3", "4", "5", "6", "7", "8", "9", "C", "0", "←"):
            b = Button(text=key, font_name="Tapshare", font_size="24sp", bold=True, color=INK,
                       background_normal="", background_color=WHITE)
            b.bind(on_release=lambda _b, k=key: self.press(k))
            grid.add_widget(b)
        box.add_widget(grid)
        row = BoxLayout(size_hint_y=None, height=dp(56), spacing=dp(6))
        for caption, colour, action in ((tr("cancel"), GREY, self.dismiss), (tr("ok"), BLUE, self.accept)):
            b = Button(text=caption, font_name="Tapshare", font_size="20sp", bold=True, color=WHITE,
                       background_normal="", background_color=colour)
            b.bind(on_release=lambda _b, a=action: a())
            row.add_widget(b)
        box.add_widget(row)
        self.add_widget(box)

    def press(self, key: str) -> None:
        if key == "←":
            self.entry = self.entry[:-1]
        elif key == "C":
            self.entry = ""
        elif len(self.entry) < self.field.max_digits:
            self.entry = (self.entry + key).lstrip("0") or ("0" if key == "0" else "")

    def on_entry(self, _inst, value: str) -> None:
        if hasattr(self, "shown"):
            self.shown.text = value or "0"

    def accept(self) -> None:
        self.field.text = self.entry
        self.dismiss()
