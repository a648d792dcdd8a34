"""cgroups for jails: detection of the host's layout (v2, v1, hybrid) and one manager interface.

Every path is a parameter (the cgroup mount points, ``/proc/self/cgroup``), so the writers and
the detection are tested against temporary directory trees; the tests that claim a limit works
use the real kernel.
"""

from __future__ import annotations

from .base import Group
from .base import Limits
from .base import Usage
from .detect import Layout
from .detect import detect

__all__ = ["Group", "Layout", "Limits", "Usage", "detect"]
