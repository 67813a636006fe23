"""The web console (`/llmux/console`) and its event stream (`/llmux/v1/events`).

Its own room in `http/` (DESIGN.md §2): `hub` numbers the host's events and
fans them out without ever blocking the request path, `routes` serves the page,
the stream and the controls, `static/` holds the shipped page (plain HTML, CSS
and JavaScript: no build step, no third-party code).
"""

from llmuxd.http.console.routes import Console, control_access

__all__ = ["Console", "control_access"]
