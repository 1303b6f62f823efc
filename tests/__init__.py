import os


def cpu_env(devices: int | None = None) -> dict[str, str]:
    """The environment of a subprocess on the CPU: this one's, XLA flags included (tests/conftest.py),
    with `devices` fake CPU devices instead of any inherited count (None: JAX's own count)."""
    flags = [flag for flag in os.environ.get("XLA_FLAGS", "").split() if "device_count" not in flag]
    if devices is not None:
        flags.append(f"--xla_force_host_platform_device_count={devices}")
    return {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": " ".join(flags)}
