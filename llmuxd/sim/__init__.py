"""`llmux-vllm-sim`, a vLLM 0.32 server simulator (see llmuxd.sim.server),
and the GPU ledger its processes share (llmuxd.sim.ledger)."""
