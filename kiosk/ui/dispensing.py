"""Dispensing: live volume and cost, credit left, flow rate, progress toward the limit, and the reminder
that the stop button on the machine ends the pour (plus an on-screen stop)."""

from kiosk.ui.base import KioskScreen


class DispensingScreen(KioskScreen):
    pass
