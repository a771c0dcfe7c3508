"""Offline: no link to the cloud, so no new sessions; says so plainly and shows the machine number."""

from kiosk.ui.base import KioskScreen


class OfflineScreen(KioskScreen):
    pass
