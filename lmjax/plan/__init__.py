"""The resource planner: `planner` (what a run costs; `python -m lmjax.plan`), `memory` (bytes
per device, part by part), `hardware` (the accelerators it knows)."""
