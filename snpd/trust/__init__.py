"""Verification: certificates, pinned AMD roots, chains, report signatures, appraisal. Pure."""
