"""What every screen shares: the presented texts (a dict replaced whole, so one assignment redraws what
changed) and the accessors the .kv files use. (kv does not bind through ``root.v.get(...)``; passing
``root.v`` as an argument makes it re-evaluate when the dict is replaced.)"""

from kivy.properties import DictProperty
from kivy.uix.screenmanager import Screen


class KioskScreen(Screen):
    v = DictProperty({})

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
