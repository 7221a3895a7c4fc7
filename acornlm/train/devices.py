"""Known accelerators: memory, dense bf16 peak and an indicative price, looked up by name.

Used by the run planner (`acornlm plan --device NAME`, acornlm/train/plan.py) and by the trainer's
MFU on a GPU (MFU = achieved FLOP/s / the device's bf16 peak, PaLM appendix B).

The peaks are the vendors' *dense* bf16 tensor-core figures with fp32 accumulation (the spec sheets
also print a "with sparsity" number twice as large; training does not get it). Memory is what the
card is sold as: "24GB" GDDR cards and "80GB" HBM cards hold that many GiB (nvidia-smi shows
24576 MiB, 81920 MiB...). Prices are indicative on-demand cloud rates in USD per GPU-hour at the
time of writing; they vary by provider and by month, so `acornlm plan --price_per_hour` overrides them.

Names: a table entry (`H100`, `rtx4090`, `a100-80gb`...; case, spaces, "-" and "_" do not matter),
`cuda:24GB` (a generic GPU with that much memory and GENERIC_GPU_FLOPS), `NxNAME` (`8xH100`: N of
them on one node), and `cpu` / `this` (this machine: its RAM, and its measured fp32 matmul peak,
since acornlm trains in fp32 on a CPU; see acornlm/train/mfu.py).
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, replace

import torch

from acornlm.errors import ConfigError
from acornlm.train.mfu import measure_matmul_peak

GiB = 2**30
TFLOPS = 1e12

# A generic `cuda:NGB` GPU: a stated, conservative dense bf16 peak (between an RTX 3090's 71 and an
# RTX 4090's 165 TFLOPS). Name the card (`--device rtx4090`) when you know it.
GENERIC_GPU_FLOPS = 100 * TFLOPS


@dataclass(frozen=True)
class DeviceSpec:
    """One accelerator type (count=1) or a node of `count` of them.

    Attributes:
        name: Canonical name, e.g. "H100-SXM" or "8xH100-SXM".
        memory_bytes: Memory of ONE device (per rank), in bytes.
        bf16_flops: Dense bf16 tensor peak of ONE device, FLOP/s (on `cpu`: the measured fp32 matmul peak).
        price_per_hour: Indicative USD per device-hour (0 for this machine).
        count: Devices on the node (`8xH100` -> 8).
        kind: "gpu" or "cpu".
    """

    name: str
    memory_bytes: int
    bf16_flops: float
    price_per_hour: float
    count: int = 1
    kind: str = "gpu"

    @property
    def total_flops(self) -> float:
        return self.bf16_flops * self.count

    @property
    def total_price_per_hour(self) -> float:
        return self.price_per_hour * self.count


# name -> (memory GiB, dense bf16 TFLOPS, USD per hour). Sources: NVIDIA's A100 / H100 / H200 / L4 /
# L40S data sheets, the Ampere GA102 and Ada AD102 whitepapers (GeForce: "BF16 Tensor TFLOPS with FP32
# accumulate"), AMD's MI300X data sheet. The A10G (AWS g5) is listed at 70 TFLOPS, the A10 at 125.
KNOWN_DEVICES: dict[str, tuple[float, float, float]] = {
    "RTX3090": (24, 71, 0.25),
    "RTX4090": (24, 165.2, 0.40),
    "RTX5090": (32, 209.5, 0.70),
    "RTXA6000": (48, 154.8, 0.80),
    "A10": (24, 125, 0.80),
    "A10G": (24, 70, 1.00),
    "L4": (24, 121, 0.70),
    "L40S": (48, 362, 1.00),
    "A100-40GB": (40, 312, 1.20),
    "A100-80GB": (80, 312, 1.50),
    "H100-PCIe": (80, 756, 2.00),
    "H100-SXM": (80, 989, 2.50),
    "H100-NVL": (94, 835, 2.50),
    "H200": (141, 989, 3.50),
    "B200": (180, 2250, 5.00),
    "MI300X": (192, 1307, 2.50),
}

# Short names people type; each maps to a table entry.
ALIASES = {"3090": "RTX3090", "4090": "RTX4090", "5090": "RTX5090", "A6000": "RTXA6000",
           "A100": "A100-80GB", "A100-80G": "A100-80GB", "A100-40G": "A100-40GB",
           "H100": "H100-SXM", "H100-80GB": "H100-SXM"}


def _key(name: str) -> str:
    """Case-, space-, '-' and '_'-insensitive lookup key: "a100_80gb" == "A100-80GB"."""
    return re.sub(r"[\s_\-]", "", name).upper()


_BY_KEY = {_key(name): name for name in KNOWN_DEVICES} | {_key(a): t for a, t in ALIASES.items()}


def _table_spec(name: str) -> DeviceSpec:
    memory_gib, tflops, price = KNOWN_DEVICES[name]
    return DeviceSpec(name, int(memory_gib * GiB), tflops * TFLOPS, price)


def known_device_names() -> list[str]:
    return [*KNOWN_DEVICES, "cuda:<N>GB", "<N>x<NAME>", "cpu", "this"]


def device_spec(name: str) -> DeviceSpec:
    """The spec of a device name: a table entry, `cuda:24GB`, `8xH100`, or `cpu`/`this` (this machine).

    Raises ConfigError, listing the known names, for anything else.
    """
    text = name.strip()
    count_match = re.fullmatch(r"(\d+)\s*[xX]\s*(.+)", text)
    if count_match:
        count = int(count_match.group(1))
        if count < 1:
            raise ConfigError(f"--device {name!r}: the device count must be >= 1")
        one = device_spec(count_match.group(2))
        if one.count != 1:
            raise ConfigError(f"--device {name!r}: give one count, e.g. 8xH100")
        return replace(one, name=f"{count}x{one.name}", count=count)
    lowered = text.lower()
    if lowered in ("cpu", "this"):
        return this_machine() if lowered == "this" else cpu_spec()
    generic = re.fullmatch(r"(?:cuda|gpu):?\s*(\d+(?:\.\d+)?)\s*(?:gb|gib|g)", lowered)
    if generic:
        gib = float(generic.group(1))
        if gib <= 0:
            raise ConfigError(f"--device {name!r}: the memory must be > 0 GB")
        return DeviceSpec(f"cuda:{generic.group(1)}GB", int(gib * GiB), GENERIC_GPU_FLOPS, 0.0)
    key = _key(text)
    if key in _BY_KEY:
        return _table_spec(_BY_KEY[key])
    raise ConfigError(f"unknown device {name!r}; known: {', '.join(known_device_names())} "
                      "(e.g. --device cuda:24GB, --device 8xH100)")


def gpu_spec_for(cuda_device_name: str) -> DeviceSpec | None:
    """The table entry for a `torch.cuda.get_device_name()` string, or None when unknown.

    E.g. "NVIDIA H100 80GB HBM3" -> H100-SXM, "NVIDIA A100-SXM4-40GB" -> A100-40GB,
    "NVIDIA GeForce RTX 4090" -> RTX4090, "NVIDIA H100 PCIe" -> H100-PCIe.
    """
    text = cuda_device_name.upper().replace("GEFORCE", "").replace("NVIDIA", "")
    compact = re.sub(r"[\s_\-]", "", text)
    if "A100" in compact:
        return _table_spec("A100-40GB" if "40G" in compact else "A100-80GB")
    if "H100" in compact and "GH" not in compact:
        if "PCIE" in compact:
            return _table_spec("H100-PCIe")
        if "NVL" in compact:
            return _table_spec("H100-NVL")
        return _table_spec("H100-SXM")
    for name in ("H200", "B200", "MI300X", "L40S", "L4", "A10G", "A10", "RTXA6000",
                 "RTX5090", "RTX4090", "RTX3090"):
        key = _key(name)
        if name in ("L4", "A10"):  # whole-word: "L40S" contains "L4", "A10G" contains "A10"
            if re.search(rf"(?<![A-Z0-9]){key}(?![A-Z0-9])", re.sub(r"[_\-]", " ", text)):
                return _table_spec(name)
        elif key in compact:
            return _table_spec(name)
    return None


def cpu_spec() -> DeviceSpec:
    """This machine's CPU: total RAM and the measured fp32 matmul peak (acornlm.train.mfu)."""
    return DeviceSpec("cpu", physical_memory_bytes(), measure_matmul_peak("cpu"), 0.0, kind="cpu")


def physical_memory_bytes() -> int:
    """Total RAM from the OS (pages x page size; Linux and macOS), without a psutil dependency."""
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError) as exc:  # no sysconf (Windows): name the device instead
        raise ConfigError("cannot read this machine's memory size; name the device, e.g. --device cuda:24GB "
                          "or --device rtx4090") from exc


def this_machine() -> DeviceSpec:
    """The device a plain `acornlm train pretrain` would use: the first GPU when CUDA is available
    (its real memory; the bf16 peak from the table, else GENERIC_GPU_FLOPS), otherwise the CPU."""
    if not torch.cuda.is_available():
        return cpu_spec()
    props = torch.cuda.get_device_properties(0)
    known = gpu_spec_for(props.name)
    flops = known.bf16_flops if known else GENERIC_GPU_FLOPS
    price = known.price_per_hour if known else 0.0
    return DeviceSpec(props.name, int(props.total_memory), flops, price)
