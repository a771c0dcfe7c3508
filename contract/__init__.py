"""The contract between dispenser and cloud, in one pure package both sides import and that imports neither
(no requests, no web framework, no Kivy, no hardware):

* :mod:`contract.signing`: signed device requests and the protocol version;
* :mod:`contract.qr`: the machine's time-based QR codes;
* :mod:`contract.billing`: the fee rule, billing arithmetic in integer fen, and the points rule;
* :mod:`contract.messages`: every message as a strict pydantic model;
* the software version, in one place.

``import contract as p`` gives all of it under one name."""

from contract.billing import *  # noqa: F403
from contract.events import *  # noqa: F403
from contract.limits import *  # noqa: F403
from contract.messages import *  # noqa: F403
from contract.qr import *  # noqa: F403
from contract.signing import *  # noqa: F403

SOFTWARE_VERSION = "0.2.0"           # the dispenser's and the cloud's, reported in heartbeats and /healthz
