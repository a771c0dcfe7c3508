"""Maintenance: a technician is at the machine (the maintenance issue adds the technician's controls)."""

from kiosk.ui.base import KioskScreen


class MaintenanceScreen(KioskScreen):
    pass
