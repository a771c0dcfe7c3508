"""The parts the dispensing core (:class:`kiosk.session.DispenserCore`) is made of.

Each part owns one piece of the machine's state and decides what happens to it; the core hands each event
to the parts it concerns and merges their actions, in order. Like the core, the parts are pure: no Kivy,
gpiozero, requests, sqlite or clock reads; time comes in as ``now_ms``.

* :mod:`kiosk.core.settings`: :class:`CoreSettings`, the configuration the core needs.
* :mod:`kiosk.core.lockouts`: the active lockouts, and who may clear them.
* :mod:`kiosk.core.alarms`: the water and tank readings and the condition alarms on them (temperature band,
  TDS, low water, leak sensor).
* :mod:`kiosk.core.meter`: the flow meter's counter, its plausibility check and the totalizer's pending pulses.
* :mod:`kiosk.core.ghost`: flow with the valve closed, and the lockout when it is too much.
* :mod:`kiosk.core.customer`: a customer's session, from grant to receipt.
* :mod:`kiosk.core.tech_pour`: technicians' pours and the meter's calibration.
* :mod:`kiosk.core.maintenance_mode`: maintenance mode and its inactivity timeout.
* :mod:`kiosk.core.update_hold`: the hold a software update takes while it switches releases (no starts).
"""
