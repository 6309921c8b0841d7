"""The Akida target's legalization passes and approximations (import name ``qanac.passes.akida``).

Importing this package registers them; the ``akida`` target (``qanac.backends.akida.target``) names it
as its pass package, so the core loads it only through the target registry.
"""

from __future__ import annotations

from qanac.passes.akida import approximations, conv, pooling, scaling  # noqa: F401  (registration)
