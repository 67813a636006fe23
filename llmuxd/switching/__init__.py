"""Internals of the switcher; import the public names from `llmuxd.switcher`.

state.py    records (models, groups, waiters), Lease, and the status snapshot types
phases.py   one switch: backoff, cooldown, drain, sleep, wake (a mixin of Switcher)
control.py  switch, pin, modes, sleep/wake, eviction overrides, reload (a mixin of Switcher)
demand.py   the contexts policies decide on, counted by priority (interactive, batch)
errors.py   InvalidMode, ShuttingDown
"""
