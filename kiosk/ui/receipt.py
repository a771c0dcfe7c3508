"""Receipt: the bill; back to idle after the configured time or a touch."""

from kivy.properties import StringProperty

from kiosk.ui.base import KioskScreen


class ReceiptScreen(KioskScreen):
    countdown = StringProperty("")

    def on_touch_down(self, touch):
        if self.collide_point(*touch.pos) and not super().on_touch_down(touch):
            from kivy.app import App
            App.get_running_app().dismiss_receipt()
            return True
        return True
