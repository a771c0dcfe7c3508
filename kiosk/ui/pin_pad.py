"""The technicians' PIN pad, opened by a long press on the machine number (or of the stop button while
idle). Its keys and buttons go to :class:`~kiosk.ui.maintenance.MaintenanceScreen`, which checks the PIN on a
worker thread (scrypt is slow on purpose) and puts the answer in this screen's message."""

from kivy.properties import StringProperty

from kiosk.ui.base import KioskScreen

MAX_DIGITS = 8


class PinPadScreen(KioskScreen):
    entered = StringProperty("")
    message = StringProperty("")

    def press(self, key: str) -> None:
        if key == "del":
            self.entered = self.entered[:-1]
        elif key.isdigit() and len(self.entered) < MAX_DIGITS:
            self.entered += key

    def reset(self) -> None:
        self.entered, self.message = "", ""
