"""Stand-in nvidia-ml-py on a machine whose NVIDIA driver does not answer: `nvmlInit()` fails
as the real one does there. Tests that must not see the host's NVML put this first (in
sys.modules, or on PYTHONPATH for a subprocess), so a GPU host behaves like this machine."""


class NVMLError(Exception):
    pass


class NVMLError_DriverNotLoaded(NVMLError):  # noqa: N801 - nvidia-ml-py's name
    pass


def nvmlInit() -> None:  # noqa: N802 - nvidia-ml-py's name
    raise NVMLError_DriverNotLoaded("Driver Not Loaded")
