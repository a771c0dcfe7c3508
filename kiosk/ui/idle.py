"""Idle: the rotating QR code, price per litre, tank temperature and water quality, machine number."""

from kivy.properties import ObjectProperty

from kiosk.ui.base import KioskScreen


class IdleScreen(KioskScreen):
    qr_texture = ObjectProperty(None, allownone=True)
