"""Out of service: a lockout (leak, fault, ghost flow, operator, a water-condition alarm) holds the machine;
the reasons in words a person understands, and the machine number for support."""

from kiosk.ui.base import KioskScreen


class OutOfServiceScreen(KioskScreen):
    pass
