"""What every screen shares: the presented texts (a dict replaced whole, so one assignment redraws what
changed) and the accessors the .kv files use. (kv does not bind through ``root.v.get(...)``; passing
``root.v`` as an argument makes it re-evaluate when the dict is replaced.)"""

from kivy.properties import DictProperty
from kivy.uix.screenmanager import Screen


class KioskScreen(Screen):
    v = DictProperty({})
    shown_at = 0.0

    def on_pre_enter(self, *_a) -> None:
        from kivy.clock import Clock
        self.shown_at = Clock.get_time()

    def on_touch_down(self, touch):
        # a touch that began before this screen was shown (the finger that pressed OK on the PIN pad, whose
        # events arrive as the screens change) must not act on this screen: seen pressing "exit maintenance"
        if getattr(touch, "time_start", 0) and touch.time_start < self.shown_at:
            return True
        return super().on_touch_down(touch)

    def show(self, view: dict) -> None:
        if view != self.v:
            self.v = view

    @staticmethod
    def val(key: str, v: dict) -> str:
        return str(v.get(key, ""))

    @staticmethod
    def num(key: str, v: dict) -> float:
        return float(v.get(key, 0) or 0)

    @staticmethod
    def flag(key: str, v: dict) -> bool:
        return bool(v.get(key))
