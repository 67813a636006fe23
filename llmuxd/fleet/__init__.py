"""Past one host: what a router in front of several llmux hosts needs to route well.

llmux does not route between hosts; the routers users already run do (LiteLLM's
proxy, vllm-router). This package makes them route by what each host has awake:

- `signal`: the per-host fleet signal (`GET /llmux/v1/state`) as plain data, written
  by the daemon and read by everything below, so the wire format lives in one place;
- `ranking`: which of a model's deployments to prefer, given each host's signal;
- `view`: a background-refreshed view of many hosts' signals (never a blocking call
  per request; stale or unreachable hosts are skipped);
- `litellm`: the LiteLLM hook (`litellm_settings.callbacks`) built on the view;
- `cli`: `llmuxctl fleet`, the model_list and the one-screen table.

Nothing here imports the daemon's internals: `litellm` runs inside LiteLLM's
process, with only the standard library and aiohttp besides LiteLLM itself.
"""
