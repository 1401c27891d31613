"""Governance: the audit chain's verifier, signed sign-off, bounds as code and fallback drills.

Imports flow ``monitoring, export <- governance``: nothing in the serving path imports this package.
"""

from __future__ import annotations

from fallbackformer.governance.audit import AuditReport, verify_log, verify_records

__all__ = ["AuditReport", "verify_log", "verify_records"]
