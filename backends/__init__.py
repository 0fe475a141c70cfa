"""Backends: each takes a Plan and emits code (reference, torch, triton, newton).

They arrive with the issues that build them; the frontend needs none."""
