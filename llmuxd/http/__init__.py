"""The HTTP front end: OpenAI routes proxied by model, /v1/models, /health,
/metrics, served on systemd's activation sockets or the configured address.

`FrontEnd` (app.py) builds the aiohttp application around a switcher;
`HttpServer` (listen.py) serves it. aiohttp types stay inside this package.
"""

from llmuxd.http.app import FrontEnd
from llmuxd.http.listen import HttpServer, activation_sockets, bind_listen, parse_listen

__all__ = ["FrontEnd", "HttpServer", "activation_sockets", "bind_listen", "parse_listen"]
