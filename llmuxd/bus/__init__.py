"""io.llmux.LLMux1 on D-Bus: the service the daemon exports and the client llmuxctl uses.

    service.py        export_service() / LLMuxService: manager + per-model objects
    auth.py           caller capture, polkit, @bus_method(action=... | public=True)
    errors.py         the one exception <-> D-Bus error name registry
    introspection.py  introspection XML (Introspect replies and the files in dbus/)
    connection.py     open_bus(): a connection that survives a full socket buffer
    client.py         LLMuxClient for llmuxctl and tests

D-Bus types stay in this package; the switcher knows nothing of the bus.
"""
