"""Checkpoint, suspend and verified eviction (issue 8).

- `catalogue`: image sets under <images_dir>/<model>/ with manifests and checksums
- `criu`: CRIU dump/restore command lines and runs
- `cuda`: cuda-checkpoint toggles (cuda_suspend), NCCL suspend/resume for TP>1
- `gpu_probe`: GPU memory per process (NVML, nvidia-smi, simulator ledger), as `gpu_probe:` configures
- `canary`: post-wake deterministic probe and unsafe-eviction verdicts
- `manager`: all of it plugged into the orchestrator (`CheckpointManager.install`)
"""
