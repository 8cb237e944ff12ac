"""What jaxlm knows of each accelerator: peak FLOP/s for MFU, and for TPUs the memory and
bandwidths `jaxlm plan` needs. One table, matched by the longest prefix of `device.device_kind`."""

from __future__ import annotations

from dataclasses import dataclass

GiB = 2**30


@dataclass(frozen=True)
class Chip:
    name: str
    peak_flops: float  # dense bf16 FLOP/s of one device, from the vendor's data sheet
    # TPUs only (None elsewhere): the HBM one program may use (the TPU compiler says so when a
    # program does not fit, a little under the data sheets' 32, 16, 96 and 32 GiB), HBM bandwidth
    # (bytes/s, Google Cloud's TPU pages), and one direction of one inter-chip link (bytes/s: the
    # chip's bidirectional ICI bandwidth / its links / 2; v4's approximate).
    hbm_bytes: float | None = None
    hbm_bandwidth: float | None = None
    ici_link_bandwidth: float | None = None
    # One direction of the chip's PCIe link to its host (bytes/s), which offloaded activations and
    # host-resident optimizer state cross. An assumption: no data sheet states it; 15 GB/s is the
    # round per-chip figure of "How to Scale Your Model" (Austin et al., 2025, part 2).
    host_link_bandwidth: float | None = None


_PCIE = 15e9
_V5E = Chip("TPU v5e", 197e12, 15.75 * GiB, 819e9, 50e9, _PCIE)
_V6E = Chip("TPU v6e", 918e12, 31.25 * GiB, 1638e9, 100e9, _PCIE)

# Keyed by `device_kind` as JAX reports it ("TPU v5 lite" is a v5e, "TPU v5" a v5p), and by the
# names people write.
CHIPS = {
    "TPU v4": Chip("TPU v4", 275e12, 30.75 * GiB, 1200e9, 50e9, _PCIE),
    "TPU v5 lite": _V5E,
    "TPU v5e": _V5E,
    "TPU v5": Chip("TPU v5p", 459e12, 95.74 * GiB, 2765e9, 100e9, _PCIE),
    "TPU v6 lite": _V6E,
    "TPU v6e": _V6E,
    "TPU7x": Chip("TPU7x", 2307e12),
    "NVIDIA H100 PCIe": Chip("NVIDIA H100 PCIe", 756e12),
    "NVIDIA H100": Chip("NVIDIA H100", 989e12),
    "NVIDIA H200": Chip("NVIDIA H200", 989e12),
    "NVIDIA GH200": Chip("NVIDIA GH200", 989e12),
    "NVIDIA B200": Chip("NVIDIA B200", 2250e12),
    "NVIDIA A100": Chip("NVIDIA A100", 312e12),
    "NVIDIA L4": Chip("NVIDIA L4", 121e12),
}


def table_entry(device_kind: str) -> Chip | None:
    """The table's entry for a `device.device_kind`, or None for a device it does not know."""
    for kind in sorted(CHIPS, key=len, reverse=True):
        if device_kind.startswith(kind):
            return CHIPS[kind]
    return None
