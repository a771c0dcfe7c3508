"""Updating: a software update is switching releases and will restart the machine; no new sessions meanwhile.
Says so plainly (the person scanning now is refused with the same words), with the machine number."""

from kiosk.ui.base import KioskScreen


class UpdatingScreen(KioskScreen):
    pass
